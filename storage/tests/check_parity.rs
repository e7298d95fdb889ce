//! `strata image check` against `qemu-img check` on a corpus of malformed images made here:
//! qcow2 images whose L1, L2 and refcount tables carry reserved bits, unaligned offsets,
//! references past the end of the file, wrong refcounts, shared clusters and wrong copied
//! flags (also in snapshot tables and extended L2 entries), and vmdk images whose grain
//! directories, grain tables, redundant copies and grains are broken or overlap.
//!
//! Each case is made from a small image qemu-img and qemu-io wrote, by patching a few bytes.
//! Then:
//! - our verdict (exit code: 0 clean, 1 check not completed, 2 corruptions, 3 leaks only) is
//!   qemu-img's, or a stricter one where the table says why (qemu-img's vmdk check stops at the
//!   first grain past the end of the file and looks at nothing else);
//! - `-r all` and `-r leaks` are run by both tools on copies; qemu-img check judges the results,
//!   and ours is never worse than qemu-img's own repair (and our check agrees with qemu-img
//!   about our `-r all`);
//! - where both repairs end clean, the two images hold the same data (`qemu-img compare`); a
//!   vmdk our repair makes clean holds the data of the image before it was broken.

mod qcow2_support;

use std::path::{Path, PathBuf};

use qcow2_support::{run, run_status, tempdir};
use strata_storage::format::check::check_file;
use strata_storage::format::qcow2::check::Repair;
use strata_storage::format::ImageFormat;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Base {
    /// qcow2, 4 KiB clusters: data, a zero cluster, a compressed cluster.
    Qcow2,
    /// The same with an internal snapshot and a write after it.
    Qcow2Snap,
    /// qcow2 with extended L2 entries (64 KiB clusters).
    Qcow2Ext,
    /// monolithicSparse vmdk with a redundant grain directory.
    Vmdk,
    /// streamOptimized vmdk.
    VmdkStream,
}

impl Base {
    fn format(self) -> ImageFormat {
        match self {
            Base::Vmdk | Base::VmdkStream => ImageFormat::Vmdk,
            _ => ImageFormat::Qcow2,
        }
    }
}

/// How our verdict relates to qemu-img's.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// The same exit code.
    Same,
    /// We report exit code `ours` where qemu-img does not see the problem or stops early.
    Stricter { ours: i32, why: &'static str },
}

/// Offsets of the structures a case patches.
#[derive(Debug, Default)]
struct Layout {
    cs: u64,
    l1: u64,
    rt: u64,
    rb: u64,
    l2: u64,
    snap_table: u64,
    snap_l1: u64,
    gd: u64,
    rgd: u64,
    gt: u64,
    rgt: u64,
    first_grain: u64,
}

struct Case {
    name: &'static str,
    base: Base,
    patch: fn(&mut Vec<u8>, &Layout),
    expect: Expect,
    /// Whether our `-r all` must leave the image clean (qemu-img check: no errors).
    repaired_clean: bool,
}

fn be(b: &[u8], at: u64) -> u64 {
    u64::from_be_bytes(b[at as usize..at as usize + 8].try_into().unwrap())
}
fn set_be(b: &mut [u8], at: u64, v: u64) {
    b[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
}
fn update(b: &mut [u8], at: u64, f: impl Fn(u64) -> u64) {
    let v = be(b, at);
    set_be(b, at, f(v));
}
fn le32(b: &[u8], at: u64) -> u32 {
    u32::from_le_bytes(b[at as usize..at as usize + 4].try_into().unwrap())
}
fn set_le32(b: &mut [u8], at: u64, v: u32) {
    b[at as usize..at as usize + 4].copy_from_slice(&v.to_le_bytes());
}
fn set_refcount16(b: &mut [u8], l: &Layout, cluster: u64, v: u16) {
    let at = (l.rb + 2 * cluster) as usize;
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}
/// L2 entry `i` of the first table (16 bytes apart with extended L2 entries).
fn l2e(l: &Layout, i: u64, ext: bool) -> u64 {
    l.l2 + i * if ext { 16 } else { 8 }
}

const OFF: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;

fn qcow2_layout(b: &[u8]) -> Layout {
    let cs = 1u64 << u32::from_be_bytes(b[20..24].try_into().unwrap());
    let l1 = be(b, 40);
    let rt = be(b, 48);
    let snap_table = be(b, 64);
    let snap_l1 = if snap_table != 0 {
        be(b, snap_table)
    } else {
        0
    };
    Layout {
        cs,
        l1,
        rt,
        rb: be(b, rt) & !0x1ff,
        l2: be(b, l1) & OFF,
        snap_table,
        snap_l1,
        ..Layout::default()
    }
}

fn vmdk_layout(b: &[u8]) -> Layout {
    let sector = |at: u64| u64::from_le_bytes(b[at as usize..at as usize + 8].try_into().unwrap());
    let (rgd, gd) = (sector(48) * 512, sector(56) * 512);
    Layout {
        gd,
        rgd,
        gt: u64::from(le32(b, gd)) * 512,
        rgt: if rgd != 0 {
            u64::from(le32(b, rgd)) * 512
        } else {
            0
        },
        first_grain: sector(64),
        ..Layout::default()
    }
}

const fn same(
    name: &'static str,
    base: Base,
    patch: fn(&mut Vec<u8>, &Layout),
    repaired_clean: bool,
) -> Case {
    Case {
        name,
        base,
        patch,
        expect: Expect::Same,
        repaired_clean,
    }
}

const fn stricter(
    name: &'static str,
    base: Base,
    patch: fn(&mut Vec<u8>, &Layout),
    ours: i32,
    why: &'static str,
    repaired_clean: bool,
) -> Case {
    Case {
        name,
        base,
        patch,
        expect: Expect::Stricter { ours, why },
        repaired_clean,
    }
}

const QEMU_VMDK: &str = "qemu-img's vmdk check looks only at grains past the end of the file";
const QEMU_VMDK_STOPS: &str =
    "qemu-img's vmdk check stops at the first grain past the end of the file ('Check failed')";

fn corpus() -> Vec<Case> {
    use Base::*;
    vec![
        // L1 entries.
        same("l1_reserved_low", Qcow2, |b, l| update(b, l.l1, |v| v | 0x2), false),
        same("l1_reserved_high", Qcow2, |b, l| update(b, l.l1, |v| v | 1 << 60), false),
        same("l1_unaligned", Qcow2, |b, l| update(b, l.l1, |v| v + 0x200), false),
        same("l1_past_eof", Qcow2, |b, l| set_be(b, l.l1, COPIED | 0x10_0000), false),
        same("l1_names_the_refcount_table", Qcow2, |b, l| set_be(b, l.l1, COPIED | l.rt), true),
        same("l1_copied_flag_missing", Qcow2, |b, l| update(b, l.l1, |v| v & !COPIED), true),
        // L2 entries.
        same("l2_reserved_low", Qcow2, |b, l| update(b, l.l2, |v| v | 0x2), false),
        same("l2_reserved_high", Qcow2, |b, l| update(b, l.l2, |v| v | 1 << 57), false),
        same("l2_data_unaligned", Qcow2, |b, l| update(b, l2e(l, 1, false), |v| v + 0x200), false),
        same("l2_preallocated_zero_unaligned", Qcow2, |b, l| {
            update(b, l2e(l, 1, false), |v| (v + 0x200) | 1)
        }, true),
        same("l2_data_past_eof", Qcow2, |b, l| set_be(b, l2e(l, 16, false), COPIED | 0x10_0000), false),
        same("l2_compressed_past_eof", Qcow2, |b, l| set_be(b, l2e(l, 64, false), 1 << 62 | 0x10_0000), false),
        same("l2_names_the_l1_table", Qcow2, |b, l| set_be(b, l.l2, COPIED | l.l1), true),
        same("l2_names_the_refcount_table", Qcow2, |b, l| set_be(b, l.l2, COPIED | l.rt), true),
        same("l2_names_a_refcount_block", Qcow2, |b, l| set_be(b, l.l2, COPIED | l.rb), true),
        same("l2_entries_share_a_cluster", Qcow2, |b, l| {
            let v = be(b, l2e(l, 1, false));
            set_be(b, l2e(l, 128, false), v)
        }, true),
        same("l2_copied_flag_missing", Qcow2, |b, l| update(b, l.l2, |v| v & !COPIED), true),
        same("data_cluster_cut_off", Qcow2, |b, _| b.truncate(0x9000), false),
        // Refcount table and blocks.
        same("reftable_reserved_bits", Qcow2, |b, l| update(b, l.rt, |v| v | 1), true),
        stricter("reftable_block_unaligned", Qcow2, |b, l| update(b, l.rt, |v| v + 0x200), 2,
            "qemu-img cannot read the block and stops; we count its refcounts as zero and rebuild them", true),
        same("reftable_second_block_past_eof", Qcow2, |b, l| set_be(b, l.rt + 8, 0x10_0000), true),
        same("reftable_first_block_past_eof", Qcow2, |b, l| set_be(b, l.rt, 0x10_0000), true),
        same("reftable_block_missing", Qcow2, |b, l| set_be(b, l.rt, 0), true),
        same("refcount_too_low", Qcow2, |b, l| set_refcount16(b, l, l.l2 / l.cs + 1, 0), true),
        same("refcount_too_high", Qcow2, |b, l| set_refcount16(b, l, l.l2 / l.cs + 1, 2), true),
        same("refcount_of_l2_table_zero", Qcow2, |b, l| set_refcount16(b, l, l.l2 / l.cs, 0), true),
        stricter("refcount_past_eof", Qcow2, |b, l| set_refcount16(b, l, 40, 1), 3,
            "qemu-img compares refcounts only up to the end of the file", true),
        // Snapshots.
        same("snapshot_l1_unaligned", Qcow2Snap, |b, l| set_be(b, l.snap_table, l.snap_l1 + 0x200), false),
        same("snapshot_l1_past_eof", Qcow2Snap, |b, l| set_be(b, l.snap_table, 0x10_0000), false),
        same("snapshot_l1_entry_reserved", Qcow2Snap, |b, l| update(b, l.snap_l1, |v| v | 2), false),
        same("snapshot_l1_entry_past_eof", Qcow2Snap, |b, l| set_be(b, l.snap_l1, 0x10_0000), false),
        // Extended L2 entries.
        same("ext_allocated_and_zero", Qcow2Ext, |b, l| update(b, l.l2 + 8, |v| v | 1 << 32), false),
        same("ext_preallocated_unaligned", Qcow2Ext, |b, l| set_be(b, l2e(l, 1, true), 0x30200), true),
        same("ext_data_unaligned", Qcow2Ext, |b, l| update(b, l.l2, |v| v + 0x200), false),
        same("ext_allocated_without_host", Qcow2Ext, |b, l| set_be(b, l2e(l, 1, true) + 8, 1), false),
        // Headers that keep the image from opening.
        same("header_l1_unaligned", Qcow2, |b, l| set_be(b, 40, l.l1 + 0x200), false),
        // vmdk grain tables.
        stricter("gt_grain_past_eof", Vmdk, |b, l| set_le32(b, l.gt, 10_000), 2, QEMU_VMDK_STOPS, true),
        stricter("gt_grain_in_metadata", Vmdk, |b, l| set_le32(b, l.gt, (l.gt / 512) as u32), 2, QEMU_VMDK, true),
        stricter("gt_grain_one_without_zero_flag", Vmdk, |b, l| set_le32(b, l.gt, 1), 2, QEMU_VMDK, true),
        stricter("gt_grains_shared", Vmdk, |b, l| {
            let v = le32(b, l.gt);
            set_le32(b, l.gt + 16 * 4, v)
        }, 2, QEMU_VMDK, false),
        stricter("gt_grains_overlap", Vmdk, |b, l| {
            let v = le32(b, l.gt);
            set_le32(b, l.gt + 16 * 4, v + 64)
        }, 2, QEMU_VMDK, false),
        // vmdk grain directories and the redundant copy.
        stricter("gd_table_past_eof", Vmdk, |b, l| set_le32(b, l.gd, 100_000), 2, QEMU_VMDK, true),
        stricter("gd_table_in_a_grain", Vmdk, |b, l| set_le32(b, l.gd, l.first_grain as u32), 2, QEMU_VMDK_STOPS, true),
        stricter("gd_table_in_the_descriptor", Vmdk, |b, l| set_le32(b, l.gd, 1), 2, QEMU_VMDK_STOPS, true),
        stricter("redundant_table_differs", Vmdk, |b, l| set_le32(b, l.rgt, 0), 2, QEMU_VMDK, true),
        stricter("redundant_table_past_eof", Vmdk, |b, l| set_le32(b, l.rgd, 100_000), 2, QEMU_VMDK, true),
        stricter("redundant_table_is_the_primary", Vmdk, |b, l| set_le32(b, l.rgd, (l.gt / 512) as u32), 2, QEMU_VMDK, true),
        stricter("redundant_table_missing", Vmdk, |b, l| set_le32(b, l.rgd, 0), 2, QEMU_VMDK, true),
        stricter("primary_table_missing", Vmdk, |b, l| set_le32(b, l.gd, 0), 2, QEMU_VMDK, false),
        stricter("header_gd_past_eof", Vmdk, |b, _| b[56..64].copy_from_slice(&100_000u64.to_le_bytes()), 1,
            "qemu-img reads zeros past the end; we refuse to open the image", false),
        // streamOptimized grains.
        stricter("stream_marker_names_another_grain", VmdkStream, |b, l| {
            let at = (l.first_grain * 512) as usize;
            b[at..at + 8].copy_from_slice(&4096u64.to_le_bytes());
        }, 2, QEMU_VMDK, false),
        stricter("stream_grain_size_past_eof", VmdkStream, |b, l| {
            let at = (l.first_grain * 512 + 8) as usize;
            b[at..at + 4].copy_from_slice(&0x10_0000u32.to_le_bytes());
        }, 2, QEMU_VMDK, false),
    ]
}

/// Makes the base images with qemu-img and qemu-io.
fn make_bases(dir: &Path) -> Vec<(Base, Vec<u8>)> {
    let p = |n: &str| dir.join(n).to_string_lossy().into_owned();
    let io = |fmt: &str, path: &str, cmds: &[&str]| {
        let mut args = vec!["-f", fmt];
        for c in cmds {
            args.push("-c");
            args.push(c);
        }
        args.push(path);
        run("qemu-io", &args);
    };
    let q = p("base.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            &q,
            "1M",
        ],
    );
    io(
        "qcow2",
        &q,
        &[
            "write -P 0x11 0 8k",
            "write -P 0x22 64k 4k",
            "write -z 128k 4k",
            "write -c -P 0x33 256k 4k",
            "write -P 0x44 512k 4k",
        ],
    );
    let s = p("snap.qcow2");
    std::fs::copy(&q, &s).unwrap();
    run("qemu-img", &["snapshot", "-c", "s1", &s]);
    io("qcow2", &s, &["write -P 0x55 0 4k"]);
    let e = p("ext.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=65536,extended_l2=on",
            &e,
            "4M",
        ],
    );
    io(
        "qcow2",
        &e,
        &[
            "write -P 0x11 0 8k",
            "write -z 64k 4k",
            "write -P 0x22 1M 64k",
        ],
    );
    let v = p("base.vmdk");
    run("qemu-img", &["create", "-q", "-f", "vmdk", &v, "4M"]);
    io(
        "vmdk",
        &v,
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 1M 64k",
            "write -P 0x33 3M 128k",
        ],
    );
    let st = p("stream.vmdk");
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            &v,
            &st,
        ],
    );
    [
        (Base::Qcow2, q),
        (Base::Qcow2Snap, s),
        (Base::Qcow2Ext, e),
        (Base::Vmdk, v),
        (Base::VmdkStream, st),
    ]
    .into_iter()
    .map(|(b, path)| {
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            qemu_check(Path::new(&path), b.format(), None),
            0,
            "{b:?} base is not clean"
        );
        (b, bytes)
    })
    .collect()
}

fn qemu_check(path: &Path, fmt: ImageFormat, repair: Option<&str>) -> i32 {
    let mut args = vec!["check", "-f", fmt.name()];
    if let Some(r) = repair {
        args.extend(["-r", r]);
    }
    let path = path.to_string_lossy();
    args.push(&path);
    run_status("qemu-img", &args).0
}

/// Our verdict as `strata image check` gives it, with the findings.
fn ours(path: &Path, fmt: ImageFormat, repair: Repair) -> (i32, String) {
    match check_file(path, Some(fmt), repair) {
        Ok(r) => (i32::from(r.exit_code()), r.messages.join("\n")),
        Err(e) => (1, format!("Check not completed: {e}")),
    }
}

/// Worse verdicts rank higher: clean, leaks, corruptions, check not completed.
fn severity(code: i32) -> u8 {
    match code {
        0 => 0,
        3 => 1,
        2 => 2,
        _ => 3,
    }
}

fn copy(from: &Path, dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    std::fs::copy(from, &to).unwrap();
    to
}

fn malformed_images_are_judged_and_repaired_like_qemu_img() {
    strata_testkit::require_qemu_utils();
    let dir = tempdir();
    let bases = make_bases(dir.path());
    let cases = corpus();
    assert!(cases.len() >= 50, "the corpus lost cases");
    let mut failures = Vec::new();
    for case in &cases {
        let fmt = case.base.format();
        let ext = if fmt == ImageFormat::Vmdk {
            "vmdk"
        } else {
            "qcow2"
        };
        let original = &bases.iter().find(|(b, _)| *b == case.base).unwrap().1;
        let layout = if fmt == ImageFormat::Vmdk {
            vmdk_layout(original)
        } else {
            qcow2_layout(original)
        };
        let mut bytes = original.clone();
        (case.patch)(&mut bytes, &layout);
        let cdir = dir.path().join(case.name);
        std::fs::create_dir(&cdir).unwrap();
        let broken = cdir.join(format!("broken.{ext}"));
        std::fs::write(&broken, &bytes).unwrap();

        let theirs = qemu_check(&broken, fmt, None);
        let (mine, findings) = ours(&broken, fmt, Repair::None);
        let line = format!("{:36} qemu-img {theirs}, ours {mine}", case.name);
        println!("{line}");
        let verdict_ok = match case.expect {
            Expect::Same => mine == theirs && mine != 0,
            Expect::Stricter { ours, why } => {
                println!("    stricter: {why}");
                mine == ours && mine != 0
            }
        };
        if !verdict_ok {
            failures.push(format!("{line}: expected {:?}\n{findings}", case.expect));
            continue;
        }

        // Repairs on copies: ours, and qemu-img's own (qemu-img repairs nothing in a vmdk).
        let mine_repaired = copy(&broken, &cdir, &format!("ours.{ext}"));
        let (_, repair_log) = ours(&mine_repaired, fmt, Repair::All);
        let after_ours_by_qemu = qemu_check(&mine_repaired, fmt, None);
        let (after_ours_by_us, after_findings) = ours(&mine_repaired, fmt, Repair::None);
        let after_theirs = if fmt == ImageFormat::Vmdk {
            theirs
        } else {
            let theirs_repaired = copy(&broken, &cdir, &format!("qemu.{ext}"));
            qemu_check(&theirs_repaired, fmt, Some("all"));
            let after = qemu_check(&theirs_repaired, fmt, None);
            // `-r leaks` on both sides too: never worse than qemu-img's.
            let ours_leaks = copy(&broken, &cdir, &format!("ours-leaks.{ext}"));
            let theirs_leaks = copy(&broken, &cdir, &format!("qemu-leaks.{ext}"));
            ours(&ours_leaks, fmt, Repair::Leaks);
            qemu_check(&theirs_leaks, fmt, Some("leaks"));
            let (ol, tl) = (
                qemu_check(&ours_leaks, fmt, None),
                qemu_check(&theirs_leaks, fmt, None),
            );
            println!("    after -r leaks: qemu-img judges ours {ol}, its own {tl}");
            if severity(ol) > severity(tl) {
                failures.push(format!(
                    "{}: after -r leaks qemu-img judges ours {ol}, its own {tl}",
                    case.name
                ));
            }
            if after == 0 && after_ours_by_qemu == 0 {
                let (same, out) = run_status(
                    "qemu-img",
                    &[
                        "compare",
                        "-q",
                        &mine_repaired.to_string_lossy(),
                        &theirs_repaired.to_string_lossy(),
                    ],
                );
                if same != 0 {
                    failures.push(format!(
                        "{}: the two repairs hold different data: {out}",
                        case.name
                    ));
                }
            }
            after
        };
        println!(
            "    after -r all: qemu-img judges ours {after_ours_by_qemu}, its own {after_theirs}; we judge ours {after_ours_by_us}"
        );
        let judged_alike = fmt == ImageFormat::Vmdk
            || after_ours_by_us == after_ours_by_qemu
            || matches!(case.expect, Expect::Stricter { .. });
        if severity(after_ours_by_qemu) > severity(after_theirs) || !judged_alike {
            failures.push(format!(
                "{}: after -r all qemu-img judges ours {after_ours_by_qemu} (its own {after_theirs}), we judge it {after_ours_by_us}\n{repair_log}\n--\n{after_findings}",
                case.name
            ));
        }
        if case.repaired_clean {
            if after_ours_by_us != 0 {
                failures.push(format!(
                    "{}: -r all left {after_ours_by_us}\n{repair_log}\n--\n{after_findings}",
                    case.name
                ));
            }
            if fmt == ImageFormat::Vmdk {
                // The redundant copy gave back exactly what was there before the damage.
                let before = cdir.join("before.vmdk");
                std::fs::write(&before, original).unwrap();
                let (same, out) = run_status(
                    "qemu-img",
                    &[
                        "compare",
                        "-q",
                        &before.to_string_lossy(),
                        &mine_repaired.to_string_lossy(),
                    ],
                );
                if same != 0 {
                    failures.push(format!("{}: the repaired vmdk lost data: {out}", case.name));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

/// The vmdk images we write (after random writes, discards and zeroes) check clean, by us and
/// by qemu-img.
fn vmdk_images_we_write_check_clean() {
    strata_testkit::require_qemu_utils();
    use qcow2_support::{apply, open, workload};
    use std::collections::BTreeMap;
    use strata_storage::format::{create_compressed, create_image};
    let dir = tempdir();
    let size = 16u64 << 20;
    for sub in [
        "monolithicSparse",
        "twoGbMaxExtentSparse",
        "streamOptimized",
    ] {
        let path = dir.path().join(format!("{sub}.vmdk"));
        let mut opts = BTreeMap::new();
        opts.insert("subformat".to_string(), sub.to_string());
        if sub == "streamOptimized" {
            let mut w = create_compressed(&path, ImageFormat::Vmdk, size, &opts).unwrap();
            let unit = w.unit() as usize;
            let data = qcow2_support::pattern(0, size as usize / 2, 7);
            for (i, chunk) in data.chunks(unit).enumerate() {
                w.write_unit((i * unit) as u64, chunk).unwrap();
            }
            w.finish().unwrap();
        } else {
            create_image(&path, ImageFormat::Vmdk, size, &opts).unwrap();
            let img = open(&path, true);
            let mut model = vec![0u8; size as usize];
            apply(img.as_ref(), &workload(size, 300, 11), &mut model);
            img.flush().unwrap();
        }
        assert_eq!(
            qemu_check(&path, ImageFormat::Vmdk, None),
            0,
            "{sub}: qemu-img check"
        );
        let (code, findings) = ours(&path, ImageFormat::Vmdk, Repair::None);
        assert_eq!(code, 0, "{sub}:\n{findings}");
    }
}

strata_testkit::main!(
    malformed_images_are_judged_and_repaired_like_qemu_img,
    vmdk_images_we_write_check_clean,
);

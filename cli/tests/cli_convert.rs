//! End-to-end tests of `strata image convert` and `strata image import-ova` through the built
//! binary: every pair of raw, qcow2 and vmdk subformats (sources made by qemu-img, outputs
//! checked with `qemu-img compare` and `qemu-img check`), compressed output, progress output to a
//! pipe, volumes as source and target, failed conversions that must leave nothing behind, and an
//! OVA packed with tar at test time. The library-level matrix (storage/tests/convert_matrix.rs)
//! also runs out-of-order writes and sparseness checks; this file proves the command does.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 24 * MIB;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// The binary with its own data directory.
fn strata(data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("--data")
        .arg(data)
        .args(args)
        .env_remove("STRATA_DATA")
        .output()
        .expect("run strata")
}

fn ok(data: &Path, args: &[&str]) -> String {
    let o = strata(data, args);
    assert!(
        o.status.success(),
        "strata {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// A command that must fail with one clean line on stderr mentioning `needle`.
fn fails(data: &Path, args: &[&str], needle: &str) {
    let o = strata(data, args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "strata {args:?} succeeded");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    assert!(
        err.starts_with("strata: ") && !err.contains("panicked"),
        "{err}"
    );
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "{args:?}: {err:?} should mention {needle:?}"
    );
}

fn run(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn try_run(cmd: &str, args: &[&str]) -> (bool, String) {
    let o = Command::new(cmd).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

/// Deterministic bytes that compress somewhat (half text-like, half noise).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if (i / 4096) % 2 == 0 {
                b'a' + (x % 16) as u8
            } else {
                x as u8
            }
        })
        .collect()
}

/// A mostly empty raw disk with data runs (one at an odd offset, one at the very end) and a
/// run of explicit zeros.
fn raw_source(path: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(SIZE).unwrap();
    let runs = [
        (0, 64 << 10),
        (MIB + 4096, 300 << 10),
        (7 * MIB + 512, 3000),
        (12 * MIB, 2 * MIB),
        (SIZE - 8192, 8192),
    ];
    for (i, (at, len)) in runs.into_iter().enumerate() {
        f.write_all_at(&pattern(i as u64 + 1, len as usize), at)
            .unwrap();
    }
    f.write_all_at(&vec![0u8; MIB as usize], 16 * MIB).unwrap();
}

/// A source kind: name, qemu-img format, options.
const SOURCES: [(&str, &str, &str); 6] = [
    ("raw", "raw", ""),
    ("qcow2", "qcow2", ""),
    ("vmdk-sparse", "vmdk", "subformat=monolithicSparse"),
    ("vmdk-flat", "vmdk", "subformat=monolithicFlat"),
    ("vmdk-split", "vmdk", "subformat=twoGbMaxExtentSparse"),
    ("vmdk-stream", "vmdk", "subformat=streamOptimized"),
];

/// A target kind: name, format, strata arguments, whether `qemu-img check` applies.
const TARGETS: [(&str, &str, &[&str], bool); 8] = [
    ("raw", "raw", &["-O", "raw"], false),
    ("qcow2", "qcow2", &["-O", "qcow2"], true),
    ("qcow2-c", "qcow2", &["-O", "qcow2", "-c"], true),
    (
        "vmdk-sparse",
        "vmdk",
        &["-O", "vmdk", "-o", "subformat=monolithicSparse"],
        true,
    ),
    (
        "vmdk-flat",
        "vmdk",
        &["-O", "vmdk", "-o", "subformat=monolithicFlat"],
        false,
    ),
    (
        "vmdk-split",
        "vmdk",
        &["-O", "vmdk", "-o", "subformat=twoGbMaxExtentSparse"],
        true,
    ),
    (
        "vmdk-splitflat",
        "vmdk",
        &["-O", "vmdk", "-o", "subformat=twoGbMaxExtentFlat"],
        false,
    ),
    ("vmdk-stream", "vmdk", &["-O", "vmdk", "-c"], true),
];

fn make_sources(dir: &Path) -> Vec<(&'static str, &'static str, PathBuf)> {
    let raw = dir.join("src.raw");
    raw_source(&raw);
    SOURCES
        .iter()
        .map(|&(name, fmt, opts)| {
            if name == "raw" {
                return (name, fmt, raw.clone());
            }
            let out = dir.join(format!("src-{name}.{fmt}"));
            let mut args = vec!["convert", "-f", "raw", "-O", fmt];
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            args.extend([s(&raw), s(&out)]);
            run("qemu-img", &args);
            (name, fmt, out)
        })
        .collect()
}

fn every_format_pair_through_the_command() {
    strata_testkit::require_qemu_utils();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let sources = make_sources(dir.path());
    for (src_name, src_fmt, src) in &sources {
        for (t_name, t_fmt, t_args, check) in TARGETS {
            let row = format!("{src_name} -> {t_name}");
            let out_dir = dir.path().join(format!("{src_name}-{t_name}"));
            std::fs::create_dir(&out_dir).unwrap();
            let dst = out_dir.join(format!("out.{t_fmt}"));
            let mut args = vec!["image", "convert"];
            args.extend_from_slice(t_args);
            args.extend([s(src), s(&dst)]);
            let stdout = ok(&data, &args);
            assert!(stdout.is_empty(), "{row}: {stdout}");
            let (same, msg) = try_run(
                "qemu-img",
                &["compare", "-f", src_fmt, "-F", t_fmt, s(src), s(&dst)],
            );
            assert!(same, "{row}: qemu-img compare: {msg}");
            if check {
                let (clean, msg) = try_run("qemu-img", &["check", "-f", t_fmt, s(&dst)]);
                assert!(clean, "{row}: qemu-img check: {msg}");
            }
            if t_args.contains(&"-c") {
                let info = run("qemu-img", &["info", "--output", "json", s(&dst)]);
                let v: serde_json::Value = serde_json::from_str(&info).unwrap();
                let actual = v["actual-size"].as_u64().unwrap();
                assert!(actual < 3 * MIB, "{row}: -c output takes {actual} bytes");
                if *t_fmt == *"vmdk" {
                    let sub = &v["format-specific"]["data"]["create-type"];
                    assert_eq!(sub, "streamOptimized", "{row}: {v}");
                }
            }
            // No temporary names are left next to the output.
            let left = std::fs::read_dir(&out_dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .count();
            assert_eq!(left, 0, "{row}: temporary files left");
            std::fs::remove_dir_all(&out_dir).unwrap();
        }
    }
}

fn progress_to_a_pipe_and_stats_stay_clean() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let src = dir.path().join("src.raw");
    raw_source(&src);
    let dst = dir.path().join("out.qcow2");
    let o = strata(
        &data,
        &["image", "convert", "-p", "-O", "qcow2", s(&src), s(&dst)],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Not a terminal: no bar, no carriage returns or escape sequences on either stream.
    assert!(
        o.stdout.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(
        o.stderr.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&o.stderr)
    );
    let dst2 = dir.path().join("out2.vmdk");
    let o = strata(
        &data,
        &[
            "image",
            "convert",
            "-p",
            "--stats",
            "-O",
            "vmdk",
            s(&src),
            s(&dst2),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(err.starts_with("converted 24 MiB"), "{err:?}");
    assert!(!err.contains('\r') && !err.contains('\x1b'), "{err:?}");
}

/// Reads a whole file.
fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

fn volumes_as_source_and_target() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (pv0, pv1) = (dir.path().join("pv0.img"), dir.path().join("pv1.img"));
    ok(&data, &["pv", "create", s(&pv0), "--size", "128M"]);
    ok(&data, &["pv", "create", s(&pv1), "--size", "64M"]);
    ok(&data, &["vg", "create", "vg0", s(&pv0)]);
    ok(&data, &["vg", "create", "vg1", s(&pv1)]);
    ok(&data, &["lv", "create-pool", "vg0/pool", "--size", "96M"]);
    for thin in ["vg0/a", "vg0/b"] {
        ok(
            &data,
            &["lv", "create", thin, "--size", "24M", "--thin", "vg0/pool"],
        );
    }
    ok(&data, &["lv", "create", "vg1/lin", "--size", "32M"]);
    let src = dir.path().join("src.raw");
    raw_source(&src);
    let want = bytes(&src);

    // File into a thin volume, a thin volume into another of its group, then across groups
    // into a larger linear volume, then back out into new images.
    ok(
        &data,
        &["image", "convert", "-n", "-O", "raw", s(&src), "lv:vg0/a"],
    );
    ok(
        &data,
        &[
            "image", "convert", "-n", "-O", "raw", "lv:vg0/a", "lv:vg0/b",
        ],
    );
    ok(
        &data,
        &[
            "image",
            "convert",
            "-n",
            "-O",
            "raw",
            "lv:vg0/b",
            "lv:vg1/lin",
        ],
    );
    let back = dir.path().join("back.raw");
    ok(
        &data,
        &["image", "convert", "-O", "raw", "lv:vg0/b", s(&back)],
    );
    assert!(bytes(&back) == want, "vg0/b differs from the source");
    let lin = dir.path().join("lin.raw");
    ok(
        &data,
        &["image", "convert", "-O", "raw", "lv:vg1/lin", s(&lin)],
    );
    let lin = bytes(&lin);
    assert_eq!(lin.len() as u64, 32 * MIB);
    assert!(lin[..want.len()] == want[..], "vg1/lin differs");
    // The thin copy stayed thin: zero runs were not allocated.
    let list: serde_json::Value =
        serde_json::from_str(&ok(&data, &["lv", "list", "vg0", "--output", "json"])).unwrap();
    let b = list
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "b")
        .unwrap();
    let mapped = b["mapped-bytes"].as_u64().unwrap();
    assert!(mapped < 8 * MIB, "vg0/b maps {mapped} bytes");
    if strata_testkit::part_has_tool("qemu-img", "qemu-utils") {
        let q = dir.path().join("from-volume.qcow2");
        ok(
            &data,
            &["image", "convert", "-O", "qcow2", "lv:vg0/a", s(&q)],
        );
        let (same, msg) = try_run("qemu-img", &["compare", "-F", "qcow2", s(&src), s(&q)]);
        assert!(same, "{msg}");
    }

    let cases: [(&[&str], &str); 6] = [
        (&["-O", "raw", "lv:vg0/a", "lv:vg0/b"], "must exist"),
        (&["-n", "-O", "qcow2", s(&src), "lv:vg0/a"], "raw"),
        (&["-f", "qcow2", "-O", "raw", "lv:vg0/a", "x.raw"], "raw"),
        (&["-n", "-O", "raw", "lv:vg0/a", "lv:vg0/a"], "same"),
        (&["-n", "-O", "raw", s(&src), "lv:vg0/nope"], "nope"),
        (&["-n", "-O", "raw", "lv:vg1/lin", "lv:vg0/a"], "smaller"),
    ];
    for (args, needle) in cases {
        let mut all = vec!["image", "convert"];
        all.extend_from_slice(args);
        fails(&data, &all, needle);
    }
}

/// Makes `path` a qcow2 whose cluster at 8 MiB points far beyond the end of the file, so a
/// conversion fails after it has written the clusters before it.
fn broken_qcow2(dir: &Path) -> PathBuf {
    let raw = dir.join("for-broken.raw");
    raw_source(&raw);
    let q = dir.join("broken.qcow2");
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&q)],
    );
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 7 8M 64k", s(&q)],
    );
    let mut img = bytes(&q);
    let be = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap());
    let l1 = be(&img[40..48]) as usize;
    let l2 = (be(&img[l1..l1 + 8]) & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = l2 + (8 * MIB as usize / 65536) * 8;
    let beyond: u64 = (1 << 63) | (1 << 40);
    img[entry..entry + 8].copy_from_slice(&beyond.to_be_bytes());
    std::fs::write(&q, img).unwrap();
    q
}

fn failed_conversions_leave_no_target() {
    strata_testkit::require_qemu_utils();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let bad = broken_qcow2(dir.path());
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let targets: [&[&str]; 5] = [
        &["-O", "raw"],
        &["-O", "qcow2"],
        &["-O", "qcow2", "-c"],
        &["-O", "vmdk", "-o", "subformat=twoGbMaxExtentFlat"],
        &["-O", "vmdk", "-c"],
    ];
    for t in targets {
        let dst = out.join("disk.img");
        let mut args = vec!["image", "convert"];
        args.extend_from_slice(t);
        args.extend([s(&bad), s(&dst)]);
        fails(&data, &args, "convert");
        let left: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{t:?} left {left:?}");
    }
    // A target that exists is refused and kept; with -n the error is reported and the
    // existing target stays where it was (written up to the failure).
    let existing = out.join("existing.raw");
    std::fs::write(&existing, vec![0x55u8; SIZE as usize]).unwrap();
    fails(
        &data,
        &["image", "convert", "-O", "raw", s(&bad), s(&existing)],
        "already exists",
    );
    assert_eq!(bytes(&existing), vec![0x55u8; SIZE as usize]);
    fails(
        &data,
        &["image", "convert", "-n", "-O", "raw", s(&bad), s(&existing)],
        "convert",
    );
    assert_eq!(bytes(&existing).len() as u64, SIZE);
}

fn ovf(disk_href: &str, capacity: u64) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References><File ovf:id="file1" ovf:href="{disk_href}"/></References>
  <DiskSection>
    <Info>Virtual disks</Info>
    <Disk ovf:capacity="{capacity}" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="vm"><Info>A test VM</Info><Name>vm</Name></VirtualSystem>
</Envelope>
"#
    )
}

fn import_ova_packed_with_tar() {
    strata_testkit::require_qemu_utils();
    strata_testkit::require_tool("tar", "tar");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let pack = dir.path().join("pack");
    std::fs::create_dir(&pack).unwrap();
    let raw = dir.path().join("disk.raw");
    raw_source(&raw);
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            s(&raw),
            s(&pack.join("disk1.vmdk")),
        ],
    );
    std::fs::write(pack.join("vm.ovf"), ovf("disk1.vmdk", SIZE)).unwrap();
    std::fs::write(pack.join("broken.ovf"), ovf("missing.vmdk", SIZE)).unwrap();
    let ova = dir.path().join("vm.ova");
    let tar = |out: &Path, files: &[&str]| {
        let mut args = vec!["-cf", s(out), "-C", s(&pack), "--format=ustar"];
        args.extend_from_slice(files);
        run("tar", &args);
    };
    tar(&ova, &["vm.ovf", "disk1.vmdk"]);
    for fmt in ["qcow2", "vmdk", "raw"] {
        let out = dir.path().join(format!("imported-{fmt}"));
        let json = ok(
            &data,
            &[
                "image",
                "import-ova",
                "-O",
                fmt,
                "--output",
                "json",
                s(&ova),
                s(&out),
            ],
        );
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v[0]["disk_id"], "vmdisk1", "{v}");
        let disk = out.join(format!("disk1.{fmt}"));
        let (same, msg) = try_run("qemu-img", &["compare", "-F", fmt, s(&raw), s(&disk)]);
        assert!(same, "{fmt}: {msg}");
        if fmt != "raw" {
            let (clean, msg) = try_run("qemu-img", &["check", s(&disk)]);
            assert!(clean, "{fmt}: {msg}");
        }
    }
    let broken = dir.path().join("broken.ova");
    tar(&broken, &["broken.ovf", "disk1.vmdk"]);
    fails(
        &data,
        &["image", "import-ova", s(&broken), s(&dir.path().join("b"))],
        "missing.vmdk",
    );
}

/// Ctrl-C during a conversion stops it at the next chunk, removes the staged (hidden) target,
/// and exits with 130; nothing is left in the target's folder.
fn ctrl_c_stops_a_conversion_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // 256 MiB copied in 4 KiB O_DIRECT writes, zeros included (-S 0): seconds of work, so the
    // signal lands mid-way on any disk this runs on.
    let src = dir.path().join("src.raw");
    std::fs::File::create(&src)
        .unwrap()
        .set_len(256 * MIB)
        .unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let dst = out.join("disk.qcow2");
    let mut child = Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("--data")
        .arg(&data)
        .args(["image", "convert", "-f", "raw", "-O", "qcow2", "-S", "0"])
        .args(["--chunk", "4k", "-m", "1", "-t", "none"])
        .arg(&src)
        .arg(&dst)
        .env_remove("STRATA_DATA")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run strata");
    let started = std::time::Instant::now();
    let staged = |out: &Path| {
        std::fs::read_dir(out)
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().starts_with('.'))
    };
    while !staged(&out) {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "no staged target appeared"
        );
        assert!(child.try_wait().unwrap().is_none(), "convert ended early");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
    let sent = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(sent, 0);
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "stderr: {err}");
    assert!(err.starts_with("strata: interrupted"), "{err}");
    assert!(err.to_lowercase().contains("cancel"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "the interrupted conversion left {left:?}");
}

/// A qcow2 made by qemu-img in `dir` (base.qcow2) holding `bytes`.
fn qcow2_base(dir: &Path, bytes: &[u8]) -> PathBuf {
    let raw = dir.join("base.raw");
    std::fs::write(&raw, bytes).unwrap();
    let base = dir.join("base.qcow2");
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&base)],
    );
    base
}

/// A new qcow2 on a backing file (`-o backing_file=`) reads the backing where nothing is
/// written, so the source's zeros must be written (as zero clusters): the result, read through
/// its backing file, equals the source.
fn converting_onto_a_backing_file_keeps_the_sources_zeros() {
    strata_testkit::require_qemu_utils();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    qcow2_base(dir.path(), &vec![0xabu8; 4 * MIB as usize]);
    let mut src_bytes = vec![0xcdu8; 4 * MIB as usize];
    src_bytes[MIB as usize..2 * MIB as usize].fill(0);
    let src = dir.path().join("src.raw");
    std::fs::write(&src, &src_bytes).unwrap();
    let out = dir.path().join("out.qcow2");
    ok(
        &data,
        &[
            "image",
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "backing_file=base.qcow2,backing_fmt=qcow2",
            s(&src),
            s(&out),
        ],
    );
    run("qemu-img", &["check", s(&out)]);
    let (same, text) = try_run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", s(&src), s(&out)],
    );
    assert!(same, "{text}");
    // The zeros cost no data clusters.
    let map = run("qemu-img", &["map", "--output=json", s(&out)]);
    let extents: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let zeroed = extents
        .iter()
        .find(|e| e["start"].as_u64() == Some(MIB))
        .unwrap_or_else(|| panic!("no extent at 1 MiB: {map}"));
    assert_eq!(zeroed["length"].as_u64(), Some(MIB), "{map}");
    assert_eq!(zeroed["zero"].as_bool(), Some(true), "{map}");
    assert_eq!(zeroed["data"].as_bool(), Some(false), "{map}");
    assert_eq!(zeroed["depth"].as_u64(), Some(0), "{map}");
}

/// Converting an overlay (a qcow2 on a backing file) flattens it: the clusters the overlay
/// does not hold come from the backing file, not as zeros.
fn converting_an_overlay_reads_its_backing_file() {
    strata_testkit::require_qemu_utils();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let base = qcow2_base(dir.path(), &pattern(7, 4 * MIB as usize));
    let overlay = dir.path().join("overlay.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            s(&base),
            s(&overlay),
        ],
    );
    run("qemu-io", &["-c", "write -P 0x77 512k 64k", s(&overlay)]);
    for fmt in ["raw", "qcow2", "vmdk"] {
        let out = dir.path().join(format!("flat.{fmt}"));
        ok(
            &data,
            &["image", "convert", "-O", fmt, s(&overlay), s(&out)],
        );
        let (same, text) = try_run("qemu-img", &["compare", s(&overlay), s(&out)]);
        assert!(same, "{fmt}: {text}");
    }
}

strata_testkit::main!(
    every_format_pair_through_the_command,
    progress_to_a_pipe_and_stats_stay_clean,
    volumes_as_source_and_target,
    failed_conversions_leave_no_target,
    import_ova_packed_with_tar,
    ctrl_c_stops_a_conversion_and_leaves_nothing,
    converting_onto_a_backing_file_keeps_the_sources_zeros,
    converting_an_overlay_reads_its_backing_file,
);

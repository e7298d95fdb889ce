//! Malformed VHDs and VHDXs get a clear error, never a panic, in bounded time and memory:
//! damaged footers, headers, BATs and region tables, hostile sizes and lengths, parent locators
//! that leave the folder, and logs; a VHDX log left by a crash is replayed by qemu-img and by
//! us to the same bytes, and is never read around.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use strata_storage::format::qcow2::check::Repair;
use strata_storage::format::vhd::dynamic::{DynamicHeader, HEADER_LEN};
use strata_storage::format::vhd::footer::{checksum, Footer};
use strata_storage::format::vhdx::guid::Guid;
use strata_storage::format::vhdx::header::{
    read_current_header, read_regions, render_regions, seal, update_header, HEADER_OFFSETS, MIB,
    REGION_OFFSETS,
};
use strata_storage::format::vhdx::log::{LogPlace, LogWriter};
use strata_storage::format::{self, open_image, ImageFormat, OpenOptions};
use strata_storage::HostFile;

mod vhd_util;
use vhd_util::*;

fn opts(t: &str) -> std::collections::BTreeMap<String, String> {
    format::parse_options(t).unwrap()
}

fn ro(f: ImageFormat) -> OpenOptions {
    OpenOptions {
        format: Some(f),
        read_only: true,
        ..OpenOptions::default()
    }
}

/// Opens `path` and returns the error text; panics if it opens.
fn refused(path: &Path, f: ImageFormat) -> String {
    match open_image(path, &ro(f)) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e.to_string(),
    }
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn read_at(path: &Path, at: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, at).unwrap();
    b
}

/// A dynamic VHD with data in two blocks.
fn vhd(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    format::create_image(&p, ImageFormat::Vhd, 16 << 20, &opts("force_size=on")).unwrap();
    let img = open_image(&p, &OpenOptions::default()).unwrap();
    write_patterns(img.as_ref(), &[(0, 4096, 1), (5 << 20, 4096, 2)]);
    p
}

/// Rewrites the dynamic header of `p` through `f` (checksum fixed).
fn edit_header(p: &Path, f: impl FnOnce(&mut DynamicHeader)) {
    let mut h = DynamicHeader::parse(&read_at(p, 512, HEADER_LEN), "t").unwrap();
    f(&mut h);
    patch(p, 512, &h.render());
}

/// Rewrites both footers of `p` through `f` (checksum fixed).
fn edit_footer(p: &Path, f: impl FnOnce(&mut Footer)) {
    let len = std::fs::metadata(p).unwrap().len();
    let mut ft = Footer::parse(&read_at(p, len - 512, 512), "t").unwrap();
    f(&mut ft);
    let b = ft.render();
    patch(p, 0, &b);
    patch(p, len - 512, &b);
}

#[test]
fn damaged_vhd_footers_and_headers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let len = |p: &Path| std::fs::metadata(p).unwrap().len();

    let p = vhd(d, "sum.vhd");
    patch(&p, len(&p) - 512 + 100, &[1]);
    patch(&p, 100, &[1]);
    assert!(refused(&p, ImageFormat::Vhd).contains("checksum"));

    // The footer at the end damaged, the copy intact: read through the copy; a writable open
    // repairs the end.
    let p = vhd(d, "end.vhd");
    patch(&p, len(&p) - 512, b"garbage!");
    let img = open_image(&p, &ro(ImageFormat::Vhd)).unwrap();
    assert!(read_all(img.as_ref())[..4096].iter().all(|&b| b == 1));
    drop(img);
    drop(open_image(&p, &OpenOptions::default()).unwrap());
    assert_eq!(&read_at(&p, len(&p) - 512, 8), b"conectix");

    let p = vhd(d, "cookie.vhd");
    patch(&p, 0, b"notavhd!");
    patch(&p, len(&p) - 512, b"notavhd!");
    assert!(refused(&p, ImageFormat::Vhd).contains("no VHD footer"));

    let p = vhd(d, "hdrsum.vhd");
    patch(&p, 512 + 40, &[9]);
    assert!(refused(&p, ImageFormat::Vhd).contains("dynamic header checksum"));

    let p = vhd(d, "bs.vhd");
    edit_header(&p, |h| h.block_size = 3 << 20);
    assert!(refused(&p, ImageFormat::Vhd).contains("block size"));

    let p = vhd(d, "hdroff.vhd");
    edit_footer(&p, |f| f.data_offset = 1 << 40);
    assert!(refused(&p, ImageFormat::Vhd).contains("outside the file"));

    let p = vhd(d, "saved.vhd");
    edit_footer(&p, |f| f.saved_state = 1);
    assert!(refused(&p, ImageFormat::Vhd).contains("saved state"));

    let p = vhd(d, "type.vhd");
    let mut b = read_at(&p, 0, 512);
    b[60..64].copy_from_slice(&9u32.to_be_bytes());
    let s = checksum(&b, 64);
    b[64..68].copy_from_slice(&s.to_be_bytes());
    patch(&p, 0, &b);
    patch(&p, len(&p) - 512, &b);
    assert!(refused(&p, ImageFormat::Vhd).contains("disk type"));

    // A fixed disk whose footer claims more than the file holds.
    let p = d.join("fixed.vhd");
    format::create_image(
        &p,
        ImageFormat::Vhd,
        1 << 20,
        &opts("subformat=fixed,force_size=on"),
    )
    .unwrap();
    edit_footer(&p, |f| f.current_size = 1 << 40);
    assert!(refused(&p, ImageFormat::Vhd).contains("do not fit"));
}

#[test]
fn hostile_vhd_bats_are_refused_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = vhd(d, "past.vhd");
    edit_header(&p, |h| h.table_offset = 1 << 40);
    assert!(refused(&p, ImageFormat::Vhd).contains("past the end"));

    let p = vhd(d, "few.vhd");
    edit_header(&p, |h| h.max_table_entries = 2);
    assert!(refused(&p, ImageFormat::Vhd).contains("entries but the disk needs"));

    // A size that would need a BAT of billions of entries: refused before anything is
    // allocated for it.
    let p = vhd(d, "huge.vhd");
    edit_footer(&p, |f| f.current_size = u64::MAX / 2);
    let t = std::time::Instant::now();
    let e = refused(&p, ImageFormat::Vhd);
    assert!(e.contains("blocks"), "{e}");
    assert!(t.elapsed().as_secs() < 5);

    // A BAT entry pointing into the metadata, past the file, or over another block.
    for (name, entry, want) in [
        ("meta.vhd", 1u32, "outside the data area"),
        ("beyond.vhd", 1 << 30, "outside the data area"),
    ] {
        let p = vhd(d, name);
        patch(&p, 1536 + 4, &entry.to_be_bytes());
        let e = refused(&p, ImageFormat::Vhd);
        assert!(e.contains(want), "{name}: {e}");
    }
    let p = vhd(d, "overlap.vhd");
    let first = read_at(&p, 1536, 4);
    patch(&p, 1536 + 8, &first);
    assert!(refused(&p, ImageFormat::Vhd).contains("overlap"));
}

/// A differencing child `child.vhd` over `base.vhd` in `d`.
fn chain(d: &Path) -> PathBuf {
    vhd(d, "base.vhd");
    let c = d.join("child.vhd");
    format::create_image(&c, ImageFormat::Vhd, 0, &opts("backing_file=base.vhd")).unwrap();
    c
}

/// Points every locator of `c` at `data` with platform `code` (room permitting).
fn set_locators(c: &Path, code: &[u8; 4], data: &[u8]) {
    let at = 16 << 10;
    let mut h = DynamicHeader::parse(&read_at(c, 512, HEADER_LEN), "t").unwrap();
    for l in h.locators.iter_mut() {
        *l = Default::default();
    }
    h.locators[0].code = *code;
    h.locators[0].len = data.len() as u32;
    h.locators[0].space = 1;
    h.locators[0].offset = std::fs::metadata(c).unwrap().len() + at;
    h.parent_name = String::new();
    let off = h.locators[0].offset;
    patch(c, 512, &h.render());
    patch(c, off, data);
}

#[test]
fn parent_locators_that_leave_the_folder_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("secret.vhd");
    vhd(dir.path(), "secret.vhd");
    let sr = dir.path().join("sr");
    std::fs::create_dir(&sr).unwrap();
    let c = chain(&sr);
    let utf16 = strata_storage::format::vhd::locator::utf16le;
    let cases: Vec<(&[u8; 4], Vec<u8>)> = vec![
        (b"W2ru", utf16("..\\secret.vhd")),
        (b"W2ku", utf16(&outside.display().to_string())),
        (
            b"MacX",
            format!("file://{}", outside.display()).into_bytes(),
        ),
        (b"MacX", b"file:///etc/passwd".to_vec()),
        (b"MacX", b"../secret.vhd".to_vec()),
    ];
    for (code, data) in cases {
        let c2 = sr.join("c2.vhd");
        std::fs::copy(&c, &c2).unwrap();
        set_locators(&c2, code, &data);
        let e = refused(&c2, ImageFormat::Vhd);
        assert!(e.contains("leaves the image's folder"), "{code:?}: {e}");
        std::fs::remove_file(&c2).unwrap();
    }
    // A symbolic link out of the folder is refused too.
    std::os::unix::fs::symlink(&outside, sr.join("link.vhd")).unwrap();
    let c2 = sr.join("c3.vhd");
    std::fs::copy(&c, &c2).unwrap();
    set_locators(&c2, b"W2ru", &utf16(".\\link.vhd"));
    assert!(refused(&c2, ImageFormat::Vhd).contains("leaves the image's folder"));
    // A Windows drive path alone names nothing here.
    set_locators(&c2, b"W2ku", &utf16("C:\\sr\\base.vhd"));
    assert!(refused(&c2, ImageFormat::Vhd).contains("without a usable parent locator"));
    // Hostile lengths and offsets.
    let mut h = DynamicHeader::parse(&read_at(&c2, 512, HEADER_LEN), "t").unwrap();
    h.locators[0].len = u32::MAX;
    patch(&c2, 512, &h.render());
    assert!(refused(&c2, ImageFormat::Vhd).contains("at most"));
    h.locators[0].len = 64;
    h.locators[0].offset = u64::MAX - 8;
    patch(&c2, 512, &h.render());
    assert!(refused(&c2, ImageFormat::Vhd).contains("beyond the end"));
    // A relative MacX locator as XenServer writes it works.
    let c4 = sr.join("c4.vhd");
    std::fs::copy(&c, &c4).unwrap();
    set_locators(&c4, b"MacX", b"file://./base.vhd");
    open_image(&c4, &ro(ImageFormat::Vhd)).unwrap();
}

#[test]
fn a_changed_or_looping_parent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let c = chain(dir.path());
    // Another disk under the parent's name.
    std::fs::remove_file(dir.path().join("base.vhd")).unwrap();
    vhd(dir.path(), "base.vhd");
    let e = refused(&c, ImageFormat::Vhd);
    assert!(e.contains("parent changed"), "{e}");
    // A child naming itself with its own ID: the chain depth stops it.
    let f = Footer::parse(&read_at(&c, 0, 512), "t").unwrap();
    edit_header(&c, |h| h.parent_id = f.unique_id);
    set_locators(&c, b"MacX", b"file://./child.vhd");
    let e = refused(&c, ImageFormat::Vhd);
    assert!(e.contains("deeper than"), "{e}");
    // Missing parent.
    let lone = dir.path().join("lone");
    std::fs::create_dir(&lone).unwrap();
    let c5 = chain(&lone);
    std::fs::remove_file(lone.join("base.vhd")).unwrap();
    assert!(refused(&c5, ImageFormat::Vhd).contains("not found"));
}

/// A dynamic VHDX with data.
fn vhdx(d: &Path, name: &str) -> PathBuf {
    let p = d.join(name);
    format::create_image(&p, ImageFormat::Vhdx, 16 << 20, &opts("block_size=1M")).unwrap();
    let img = open_image(&p, &OpenOptions::default()).unwrap();
    write_patterns(img.as_ref(), &[(0, 4096, 1), (5 << 20, 4096, 2)]);
    p
}

#[test]
fn damaged_vhdx_headers_regions_metadata_and_bats() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = vhdx(d, "sig.vhdx");
    patch(&p, 0, b"nothing!");
    assert!(refused(&p, ImageFormat::Vhdx).contains("vhdxfile"));

    // One header damaged: the other serves; both damaged: refused.
    let p = vhdx(d, "h.vhdx");
    patch(&p, HEADER_OFFSETS[0] + 100, &[7]);
    open_image(&p, &ro(ImageFormat::Vhdx)).unwrap();
    patch(&p, HEADER_OFFSETS[1] + 100, &[7]);
    assert!(refused(&p, ImageFormat::Vhdx).contains("neither VHDX header"));

    // Region tables: the first damaged, the second serves; both: refused.
    let p = vhdx(d, "r.vhdx");
    patch(&p, REGION_OFFSETS[0] + 40, &[7]);
    open_image(&p, &ro(ImageFormat::Vhdx)).unwrap();
    patch(&p, REGION_OFFSETS[1] + 40, &[7]);
    assert!(refused(&p, ImageFormat::Vhdx).contains("region table checksum"));

    // A region past the end, overlapping regions, an unknown required region.
    let p = vhdx(d, "r2.vhdx");
    let file = format::open_host_file(&p, &ro(ImageFormat::Vhdx)).unwrap();
    let regions = read_regions(file.as_ref()).unwrap();
    drop(file);
    let mut bad = regions;
    bad.bat.offset = 1 << 40;
    let t = render_regions(&bad);
    patch(&p, REGION_OFFSETS[0], &t);
    patch(&p, REGION_OFFSETS[1], &t);
    assert!(refused(&p, ImageFormat::Vhdx).contains("past the end"));
    let mut bad = regions;
    bad.bat.offset = regions.metadata.offset;
    let t = render_regions(&bad);
    patch(&p, REGION_OFFSETS[0], &t);
    patch(&p, REGION_OFFSETS[1], &t);
    assert!(refused(&p, ImageFormat::Vhdx).contains("overlap"));
    let mut t = render_regions(&regions);
    t[8..12].copy_from_slice(&3u32.to_le_bytes());
    t[16 + 64..16 + 80].copy_from_slice(&Guid::random().0);
    t[16 + 80..16 + 88].copy_from_slice(&(20 * MIB).to_le_bytes());
    t[16 + 88..16 + 92].copy_from_slice(&(MIB as u32).to_le_bytes());
    t[16 + 92..16 + 96].copy_from_slice(&1u32.to_le_bytes());
    seal(&mut t, 4);
    patch(&p, REGION_OFFSETS[0], &t);
    patch(&p, REGION_OFFSETS[1], &t);
    let e = refused(&p, ImageFormat::Vhdx);
    assert!(
        e.contains("required VHDX region") || e.contains("past the end"),
        "{e}"
    );

    // Metadata: an invalid block size, a virtual size above 64 TiB.
    let p = vhdx(d, "m.vhdx");
    let file = format::open_host_file(&p, &ro(ImageFormat::Vhdx)).unwrap();
    let regions = read_regions(file.as_ref()).unwrap();
    let meta =
        strata_storage::format::vhdx::metadata::Metadata::read(file.as_ref(), &regions.metadata)
            .unwrap();
    drop(file);
    let mut m = meta.clone();
    m.block_size = 3 << 20;
    patch(&p, regions.metadata.offset, &m.render(MIB as usize));
    assert!(refused(&p, ImageFormat::Vhdx).contains("block size"));
    let mut m = meta.clone();
    m.virtual_size = 1 << 60;
    patch(&p, regions.metadata.offset, &m.render(MIB as usize));
    assert!(refused(&p, ImageFormat::Vhdx).contains("64 TiB"));
    patch(&p, regions.metadata.offset, b"notmeta!");
    assert!(refused(&p, ImageFormat::Vhdx).contains("'metadata' signature"));

    // BAT entries: a bad state, past the end, over the metadata.
    for (name, entry, want) in [
        ("s.vhdx", 5u64, "state"),
        ("e.vhdx", (1u64 << 45) | 6, "outside the file"),
        ("o.vhdx", regions.metadata.offset | 6, "overlap"),
    ] {
        let p = vhdx(d, name);
        patch(&p, regions.bat.offset + 8, &entry.to_le_bytes());
        let e = refused(&p, ImageFormat::Vhdx);
        assert!(e.contains(want), "{name}: {e}");
    }
}

/// Leaves `p` as a crash between a log write and its in-place write would: the BAT page in
/// place is zeroed (every block absent) and the log holds the page as it should be.
fn unreplayed_log(p: &Path) {
    let rw = OpenOptions {
        format: Some(ImageFormat::Vhdx),
        ..OpenOptions::default()
    };
    let file = format::open_host_file(p, &rw).unwrap();
    let (mut h, slot) = read_current_header(file.as_ref()).unwrap();
    let regions = read_regions(file.as_ref()).unwrap();
    let mut page = vec![0u8; 4096];
    file.read_exact_at(regions.bat.offset, &mut page).unwrap();
    h.log_guid = Guid::random();
    update_header(file.as_ref(), &mut h, slot).unwrap();
    let mut w = LogWriter::new(LogPlace::of(&h, file.len(), "t").unwrap());
    w.write_entry(file.as_ref(), &h.log_guid, &[(regions.bat.offset, &page)])
        .unwrap();
    file.write_all_at(regions.bat.offset, &[0u8; 4096]).unwrap();
    file.sync_data().unwrap();
}

#[test]
fn a_vhdx_log_left_by_a_crash_is_replayed_never_read_around() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img_path = vhdx(d, "l.vhdx");
    let truth = read_all(
        open_image(&img_path, &ro(ImageFormat::Vhdx))
            .unwrap()
            .as_ref(),
    );
    std::fs::write(d.join("truth.raw"), &truth).unwrap();
    unreplayed_log(&img_path);
    let copies: Vec<PathBuf> = (0..3).map(|i| d.join(format!("c{i}.vhdx"))).collect();
    for c in &copies {
        std::fs::copy(&img_path, c).unwrap();
    }
    // Read-only: refused with the way out, not read without the log.
    let e = refused(&copies[0], ImageFormat::Vhdx);
    assert!(e.contains("log") && e.contains("check -r all"), "{e}");
    let r = strata_storage::format::vhdx::check::check_file(&copies[0], Repair::None).unwrap();
    assert_eq!(r.corruptions, 1);
    // Writable (or check -r all): replayed, then it reads as before the crash.
    let r = strata_storage::format::vhdx::check::check_file(&copies[0], Repair::All).unwrap();
    assert_eq!(r.corruptions_fixed, 1);
    assert!(
        read_all(
            open_image(&copies[0], &ro(ImageFormat::Vhdx))
                .unwrap()
                .as_ref()
        ) == truth
    );
    let img = open_image(&copies[1], &OpenOptions::default()).unwrap();
    assert!(read_all(img.as_ref()) == truth);
    drop(img);
    if strata_testkit::part_has_tool("qemu-img", "qemu-utils") {
        // qemu agrees: it refuses to read it read-only, and its replay gives the same bytes.
        let (ok, _) = {
            let o = std::process::Command::new("qemu-img")
                .args(["info", "-f", "vhdx", p(&copies[2])])
                .output()
                .unwrap();
            (o.status.success(), ())
        };
        assert!(!ok, "qemu-img read an image with a log to replay");
        run(
            "qemu-img",
            &["check", "-r", "all", "-f", "vhdx", p(&copies[2])],
        );
        run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "vhdx",
                "-F",
                "raw",
                p(&copies[2]),
                p(&d.join("truth.raw")),
            ],
        );
        // Our replayed copies are clean for qemu too.
        run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "vhdx",
                "-F",
                "raw",
                p(&copies[1]),
                p(&d.join("truth.raw")),
            ],
        );
        run("qemu-img", &["check", "-f", "vhdx", p(&copies[1])]);
    }
}

#[test]
fn hostile_vhdx_logs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rw = OpenOptions {
        format: Some(ImageFormat::Vhdx),
        ..OpenOptions::default()
    };
    // An entry that would write into the header section.
    let p = vhdx(d, "hdr.vhdx");
    let file = format::open_host_file(&p, &rw).unwrap();
    let (mut h, slot) = read_current_header(file.as_ref()).unwrap();
    h.log_guid = Guid::random();
    update_header(file.as_ref(), &mut h, slot).unwrap();
    let mut w = LogWriter::new(LogPlace::of(&h, file.len(), "t").unwrap());
    w.write_entry(file.as_ref(), &h.log_guid, &[(64 << 10, &[0u8; 4096])])
        .unwrap();
    drop(file);
    let e = open_image(&p, &rw).unwrap_err().to_string();
    assert!(e.contains("log entry writes"), "{e}");
    // An entry that would grow the file by a petabyte.
    let p = vhdx(d, "far.vhdx");
    let file = format::open_host_file(&p, &rw).unwrap();
    let (mut h, slot) = read_current_header(file.as_ref()).unwrap();
    h.log_guid = Guid::random();
    update_header(file.as_ref(), &mut h, slot).unwrap();
    let mut w = LogWriter::new(LogPlace::of(&h, file.len(), "t").unwrap());
    w.write_entry(file.as_ref(), &h.log_guid, &[(1 << 50, &[0u8; 4096])])
        .unwrap();
    drop(file);
    let e = open_image(&p, &rw).unwrap_err().to_string();
    assert!(e.contains("log entry writes"), "{e}");
    assert!(std::fs::metadata(&p).unwrap().len() < 1 << 30);
    // A log of absurd length in the header.
    let p = vhdx(d, "len.vhdx");
    let file = format::open_host_file(&p, &rw).unwrap();
    let (mut h, slot) = read_current_header(file.as_ref()).unwrap();
    h.log_guid = Guid::random();
    h.log_length = 4095 << 20;
    update_header(file.as_ref(), &mut h, slot).unwrap();
    drop(file);
    let e = refused(&p, ImageFormat::Vhdx);
    assert!(e.contains("VHDX log"), "{e}");
    // A damaged entry is no entry: the image opens as if the log were empty.
    let p = vhdx(d, "torn.vhdx");
    unreplayed_log(&p);
    let file = format::open_host_file(&p, &rw).unwrap();
    let (h, _) = read_current_header(file.as_ref()).unwrap();
    drop(file);
    patch(&p, h.log_offset + 4096 + 100, &[0xee]);
    open_image(&p, &ro(ImageFormat::Vhdx)).unwrap();
}

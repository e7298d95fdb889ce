//! NBD exports against the real clients: qemu-img, qemu-io (qemu-utils) and nbdinfo, nbdcopy
//! (libnbd-bin). A volume, its snapshot and a backup of it are served and compared byte for
//! byte with what they hold and with a restore; maps and dirty bitmaps are read with nbdinfo;
//! writes with FUA and zeroes go through qemu-io; nbdcopy copies both ways.

mod common;

use common::*;
use strata_nbd::open::{open_export, OpenSettings};
use strata_nbd::{Access, ExportConfig, ExportRegistry};
use strata_storage::io::{IoBuf, QueueOptions, Request};

fn volume_export(f: &Fixture, name: &str, lv: &str, read_only: bool) -> ExportConfig {
    ExportConfig {
        name: name.into(),
        description: format!("lv:tvg/{lv}"),
        device: f.vg.open_lv(lv, read_only).unwrap(),
        read_only,
        bitmaps: Some(f.vg.bitmaps(lv).unwrap()),
        access: Access::Open,
        keep_alive: None,
    }
}

fn backup_export(f: &Fixture) -> ExportConfig {
    let settings = OpenSettings::new(&f.data);
    open_export(
        "backup",
        &format!("backup:{}", f.backup),
        &settings,
        Access::Open,
    )
    .unwrap()
}

/// `(offset, length, type)` lines of `nbdinfo --map`.
fn map(args: &[&str]) -> Vec<(u64, u64, u32)> {
    ok("nbdinfo", args)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((
                w.next()?.parse().ok()?,
                w.next()?.parse().ok()?,
                w.next()?.parse().ok()?,
            ))
        })
        .collect()
}

/// The ranges of `map` with type `kind`, merged.
fn ranges_of(map: &[(u64, u64, u32)], kind: u32) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(off, len, t) in map {
        if t != kind {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.0 + last.1 == off => last.1 += len,
            _ => out.push((off, len)),
        }
    }
    out
}

fn volume_snapshot_and_backup_exports_match_their_sources() {
    require_clients();
    let f = Fixture::new();
    let reg = ExportRegistry::new();
    reg.add(volume_export(&f, "vm1", "vm1", false)).unwrap();
    reg.add(volume_export(&f, "snap1", "snap1", true)).unwrap();
    reg.add(backup_export(&f)).unwrap();
    let server = serve(reg.clone(), None);
    let expected = f.path("expected.raw");
    raw_file(&expected, &f.expected);
    let e = expected.to_str().unwrap();

    let info = ok("qemu-img", &["info", "--output=json", &uri(&server, "vm1")]);
    assert!(info.contains("\"virtual-size\": 33554432"), "{info}");
    ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", e, &uri(&server, "vm1")],
    );
    ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            e,
            &uri(&server, "snap1"),
        ],
    );

    // The snapshot converted out is the volume's content, byte for byte.
    let snap = f.path("snap.raw");
    ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri(&server, "snap1"),
            snap.to_str().unwrap(),
        ],
    );
    assert!(std::fs::read(&snap).unwrap() == f.expected);
    // A snapshot is exported read-only: qemu-io cannot open it for writing.
    let out = run(
        "qemu-io",
        &["-f", "raw", "-c", "write 0 4k", &uri(&server, "snap1")],
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("Permission denied"),
        "{text}"
    );

    // The backup export equals a restore of the same snapshot.
    let restored = f.path("restored.raw");
    strata_storage::format::create_image(
        &restored,
        strata_storage::format::ImageFormat::Raw,
        VOLUME_SIZE,
        &Default::default(),
    )
    .unwrap();
    let target = strata_storage::format::open_image(&restored, &Default::default()).unwrap();
    strata_backup::restore::restore(
        &f.store,
        &f.backup,
        target,
        Default::default(),
        &strata_backup::NoProgress,
    )
    .unwrap();
    let r = restored.to_str().unwrap();
    ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            r,
            &uri(&server, "backup"),
        ],
    );
    let via_nbd = f.path("backup.raw");
    ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri(&server, "backup"),
            via_nbd.to_str().unwrap(),
        ],
    );
    assert!(std::fs::read(&via_nbd).unwrap() == std::fs::read(&restored).unwrap());
    assert!(std::fs::read(&restored).unwrap() == f.expected);

    // Listing shows every export; an unknown name is refused.
    let list = ok("nbdinfo", &["--list", &uri(&server, "")]);
    for n in ["vm1", "snap1", "backup"] {
        assert!(list.contains(&format!("export=\"{n}\"")), "{list}");
    }
    assert!(!run("nbdinfo", &[&uri(&server, "nope")]).status.success());
    let holders = reg.holders_of("lv:tvg/vm1");
    assert_eq!(holders.len(), 1);
    assert!(server.stop(std::time::Duration::from_secs(10)));
}

fn maps_show_allocation_and_dirty_extents() {
    require_clients();
    let f = Fixture::new();
    let reg = ExportRegistry::new();
    reg.add(volume_export(&f, "vm1", "vm1", false)).unwrap();
    reg.add(backup_export(&f)).unwrap();
    let server = serve(reg, None);
    let alloc = map(&["--map", &uri(&server, "vm1")]);
    assert_eq!(
        ranges_of(&alloc, 0),
        vec![(MIB, 2 * MIB), (10 * MIB, 128 << 10)],
        "{alloc:?}"
    );
    let total: u64 = alloc.iter().map(|e| e.1).sum();
    assert_eq!(total, VOLUME_SIZE);
    let dirty = map(&["--map=qemu:dirty-bitmap:b1", &uri(&server, "vm1")]);
    assert_eq!(
        ranges_of(&dirty, 1),
        vec![(10 * MIB, 128 << 10)],
        "{dirty:?}"
    );
    // The backup stores 4 MiB chunks: the ones holding data are data, the rest holes.
    let b = map(&["--map", &uri(&server, "backup")]);
    assert_eq!(
        ranges_of(&b, 0),
        vec![(0, 4 * MIB), (8 * MIB, 4 * MIB)],
        "{b:?}"
    );
    let contexts = ok("nbdinfo", &["--list", "--content", &uri(&server, "vm1")]);
    assert!(contexts.contains("qemu:dirty-bitmap:b1"), "{contexts}");
    assert!(!run(
        "nbdinfo",
        &["--map=qemu:dirty-bitmap:none", &uri(&server, "vm1")]
    )
    .status
    .success());
}

fn qemu_io_writes_and_nbdcopy_in_both_directions() {
    require_clients();
    let f = Fixture::new();
    let reg = ExportRegistry::new();
    reg.add(volume_export(&f, "vm1", "vm1", false)).unwrap();
    let server = serve(reg.clone(), None);
    let u = uri(&server, "vm1");
    let out = ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -f -P 0x5a 20M 64k",
            "-c",
            "write -z 1M 64k",
            "-c",
            "write -z -u -f 2M 128k",
            "-c",
            "read -P 0x5a 20M 64k",
            "-c",
            "read -P 0 1M 64k",
            "-c",
            "read -P 0 2M 128k",
            "-c",
            "flush",
            &u,
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    let mut expected = f.expected.clone();
    expected[20 * MIB as usize..20 * MIB as usize + 65536].fill(0x5a);
    expected[MIB as usize..MIB as usize + 65536].fill(0);
    expected[2 * MIB as usize..2 * MIB as usize + 131072].fill(0);
    // The zeroed ranges read as zeros without being data any more (a thin volume reports
    // unmapped blocks as zero).
    let alloc = map(&["--map", &u]);
    assert!(
        alloc
            .iter()
            .any(|&(o, l, t)| o <= 2 * MIB && o + l >= 2 * MIB + 131072 && t & 2 != 0),
        "{alloc:?}"
    );

    let out_file = f.path("out.raw");
    ok("nbdcopy", &[&u, out_file.to_str().unwrap()]);
    assert!(std::fs::read(&out_file).unwrap() == expected);

    let input = pattern(VOLUME_SIZE as usize, 9);
    let in_file = f.path("in.raw");
    raw_file(&in_file, &input);
    ok("nbdcopy", &["--flush", in_file.to_str().unwrap(), &u]);
    ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            in_file.to_str().unwrap(),
            &u,
        ],
    );
    assert!(server.stop(std::time::Duration::from_secs(10)));
    reg.remove("vm1").unwrap();

    // What the clients wrote is on the volume itself.
    let dev = f.vg.open_lv("vm1", true).unwrap();
    let mut q = dev.open_queue(&QueueOptions::with_depth(1)).unwrap();
    q.submit(Request::read(0, 0, IoBuf::new(VOLUME_SIZE as usize)))
        .unwrap();
    let mut done = Vec::new();
    while done.is_empty() {
        q.wait(None).unwrap();
        q.reap(&mut done);
    }
    let c = done.pop().unwrap();
    c.result.unwrap();
    assert!(c.buf.unwrap().to_vec() == input);
}

fn an_image_file_export_with_a_dirty_bitmap() {
    require_clients();
    strata_testkit::require_tool("qemu-nbd", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    ok(
        "qemu-img",
        &["create", "-f", "qcow2", img.to_str().unwrap(), "16M"],
    );
    ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 7 4M 1M",
            img.to_str().unwrap(),
        ],
    );
    {
        // An enabled bitmap inside the image (what `strata image bitmap add` makes for qcow2).
        let dev: std::sync::Arc<dyn strata_storage::BlockDevice> =
            strata_storage::format::open_image(&img, &Default::default()).unwrap();
        let set = strata_storage::bitmap::ImageBitmaps::open_on(&dev, &img).unwrap();
        assert!(set.set.in_image());
        set.set.add("inc", 65536).unwrap();
        set.set.save().unwrap();
    }
    let mut settings = OpenSettings::new(dir.path());
    settings.format = Some(strata_storage::format::ImageFormat::Qcow2);
    let reg = ExportRegistry::new();
    reg.add(open_export("disk", img.to_str().unwrap(), &settings, Access::Open).unwrap())
        .unwrap();
    let server = serve(reg.clone(), None);
    let u = uri(&server, "disk");
    ok("qemu-io", &["-f", "raw", "-c", "write -P 9 8M 64k", &u]);
    let dirty = map(&["--map=qemu:dirty-bitmap:inc", &u]);
    assert_eq!(ranges_of(&dirty, 1), vec![(8 * MIB, 65536)], "{dirty:?}");
    let alloc = map(&["--map", &u]);
    assert_eq!(ranges_of(&alloc, 0), vec![(4 * MIB, MIB), (8 * MIB, 65536)]);
    assert!(server.stop(std::time::Duration::from_secs(10)));
    let e = reg.remove("disk").unwrap();
    assert!(e.wait_unused(std::time::Duration::from_secs(5)));
    drop(e);
    drop(reg);
    ok("qemu-img", &["check", img.to_str().unwrap()]);
    // The export's close wrote the bits back into the image: QEMU sees them, consistent.
    let info = ok(
        "qemu-img",
        &["info", "--output=json", img.to_str().unwrap()],
    );
    assert!(
        info.contains("\"name\": \"inc\"") && info.contains("\"auto\"") && !info.contains("in-use"),
        "{info}"
    );
    assert_eq!(
        strata_testkit::qemu_dirty_ranges(&img, "inc"),
        vec![(8 * MIB, 65536)]
    );
    let out = ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 9 8M 64k",
            img.to_str().unwrap(),
        ],
    );
    assert!(!out.contains("failed"), "{out}");
}

strata_testkit::main!(
    volume_snapshot_and_backup_exports_match_their_sources,
    maps_show_allocation_and_dirty_extents,
    qemu_io_writes_and_nbdcopy_in_both_directions,
    an_image_file_export_with_a_dirty_bitmap,
);

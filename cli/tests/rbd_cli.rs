//! Volume groups on Ceph RBD through the `strata` binary, against the test cluster
//! (scripts/ceph-cluster.sh, one per test binary): volumes, snapshots, clones, templates,
//! resize, refusals, `lv:` conversion in and out of qcow2, adopting `rbd create` images, `rbd`
//! interop, incremental backups from Ceph's change tracking, and a pool over its quota.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use strata_storage::volume::rbd::RbdGroup;
use strata_storage::volume::rbd_groups::RbdGroupRecord;
use strata_tests::ceph::{cluster, unique, TestCluster};

mod common;
use common::{lv, CliEnv};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A data directory with RBD group `vg` on pool `pool` of the test cluster.
fn env_with_group(c: &TestCluster, vg: &str, pool: &str) -> CliEnv {
    let e = CliEnv::new();
    e.ok(&[
        "vg",
        "create-rbd",
        vg,
        "--conf",
        s(&c.conf),
        "--id",
        "admin",
        "--pool",
        pool,
    ]);
    e
}

/// A file of `len` bytes of a pattern that differs per `seed`.
fn pattern_file(path: &Path, len: usize, seed: u8) -> Vec<u8> {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[i % 4] ^ seed)
        .collect();
    std::fs::write(path, &data).unwrap();
    data
}

/// `strata image convert` arguments writing raw file `file` into volume `spec` (`lv:VG/NAME`).
fn write_args<'a>(file: &'a str, spec: &'a str) -> [&'a str; 9] {
    [
        "image", "convert", "-n", "-f", "raw", "-O", "raw", file, spec,
    ]
}

/// Reads volume `spec` (`lv:VG/NAME`) back into a raw file through `strata image convert`.
fn read_volume(e: &CliEnv, spec: &str, name: &str) -> Vec<u8> {
    let out = e.path(name);
    let _ = std::fs::remove_file(&out);
    e.ok(&["image", "convert", "-O", "raw", spec, s(&out)]);
    std::fs::read(&out).unwrap()
}

fn tool(name: &str, args: &[&str]) -> String {
    let o = Command::new(name).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{name} {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn volumes_snapshots_clones_templates_resize_and_refusals() {
    let c = cluster();
    let vg = unique("vg");
    let e = env_with_group(c, &vg, &c.pool);
    let (disk, snap, clone) = (unique("disk"), unique("snap"), unique("clone"));
    let p = |n: &str| format!("{vg}/{n}");
    e.ok(&["lv", "create", "--size", "24M", &p(&disk)]);
    // Images are format 2 with exactly the features volumes need; `rbd info` reads them.
    let info = c
        .rbd(&["info", "--format", "json", &format!("{}/{disk}", c.pool)])
        .unwrap();
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["format"], 2);
    let mut features: Vec<&str> = info["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    features.sort();
    assert_eq!(
        features,
        ["exclusive-lock", "fast-diff", "layering", "object-map"]
    );

    // Write through lv:, snapshot, overwrite part, clone the snapshot, read back.
    let first = pattern_file(&e.path("first.raw"), 24 << 20, 1);
    let lvspec = format!("lv:{}", p(&disk));
    e.ok(&write_args(s(&e.path("first.raw")), &lvspec));
    assert_eq!(read_volume(&e, &lvspec, "r1.raw"), first);
    e.ok(&["lv", "snapshot", &p(&disk), &p(&snap)]);
    let second = pattern_file(&e.path("second.raw"), 24 << 20, 2);
    e.ok(&write_args(s(&e.path("second.raw")), &lvspec));
    let err = e.fails(&["lv", "clone", &p(&disk), &p(&clone)]);
    assert!(err.contains("writable"), "{err}");
    e.ok(&["lv", "clone", &p(&snap), &p(&clone)]);
    assert_eq!(read_volume(&e, &format!("lv:{}", p(&snap)), "s.raw"), first);
    assert_eq!(
        read_volume(&e, &format!("lv:{}", p(&clone)), "c.raw"),
        first
    );
    assert_eq!(read_volume(&e, &lvspec, "d.raw"), second);
    // A snapshot is read-only.
    let err = e.fails(&write_args(
        s(&e.path("first.raw")),
        &format!("lv:{}", p(&snap)),
    ));
    assert!(err.contains("read-only"), "{err}");

    let list = e.json(&["lv", "list", &vg]);
    assert_eq!(lv(&list, &snap)["type"], "snapshot");
    assert_eq!(lv(&list, &snap)["origin"], disk.as_str());
    assert_eq!(lv(&list, &clone)["origin"], snap.as_str());
    assert_eq!(lv(&list, &disk)["size"], 24 << 20);

    // The template mark is RBD's snapshot protection.
    e.ok(&["lv", "template", &p(&snap)]);
    assert_eq!(lv(&e.json(&["lv", "list", &vg]), &snap)["template"], true);
    let snaps = c
        .rbd(&[
            "snap",
            "ls",
            "--format",
            "json",
            &format!("{}/{disk}", c.pool),
        ])
        .unwrap();
    assert!(snaps.contains("\"protected\":\"true\""), "{snaps}");
    let err = e.fails(&["lv", "template", &p(&disk)]);
    assert!(err.contains("protected snapshot"), "{err}");

    // Resize.
    e.ok(&["lv", "resize", "--size", "+8M", &p(&disk)]);
    assert_eq!(e.json(&["lv", "show", &p(&disk)])[0]["size"], 32 << 20);
    let info = c
        .rbd(&["info", "--format", "json", &format!("{}/{disk}", c.pool)])
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&info).unwrap()["size"],
        32 << 20
    );
    assert!(e
        .fails(&["lv", "resize", "--size", "64M", &p(&snap)])
        .contains("read-only"));

    // rbd diff sees what Strata wrote.
    let diff = c
        .rbd(&["diff", "--format", "json", &format!("{}/{disk}", c.pool)])
        .unwrap();
    let extents: Vec<Value> = serde_json::from_str(&diff).unwrap();
    let written: u64 = extents.iter().map(|x| x["length"].as_u64().unwrap()).sum();
    assert_eq!(written, 24 << 20, "{diff}");

    // Removal refused while a clone (or a snapshot) exists.
    let err = e.fails(&["lv", "remove", &p(&snap)]);
    assert!(
        err.contains("clones exist") && err.contains(&clone),
        "{err}"
    );
    let err = e.fails(&["lv", "remove", &p(&disk)]);
    assert!(
        err.contains("has snapshots") && err.contains(&snap),
        "{err}"
    );
    e.ok(&["lv", "remove", &p(&clone)]);
    e.ok(&["lv", "remove", &p(&snap)]);
    e.ok(&["lv", "remove", &p(&disk)]);
    assert!(e.json(&["lv", "list", &vg]).as_array().unwrap().is_empty());
    e.ok(&["vg", "remove", &vg]);
}

fn qcow2_into_an_rbd_volume_and_back_out() {
    let c = cluster();
    let vg = unique("vg");
    let e = env_with_group(c, &vg, &c.pool);
    let src = e.path("src.qcow2");
    tool("qemu-img", &["create", "-f", "qcow2", s(&src), "48M"]);
    tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 0 3M",
            "-c",
            "write -P 0xa5 20M 1M",
            "-c",
            "write -z 21M 64k",
            "-c",
            "write -P 0x11 47M 1M",
            s(&src),
        ],
    );
    let vol = unique("q");
    e.ok(&["lv", "create", "--size", "48M", &format!("{vg}/{vol}")]);
    let spec = format!("lv:{vg}/{vol}");
    e.ok(&[
        "image",
        "convert",
        "-n",
        "-f",
        "qcow2",
        "-O",
        "raw",
        s(&src),
        &spec,
    ]);
    let out = e.path("out.qcow2");
    e.ok(&["image", "convert", "-O", "qcow2", &spec, s(&out)]);
    tool("qemu-img", &["check", s(&out)]);
    tool(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "qcow2", s(&src), s(&out)],
    );
    // QEMU's own rbd driver reads the same bytes from the image.
    let rbd = format!("rbd:{}/{vol}:conf={}", c.pool, s(&c.conf));
    tool(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", s(&src), &rbd],
    );
    // Allocation status comes from the object map: the hole between the writes stays a hole.
    let map = tool(
        "qemu-img",
        &["map", "--output", "json", "-f", "qcow2", s(&out)],
    );
    assert!(map.contains("\"data\": false"), "{map}");
    e.ok(&["lv", "remove", &format!("{vg}/{vol}")]);
}

fn images_made_by_rbd_create_are_adopted_and_opened() {
    let c = cluster();
    let vg = unique("vg");
    let e = env_with_group(c, &vg, &c.pool);
    let img = unique("ext");
    c.rbd(&["create", "--size", "16M", &format!("{}/{img}", c.pool)])
        .unwrap();
    c.rbd(&[
        "bench",
        "--io-type",
        "write",
        "--io-size",
        "64K",
        "--io-total",
        "4M",
        "--io-pattern",
        "rand",
        &format!("{}/{img}", c.pool),
    ])
    .unwrap();
    // Not a volume until adopted.
    let err = e.fails(&["lv", "show", &format!("{vg}/{img}")]);
    assert!(err.contains("does not exist"), "{err}");
    let err = e.fails(&["lv", "create", "--size", "1M", &format!("{vg}/{img}")]);
    assert!(err.contains("already exists"), "{err}");
    e.ok(&["lv", "adopt", &format!("{vg}/{img}")]);
    assert_eq!(
        e.json(&["lv", "show", &format!("{vg}/{img}")])[0]["size"],
        16 << 20
    );
    let err = e.fails(&["lv", "adopt", &format!("{vg}/{img}")]);
    assert!(err.contains("already"), "{err}");
    // Strata reads what rbd wrote.
    let export = e.path("export.raw");
    c.rbd(&["export", &format!("{}/{img}", c.pool), s(&export)])
        .unwrap();
    assert_eq!(
        read_volume(&e, &format!("lv:{vg}/{img}"), "mine.raw"),
        std::fs::read(&export).unwrap()
    );
    e.ok(&["lv", "remove", &format!("{vg}/{img}")]);
    assert!(c.rbd(&["info", &format!("{}/{img}", c.pool)]).is_err());
}

fn record(c: &TestCluster, vg: &str, pool: &str) -> RbdGroupRecord {
    RbdGroupRecord {
        name: vg.into(),
        conf: c.conf.clone(),
        user: "admin".into(),
        keyring: None,
        pool: pool.into(),
    }
}

fn incremental_backups_read_only_what_changed() {
    let c = cluster();
    let vg = unique("vg");
    let e = env_with_group(c, &vg, &c.pool);
    let vol = unique("b");
    let spec = format!("lv:{vg}/{vol}");
    // 64 MiB = 16 objects of 4 MiB = 16 chunks of the default 4 MiB.
    e.ok(&["lv", "create", "--size", "64M", &format!("{vg}/{vol}")]);
    let data = pattern_file(&e.path("fill.raw"), 64 << 20, 7);
    e.ok(&write_args(s(&e.path("fill.raw")), &spec));
    let store = e.path("store");
    let full = e.json(&["backup", "create", &spec, "--store", s(&store), "--quiet"]);
    assert_eq!(full["change-tracking"]["mode"], "full");
    assert_eq!(full["stats"]["bytes-read"], 64 << 20);

    // Change about 1%: 640 KiB in three places, touching objects 1, 7 and 15.
    let group = RbdGroup::open(&record(c, &vg, &c.pool), false).unwrap();
    let dev = group.open_lv(&vol, false).unwrap();
    let mut expect = data.clone();
    for (off, len) in [
        (5u64 << 20, 256usize << 10),
        (30 << 20, 256 << 10),
        (63 << 20, 128 << 10),
    ] {
        let bytes = vec![0xeeu8; len];
        strata_tests::write_device(dev.as_ref(), off, &bytes).unwrap();
        expect[off as usize..off as usize + len].copy_from_slice(&bytes);
    }
    drop(dev);

    let inc = e.json(&["backup", "create", &spec, "--store", s(&store), "--quiet"]);
    assert_eq!(inc["change-tracking"]["mode"], "incremental", "{inc}");
    assert_eq!(inc["change-tracking"]["dirty-chunks"], 3, "{inc}");
    assert_eq!(
        inc["stats"]["bytes-read"],
        3 * (4 << 20),
        "only the 3 changed objects are read"
    );
    assert!(inc["change-tracking"]["bitmap"]
        .as_str()
        .unwrap()
        .starts_with("rbd snapshot"));
    // No change: nothing is read.
    let none = e.json(&["backup", "create", &spec, "--store", s(&store), "--quiet"]);
    assert_eq!(none["change-tracking"]["mode"], "incremental", "{none}");
    assert_eq!(none["stats"]["bytes-read"], 0);

    // Only the latest backup snapshot is kept, and it is not a volume.
    let snaps = c
        .rbd(&[
            "snap",
            "ls",
            "--format",
            "json",
            &format!("{}/{vol}", c.pool),
        ])
        .unwrap();
    let snaps: Vec<Value> = serde_json::from_str(&snaps).unwrap();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert!(snaps[0]["name"]
        .as_str()
        .unwrap()
        .starts_with(".strata-backup-"));
    assert_eq!(e.json(&["lv", "list", &vg]).as_array().unwrap().len(), 1);

    let restored = e.path("restored.raw");
    let id = format!("volume/{vg}/{vol}");
    e.ok(&[
        "backup",
        "restore",
        &id,
        "--store",
        s(&store),
        s(&restored),
        "--quiet",
    ]);
    assert!(
        std::fs::read(&restored).unwrap() == expect,
        "the restore differs"
    );
    // The volume goes with its backup snapshots.
    e.ok(&["lv", "remove", &format!("{vg}/{vol}")]);
}

fn a_pool_over_its_quota_fails_writes_cleanly() {
    let c = cluster();
    let pool = unique("quota");
    c.new_pool(&pool).unwrap();
    c.ceph(&[
        "osd",
        "pool",
        "set-quota",
        &pool,
        "max_bytes",
        &(48u64 << 20).to_string(),
    ])
    .unwrap();
    let vg = unique("vg");
    let e = env_with_group(c, &vg, &pool);
    let (vol, vol2) = (unique("big"), unique("small"));
    e.ok(&["lv", "create", "--size", "1G", &format!("{vg}/{vol}")]);
    e.ok(&["lv", "create", "--size", "8M", &format!("{vg}/{vol2}")]);
    // Write new objects until the pool reports full: the monitors flag it a few seconds after
    // the usage crosses the quota, so past it the loop slows down. Bounded in time and bytes.
    let group = RbdGroup::open(&record(c, &vg, &pool), false).unwrap();
    let dev = group.open_lv(&vol, false).unwrap();
    let started = Instant::now();
    let chunk = vec![0x33u8; 1 << 20];
    let mut off = 0u64;
    let err = loop {
        assert!(
            started.elapsed() < Duration::from_secs(120) && off < (1 << 30),
            "the quota never took effect"
        );
        match strata_tests::write_device(dev.as_ref(), off, &chunk) {
            Ok(()) => {}
            Err(e) => break e,
        }
        // One write per 4 MiB object: each one needs new space.
        off += 4 << 20;
        if off > 64 << 20 {
            std::thread::sleep(Duration::from_millis(250));
        }
    };
    let msg = format!("{err:#}");
    assert!(
        msg.contains("No space left") && msg.contains("quota"),
        "{msg}"
    );
    drop(dev);
    // The CLI says the same in one line, at once, for writes that need new space and for new
    // volumes (like a full thin pool, a full pool still takes overwrites of what is allocated).
    let fill = e.path("fill.raw");
    pattern_file(&fill, 8 << 20, 3);
    let t = Instant::now();
    let small = format!("lv:{vg}/{vol2}");
    let into_small = write_args(s(&fill), &small);
    let err = e.fails(&into_small);
    assert!(
        err.contains("No space left") && err.contains("quota"),
        "{err}"
    );
    let err = e.fails(&[
        "lv",
        "create",
        "--size",
        "8M",
        &format!("{vg}/{}", unique("new")),
    ]);
    assert!(
        err.contains("No space left") && err.contains("quota"),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(60));
    let big = format!("lv:{vg}/{vol}");
    let over = e.path("over.raw");
    pattern_file(&over, 1 << 20, 4);
    e.ok(&write_args(s(&over), &big));
    // Nothing else is broken: the group lists, the image reads, the shared pool works.
    assert_eq!(lv(&e.json(&["lv", "list", &vg]), &vol)["size"], 1u64 << 30);
    let head = e.path("head.raw");
    e.ok(&[
        "image",
        "convert",
        "-O",
        "raw",
        &format!("lv:{vg}/{vol}"),
        s(&head),
    ]);
    assert_eq!(
        &std::fs::read(&head).unwrap()[..1 << 20],
        &std::fs::read(&over).unwrap()[..]
    );
    c.rbd(&["info", &format!("{pool}/{vol}")]).unwrap();
    let other = unique("vg");
    let e2 = env_with_group(c, &other, &c.pool);
    e2.ok(&["lv", "create", "--size", "8M", &format!("{other}/ok")]);
    e2.ok(&write_args(s(&fill), &format!("lv:{other}/ok")));
    e2.ok(&["lv", "remove", &format!("{other}/ok")]);
    // Lifting the quota lets writes through again; removal works.
    c.ceph(&["osd", "pool", "set-quota", &pool, "max_bytes", "0"])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = e.run(&into_small);
        if r.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "writes still fail after the quota was lifted"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    e.ok(&["lv", "remove", &format!("{vg}/{vol}")]);
    e.ok(&["lv", "remove", &format!("{vg}/{vol2}")]);
    c.remove_pool(&pool).unwrap();
}

strata_testkit::main!(
    volumes_snapshots_clones_templates_resize_and_refusals,
    qcow2_into_an_rbd_volume_and_back_out,
    images_made_by_rbd_create_are_adopted_and_opened,
    incremental_backups_read_only_what_changed,
    a_pool_over_its_quota_fails_writes_cleanly,
);

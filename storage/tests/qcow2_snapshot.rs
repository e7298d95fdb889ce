//! Internal snapshots: create, apply and delete keep `qemu-img check` clean and every snapshot's
//! data intact (read back by qemu-img itself), on images made by qemu-img with its own snapshots.

mod qcow2_support;

use std::path::Path;

use qcow2_support::*;
use strata_storage::format::open_host_file;
use strata_storage::format::qcow2::{self, Qcow2Options};
use strata_storage::format::OpenOptions;

const SIZE: u64 = 8 << 20;

fn snapshot_raw(path: &Path, name: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!("snap-{name}.raw"));
    run(
        "qemu-img",
        &[
            "convert",
            "-l",
            &format!("snapshot.name={name}"),
            "-O",
            "raw",
            path.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    let d = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    d
}

fn open_q(path: &Path) -> std::sync::Arc<qcow2::Qcow2Image> {
    let f = open_host_file(path, &OpenOptions::default()).unwrap();
    qcow2::open(f, &Qcow2Options::default()).unwrap()
}

fn lifecycle(opts: &str, seed: u64) {
    let dir = tempdir();
    let d = dir.path();
    let path = d.join("s.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            path.to_str().unwrap(),
            &SIZE.to_string(),
        ],
    );
    qemu_io_fill(&path, SIZE, seed, "qcow2");
    run(
        "qemu-img",
        &["snapshot", "-c", "qs", path.to_str().unwrap()],
    );
    let qs_model = qemu_raw(&path, d);
    qemu_io_fill(&path, SIZE, seed + 1, "qcow2");
    let mut model = qemu_raw(&path, d);

    // Create our own snapshot, then write on.
    {
        let img = open_q(&path);
        assert_eq!(img.snapshots().len(), 1);
        assert_same(
            &read_all(img.as_ref()),
            &model,
            "active before our snapshot",
        );
        img.snapshot_create("s2").unwrap();
        assert!(
            img.snapshot_create("s2").is_err(),
            "duplicate names are refused"
        );
        apply(
            img.as_ref(),
            &workload(SIZE, 200, seed + 2),
            &mut model.clone(),
        );
    }
    let s2_model = model.clone();
    model = qemu_raw(&path, d);
    assert_qemu_check_clean(&path);
    let list = run("qemu-img", &["snapshot", "-l", path.to_str().unwrap()]);
    assert!(list.contains("s2") && list.contains("qs"), "{list}");
    assert_same(
        &snapshot_raw(&path, "s2", d),
        &s2_model,
        "snapshot s2 read by qemu-img",
    );
    assert_same(
        &snapshot_raw(&path, "qs", d),
        &qs_model,
        "snapshot qs read by qemu-img",
    );

    // Apply s2: the active contents go back.
    {
        let img = open_q(&path);
        assert_same(&read_all(img.as_ref()), &model, "active after writes");
        img.snapshot_apply("s2").unwrap();
        assert_same(
            &read_all(img.as_ref()),
            &s2_model,
            "active after applying s2",
        );
        let mut m = s2_model.clone();
        apply(img.as_ref(), &workload(SIZE, 100, seed + 3), &mut m);
        model = m;
    }
    assert_qemu_check_clean(&path);
    assert_qemu_compare(&path, &model, d);

    // Delete qemu's snapshot; ours keeps its data.
    {
        let img = open_q(&path);
        img.snapshot_delete("qs").unwrap();
        assert!(img.snapshot_delete("qs").is_err());
        assert_eq!(img.snapshots().len(), 1);
    }
    assert_qemu_check_clean(&path);
    assert_same(
        &snapshot_raw(&path, "s2", d),
        &s2_model,
        "s2 after deleting qs",
    );
    assert_qemu_compare(&path, &model, d);
    {
        let img = open_q(&path);
        img.snapshot_delete("s2").unwrap();
        apply(img.as_ref(), &workload(SIZE, 50, seed + 4), &mut model);
    }
    assert_qemu_check_clean(&path);
    assert_qemu_compare(&path, &model, d);
}

fn snapshot_lifecycle_64k() {
    strata_testkit::require_qemu_utils();
    lifecycle("cluster_size=65536", 1);
}

fn snapshot_lifecycle_small_clusters_v2() {
    strata_testkit::require_qemu_utils();
    lifecycle("cluster_size=4096,compat=0.10", 10);
}

fn snapshot_lifecycle_extended_l2() {
    strata_testkit::require_qemu_utils();
    lifecycle("extended_l2=on", 20);
}

fn one_bit_refcounts_refuse_snapshots_cleanly() {
    strata_testkit::require_qemu_utils();
    let dir = tempdir();
    let path = dir.path().join("r1.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=1",
            path.to_str().unwrap(),
            "4M",
        ],
    );
    qemu_io_fill(&path, 4 << 20, 3, "qcow2");
    let before = qemu_raw(&path, dir.path());
    {
        let img = open_q(&path);
        let e = img.snapshot_create("x").unwrap_err().to_string();
        assert!(e.contains("1-bit"), "{e}");
    }
    assert_qemu_check_clean(&path);
    assert_same(
        &qemu_raw(&path, dir.path()),
        &before,
        "contents after a refused snapshot",
    );
}

strata_testkit::main!(
    snapshot_lifecycle_64k,
    snapshot_lifecycle_small_clusters_v2,
    snapshot_lifecycle_extended_l2,
    one_bit_refcounts_refuse_snapshots_cleanly,
);

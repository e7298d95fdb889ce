//! Whole-image operations checked against qemu-img: compressed writing (convert -c), resize,
//! map, rebase, commit, and check/repair with qemu-img check's exit-code meaning.

mod qcow2_support;

use std::collections::BTreeMap;

use qcow2_support::*;
use strata_storage::format::qcow2::check::Repair;
use strata_storage::format::qcow2::tools;
use strata_storage::format::{create_compressed, ImageFormat};

const SIZE: u64 = 8 << 20;

fn mixed_data(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut data = vec![0u8; size];
    for chunk in data.chunks_mut(4096) {
        match rng.u8(..4) {
            0 => {}
            1 => rng.fill(chunk),
            _ => chunk
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i / 64) as u8 ^ 0x5a),
        }
    }
    data
}

fn compressed_images_we_write_pass_qemu_img() {
    strata_testkit::require_qemu_utils();
    let dir = tempdir();
    let data = mixed_data(SIZE as usize - 12288 - 512, 1);
    for (name, opts) in [
        ("zlib", "compression_type=zlib"),
        ("zstd", "compression_type=zstd"),
        ("zlib-4k", "cluster_size=4096"),
        ("zstd-ext", "compression_type=zstd,extended_l2=on"),
        ("v2", "compat=0.10,cluster_size=16384"),
    ] {
        let path = dir.path().join(format!("{name}.qcow2"));
        let map: BTreeMap<String, String> = strata_storage::format::parse_options(opts).unwrap();
        let mut w = create_compressed(&path, ImageFormat::Qcow2, data.len() as u64, &map).unwrap();
        let unit = w.unit() as usize;
        for (i, chunk) in data.chunks(unit).enumerate() {
            w.write_unit((i * unit) as u64, chunk).unwrap();
        }
        w.finish().unwrap();
        assert_qemu_check_clean(&path);
        assert_qemu_compare(&path, &data, dir.path());
        assert_same(&read_all(open(&path, false).as_ref()), &data, name);
        let info = run(
            "qemu-img",
            &["check", "--output=json", path.to_str().unwrap()],
        );
        assert!(
            !info.contains("\"compressed-clusters\": 0"),
            "{name}: nothing was compressed: {info}"
        );
    }
}

fn resize_grows_moves_the_l1_table_and_shrinks() {
    strata_testkit::require_qemu_utils();
    let dir = tempdir();
    let path = dir.path().join("r.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            path.to_str().unwrap(),
            "8M",
        ],
    );
    qemu_io_fill(&path, SIZE, 3, "qcow2");
    let mut model = qemu_raw(&path, dir.path());
    open_q(&path, true).resize_image(64 << 20, false).unwrap();
    model.resize(64 << 20, 0);
    assert_qemu_check_clean(&path);
    assert_qemu_compare(&path, &model, dir.path());
    {
        let img = open_q(&path, true);
        apply(img.as_ref(), &workload(64 << 20, 100, 4), &mut model);
        assert!(
            img.resize_image(1 << 20, false).is_err(),
            "shrinking needs the flag"
        );
        img.resize_image(3 << 20 | 1000, true).unwrap();
    }
    model.truncate(3 << 20 | 1000);
    assert_qemu_check_clean(&path);
    assert_qemu_compare(&path, &model, dir.path());
    open_q(&path, true).resize_image(5 << 20, false).unwrap();
    model.resize(5 << 20, 0);
    assert_qemu_compare(&path, &model, dir.path());
}

fn map_agrees_with_qemu_img_map() {
    strata_testkit::require_qemu_utils();
    let dir = tempdir();
    let d = dir.path();
    let base = d.join("base.qcow2");
    let top = d.join("top.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "8M"],
    );
    qemu_io_fill(&base, SIZE, 5, "qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            top.to_str().unwrap(),
        ],
    );
    qemu_io_fill(&top, SIZE, 6, "qcow2");
    let json = run("qemu-img", &["map", "--output=json", top.to_str().unwrap()]);
    let theirs: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let ours = open_q(&top, false).map(0, SIZE).unwrap();
    // Compare per 512-byte sector: (data, zero, depth for present data).
    let mut a = vec![(false, false, 0u64); (SIZE / 512) as usize];
    let mut b = a.clone();
    for e in &theirs {
        let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        for i in s / 512..(s + l) / 512 {
            a[i as usize] = (
                e["data"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
                e["depth"].as_u64().unwrap(),
            );
        }
    }
    for e in &ours {
        for i in e.start / 512..(e.start + e.length) / 512 {
            b[i as usize] = (e.data, e.zero, u64::from(e.depth));
        }
    }
    for i in 0..a.len() {
        if a[i].0 || b[i].0 {
            assert_eq!(
                a[i], b[i],
                "sector {i}: qemu-img says {:?}, we say {:?}",
                a[i], b[i]
            );
        } else {
            assert_eq!(a[i].1, b[i].1, "sector {i}: zero flags differ");
        }
    }
}

fn rebase_keeps_contents_and_commit_moves_data_down() {
    strata_testkit::require_qemu_utils();
    let dir = tempdir();
    let d = dir.path();
    let (b1, b2, top) = (d.join("b1.qcow2"), d.join("b2.qcow2"), d.join("top.qcow2"));
    for (p, seed) in [(&b1, 7), (&b2, 8)] {
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "8M"],
        );
        qemu_io_fill(p, SIZE, seed, "qcow2");
    }
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "b1.qcow2",
            "-F",
            "qcow2",
            top.to_str().unwrap(),
        ],
    );
    qemu_io_fill(&top, SIZE, 9, "qcow2");
    let before = qemu_raw(&top, d);
    tools::rebase(&top, Some("b2.qcow2"), Some(ImageFormat::Qcow2), false).unwrap();
    assert_qemu_check_clean(&top);
    assert_same(&qemu_raw(&top, d), &before, "contents after a safe rebase");
    let info = run("qemu-img", &["info", top.to_str().unwrap()]);
    assert!(info.contains("b2.qcow2"), "{info}");
    // Unsafe rebase changes only the name.
    tools::rebase(&top, Some("b1.qcow2"), None, true).unwrap();
    assert!(run("qemu-img", &["info", top.to_str().unwrap()]).contains("b1.qcow2"));
    tools::rebase(&top, Some("b2.qcow2"), None, true).unwrap();
    // Commit: b2 takes top's contents, top reads through.
    tools::commit(&top, false).unwrap();
    assert_qemu_check_clean(&top);
    assert_qemu_check_clean(&b2);
    assert_same(&qemu_raw(&b2, d), &before, "backing file after commit");
    assert_same(&qemu_raw(&top, d), &before, "top after commit");
    let map = open_q(&top, false).map(0, SIZE).unwrap();
    assert!(
        map.iter().all(|e| e.depth == 1 || !e.present),
        "top still holds data after commit: {map:?}"
    );
    // Removing the backing file copies everything in.
    tools::rebase(&top, None, None, false).unwrap();
    assert_qemu_check_clean(&top);
    assert_same(&qemu_raw(&top, d), &before, "after rebasing onto nothing");
}

fn check_finds_and_repairs_leaks_and_corruptions_like_qemu_img() {
    strata_testkit::require_qemu_utils();
    let dir = tempdir();
    let path = dir.path().join("c.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            path.to_str().unwrap(),
            "8M",
        ],
    );
    qemu_io_fill(&path, SIZE, 10, "qcow2");
    let data = qemu_raw(&path, dir.path());
    assert_eq!(
        open_q(&path, false)
            .check(Repair::None)
            .unwrap()
            .exit_code(),
        0
    );
    // A leak: one reference too many on the header cluster.
    strata_storage::format::qcow2::testing::bump_refcount(&path, 0, 1);
    let (code, _) = run_status("qemu-img", &["check", path.to_str().unwrap()]);
    assert_eq!(code, 3);
    let r = open_q(&path, false).check(Repair::None).unwrap();
    assert_eq!((r.exit_code(), r.leaks), (3, 1), "{:?}", r.messages);
    let r = open_q(&path, true).check(Repair::Leaks).unwrap();
    assert_eq!((r.leaks_fixed, r.exit_code()), (1, 0));
    assert_qemu_check_clean(&path);
    // A corruption: the refcount of the L1 table's cluster dropped to zero.
    let h = open_q(&path, false).header();
    strata_storage::format::qcow2::testing::bump_refcount(&path, h.l1_table_offset / 4096, -1);
    let (code, _) = run_status("qemu-img", &["check", path.to_str().unwrap()]);
    assert_eq!(code, 2);
    let r = open_q(&path, false).check(Repair::None).unwrap();
    assert_eq!(r.exit_code(), 2, "{:?}", r.messages);
    let r = open_q(&path, true).check(Repair::All).unwrap();
    assert!(r.corruptions_fixed >= 1 && r.exit_code() == 0, "{r:?}");
    assert_qemu_check_clean(&path);
    assert_same(
        &qemu_raw(&path, dir.path()),
        &data,
        "contents after repairs",
    );
}

strata_testkit::main!(
    compressed_images_we_write_pass_qemu_img,
    resize_grows_moves_the_l1_table_and_shrinks,
    map_agrees_with_qemu_img_map,
    rebase_keeps_contents_and_commit_moves_data_down,
    check_finds_and_repairs_leaks_and_corruptions_like_qemu_img,
);

//! Interop with qemu-img: images qemu-img makes (every cluster size, refcount width, feature and
//! preallocation mode, compression, backing chains) read back exactly as `qemu-img convert -O
//! raw` says, and after Strata writes, discards and zero-writes on them `qemu-img check` is clean
//! and `qemu-img compare` matches a model.

mod qcow2_support;

use std::path::Path;

use qcow2_support::*;

const SIZE: u64 = 8 << 20;

/// One image configuration: qemu-img create options.
struct Case {
    name: &'static str,
    opts: &'static str,
    size: u64,
}

const CASES: &[Case] = &[
    Case {
        name: "c512",
        opts: "cluster_size=512",
        size: SIZE,
    },
    Case {
        name: "c4k",
        opts: "cluster_size=4096",
        size: SIZE,
    },
    Case {
        name: "c64k",
        opts: "cluster_size=65536",
        size: SIZE,
    },
    Case {
        name: "c2m",
        opts: "cluster_size=2097152",
        size: 16 << 20,
    },
    Case {
        name: "compat010",
        opts: "compat=0.10",
        size: SIZE,
    },
    Case {
        name: "rc1",
        opts: "refcount_bits=1",
        size: SIZE,
    },
    Case {
        name: "rc64",
        opts: "refcount_bits=64,cluster_size=4096",
        size: SIZE,
    },
    Case {
        name: "lazy",
        opts: "lazy_refcounts=on",
        size: SIZE,
    },
    Case {
        name: "extl2",
        opts: "extended_l2=on,cluster_size=65536",
        size: SIZE,
    },
    Case {
        name: "extl2-32k",
        opts: "extended_l2=on,cluster_size=32768",
        size: SIZE,
    },
    Case {
        name: "prealloc-metadata",
        opts: "preallocation=metadata",
        size: SIZE,
    },
    Case {
        name: "prealloc-falloc",
        opts: "preallocation=falloc",
        size: SIZE,
    },
    Case {
        name: "prealloc-full",
        opts: "preallocation=full",
        size: SIZE,
    },
];

fn make(dir: &Path, c: &Case, seed: u64) -> std::path::PathBuf {
    let path = dir.join(format!("{}.qcow2", c.name));
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            c.opts,
            path.to_str().unwrap(),
            &c.size.to_string(),
        ],
    );
    qemu_io_fill(&path, c.size, seed, "qcow2");
    path
}

fn images_made_by_qemu_img_read_back_exactly() {
    strata_testkit::require_qemu_utils();
    let dir = tempdir();
    for (i, c) in CASES.iter().enumerate() {
        let path = make(dir.path(), c, i as u64 + 1);
        let want = qemu_raw(&path, dir.path());
        assert!(
            want.iter().any(|&b| b != 0),
            "{}: the fill wrote no data",
            c.name
        );
        let img = open(&path, false);
        assert_same(&read_all(img.as_ref()), &want, c.name);
    }
}

fn compressed_images_read_back_exactly() {
    strata_testkit::require_qemu_utils();
    let dir = tempdir();
    let raw = dir.path().join("src.raw");
    let mut data = vec![0u8; SIZE as usize];
    let mut rng = fastrand::Rng::with_seed(5);
    for chunk in data.chunks_mut(65536) {
        match rng.u8(..4) {
            0 => {}
            1 => rng.fill(chunk),
            _ => {
                for (i, b) in chunk.iter_mut().enumerate() {
                    *b = (i / 100) as u8 ^ rng.u8(..4);
                }
            }
        }
    }
    std::fs::write(&raw, &data).unwrap();
    for (name, opts) in [
        ("zlib", "compression_type=zlib"),
        ("zstd", "compression_type=zstd"),
        ("zlib-4k", "compression_type=zlib,cluster_size=4096"),
        ("zstd-extl2", "compression_type=zstd,extended_l2=on"),
    ] {
        let path = dir.path().join(format!("{name}.qcow2"));
        run(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                opts,
                raw.to_str().unwrap(),
                path.to_str().unwrap(),
            ],
        );
        let img = open(&path, false);
        assert_same(&read_all(img.as_ref()), &data, name);
    }
}

fn three_deep_backing_chains_read_back_exactly() {
    strata_testkit::require_qemu_utils();
    let dir = tempdir();
    let d = dir.path();
    let base = d.join("base.qcow2");
    let mid = d.join("mid.qcow2");
    let top = d.join("top.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "8M"],
    );
    qemu_io_fill(&base, SIZE, 11, "qcow2");
    // A relative backing name, resolved against the image's folder.
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
            mid.to_str().unwrap(),
        ],
    );
    qemu_io_fill(&mid, SIZE, 12, "qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "-b",
            mid.to_str().unwrap(),
            "-F",
            "qcow2",
            top.to_str().unwrap(),
            "12M",
        ],
    );
    qemu_io_fill(&top, 12 << 20, 13, "qcow2");
    let want = qemu_raw(&top, d);
    let img = open(&top, false);
    assert_same(&read_all(img.as_ref()), &want, "top of a three-deep chain");
    let info = img.info().unwrap();
    let chain = info.format_specific["backing-chain"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(chain, 2);
}

fn raw_backing_files_are_read_through() {
    strata_testkit::require_qemu_utils();
    let dir = tempdir();
    let d = dir.path();
    let base = d.join("base.raw");
    let data: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(&base, &data).unwrap();
    let top = d.join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            top.to_str().unwrap(),
            "8M",
        ],
    );
    qemu_io_fill(&top, SIZE, 21, "qcow2");
    let want = qemu_raw(&top, d);
    assert_same(&read_all(open(&top, false).as_ref()), &want, "raw backing");
}

fn strata_writes_on_qemu_images_keep_qemu_img_check_clean() {
    strata_testkit::require_qemu_utils();
    let dir = tempdir();
    for (i, c) in CASES.iter().enumerate() {
        let path = make(dir.path(), c, 100 + i as u64);
        write_and_verify(&path, dir.path(), 1000 + i as u64, c.name);
    }
}

fn strata_writes_over_compressed_clusters_and_backing_chains() {
    strata_testkit::require_qemu_utils();
    let dir = tempdir();
    let d = dir.path();
    let raw = d.join("src.raw");
    let data: Vec<u8> = (0..SIZE as u32).map(|i| (i / 1000) as u8).collect();
    std::fs::write(&raw, &data).unwrap();
    for (name, opts) in [
        ("zlib", "compression_type=zlib"),
        ("zstd", "compression_type=zstd,extended_l2=on"),
    ] {
        let path = d.join(format!("{name}.qcow2"));
        run(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                opts,
                raw.to_str().unwrap(),
                path.to_str().unwrap(),
            ],
        );
        write_and_verify(&path, d, 7, name);
    }
    let base = d.join("base.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "8M"],
    );
    qemu_io_fill(&base, SIZE, 31, "qcow2");
    for (name, opts) in [
        ("cow", "cluster_size=65536"),
        ("cow-ext", "extended_l2=on"),
        ("cow-v2", "compat=0.10"),
    ] {
        let top = d.join(format!("{name}.qcow2"));
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                opts,
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                top.to_str().unwrap(),
            ],
        );
        write_and_verify(&top, d, 8, name);
    }
}

strata_testkit::main!(
    images_made_by_qemu_img_read_back_exactly,
    compressed_images_read_back_exactly,
    three_deep_backing_chains_read_back_exactly,
    raw_backing_files_are_read_through,
    strata_writes_on_qemu_images_keep_qemu_img_check_clean,
    strata_writes_over_compressed_clusters_and_backing_chains,
);

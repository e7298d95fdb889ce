//! The conversion matrix: raw, qcow2 and vmdk sources (made by qemu-img) into raw, qcow2, vmdk
//! (several subformats) and compressed targets, each compared with `qemu-img compare`, checked
//! with `qemu-img check` where it applies, and checked to stay sparse. A capability probe
//! checks that every format of the matrix can be opened and created (plain and compressed).

mod vmdk_util;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use strata_storage::convert::{convert_files, ConvertOptions, ConvertRequest, NoProgress};
use strata_storage::format::{self, open_image, ImageFormat, OpenOptions};
use strata_storage::StorageError;
use vmdk_util::*;

const SIZE: u64 = 96 << 20;

/// Whether this build can create and open `fmt` images (plain and compressed).
fn supported(fmt: ImageFormat, dir: &Path) -> (bool, bool) {
    let p = dir.join(format!("probe.{fmt}"));
    let plain = match format::create_image(&p, fmt, 1 << 20, &BTreeMap::new()) {
        Ok(()) => open_image(&p, &OpenOptions::default()).is_ok(),
        Err(StorageError::Unsupported(_)) => false,
        Err(e) => panic!("probing {fmt}: {e}"),
    };
    let c = dir.join(format!("probe-c.{fmt}"));
    let compressed = match format::create_compressed(&c, fmt, 1 << 20, &BTreeMap::new()) {
        Ok(w) => w.finish().is_ok(),
        Err(StorageError::Unsupported(_)) => false,
        Err(e) => panic!("probing compressed {fmt}: {e}"),
    };
    (plain, compressed)
}

struct Target {
    name: &'static str,
    format: ImageFormat,
    options: &'static str,
    compress: bool,
}

const TARGETS: [Target; 8] = [
    Target {
        name: "raw",
        format: ImageFormat::Raw,
        options: "",
        compress: false,
    },
    Target {
        name: "qcow2",
        format: ImageFormat::Qcow2,
        options: "",
        compress: false,
    },
    Target {
        name: "qcow2-compressed",
        format: ImageFormat::Qcow2,
        options: "",
        compress: true,
    },
    Target {
        name: "vmdk-monolithicSparse",
        format: ImageFormat::Vmdk,
        options: "subformat=monolithicSparse",
        compress: false,
    },
    Target {
        name: "vmdk-monolithicFlat",
        format: ImageFormat::Vmdk,
        options: "subformat=monolithicFlat",
        compress: false,
    },
    Target {
        name: "vmdk-twoGbMaxExtentSparse",
        format: ImageFormat::Vmdk,
        options: "subformat=twoGbMaxExtentSparse",
        compress: false,
    },
    Target {
        name: "vmdk-twoGbMaxExtentFlat",
        format: ImageFormat::Vmdk,
        options: "subformat=twoGbMaxExtentFlat",
        compress: false,
    },
    Target {
        name: "vmdk-streamOptimized",
        format: ImageFormat::Vmdk,
        options: "",
        compress: true,
    },
];

fn qemu_fmt(f: ImageFormat) -> &'static str {
    f.name()
}

/// Bytes allocated by an image and its extent files.
fn allocated(path: &Path) -> u64 {
    open_image(
        path,
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap()
    .info()
    .unwrap()
    .actual_size
}

/// Sources made by qemu-img: a mostly empty disk with a few MiB of data and a zero-filled run.
fn sources(dir: &Path) -> Vec<(ImageFormat, PathBuf)> {
    let raw = dir.join("src.raw");
    run(
        "qemu-img",
        &["create", "-q", "-f", "raw", p(&raw), &SIZE.to_string()],
    );
    let mut writes = random_writes(42, SIZE, 24, 256 << 10);
    writes.push((SIZE - 4096, 4096, 0xaa));
    qemu_io_writes(&raw, "raw", &writes);
    // Explicit zeros written as data: must not be allocated in the output.
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0 40M 2M", p(&raw)],
    );
    let mut v = vec![(ImageFormat::Raw, raw.clone())];
    for (fmt, opts) in [
        (ImageFormat::Qcow2, ""),
        (ImageFormat::Vmdk, "subformat=monolithicSparse"),
    ] {
        let out = dir.join(format!("src.{fmt}"));
        let mut args = vec!["convert", "-O", qemu_fmt(fmt)];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([p(&raw), p(&out)]);
        run("qemu-img", &args);
        v.push((fmt, out));
    }
    let so = dir.join("src-stream.vmdk");
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            p(&raw),
            p(&so),
        ],
    );
    v.push((ImageFormat::Vmdk, so));
    v
}

fn every_source_into_every_target() {
    strata_testkit::require_qemu_utils();
    let dir = tempfile::tempdir().unwrap();
    let mut ran = 0;
    for fmt in [ImageFormat::Qcow2, ImageFormat::Vmdk] {
        let caps = supported(fmt, dir.path());
        assert_eq!(caps, (true, true), "{fmt} must be fully supported");
    }
    for (src_fmt, src) in sources(dir.path()) {
        let src_name = src.file_name().unwrap().to_string_lossy().to_string();
        for t in &TARGETS {
            let row = format!("{src_name} -> {}", t.name);
            for out_of_order in [false, true] {
                let out_dir = dir
                    .path()
                    .join(format!("{src_name}-{}-{out_of_order}", t.name));
                std::fs::create_dir(&out_dir).unwrap();
                let dst = out_dir.join(format!("out.{}", t.format));
                let req = ConvertRequest {
                    source: &src,
                    source_format: None,
                    target: &dst,
                    target_format: t.format,
                    target_options: format::parse_options(t.options).unwrap(),
                    compress: t.compress,
                    open: OpenOptions::default(),
                    convert: ConvertOptions {
                        out_of_order,
                        ..ConvertOptions::default()
                    },
                    volumes: None,
                    source_snapshot: None,
                    source_cache: None,
                };
                convert_files(&req, &NoProgress).unwrap_or_else(|e| panic!("{row}: {e}"));
                let (same, out) = try_run(
                    "qemu-img",
                    &[
                        "compare",
                        "-f",
                        qemu_fmt(src_fmt),
                        "-F",
                        qemu_fmt(t.format),
                        p(&src),
                        p(&dst),
                    ],
                );
                assert!(same, "{row}: qemu-img compare: {out}");
                if t.format != ImageFormat::Raw && !t.options.contains("Flat") {
                    let (ok, out) =
                        try_run("qemu-img", &["check", "-f", qemu_fmt(t.format), p(&dst)]);
                    assert!(ok, "{row}: qemu-img check: {out}");
                }
                let used = allocated(&dst);
                assert!(
                    used < SIZE / 8,
                    "{row}: output is not sparse: {used} bytes allocated for {SIZE}"
                );
                ran += 1;
            }
        }
    }
    assert!(ran >= 24, "only {ran} rows ran");
}

fn existing_targets_and_fully_allocated_output() {
    strata_testkit::require_qemu_utils();
    let dir = tempfile::tempdir().unwrap();
    let srcs = sources(dir.path());
    let (_, raw) = &srcs[0];
    // -n into an existing vmdk full of other data: it must end up equal to the source.
    let dst = dir.path().join("existing.vmdk");
    run(
        "qemu-img",
        &["create", "-q", "-f", "vmdk", p(&dst), &SIZE.to_string()],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "vmdk",
            "-c",
            &format!("write -P 0x5e 0 {SIZE}"),
            p(&dst),
        ],
    );
    let mut req = ConvertRequest {
        source: raw,
        source_format: Some(ImageFormat::Raw),
        target: &dst,
        target_format: ImageFormat::Vmdk,
        target_options: BTreeMap::new(),
        compress: false,
        open: OpenOptions::default(),
        convert: ConvertOptions {
            existing_target: true,
            ..ConvertOptions::default()
        },
        volumes: None,
        source_snapshot: None,
        source_cache: None,
    };
    convert_files(&req, &NoProgress).unwrap();
    let (same, out) = try_run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "vmdk", p(raw), p(&dst)],
    );
    assert!(same, "-n: {out}");
    // -S 0 allocates everything.
    let full = dir.path().join("full.raw");
    req.target = &full;
    req.target_format = ImageFormat::Raw;
    req.convert = ConvertOptions {
        sparse_size: 0,
        ..ConvertOptions::default()
    };
    convert_files(&req, &NoProgress).unwrap();
    assert!(allocated(&full) >= SIZE, "-S 0 left holes");
    // Converting onto an existing file without -n is refused and leaves it alone.
    let e = convert_files(&req, &NoProgress).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
}

strata_testkit::main!(
    every_source_into_every_target,
    existing_targets_and_fully_allocated_output,
);

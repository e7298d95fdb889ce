//! vmdk interop with qemu-img: images qemu makes read exactly as `qemu-img convert -O raw`
//! reads them; images Strata makes pass `qemu-img check` and `qemu-img compare`.

mod vmdk_util;

use std::path::Path;

use strata_storage::format::{self, open_image, ImageFormat, OpenOptions};
use strata_storage::io::blocking::BlockingQueue;
use strata_storage::BlockDevice;
use vmdk_util::*;

const SUBFORMATS: [&str; 4] = [
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
];

fn ro() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    }
}

/// Converts with qemu-img to raw and compares the whole image with what Strata reads.
fn assert_reads_like_qemu(path: &Path, dir: &Path) {
    let raw = dir.join("expected.raw");
    let _ = std::fs::remove_file(&raw);
    run("qemu-img", &["convert", "-O", "raw", p(path), p(&raw)]);
    let img = open_image(path, &ro()).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    assert_eq!(img.format(), ImageFormat::Vmdk);
    let size = img.size();
    assert_eq!(size, std::fs::metadata(&raw).unwrap().len());
    let ours = read_range(img.as_ref(), 0, size);
    let theirs = file_range(&raw, 0, size);
    assert!(
        ours == theirs,
        "{} differs from qemu at byte {:?}",
        path.display(),
        first_diff(&ours, &theirs)
    );
}

fn qemu_made_images_of_every_subformat_read_exactly() {
    strata_testkit::require_qemu_utils();
    let dir = tempfile::tempdir().unwrap();
    for (i, sub) in SUBFORMATS.iter().enumerate() {
        let path = dir.path().join(format!("{sub}.vmdk"));
        let size = 48u64 << 20;
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "vmdk",
                "-o",
                &format!("subformat={sub}"),
                p(&path),
                &size.to_string(),
            ],
        );
        // Freshly created: all zeros.
        assert_reads_like_qemu(&path, dir.path());
        qemu_io_writes(&path, "vmdk", &random_writes(i as u64, size, 40, 300 << 10));
        assert_reads_like_qemu(&path, dir.path());
    }
}

fn split_images_read_across_extent_boundaries() {
    strata_testkit::require_qemu_utils();
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = (4 << 30) + (512 << 20);
    for sub in ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
        let path = dir.path().join(format!("{sub}.vmdk"));
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "vmdk",
                "-o",
                &format!("subformat={sub}"),
                p(&path),
                &size.to_string(),
            ],
        );
        let g2 = 2u64 << 30;
        let writes = [
            (g2 - 4096, 12288, 0x5au8),
            (2 * g2 - 512, 1024, 0x33),
            (size - 65536, 65536, 0x77),
            (0, 512, 1),
        ];
        qemu_io_writes(&path, "vmdk", &writes);
        let img = open_image(&path, &ro()).unwrap();
        let info = img.info().unwrap();
        assert_eq!(info.format_specific["subformat"], sub);
        assert_eq!(info.format_specific["extents"].as_array().unwrap().len(), 3);
        for (o, l, pat) in writes {
            let start = o.saturating_sub(4096);
            let end = (o + l + 4096).min(size);
            let got = read_range(img.as_ref(), start, end - start);
            let mut want = vec![0u8; (end - start) as usize];
            want[(o - start) as usize..(o - start + l) as usize].fill(pat);
            assert!(
                got == want,
                "{sub}: window at {o} differs at {:?}",
                first_diff(&got, &want)
            );
        }
    }
}

fn stream_optimized_from_qemu_reads_exactly() {
    strata_testkit::require_qemu_utils();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", p(&raw), "40M"]);
    qemu_io_writes(&raw, "raw", &random_writes(99, 40 << 20, 30, 200 << 10));
    let so = dir.path().join("so.vmdk");
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
    assert_reads_like_qemu(&so, dir.path());
    let img = open_image(&so, &ro()).unwrap();
    assert_eq!(
        img.info().unwrap().format_specific["subformat"],
        "streamOptimized"
    );
    // Opening it for writing is refused with a reason.
    let e = open_image(&so, &OpenOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("streamOptimized"), "{e}");
    // An empty one made by qemu-img create reads as zeros.
    let empty = dir.path().join("empty.vmdk");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            p(&empty),
            "8M",
        ],
    );
    assert_reads_like_qemu(&empty, dir.path());
}

fn delta_disks_read_through_their_parent() {
    strata_testkit::require_qemu_utils();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vmdk");
    let mid = dir.path().join("mid.vmdk");
    let top = dir.path().join("top.vmdk");
    let size = 32u64 << 20;
    run(
        "qemu-img",
        &["create", "-q", "-f", "vmdk", p(&base), &size.to_string()],
    );
    qemu_io_writes(&base, "vmdk", &random_writes(1, size, 20, 256 << 10));
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            "base.vmdk",
            "-F",
            "vmdk",
            p(&mid),
        ],
    );
    qemu_io_writes(&mid, "vmdk", &random_writes(2, size, 20, 100 << 10));
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            "mid.vmdk",
            "-F",
            "vmdk",
            p(&top),
        ],
    );
    qemu_io_writes(&top, "vmdk", &random_writes(3, size, 20, 30 << 10));
    assert_reads_like_qemu(&top, dir.path());
    let img = open_image(&top, &ro()).unwrap();
    let info = img.info().unwrap();
    let chain = info.format_specific["chain"].as_array().unwrap();
    assert_eq!(chain.len(), 3, "{chain:?}");
    assert_eq!(info.format_specific["parent"], "mid.vmdk");
}

fn zeroed_grain_images_from_qemu_read_exactly() {
    strata_testkit::require_qemu_utils();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zg.vmdk");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "zeroed_grain=on",
            p(&path),
            "16M",
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "vmdk",
            "-c",
            "write -P 7 0 4M",
            "-c",
            "write -z 1M 1M",
            "-c",
            "write -z 3145728 65536",
            p(&path),
        ],
    );
    assert_reads_like_qemu(&path, dir.path());
}

/// Writes the same pseudo-random data into a Strata image and a raw file.
fn write_both(img: &dyn BlockDevice, raw: &Path, seed: u64) {
    use std::os::unix::fs::FileExt;
    let size = img.size();
    let f = std::fs::OpenOptions::new().write(true).open(raw).unwrap();
    let mut q = BlockingQueue::open(img, 8).unwrap();
    let mut rng = fastrand::Rng::with_seed(seed);
    for _ in 0..60 {
        let len = rng.u64(1..200_000);
        let off = rng.u64(0..size - len);
        let data: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        q.write_at(off, &data).unwrap();
        f.write_all_at(&data, off).unwrap();
    }
    let (off, len) = (rng.u64(0..size / 2), 1 << 20);
    q.write_zeroes(off, len, true).unwrap();
    f.write_all_at(&vec![0u8; len as usize], off).unwrap();
    q.flush().unwrap();
}

fn strata_made_images_pass_qemu_check_and_compare() {
    strata_testkit::require_qemu_utils();
    let dir = tempfile::tempdir().unwrap();
    for (i, sub) in SUBFORMATS.iter().enumerate() {
        for extra in ["", ",zeroed_grain=on", ",adapter_type=lsilogic,compat6=on"] {
            if extra.contains("zeroed") && sub.contains("Flat") {
                continue;
            }
            let size: u64 = if sub.starts_with("two") {
                (2 << 30) + (8 << 20)
            } else {
                40 << 20
            };
            let path = dir.path().join(format!("{sub}{i}{}.vmdk", extra.len()));
            let opts = format::parse_options(&format!("subformat={sub}{extra}")).unwrap();
            format::create_image(&path, ImageFormat::Vmdk, size, &opts).unwrap();
            let raw = dir.path().join("expected.raw");
            let _ = std::fs::remove_file(&raw);
            run(
                "qemu-img",
                &["create", "-q", "-f", "raw", p(&raw), &size.to_string()],
            );
            {
                let img = open_image(&path, &OpenOptions::default()).unwrap();
                write_both(img.as_ref(), &raw, i as u64 + 10);
            }
            let info = run("qemu-img", &["info", p(&path)]);
            assert!(info.contains("file format: vmdk"), "{info}");
            if !sub.contains("Flat") {
                let (ok, out) = try_run("qemu-img", &["check", p(&path)]);
                assert!(ok, "qemu-img check {sub}{extra}: {out}");
            }
            let (ok, out) = try_run(
                "qemu-img",
                &["compare", "-f", "raw", "-F", "vmdk", p(&raw), p(&path)],
            );
            assert!(ok, "qemu-img compare {sub}{extra}: {out}");
            assert_reads_like_qemu(&path, dir.path());
        }
    }
}

fn strata_made_stream_optimized_passes_qemu_check_and_compare() {
    strata_testkit::require_qemu_utils();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let size = (24u64 << 20) + 12345 * 512;
    run(
        "qemu-img",
        &["create", "-q", "-f", "raw", p(&raw), &size.to_string()],
    );
    qemu_io_writes(&raw, "raw", &random_writes(5, size, 40, 300 << 10));
    qemu_io_writes(&raw, "raw", &[(size - 512, 512, 9)]);
    let so = dir.path().join("out.vmdk");
    let mut w =
        format::create_compressed(&so, ImageFormat::Vmdk, size, &Default::default()).unwrap();
    let unit = w.unit();
    let data = file_range(&raw, 0, size);
    let mut at = 0u64;
    while at < size {
        let n = unit.min(size - at);
        w.write_unit(at, &data[at as usize..(at + n) as usize])
            .unwrap();
        at += n;
    }
    w.finish().unwrap();
    let (ok, out) = try_run("qemu-img", &["check", p(&so)]);
    assert!(ok, "qemu-img check: {out}");
    let info = run("qemu-img", &["info", p(&so)]);
    assert!(info.contains("streamOptimized"), "{info}");
    let (ok, out) = try_run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "vmdk", p(&raw), p(&so)],
    );
    assert!(ok, "qemu-img compare: {out}");
    assert_reads_like_qemu(&so, dir.path());
    // The empty stream `create` makes is valid too.
    let empty = dir.path().join("empty.vmdk");
    format::create_image(
        &empty,
        ImageFormat::Vmdk,
        1 << 20,
        &format::parse_options("subformat=streamOptimized").unwrap(),
    )
    .unwrap();
    let (ok, out) = try_run("qemu-img", &["check", p(&empty)]);
    assert!(ok, "qemu-img check of an empty stream: {out}");
    assert_reads_like_qemu(&empty, dir.path());
}

strata_testkit::main!(
    qemu_made_images_of_every_subformat_read_exactly,
    split_images_read_across_extent_boundaries,
    stream_optimized_from_qemu_reads_exactly,
    delta_disks_read_through_their_parent,
    zeroed_grain_images_from_qemu_read_exactly,
    strata_made_images_pass_qemu_check_and_compare,
    strata_made_stream_optimized_passes_qemu_check_and_compare,
);

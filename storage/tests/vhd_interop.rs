//! VHD and VHDX against qemu-img's vpc and vhdx drivers: images qemu writes read the same here,
//! images written here pass `qemu-img compare` (and `check` for VHDX), conversions in every
//! direction among raw, qcow2, vmdk, vhd and vhdx compare equal, over odd sizes, block sizes,
//! the CHS geometry limits and a 2040 GiB dynamic VHD.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use strata_storage::convert::{convert_files, ConvertOptions, ConvertRequest};
use strata_storage::format::{self, open_image, ImageFormat, OpenOptions};

mod vhd_util;
use vhd_util::*;

fn opts(text: &str) -> BTreeMap<String, String> {
    format::parse_options(text).unwrap()
}

fn open_rw(path: &Path, f: ImageFormat) -> std::sync::Arc<dyn format::Image> {
    let o = OpenOptions {
        format: Some(f),
        ..OpenOptions::default()
    };
    open_image(path, &o).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn open_ro(path: &Path, f: ImageFormat) -> std::sync::Arc<dyn format::Image> {
    let o = OpenOptions {
        format: Some(f),
        read_only: true,
        ..OpenOptions::default()
    };
    open_image(path, &o).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

const SIZES: [u64; 4] = [1000, (3 << 20) + 3584, (37 << 20) + 512, 67 << 20];

fn images_qemu_writes_read_the_same_here() {
    strata_testkit::require_qemu_utils();
    let dir = tempfile::tempdir().unwrap();
    let kinds = [
        ("vpc", "subformat=dynamic", ImageFormat::Vhd),
        ("vpc", "subformat=fixed", ImageFormat::Vhd),
        ("vpc", "subformat=dynamic,force_size=on", ImageFormat::Vhd),
        ("vhdx", "block_size=1M", ImageFormat::Vhdx),
        ("vhdx", "subformat=fixed,block_size=8M", ImageFormat::Vhdx),
        (
            "vhdx",
            "block_size=32M,block_state_zero=off",
            ImageFormat::Vhdx,
        ),
    ];
    let mut n = 0;
    for (fmt, o, f) in kinds {
        for size in SIZES {
            n += 1;
            let img = dir.path().join(format!("{n}.img"));
            let raw = dir.path().join(format!("{n}.raw"));
            run(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    fmt,
                    "-o",
                    o,
                    p(&img),
                    &size.to_string(),
                ],
            );
            let vsize = qemu_size(&img, fmt);
            if vsize >= 4096 {
                qemu_io_writes(&img, fmt, &random_writes(n, vsize, 12, 1 << 20, false));
            }
            run(
                "qemu-img",
                &["convert", "-f", fmt, "-O", "raw", p(&img), p(&raw)],
            );
            let truth = std::fs::read(&raw).unwrap();
            let ours = open_ro(&img, f);
            assert_eq!(ours.size(), vsize, "{fmt} {o} {size}: size");
            let got = read_all(ours.as_ref());
            assert!(
                got == truth,
                "{fmt} {o} {size}: differs at {:?}",
                first_diff(&got, &truth)
            );
        }
    }
}

fn images_written_here_pass_qemu_img_compare_and_check() {
    strata_testkit::require_qemu_utils();
    let dir = tempfile::tempdir().unwrap();
    let kinds = [
        ("vpc", "", ImageFormat::Vhd),
        ("vpc", "force_size=off", ImageFormat::Vhd),
        ("vpc", "subformat=fixed", ImageFormat::Vhd),
        ("vpc", "force_size=on,block_size=512K", ImageFormat::Vhd),
        ("vpc", "block_size=4M", ImageFormat::Vhd),
        ("vhdx", "block_size=1M", ImageFormat::Vhdx),
        ("vhdx", "", ImageFormat::Vhdx),
        ("vhdx", "subformat=fixed,block_size=2M", ImageFormat::Vhdx),
        (
            "vhdx",
            "block_state_zero=on,block_size=4M,log_size=2M",
            ImageFormat::Vhdx,
        ),
    ];
    let mut n = 0;
    for (fmt, o, f) in kinds {
        for size in SIZES {
            n += 1;
            let img = dir.path().join(format!("{n}.img"));
            let raw = dir.path().join(format!("{n}.raw"));
            format::create_image(&img, f, size, &opts(o)).unwrap();
            let dev = open_rw(&img, f);
            let vsize = dev.size();
            assert!(vsize >= size);
            let writes = random_writes(n * 31, vsize, 16, 3 << 20, true);
            write_patterns(dev.as_ref(), &writes);
            let mut model = vec![0u8; vsize as usize];
            apply(&mut model, &writes);
            assert!(
                read_all(dev.as_ref()) == model,
                "{fmt} {o} {size}: read back"
            );
            drop(dev);
            std::fs::write(&raw, &model).unwrap();
            assert_eq!(qemu_size(&img, fmt), vsize, "{fmt} {o} {size}: qemu's size");
            run(
                "qemu-img",
                &["compare", "-f", fmt, "-F", "raw", p(&img), p(&raw)],
            );
            if fmt == "vhdx" {
                run("qemu-img", &["check", "-f", fmt, p(&img)]);
            }
            // And qemu can write into it afterwards, and we read that.
            let more = random_writes(n * 77, vsize / 512 * 512, 4, 1 << 20, false);
            if vsize >= 4096 {
                qemu_io_writes(&img, fmt, &more);
                apply(&mut model, &more);
                let again = open_ro(&img, f);
                assert!(
                    read_all(again.as_ref()) == model,
                    "{fmt} {o} {size}: after qemu-io"
                );
            }
        }
    }
}

fn request<'a>(
    src: &'a Path,
    sf: ImageFormat,
    dst: &'a Path,
    df: ImageFormat,
    o: &str,
) -> ConvertRequest<'a> {
    ConvertRequest {
        source: src,
        source_format: Some(sf),
        target: dst,
        target_format: df,
        target_options: opts(o),
        compress: false,
        open: OpenOptions::default(),
        source_cache: None,
        convert: ConvertOptions::default(),
        volumes: None,
        source_snapshot: None,
    }
}

fn qemu_name(f: ImageFormat) -> &'static str {
    match f {
        ImageFormat::Vhd => "vpc",
        other => other.name(),
    }
}

fn conversions_in_every_direction_compare_equal() {
    strata_testkit::require_qemu_utils();
    let dir = tempfile::tempdir().unwrap();
    // Sizes qemu keeps exactly in every format (a CHS-exact size for VHD).
    let size = 1004 * 12 * 17 * 512;
    let base = dir.path().join("base.raw");
    let mut model = vec![0u8; size as usize];
    apply(&mut model, &random_writes(5, size, 40, 2 << 20, true));
    std::fs::write(&base, &model).unwrap();
    let formats = [
        (ImageFormat::Raw, ""),
        (ImageFormat::Qcow2, ""),
        (ImageFormat::Vmdk, ""),
        (ImageFormat::Vhd, ""),
        (ImageFormat::Vhd, "subformat=fixed"),
        (ImageFormat::Vhdx, "block_size=1M"),
        (ImageFormat::Vhdx, "subformat=fixed,block_size=1M"),
    ];
    // One source per format, converted here from the raw base.
    let mut sources: Vec<(PathBuf, ImageFormat)> = Vec::new();
    for (i, (f, o)) in formats.iter().enumerate() {
        let s = dir.path().join(format!("src{i}.{}", f.name()));
        convert_files(
            &request(&base, ImageFormat::Raw, &s, *f, o),
            &strata_storage::convert::NoProgress,
        )
        .unwrap();
        run(
            "qemu-img",
            &["compare", "-f", "raw", "-F", qemu_name(*f), p(&base), p(&s)],
        );
        sources.push((s, *f));
    }
    for (i, (s, sf)) in sources.iter().enumerate() {
        for (j, (df, o)) in formats.iter().enumerate() {
            let d = dir.path().join(format!("d{i}-{j}.{}", df.name()));
            convert_files(
                &request(s, *sf, &d, *df, o),
                &strata_storage::convert::NoProgress,
            )
            .unwrap_or_else(|e| panic!("{sf} -> {df} {o}: {e}"));
            run(
                "qemu-img",
                &[
                    "compare",
                    "-f",
                    qemu_name(*sf),
                    "-F",
                    qemu_name(*df),
                    p(s),
                    p(&d),
                ],
            );
            if matches!(
                df,
                ImageFormat::Qcow2 | ImageFormat::Vhdx | ImageFormat::Vmdk
            ) {
                run("qemu-img", &["check", "-f", qemu_name(*df), p(&d)]);
            }
            std::fs::remove_file(&d).unwrap();
        }
    }
}

fn geometry_limits_and_a_2040_gib_dynamic_vhd_agree_with_qemu() {
    strata_testkit::require_qemu_utils();
    let dir = tempfile::tempdir().unwrap();
    let max_chs = 65535u64 * 16 * 255 * 512;
    let sizes = [
        127 << 30,
        max_chs - 512,
        max_chs,
        max_chs + 512,
        (127 << 30) + (1 << 29) + (1 << 20),
        2040 << 30,
    ];
    for (i, size) in sizes.into_iter().enumerate() {
        for force in [false, true] {
            let o = if force {
                "force_size=on"
            } else {
                "force_size=off"
            };
            // qemu creates, we read its size and what it wrote near the end.
            let q = dir.path().join(format!("q{i}{force}.vhd"));
            run(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "vpc",
                    "-o",
                    o,
                    p(&q),
                    &size.to_string(),
                ],
            );
            let qsize = qemu_size(&q, "vpc");
            let tail = (qsize - (3 << 20)) / 512 * 512;
            qemu_io_writes(&q, "vpc", &[(tail, 2 << 20, 0x5c), (4096, 4096, 0x11)]);
            let ours = open_ro(&q, ImageFormat::Vhd);
            assert_eq!(
                ours.size(),
                qsize,
                "size {size} force {force}: qemu's image"
            );
            let mut bq =
                strata_storage::io::blocking::BlockingQueue::open(ours.as_ref(), 4).unwrap();
            assert!(bq
                .read_at(tail, 2 << 20)
                .unwrap()
                .iter()
                .all(|&b| b == 0x5c));
            assert!(bq.read_at(4096, 4096).unwrap().iter().all(|&b| b == 0x11));
            drop(bq);
            drop(ours);
            // We create, qemu agrees on the size and reads what we wrote near the end.
            let s = dir.path().join(format!("s{i}{force}.vhd"));
            format::create_image(&s, ImageFormat::Vhd, size, &opts(o)).unwrap();
            let dev = open_rw(&s, ImageFormat::Vhd);
            assert_eq!(dev.size(), qsize, "size {size} force {force}: our size");
            write_patterns(dev.as_ref(), &[(tail, 2 << 20, 0xa7), (0, 512, 1)]);
            drop(dev);
            assert_eq!(qemu_size(&s, "vpc"), qsize);
            run(
                "qemu-io",
                &[
                    "-f",
                    "vpc",
                    "-c",
                    &format!("read -P 167 {tail} 2M"),
                    "-c",
                    "read -P 1 0 512",
                    p(&s),
                ],
            );
            std::fs::remove_file(&q).unwrap();
            std::fs::remove_file(&s).unwrap();
        }
    }
    // Past 2040 GiB both refuse.
    let big = dir.path().join("big.vhd");
    assert!(format::create_image(&big, ImageFormat::Vhd, 2041 << 30, &opts("")).is_err());
}

fn a_hyper_v_or_xenserver_footer_means_current_size() {
    // A "tap" (XenServer) footer whose geometry rounds below current_size: the size is
    // current_size for qemu and for us.
    strata_testkit::require_qemu_utils();
    use strata_storage::format::vhd::footer::{Footer, SECTOR};
    let dir = tempfile::tempdir().unwrap();
    for app in [b"tap\0", b"win ", b"vpc "] {
        let path = dir
            .path()
            .join(format!("{}.vhd", String::from_utf8_lossy(&app[..3])));
        let size = 100 << 20;
        format::create_image(&path, ImageFormat::Vhd, size, &opts("force_size=on")).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let len = bytes.len();
        let mut f = Footer::parse(&bytes[len - 512..], "t").unwrap();
        f.creator_app = *app;
        f.geometry = strata_storage::format::vhd::footer::Geometry::for_sectors(size / SECTOR);
        let r = f.render();
        bytes[..512].copy_from_slice(&r);
        bytes[len - 512..].copy_from_slice(&r);
        std::fs::write(&path, &bytes).unwrap();
        let ours = open_ro(&path, ImageFormat::Vhd);
        let want = if app == b"vpc " {
            f.geometry.total() * 512
        } else {
            size
        };
        assert_eq!(ours.size(), want, "{app:?}");
        assert_eq!(qemu_size(&path, "vpc"), want, "{app:?}: qemu");
    }
}

strata_testkit::main!(
    images_qemu_writes_read_the_same_here,
    images_written_here_pass_qemu_img_compare_and_check,
    conversions_in_every_direction_compare_equal,
    geometry_limits_and_a_2040_gib_dynamic_vhd_agree_with_qemu,
    a_hyper_v_or_xenserver_footer_means_current_size,
);

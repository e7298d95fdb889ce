//! VHD and VHDX through the `strata` binary: a XenServer-style migration walk (a storage
//! repository folder holding a dynamic VHD and a differencing child over it, with XenServer's
//! creator code, current_size semantics and a MacX parent locator, imported with `strata image
//! convert -n` into a thin volume and compared with the flattened truth; unwritten ranges stay
//! unprovisioned), and backups of a VHD and a VHDX restored to new images of every format and
//! onto existing images, each compared with its source by qemu-img.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use strata_storage::format::vhd::dynamic::{DynamicHeader, HEADER_LEN};
use strata_storage::format::vhd::footer::{Footer, Geometry};
use strata_storage::format::{self, open_image, ImageFormat, OpenOptions};
use strata_storage::io::blocking::BlockingQueue;

fn strata(data: &Path, args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("--data")
        .arg(data)
        .args(args)
        .env_remove("STRATA_DATA")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "strata {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn read_at(p: &Path, at: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    std::fs::File::open(p)
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    b
}

fn write_at(p: &Path, at: u64, b: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(b, at).unwrap();
}

/// Makes the VHD look as XenServer (blktap) writes it: creator "tap", a geometry rounded down
/// from the exact size, and for a differencing disk a single MacX locator "file://./PARENT".
fn as_xenserver(p: &Path, parent: Option<&str>) {
    let len = std::fs::metadata(p).unwrap().len();
    let mut f = Footer::parse(&read_at(p, len - 512, 512), "t").unwrap();
    f.creator_app = *b"tap\0";
    f.geometry = Geometry::for_sectors(f.current_size / 512);
    let b = f.render();
    write_at(p, 0, &b);
    write_at(p, len - 512, &b);
    if let Some(parent) = parent {
        let mut h = DynamicHeader::parse(&read_at(p, 512, HEADER_LEN), "t").unwrap();
        let url = format!("file://./{parent}");
        let keep = h
            .locators
            .iter()
            .find(|l| &l.code == b"MacX")
            .cloned()
            .unwrap();
        for l in h.locators.iter_mut() {
            *l = Default::default();
        }
        h.locators[0] = keep;
        h.locators[0].len = url.len() as u32;
        write_at(p, h.locators[0].offset, url.as_bytes());
        write_at(p, 512, &h.render());
    }
}

fn write_patterns(path: &Path, writes: &[(u64, usize, u8)], model: &mut [u8]) {
    let img = open_image(path, &OpenOptions::default()).unwrap();
    let mut q = BlockingQueue::open(img.as_ref(), 4).unwrap();
    for &(o, l, pat) in writes {
        q.write_at(o, &vec![pat; l]).unwrap();
        model[o as usize..o as usize + l].fill(pat);
    }
    q.flush().unwrap();
}

fn a_xenserver_vhd_chain_imports_into_a_thin_volume() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let sr: PathBuf = dir.path().join("sr-0f1c");
    std::fs::create_dir(&sr).unwrap();
    let size: u64 = (48 << 20) + 7 * 512;
    let base = sr.join("4a1b-base.vhd");
    let child = sr.join("9c2d-leaf.vhd");
    let opts = |t: &str| format::parse_options(t).unwrap();
    format::create_image(&base, ImageFormat::Vhd, size, &opts("force_size=on")).unwrap();
    let mut model = vec![0u8; size as usize];
    write_patterns(
        &base,
        &[
            (0, 1 << 20, 0x10),
            (5 << 20, 3 << 20, 0x20),
            (40 << 20, 4096, 0x30),
            (size - 512, 512, 0x40),
        ],
        &mut model,
    );
    as_xenserver(&base, None);
    format::create_image(
        &child,
        ImageFormat::Vhd,
        0,
        &opts("backing_file=4a1b-base.vhd"),
    )
    .unwrap();
    as_xenserver(&child, Some("4a1b-base.vhd"));
    write_patterns(
        &child,
        &[
            (512 * 3 + 7, 1000, 0x51),
            (6 << 20, 10_000, 0x52),
            (30 << 20, 2 << 20, 0x53),
            (size - 300, 300, 0x54),
        ],
        &mut model,
    );
    let info: Value = serde_json::from_str(&strata(
        &data,
        &["image", "info", "--output", "json", s(&child)],
    ))
    .unwrap();
    assert_eq!(info["format"], "vhd");
    assert_eq!(info["virtual-size"], size);
    assert_eq!(info["format-specific"]["subformat"], "differencing");
    assert_eq!(info["format-specific"]["creator"], "tap");
    assert_eq!(
        info["format-specific"]["chain"].as_array().unwrap().len(),
        2
    );

    let pv = dir.path().join("pv.img");
    strata(&data, &["pv", "create", s(&pv), "--size", "256M"]);
    strata(&data, &["vg", "create", "vg0", s(&pv)]);
    strata(&data, &["lv", "create-pool", "vg0/pool", "--size", "128M"]);
    strata(
        &data,
        &[
            "lv",
            "create",
            "vg0/vm-disk",
            "--size",
            &size.to_string(),
            "--thin",
            "vg0/pool",
        ],
    );
    strata(
        &data,
        &[
            "image",
            "convert",
            "-n",
            "-O",
            "raw",
            s(&child),
            "lv:vg0/vm-disk",
        ],
    );

    let out = dir.path().join("out.raw");
    strata(
        &data,
        &["image", "convert", "-O", "raw", "lv:vg0/vm-disk", s(&out)],
    );
    let got = std::fs::read(&out).unwrap();
    // The volume is rounded up to its extents; what lies past the disk reads as zeros.
    assert!(got.len() as u64 >= size);
    let diff = got.iter().zip(&model).position(|(a, b)| a != b);
    assert!(
        diff.is_none(),
        "the volume differs from the flattened chain at byte {diff:?}"
    );
    assert!(got[size as usize..].iter().all(|&b| b == 0));

    let list: Value =
        serde_json::from_str(&strata(&data, &["lv", "list", "vg0", "--output", "json"])).unwrap();
    let lv = list
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "vm-disk")
        .unwrap();
    let mapped = lv["mapped-bytes"].as_u64().unwrap();
    assert!(
        mapped > 0 && mapped < size / 2,
        "mapped {mapped} of {size}: holes must stay unprovisioned"
    );
    // The chain itself is untouched by the import.
    let again = open_image(
        &child,
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_eq!(again.size(), size);
}

/// Runs qemu-img, which must succeed.
fn qemu_img(args: &[&str]) {
    let o = Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("qemu-img: {e}"));
    assert!(
        o.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn qemu_fmt(f: &str) -> &str {
    if f == "vhd" {
        "vpc"
    } else {
        f
    }
}

fn vhd_and_vhdx_back_up_and_restore_to_every_format() {
    strata_testkit::require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = d.join("data");
    let store = d.join("store");
    // 24 MiB with data in scattered places and holes between.
    let mut bytes = vec![0u8; 24 << 20];
    let mut rng = fastrand_like(7);
    for k in 0..40 {
        let at = (rng() % (24 << 20) as u64) as usize & !511;
        let len = ((rng() % (300 << 10)) as usize + 1).min(bytes.len() - at);
        bytes[at..at + len].fill((k * 6 + 1) as u8);
    }
    let raw = d.join("truth.raw");
    std::fs::write(&raw, &bytes).unwrap();
    for (fmt, opts) in [("vhd", ""), ("vhdx", "block_size=1M")] {
        let src = d.join(format!("disk.{fmt}"));
        strata(
            &data,
            &["image", "convert", "-O", fmt, "-o", opts, s(&raw), s(&src)],
        );
        qemu_img(&[
            "compare",
            "-f",
            "raw",
            "-F",
            qemu_fmt(fmt),
            s(&raw),
            s(&src),
        ]);
        strata(
            &data,
            &["backup", "create", "--store", s(&store), "--quiet", s(&src)],
        );
        let snap = format!("image/disk.{fmt}");
        for target in ["raw", "qcow2", "vmdk", "vhd", "vhdx"] {
            let out = d.join(format!("from-{fmt}.{target}"));
            strata(
                &data,
                &[
                    "backup",
                    "restore",
                    "--store",
                    s(&store),
                    "--quiet",
                    "-O",
                    target,
                    &snap,
                    s(&out),
                ],
            );
            qemu_img(&[
                "compare",
                "-f",
                qemu_fmt(fmt),
                "-F",
                qemu_fmt(target),
                s(&src),
                s(&out),
            ]);
        }
        // Onto an existing image of the same format.
        let existing = d.join(format!("existing.{fmt}"));
        strata(
            &data,
            &[
                "image",
                "create",
                "-q",
                "-f",
                fmt,
                "-o",
                opts,
                s(&existing),
                "24M",
            ],
        );
        strata(
            &data,
            &[
                "backup",
                "restore",
                "--store",
                s(&store),
                "--quiet",
                "--existing",
                &snap,
                s(&existing),
            ],
        );
        qemu_img(&[
            "compare",
            "-f",
            qemu_fmt(fmt),
            "-F",
            qemu_fmt(fmt),
            s(&src),
            s(&existing),
        ]);
    }
}

/// A small deterministic generator (xorshift), so the test needs no extra crate.
fn fastrand_like(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.max(1);
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

strata_testkit::main!(
    a_xenserver_vhd_chain_imports_into_a_thin_volume,
    vhd_and_vhdx_back_up_and_restore_to_every_format,
);

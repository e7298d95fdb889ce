//! Backups from and restores to VHD and VHDX through `strata backup`: a VHD and a VHDX are
//! backed up, and each snapshot is restored to new images of every format and onto an existing
//! image of its own format; qemu-img compares each with its source.

use std::path::Path;
use std::process::Command;

fn strata(data: &Path, args: &[&str]) {
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
}

/// Runs qemu-img; `None` when it is not installed (a failure under CI).
fn qemu_img(args: &[&str]) -> Option<()> {
    match Command::new("qemu-img").args(args).output() {
        Ok(o) => {
            assert!(
                o.status.success(),
                "qemu-img {args:?}: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            Some(())
        }
        Err(_) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "qemu-img is not installed"
            );
            eprintln!("\n*** SKIPPED: qemu-img not installed (apt-get install qemu-utils) ***\n");
            None
        }
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn qemu_fmt(f: &str) -> &str {
    if f == "vhd" {
        "vpc"
    } else {
        f
    }
}

#[test]
fn vhd_and_vhdx_back_up_and_restore_to_every_format() {
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
        if qemu_img(&[
            "compare",
            "-f",
            "raw",
            "-F",
            qemu_fmt(fmt),
            s(&raw),
            s(&src),
        ])
        .is_none()
        {
            return;
        }
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

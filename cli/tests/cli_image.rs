//! End-to-end tests of `strata image create|info|bench` through the built binary, including the
//! bad-input cases: each must fail with one clear line on stderr and a non-zero status.

use std::path::Path;
use std::process::{Command, Output};

fn strata(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .output()
        .expect("run strata")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a clean failure: non-zero status, one line on stderr mentioning `needle`, no panic.
fn assert_clean_failure(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panic output: {err}"
    );
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "expected one line on stderr, got: {err}"
    );
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "stderr {err:?} should mention {needle:?}"
    );
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn create_info_and_bench_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    let o = strata(&["image", "create", "-f", "raw", path_str(&img), "64M"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 64 << 20);

    let o = strata(&["image", "info", "--output", "json", path_str(&img)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["format"], "raw");
    assert_eq!(v["virtual-size"], 64 << 20);

    for extra in [&["-w"][..], &[][..], &["--engine", "threads", "-w"][..]] {
        let mut args = vec![
            "image",
            "bench",
            "-c",
            "2000",
            "-d",
            "8",
            "--pattern",
            "rand",
            "--output",
            "json",
        ];
        args.extend_from_slice(extra);
        args.push(path_str(&img));
        let o = strata(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(r["ops"], 2000, "{r}");
    }
    // The writes landed: the image is no longer all holes.
    let o = strata(&["image", "info", "--output", "json", path_str(&img)]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["actual-size"].as_u64().unwrap() > 0, "{v}");
}

fn preallocation_full_allocates_everything() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("full.img");
    let o = strata(&[
        "image",
        "create",
        "-o",
        "preallocation=full",
        path_str(&img),
        "8M",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = strata(&["image", "info", "--output", "json", path_str(&img)]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["actual-size"].as_u64().unwrap() >= 8 << 20, "{v}");
}

fn missing_file_is_a_clear_error() {
    let o = strata(&["image", "info", "/nonexistent/strata-test.img"]);
    assert_clean_failure(&o, "does not exist");
    let o = strata(&["image", "bench", "-c", "10", "/nonexistent/strata-test.img"]);
    assert_clean_failure(&o, "does not exist");
}

fn bad_sizes_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("b.img");
    for (size, needle) in [
        ("abc", "invalid size"),
        ("0", "greater than zero"),
        ("12Q", "invalid size"),
        ("99999999999999999999", "invalid size"),
    ] {
        let o = strata(&["image", "create", path_str(&img), size]);
        assert_clean_failure(&o, needle);
        assert!(!img.exists(), "a failed create left {}", img.display());
    }
}

fn create_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("keep.img");
    std::fs::write(&img, b"precious").unwrap();
    let o = strata(&["image", "create", path_str(&img), "1M"]);
    assert_clean_failure(&o, "already exists");
    assert_eq!(std::fs::read(&img).unwrap(), b"precious");
}

fn a_directory_is_not_an_image() {
    let dir = tempfile::tempdir().unwrap();
    let o = strata(&["image", "info", path_str(dir.path())]);
    assert_clean_failure(&o, "is a directory");
    let o = strata(&["image", "bench", "-c", "10", path_str(dir.path())]);
    assert_clean_failure(&o, "is a directory");
}

fn a_read_only_file_opened_for_writing_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ro.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let mut perms = std::fs::metadata(&img).unwrap().permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(&img, perms).unwrap();
    // Root ignores permission bits; the immutable attribute stops root too.
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    let immutable = is_root
        && Command::new("chattr")
            .arg("+i")
            .arg(&img)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    if is_root && !immutable {
        // CI runs as root on ext4 with chattr (e2fsprogs).
        strata_testkit::missing(
            "chattr +i (running as root, no file is read-only to us without it)",
        );
    }
    let o = strata(&["image", "bench", "-w", "-c", "10", path_str(&img)]);
    if immutable {
        let _ = Command::new("chattr").arg("-i").arg(&img).status();
    }
    assert_clean_failure(&o, "read-only");
    assert!(
        std::fs::read(&img).unwrap().iter().all(|&b| b == 0),
        "a refused write changed the file"
    );
    // Reading it is fine.
    let o = strata(&["image", "bench", "-c", "10", path_str(&img)]);
    assert!(o.status.success(), "{}", stderr(&o));
}

fn unsupported_formats_are_named() {
    let dir = tempfile::tempdir().unwrap();
    // VirtualBox's VDI: recognised by its signature, not supported.
    let img = dir.path().join("x.img");
    let mut data = vec![0u8; 1 << 16];
    data[64..68].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
    std::fs::write(&img, data).unwrap();
    let o = strata(&["image", "info", path_str(&img)]);
    assert_clean_failure(&o, "vdi");
    // A truncated VHDX is recognised and refused with a reason.
    let img = dir.path().join("y.img");
    let mut data = b"vhdxfile".to_vec();
    data.resize(1 << 16, 0);
    std::fs::write(&img, data).unwrap();
    let o = strata(&["image", "info", path_str(&img)]);
    assert_clean_failure(&o, "VHDX");
}

fn bench_refuses_nonsense_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("s.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    assert_clean_failure(
        &strata(&["image", "bench", "-s", "8K", path_str(&img)]),
        "larger than the image",
    );
    assert_clean_failure(
        &strata(&["image", "bench", "-d", "0", path_str(&img)]),
        "depth",
    );
    assert_clean_failure(
        &strata(&["image", "bench", "-s", "0", path_str(&img)]),
        "buffer size",
    );
}

fn without_io_uring_the_thread_engine_serves_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args([
            "image",
            "bench",
            "-c",
            "100",
            "--output",
            "json",
            path_str(&img),
        ])
        .env("STRATA_IO_URING", "off")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["engine"], "threads");
    assert!(
        stderr(&o).contains("io_uring is unavailable"),
        "the fallback must be logged: {}",
        stderr(&o)
    );
    // Asking for io_uring explicitly is then an error naming it.
    let o = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args([
            "image",
            "bench",
            "-c",
            "100",
            "--engine",
            "uring",
            path_str(&img),
        ])
        .env("STRATA_IO_URING", "off")
        .output()
        .unwrap();
    assert_clean_failure(&o, "io_uring");
}

/// `strata image check` on a vmdk: a grain directory entry pointing past the end of the file
/// is reported (exit 2), `-r all` restores the table from the redundant copy (exit 0), and the
/// image holds what it held before the damage.
fn check_reports_and_repairs_a_vmdk() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("data.raw");
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i / 4096) as u8 | 1).collect();
    std::fs::write(&raw, &data).unwrap();
    let vmdk = dir.path().join("d.vmdk");
    let o = strata(&[
        "image",
        "convert",
        "-O",
        "vmdk",
        path_str(&raw),
        path_str(&vmdk),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = strata(&["image", "check", path_str(&vmdk)]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let mut b = std::fs::read(&vmdk).unwrap();
    let gd = u64::from_le_bytes(b[56..64].try_into().unwrap()) as usize * 512;
    b[gd..gd + 4].copy_from_slice(&1_000_000u32.to_le_bytes());
    std::fs::write(&vmdk, &b).unwrap();
    let o = strata(&["image", "check", "--output", "json", path_str(&vmdk)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["format"].as_str(), v["corruptions"].as_u64()),
        (Some("vmdk"), Some(1))
    );
    let o = strata(&["image", "check", path_str(&vmdk)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("grain table 0 lies beyond the end of the file"),
        "{}",
        stderr(&o)
    );
    let o = strata(&["image", "check", "-r", "all", path_str(&vmdk)]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = strata(&["image", "check", path_str(&vmdk)]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = strata(&["image", "compare", path_str(&raw), path_str(&vmdk)]);
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
}

strata_testkit::main!(
    create_info_and_bench_round_trip,
    check_reports_and_repairs_a_vmdk,
    preallocation_full_allocates_everything,
    missing_file_is_a_clear_error,
    bad_sizes_are_clear_errors,
    create_never_overwrites,
    a_directory_is_not_an_image,
    a_read_only_file_opened_for_writing_is_refused,
    unsupported_formats_are_named,
    bench_refuses_nonsense_parameters,
    without_io_uring_the_thread_engine_serves_and_says_so,
);

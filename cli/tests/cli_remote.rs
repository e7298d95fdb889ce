//! The appliance commands through `--remote` against a running server, and in-process on a
//! local data directory. Needs qemu-img (CI installs Debian's qemu-utils).

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::Server;
use serde_json::Value;

fn strata(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .env_remove("STRATA_REMOTE")
        .env_remove("STRATA_TOKEN")
        .output()
        .expect("run strata")
}

fn ok(args: &[&str]) -> String {
    let out = strata(args);
    assert!(
        out.status.success(),
        "strata {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(args: &[&str]) -> String {
    let out = strata(args);
    assert!(!out.status.success(), "strata {args:?} succeeded");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn json(text: &str) -> Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The same scenario for a given `--remote`/`--data` prefix.
fn scenario(prefix: &[&str], dir: &Path) {
    let with = |rest: &[&str]| -> Vec<String> {
        prefix.iter().chain(rest).map(|s| s.to_string()).collect()
    };
    let run_ok = |rest: &[&str]| {
        let a = with(rest);
        ok(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let src = dir.join("src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", src.to_str().unwrap(), "32M"]);
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x42 1M 2M"])
        .arg(&src)
        .output()
        .unwrap();
    assert!(out.status.success());

    run_ok(&["volumes", "create", "--size", "32M", "strata/vm-300-disk-0"]);
    let list = json(&run_ok(&["volumes", "list", "--output", "json"]));
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "vm-300-disk-0"),
        "{list}"
    );
    let table = run_ok(&["volumes", "list"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("vm-300-disk-0"), "{table}");

    run_ok(&[
        "images",
        "import",
        "-q",
        src.to_str().unwrap(),
        "golden.qcow2",
    ]);
    run_ok(&[
        "images",
        "convert",
        "-q",
        "image:golden.qcow2",
        "lv:strata/vm-300-disk-0",
    ]);
    run_ok(&["volumes", "snapshot", "strata/vm-300-disk-0", "vm-300-snap"]);
    let done = json(&run_ok(&[
        "backups",
        "create",
        "-q",
        "--output",
        "json",
        "lv:strata/vm-300-snap",
    ]));
    let snapshot = done["snapshot"].as_str().unwrap().to_string();
    let backups = json(&run_ok(&["backups", "list", "--output", "json"]));
    assert_eq!(backups.as_array().unwrap().len(), 1, "{backups}");
    run_ok(&["backups", "restore", "-q", &snapshot, "image:back.raw"]);
    let out = dir.join("back.raw");
    run_ok(&["images", "export", "back.raw", out.to_str().unwrap()]);
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        out.to_str().unwrap(),
        src.to_str().unwrap(),
    ]);
    let vol = dir.join("vol.raw");
    run_ok(&[
        "volumes",
        "export",
        "strata/vm-300-snap",
        vol.to_str().unwrap(),
    ]);
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        vol.to_str().unwrap(),
        src.to_str().unwrap(),
    ]);
    let jobs = json(&run_ok(&["jobs", "list", "--output", "json"]));
    assert!(jobs.as_array().unwrap().len() >= 4, "{jobs}");

    // Errors come back as one clear line.
    let a = with(&["volumes", "create", "--size", "1M", "strata/../x"]);
    let err = fails(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("name") && err.contains("HTTP 400"), "{err}");
}

#[test]
fn appliance_commands_work_against_a_remote_server() {
    let srv = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let remote = srv.remote_args();
    let remote: Vec<&str> = remote.iter().map(String::as_str).collect();
    scenario(&remote, dir.path());
    let fp = srv.fingerprint.as_str();

    // No token, a wrong token, and local tools with --remote are refused.
    let err = fails(&["--remote", &srv.url, "--fingerprint", fp, "volumes", "list"]);
    assert!(err.contains("token"), "{err}");
    let err = fails(&[
        "--remote",
        &srv.url,
        "--fingerprint",
        fp,
        "--token",
        "x.y",
        "volumes",
        "list",
    ]);
    assert!(err.contains("401"), "{err}");
    let err = fails(&[&remote[..], &["lv", "list"]].concat());
    assert!(err.contains("--remote"), "{err}");
}

#[test]
fn appliance_commands_work_in_process_on_a_local_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    ok(&["--data", data.to_str().unwrap(), "init", "--pv-size", "2G"]);
    scenario(&["--data", data.to_str().unwrap()], dir.path());
    let err = fails(&[
        "--data",
        data.to_str().unwrap(),
        "backups",
        "gc",
        "--no-wait",
    ]);
    assert!(err.contains("--remote"), "{err}");
}

//! `strata nbd serve` end to end: a volume served over TCP and a Unix socket at once, read by
//! qemu-img and nbdinfo, stopped by SIGTERM; plain NBD on a non-loopback address is refused.
//! Needs qemu-utils and libnbd-bin (CI installs them; elsewhere a missing tool shows the test as ignored).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn ok(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn nbd_serve_exports_a_volume_over_tcp_and_a_unix_socket() {
    strata_testkit::require_tool("qemu-img", "qemu-utils");
    strata_testkit::require_tool("nbdinfo", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    {
        let store = strata_storage::volume::VolumeStore::new(&data);
        let pv = data.join("pv0.img");
        store.pv_create(&pv, Some(128 << 20)).unwrap();
        let vg = store.vg_create("tvg", &[pv], 4 << 20).unwrap();
        vg.create_pool("pool", 64 << 20, 0, 0).unwrap();
        vg.create_thin("pool", "vm1", 16 << 20).unwrap();
    }
    let sock = dir.path().join("nbd.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args([
            "--data",
            data.to_str().unwrap(),
            "nbd",
            "serve",
            "lv:tvg/vm1",
        ])
        .args(["--listen", "127.0.0.1:0", "--unix", sock.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut uris = Vec::new();
    while uris.len() < 2 {
        let line = lines.next().expect("strata nbd serve ended early").unwrap();
        if let Some(u) = line.trim().strip_prefix("nbd") {
            uris.push(format!("nbd{u}"));
        }
    }
    let tcp = uris
        .iter()
        .find(|u| u.starts_with("nbd://"))
        .unwrap()
        .clone();
    let unix = uris
        .iter()
        .find(|u| u.starts_with("nbd+unix://"))
        .unwrap()
        .clone();
    assert!(tcp.ends_with("/tvg/vm1"), "{tcp}");
    let info = ok("qemu-img", &["info", "--output=json", &tcp]);
    assert!(info.contains("\"virtual-size\": 16777216"), "{info}");
    ok("qemu-io", &["-f", "raw", "-c", "write -P 3 1M 64k", &unix]);
    let map = ok("nbdinfo", &["--map", &unix]);
    assert!(
        map.lines()
            .any(|l| l.split_whitespace().take(3).collect::<Vec<_>>() == ["1048576", "65536", "0"]),
        "{map}"
    );
    // The empty name is the default export.
    let port = tcp
        .trim_start_matches("nbd://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    ok("nbdinfo", &[&format!("nbd://{port}")]);
    // SAFETY: kill(2) on the child we started; no memory is involved.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert!(!sock.exists());

    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args([
            "--data",
            data.to_str().unwrap(),
            "nbd",
            "serve",
            "lv:tvg/vm1",
        ])
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}

strata_testkit::main!(nbd_serve_exports_a_volume_over_tcp_and_a_unix_socket,);

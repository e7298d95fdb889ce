//! A Linux guest under QEMU (TCG, as the tier-2 tests run it) whose disk is a Strata volume
//! exported by `strata serve` over NBD with TLS: QEMU's own NBD client (tls-creds-x509 with the
//! appliance's CA) boots the Debian kernel and busybox test guest, which runs its disk test
//! (host data read, its pattern written with O_DIRECT and fsync, a discard) and, in a second
//! boot, fio; the host then checks the volume through the API.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{require_tool, start_job, succeed, Server};
use serde_json::json;
use strata_tests::linux_guest::{
    check_bytes, check_console, guest_dir, guest_dir_with_fio, prepare_raw, strata_line,
    DISK_TEST_CMDLINE,
};

const SERIAL: &str = "strata-nbd";

/// Boots QEMU with `initramfs` and a virtio-blk disk on NBD export `export` at `port` over TLS
/// trusting the CA in `certs`; returns the console.
fn boot(
    guest: &Path,
    initramfs: &str,
    cmdline: &str,
    port: u16,
    export: &str,
    certs: &Path,
) -> String {
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "q35",
            "-m",
            "512M",
            "-nographic",
            "-no-reboot",
            "-nodefaults",
        ])
        .args(["-serial", "stdio"])
        .arg("-kernel")
        .arg(guest.join("vmlinuz"))
        .arg("-initrd")
        .arg(guest.join(initramfs))
        .args(["-append", cmdline])
        .arg("-object")
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            certs.display()
        ))
        .arg("-blockdev")
        .arg(format!(
            "driver=nbd,node-name=nbd0,server.type=inet,server.host=127.0.0.1,\
             server.port={port},export={export},tls-creds=tls0,discard=unmap"
        ))
        .args([
            "-device",
            &format!("virtio-blk-pci,drive=nbd0,serial={SERIAL}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting qemu-system-x86_64");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "QEMU did not finish in 300 s: {}",
                reader.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let console = reader.join().unwrap_or_default();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    assert!(status.success(), "QEMU failed ({status}): {err}\n{console}");
    console
}

fn a_linux_guest_runs_on_a_volume_exported_over_nbd_with_tls() {
    for t in ["qemu-system-x86_64", "fio"] {
        require_tool(t);
    }
    let guest = guest_dir_with_fio().expect("building the test guest");
    assert_eq!(guest, guest_dir().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start_with_args(&["--nbd-listen", "127.0.0.1:0"]);
    let c = srv.client();
    let r = c
        .request(
            "POST",
            "/api/volumes",
            Some(&json!({"vg": "strata", "name": "root", "size": "64M", "pool": "data"})),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let seed = srv.data.join("import/seed.raw");
    prepare_raw(&seed).unwrap();
    succeed(
        &c,
        &start_job(
            &c,
            "/api/convert",
            &json!({"source": seed.display().to_string(), "target": "lv:strata/root",
                    "source_format": "raw"}),
        ),
    );
    let e = c
        .request(
            "POST",
            "/api/exports",
            Some(&json!({"source": "lv:strata/root", "name": "root"})),
        )
        .unwrap();
    assert_eq!(e.status, 200, "{:?}", e.body);
    let uri = e.body["uri"].as_str().unwrap();
    let port: u16 = uri
        .trim_start_matches("nbd://127.0.0.1:")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    std::fs::copy(srv.data.join("tls/ca.pem"), certs.join("ca-cert.pem")).unwrap();

    let console = boot(
        &guest,
        "initramfs.gz",
        DISK_TEST_CMDLINE,
        port,
        "root",
        &certs,
    );
    check_console("NBD over TLS", &console, SERIAL).unwrap();
    let fio = boot(
        &guest,
        "initramfs-fio.gz",
        "console=ttyS0 panic=-1 quiet strata.test=fio strata.fio=--runtime=3",
        port,
        "root",
        &certs,
    );
    let iops: f64 = strata_line(&fio, "fio vda")
        .unwrap_or_else(|| panic!("no fio result: {fio}"))
        .parse()
        .unwrap_or(0.0);
    assert!(iops > 0.0, "fio read nothing: {fio}");
    eprintln!("fio 4k random read through NBD over TLS under TCG: {iops:.0} IOPS");

    // The guest's writes are on the volume, its discard reads as zeros.
    let r = c.request("DELETE", "/api/exports/root", None).unwrap();
    assert_eq!(r.status, 204);
    let got = c
        .send(
            "GET",
            "/api/volumes/strata/root/download",
            Vec::new(),
            false,
        )
        .unwrap();
    assert_eq!(got.status, 200);
    check_bytes("NBD over TLS", &got.raw).unwrap();
}

strata_testkit::main!(a_linux_guest_runs_on_a_volume_exported_over_nbd_with_tls,);

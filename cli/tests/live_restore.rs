//! End-to-end tests of restores onto volumes through the `strata` binary and its HTTP API:
//! live restores used at once by a VM started through the API and by NBD clients, a server
//! killed (-9) in the middle of one, and the "restoring" mark of plain restores.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{require_tool, start_job, succeed, wait_job, CliEnv, Server};
use serde_json::{json, Value};
use strata_api::client::Client;
use strata_tests::blkdrv_image;

const MIB: usize = 1 << 20;

fn create_volume(c: &Client, name: &str, size: &str) {
    let r = c
        .request(
            "POST",
            "/api/volumes",
            Some(&json!({"vg": "strata", "name": name, "size": size, "pool": "data"})),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
}

fn volume(c: &Client, name: &str) -> Value {
    let r = c
        .request("GET", &format!("/api/volumes/strata/{name}"), None)
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body
}

/// Puts `data` (written to the server's import folder) on volume `strata/NAME` and backs the
/// volume up; returns the snapshot group.
fn backed_up_volume(c: &Client, import: &Path, name: &str, data: &[u8]) -> String {
    let file = import.join(format!("{name}.raw"));
    std::fs::write(&file, data).unwrap();
    create_volume(c, name, &format!("{}M", data.len() / MIB));
    let id = start_job(
        c,
        "/api/convert",
        &json!({"source": file, "target": format!("lv:strata/{name}"), "source_format": "raw"}),
    );
    succeed(c, &id);
    std::fs::remove_file(&file).unwrap();
    let id = start_job(
        c,
        "/api/backups",
        &json!({"source": format!("lv:strata/{name}")}),
    );
    succeed(c, &id);
    format!("volume/strata/{name}")
}

/// Waits until volume `strata/NAME` is no longer being restored.
fn wait_restored(c: &Client, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = volume(c, name);
        if v.get("restore").is_none() {
            return;
        }
        assert!(Instant::now() < deadline, "still restoring: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn download(c: &Client, name: &str, out: &Path) -> Vec<u8> {
    let r = c
        .download_to(&format!("/api/volumes/strata/{name}/download"), out)
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    std::fs::read(out).unwrap()
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// What the freestanding test guest expects on its disk (tests/tests/tier1_freestanding.rs):
/// its read pattern in sectors 0..63 and non-zero data in 128..143; plus random data further
/// on.
fn blkdrv_disk(len: usize) -> Vec<u8> {
    let mut d = vec![0u8; len];
    for (i, b) in d[..32768].iter_mut().enumerate() {
        let off = i as u64;
        *b = ((off.wrapping_mul(13)) ^ (off >> 9) ^ 0x5a) as u8;
    }
    d[128 * 512..144 * 512].fill(0xab);
    fastrand::Rng::with_seed(9).fill(&mut d[8 * MIB..24 * MIB]);
    d
}

fn a_vm_started_through_the_api_runs_on_a_volume_under_live_restore() {
    strata_testkit::require_kvm();
    let srv = Server::start();
    let c = srv.client();
    let import = srv.data.join("import");
    let data = blkdrv_disk(64 * MIB);
    let group = backed_up_volume(&c, &import, "src", &data);
    create_volume(&c, "dst", "64M");
    // Set up only: nothing is copied until the volume is opened.
    let id = start_job(
        &c,
        "/api/backups/restore",
        &json!({"snapshot": group, "target": "lv:strata/dst", "live": true, "copy": false}),
    );
    succeed(&c, &id);
    let v = volume(&c, "dst");
    assert_eq!(v["restore"]["mode"], "live", "{v}");
    assert_eq!(v["restore"]["state"], "stopped", "{v}");
    // A plain use that would take it for whole is refused; a second restore of another
    // snapshot onto it too while it is in use (below).
    let guest = import.join("blkdrv.bin");
    std::fs::write(&guest, blkdrv_image().unwrap()).unwrap();
    let r = c
        .request(
            "POST",
            "/api/vms",
            Some(
                &json!({"name": "g", "memory": "64M", "boot": "flat", "kernel": guest,
                         "disks": [{"source": "lv:strata/dst", "serial": "strata-live"}]}),
            ),
        )
        .unwrap();
    assert_eq!(r.status, 201, "{:?}", r.body);
    let r = c.request("POST", "/api/vms/g/start", None).unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    // The guest checks what it reads (the backed-up data, not the fresh volume's zeros),
    // writes, discards, zeroes, and powers off.
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        let r = c.request("GET", "/api/vms/g/status", None).unwrap();
        if r.body["state"] != "running" {
            break r.body;
        }
        assert!(
            Instant::now() < deadline,
            "the guest still runs: {:?}",
            r.body
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = c.request("GET", "/api/vms/g/console", None).unwrap().body;
    let text = log["data"].as_str().unwrap_or_default();
    assert!(text.contains("BLKTEST PASS"), "{status}\n{text}");
    // Starting the VM resumed the restore: a job copies the rest.
    wait_restored(&c, "dst");
    let got = download(&c, "dst", &srv.data.join("dst.raw"));
    let mut want = data.clone();
    for (i, b) in want[32768..65536].iter_mut().enumerate() {
        let o = 32768 + i as u64;
        *b = ((o.wrapping_mul(7)) ^ (o >> 11) ^ 0xc3) as u8;
    }
    want[65536..73728].fill(0);
    assert_eq!(
        first_difference(&got, &want),
        None,
        "the volume is not the backup plus the guest's writes"
    );
}

fn a_server_killed_during_a_live_restore_resumes_it_when_it_starts_again() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let srv = Server::start_on(&data_dir);
    let c = srv.client();
    let mut data = vec![0u8; 320 * MIB];
    fastrand::Rng::with_seed(3).fill(&mut data);
    let group = backed_up_volume(&c, &data_dir.join("import"), "src", &data);
    create_volume(&c, "dst", "320M");
    let id = start_job(
        &c,
        "/api/backups/restore",
        &json!({"snapshot": group, "target": "lv:strata/dst", "live": true, "workers": 1}),
    );
    // Kill -9 once about a third is copied (the map is written every 64 MiB at least).
    let deadline = Instant::now() + Duration::from_secs(120);
    let (done, total) = loop {
        let r = c.request("GET", &format!("/api/jobs/{id}"), None).unwrap();
        let done = r.body["bytes_done"].as_u64().unwrap_or(0);
        let total = r.body["bytes_total"].as_u64().unwrap_or(0);
        if total > 0 && done * 3 >= total {
            break (done, total);
        }
        assert!(Instant::now() < deadline, "{:?}", r.body);
        std::thread::sleep(Duration::from_millis(2));
    };
    let token = srv.token.clone();
    drop(c);
    drop(srv); // SIGKILL
    assert!(
        done < total,
        "the copy ended before the kill ({done} of {total}): the test proves nothing"
    );
    assert!(data_dir.join("restores/strata/dst.json").exists());
    // Started again, the server resumes the restore where it was, not from zero.
    let srv = Server::start_on(&data_dir);
    let c = srv.client_with(Some(&token));
    let jobs = c.request("GET", "/api/jobs", None).unwrap().body;
    let resumed = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| {
            j["kind"] == "restore"
                && j["id"] != id.as_str()
                && j["description"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("live restore"))
        })
        .unwrap_or_else(|| panic!("no job resumed the restore: {jobs}"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (st, _) = wait_job(&c, &resumed);
    assert_eq!(st["state"], "succeeded", "{st}");
    let fetched = st["result"]["bytes-fetched"]
        .as_u64()
        .unwrap_or_else(|| panic!("{st}"));
    eprintln!("killed at {done} of {total} bytes; the resumed restore fetched {fetched}");
    assert!(
        fetched > 0 && fetched < total,
        "the resumed restore fetched {fetched} of {total} bytes: not from where it was"
    );
    wait_restored(&c, "dst");
    let got = download(&c, "dst", &dir.path().join("dst.raw"));
    assert_eq!(first_difference(&got, &data), None);
}

fn restores_onto_volumes_are_checked_and_marked() {
    let srv = Server::start();
    let c = srv.client();
    let mut data = vec![0u8; 8 * MIB];
    fastrand::Rng::with_seed(5).fill(&mut data[..3 * MIB]);
    let group = backed_up_volume(&c, &srv.data.join("import"), "src", &data);
    create_volume(&c, "dst", "8M");
    create_volume(&c, "small", "4M");
    let bad = |body: Value, status: u16, needle: &str| {
        let r = c
            .request("POST", "/api/backups/restore", Some(&body))
            .unwrap();
        assert_eq!(r.status, status, "{body}: {:?}", r.body);
        let msg = r.body["message"].as_str().unwrap_or_default().to_string();
        assert!(msg.contains(needle), "{body}: {msg}");
    };
    bad(
        json!({"snapshot": group, "target": "image:x", "live": true}),
        400,
        "onto a volume",
    );
    bad(
        json!({"snapshot": group, "target": "lv:strata/dst", "copy": false}),
        400,
        "live",
    );
    bad(
        json!({"snapshot": group, "target": "lv:strata/dst", "workers": 0}),
        400,
        "workers",
    );
    bad(
        json!({"snapshot": group, "target": "lv:strata/small", "live": true}),
        400,
        "exactly",
    );
    bad(
        json!({"snapshot": group, "target": "lv:strata/../x", "live": true}),
        400,
        "",
    );
    // A plain restore onto a volume: marked while it runs, unmarked when it ends.
    let id = start_job(
        &c,
        "/api/backups/restore",
        &json!({"snapshot": group, "target": "lv:strata/dst", "workers": 2}),
    );
    succeed(&c, &id);
    assert!(volume(&c, "dst").get("restore").is_none());
    let got = download(&c, "dst", &srv.data.join("dst.raw"));
    assert_eq!(first_difference(&got, &data), None);
    // A plain restore that fails (a chunk gone) leaves the volume marked and refused.
    let chunks = srv.data.join("datastore/chunks");
    let mut removed = 0;
    for d in std::fs::read_dir(&chunks).unwrap().flatten() {
        for f in std::fs::read_dir(d.path()).unwrap().flatten() {
            std::fs::remove_file(f.path()).unwrap();
            removed += 1;
        }
    }
    assert!(removed > 0);
    let id = start_job(
        &c,
        "/api/backups/restore",
        &json!({"snapshot": group, "target": "lv:strata/dst"}),
    );
    let (st, _) = wait_job(&c, &id);
    assert_eq!(st["state"], "failed", "{st}");
    let v = volume(&c, "dst");
    assert_eq!(v["restore"]["mode"], "full", "{v}");
    assert_eq!(v["restore"]["state"], "stopped", "{v}");
    // Nothing may take it for whole: a backup of it is refused.
    let r = c
        .request(
            "POST",
            "/api/backups",
            Some(&json!({"source": "lv:strata/dst"})),
        )
        .unwrap();
    assert_eq!(r.status, 409, "{:?}", r.body);
    assert!(
        r.body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("unfinished restore"),
        "{:?}",
        r.body
    );
    // Removing the volume forgets the mark.
    let r = c
        .request("DELETE", "/api/volumes/strata/dst", None)
        .unwrap();
    assert_eq!(r.status, 204, "{:?}", r.body);
    assert!(!srv.data.join("restores/strata/dst.json").exists());
}

fn nbd_clients_read_and_write_a_volume_under_live_restore() {
    require_tool("qemu-io");
    require_tool("qemu-img");
    let e = CliEnv::new();
    e.ok(&["init", "--pv-size", "1G"]);
    let mut data = vec![0u8; 64 * MIB];
    let mut rng = fastrand::Rng::with_seed(17);
    rng.fill(&mut data[..20 * MIB]);
    rng.fill(&mut data[40 * MIB..50 * MIB]);
    let src = e.path("src.raw");
    std::fs::write(&src, &data).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    for v in ["src", "dst"] {
        e.ok(&["volumes", "create", "--size", "64M", &format!("strata/{v}")]);
    }
    e.ok(&[
        "image",
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        &s(&src),
        "lv:strata/src",
    ]);
    e.ok(&["backups", "create", "lv:strata/src"]);
    e.ok(&[
        "backups",
        "restore",
        "--live",
        "--no-wait",
        "volume/strata/src",
        "lv:strata/dst",
    ]);
    let list = e.json(&["volumes", "list"]);
    assert_eq!(
        common::lv(&list, "dst")["restore"]["mode"],
        "live",
        "{list}"
    );
    // Tools that open volumes themselves refuse it while it is not whole.
    let err = e.fails(&[
        "image",
        "convert",
        "-O",
        "raw",
        "lv:strata/dst",
        &s(&e.path("x.raw")),
    ]);
    assert!(err.contains("being restored"), "{err}");
    let err = e.fails(&[
        "backup",
        "create",
        "lv:strata/dst",
        "--store",
        &s(&e.path("ds2")),
    ]);
    assert!(err.contains("being restored"), "{err}");

    let sock = e.path("nbd.sock");
    let mut server = e
        .cmd(&["nbd", "serve", "lv:strata/dst", "--unix", &s(&sock)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "nbd serve did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///?socket={}", s(&sock));
    // Every byte read through the export is the backup's (fetched on demand or copied).
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &s(&src), &uri])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Writes: part of a chunk, a whole 4 MiB chunk, across a chunk boundary, at the end.
    let writes: [(usize, usize, u8); 4] = [
        (MIB + 512, 64 << 10, 0x5a),
        (28 * MIB, 4 * MIB, 0x33),
        (44 * MIB - 4096, 8192, 0x77),
        (64 * MIB - 65536, 65536, 0x11),
    ];
    let mut qio = Command::new("qemu-io");
    qio.args(["-f", "raw"]);
    for (off, len, p) in writes {
        qio.args(["-c", &format!("write -P {p} {off} {len}")]);
    }
    qio.args(["-c", "flush"]);
    for (off, len, p) in writes {
        qio.args(["-c", &format!("read -P {p} {off} {len}")]);
    }
    qio.arg(&uri);
    let out = qio.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("Pattern verification failed"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (off, len, p) in writes {
        data[off..off + len].fill(p);
    }
    // The export's workers finish the copy; then the volume is an ordinary one.
    let record = e.data().join("restores/strata/dst.json");
    let t0 = Instant::now();
    while record.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the copy did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = server.kill();
    let stderr = {
        let _ = server.wait();
        let mut s = String::new();
        if let Some(mut e) = server.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut s);
        }
        s
    };
    assert!(!stderr.contains("panicked"), "{stderr}");
    let out = e.path("dst.raw");
    e.ok(&["image", "convert", "-O", "raw", "lv:strata/dst", &s(&out)]);
    let got = std::fs::read(&out).unwrap();
    assert_eq!(
        first_difference(&got, &data),
        None,
        "the volume is not the backup plus the NBD client's writes"
    );
    let list = e.json(&["volumes", "list"]);
    assert!(common::lv(&list, "dst").get("restore").is_none(), "{list}");
}

strata_testkit::main!(
    a_vm_started_through_the_api_runs_on_a_volume_under_live_restore,
    a_server_killed_during_a_live_restore_resumes_it_when_it_starts_again,
    restores_onto_volumes_are_checked_and_marked,
    nbd_clients_read_and_write_a_volume_under_live_restore,
);

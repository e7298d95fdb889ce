//! What the API refuses, and how: bad requests before any job exists, uniform answers, space
//! reserved rather than checked, held volumes, slow clients and a bounded shutdown. Over real
//! HTTP(S) against `strata serve`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{files_in, start_job, succeed, wait_job, Server};
use serde_json::{json, Value};
use strata_api::client::Client;

fn post(c: &Client, path: &str, body: Value) -> (u16, Value) {
    let r = c.request("POST", path, Some(&body)).unwrap();
    (r.status, r.body)
}

fn jobs(c: &Client) -> usize {
    c.request("GET", "/api/jobs", None)
        .unwrap()
        .body
        .as_array()
        .unwrap()
        .len()
}

fn volume(c: &Client, name: &str, size: &str) {
    let (st, body) = post(
        c,
        "/api/volumes",
        json!({"vg": "strata", "name": name, "size": size, "pool": "data"}),
    );
    assert_eq!(st, 200, "{body}");
}

/// Every refused request answers 4xx with a JSON message, and no job is made for it.
fn bad_requests_are_refused_before_a_job_exists() {
    let srv = Server::start();
    let c = srv.client();
    volume(&c, "a", "64M");
    volume(&c, "small", "32M");
    std::fs::write(srv.data.join("import/disk.raw"), vec![1u8; 1 << 20]).unwrap();
    let src = srv.data.join("import/disk.raw").display().to_string();
    let backup = succeed(
        &c,
        &start_job(&c, "/api/backups", &json!({"source": "lv:strata/a"})),
    );
    let snapshot = backup["result"]["snapshot"].as_str().unwrap().to_string();
    let before = jobs(&c);
    let cases: Vec<(&str, Value, u16)> = vec![
        // Backup ids.
        (
            "/api/backups",
            json!({"source": "lv:strata/a", "id": "../x"}),
            400,
        ),
        (
            "/api/backups",
            json!({"source": "lv:strata/a", "id": "a//b"}),
            400,
        ),
        (
            "/api/backups",
            json!({"source": "lv:strata/a", "id": ".hidden"}),
            400,
        ),
        (
            "/api/backups/prune",
            json!({"ids": ["../x"], "keep_last": 1}),
            400,
        ),
        // Target sizes.
        (
            "/api/backups/restore",
            json!({"snapshot": snapshot, "target": "lv:strata/small"}),
            400,
        ),
        (
            "/api/convert",
            json!({"source": "lv:strata/a", "target": "lv:strata/small"}),
            400,
        ),
        // Format and option combinations.
        (
            "/api/convert",
            json!({"source": src, "target": "image:x.raw", "format": "raw",
                                "options": "cluster_size=65536"}),
            400,
        ),
        (
            "/api/convert",
            json!({"source": src, "target": "image:x.raw", "format": "raw",
                                "compress": true}),
            400,
        ),
        (
            "/api/convert",
            json!({"source": src, "target": "image:x.vmdk", "format": "vmdk",
                                "options": "subformat=twoGbMaxExtentSparse"}),
            400,
        ),
        (
            "/api/convert",
            json!({"source": src, "target": "image:x.vmdk", "format": "vmdk",
                                "options": "subformat=monolithicFlat", "compress": true}),
            400,
        ),
        (
            "/api/convert",
            json!({"source": src, "target": "image:x.qcow2", "format": "qcow2",
                                "options": "cluster_size=3"}),
            400,
        ),
        (
            "/api/convert",
            json!({"source": src, "target": "image:x.qcow2", "format": "qcow2",
                                "options": "backing_file=/etc/passwd"}),
            403,
        ),
        (
            "/api/convert",
            json!({"source": src, "target": "image:x.qcow2", "format": "qcow6"}),
            400,
        ),
        (
            "/api/convert",
            json!({"source": src, "target": "lv:strata/a", "format": "qcow2"}),
            400,
        ),
        (
            "/api/convert",
            json!({"source": src, "target": "image:x.raw", "source_format": "qcow9"}),
            400,
        ),
        (
            "/api/backups/restore",
            json!({"snapshot": snapshot, "target": "image:r.raw",
                                        "format": "vhdx2"}),
            400,
        ),
        (
            "/api/backups/restore",
            json!({"snapshot": snapshot, "target": "lv:strata/a",
                                        "format": "qcow2"}),
            400,
        ),
        // A volume converted onto itself.
        (
            "/api/convert",
            json!({"source": "lv:strata/a", "target": "lv:strata/a"}),
            409,
        ),
        // Sizes that overflow or exceed what the format holds.
        (
            "/api/images",
            json!({"name": "h.raw", "size": "99999999999999999999"}),
            400,
        ),
        ("/api/images", json!({"name": "h.raw", "size": "16E"}), 400),
        (
            "/api/images",
            json!({"name": "h.raw", "format": "raw", "size": "8E"}),
            400,
        ),
        (
            "/api/images",
            json!({"name": "h.qcow2", "format": "qcow2", "size": "8E"}),
            400,
        ),
        (
            "/api/images",
            json!({"name": "h.vmdk", "format": "vmdk", "size": "8E"}),
            400,
        ),
        (
            "/api/volumes",
            json!({"vg": "strata", "name": "h", "size": "16E", "pool": "data"}),
            400,
        ),
        // Larger than the group: no room (507), as for any full group.
        (
            "/api/volumes",
            json!({"vg": "strata", "name": "h", "size": "9E"}),
            507,
        ),
        (
            "/api/volumes/strata/a/resize",
            json!({"size": "18446744073709551615"}),
            400,
        ),
    ];
    for (path, body, want) in cases {
        let (st, reply) = post(&c, path, body.clone());
        assert_eq!(st, want, "{path} {body}: {reply}");
        assert!(
            reply["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{reply}"
        );
    }
    assert_eq!(jobs(&c), before, "a refused request made a job");
    assert!(
        files_in(&srv.data.join("images")).is_empty(),
        "a refused request left a file"
    );
}

/// Paths outside the import folders get one answer whether they exist or not; unknown routes
/// and methods get JSON bodies.
fn answers_are_uniform() {
    let srv = Server::start();
    let c = srv.client();
    let mut messages = Vec::new();
    for path in [
        "/etc/shadow",
        "/etc/no-such-file-here",
        "/root",
        "/nonexistent/dir/x",
    ] {
        let (st, body) = post(
            &c,
            "/api/convert",
            json!({"source": path, "target": "image:x.raw"}),
        );
        assert_eq!(st, 403, "{path}: {body}");
        messages.push(body["message"].as_str().unwrap().replace(path, "PATH"));
    }
    assert!(messages.windows(2).all(|w| w[0] == w[1]), "{messages:?}");
    let r = c.request("DELETE", "/api/health", None).unwrap();
    assert_eq!(r.status, 405, "{:?}", r.raw);
    assert_eq!(r.body["status"], 405);
    assert!(r.body["message"].as_str().unwrap().contains("DELETE"));
    let r = c.request("GET", "/api/no-such-route", None).unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(
        r.body["message"], "The API route /api/no-such-route not found",
        "{:?}",
        r.body
    );
    // A malformed path or query still answers in JSON.
    let r = c
        .request("GET", "/api/images/x/download?format=%ZZ", None)
        .unwrap();
    assert!(r.status >= 400 && r.status < 500, "{}", r.status);
    assert!(r.body["message"].is_string(), "{:?}", r.raw);
}

/// A volume name is refused at create exactly when a VM disk definition would refuse it.
fn volume_names_follow_one_rule() {
    let srv = Server::start();
    let c = srv.client();
    let kernel = srv.data.join("import/kernel");
    std::fs::write(&kernel, b"x").unwrap();
    let long = "a".repeat(101);
    for name in [
        "ok-1",
        ".dot",
        "a.b",
        "-dash",
        "a b",
        "x/y",
        "é",
        long.as_str(),
        "_tdata",
        "p_tmeta",
    ] {
        let (create, body) = post(
            &c,
            "/api/volumes",
            json!({"vg": "strata", "name": name, "size": "4M", "pool": "data"}),
        );
        let (define, vm) = post(
            &c,
            "/api/vms",
            json!({"name": "namecheck", "boot": "flat", "kernel": kernel,
                   "disks": [{"source": format!("lv:strata/{name}")}]}),
        );
        // A name create accepts is one a definition accepts (201), and one it refuses is
        // refused by both with 400.
        match create {
            200 => assert_eq!(define, 201, "{name}: {vm}"),
            400 => assert_eq!(define, 400, "{name}: create {body}, define {vm}"),
            other => panic!("{name}: create answered {other} {body}"),
        }
        if define == 201 {
            let r = c.request("DELETE", "/api/vms/namecheck", None).unwrap();
            assert_eq!(r.status, 204, "{:?}", r.body);
        }
    }
}

/// A volume opened by a download (as by a VM or a job) is held: no resize, no remove. Shrinking
/// needs the explicit flag.
fn held_volumes_are_not_resized_and_shrinking_needs_the_flag() {
    let srv = Server::start_with_args(&["--http"]);
    let c = srv.client();
    volume(&c, "held", "256M");
    // A client that asks for the volume's bytes and reads almost nothing holds it.
    let addr = srv.url.trim_start_matches("http://").to_string();
    let mut slow = TcpStream::connect(&addr).unwrap();
    write!(
        slow,
        "GET /api/volumes/strata/held/download HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        srv.token
    )
    .unwrap();
    let mut head = [0u8; 512];
    let _ = slow.read(&mut head).unwrap();
    let info = c.request("GET", "/api/volumes/strata/held", None).unwrap();
    assert_eq!(
        info.body["held_by"],
        json!(["a download"]),
        "{:?}",
        info.body
    );
    let (st, body) = post(
        &c,
        "/api/volumes/strata/held/resize",
        json!({"size": "512M"}),
    );
    assert_eq!(st, 409, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("a download"),
        "{body}"
    );
    let r = c
        .request("DELETE", "/api/volumes/strata/held", None)
        .unwrap();
    assert_eq!(r.status, 409, "{:?}", r.body);
    drop(slow);
    // The hold goes with the download.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (st, body) = post(
            &c,
            "/api/volumes/strata/held/resize",
            json!({"size": "512M"}),
        );
        if st == 200 {
            break;
        }
        assert_eq!(st, 409, "{body}");
        assert!(Instant::now() < deadline, "the hold outlived its download");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (st, body) = post(
        &c,
        "/api/volumes/strata/held/resize",
        json!({"size": "128M"}),
    );
    assert_eq!(st, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("shrink"),
        "{body}"
    );
    let (st, body) = post(
        &c,
        "/api/volumes/strata/held/resize",
        json!({"size": "128M", "shrink": true}),
    );
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["size"], 128u64 << 20);
    // The CLI asks for --shrink too.
    let remote = srv.remote_args();
    let mut args: Vec<&str> = remote.iter().map(String::as_str).collect();
    args.extend(["volumes", "resize", "--size", "64M", "strata/held"]);
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(&args)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("shrink"));
    args.insert(args.len() - 1, "--shrink");
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Preallocated images are made by a job that can be cancelled, leaving nothing behind.
fn preallocation_runs_as_a_cancellable_job() {
    let srv = Server::start();
    let c = srv.client();
    let (st, job) = post(
        &c,
        "/api/images",
        json!({"name": "big.raw", "format": "raw", "size": "3G", "options": "preallocation=full"}),
    );
    assert_eq!(st, 202, "{job}");
    let id = job["id"].as_str().unwrap();
    let r = c
        .request("DELETE", &format!("/api/jobs/{id}"), None)
        .unwrap();
    assert!(r.status == 200 || r.status == 409, "{:?}", r.body);
    let (end, _) = wait_job(&c, id);
    assert_eq!(end["state"], "cancelled", "{end}");
    assert!(files_in(&srv.data.join("images")).is_empty());
    for (name, format, options) in [
        ("small.raw", "raw", "preallocation=full"),
        ("small-f.raw", "raw", "preallocation=falloc"),
        ("small.qcow2", "qcow2", "preallocation=metadata"),
    ] {
        let (st, job) = post(
            &c,
            "/api/images",
            json!({"name": name, "format": format, "size": "8M", "options": options}),
        );
        assert_eq!(st, 202, "{job}");
        let end = succeed(&c, job["id"].as_str().unwrap());
        assert_eq!(end["result"]["format"], format, "{end}");
        let info = c
            .request("GET", &format!("/api/images/{name}"), None)
            .unwrap();
        assert_eq!(info.body["format"], format);
        if format == "raw" {
            assert!(
                info.body["actual_size"].as_u64().unwrap() >= 8 << 20,
                "{:?}",
                info.body
            );
        }
    }
    // Without preallocation the image is made at once.
    let (st, body) = post(&c, "/api/images", json!({"name": "now.raw", "size": "8M"}));
    assert_eq!(st, 200, "{body}");
}

/// Slow and greedy clients: unfinished headers, paused bodies, dribbled uploads past their
/// deadline, declared lengths over the limit.
fn slow_clients_are_bounded() {
    let srv = Server::start_with_args(&[
        "--http",
        "--header-timeout",
        "1s",
        "--body-idle-timeout",
        "1s",
        "--upload-deadline",
        "3s",
        "--max-upload",
        "1G",
    ]);
    let addr = srv.url.trim_start_matches("http://").to_string();
    let auth = format!("Authorization: Bearer {}\r\n", srv.token);
    let read_all = |s: &mut TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    // Headers never finished: the connection is closed.
    let t = Instant::now();
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /api/health HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let got = read_all(&mut s);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(!got.contains("200 OK"), "{got}");
    // A JSON body that stops: 408.
    let mut s = TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "POST /api/volumes HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"vg\":"
    )
    .unwrap();
    let got = read_all(&mut s);
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    // Declared lengths over the limit: 413 at once, before any body byte.
    for (path, len) in [
        ("/api/volumes", 2u64 << 20),
        ("/api/images/huge.raw/upload", 2 << 30),
    ] {
        let mut s = TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "{} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {len}\r\n\r\n",
            if path.ends_with("upload") {
                "PUT"
            } else {
                "POST"
            }
        )
        .unwrap();
        let got = read_all(&mut s);
        assert!(got.starts_with("HTTP/1.1 413"), "{path}: {got}");
    }
    // An upload that pauses, and one that dribbles past its deadline: 408, nothing left.
    for pause in [true, false] {
        let mut s = TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "PUT /api/images/slow.raw/upload?source_format=raw HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {}\r\n\r\n",
            64 << 20
        )
        .unwrap();
        let started = Instant::now();
        let chunk = vec![0u8; 64 << 10];
        if pause {
            s.write_all(&chunk).unwrap();
        } else {
            while started.elapsed() < Duration::from_secs(5) {
                if s.write_all(&chunk).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        }
        let got = read_all(&mut s);
        assert!(got.starts_with("HTTP/1.1 408"), "pause={pause}: {got}");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(files_in(&srv.data.join("scratch")).is_empty());
    assert!(files_in(&srv.data.join("images")).is_empty());
    let c = srv.client();
    assert_eq!(c.request("GET", "/api/health", None).unwrap().status, 200);
}

/// Two uploads that each fit the free space but not together: the second gets 507 at once,
/// because the first reserved its bytes. On a small file system of its own (tmpfs, as root).
fn space_is_reserved_not_only_checked() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("fs");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=320M", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        strata_testkit::missing("mounting a tmpfs (needs root)");
    }
    let _unmount = Unmount(mnt.clone());
    let data = mnt.join("data");
    let srv = Server::start_with(&data, &["--http"]);
    let addr = srv.url.trim_start_matches("http://").to_string();
    let upload = |name: &str| {
        let mut s = TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "PUT /api/images/{name}/upload?source_format=raw HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n",
            srv.token,
            200u64 << 20
        )
        .unwrap();
        s
    };
    // The first upload starts and sends a little.
    let mut first = upload("one.raw");
    first.write_all(&vec![7u8; 1 << 20]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // The second one would fit on its own: it is refused at once.
    let mut second = upload("two.raw");
    second
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = vec![0u8; 4096];
    let n = second.read(&mut got).unwrap();
    let got = String::from_utf8_lossy(&got[..n]);
    assert!(got.starts_with("HTTP/1.1 507"), "{got}");
    // The first one goes on. Its conversion needs room for the data besides the upload, which
    // this small file system has not got: that is refused too (507), and the upload removed.
    let rest = vec![7u8; 1 << 20];
    for _ in 1..200 {
        first.write_all(&rest).unwrap();
    }
    first
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reply = vec![0u8; 4096];
    let n = first.read(&mut reply).unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]).into_owned();
    let c = srv.client();
    if reply.starts_with("HTTP/1.1 202") {
        let body: Value = serde_json::from_str(reply.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        succeed(&c, body["id"].as_str().unwrap());
    } else {
        assert!(reply.starts_with("HTTP/1.1 507"), "{reply}");
    }
    // Its upload is gone and its reservation released: another upload fits now.
    assert!(files_in(&data.join("scratch")).is_empty());
    let tmp = dir.path().join("small.raw");
    std::fs::write(&tmp, vec![3u8; 8 << 20]).unwrap();
    let r = c
        .upload_file(
            "/api/images/three.raw/upload?source_format=raw&format=raw",
            &tmp,
        )
        .unwrap();
    assert_eq!(r.status, 202, "{:?}", r.body);
    succeed(&c, r.body["id"].as_str().unwrap());
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// SIGTERM while a job writes: the server ends within seconds, the job is cancelled and what
/// it half-made is removed.
fn sigterm_stops_the_server_promptly_while_jobs_write() {
    let mut srv = Server::start();
    let c = srv.client();
    let token = srv.token.clone();
    let (st, job) = post(
        &c,
        "/api/images",
        json!({"name": "slow.raw", "size": "4G", "options": "preallocation=full"}),
    );
    assert_eq!(st, 202, "{job}");
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let code = srv.terminate(Duration::from_secs(30));
    let took = t.elapsed();
    assert!(code.is_some(), "the server did not stop within 30 s");
    assert!(took < Duration::from_secs(10), "stopping took {took:?}");
    let left: Vec<String> = files_in(&srv.data.join("images"))
        .into_iter()
        .chain(files_in(&srv.data.join("scratch")))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    // A new server knows the job ended.
    let data = srv.data.clone();
    let srv = Server::start_on(&data);
    let c = srv.client_with(Some(&token));
    let id = job["id"].as_str().unwrap();
    let r = c.request("GET", &format!("/api/jobs/{id}"), None).unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_ne!(r.body["state"], "running", "{:?}", r.body);
    assert_ne!(r.body["state"], "succeeded", "{:?}", r.body);
}

strata_testkit::main!(
    bad_requests_are_refused_before_a_job_exists,
    answers_are_uniform,
    volume_names_follow_one_rule,
    held_volumes_are_not_resized_and_shrinking_needs_the_flag,
    preallocation_runs_as_a_cancellable_job,
    slow_clients_are_bounded,
    space_is_reserved_not_only_checked,
    sigterm_stops_the_server_promptly_while_jobs_write,
);

//! The whole API under a hostile client: a few hundred bounded requests from several threads
//! at once, mixing malformed bodies, traversal names, huge and negative sizes, slow and
//! abandoned uploads, bad tokens and routes, and concurrent create/resize/remove of the same
//! volumes. Afterwards the server is healthy, no answer was a server error (5xx), every error
//! answer was a JSON error body, and a volume and a backup made before read back with the same
//! checksums.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{files_in, start_job, succeed, wait_job, Server};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use strata_api::client::Client;

/// Requests each hostile thread makes.
const REQUESTS_PER_THREAD: usize = 60;
/// Hostile threads.
const THREADS: usize = 6;

fn sha(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn download(c: &Client, path: &str) -> Vec<u8> {
    let r = c.send("GET", path, Vec::new(), false).unwrap();
    assert_eq!(r.status, 200, "{path}: {}", String::from_utf8_lossy(&r.raw));
    r.raw
}

fn pick<'a>(rng: &mut fastrand::Rng, options: &[&'a str]) -> &'a str {
    options[rng.usize(..options.len())]
}

/// One hostile request, chosen by `rng`; returns what was asked and the status.
fn hostile_request(c: &Client, rng: &mut fastrand::Rng, thread: usize) -> (String, u16, Value) {
    let names = [
        "../etc/passwd",
        "..%2F..%2Fetc%2Fshadow",
        "%2e%2e",
        "a%00b",
        "x/y",
        ".hidden",
        "-rf",
        "ok-name",
        "v1",
        "shared",
        "é",
        "%FF%FE",
    ];
    let long = "n".repeat(300);
    let name = if rng.u8(..10) == 0 {
        long.as_str()
    } else {
        names[rng.usize(..names.len())]
    };
    let sizes = [
        "99999999999999999999999",
        "-1",
        "0",
        "1e30",
        "16E",
        "18446744073709551615",
        "8E",
        "4M",
        "64M",
        "nan",
        "1.5",
        "",
    ];
    let size = sizes[rng.usize(..sizes.len())];
    let vol = format!("shared{}", rng.u8(..3));
    let (method, path, body): (&str, String, Option<Vec<u8>>) = match rng.u8(..22) {
        0 => ("POST", "/api/volumes".into(), Some(b"{not json".to_vec())),
        1 => ("POST", "/api/volumes".into(), Some(vec![0xff, 0xfe, 0x00, 0x7b])),
        2 => (
            "POST",
            "/api/volumes".into(),
            Some(format!("{}1{}", "[".repeat(5000), "]".repeat(5000)).into_bytes()),
        ),
        3 => (
            "POST",
            "/api/volumes".into(),
            Some(json!({"vg": "strata", "name": name, "size": size, "pool": "data"}).to_string().into_bytes()),
        ),
        4 | 5 => (
            "POST",
            "/api/volumes".into(),
            Some(json!({"vg": "strata", "name": vol, "size": "16M", "pool": "data"}).to_string().into_bytes()),
        ),
        6 | 7 => (
            "POST",
            format!("/api/volumes/strata/{vol}/resize"),
            Some(json!({"size": pick(rng, &["8M", "32M", "64M", size]),
                        "shrink": rng.bool()}).to_string().into_bytes()),
        ),
        8 => ("DELETE", format!("/api/volumes/strata/{vol}"), None),
        9 => (
            "POST",
            "/api/images".into(),
            Some(json!({"name": name, "size": size, "format": pick(rng, &["raw", "qcow2", "vmdk", "vhd9"]),
                        "options": pick(rng, &["", "cluster_size=1", "preallocation=full", "backing_file=/etc/passwd",
                                    "subformat=monolithicFlat", "a=b,a=c"])})
                .to_string()
                .into_bytes()),
        ),
        10 => ("GET", format!("/api/images/{name}/download?format=qcow2"), None),
        11 => (
            "POST",
            "/api/convert".into(),
            Some(json!({"source": pick(rng, &["/etc/shadow", "image:../x", "lv:strata/../v1", "lv:strata/v1",
                                   "/proc/self/mem", "image:nope"]),
                        "target": pick(rng, &["image:../../x", "lv:strata/v1", "image:new", "/tmp/x", "lv:other/v"]),
                        "format": pick(rng, &["raw", "qcow2", "bogus"])})
                .to_string()
                .into_bytes()),
        ),
        12 => (
            "POST",
            "/api/backups/restore".into(),
            Some(json!({"snapshot": pick(rng, &["../../x", "volume/strata/v1", "nope/2020-01-01T00:00:00Z"]),
                        "target": pick(rng, &["lv:strata/v1", "image:../r", "lv:strata/shared0"])})
                .to_string()
                .into_bytes()),
        ),
        13 => (
            "POST",
            "/api/backups".into(),
            Some(json!({"source": "lv:strata/v1", "id": pick(rng, &["../x", "a/../b", ".x", "ok/id"])})
                .to_string()
                .into_bytes()),
        ),
        14 => ("DELETE", format!("/api/jobs/job-{}-zz", rng.u32(..)), None),
        15 => ("GET", format!("/api/{}", name), None),
        16 => ("PATCH", "/api/volumes".into(), None),
        17 => ("GET", "/api/volumes".into(), None),
        18 => (
            "POST",
            "/api/vms".into(),
            Some(json!({"name": name, "kernel": "/etc/passwd", "memory": size,
                        "disks": [{"source": format!("lv:strata/{vol}")}]})
                .to_string()
                .into_bytes()),
        ),
        19 => ("POST", "/api/images/x/adopt".into(), Some(b"{\"format\":\"raw\"}".to_vec())),
        20 => ("GET", "/api/jobs".into(), None),
        _ => (
            "POST",
            "/api/backups/prune".into(),
            Some(json!({"ids": [name], "keep_last": 1, "dry_run": true}).to_string().into_bytes()),
        ),
    };
    let json_body = body.is_some();
    let r = c
        .send(method, &path, body.unwrap_or_default(), json_body)
        .unwrap_or_else(|e| panic!("thread {thread}: {method} {path}: {e}"));
    (format!("{method} {path}"), r.status, r.body)
}

/// An upload that declares more than it sends and then stalls; the server drops it.
fn abandoned_upload(addr: &str, token: &str, name: &str) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return;
    };
    let _ = write!(
        s,
        "PUT /api/images/{name}/upload?source_format=raw HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n",
        256u64 << 20
    );
    let _ = s.write_all(&[0u8; 1 << 16]);
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.is_empty() || !text.starts_with("HTTP/1.1 5"),
        "a stalled upload got {text}"
    );
}

#[test]
fn the_api_survives_a_hostile_client() {
    let srv = Server::start_with_args(&[
        "--http",
        "--body-idle-timeout",
        "2s",
        "--header-timeout",
        "2s",
    ]);
    let c = srv.client();
    // Before: a volume with data, and its backup.
    let data: Vec<u8> = {
        let mut rng = fastrand::Rng::with_seed(7);
        (0..(8 << 20)).map(|_| rng.u8(..)).collect()
    };
    std::fs::write(srv.data.join("import/seed.raw"), &data).unwrap();
    let r = c
        .request(
            "POST",
            "/api/volumes",
            Some(&json!({"vg": "strata", "name": "v1", "size": "8M", "pool": "data"})),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let seed = srv.data.join("import/seed.raw").display().to_string();
    succeed(
        &c,
        &start_job(
            &c,
            "/api/convert",
            &json!({"source": seed, "target": "lv:strata/v1", "source_format": "raw"}),
        ),
    );
    let volume_sha = sha(&download(&c, "/api/volumes/strata/v1/download"));
    assert_eq!(volume_sha, sha(&data));
    let backup = succeed(
        &c,
        &start_job(&c, "/api/backups", &json!({"source": "lv:strata/v1"})),
    );
    let snapshot = backup["result"]["snapshot"].as_str().unwrap().to_string();

    // The attack.
    let addr = srv.url.trim_start_matches("http://").to_string();
    let started = Instant::now();
    let outcomes: Vec<Vec<(String, u16, Value)>> = std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for t in 0..THREADS {
            let (url, token) = (srv.url.clone(), srv.token.clone());
            let addr = addr.clone();
            handles.push(scope.spawn(move || {
                let c = Client::new(&url, Some(token.clone())).unwrap();
                let bad = Client::new(&url, Some("0000.bogus".into())).unwrap();
                let mut rng = fastrand::Rng::with_seed(1000 + t as u64);
                let mut seen = Vec::new();
                for i in 0..REQUESTS_PER_THREAD {
                    if i % 20 == 7 {
                        abandoned_upload(&addr, &token, &format!("stall{t}-{i}"));
                        continue;
                    }
                    let client = if rng.u8(..12) == 0 { &bad } else { &c };
                    seen.push(hostile_request(client, &mut rng, t));
                }
                seen
            }));
        }
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let all: Vec<(String, u16, Value)> = outcomes.into_iter().flatten().collect();
    let mut by_status = std::collections::BTreeMap::new();
    for (_, st, _) in &all {
        *by_status.entry(*st).or_insert(0) += 1;
    }
    eprintln!(
        "{} hostile requests in {:.1} s; answers by status: {by_status:?}",
        all.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(all.len() >= 300, "{}", all.len());
    for (what, status, body) in &all {
        assert!(*status < 500, "{what} answered {status}: {body}");
        if *status >= 400 {
            assert!(
                body["message"].as_str().is_some_and(|m| !m.is_empty())
                    && body["status"].as_u64() == Some(u64::from(*status)),
                "{what} answered {status} without a JSON error body: {body}"
            );
        }
    }

    // After: healthy, jobs ended, nothing left over, the old data intact.
    assert_eq!(c.request("GET", "/api/health", None).unwrap().status, 200);
    let listed = c.request("GET", "/api/jobs", None).unwrap();
    for j in listed.body.as_array().unwrap() {
        let id = j["id"].as_str().unwrap();
        let (end, _) = wait_job(&c, id);
        assert_ne!(end["state"], "running");
    }
    assert!(files_in(&srv.data.join("scratch")).is_empty());
    assert_eq!(
        sha(&download(&c, "/api/volumes/strata/v1/download")),
        volume_sha
    );
    let id = start_job(
        &c,
        "/api/backups/restore",
        &json!({"snapshot": snapshot, "target": "image:after.raw"}),
    );
    succeed(&c, &id);
    assert_eq!(
        sha(&download(&c, "/api/images/after.raw/download")),
        volume_sha
    );
    let check = c
        .request("POST", "/api/storage/strata/check", None)
        .unwrap();
    assert_eq!(check.status, 200, "{:?}", check.body);
    assert_eq!(check.body["clean"], true, "{:?}", check.body);
    let verify = succeed(&c, &start_job(&c, "/api/backups/verify", &json!({})));
    assert_eq!(verify["state"], "succeeded");
}

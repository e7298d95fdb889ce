//! End-to-end tests of the HTTP API over real HTTP on loopback.

mod common;

use common::Server;
use serde_json::json;

#[test]
fn health_needs_no_token_and_everything_else_does() {
    let srv = Server::start();
    let anon = srv.client_with(None);
    let r = anon.request("GET", "/api/health", None).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body["status"], "ok");

    let doc = srv
        .client()
        .request("GET", "/api/openapi.json", None)
        .unwrap();
    assert_eq!(doc.status, 200, "{:?}", doc.body);
    let paths = doc.body["paths"]
        .as_object()
        .expect("paths in the OpenAPI document");
    assert!(paths.len() >= 8, "too few routes documented: {paths:?}");
    let wrong = srv.client_with(Some("deadbeef.0000"));
    let mut checked = 0;
    for (path, ops) in paths {
        let concrete = path
            .replace("{id}", "x")
            .replace("{name}", "x")
            .replace("{vg}", "x");
        for method in ops.as_object().unwrap().keys() {
            let m = method.to_uppercase();
            for client in [&anon, &wrong] {
                let r = client.request(&m, &concrete, Some(&json!({}))).unwrap();
                if path == "/api/health" {
                    assert_eq!(r.status, 200);
                } else {
                    assert_eq!(
                        r.status, 401,
                        "{m} {concrete} answered {} without a valid token",
                        r.status
                    );
                    assert_eq!(r.body["kind"], "unauthorized");
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 16);
}

#[test]
fn images_are_created_and_removed_with_validated_names() {
    let srv = Server::start();
    let c = srv.client();
    let r = c
        .request(
            "POST",
            "/api/images",
            Some(&json!({"name": "disk0.img", "size": "16M"})),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["virtual_size"], 16 << 20);
    let r = c
        .request(
            "POST",
            "/api/images",
            Some(&json!({"name": "disk0.img", "size": "16M"})),
        )
        .unwrap();
    assert_eq!(
        r.status, 409,
        "a second create of the same name must conflict: {:?}",
        r.body
    );
    for bad in ["../escape", "a/b", "..", ".hidden", &"x".repeat(200)] {
        let r = c
            .request(
                "POST",
                "/api/images",
                Some(&json!({"name": bad, "size": "1M"})),
            )
            .unwrap();
        assert_eq!(r.status, 400, "name {bad:?} accepted: {:?}", r.body);
    }
    let r = c
        .request("GET", "/api/images/..%2F..%2Fetc%2Fpasswd", None)
        .unwrap();
    assert!(
        r.status == 400 || r.status == 404,
        "traversal through the path: {}",
        r.status
    );
    let r = c
        .request(
            "POST",
            "/api/images",
            Some(&json!({"name": "z.img", "size": "zero"})),
        )
        .unwrap();
    assert_eq!(r.status, 400);
    let r = c.request("GET", "/api/images", None).unwrap();
    assert_eq!(r.body.as_array().unwrap().len(), 1);
    let r = c.request("DELETE", "/api/images/disk0.img", None).unwrap();
    assert_eq!(r.status, 204);
    let r = c.request("GET", "/api/images/disk0.img", None).unwrap();
    assert_eq!(r.status, 404);
}

#[test]
fn malformed_and_oversized_bodies_are_refused() {
    let srv = Server::start();
    let c = srv.client();
    let r = c
        .send("POST", "/api/images", b"{not json".to_vec(), true)
        .unwrap();
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.body["kind"], "bad-request");
    let huge = format!(
        "{{\"name\": \"{}\", \"size\": \"1M\"}}",
        "a".repeat(3 << 20)
    );
    let r = c
        .send("POST", "/api/images", huge.into_bytes(), true)
        .unwrap();
    assert_eq!(r.status, 413, "{:?}", r.body);
    let r = c.request("GET", "/api/no/such/route", None).unwrap();
    assert_eq!(r.status, 404);
}

#[test]
fn tokens_can_be_created_used_and_revoked() {
    let srv = Server::start();
    let c = srv.client();
    let r = c
        .request("POST", "/api/tokens", Some(&json!({"name": "ci"})))
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["admin"], false, "{:?}", r.body);
    let token = r.body["token"].as_str().unwrap().to_string();
    let ci = srv.client_with(Some(&token));
    assert_eq!(ci.request("GET", "/api/images", None).unwrap().status, 200);
    // A token that is not an admin token cannot mint tokens, list them or revoke others.
    for (method, path, body) in [
        ("POST", "/api/tokens", Some(json!({"name": "spare"}))),
        (
            "POST",
            "/api/tokens",
            Some(json!({"name": "spare", "admin": true})),
        ),
        ("GET", "/api/tokens", None),
        ("DELETE", "/api/tokens/admin", None),
    ] {
        let r = ci.request(method, path, body.as_ref()).unwrap();
        assert_eq!(r.status, 403, "{method} {path}: {:?}", r.body);
        assert_eq!(r.body["kind"], "forbidden");
    }
    assert_eq!(c.request("GET", "/api/images", None).unwrap().status, 200);
    // An admin token can make another admin token.
    let r = c
        .request(
            "POST",
            "/api/tokens",
            Some(&json!({"name": "ops", "admin": true})),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let ops = srv.client_with(r.body["token"].as_str());
    assert_eq!(ops.request("GET", "/api/tokens", None).unwrap().status, 200);
    let listed = c.request("GET", "/api/tokens", None).unwrap();
    assert!(!String::from_utf8_lossy(&listed.raw).contains(token.split_once('.').unwrap().1));
    assert_eq!(
        c.request("DELETE", "/api/tokens/ci", None).unwrap().status,
        200
    );
    assert_eq!(ci.request("GET", "/api/images", None).unwrap().status, 401);
}

#[test]
fn concurrent_creates_and_removes_leave_consistent_state() {
    let srv = Server::start();
    let url = srv.url.clone();
    let token = srv.token.clone();
    let trust = srv.trust();
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let (url, token, trust) = (url.clone(), token.clone(), trust.clone());
            std::thread::spawn(move || {
                let c = strata_api::client::Client::with_trust(&url, Some(token), trust).unwrap();
                let name = format!("img{}", i % 5);
                let r = c
                    .request(
                        "POST",
                        "/api/images",
                        Some(&json!({"name": name, "size": "1M"})),
                    )
                    .unwrap();
                assert!(r.status == 200 || r.status == 409, "{:?}", r.body);
                if i % 2 == 0 {
                    let r = c
                        .request("DELETE", &format!("/api/images/{name}"), None)
                        .unwrap();
                    assert!(r.status == 204 || r.status == 404, "{:?}", r.body);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let c = srv.client();
    let listed = c.request("GET", "/api/images", None).unwrap();
    let names: Vec<String> = listed
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect();
    let on_disk: std::collections::BTreeSet<String> = std::fs::read_dir(srv.data.join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names
            .iter()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        on_disk
    );
    for n in &names {
        assert_eq!(
            c.request("GET", &format!("/api/images/{n}"), None)
                .unwrap()
                .status,
            200
        );
    }
}

#[test]
fn the_embedded_default_serves_volumes_snapshots_and_clones() {
    let srv = Server::start();
    let c = srv.client();
    let st = c.request("GET", "/api/storage", None).unwrap();
    assert_eq!(st.status, 200, "{:?}", st.body);
    assert_eq!(st.body[0]["group"]["name"], "strata", "{:?}", st.body);
    assert_eq!(st.body[0]["pools"][0]["name"], "data");

    let r = c
        .request(
            "POST",
            "/api/volumes",
            Some(&json!({"vg": "strata", "name": "vm-100-disk-0", "size": "1G", "pool": "data"})),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["source"], "lv:strata/vm-100-disk-0");
    // Overcommit is allowed: a volume far larger than the 4 GiB pool.
    let r = c
        .request(
            "POST",
            "/api/volumes",
            Some(&json!({"vg": "strata", "name": "huge", "size": "1T", "pool": "data"})),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = c
        .request(
            "POST",
            "/api/volumes/strata/vm-100-disk-0/snapshot",
            Some(&json!({"name": "snap1"})),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = c
        .request(
            "POST",
            "/api/volumes/strata/snap1/clone",
            Some(&json!({"name": "vm-101-disk-0"})),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = c
        .request(
            "POST",
            "/api/volumes/strata/vm-101-disk-0/resize",
            Some(&json!({"size": "2G"})),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["size"], 2u64 << 30);
    let r = c.request("GET", "/api/volumes", None).unwrap();
    let names: Vec<&str> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    for n in ["vm-100-disk-0", "huge", "snap1", "vm-101-disk-0"] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    // Removing the origin leaves the snapshot and the clone.
    assert_eq!(
        c.request("DELETE", "/api/volumes/strata/vm-100-disk-0", None)
            .unwrap()
            .status,
        204
    );
    assert_eq!(
        c.request("GET", "/api/volumes/strata/snap1", None)
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        c.request("GET", "/api/volumes/strata/vm-100-disk-0", None)
            .unwrap()
            .status,
        404
    );
    // Bad names and unknown groups.
    let r = c
        .request(
            "POST",
            "/api/volumes",
            Some(&json!({"vg": "strata", "name": "../x", "size": "1G", "pool": "data"})),
        )
        .unwrap();
    assert_eq!(r.status, 400, "{:?}", r.body);
    let r = c
        .request(
            "POST",
            "/api/volumes",
            Some(&json!({"vg": "nope", "name": "x", "size": "1G"})),
        )
        .unwrap();
    assert_eq!(r.status, 404, "{:?}", r.body);
    let r = c
        .request(
            "POST",
            "/api/volumes",
            Some(&json!({"vg": "strata", "name": "snap1", "size": "1G", "pool": "data"})),
        )
        .unwrap();
    assert_eq!(r.status, 409, "{:?}", r.body);
}

#[test]
fn concurrent_volume_creates_snapshots_and_removes_leave_consistent_metadata() {
    let srv = Server::start();
    let (url, token, trust) = (srv.url.clone(), srv.token.clone(), srv.trust());
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let (url, token, trust) = (url.clone(), token.clone(), trust.clone());
            std::thread::spawn(move || {
                let c = strata_api::client::Client::with_trust(&url, Some(token), trust).unwrap();
                let name = format!("v{}", i % 7);
                let r = c
                    .request(
                        "POST",
                        "/api/volumes",
                        Some(&json!({"vg": "strata", "name": name, "size": "64M", "pool": "data"})),
                    )
                    .unwrap();
                assert!(r.status == 200 || r.status == 409, "create: {:?}", r.body);
                let r = c
                    .request(
                        "POST",
                        &format!("/api/volumes/strata/{name}/snapshot"),
                        Some(&json!({"name": format!("s{i}")})),
                    )
                    .unwrap();
                assert!(r.status == 200 || r.status == 404, "snapshot: {:?}", r.body);
                if i % 3 == 0 {
                    let r = c
                        .request("DELETE", &format!("/api/volumes/strata/{name}"), None)
                        .unwrap();
                    assert!(r.status == 204 || r.status == 404, "remove: {:?}", r.body);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let c = srv.client();
    let check = c
        .request("POST", "/api/storage/strata/check", None)
        .unwrap();
    assert_eq!(check.status, 200, "{:?}", check.body);
    assert_eq!(check.body["clean"], true, "{:?}", check.body);
    let listed = c.request("GET", "/api/volumes", None).unwrap();
    for v in listed.body.as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        assert_eq!(
            c.request("GET", &format!("/api/volumes/strata/{name}"), None)
                .unwrap()
                .status,
            200
        );
    }
}

#[test]
fn a_volume_larger_than_the_free_space_gets_507() {
    let srv = Server::start();
    let c = srv.client();
    // A linear volume needs its extents now: the 4 GiB group cannot hold 100 GiB.
    let r = c
        .request(
            "POST",
            "/api/volumes",
            Some(&json!({"vg": "strata", "name": "big", "size": "100G"})),
        )
        .unwrap();
    assert_eq!(r.status, 507, "{:?}", r.body);
    assert_eq!(r.body["kind"], "out-of-space", "{:?}", r.body);
    // Nothing was made, and the group still serves requests.
    let r = c.request("GET", "/api/volumes/strata/big", None).unwrap();
    assert_eq!(r.status, 404, "{:?}", r.body);
    let r = c
        .request(
            "POST",
            "/api/volumes",
            Some(&json!({"vg": "strata", "name": "small", "size": "64M", "pool": "data"})),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
}

#[test]
fn a_second_server_on_the_same_data_directory_is_refused() {
    let srv = Server::start();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args([
            "--data",
            srv.data.to_str().unwrap(),
            "serve",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Another strata serve"), "{err}");
    // The first one is unaffected.
    let r = srv.client().request("GET", "/api/volumes", None).unwrap();
    assert_eq!(r.status, 200);
}

/// Server paths in requests (import sources, kernels) are confined to the import folders, links
/// included, and nothing made through the API may read another file by a backing file.
#[test]
fn server_paths_are_confined_to_the_import_folders() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let extra = dir.path().join("extra");
    std::fs::create_dir(&extra).unwrap();
    let srv = Server::start_with(&data, &["--import-dir", extra.to_str().unwrap()]);
    let c = srv.client();
    let secret = dir.path().join("secret.raw");
    std::fs::write(&secret, vec![0x5au8; 1 << 20]).unwrap();
    let import = data.join("import");
    std::os::unix::fs::symlink(&secret, import.join("link.raw")).unwrap();
    std::fs::write(import.join("ok.raw"), vec![1u8; 1 << 20]).unwrap();
    std::fs::write(extra.join("also-ok.raw"), vec![2u8; 1 << 20]).unwrap();
    let backed = import.join("backed.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&secret)
        .arg(&backed)
        .output();
    let have_qemu_img = made.is_ok_and(|o| o.status.success());

    let convert = |source: &std::path::Path, target: &str| {
        c.request(
            "POST",
            "/api/convert",
            Some(&json!({"source": source.to_str().unwrap(), "target": target, "format": "raw"})),
        )
        .unwrap()
    };
    let mut refused = vec![
        secret.clone(),
        import.join("link.raw"),
        import.join("../../secret.raw"),
    ];
    if have_qemu_img {
        refused.push(backed.clone());
    } else {
        strata_testkit::partial_skip("qemu-img is missing: the backing-file source is not tried");
    }
    for (i, path) in refused.iter().enumerate() {
        let r = convert(path, &format!("image:stolen{i}.raw"));
        assert_eq!(r.status, 403, "{}: {:?}", path.display(), r.body);
        assert_eq!(r.body["kind"], "forbidden", "{:?}", r.body);
    }
    for (path, target) in [
        (import.join("ok.raw"), "image:a.raw"),
        (extra.join("also-ok.raw"), "image:b.raw"),
    ] {
        let r = convert(&path, target);
        assert!(
            r.status == 200 || r.status == 202,
            "{}: {:?}",
            path.display(),
            r.body
        );
    }
    // Nothing made through the API may name a backing or data file.
    for (route, body) in [
        (
            "/api/images",
            json!({"name": "x.qcow2", "size": "1M", "format": "qcow2",
                   "options": format!("backing_file={},backing_fmt=raw", secret.display())}),
        ),
        (
            "/api/convert",
            json!({"source": import.join("ok.raw").to_str().unwrap(), "target": "image:y.qcow2",
                   "format": "qcow2",
                   "options": format!("backing_file={},backing_fmt=raw", secret.display())}),
        ),
    ] {
        let r = c.request("POST", route, Some(&body)).unwrap();
        assert_eq!(r.status, 403, "{route}: {:?}", r.body);
    }
    // A VM kernel outside the import folders is refused too.
    let r = c
        .request(
            "POST",
            "/api/vms",
            Some(&json!({"name": "v", "kernel": secret.to_str().unwrap()})),
        )
        .unwrap();
    assert_eq!(r.status, 403, "{:?}", r.body);
    let listed = c.request("GET", "/api/images", None).unwrap();
    let names: Vec<&str> = listed
        .body
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| !n.starts_with("stolen") && *n != "x.qcow2" && *n != "y.qcow2"),
        "{names:?}"
    );
}

/// A preallocated image larger than the free space is refused before anything is written.
#[test]
fn a_preallocated_image_larger_than_the_free_space_gets_507() {
    let srv = Server::start();
    let c = srv.client();
    for prealloc in ["full", "falloc"] {
        let r = c
            .request(
                "POST",
                "/api/images",
                Some(&json!({"name": "big.raw", "format": "raw", "size": "900T",
                             "options": format!("preallocation={prealloc}")})),
            )
            .unwrap();
        assert_eq!(r.status, 507, "{prealloc}: {:?}", r.body);
    }
    let listed = c.request("GET", "/api/images", None).unwrap();
    assert_eq!(
        listed.body.as_array().map(Vec::len),
        Some(0),
        "{:?}",
        listed.body
    );
}

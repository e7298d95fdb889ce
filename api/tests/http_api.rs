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
    let token = r.body["token"].as_str().unwrap().to_string();
    let ci = srv.client_with(Some(&token));
    assert_eq!(ci.request("GET", "/api/images", None).unwrap().status, 200);
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
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let (url, token) = (url.clone(), token.clone());
            std::thread::spawn(move || {
                let c = strata_api::client::Client::new(&url, Some(token)).unwrap();
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

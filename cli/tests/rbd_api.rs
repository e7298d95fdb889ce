//! Volume groups on Ceph RBD through the HTTP API, against the test cluster
//! (scripts/ceph-cluster.sh): adding a group (admin only, its files confined to the import
//! folders), volumes made, written, snapshotted, cloned, backed up incrementally and restored
//! with the same requests as on a local group, and the group removed once empty.

mod common;

use common::{start_job, succeed, Server};
use serde_json::{json, Value};
use strata_api::client::Client;
use strata_tests::ceph::{cluster, unique};

fn post(c: &Client, path: &str, body: Value) -> (u16, Value) {
    let r = c.request("POST", path, Some(&body)).unwrap();
    (r.status, r.body)
}

fn download(c: &Client, path: &str) -> Vec<u8> {
    let r = c.send("GET", path, Vec::new(), false).unwrap();
    assert_eq!(r.status, 200, "{path}: {}", String::from_utf8_lossy(&r.raw));
    r.raw
}

fn rbd_groups_work_through_the_api_like_local_ones() {
    let cl = cluster();
    let srv = Server::start_with_args(&["--import-dir", cl.dir.to_str().unwrap()]);
    let c = srv.client();
    let vg = unique("apivg");
    let conf = cl.conf.display().to_string();

    // Only admins add storage, and the configuration must be in an import folder.
    let (st, tok) = post(&c, "/api/tokens", json!({"name": "user"}));
    assert_eq!(st, 200, "{tok}");
    let user = srv.client_with(tok["token"].as_str());
    let (st, body) = post(
        &user,
        "/api/storage/rbd",
        json!({"name": vg, "conf": conf, "pool": cl.pool}),
    );
    assert_eq!(st, 403, "{body}");
    let (st, body) = post(
        &c,
        "/api/storage/rbd",
        json!({"name": vg, "conf": "/etc/ceph/ceph.conf", "pool": cl.pool}),
    );
    assert_eq!(st, 403, "{body}");
    let (st, body) = post(
        &c,
        "/api/storage/rbd",
        json!({"name": vg, "conf": conf, "pool": cl.pool}),
    );
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["group"]["type"], "rbd", "{body}");
    let overview = c.request("GET", "/api/storage", None).unwrap();
    assert!(
        overview
            .body
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["group"]["name"] == vg),
        "{:?}",
        overview.body
    );

    // A volume on it, written from an import file, snapshotted and cloned.
    let (st, body) = post(
        &c,
        "/api/volumes",
        json!({"vg": vg, "name": "disk", "size": "16M"}),
    );
    assert_eq!(st, 200, "{body}");
    let data: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
    let import = srv.data.join("import/disk.raw");
    std::fs::write(&import, &data).unwrap();
    succeed(
        &c,
        &start_job(
            &c,
            "/api/convert",
            &json!({"source": import.display().to_string(), "target": format!("lv:{vg}/disk"),
                    "source_format": "raw"}),
        ),
    );
    assert!(download(&c, &format!("/api/volumes/{vg}/disk/download")) == data);
    let (st, body) = post(
        &c,
        &format!("/api/volumes/{vg}/disk/snapshot"),
        json!({"name": "snap"}),
    );
    assert_eq!(st, 200, "{body}");
    let (st, body) = post(
        &c,
        &format!("/api/volumes/{vg}/snap/clone"),
        json!({"name": "clone"}),
    );
    assert_eq!(st, 200, "{body}");
    assert!(download(&c, &format!("/api/volumes/{vg}/clone/download")) == data);

    // Backups: the second one reads only what changed (Ceph's fast-diff), and restores exactly.
    let first = succeed(
        &c,
        &start_job(
            &c,
            "/api/backups",
            &json!({"source": format!("lv:{vg}/disk")}),
        ),
    );
    // A guest-sized change: 4 KiB written through another client of the cluster.
    let mut changed = data.clone();
    changed[..4096].fill(0xab);
    {
        use strata_storage::volume::rbd::RbdGroup;
        use strata_storage::volume::rbd_groups::RbdGroupRecord;
        let record = RbdGroupRecord {
            name: vg.clone(),
            conf: cl.conf.clone(),
            user: "admin".into(),
            keyring: None,
            pool: cl.pool.clone(),
        };
        let group = RbdGroup::open(&record, false).unwrap();
        let dev = group.open_lv("disk", false).unwrap();
        strata_tests::write_device(dev.as_ref(), 0, &changed[..4096]).unwrap();
    }
    let second = succeed(
        &c,
        &start_job(
            &c,
            "/api/backups",
            &json!({"source": format!("lv:{vg}/disk")}),
        ),
    );
    let read_first = first["result"]["manifest"]["stats"]["bytes-read"]
        .as_u64()
        .unwrap();
    let read_second = second["result"]["manifest"]["stats"]["bytes-read"]
        .as_u64()
        .unwrap();
    assert!(
        read_second < read_first,
        "{read_second} >= {read_first}: {second}"
    );
    let snapshot = second["result"]["snapshot"].as_str().unwrap();
    succeed(
        &c,
        &start_job(
            &c,
            "/api/backups/restore",
            &json!({"snapshot": snapshot, "target": "image:back.raw"}),
        ),
    );
    assert!(download(&c, "/api/images/back.raw/download") == changed);

    // A group with volumes is not removed; empty, it is.
    let r = c
        .request("DELETE", &format!("/api/storage/{vg}"), None)
        .unwrap();
    assert_eq!(r.status, 409, "{:?}", r.body);
    for v in ["clone", "snap", "disk"] {
        let r = c
            .request("DELETE", &format!("/api/volumes/{vg}/{v}"), None)
            .unwrap();
        assert_eq!(r.status, 204, "{v}: {:?}", r.body);
    }
    let r = user
        .request("DELETE", &format!("/api/storage/{vg}"), None)
        .unwrap();
    assert_eq!(r.status, 403, "{:?}", r.body);
    let r = c
        .request("DELETE", &format!("/api/storage/{vg}"), None)
        .unwrap();
    assert_eq!(r.status, 204, "{:?}", r.body);
    // Local groups are not removed through the API.
    let r = c.request("DELETE", "/api/storage/strata", None).unwrap();
    assert_eq!(r.status, 501, "{:?}", r.body);
}

strata_testkit::main!(rbd_groups_work_through_the_api_like_local_ones,);

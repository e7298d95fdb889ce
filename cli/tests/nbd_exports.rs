//! NBD exports made through the API of `strata serve`, read and written by real NBD clients
//! (qemu-img, nbdinfo, nbdcopy from Debian's qemu-utils and libnbd-bin): a volume, a snapshot,
//! an image and a backup snapshot; an exported volume is held; secret names stay secret;
//! exports come back after a restart; TLS with the appliance's CA.

mod common;

use std::path::Path;
use std::process::Command;

use common::{require_tool, start_job, succeed, Server};
use serde_json::{json, Value};
use strata_api::client::Client;

fn post(c: &Client, path: &str, body: Value) -> (u16, Value) {
    let r = c.request("POST", path, Some(&body)).unwrap();
    (r.status, r.body)
}

fn tool(cmd: &str, args: &[&str]) -> (bool, String) {
    let o = Command::new(cmd).args(args).output().unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

fn ok(cmd: &str, args: &[&str]) -> String {
    let (good, out) = tool(cmd, args);
    assert!(good, "{cmd} {args:?}: {out}");
    out
}

fn export(c: &Client, body: Value) -> Value {
    let (st, e) = post(c, "/api/exports", body.clone());
    assert_eq!(st, 200, "{body}: {e}");
    e
}

/// Reads an export whole with nbdcopy.
fn read_export(uri: &str, out: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(out);
    ok("nbdcopy", &[uri, out.to_str().unwrap()]);
    std::fs::read(out).unwrap()
}

fn exports_serve_volumes_snapshots_images_and_backups_to_real_clients() {
    for t in ["qemu-img", "nbdinfo", "nbdcopy"] {
        require_tool(t);
    }
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let srv = Server::start_with(&data_dir, &["--nbd-listen", "127.0.0.1:0"]);
    let c = srv.client();
    let data: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
        .collect();
    std::fs::write(srv.data.join("import/seed.raw"), &data).unwrap();
    let (st, body) = post(
        &c,
        "/api/volumes",
        json!({"vg": "strata", "name": "vm1", "size": "8M", "pool": "data"}),
    );
    assert_eq!(st, 200, "{body}");
    let seed = srv.data.join("import/seed.raw").display().to_string();
    succeed(
        &c,
        &start_job(
            &c,
            "/api/convert",
            &json!({"source": seed, "target": "lv:strata/vm1", "source_format": "raw"}),
        ),
    );

    // A volume, read by qemu-img and nbdcopy, written by nbdcopy.
    let e = export(&c, json!({"source": "lv:strata/vm1"}));
    let uri = e["uri"].as_str().unwrap().to_string();
    assert_eq!(e["id"], "strata-vm1");
    assert!(uri.ends_with("/strata-vm1"), "{uri}");
    let info = ok("qemu-img", &["info", "--output=json", &uri]);
    assert!(info.contains("\"virtual-size\": 8388608"), "{info}");
    assert!(read_export(&uri, &dir.path().join("a.raw")) == data);
    // Held: no resize, remove, or other writer while exported; the listing says by whom.
    let r = c
        .request(
            "POST",
            "/api/volumes/strata/vm1/resize",
            Some(&json!({"size": "16M"})),
        )
        .unwrap();
    assert_eq!(r.status, 409, "{:?}", r.body);
    let r = c
        .request("DELETE", "/api/volumes/strata/vm1", None)
        .unwrap();
    assert_eq!(r.status, 409, "{:?}", r.body);
    let (st, body) = post(
        &c,
        "/api/convert",
        json!({"source": seed, "target": "lv:strata/vm1", "source_format": "raw"}),
    );
    assert_eq!(st, 409, "{body}");
    let v = c.request("GET", "/api/volumes/strata/vm1", None).unwrap();
    assert_eq!(
        v.body["held_by"],
        json!(["NBD export strata-vm1"]),
        "{:?}",
        v.body
    );
    // Written through the export.
    let mut changed = data.clone();
    changed[..1 << 20].fill(0x5a);
    let src = dir.path().join("changed.raw");
    std::fs::write(&src, &changed).unwrap();
    ok("nbdcopy", &[src.to_str().unwrap(), &uri]);
    // Unknown names are refused; the volume is still served.
    let (good, _) = tool("nbdinfo", &[&uri.replace("strata-vm1", "nope")]);
    assert!(!good);

    // A snapshot (read-only) and a backup snapshot, compared with the volume.
    let (st, body) = post(
        &c,
        "/api/volumes/strata/vm1/snapshot",
        json!({"name": "snap"}),
    );
    assert_eq!(st, 200, "{body}");
    let snap = export(&c, json!({"source": "lv:strata/snap"}));
    assert_eq!(snap["read_only"], true, "{snap}");
    let snap_uri = snap["uri"].as_str().unwrap();
    assert!(read_export(snap_uri, &dir.path().join("s.raw")) == changed);
    let (good, _) = tool("nbdcopy", &[src.to_str().unwrap(), snap_uri]);
    assert!(!good, "a snapshot export took writes");
    let b = succeed(
        &c,
        &start_job(&c, "/api/backups", &json!({"source": "lv:strata/snap"})),
    );
    let snapshot = b["result"]["snapshot"].as_str().unwrap();
    let be = export(
        &c,
        json!({"source": format!("backup:{snapshot}"), "name": "bk"}),
    );
    let be_uri = be["uri"].as_str().unwrap();
    let cmp = ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            be_uri,
        ],
    );
    assert!(cmp.contains("identical"), "{cmp}");

    // An image, opened with its recorded format.
    succeed(
        &c,
        &start_job(
            &c,
            "/api/convert",
            &json!({"source": "lv:strata/snap", "target": "image:vm1.qcow2", "format": "qcow2"}),
        ),
    );
    let ie = export(&c, json!({"source": "image:vm1.qcow2", "read_only": true}));
    assert!(read_export(ie["uri"].as_str().unwrap(), &dir.path().join("i.raw")) == changed);

    // A secret export: its name shown once, never listed.
    let se = export(
        &c,
        json!({"source": "lv:strata/snap", "access": {"mode": "secret"}}),
    );
    let secret = se["name"].as_str().unwrap().to_string();
    assert!(secret.len() >= 22, "{se}");
    let listed = c.request("GET", "/api/exports", None).unwrap();
    assert!(!listed
        .raw
        .windows(secret.len())
        .any(|w| w == secret.as_bytes()));
    let base = be_uri.trim_end_matches("bk").to_string();
    let names = ok("nbdinfo", &["--list", &base]);
    assert!(!names.contains(&secret), "{names}");
    assert!(read_export(&format!("{base}{secret}"), &dir.path().join("x.raw")) == changed);

    // Removed, the volume is released.
    let r = c
        .request("DELETE", "/api/exports/strata-vm1", None)
        .unwrap();
    assert_eq!(r.status, 204, "{:?}", r.body);
    let r = c
        .request(
            "POST",
            "/api/volumes/strata/vm1/resize",
            Some(&json!({"size": "16M"})),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);

    // Exports come back with the server.
    let token = srv.token.clone();
    let fingerprint = srv.fingerprint.clone();
    drop(srv);
    let srv = Server::start_with(&data_dir, &["--nbd-listen", "127.0.0.1:0"]);
    let c = Client::with_trust(
        &srv.url,
        Some(token),
        Some(strata_api::client::Trust::Fingerprint(fingerprint)),
    )
    .unwrap();
    let listed = c.request("GET", "/api/exports", None).unwrap();
    let ids: Vec<&str> = listed
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"bk") && ids.contains(&"strata-snap"),
        "{ids:?}"
    );
    let bk = c.request("GET", "/api/exports/bk", None).unwrap();
    let bk_uri = bk.body["uri"].as_str().unwrap().to_string();
    assert!(read_export(&bk_uri, &dir.path().join("b.raw")) == changed);

    // TLS with the appliance's CA, as QEMU's and libnbd's clients do it.
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    std::fs::copy(data_dir.join("tls/ca.pem"), certs.join("ca-cert.pem")).unwrap();
    let tls_uri = format!(
        "{}?tls-certificates={}",
        bk_uri.replacen("nbd://", "nbds://", 1),
        certs.display()
    );
    let size = ok("nbdinfo", &["--size", &tls_uri]);
    assert_eq!(size.trim(), "8388608", "{size}");
}

/// Runs the local `strata` tool.
fn strata(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "strata {args:?}: {text}");
    text
}

fn writes_through_an_image_export_are_tracked_in_its_dirty_bitmap() {
    for t in ["qemu-io", "nbdinfo"] {
        require_tool(t);
    }
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start_with(&dir.path().join("data"), &["--nbd-listen", "127.0.0.1:0"]);
    let c = srv.client();
    let (st, body) = post(
        &c,
        "/api/images",
        json!({"name": "disk.qcow2", "format": "qcow2", "size": "8M"}),
    );
    assert!(st == 200 || st == 202, "{st} {body}");
    if st == 202 {
        succeed(&c, body["id"].as_str().unwrap());
    }
    let image = srv.data.join("images/disk.qcow2");
    let image = image.to_str().unwrap();
    strata(&["image", "bitmap", "add", image, "cbt"]);

    let e = export(&c, json!({"source": "image:disk.qcow2"}));
    let uri = e["uri"].as_str().unwrap().to_string();
    ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x11 1M 64K", &uri],
    );
    // The bitmap is exported to NBD clients, and shows the write.
    let map = ok("nbdinfo", &["--map=qemu:dirty-bitmap:cbt", "--json", &uri]);
    let map: Value = serde_json::from_str(&map).unwrap();
    let dirty: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"].as_u64() == Some(1))
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(dirty, vec![(1 << 20, 64 << 10)], "{map}");
    let r = c
        .request(
            "DELETE",
            &format!("/api/exports/{}", e["id"].as_str().unwrap()),
            None,
        )
        .unwrap();
    assert_eq!(r.status, 204, "{:?}", r.body);

    // The sidecar file kept it after the export closed.
    let shown: Value = serde_json::from_str(&strata(&[
        "image", "bitmap", "show", "--output", "json", image, "cbt",
    ]))
    .unwrap();
    assert_eq!(shown["valid"], true, "{shown}");
    assert_eq!(
        shown["ranges"],
        json!([{"offset": 1 << 20, "length": 64 << 10}]),
        "{shown}"
    );
}

strata_testkit::main!(
    exports_serve_volumes_snapshots_images_and_backups_to_real_clients,
    writes_through_an_image_export_are_tracked_in_its_dirty_bitmap,
);

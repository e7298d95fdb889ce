//! The format of an appliance image is a recorded fact, never a guess from bytes an uploader or
//! a guest wrote (QEMU's CVE-2008-2004). Over real HTTP against `strata serve`, with images
//! made by qemu-img.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{image_names, require_tool, run, start_job, succeed, Server};
use serde_json::json;
use strata_api::client::Client;

/// A qcow2 header naming `backing` as its backing file, as qemu-img writes one: the bytes a
/// hostile uploader or guest puts at the start of a raw disk.
fn hostile_header(dir: &Path, backing: &Path) -> (PathBuf, Vec<u8>) {
    let m = dir.join("M.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(backing)
        .arg(&m)
        .arg("64K"));
    let bytes = std::fs::read(&m).unwrap();
    assert!(bytes.starts_with(b"QFI\xfb"));
    (m, bytes)
}

/// `bytes` followed by zeros up to `len`.
fn padded(bytes: &[u8], len: usize) -> Vec<u8> {
    let mut v = bytes.to_vec();
    v.resize(len, 0);
    v
}

fn download(c: &Client, path: &str) -> Vec<u8> {
    let r = c.send("GET", path, Vec::new(), false).unwrap();
    assert_eq!(r.status, 200, "{path}: {}", String::from_utf8_lossy(&r.raw));
    r.raw
}

fn info(c: &Client, name: &str) -> serde_json::Value {
    let r = c
        .request("GET", &format!("/api/images/{name}"), None)
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body
}

/// The image is raw, names no backing file, and reads back as exactly `want`.
fn assert_raw_image_holds(c: &Client, name: &str, want: &[u8]) {
    let i = info(c, name);
    assert_eq!(i["format"], "raw", "{i}");
    assert!(i["details"].get("backing-filename").is_none(), "{i}");
    assert_eq!(i["virtual_size"].as_u64().unwrap(), want.len() as u64);
    for path in [
        format!("/api/images/{name}/download"),
        format!("/api/images/{name}/download?format=raw"),
    ] {
        let got = download(c, &path);
        assert!(
            got == want,
            "{path}: the contents differ from what was written"
        );
    }
}

/// The reproduction: a clean qcow2 whose contents are a qcow2 header naming
/// /etc/passwd, uploaded as a raw image. Before, the raw image was probed, opened as qcow2 and
/// the download printed /etc/passwd.
fn an_uploaded_raw_image_holding_a_qcow2_header_stays_raw() {
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start();
    let c = srv.client();
    let (m, m_bytes) = hostile_header(dir.path(), Path::new("/etc/passwd"));
    let upload = dir.path().join("C.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&m)
        .arg(&upload));
    let r = c
        .upload_file("/api/images/evil.raw/upload?format=raw", &upload)
        .unwrap();
    assert_eq!(r.status, 202, "{:?}", r.body);
    succeed(&c, r.body["id"].as_str().unwrap());
    // The upload was a qcow2 (its uploader's own bytes, probed); its contents, M's header
    // bytes, are the raw image's data.
    let len = m_bytes.len().div_ceil(512) * 512;
    let want = padded(&m_bytes, len);
    assert_raw_image_holds(&c, "evil.raw", &want);
    let passwd = std::fs::read("/etc/passwd").unwrap();
    let got = download(&c, "/api/images/evil.raw/download?format=raw");
    assert!(
        !got.windows(passwd.len().min(32))
            .any(|w| w == &passwd[..passwd.len().min(32)]),
        "the download holds /etc/passwd"
    );
    // Converted to other formats and back, it is still the same bytes.
    for fmt in ["qcow2", "vmdk"] {
        let got = download(&c, &format!("/api/images/evil.raw/download?format={fmt}"));
        let file = dir.path().join(format!("back.{fmt}"));
        std::fs::write(&file, &got).unwrap();
        let raw = dir.path().join(format!("back-{fmt}.raw"));
        run(Command::new("qemu-img")
            .args(["convert", "-f", fmt, "-O", "raw"])
            .arg(&file)
            .arg(&raw));
        assert!(
            std::fs::read(&raw).unwrap() == want,
            "{fmt} download differs"
        );
    }
    let id = start_job(
        &c,
        "/api/convert",
        &json!({"source": "image:evil.raw", "target": "image:evil2.qcow2", "format": "qcow2"}),
    );
    succeed(&c, &id);
    assert_eq!(info(&c, "evil2.qcow2")["format"], "qcow2");
    assert!(download(&c, "/api/images/evil2.qcow2/download?format=raw") == want);
    // Stated explicitly, the upload's format is taken as given: the qcow2 file itself becomes
    // the raw image's bytes.
    let r = c
        .upload_file(
            "/api/images/verbatim.raw/upload?format=raw&source_format=raw",
            &upload,
        )
        .unwrap();
    assert_eq!(r.status, 202, "{:?}", r.body);
    succeed(&c, r.body["id"].as_str().unwrap());
    let upload_bytes = std::fs::read(&upload).unwrap();
    assert_raw_image_holds(&c, "verbatim.raw", &upload_bytes);
}

/// A guest writes a qcow2 header naming a server file into its raw volume. Backup, restore,
/// conversion and download all treat the volume's bytes as raw data.
fn a_guest_written_qcow2_header_in_a_volume_stays_data_everywhere() {
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, b"STRATA-SECRET-7f3a".repeat(4096)).unwrap();
    let (_, header) = hostile_header(dir.path(), &secret);
    // The appliance's default group, then a volume written through the block layer as a
    // guest's virtio-blk requests would write it.
    let data = dir.path().join("data");
    let init = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["--data", data.to_str().unwrap(), "init", "--pv-size", "4G"])
        .args(["--output", "json"])
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    let stdout = String::from_utf8_lossy(&init.stdout);
    let token: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let token = token["token"].as_str().unwrap().to_string();
    const SIZE: usize = 8 << 20;
    {
        let store = strata_storage::volume::VolumeStore::new(&data);
        let vg = store.open_vg("strata", false).unwrap();
        vg.create_thin("data", "guest", SIZE as u64).unwrap();
        let dev = vg.open_lv("guest", false).unwrap();
        let written = padded(&header, header.len().next_multiple_of(64 << 10));
        strata_tests::write_device(dev.as_ref(), 0, &written).unwrap();
    }
    let want = padded(&header, SIZE);
    let srv = Server::start_on(&data);
    let c = srv.client_with(Some(&token));
    let got = download(&c, "/api/volumes/strata/guest/download");
    let first = got.iter().zip(&want).position(|(a, b)| a != b);
    assert!(
        got == want,
        "volume: {} bytes, want {}; first difference at {first:?}",
        got.len(),
        want.len()
    );

    let backup = succeed(
        &c,
        &start_job(&c, "/api/backups", &json!({"source": "lv:strata/guest"})),
    );
    let snapshot = backup["result"]["snapshot"].as_str().unwrap().to_string();
    for (name, fmt) in [("restored.raw", "raw"), ("restored.qcow2", "qcow2")] {
        let id = start_job(
            &c,
            "/api/backups/restore",
            &json!({"snapshot": snapshot, "target": format!("image:{name}"), "format": fmt}),
        );
        succeed(&c, &id);
        assert_eq!(info(&c, name)["format"], fmt);
        assert!(
            download(&c, &format!("/api/images/{name}/download?format=raw")) == want,
            "{name}"
        );
    }
    assert_raw_image_holds(&c, "restored.raw", &want);
    // Converted from the volume and from the restored image.
    for (source, target) in [
        ("lv:strata/guest", "conv.raw"),
        ("image:restored.raw", "again.raw"),
    ] {
        let id = start_job(
            &c,
            "/api/convert",
            &json!({"source": source, "target": format!("image:{target}"), "format": "raw"}),
        );
        succeed(&c, &id);
        assert_raw_image_holds(&c, target, &want);
    }
    // A backup of the restored image, restored onto a new volume, is the same bytes again.
    let r = c
        .request(
            "POST",
            "/api/volumes",
            Some(
                &json!({"vg": "strata", "name": "copy", "size": SIZE.to_string(), "pool": "data"}),
            ),
        )
        .unwrap();
    assert!(r.status == 200 || r.status == 201, "{:?}", r.body);
    let b2 = succeed(
        &c,
        &start_job(&c, "/api/backups", &json!({"source": "image:restored.raw"})),
    );
    assert_eq!(b2["result"]["manifest"]["source-format"], "raw", "{b2}");
    let id = start_job(
        &c,
        "/api/backups/restore",
        &json!({"snapshot": b2["result"]["snapshot"], "target": "lv:strata/copy"}),
    );
    succeed(&c, &id);
    assert!(download(&c, "/api/volumes/strata/copy/download") == want);
    let secret_marker = b"STRATA-SECRET-7f3a";
    for name in image_names(&c) {
        let got = download(&c, &format!("/api/images/{name}/download?format=raw"));
        assert!(
            !got.windows(secret_marker.len()).any(|w| w == secret_marker),
            "{name} holds the server's secret file"
        );
    }
}

/// Files put into the image folder by hand have no recorded format: listed as unknown,
/// refused for use, until an admin adopts them after a check.
fn images_without_a_record_are_refused_until_an_admin_adopts_them() {
    require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start();
    let c = srv.client();
    let images = srv.data.join("images");
    let (m, m_bytes) = hostile_header(dir.path(), Path::new("/etc/passwd"));
    std::fs::copy(&m, images.join("dropped.qcow2")).unwrap();
    let plain = images.join("plain.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&plain)
        .arg("1M"));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 64k"])
        .arg(&plain));

    let listed = c.request("GET", "/api/images", None).unwrap();
    assert_eq!(listed.status, 200);
    for i in listed.body.as_array().unwrap() {
        assert_eq!(i["format"], "unknown", "{i}");
    }
    assert_eq!(info(&c, "dropped.qcow2")["format"], "unknown");
    // Every use is refused with 409 and a message that says what to do.
    let uses = [
        c.request("GET", "/api/images/dropped.qcow2/download", None)
            .unwrap(),
        c.request(
            "POST",
            "/api/convert",
            Some(
                &json!({"source": "image:dropped.qcow2", "target": "image:x.raw", "format": "raw"}),
            ),
        )
        .unwrap(),
        c.request(
            "POST",
            "/api/backups",
            Some(&json!({"source": "image:plain.qcow2"})),
        )
        .unwrap(),
    ];
    for r in uses {
        assert_eq!(r.status, 409, "{:?}", r.body);
        assert!(
            r.body["message"].as_str().unwrap().contains("adopt"),
            "{:?}",
            r.body
        );
    }
    // Only admins adopt.
    let user = c
        .request("POST", "/api/tokens", Some(&json!({"name": "user"})))
        .unwrap();
    let user = srv.client_with(user.body["token"].as_str());
    let r = user
        .request(
            "POST",
            "/api/images/plain.qcow2/adopt",
            Some(&json!({"format": "qcow2"})),
        )
        .unwrap();
    assert_eq!(r.status, 403, "{:?}", r.body);
    // A qcow2 naming a backing file cannot be adopted as qcow2: no appliance image reads
    // another file.
    let r = c
        .request(
            "POST",
            "/api/images/dropped.qcow2/adopt",
            Some(&json!({"format": "qcow2"})),
        )
        .unwrap();
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert!(
        r.body["message"].as_str().unwrap().contains("backing file"),
        "{:?}",
        r.body
    );
    assert_eq!(info(&c, "dropped.qcow2")["format"], "unknown");
    // Adopted as raw, its bytes are data.
    let r = c
        .request(
            "POST",
            "/api/images/dropped.qcow2/adopt",
            Some(&json!({"format": "raw"})),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_raw_image_holds(&c, "dropped.qcow2", &m_bytes);
    // A second adoption is refused.
    let r = c
        .request(
            "POST",
            "/api/images/dropped.qcow2/adopt",
            Some(&json!({"format": "qcow2"})),
        )
        .unwrap();
    assert_eq!(r.status, 409, "{:?}", r.body);
    // A self-contained qcow2 adopts as qcow2.
    let r = c
        .request(
            "POST",
            "/api/images/plain.qcow2/adopt",
            Some(&json!({"format": "qcow2"})),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["format"], "qcow2");
    let got = download(&c, "/api/images/plain.qcow2/download?format=raw");
    assert!(got[..64 << 10].iter().all(|&b| b == 0x5a) && got[64 << 10..].iter().all(|&b| b == 0));
    // A damaged qcow2 is refused with the check's finding.
    let broken = images.join("broken.qcow2");
    std::fs::copy(&plain, &broken).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&broken)
            .unwrap();
        // The first L1 entry points into the header cluster.
        let mut h = [0u8; 8];
        f.read_exact_at(&mut h, 40).unwrap();
        let l1 = u64::from_be_bytes(h);
        f.write_all_at(&(0x8000_0000_0000_0200u64).to_be_bytes(), l1)
            .unwrap();
    }
    let r = c
        .request(
            "POST",
            "/api/images/broken.qcow2/adopt",
            Some(&json!({"format": "qcow2"})),
        )
        .unwrap();
    assert!(matches!(r.status, 400 | 422), "{:?}", r.body);
    assert_eq!(info(&c, "broken.qcow2")["format"], "unknown");

    // A removed image's record goes with it: a file put there later is unknown again.
    let r = c
        .request("DELETE", "/api/images/plain.qcow2", None)
        .unwrap();
    assert_eq!(r.status, 204);
    std::fs::copy(&m, &plain).unwrap();
    assert_eq!(info(&c, "plain.qcow2")["format"], "unknown");
    // And a record whose image was removed by hand is forgotten when the server starts.
    std::fs::remove_file(images.join("dropped.qcow2")).unwrap();
    let data = srv.data.clone();
    drop(srv);
    let srv = Server::start_on(&data);
    std::fs::copy(&m, images.join("dropped.qcow2")).unwrap();
    let c = srv.client();
    assert_eq!(info(&c, "dropped.qcow2")["format"], "unknown");
}

strata_testkit::main!(
    an_uploaded_raw_image_holding_a_qcow2_header_stays_raw,
    a_guest_written_qcow2_header_in_a_volume_stays_data_everywhere,
    images_without_a_record_are_refused_until_an_admin_adopts_them,
);

//! End-to-end over real HTTP on loopback: the life of a disk through the API, job progress,
//! and cancellation that leaves nothing half-made. Needs qemu-img and qemu-io (CI installs
//! Debian's qemu-utils).

mod common;

use std::process::Command;

use common::{files_in, image_names, run, start_job, succeed, wait_job, Server};
use serde_json::json;

#[test]
fn a_disk_goes_from_upload_to_volume_snapshot_clone_backup_and_restore() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&src)
        .arg("64M"));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 0 4M",
            "-c",
            "write -P 0x5c 20M 1M",
            "-c",
            "write -P 0x11 63M 1M",
        ])
        .arg(&src));

    let srv = Server::start();
    let c = srv.client();

    // Upload the image; a job converts it into a managed qcow2 image.
    let bytes = std::fs::read(&src).unwrap();
    let r = c
        .send(
            "PUT",
            "/api/images/golden.qcow2/upload?format=qcow2",
            bytes,
            false,
        )
        .unwrap();
    assert_eq!(r.status, 202, "{:?}", r.body);
    succeed(&c, r.body["id"].as_str().unwrap());
    assert_eq!(image_names(&c), vec!["golden.qcow2"]);
    assert!(
        files_in(&srv.data.join("scratch")).is_empty(),
        "the upload was not cleaned up"
    );

    // A volume, the image imported into it, a snapshot and a clone of the snapshot.
    let r = c
        .request(
            "POST",
            "/api/volumes",
            Some(&json!({"vg": "strata", "name": "vm-200-disk-0", "size": "64M", "pool": "data"})),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let id = start_job(
        &c,
        "/api/convert",
        &json!({"source": "image:golden.qcow2", "target": "lv:strata/vm-200-disk-0"}),
    );
    succeed(&c, &id);
    let r = c
        .request(
            "POST",
            "/api/volumes/strata/vm-200-disk-0/snapshot",
            Some(&json!({"name": "vm-200-base"})),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = c
        .request(
            "POST",
            "/api/volumes/strata/vm-200-base/clone",
            Some(&json!({"name": "vm-201-disk-0"})),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);

    // Back up the clone, verify, restore the backup into a new image.
    let id = start_job(
        &c,
        "/api/backups",
        &json!({"source": "lv:strata/vm-201-disk-0"}),
    );
    let status = succeed(&c, &id);
    let snapshot = status["result"]["snapshot"].as_str().unwrap().to_string();
    let r = c.request("GET", "/api/backups", None).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.as_array().unwrap().len(), 1, "{:?}", r.body);
    let id = start_job(&c, "/api/backups/verify", &json!({"snapshot": snapshot}));
    succeed(&c, &id);
    let id = start_job(
        &c,
        "/api/backups/restore",
        &json!({"snapshot": snapshot, "target": "image:restored.qcow2", "format": "qcow2"}),
    );
    succeed(&c, &id);

    // Download the restored image as raw and compare it with the original upload.
    let r = c
        .send(
            "GET",
            "/api/images/restored.qcow2/download?format=raw",
            Vec::new(),
            false,
        )
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.raw.len(), 64 << 20);
    let restored = dir.path().join("restored.raw");
    std::fs::write(&restored, &r.raw).unwrap();
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&restored)
        .arg(&src));
    // The restored qcow2 itself is a valid image, downloaded as it is.
    let r = c
        .send(
            "GET",
            "/api/images/restored.qcow2/download",
            Vec::new(),
            false,
        )
        .unwrap();
    assert_eq!(r.status, 200);
    let own = dir.path().join("restored.qcow2");
    std::fs::write(&own, &r.raw).unwrap();
    run(Command::new("qemu-img").args(["check", "-q"]).arg(&own));
    run(Command::new("qemu-img").arg("compare").arg(&own).arg(&src));
    // The clone's contents, streamed straight from the volume.
    let r = c
        .send(
            "GET",
            "/api/volumes/strata/vm-201-disk-0/download",
            Vec::new(),
            false,
        )
        .unwrap();
    assert_eq!(r.status, 200);
    let vol = dir.path().join("clone.raw");
    std::fs::write(&vol, &r.raw).unwrap();
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&vol)
        .arg(&src));
    let r = c
        .send(
            "GET",
            "/api/volumes/strata/nope/download",
            Vec::new(),
            false,
        )
        .unwrap();
    assert_eq!(r.status, 404, "{:?}", r.body);
    assert!(
        files_in(&srv.data.join("scratch")).is_empty(),
        "a download copy was left"
    );
}

#[test]
fn uploads_are_checked_before_anything_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start();
    let c = srv.client();
    // An image with a backing file would read files on the server: refused.
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
    let overlay = dir.path().join("overlay.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(&overlay));
    let r = c
        .send(
            "PUT",
            "/api/images/x.qcow2/upload",
            std::fs::read(&overlay).unwrap(),
            false,
        )
        .unwrap();
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert!(
        r.body["message"].as_str().unwrap().contains("backing file"),
        "{:?}",
        r.body
    );
    // A name that escapes the image folder.
    let r = c
        .send(
            "PUT",
            "/api/images/..%2Fescape/upload",
            vec![0u8; 512],
            false,
        )
        .unwrap();
    assert_eq!(r.status, 400, "{:?}", r.body);
    // Garbage that is no image at all.
    let r = c
        .send(
            "PUT",
            "/api/images/junk.raw/upload?format=vmdk",
            b"KDMV".repeat(128),
            false,
        )
        .unwrap();
    // A vmdk magic with a nonsense version: refused by name, not guessed at.
    assert!(
        matches!(r.status, 400 | 422 | 501),
        "{} {:?}",
        r.status,
        r.body
    );
    assert!(
        r.body["message"].as_str().unwrap().contains("version"),
        "{:?}",
        r.body
    );
    assert!(image_names(&c).is_empty());
    assert!(files_in(&srv.data.join("scratch")).is_empty());
    assert!(files_in(&srv.data.join("images")).is_empty());
}

#[test]
fn progress_moves_and_cancelled_jobs_leave_nothing_behind() {
    let srv = Server::start();
    let c = srv.client();
    // 768 MiB of incompressible data in the server's import folder.
    let src = srv.data.join("import/big.raw");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&src).unwrap();
        let mut block = vec![0u8; 1 << 20];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..768 {
            for w in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&block).unwrap();
        }
    }
    let src_spec = src.to_str().unwrap();

    // Import into a volume; progress is observed moving before the end.
    let r = c
        .request(
            "POST",
            "/api/volumes",
            Some(&json!({"vg": "strata", "name": "big", "size": "768M", "pool": "data"})),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let id = start_job(
        &c,
        "/api/convert",
        &json!({"source": src_spec, "target": "lv:strata/big"}),
    );
    let (status, seen) = wait_job(&c, &id);
    assert_eq!(status["state"], "succeeded", "{status}");
    assert_eq!(status["bytes_done"], 768u64 << 20, "{status}");
    let between = seen
        .iter()
        .filter(|(d, t)| *t > 0 && *d > 0 && d < t)
        .count();
    assert!(between >= 1, "no intermediate progress seen: {seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0].0 <= w[1].0),
        "progress went backwards: {seen:?}"
    );

    // A conversion into a new image, cancelled: no image, no partial file, job says so.
    let id = start_job(
        &c,
        "/api/convert",
        &json!({"source": "lv:strata/big", "target": "image:copy.raw", "format": "raw"}),
    );
    let r = c
        .request("DELETE", &format!("/api/jobs/{id}"), None)
        .unwrap();
    assert!(r.status == 200 || r.status == 202, "{:?}", r.body);
    let (status, _) = wait_job(&c, &id);
    assert_eq!(status["state"], "cancelled", "{status}");
    assert!(image_names(&c).is_empty());
    assert!(
        files_in(&srv.data.join("images")).is_empty(),
        "{:?}",
        files_in(&srv.data.join("images"))
    );

    // A backup, cancelled: no snapshot appears.
    let id = start_job(&c, "/api/backups", &json!({"source": "lv:strata/big"}));
    let r = c
        .request("DELETE", &format!("/api/jobs/{id}"), None)
        .unwrap();
    assert!(r.status == 200 || r.status == 202, "{:?}", r.body);
    let (status, _) = wait_job(&c, &id);
    assert_eq!(status["state"], "cancelled", "{status}");
    let r = c.request("GET", "/api/backups", None).unwrap();
    assert_eq!(r.body.as_array().map(Vec::len), Some(0), "{:?}", r.body);

    // A restore into a new image, cancelled: nothing appears either.
    let id = start_job(&c, "/api/backups", &json!({"source": "lv:strata/big"}));
    let snapshot = succeed(&c, &id)["result"]["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let id = start_job(
        &c,
        "/api/backups/restore",
        &json!({"snapshot": snapshot, "target": "image:back.raw"}),
    );
    let r = c
        .request("DELETE", &format!("/api/jobs/{id}"), None)
        .unwrap();
    assert!(r.status == 200 || r.status == 202, "{:?}", r.body);
    let (status, _) = wait_job(&c, &id);
    assert_eq!(status["state"], "cancelled", "{status}");
    assert!(files_in(&srv.data.join("images")).is_empty());
}

#[test]
fn a_streamoptimized_vmdk_named_otherwise_in_its_descriptor_uploads() {
    // The embedded descriptor names "disk-original.vmdk"; the file is its own only extent.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("disk-original.vmdk");
    run(Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
        ])
        .arg(&src)
        .arg("4M"));
    let srv = Server::start();
    let c = srv.client();
    let r = c
        .send(
            "PUT",
            "/api/images/uploaded.qcow2/upload",
            std::fs::read(&src).unwrap(),
            false,
        )
        .unwrap();
    assert_eq!(r.status, 202, "{:?}", r.body);
    succeed(&c, r.body["id"].as_str().unwrap());
    assert_eq!(image_names(&c), vec!["uploaded.qcow2"]);
}

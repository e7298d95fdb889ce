//! S3 datastores against a real S3 implementation: radosgw of the test Ceph cluster
//! (scripts/ceph-cluster.sh --rgw), through the `strata` binary. Full backup, a 1% change and
//! an incremental backup, restore and verify, all against the bucket; sync local → S3 → local;
//! prune and a gc that repacks, after which every remaining snapshot verifies and restores;
//! connections dropped mid-backup (a proxy in front of radosgw): a clean failure, no visible
//! partial snapshot, and the next backup succeeds; and no object of the bucket holds plaintext
//! of the source.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use strata_backup::objects::Objects;
use strata_backup::s3::{S3Config, S3Objects};
use strata_tests::ceph::{rgw_cluster, unique, TestCluster};

mod common;
use common::CliEnv;

const PATTERN: &[u8] = b"Strata plaintext marker 0123456789 ";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A source of mixed content, every fourth 256 KiB piece a repeated marker text.
fn source(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut data = vec![0u8; len];
    for (i, piece) in data.chunks_mut(256 << 10).enumerate() {
        match i % 4 {
            0 => {
                for (j, b) in piece.iter_mut().enumerate() {
                    *b = PATTERN[j % PATTERN.len()];
                }
            }
            1 => rng.fill(piece),
            2 => {}
            _ => {
                let half = piece.len() / 2;
                rng.fill(&mut piece[..half]);
            }
        }
    }
    data
}

fn make_bucket(c: &TestCluster, bucket: &str) {
    let (ak, sk) = c.s3_keys.clone().unwrap();
    let url = format!("{}/{bucket}", c.rgw_endpoint.as_deref().unwrap());
    let out = std::process::Command::new("curl")
        .args(["-sf", "-X", "PUT", "--aws-sigv4", "aws:amz:us-east-1:s3"])
        .args(["--user", &format!("{ak}:{sk}")])
        .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", &url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "creating bucket {bucket}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn objects(c: &TestCluster, bucket: &str, endpoint: Option<&str>) -> S3Objects {
    let (ak, sk) = c.s3_keys.clone().unwrap();
    S3Objects::new(&S3Config {
        endpoint: endpoint
            .map(str::to_string)
            .unwrap_or_else(|| c.rgw_endpoint.clone().unwrap()),
        bucket: bucket.into(),
        prefix: String::new(),
        region: "us-east-1".into(),
        path_style: true,
        access_key: ak,
        secret_key: sk,
    })
    .unwrap()
}

struct S3Env {
    e: CliEnv,
    endpoint: String,
    bucket: String,
    access_key: String,
    secret_file: String,
    key: String,
}

impl S3Env {
    fn new(c: &TestCluster) -> S3Env {
        let e = CliEnv::new();
        let bucket = unique("strata").to_lowercase();
        make_bucket(c, &bucket);
        let (ak, sk) = c.s3_keys.clone().unwrap();
        std::fs::write(e.path("secret"), format!("{sk}\n")).unwrap();
        let key = e.path("backup.key");
        std::fs::write(e.path("pass"), "correct horse battery\n").unwrap();
        let out = e.ok(&[
            "backup",
            "key",
            "create",
            s(&key),
            "--passphrase-file",
            s(&e.path("pass")),
        ]);
        assert!(out.contains("Created key"), "{out}");
        S3Env {
            endpoint: c.rgw_endpoint.clone().unwrap(),
            bucket,
            access_key: ak,
            secret_file: s(&e.path("secret")).to_string(),
            key: s(&key).to_string(),
            e,
        }
    }

    /// `strata backup init` of an S3 datastore with local folder `cache` at `endpoint`.
    fn init(&self, cache: &str, endpoint: &str) -> String {
        let cache = self.e.path(cache);
        self.e.ok(&[
            "backup",
            "init",
            "--store",
            s(&cache),
            "--s3",
            endpoint,
            "--bucket",
            &self.bucket,
            "--access-key",
            &self.access_key,
            "--secret-file",
            &self.secret_file,
            "--path-style",
            "--chunk-size",
            "256K",
            "--pack-size",
            "4M",
            "--cache-size",
            "8M",
            "--key",
            &self.key,
            "--passphrase-file",
            s(&self.e.path("pass")),
        ])
    }

    /// Arguments naming datastore folder `cache` and the key.
    fn store<'a>(&'a self, cache: &'a str) -> Vec<String> {
        vec![
            "--store".into(),
            s(&self.e.path(cache)).into(),
            "--key".into(),
            self.key.clone(),
            "--passphrase-file".into(),
            s(&self.e.path("pass")).into(),
        ]
    }

    fn ok(&self, args: &[&str], cache: &str) -> String {
        let mut a: Vec<String> = args.iter().map(|x| x.to_string()).collect();
        a.extend(self.store(cache));
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        self.e.ok(&refs)
    }

    fn json(&self, args: &[&str], cache: &str) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        serde_json::from_str(&self.ok(&a, cache)).unwrap()
    }
}

fn no_plaintext_in(o: &S3Objects) -> usize {
    let listed = o.list("").unwrap();
    for l in &listed {
        let bytes = o.get(&l.key, 1 << 30).unwrap().unwrap();
        assert!(
            !bytes.windows(PATTERN.len()).any(|w| w == PATTERN),
            "object {} of the bucket holds plaintext of the source",
            l.key
        );
    }
    listed.len()
}

#[test]
fn s3_backup_incremental_restore_verify_sync_prune_gc() {
    let Some(c) = rgw_cluster("S3 datastore on radosgw") else {
        return;
    };
    let env = S3Env::new(c);
    let e = &env.e;
    let out = env.init("cache", &env.endpoint);
    assert!(out.contains("encrypted with key"), "{out}");
    let src = e.path("disk.img");
    let mut data = source(32 << 20, 1);
    std::fs::write(&src, &data).unwrap();

    let full = env.json(
        &["backup", "create", s(&src), "--id", "image/disk"],
        "cache",
    );
    let first = full["snapshot"].as_str().unwrap().to_string();
    let new_chunks = full["stats"]["chunks-new"].as_u64().unwrap();
    assert!(full["encryption"]["key-fingerprint"].is_string(), "{full}");
    let o = objects(c, &env.bucket, None);
    let packs = o.list("packs/").unwrap().len() as u64;
    assert!(new_chunks >= 60, "{new_chunks}");
    assert!(
        packs * 10 <= new_chunks,
        "{packs} packs for {new_chunks} chunks: not 10x fewer PUTs"
    );

    // 1% change, incremental.
    let off = 7 << 20;
    for b in &mut data[off..off + (320 << 10)] {
        *b ^= 0x77;
    }
    std::fs::write(&src, &data).unwrap();
    std::fs::write(
        e.path("dirty"),
        format!("base {first}\n{off} {}\n", 320 << 10),
    )
    .unwrap();
    let inc = env.json(
        &[
            "backup",
            "create",
            s(&src),
            "--id",
            "image/disk",
            "--dirty-ranges",
            s(&e.path("dirty")),
        ],
        "cache",
    );
    assert_eq!(inc["change-tracking"]["mode"], "incremental", "{inc}");
    assert!(
        inc["stats"]["bytes-read"].as_u64().unwrap() <= 1 << 20,
        "{inc}"
    );
    let second = inc["snapshot"].as_str().unwrap().to_string();

    // Restore and verify through a fresh local folder attached to the same bucket: every chunk
    // comes from the bucket.
    env.init("cache2", &env.endpoint);
    env.ok(
        &["backup", "restore", &second, s(&e.path("r2.img"))],
        "cache2",
    );
    assert!(std::fs::read(e.path("r2.img")).unwrap() == data);
    let v = env.json(&["backup", "verify", "--all"], "cache2");
    assert_eq!(v["snapshots"].as_array().unwrap().len(), 2, "{v}");
    // Without the key: a clear error.
    let err = e.fails(&[
        "backup",
        "restore",
        &first,
        "--store",
        s(&e.path("cache2")),
        s(&e.path("nokey.img")),
    ]);
    assert!(err.contains("encrypted"), "{err}");
    assert!(!e.path("nokey.img").exists());

    // Sync: a plaintext local datastore to the bucket, and back into a new local one.
    let local = e.path("local");
    let other = e.path("other.img");
    let other_data = source(8 << 20, 7);
    std::fs::write(&other, &other_data).unwrap();
    e.ok(&[
        "backup",
        "create",
        s(&other),
        "--store",
        s(&local),
        "--id",
        "image/other",
    ]);
    let synced = e.ok(&[
        "backup",
        "sync",
        "--from",
        s(&local),
        "--to",
        s(&e.path("cache")),
        "--to-key",
        &env.key,
        "--passphrase-file",
        s(&e.path("pass")),
    ]);
    assert!(synced.contains("1 snapshots copied"), "{synced}");
    e.ok(&[
        "backup",
        "key",
        "show",
        &env.key,
        "--passphrase-file",
        s(&e.path("pass")),
    ]);
    let back = e.path("back");
    e.ok(&[
        "backup",
        "init",
        "--store",
        s(&back),
        "--key",
        &env.key,
        "--passphrase-file",
        s(&e.path("pass")),
    ]);
    // Another key is refused.
    let plain_key = e.path("plain.key");
    e.ok(&["backup", "key", "create", s(&plain_key)]);
    let err = e.fails(&[
        "backup",
        "sync",
        "--from",
        s(&e.path("cache")),
        "--from-key",
        s(&plain_key),
        "--to",
        s(&back),
    ]);
    assert!(err.contains("not with the given key"), "{err}");
    let mut sync_back = vec![
        "backup".to_string(),
        "sync".into(),
        "--from".into(),
        s(&e.path("cache")).into(),
        "--to".into(),
        s(&back).into(),
        "--snapshots".into(),
        "image/".into(),
    ];
    sync_back.extend(["--from-key".into(), env.key.clone()]);
    sync_back.extend(["--to-key".into(), env.key.clone()]);
    sync_back.extend(["--passphrase-file".into(), s(&e.path("pass")).into()]);
    let refs: Vec<&str> = sync_back.iter().map(String::as_str).collect();
    let out = e.ok(&refs);
    assert!(out.contains("3 snapshots copied"), "{out}");
    let mut restore_back: Vec<String> = vec!["backup".into(), "restore".into()];
    restore_back.extend(["image/other".into(), s(&e.path("o.img")).into()]);
    restore_back.extend([
        "--store".into(),
        s(&back).into(),
        "--key".into(),
        env.key.clone(),
    ]);
    restore_back.extend(["--passphrase-file".into(), s(&e.path("pass")).into()]);
    let refs: Vec<&str> = restore_back.iter().map(String::as_str).collect();
    e.ok(&refs);
    assert!(std::fs::read(e.path("o.img")).unwrap() == other_data);

    // Prune the first snapshot, gc with repacking; all that remains verifies and restores.
    env.ok(
        &["backup", "prune", "--keep-last", "1", "--id", "image/disk"],
        "cache",
    );
    let gc = env.json(
        &["backup", "gc", "--repack-below", "0.95", "--grace", "1"],
        "cache",
    );
    let p = &gc["packs"];
    assert!(
        p["packs-repacked"].as_u64().unwrap() + p["packs-removed"].as_u64().unwrap() > 0,
        "{gc}"
    );
    env.init("cache3", &env.endpoint);
    let v = env.json(&["backup", "verify", "--all"], "cache3");
    assert_eq!(v["snapshots"].as_array().unwrap().len(), 2, "{v}");
    env.ok(
        &["backup", "restore", &second, s(&e.path("r3.img"))],
        "cache3",
    );
    assert!(std::fs::read(e.path("r3.img")).unwrap() == data);
    env.ok(
        &["backup", "restore", "image/other", s(&e.path("r4.img"))],
        "cache3",
    );
    assert!(std::fs::read(e.path("r4.img")).unwrap() == other_data);

    // Not one object of the bucket holds the source's plaintext.
    assert!(no_plaintext_in(&o) > 3);
}

/// A TCP proxy in front of radosgw that, when `cut` is set, closes every connection once more
/// than `after` bytes went upstream in total.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    after: Arc<AtomicU64>,
}

impl Proxy {
    fn start(upstream: &str) -> Proxy {
        let target = upstream.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let after = Arc::new(AtomicU64::new(u64::MAX));
        let (c2, s2, a2) = (cut.clone(), sent.clone(), after.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let (c, sn, af) = (c2.clone(), s2.clone(), a2.clone());
                let (cr, sw) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || pump(cr, sw, Some((c, sn, af))));
                std::thread::spawn(move || pump(server, client, None));
            }
        });
        Proxy {
            port,
            cut,
            sent,
            after,
        }
    }
}

type Meter = (Arc<AtomicBool>, Arc<AtomicU64>, Arc<AtomicU64>);

fn pump(mut from: TcpStream, mut to: TcpStream, meter: Option<Meter>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((cut, sent, after)) = &meter {
            let total = sent.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
            if cut.load(Ordering::Relaxed) && total > after.load(Ordering::Relaxed) {
                break;
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

#[test]
fn connections_dropped_mid_backup_leave_no_partial_snapshot() {
    let Some(c) = rgw_cluster("S3 datastore on radosgw, failure mid-backup") else {
        return;
    };
    let env = S3Env::new(c);
    let e = &env.e;
    let proxy = Proxy::start(&env.endpoint);
    env.init("cache", &format!("http://127.0.0.1:{}", proxy.port));
    let src = e.path("disk.img");
    let data = source(24 << 20, 3);
    std::fs::write(&src, &data).unwrap();
    // From 4 MiB into the upload on, every connection is cut.
    proxy.after.store(
        proxy.sent.load(Ordering::Relaxed) + (4 << 20),
        Ordering::Relaxed,
    );
    proxy.cut.store(true, Ordering::Relaxed);
    let mut a: Vec<String> = ["backup", "create", s(&src), "--id", "image/disk"]
        .iter()
        .map(|x| x.to_string())
        .collect();
    a.extend(env.store("cache"));
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    let o = e.run(&refs);
    assert!(
        !o.status.success(),
        "the backup went through a cut connection"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("S3") || err.contains("pack"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // The connection is back. No snapshot is visible: not in the bucket, not through the
    // datastore.
    proxy.cut.store(false, Ordering::Relaxed);
    let bucket = objects(c, &env.bucket, None);
    assert!(bucket.list("snapshots/").unwrap().is_empty());
    let listed = env.json(&["backup", "list"], "cache");
    assert_eq!(listed.as_array().unwrap().len(), 0, "{listed}");
    // The next backup succeeds and restores.
    let ok = env.json(
        &["backup", "create", s(&src), "--id", "image/disk"],
        "cache",
    );
    let snap = ok["snapshot"].as_str().unwrap().to_string();
    env.ok(&["backup", "restore", &snap, s(&e.path("r.img"))], "cache");
    assert!(std::fs::read(e.path("r.img")).unwrap() == data);
    let v = env.json(&["backup", "verify", "--all"], "cache");
    assert_eq!(v["snapshots"].as_array().unwrap().len(), 1, "{v}");
    assert!(no_plaintext_in(&bucket) > 2);
}

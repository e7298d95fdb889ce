//! S3 datastores against a real S3 implementation: radosgw of the test Ceph cluster
//! (scripts/ceph-cluster.sh --rgw), through the `strata` binary. No mock: a counting,
//! fault-injecting proxy (strata_tests::s3proxy) sits in front of radosgw where a test counts
//! requests or breaks connections.
//!
//! - full backup, a 1% change and an incremental backup, restore and verify, all against the
//!   bucket (a fresh local folder each time, so every chunk comes from it);
//! - sync local → S3 → local;
//! - prune and a gc that repacks, after which every remaining snapshot verifies and restores;
//! - connections cut mid-backup: a clean failure, no visible partial snapshot, gc removes the
//!   orphan packs, and the next backup succeeds; a transient cut and 503 SlowDown answers are
//!   retried and the backup succeeds;
//! - no object of the bucket holds plaintext of the source (and the same search finds it in a
//!   datastore made with --insecure-plaintext, so the search can fail);
//! - the appliance: `strata backups store add … --s3`, then backups, restore (also live),
//!   verify, prune, gc and sync through the API with `--store`.
//!
//! Without the Ceph packages these tests show as ignored with the reason, unless `CI` is set:
//! then they fail.

use std::path::Path;

use strata_backup::objects::Objects;
use strata_backup::s3::{S3Config, S3Objects};
use strata_tests::ceph::{rgw_cluster, unique, TestCluster};
use strata_tests::s3proxy::S3Proxy;

mod common;
use common::{CliEnv, Server};

/// Plaintext that appears in the source, in chunks that do not compress (so a plaintext
/// datastore stores it verbatim).
const PATTERN: &[u8] = b"Strata plaintext marker 0123456789 ";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A source of mixed content in 256 KiB pieces: the pattern repeated (compressible, all pieces
/// alike), random, zeros, and random with the pattern every 4 KiB (incompressible plaintext).
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
                rng.fill(piece);
                for block in piece.chunks_mut(4096) {
                    block[..PATTERN.len()].copy_from_slice(PATTERN);
                }
            }
        }
    }
    data
}

fn make_bucket(c: &TestCluster) -> String {
    let bucket = unique("strata").to_lowercase();
    let (ak, sk) = c.s3_keys.clone().unwrap();
    let url = format!("{}/{bucket}", c.rgw_endpoint.as_deref().unwrap());
    let out = std::process::Command::new("curl")
        .args(["-sf", "-X", "PUT", "--aws-sigv4", "aws:amz:us-east-1:s3"])
        .args(["--user", &format!("{ak}:{sk}")])
        .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", &url])
        .output()
        .expect("curl (scripts/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "creating bucket {bucket}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    bucket
}

/// The bucket as objects, straight from radosgw (not through a proxy).
fn objects(c: &TestCluster, bucket: &str) -> S3Objects {
    let (ak, sk) = c.s3_keys.clone().unwrap();
    S3Objects::new(&S3Config {
        endpoint: c.rgw_endpoint.clone().unwrap(),
        bucket: bucket.into(),
        prefix: String::new(),
        region: "us-east-1".into(),
        path_style: true,
        access_key: ak,
        secret_key: sk,
    })
    .unwrap()
}

/// Keys of the objects that hold the pattern.
fn objects_with_plaintext(o: &S3Objects) -> (Vec<String>, usize) {
    let listed = o.list("").unwrap();
    let found = listed
        .iter()
        .filter(|l| {
            let bytes = o.get(&l.key, 1 << 30).unwrap().unwrap();
            bytes.windows(PATTERN.len()).any(|w| w == PATTERN)
        })
        .map(|l| l.key.clone())
        .collect();
    (found, listed.len())
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
        let bucket = make_bucket(c);
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

    /// `strata backup init` of an S3 datastore with local folder `cache`, reaching the bucket
    /// at `endpoint` (radosgw, or a proxy in front of it); 64 KiB chunks, 4 MiB packs, a cache
    /// of 8 MiB.
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
            "64K",
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
    fn store(&self, cache: &str) -> Vec<String> {
        vec![
            "--store".into(),
            s(&self.e.path(cache)).into(),
            "--key".into(),
            self.key.clone(),
            "--passphrase-file".into(),
            s(&self.e.path("pass")).into(),
        ]
    }

    fn args(&self, args: &[&str], cache: &str) -> Vec<String> {
        let mut a: Vec<String> = args.iter().map(|x| x.to_string()).collect();
        a.extend(self.store(cache));
        a
    }

    fn ok(&self, args: &[&str], cache: &str) -> String {
        let a = self.args(args, cache);
        self.e.ok(&a.iter().map(String::as_str).collect::<Vec<_>>())
    }

    fn json(&self, args: &[&str], cache: &str) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        serde_json::from_str(&self.ok(&a, cache)).unwrap()
    }

    fn run(&self, args: &[&str], cache: &str) -> std::process::Output {
        let a = self.args(args, cache);
        self.e
            .run(&a.iter().map(String::as_str).collect::<Vec<_>>())
    }
}

fn s3_backup_incremental_restore_verify_sync_prune_gc() {
    let c = rgw_cluster();
    let env = S3Env::new(c);
    let e = &env.e;
    let proxy = S3Proxy::start(&env.endpoint).unwrap();
    let out = env.init("cache", &proxy.endpoint());
    assert!(out.contains("encrypted with key"), "{out}");
    let src = e.path("disk.img");
    let mut data = source(32 << 20, 1);
    std::fs::write(&src, &data).unwrap();

    // Full backup: one PUT per pack, then the index and the manifest.
    let before = proxy.counts();
    let full = env.json(
        &["backup", "create", s(&src), "--id", "image/disk"],
        "cache",
    );
    let puts = proxy.counts().put - before.put;
    let first = full["snapshot"].as_str().unwrap().to_string();
    let new_chunks = full["stats"]["chunks-new"].as_u64().unwrap();
    assert!(full["encryption"]["key-fingerprint"].is_string(), "{full}");
    let o = objects(c, &env.bucket);
    let packs = o.list("packs/").unwrap().len() as u64;
    assert!(new_chunks >= 250, "{full}");
    assert_eq!(puts, packs + 2, "{packs} packs, index and manifest");
    assert!(
        puts * 10 <= new_chunks,
        "{puts} PUTs for {new_chunks} chunks: not 10x fewer than one object per chunk"
    );
    assert_eq!(proxy.counts().unframed, 0);

    // 1% change (random data, so that the old chunks die), incremental.
    let off = (7 << 20) + (256 << 10);
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
    // comes from the bucket, and verify reads every chunk from it again (not from the cache).
    env.init("cache2", &proxy.endpoint());
    env.ok(
        &["backup", "restore", &second, s(&e.path("r2.img"))],
        "cache2",
    );
    assert!(std::fs::read(e.path("r2.img")).unwrap() == data);
    let before = proxy.counts();
    let v = env.json(&["backup", "verify", "--all"], "cache2");
    let gets = proxy.counts().get - before.get;
    assert_eq!(v["snapshots"].as_array().unwrap().len(), 2, "{v}");
    let checked = v["chunks-checked"].as_u64().unwrap();
    assert!(checked >= new_chunks, "{v}");
    assert!(
        gets >= checked + 4,
        "{gets} GETs to verify {checked} chunks"
    );
    // Without the key: a clear error, and nothing written.
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
    let pass = e.path("pass");
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
        s(&pass),
    ]);
    assert!(synced.contains("1 snapshots copied"), "{synced}");
    let back = e.path("back");
    e.ok(&[
        "backup",
        "init",
        "--store",
        s(&back),
        "--key",
        &env.key,
        "--passphrase-file",
        s(&pass),
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
    let out = e.ok(&[
        "backup",
        "sync",
        "--from",
        s(&e.path("cache")),
        "--to",
        s(&back),
        "--snapshots",
        "image/",
        "--from-key",
        &env.key,
        "--to-key",
        &env.key,
        "--passphrase-file",
        s(&pass),
    ]);
    assert!(out.contains("3 snapshots copied"), "{out}");
    e.ok(&[
        "backup",
        "restore",
        "image/other",
        s(&e.path("o.img")),
        "--store",
        s(&back),
        "--key",
        &env.key,
        "--passphrase-file",
        s(&pass),
    ]);
    assert!(std::fs::read(e.path("o.img")).unwrap() == other_data);

    // Prune the first snapshot, gc with repacking; all that remains verifies and restores.
    env.ok(
        &["backup", "prune", "--keep-last", "1", "--id", "image/disk"],
        "cache",
    );
    let gc = env.json(
        &["backup", "gc", "--repack-below", "0.99", "--grace", "1"],
        "cache",
    );
    let p = &gc["packs"];
    assert!(p["packs-repacked"].as_u64().unwrap() > 0, "{gc}");
    assert!(p["chunks-moved"].as_u64().unwrap() > 0, "{gc}");
    env.init("cache3", &env.endpoint);
    let v = env.json(&["backup", "verify", "--all"], "cache3");
    assert_eq!(v["snapshots"].as_array().unwrap().len(), 2, "{v}");
    assert!(v["bad-chunks"].as_array().unwrap().is_empty(), "{v}");
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

    // Not one object of the bucket holds the source's plaintext ...
    let (found, total) = objects_with_plaintext(&o);
    assert!(total > 3);
    assert!(found.is_empty(), "plaintext of the source in {found:?}");
    // ... while the same search finds it in a datastore without encryption.
    let plain_bucket = make_bucket(c);
    e.ok(&[
        "backup",
        "init",
        "--store",
        s(&e.path("plain")),
        "--s3",
        &env.endpoint,
        "--bucket",
        &plain_bucket,
        "--access-key",
        &env.access_key,
        "--secret-file",
        &env.secret_file,
        "--path-style",
        "--insecure-plaintext",
    ]);
    e.ok(&[
        "backup",
        "create",
        s(&src),
        "--store",
        s(&e.path("plain")),
        "--id",
        "image/disk",
    ]);
    let (found, _) = objects_with_plaintext(&objects(c, &plain_bucket));
    assert!(
        !found.is_empty(),
        "the plaintext search cannot find anything"
    );
}

fn connections_cut_mid_backup_leave_no_partial_snapshot() {
    let c = rgw_cluster();
    let env = S3Env::new(c);
    let e = &env.e;
    let proxy = S3Proxy::start(&env.endpoint).unwrap();
    env.init("cache", &proxy.endpoint());
    let src = e.path("disk.img");
    let data = source(24 << 20, 3);
    std::fs::write(&src, &data).unwrap();
    // From 10 MiB into the upload on, every connection is cut: two packs go up, no more.
    proxy.cut_after(10 << 20, false);
    let o = env.run(
        &["backup", "create", s(&src), "--id", "image/disk"],
        "cache",
    );
    assert!(
        !o.status.success(),
        "the backup went through cut connections"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("S3") || err.contains("pack"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(proxy.counts().cut > 0);
    // The connection is back. No snapshot is visible: not in the bucket, not through the
    // datastore.
    proxy.heal();
    let bucket = objects(c, &env.bucket);
    assert!(bucket.list("snapshots/").unwrap().is_empty());
    let listed = env.json(&["backup", "list"], "cache");
    assert_eq!(listed.as_array().unwrap().len(), 0, "{listed}");
    // What did go up is garbage: gc removes it.
    let orphans = bucket.list("packs/").unwrap().len() as u64;
    assert!(orphans >= 1, "no pack went up before the cut");
    let gc = env.json(&["backup", "gc", "--grace", "1"], "cache");
    assert_eq!(gc["packs"]["packs-removed"].as_u64(), Some(orphans), "{gc}");
    assert!(bucket.list("packs/").unwrap().is_empty());
    // The next backup succeeds, restores and verifies.
    let ok = env.json(
        &["backup", "create", s(&src), "--id", "image/disk"],
        "cache",
    );
    let snap = ok["snapshot"].as_str().unwrap().to_string();
    env.init("cache2", &env.endpoint);
    env.ok(&["backup", "restore", &snap, s(&e.path("r.img"))], "cache2");
    assert!(std::fs::read(e.path("r.img")).unwrap() == data);
    let v = env.json(&["backup", "verify", "--all"], "cache2");
    assert_eq!(v["snapshots"].as_array().unwrap().len(), 1, "{v}");
    let (found, _) = objects_with_plaintext(&bucket);
    assert!(found.is_empty(), "plaintext of the source in {found:?}");
}

fn a_transient_cut_and_throttling_are_retried() {
    let c = rgw_cluster();
    let env = S3Env::new(c);
    let e = &env.e;
    let proxy = S3Proxy::start(&env.endpoint).unwrap();
    env.init("cache", &proxy.endpoint());
    let src = e.path("disk.img");
    let data = source(16 << 20, 5);
    std::fs::write(&src, &data).unwrap();
    // The first requests (the listings when the datastore opens) get 503 SlowDown; one
    // connection is cut 3 MiB into the upload of the packs.
    proxy.throttle(3);
    proxy.cut_after(3 << 20, true);
    // A group id with `+` (object keys carry snapshot names as they are).
    let ok = env.json(
        &["backup", "create", s(&src), "--id", "image/disk+1"],
        "cache",
    );
    let counts = proxy.counts();
    assert_eq!(counts.throttled, 3, "{counts:?}");
    assert!(counts.cut >= 1, "{counts:?}");
    let snap = ok["snapshot"].as_str().unwrap().to_string();
    env.init("cache2", &env.endpoint);
    env.ok(&["backup", "restore", &snap, s(&e.path("r.img"))], "cache2");
    assert!(std::fs::read(e.path("r.img")).unwrap() == data);
    let v = env.json(&["backup", "verify", "--all"], "cache2");
    assert!(v["bad-chunks"].as_array().unwrap().is_empty(), "{v}");
}

fn object_operations_on_radosgw() {
    let c = rgw_cluster();
    let bucket = make_bucket(c);
    let o = objects(c, &bucket);
    // Past the multipart threshold: a large object goes up in parts.
    let big = strata_backup::s3::MULTIPART_THRESHOLD + (3 << 20);
    strata_backup::objects::check_conformance(&o, big);
    // Under a prefix, keys are relative to it.
    let (ak, sk) = c.s3_keys.clone().unwrap();
    let under = S3Objects::new(&S3Config {
        endpoint: c.rgw_endpoint.clone().unwrap(),
        bucket: bucket.clone(),
        prefix: "site-a".into(),
        region: "us-east-1".into(),
        path_style: true,
        access_key: ak,
        secret_key: sk,
    })
    .unwrap();
    under.put("k", b"v".to_vec()).unwrap();
    let keys: Vec<String> = under.list("").unwrap().into_iter().map(|l| l.key).collect();
    assert_eq!(keys, ["k"]);
    assert_eq!(o.get("site-a/k", 10).unwrap().unwrap(), b"v");
    // Create-if-absent is radosgw's (If-None-Match: *), not a look before the put.
    assert!(!under.put_new("k", b"w".to_vec()).unwrap());
    assert_eq!(under.get("k", 10).unwrap().unwrap(), b"v");
    assert_eq!(o.conditional_puts(), Some(true));
}

fn the_appliance_backs_up_to_an_s3_datastore_through_the_api() {
    let c = rgw_cluster();
    let bucket = make_bucket(c);
    let (ak, sk) = c.s3_keys.clone().unwrap();
    let srv = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let remote = srv.remote_args();
    let strata = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(&remote)
            .args(args)
            .env_remove("STRATA_REMOTE")
            .env_remove("STRATA_TOKEN")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let ok = |args: &[&str]| {
        let (good, out, err) = strata(args);
        assert!(good, "strata {args:?}: {err}");
        out
    };
    let json = |args: &[&str]| -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        serde_json::from_str(ok(&a).trim()).unwrap()
    };
    let (secret, key, pass) = (p("secret"), p("key"), p("pass"));
    std::fs::write(&secret, format!("{sk}\n")).unwrap();
    std::fs::write(&pass, "a passphrase with spaces \n").unwrap();
    ok(&[
        "backups",
        "key",
        "create",
        s(&key),
        "--passphrase-file",
        s(&pass),
    ]);
    let endpoint = c.rgw_endpoint.clone().unwrap();
    let s3 = [
        "--s3",
        &endpoint,
        "--bucket",
        &bucket,
        "--access-key",
        &ak,
        "--secret-file",
        s(&secret),
        "--path-style",
    ];
    // Without a key an S3 datastore is refused.
    let mut a = vec!["backups", "store", "add", "plain"];
    a.extend(s3);
    let (good, _, err) = strata(&a);
    assert!(!good && err.contains("--insecure-plaintext"), "{err}");
    let mut a = vec!["backups", "store", "add", "offsite"];
    a.extend(s3);
    a.extend([
        "--key",
        s(&key),
        "--passphrase-file",
        s(&pass),
        "--chunk-size",
        "256K",
        "--pack-size",
        "2M",
    ]);
    let added = json(&a);
    assert_eq!(added["kind"], "s3", "{added}");
    assert!(added["encryption"].is_string(), "{added}");
    let stores = json(&["backups", "store", "list"]);
    let names: Vec<&str> = stores
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["local", "offsite"]);
    // The server keeps the secret and its copy of the key owner-only.
    for f in ["secret", "key"] {
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::metadata(srv.data.join("backup-stores/offsite").join(f)).unwrap();
        assert_eq!(m.permissions().mode() & 0o077, 0, "{f}");
    }

    let data = source(16 << 20, 11);
    std::fs::write(p("disk.raw"), &data).unwrap();
    ok(&[
        "images",
        "import",
        "-q",
        "-f",
        "raw",
        "-O",
        "raw",
        s(&p("disk.raw")),
        "disk.raw",
    ]);
    let done = json(&[
        "backups",
        "create",
        "-q",
        "image:disk.raw",
        "--store",
        "offsite",
    ]);
    let snap = done["snapshot"].as_str().unwrap().to_string();
    assert!(json(&["backups", "list"]).as_array().unwrap().is_empty());
    let listed = json(&["backups", "list", "--store", "offsite"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    let v = json(&["backups", "verify", "-q", "--store", "offsite"]);
    assert!(v["bad-chunks"].as_array().unwrap().is_empty(), "{v}");
    ok(&[
        "backups",
        "restore",
        "-q",
        &snap,
        "image:back.raw",
        "--store",
        "offsite",
    ]);
    ok(&["images", "export", "back.raw", s(&p("back.raw"))]);
    assert!(std::fs::read(p("back.raw")).unwrap() == data);
    // A live restore onto a volume from the bucket.
    ok(&["volumes", "create", "--size", "16M", "strata/vm-1-disk-0"]);
    ok(&[
        "backups",
        "restore",
        "-q",
        "--live",
        &snap,
        "lv:strata/vm-1-disk-0",
        "--store",
        "offsite",
    ]);
    ok(&["volumes", "export", "strata/vm-1-disk-0", s(&p("vol.raw"))]);
    assert!(std::fs::read(p("vol.raw")).unwrap() == data);

    // Sync from the appliance's own datastore to the bucket; prune and gc there.
    ok(&["backups", "create", "-q", "image:disk.raw"]);
    ok(&[
        "backups", "sync", "-q", "--from", "local", "--to", "offsite",
    ]);
    let listed = json(&["backups", "list", "--store", "offsite"]);
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    let id = snap.rsplit_once('/').unwrap().0.to_string();
    json(&[
        "backups",
        "prune",
        "--store",
        "offsite",
        &id,
        "--keep-last",
        "1",
    ]);
    json(&["backups", "gc", "-q", "--store", "offsite"]);
    let listed = json(&["backups", "list", "--store", "offsite"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    let v = json(&["backups", "verify", "-q", "--store", "offsite"]);
    assert!(v["bad-chunks"].as_array().unwrap().is_empty(), "{v}");
    let (found, total) = objects_with_plaintext(&objects(c, &bucket));
    assert!(total > 3);
    assert!(found.is_empty(), "plaintext of the source in {found:?}");
}

strata_testkit::main!(
    s3_backup_incremental_restore_verify_sync_prune_gc,
    connections_cut_mid_backup_leave_no_partial_snapshot,
    a_transient_cut_and_throttling_are_retried,
    object_operations_on_radosgw,
    the_appliance_backs_up_to_an_s3_datastore_through_the_api,
);

//! Encrypted datastores and pack datastores (objects in a folder, the same code that serves S3;
//! tests against a real S3 implementation are in cli/tests/s3_datastore.rs): keyed chunk ids,
//! no plaintext at rest, a clear error without the key, signed manifests; packs with their
//! index, a bounded cache, prune and repacking gc, and sync between datastores.

mod common;

use std::path::Path;

use common::*;
use strata_backup::crypt::{create_key_file, CryptKey};
use strata_backup::remote::RemoteSpec;
use strata_backup::store::CreateOptions;
use strata_backup::{Changes, Datastore, NoProgress};

const CHUNK: u32 = 64 << 10;
const PATTERN: &[u8] = b"The quick brown fox backs up the lazy dog. ";

fn new_key() -> CryptKey {
    create_key_file(None).unwrap().1
}

/// Every file under `dir` (recursively).
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

fn holds(path: &Path, pattern: &[u8]) -> bool {
    std::fs::read(path)
        .unwrap()
        .windows(pattern.len())
        .any(|w| w == pattern)
}

fn dir_spec(objects: &Path, pack_size: u64, cache_bytes: u64) -> RemoteSpec {
    RemoteSpec {
        kind: "dir".into(),
        s3: None,
        secret_file: None,
        dir: Some(objects.to_path_buf()),
        pack_size,
        cache_bytes,
    }
}

#[test]
fn an_encrypted_local_datastore_hides_data_and_needs_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = new_key();
    let root = dir.path().join("store");
    let store = Datastore::create_with(
        &root,
        &CreateOptions {
            chunk_size: CHUNK,
            key: Some(key.clone()),
            key_file: None,
        },
    )
    .unwrap();
    assert_eq!(store.encryption(), Some(key.fingerprint()));
    let src = dir.path().join("src.img");
    let data = mixed_data(4 << 20, CHUNK as usize, 11);
    assert!(data.windows(PATTERN.len()).any(|w| w == PATTERN));
    write_raw(&src, &data);
    let out = backup(
        &store,
        open_ro(&src).unwrap(),
        "image/a",
        Changes::Untracked,
    )
    .unwrap();
    let enc = out.manifest.encryption.as_ref().unwrap();
    assert_eq!(enc.key_fingerprint, key.fingerprint());
    assert!(out.manifest.signature.is_some());
    // No chunk file holds the pattern, and chunk ids are not the plain BLAKE3 of any chunk.
    let chunk_files: Vec<_> = files(&root.join("chunks"));
    assert!(!chunk_files.is_empty());
    for f in &chunk_files {
        assert!(!holds(f, PATTERN), "{} holds plaintext", f.display());
    }
    let plain_ids: std::collections::HashSet<String> = data
        .chunks(CHUNK as usize)
        .map(|c| strata_backup::Digest::of(c).to_hex())
        .collect();
    for f in &chunk_files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        assert!(!plain_ids.contains(&name), "chunk id {name} is unkeyed");
    }
    assert_eq!(
        restore_raw(&store, &out.snapshot, &dir.path().join("r.img")).unwrap(),
        data
    );

    // Without the key: listing works, restoring says what is missing.
    let keyless = Datastore::open(&root).unwrap();
    assert_eq!(keyless.list().unwrap(), vec![out.snapshot.clone()]);
    let e = restore_raw(&keyless, &out.snapshot, &dir.path().join("n.img")).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("encrypted") && msg.contains(key.fingerprint()),
        "{msg}"
    );
    let e = backup(
        &keyless,
        open_ro(&src).unwrap(),
        "image/a",
        Changes::Untracked,
    )
    .unwrap_err();
    assert!(e.to_string().contains("--key"), "{e}");
    // With another key: refused at once.
    let e = Datastore::open(&root)
        .unwrap()
        .with_key(new_key())
        .unwrap_err();
    assert!(e.to_string().contains("not with the given key"), "{e}");

    // A manifest edited on disk fails its signature.
    let mpath = store.snapshot_dir(&out.snapshot).join("manifest");
    let mut m = store.read_manifest(&out.snapshot).unwrap();
    m.source = "forged".into();
    std::fs::write(&mpath, m.encode().unwrap()).unwrap();
    let e = store.read_snapshot(&out.snapshot).unwrap_err();
    assert!(e.to_string().contains("signature"), "{e}");
}

#[test]
fn a_pack_datastore_backs_up_restores_prunes_and_repacks() {
    let dir = tempfile::tempdir().unwrap();
    let key = new_key();
    let objects = dir.path().join("bucket");
    let cache = dir.path().join("cache");
    let opts = CreateOptions {
        chunk_size: CHUNK,
        key: Some(key.clone()),
        key_file: None,
    };
    // Without a key and without --insecure-plaintext, a pack datastore is refused.
    let e = Datastore::create_remote(
        &cache,
        dir_spec(&objects, 1 << 20, 8 << 20),
        &CreateOptions {
            chunk_size: CHUNK,
            key: None,
            key_file: None,
        },
        false,
    )
    .unwrap_err();
    assert!(e.to_string().contains("insecure-plaintext"), "{e}");
    let store =
        Datastore::create_remote(&cache, dir_spec(&objects, 1 << 20, 2 << 20), &opts, false)
            .unwrap();
    let src = dir.path().join("src.img");
    let mut data = mixed_data(8 << 20, CHUNK as usize, 5);
    write_raw(&src, &data);
    let first = backup(
        &store,
        open_ro(&src).unwrap(),
        "image/a",
        Changes::Untracked,
    )
    .unwrap();
    let new_chunks = first.manifest.stats.chunks_new;
    let packs: Vec<_> = files(&objects.join("packs"));
    assert!(new_chunks >= 40, "{new_chunks}");
    assert!(
        (packs.len() as u64) * 10 <= new_chunks,
        "{} packs for {new_chunks} chunks",
        packs.len()
    );
    for f in files(&objects) {
        assert!(!holds(&f, PATTERN), "{} holds plaintext", f.display());
    }

    // 1% change, incremental.
    let old = data.clone();
    let off = 3 << 20;
    data[off..off + 80_000].fill(0x5a);
    write_raw(&src, &data);
    let changes = Changes::Dirty {
        origin: "test".into(),
        base: first.snapshot.to_string(),
        ranges: vec![(off as u64, 80_000)],
    };
    let second = backup(&store, open_ro(&src).unwrap(), "image/a", changes).unwrap();
    assert_eq!(second.manifest.change_tracking.mode, "incremental");
    assert!(second.manifest.stats.chunks_new <= 3);

    // A fresh cache folder attached to the same objects sees both snapshots and restores them
    // (through ranged reads; the cache bound holds).
    let other = dir.path().join("cache2");
    let attached =
        Datastore::create_remote(&other, dir_spec(&objects, 1 << 20, 1 << 20), &opts, false)
            .unwrap();
    assert_eq!(attached.list().unwrap().len(), 2);
    assert_eq!(
        restore_raw(&attached, &first.snapshot, &dir.path().join("a.img")).unwrap(),
        old
    );
    assert_eq!(
        restore_raw(&attached, &second.snapshot, &dir.path().join("b.img")).unwrap(),
        data
    );
    let cached: u64 = files(&other.join("cache"))
        .iter()
        .map(|f| f.metadata().unwrap().len())
        .sum();
    assert!(cached <= 1 << 20, "cache holds {cached} bytes");
    let t = attached.remote().unwrap().traffic();
    assert!(t.gets > 0);

    // A third snapshot of other data, then prune the first two and gc: packs of the old
    // snapshots go or are rewritten, and what remains restores and verifies.
    let data3 = mixed_data(8 << 20, CHUNK as usize, 99);
    let src3 = dir.path().join("src3.img");
    write_raw(&src3, &data3);
    let third = backup(
        &store,
        open_ro(&src3).unwrap(),
        "image/b",
        Changes::Untracked,
    )
    .unwrap();
    // Keep the second only: most of its chunks are shared with the first.
    strata_backup::prune::remove_snapshot(&store, &first.snapshot).unwrap();
    let before = files(&objects.join("packs")).len();
    let stats = strata_backup::gc::gc_with(&store, 1, 0.9, &NoProgress).unwrap();
    let packs = stats.packs.unwrap();
    assert!(packs.packs_repacked + packs.packs_removed > 0, "{packs:?}");
    assert!(files(&objects.join("packs")).len() <= before);
    let report =
        strata_backup::verify::verify(&store, &store.list().unwrap(), 2, &NoProgress).unwrap();
    assert!(report.ok(), "{report:?}");
    // Through a cold cache: every chunk comes from the rewritten packs.
    let cold = dir.path().join("cache3");
    let cold =
        Datastore::create_remote(&cold, dir_spec(&objects, 1 << 20, 0), &opts, false).unwrap();
    assert_eq!(
        cold.list().unwrap(),
        vec![second.snapshot.clone(), third.snapshot.clone()]
    );
    assert_eq!(
        restore_raw(&cold, &second.snapshot, &dir.path().join("c.img")).unwrap(),
        data
    );
    assert_eq!(
        restore_raw(&cold, &third.snapshot, &dir.path().join("d.img")).unwrap(),
        data3
    );
    // The pruned snapshot is gone from the bucket too.
    assert!(!objects
        .join("snapshots")
        .join(first.snapshot.to_string())
        .join("manifest")
        .exists());
}

#[test]
fn sync_copies_between_plaintext_local_and_encrypted_pack_datastores() {
    let dir = tempfile::tempdir().unwrap();
    let local = Datastore::create_with_chunk_size(&dir.path().join("local"), CHUNK).unwrap();
    let src = dir.path().join("src.img");
    let data = mixed_data(4 << 20, CHUNK as usize, 21);
    write_raw(&src, &data);
    let a = backup(
        &local,
        open_ro(&src).unwrap(),
        "image/a",
        Changes::Untracked,
    )
    .unwrap();

    let key = new_key();
    let objects = dir.path().join("bucket");
    let opts = CreateOptions {
        chunk_size: CHUNK,
        key: Some(key.clone()),
        key_file: None,
    };
    let remote = Datastore::create_remote(
        &dir.path().join("cache"),
        dir_spec(&objects, 1 << 20, 4 << 20),
        &opts,
        false,
    )
    .unwrap();
    let s = strata_backup::sync::sync(&local, &remote, &[], &NoProgress).unwrap();
    assert_eq!(s.copied, vec![a.snapshot.to_string()]);
    assert!(s.rekeyed && s.chunks_transferred > 0);
    for f in files(&objects) {
        assert!(!holds(&f, PATTERN), "{} holds plaintext", f.display());
    }
    // Again: nothing to do.
    let again = strata_backup::sync::sync(&local, &remote, &[], &NoProgress).unwrap();
    assert_eq!((again.copied.len(), again.skipped), (0, 1));

    // Back to a new local datastore with the same key: blobs copied as they are.
    let back = Datastore::create_with(&dir.path().join("back"), &opts).unwrap();
    let s = strata_backup::sync::sync(&remote, &back, &["image/a".into()], &NoProgress).unwrap();
    assert!(!s.rekeyed && s.chunks_transferred > 0);
    assert_eq!(
        restore_raw(&back, &a.snapshot, &dir.path().join("r.img")).unwrap(),
        data
    );
    let report =
        strata_backup::verify::verify(&back, &back.list().unwrap(), 2, &NoProgress).unwrap();
    assert!(report.ok());
    let e =
        strata_backup::sync::sync(&remote, &back, &["image/none".into()], &NoProgress).unwrap_err();
    assert!(e.to_string().contains("No snapshot"), "{e}");
}

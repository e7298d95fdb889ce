//! Damage and faults: corrupt chunks, truncated indexes and manifests, garbage collection with
//! running backups, interrupted work, and a full disk.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use strata_backup::gc::gc;
use strata_backup::lock::WriterRegistration;
use strata_backup::prune::{prune, KeepRules};
use strata_backup::verify::verify;
use strata_backup::{Changes, Datastore, NoProgress};
use strata_storage::StorageError;

const CHUNK: u32 = 64 << 10;

fn store_with_two_snapshots(dir: &std::path::Path) -> (Datastore, Vec<u8>, Vec<u8>) {
    let store = Datastore::create_with_chunk_size(&dir.join("store"), CHUNK).unwrap();
    let a = mixed_data(2 << 20, CHUNK as usize, 11);
    let b = mixed_data(2 << 20, CHUNK as usize, 12);
    write_raw(&dir.join("a.img"), &a);
    write_raw(&dir.join("b.img"), &b);
    backup(
        &store,
        open_ro(&dir.join("a.img")).unwrap(),
        "image/a",
        Changes::Untracked,
    )
    .unwrap();
    backup(
        &store,
        open_ro(&dir.join("b.img")).unwrap(),
        "image/b",
        Changes::Untracked,
    )
    .unwrap();
    (store, a, b)
}

fn backdate_all_chunks(store: &Datastore, secs: u64) {
    let t = SystemTime::now() - Duration::from_secs(secs);
    for d in std::fs::read_dir(store.chunks_dir()).unwrap() {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            let f = std::fs::File::options()
                .write(true)
                .open(f.unwrap().path())
                .unwrap();
            f.set_modified(t).unwrap();
        }
    }
}

fn a_corrupt_chunk_is_named_by_verify_and_fails_restore() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, _) = store_with_two_snapshots(dir.path());
    let snap_a = store.list_group("image/a").unwrap().pop().unwrap();
    let snap_b = store.list_group("image/b").unwrap().pop().unwrap();
    let (_, idx) = store.read_snapshot(&snap_a).unwrap();
    let (_, idx_b) = store.read_snapshot(&snap_b).unwrap();
    let in_b: Vec<_> = idx_b.entries().iter().filter_map(|e| e.digest()).collect();
    // A chunk only a uses (shared text chunks would name both snapshots).
    let victim = idx
        .entries()
        .iter()
        .filter_map(|e| e.digest())
        .find(|d| !in_b.contains(d))
        .unwrap();
    let path = store.chunk_path(&victim);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();

    let report = verify(&store, &store.list().unwrap(), 2, &NoProgress).unwrap();
    assert!(!report.ok());
    assert_eq!(report.bad_chunks.len(), 1);
    assert_eq!(report.bad_chunks[0].digest, victim.to_hex());
    assert!(
        report.bad_chunks[0].error.contains("checksum"),
        "{:?}",
        report.bad_chunks
    );
    assert_eq!(report.bad_chunks[0].snapshots, [snap_a.to_string()]);
    let by_name: Vec<(String, bool)> = report
        .snapshots
        .iter()
        .map(|s| (s.snapshot.clone(), s.ok))
        .collect();
    assert!(by_name.contains(&(snap_a.to_string(), false)));
    assert!(by_name
        .iter()
        .any(|(n, ok)| n.starts_with("image/b/") && *ok));

    let e = restore_raw(&store, &snap_a, &dir.path().join("r.img")).unwrap_err();
    assert!(matches!(e, StorageError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains(&victim.to_hex()), "{e}");
}

fn truncated_index_and_manifest_are_reported_and_stop_gc() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, _) = store_with_two_snapshots(dir.path());
    let snaps = store.list().unwrap();
    let idx_path = store.snapshot_dir(&snaps[0]).join("index");
    let len = std::fs::metadata(&idx_path).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&idx_path)
        .unwrap()
        .set_len(len - 20)
        .unwrap();
    let man_path = store.snapshot_dir(&snaps[1]).join("manifest");
    let len = std::fs::metadata(&man_path).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&man_path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    let report = verify(&store, &snaps, 2, &NoProgress).unwrap();
    assert!(report.snapshots.iter().all(|s| !s.ok));
    assert!(
        report.snapshots[0].errors[0].contains("index"),
        "{:?}",
        report.snapshots[0]
    );
    assert!(
        report.snapshots[1].errors[0].contains("manifest"),
        "{:?}",
        report.snapshots[1]
    );

    let before = count_chunks(&store);
    backdate_all_chunks(&store, 3600);
    let e = gc(&store, 1, &NoProgress).unwrap_err();
    assert!(e.to_string().contains("removed nothing"), "{e}");
    assert_eq!(count_chunks(&store), before);
}

fn count_chunks(store: &Datastore) -> usize {
    std::fs::read_dir(store.chunks_dir())
        .unwrap()
        .map(|d| std::fs::read_dir(d.unwrap().path()).unwrap().count())
        .sum()
}

fn gc_removes_only_unreferenced_old_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, b) = store_with_two_snapshots(dir.path());
    let total = count_chunks(&store);
    // Keep group b, drop group a.
    let snap_a = store.list_group("image/a").unwrap().pop().unwrap();
    strata_backup::prune::remove_snapshot(&store, &snap_a).unwrap();

    // Fresh chunks survive: they might belong to a backup that is running.
    let s = gc(&store, 3600, &NoProgress).unwrap();
    assert_eq!(s.chunks_removed, 0);
    assert_eq!(count_chunks(&store), total);

    backdate_all_chunks(&store, 7200);
    let s = gc(&store, 60, &NoProgress).unwrap();
    assert!(s.chunks_removed > 0);
    let report = verify(&store, &store.list().unwrap(), 2, &NoProgress).unwrap();
    assert!(report.ok(), "{report:?}");
    let snap_b = store.list_group("image/b").unwrap().pop().unwrap();
    assert!(restore_raw(&store, &snap_b, &dir.path().join("rb.img")).unwrap() == b);
}

fn gc_keeps_chunks_a_running_backup_may_use() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, _) = store_with_two_snapshots(dir.path());
    let snap_a = store.list_group("image/a").unwrap().pop().unwrap();
    let (_, idx) = store.read_snapshot(&snap_a).unwrap();
    strata_backup::prune::remove_snapshot(&store, &snap_a).unwrap();
    backdate_all_chunks(&store, 7200);
    // A backup registered 2 hours ago is still running and has just touched one of a's chunks
    // (found it already stored): that chunk must survive although no snapshot references it.
    let writer = WriterRegistration::register(&store).unwrap();
    let reused = idx.entries().iter().find_map(|e| e.digest()).unwrap();
    assert!(store.touch_chunk(&reused).unwrap());
    let s = gc(&store, 60, &NoProgress).unwrap();
    assert!(s.chunks_removed > 0);
    assert!(
        store.chunk_path(&reused).exists(),
        "a chunk touched by a running backup was removed"
    );
    drop(writer);
}

fn leftovers_of_killed_runs_are_cleaned_and_set_aside_chunks_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let (store, a, _) = store_with_two_snapshots(dir.path());
    let snap_a = store.list_group("image/a").unwrap().pop().unwrap();
    // A killed backup: dead registration, staging folder, temp chunk file.
    std::fs::write(store.writers_dir().join("999-dead.lock"), b"0").unwrap();
    let staging = store.snapshots_dir().join("image/a/.tmp-999-dead");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join("index"), b"partial").unwrap();
    std::fs::write(store.chunks_dir().join("00/.tmp-abc-1-2"), b"partial").unwrap();
    // A killed gc: a referenced chunk left set aside.
    let (_, idx) = store.read_snapshot(&snap_a).unwrap();
    let d = idx.entries().iter().find_map(|e| e.digest()).unwrap();
    let aside = store.chunk_dir(&d).join(format!("{}.gc-4242", d.to_hex()));
    std::fs::rename(store.chunk_path(&d), &aside).unwrap();
    // Readers find it even before gc runs again.
    assert!(restore_raw(&store, &snap_a, &dir.path().join("r1.img")).unwrap() == a);

    backdate_all_chunks(&store, 7200);
    let s = gc(&store, 60, &NoProgress).unwrap();
    assert!(s.leftovers_removed >= 2, "{s:?}");
    assert!(!staging.exists());
    assert!(store.chunk_path(&d).exists() && !aside.exists());
    assert_eq!(std::fs::read_dir(store.writers_dir()).unwrap().count(), 0);
    assert!(verify(&store, &store.list().unwrap(), 2, &NoProgress)
        .unwrap()
        .ok());
}

fn prune_dry_run_removes_nothing_and_prune_keeps_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let store = Datastore::create_with_chunk_size(&dir.path().join("store"), CHUNK).unwrap();
    let a = mixed_data(1 << 20, CHUNK as usize, 21);
    write_raw(&dir.path().join("a.img"), &a);
    for _ in 0..3 {
        backup(
            &store,
            open_ro(&dir.path().join("a.img")).unwrap(),
            "image/a",
            Changes::Untracked,
        )
        .unwrap();
    }
    let rules = KeepRules {
        last: 1,
        ..Default::default()
    };
    let d = prune(&store, &[], rules, true).unwrap();
    assert_eq!(d.iter().filter(|d| !d.keep).count(), 2);
    assert_eq!(store.list().unwrap().len(), 3);
    prune(&store, &[], rules, false).unwrap();
    let left = store.list().unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(
        left[0].to_string(),
        d.iter().find(|d| d.keep).unwrap().snapshot
    );
}

/// A datastore on a full file system: the backup fails with a clear out-of-space error, no
/// snapshot appears, and the store stays usable. Needs root to mount a small tmpfs.
fn a_full_disk_fails_cleanly() {
    strata_testkit::require_root();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "root could not mount a tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let store = Datastore::create_with_chunk_size(&mnt.join("store"), CHUNK).unwrap();
    let mut big = vec![0u8; 8 << 20];
    fastrand::Rng::with_seed(5).fill(&mut big);
    write_raw(&dir.path().join("big.img"), &big);
    let e = backup(
        &store,
        open_ro(&dir.path().join("big.img")).unwrap(),
        "image/big",
        Changes::Untracked,
    )
    .unwrap_err();
    assert!(matches!(e, StorageError::OutOfSpace(_)), "{e}");
    assert!(
        store.list().unwrap().is_empty(),
        "no snapshot after a failed backup"
    );
    // After gc frees the partial chunks, a small backup fits.
    backdate_all_chunks(&store, 7200);
    gc(&store, 60, &NoProgress).unwrap();
    let small = mixed_data(256 << 10, CHUNK as usize, 6);
    write_raw(&dir.path().join("small.img"), &small);
    let out = backup(
        &store,
        open_ro(&dir.path().join("small.img")).unwrap(),
        "image/small",
        Changes::Untracked,
    )
    .unwrap();
    assert!(restore_raw(&store, &out.snapshot, &dir.path().join("rs.img")).unwrap() == small);
}

/// Backups that reuse old, unreferenced chunks while garbage collection sweeps them in a loop:
/// every snapshot must still verify (the touch / set-aside / re-check protocol in gc.rs). Each
/// image is backed up once, so a chunk lost mid-backup cannot be healed by a later backup.
fn gc_running_alongside_backups_never_removes_a_chunk_they_use() {
    let dir = tempfile::tempdir().unwrap();
    let store = Datastore::create_with_chunk_size(&dir.path().join("store"), CHUNK).unwrap();
    let mut images = Vec::new();
    for k in 0..8 {
        let p = dir.path().join(format!("img{k}"));
        let mut v = vec![0u8; 4 << 20];
        fastrand::Rng::with_seed(40 + k).fill(&mut v);
        write_raw(&p, &v);
        // Half the images were backed up before (their chunks are now old and unreferenced).
        if k % 2 == 0 {
            let out = backup(
                &store,
                open_ro(&p).unwrap(),
                "image/old",
                Changes::Untracked,
            )
            .unwrap();
            strata_backup::prune::remove_snapshot(&store, &out.snapshot).unwrap();
        }
        images.push((p, v));
    }
    backdate_all_chunks(&store, 7200);
    let done = std::sync::atomic::AtomicBool::new(false);
    let (mut sweeps, mut removed) = (0, 0);
    std::thread::scope(|s| {
        s.spawn(|| {
            for (k, (p, _)) in images.iter().enumerate() {
                backup(
                    &store,
                    open_ro(p).unwrap(),
                    &format!("image/new{k}"),
                    Changes::Untracked,
                )
                .unwrap();
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            match gc(&store, 1, &NoProgress) {
                Ok(st) => {
                    sweeps += 1;
                    removed += st.chunks_removed;
                }
                Err(e) => panic!("gc failed: {e}"),
            }
        }
    });
    eprintln!(
        "{sweeps} gc sweeps ran alongside {} backups and removed {removed} chunks",
        images.len()
    );
    let report = verify(&store, &store.list().unwrap(), 2, &NoProgress).unwrap();
    assert!(
        report.ok(),
        "{} chunks lost, first: {:?}",
        report.bad_chunks.len(),
        report.bad_chunks.first()
    );
    for (k, (_, want)) in images.iter().enumerate() {
        let snap = store
            .list_group(&format!("image/new{k}"))
            .unwrap()
            .pop()
            .unwrap();
        assert!(
            restore_raw(&store, &snap, &dir.path().join(format!("r{k}.img"))).unwrap() == *want
        );
    }
}

strata_testkit::main!(
    a_corrupt_chunk_is_named_by_verify_and_fails_restore,
    truncated_index_and_manifest_are_reported_and_stop_gc,
    gc_removes_only_unreferenced_old_chunks,
    gc_keeps_chunks_a_running_backup_may_use,
    leftovers_of_killed_runs_are_cleaned_and_set_aside_chunks_recovered,
    prune_dry_run_removes_nothing_and_prune_keeps_the_newest,
    a_full_disk_fails_cleanly,
    gc_running_alongside_backups_never_removes_a_chunk_they_use,
);

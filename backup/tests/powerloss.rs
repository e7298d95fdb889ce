//! The datastore under power loss: backup (full and incremental), prune, garbage collection and
//! verify, each cut at every operation that changes the disk, through the fault-injecting
//! file-system seam (`strata_backup::faultfs`). After each cut the folder is left as a killed
//! process (`Kill`), a power cut (`PowerLoss`: everything not made durable is gone) or a power
//! cut after a partial write-back (`PowerLossSome`: a seeded random part of it is gone) would
//! leave it. Then, on the real file system:
//!
//! - every listed snapshot restores exactly (it is one we made, with its data);
//! - no snapshot the operation was not asked to remove is missing;
//! - after a garbage collection every listed snapshot still restores exactly and verifies (no
//!   chunk a snapshot needs is gone), and a new backup works.
//!
//! `STRATA_CRASH_SEEDS=N` tries N seeds of `PowerLossSome` at every cut (default 1); CI runs the
//! fixed default.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use strata_backup::faultfs::{Crash, FaultFs};
use strata_backup::gc::gc;
use strata_backup::prune::{prune, KeepRules};
use strata_backup::verify::verify;
use strata_backup::{Changes, Datastore, NoProgress, SnapshotName};

const CHUNK: u32 = 64 << 10;
const SIZE: usize = 8 * CHUNK as usize;

/// What one interrupted operation does.
#[derive(Clone, Copy, Debug)]
enum Op {
    /// A full backup of new data into a new group.
    FullBackup,
    /// An incremental backup of group `vm/a` (its latest snapshot plus dirty ranges).
    IncrementalBackup,
    /// Prune group `vm/a` to its newest snapshot.
    Prune,
    /// Garbage collection (old unreferenced chunks exist).
    Gc,
    /// Verify every snapshot.
    Verify,
}

/// The datastore every run starts from, and what its snapshots hold.
struct Base {
    dir: tempfile::TempDir,
    snapshots: BTreeMap<String, Vec<u8>>,
    /// Data of the source the backups of the operation read.
    new_data: Vec<u8>,
    /// The latest snapshot of `vm/a`.
    latest_a: String,
}

fn source(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    write_raw(&p, data);
    p
}

fn backdate_chunks(store: &Datastore) {
    let t = SystemTime::now() - Duration::from_secs(3600);
    for d in std::fs::read_dir(store.chunks_dir()).unwrap() {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            std::fs::File::options()
                .write(true)
                .open(f.unwrap().path())
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
    }
}

/// Three snapshots in `vm/a`, one in `vm/b`, and the chunks of a pruned `vm/old` left for GC;
/// every chunk an hour old.
fn base() -> Base {
    let dir = tempfile::tempdir().unwrap();
    let store = Datastore::create_with_chunk_size(&dir.path().join("store"), CHUNK).unwrap();
    let mut snapshots = BTreeMap::new();
    let mut take = |id: &str, data: &[u8], n: &str| {
        let src = source(dir.path(), n, data);
        let out = backup(&store, open_ro(&src).unwrap(), id, Changes::Untracked).unwrap();
        snapshots.insert(out.snapshot.to_string(), data.to_vec());
        out.snapshot.to_string()
    };
    let a1 = mixed_data(SIZE, CHUNK as usize, 1);
    let mut a2 = a1.clone();
    a2[CHUNK as usize..CHUNK as usize + 5000].fill(0x5a);
    let mut a3 = a2.clone();
    a3[5 * CHUNK as usize..6 * CHUNK as usize].fill(0);
    take("vm/a", &a1, "a1");
    take("vm/a", &a2, "a2");
    let latest_a = take("vm/a", &a3, "a3");
    take("vm/b", &mixed_data(SIZE, CHUNK as usize, 2), "b");
    let old = take("vm/old", &mixed_data(SIZE, CHUNK as usize, 3), "old");
    strata_backup::prune::remove_snapshot(&store, &SnapshotName::parse(&old).unwrap()).unwrap();
    snapshots.remove(&old);
    backdate_chunks(&store);
    let mut new_data = a3.clone();
    new_data[2 * CHUNK as usize..3 * CHUNK as usize].fill(0xc3);
    new_data[7 * CHUNK as usize + 100] ^= 0xff;
    Base {
        dir,
        snapshots,
        new_data,
        latest_a,
    }
}

fn keep_last(n: usize) -> KeepRules {
    KeepRules {
        last: n,
        ..KeepRules::default()
    }
}

/// A fresh copy of the base datastore in `work`.
fn copy_base(base: &Base, work: &Path) -> PathBuf {
    copy_tree(&base.dir.path().join("store"), &work.join("store"));
    work.join("store")
}

/// Copies a folder, keeping modification times (gc reads them). In-process rather than `cp -a`:
/// a child process forked while another test holds a lock would hold a copy of that lock until
/// it execs, and a lock taken in that moment would fail as busy.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for ent in std::fs::read_dir(from).unwrap() {
        let ent = ent.unwrap();
        let (src, dst) = (ent.path(), to.join(ent.file_name()));
        if ent.file_type().unwrap().is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
            let mtime = ent.metadata().unwrap().modified().unwrap();
            std::fs::File::options()
                .write(true)
                .open(&dst)
                .unwrap()
                .set_modified(mtime)
                .unwrap();
        }
    }
}

/// What an operation reported done: it must hold after any crash that follows.
#[derive(Debug, Default)]
struct Done {
    /// The snapshot a backup made, if the backup returned it.
    made: Option<String>,
    /// Snapshots prune reported removed.
    removed: Vec<String>,
    /// The error the operation reported (for prune: for a snapshot it could not remove).
    error: Option<String>,
}

/// Runs `op` on `store`.
fn run_op(op: Op, store: &Datastore, base: &Base, work: &Path) -> Done {
    let src = source(work, "new.raw", &base.new_data);
    let made = |r: strata_storage::Result<strata_backup::BackupOutcome>| match r {
        Ok(o) => Done {
            made: Some(o.snapshot.to_string()),
            ..Done::default()
        },
        Err(e) => Done {
            error: Some(e.to_string()),
            ..Done::default()
        },
    };
    match op {
        Op::FullBackup => made(backup(
            store,
            open_ro(&src).unwrap(),
            "vm/new",
            Changes::Untracked,
        )),
        Op::IncrementalBackup => {
            let changes = Changes::Dirty {
                origin: "test".into(),
                base: base.latest_a.clone(),
                ranges: vec![
                    (2 * CHUNK as u64, CHUNK as u64),
                    (7 * CHUNK as u64 + 100, 1),
                ],
            };
            made(backup(store, open_ro(&src).unwrap(), "vm/a", changes))
        }
        Op::Prune => match prune(store, &["vm/a".into()], keep_last(1), false) {
            Ok(ds) => Done {
                made: None,
                error: ds.iter().find_map(|d| d.skipped.clone()),
                removed: ds
                    .into_iter()
                    .filter(|d| !d.keep && d.skipped.is_none())
                    .map(|d| d.snapshot)
                    .collect(),
            },
            Err(e) => Done {
                error: Some(e.to_string()),
                ..Done::default()
            },
        },
        Op::Gc => Done {
            error: gc(store, 1, &NoProgress).err().map(|e| e.to_string()),
            ..Done::default()
        },
        Op::Verify => {
            if let Ok(names) = store.list() {
                let _ = verify(store, &names, 2, &NoProgress);
            }
            Done::default()
        }
    }
}

/// Every listed snapshot restores exactly; none that must stay is missing.
fn check_snapshots(op: Op, store: &Datastore, base: &Base, work: &Path, what: &str) {
    let listed = store.list().unwrap_or_else(|e| panic!("{what}: list: {e}"));
    let listed: Vec<String> = listed.iter().map(|n| n.to_string()).collect();
    for name in &listed {
        let expect = match base.snapshots.get(name) {
            Some(d) => d,
            None => {
                let group_of_op = match op {
                    Op::FullBackup => "vm/new/",
                    Op::IncrementalBackup => "vm/a/",
                    _ => panic!("{what}: a snapshot {name} appeared"),
                };
                assert!(name.starts_with(group_of_op), "{what}: stray {name}");
                &base.new_data
            }
        };
        let got = restore_raw(
            store,
            &SnapshotName::parse(name).unwrap(),
            &work.join("restored.raw"),
        )
        .unwrap_or_else(|e| panic!("{what}: restoring {name}: {e}"));
        std::fs::remove_file(work.join("restored.raw")).unwrap();
        assert!(got == *expect, "{what}: {name} restores different data");
    }
    let pruned = |n: &str| matches!(op, Op::Prune) && n.starts_with("vm/a/") && *n != base.latest_a;
    for name in base.snapshots.keys() {
        assert!(
            listed.contains(name) || pruned(name),
            "{what}: snapshot {name} is gone"
        );
    }
}

/// After a crash: what the operation reported done, the snapshots, then GC, the snapshots
/// again and verify, then a new backup.
fn check_after_crash(op: Op, done: &Done, root: &Path, base: &Base, work: &Path, what: &str) {
    let store = Datastore::open(root).unwrap_or_else(|e| panic!("{what}: open: {e}"));
    let listed: Vec<String> = store
        .list()
        .unwrap()
        .iter()
        .map(|n| n.to_string())
        .collect();
    if let Some(made) = &done.made {
        assert!(
            listed.contains(made),
            "{what}: the backup returned {made}, which the crash took away"
        );
    }
    for gone in &done.removed {
        assert!(
            !listed.contains(gone),
            "{what}: prune reported {gone} removed, and it came back"
        );
    }
    check_snapshots(op, &store, base, work, what);
    gc(&store, 1, &NoProgress).unwrap_or_else(|e| panic!("{what}: gc: {e}"));
    check_snapshots(op, &store, base, work, &format!("{what}, after gc"));
    let names = store.list().unwrap();
    let report = verify(&store, &names, 2, &NoProgress).unwrap();
    assert!(report.ok(), "{what}: verify after gc: {report:?}");
    assert_clean_after_gc_ages_out(&store, what);
    let src = source(work, "later.raw", &base.new_data);
    let out = backup(
        &store,
        open_ro(&src).unwrap(),
        "vm/later",
        Changes::Untracked,
    )
    .unwrap_or_else(|e| panic!("{what}: a later backup: {e}"));
    let got = restore_raw(&store, &out.snapshot, &work.join("later-restored.raw")).unwrap();
    assert!(
        got == base.new_data,
        "{what}: the later backup restores different data"
    );
}

/// Sets the modification time of every file under `dir` two hours back.
fn age_files(dir: &Path) {
    let t = SystemTime::now() - Duration::from_secs(7200);
    for ent in std::fs::read_dir(dir).unwrap() {
        let ent = ent.unwrap();
        if ent.file_type().unwrap().is_dir() {
            age_files(&ent.path());
        } else {
            let f = std::fs::File::open(ent.path()).unwrap();
            f.set_modified(t).unwrap();
        }
    }
}

/// Once everything a crash left has aged past GC's grace period, GC leaves exactly the chunks
/// the listed snapshots reference, and no temporary file, staging folder, folder of a removal
/// or set-aside chunk anywhere.
fn assert_clean_after_gc_ages_out(store: &Datastore, what: &str) {
    age_files(&store.chunks_dir());
    gc(store, 1, &NoProgress).unwrap_or_else(|e| panic!("{what}: gc of aged chunks: {e}"));
    let mut referenced = std::collections::BTreeSet::new();
    for name in store.list().unwrap() {
        let (_, index) = store.read_snapshot(&name).unwrap();
        referenced.extend(
            index
                .entries()
                .iter()
                .filter_map(|e| e.digest())
                .map(|d| d.to_hex()),
        );
    }
    let mut stored = std::collections::BTreeSet::new();
    for fan in std::fs::read_dir(store.chunks_dir()).unwrap() {
        for f in std::fs::read_dir(fan.unwrap().path()).unwrap() {
            stored.insert(f.unwrap().file_name().to_string_lossy().into_owned());
        }
    }
    assert!(
        stored == referenced,
        "{what}: after gc, stored chunks differ from referenced ones: {:?} stored only, {:?} referenced only",
        stored.difference(&referenced).collect::<Vec<_>>(),
        referenced.difference(&stored).collect::<Vec<_>>(),
    );
    let mut stack = vec![store.snapshots_dir()];
    while let Some(dir) = stack.pop() {
        for ent in std::fs::read_dir(&dir).unwrap() {
            let ent = ent.unwrap();
            let name = ent.file_name().to_string_lossy().into_owned();
            assert!(
                !name.starts_with('.') || name == ".lock",
                "{what}: {} left after gc",
                ent.path().display()
            );
            if ent.file_type().unwrap().is_dir() {
                stack.push(ent.path());
            }
        }
    }
}

fn seeds() -> u64 {
    std::env::var("STRATA_CRASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

/// Cuts `op` at every operation, in every crash mode; returns the number of operations.
fn sweep(op: Op) -> u64 {
    let base = base();
    // A run without a cut counts the operations.
    let work = tempfile::tempdir().unwrap();
    let root = copy_base(&base, work.path());
    let sfs = Arc::new(FaultFs::new(&work.path().join("stash")).unwrap());
    let store = Datastore::open_on(&root, sfs.clone()).unwrap();
    let done = run_op(op, &store, &base, work.path());
    let total = sfs.ops();
    if matches!(op, Op::FullBackup | Op::IncrementalBackup) {
        assert!(done.made.is_some(), "{op:?} failed without a cut");
    }
    drop(store);
    sfs.crash(Crash::PowerLoss).unwrap();
    check_after_crash(
        op,
        &done,
        &root,
        &base,
        work.path(),
        &format!("{op:?} uncut, then power lost"),
    );
    let mut modes = vec![Crash::Kill, Crash::PowerLoss];
    for k in 1..=total {
        modes.truncate(2);
        modes.extend((0..seeds()).map(|s| Crash::PowerLossSome { seed: k * 1000 + s }));
        for &mode in &modes {
            let what = format!("{op:?} cut at operation {k} of {total}, {mode:?}");
            let work = tempfile::tempdir().unwrap();
            let root = copy_base(&base, work.path());
            let sfs = Arc::new(FaultFs::new(&work.path().join("stash")).unwrap());
            let store = Datastore::open_on(&root, sfs.clone()).unwrap();
            sfs.cut_at(k);
            let done = run_op(op, &store, &base, work.path());
            // Worker threads may order their operations differently from the counting run, so
            // a cut near the end may not be reached; a backup reaching it must fail.
            if matches!(op, Op::FullBackup | Op::IncrementalBackup) {
                assert_eq!(
                    done.made.is_some(),
                    !sfs.is_cut(),
                    "{what}: a backup must fail exactly when it reaches the cut"
                );
            }
            drop(store);
            sfs.crash(mode)
                .unwrap_or_else(|e| panic!("{what}: crash: {e}"));
            check_after_crash(op, &done, &root, &base, work.path(), &what);
        }
    }
    eprintln!("{op:?}: cut at each of {total} operations");
    total
}

/// Whether a failure of seam operation `what` on `path` may be absorbed: deleting leftovers
/// (temporary files, staging folders, folders of removed snapshots) that gc deletes later.
fn absorbed(what: &str, path: &Path) -> bool {
    what == "remove"
        && path.ancestors().any(|p| {
            p.file_name().is_some_and(|n| {
                n.to_string_lossy().starts_with(".tmp-") || n.to_string_lossy().starts_with(".del-")
            })
        })
}

/// Fails each operation of `op` in turn with EIO (the process goes on, nothing is lost): the
/// error reaches the caller unless it only left garbage behind, and then the datastore passes
/// the same checks as after a crash, with no restart in between. Returns the number of
/// operations.
fn eio_sweep(op: Op) -> u64 {
    let base = base();
    let total = {
        let work = tempfile::tempdir().unwrap();
        let root = copy_base(&base, work.path());
        let sfs = Arc::new(FaultFs::new(&work.path().join("stash")).unwrap());
        let store = Datastore::open_on(&root, sfs.clone()).unwrap();
        run_op(op, &store, &base, work.path());
        sfs.ops()
    };
    for k in 1..=total {
        let work = tempfile::tempdir().unwrap();
        let root = copy_base(&base, work.path());
        let sfs = Arc::new(FaultFs::new(&work.path().join("stash")).unwrap());
        let store = Datastore::open_on(&root, sfs.clone()).unwrap();
        sfs.fail_at(k, libc::EIO);
        let done = run_op(op, &store, &base, work.path());
        let injected = sfs.injected();
        let what = format!("{op:?}, EIO at operation {k} of {total} ({injected:?})");
        if let Some((name, path)) = &injected {
            if !absorbed(name, path) {
                assert!(
                    done.error.is_some(),
                    "{what}: the error did not reach the caller"
                );
                assert!(done.made.is_none(), "{what}: the backup reported success");
            }
        }
        drop(store);
        // The seam works again (the failure was one operation): no crash, no restart.
        sfs.crash(Crash::Kill).unwrap();
        check_after_crash(op, &done, &root, &base, work.path(), &what);
    }
    eprintln!("{op:?}: EIO at each of {total} operations");
    total
}

#[test]
fn a_full_backup_with_eio_at_every_operation() {
    assert!(eio_sweep(Op::FullBackup) > 20);
}

#[test]
fn an_incremental_backup_with_eio_at_every_operation() {
    assert!(eio_sweep(Op::IncrementalBackup) > 10);
}

#[test]
fn prune_and_gc_with_eio_at_every_operation() {
    assert!(eio_sweep(Op::Prune) >= 6);
    assert!(eio_sweep(Op::Gc) >= 8);
}

/// The backup's source fails a read (EIO at each read in turn): the backup fails, nothing is
/// committed, and the next backup works.
#[test]
fn a_failing_source_fails_the_backup_and_commits_nothing() {
    use strata_storage::io::fault::FaultDevice;
    use strata_storage::HostFile;
    let base = base();
    let work = tempfile::tempdir().unwrap();
    let root = copy_base(&base, work.path());
    let store = Datastore::open(&root).unwrap();
    let before: Vec<String> = store
        .list()
        .unwrap()
        .iter()
        .map(|n| n.to_string())
        .collect();
    let mut k = 1;
    loop {
        let (dev, ctl) = FaultDevice::new(base.new_data.len() as u64);
        dev.write_all_at(0, &base.new_data).unwrap();
        ctl.fail_nth_op(k);
        let r = backup(&store, dev, "vm/new", Changes::Untracked);
        if ctl.injected().is_none() {
            // The backup needed fewer reads than k: every read was tried.
            r.unwrap();
            break;
        }
        assert!(r.is_err(), "read {k} failed and the backup succeeded");
        let now: Vec<String> = store
            .list()
            .unwrap()
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(now, before, "read {k} failed and a snapshot appeared");
        k += 1;
    }
    assert!(k > 4, "only {k} reads");
    check_after_crash(
        Op::FullBackup,
        &Done::default(),
        &root,
        &base,
        work.path(),
        "source EIO",
    );
}

#[test]
fn a_full_backup_cut_at_every_operation() {
    assert!(sweep(Op::FullBackup) > 20);
}

#[test]
fn an_incremental_backup_cut_at_every_operation() {
    assert!(sweep(Op::IncrementalBackup) > 10);
}

#[test]
fn prune_cut_at_every_operation() {
    assert!(sweep(Op::Prune) >= 6);
}

#[test]
fn gc_cut_at_every_operation() {
    assert!(sweep(Op::Gc) >= 8);
}

/// Verify only reads: it changes nothing a crash could leave half done.
#[test]
fn verify_changes_nothing_on_disk() {
    assert_eq!(sweep(Op::Verify), 0);
}

fn opts() -> strata_backup::store::CreateOptions {
    strata_backup::store::CreateOptions {
        chunk_size: CHUNK,
        ..Default::default()
    }
}

/// Creating a datastore cut at every operation but most of the 256 identical fan-out folder
/// creations (the first eight, every eighth and the last sixteen operations are cut): afterwards
/// the folder opens as a complete empty datastore, or holds no datastore and creating one there
/// again works.
#[test]
fn creating_a_datastore_cut_at_every_kind_of_operation() {
    let total = {
        let work = tempfile::tempdir().unwrap();
        let sfs = Arc::new(FaultFs::new(&work.path().join("stash")).unwrap());
        Datastore::create_on(&work.path().join("store"), &opts(), sfs.clone()).unwrap();
        sfs.ops()
    };
    assert!(total > 256, "{total} operations");
    let data = mixed_data(2 * CHUNK as usize, CHUNK as usize, 7);
    let cuts = (1..=total).filter(|&k| k <= 8 || k % 8 == 0 || k + 16 > total);
    for k in cuts {
        for mode in [
            Crash::Kill,
            Crash::PowerLoss,
            Crash::PowerLossSome { seed: k },
        ] {
            let what = format!("create cut at operation {k} of {total}, {mode:?}");

            let work = tempfile::tempdir().unwrap();
            let root = work.path().join("store");
            let sfs = Arc::new(FaultFs::new(&work.path().join("stash")).unwrap());
            sfs.cut_at(k);
            assert!(
                Datastore::create_on(&root, &opts(), sfs.clone()).is_err(),
                "{what}"
            );
            sfs.crash(mode).unwrap();
            let store = match Datastore::open(&root) {
                Ok(store) => store,
                Err(_) => Datastore::create_with_chunk_size(&root, CHUNK)
                    .unwrap_or_else(|e| panic!("{what}: creating again: {e}")),
            };
            assert_eq!(store.chunk_size(), CHUNK, "{what}");
            assert!(store.list().unwrap().is_empty(), "{what}");
            for b in 0..=255u8 {
                let d = store.chunks_dir().join(format!("{b:02x}"));
                assert!(d.is_dir(), "{what}: {} missing", d.display());
            }
            // Now and then, a backup into it restores.
            if k % 4 == 0 {
                let src = source(work.path(), "src.raw", &data);
                let out = backup(&store, open_ro(&src).unwrap(), "vm/x", Changes::Untracked)
                    .unwrap_or_else(|e| panic!("{what}: backup: {e}"));
                let got = restore_raw(&store, &out.snapshot, &work.path().join("r.raw")).unwrap();
                assert!(got == data, "{what}: restored different data");
            }
        }
    }
}

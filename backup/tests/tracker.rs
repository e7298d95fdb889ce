//! Incremental backups driven by a change tracker (the shape of a volume's dirty bitmap: take
//! restarts tracking atomically, give-back after a failure), using an in-test bitmap.

mod common;

use common::*;
use strata_backup::pipeline::PipelineOptions;
use strata_backup::{
    create_tracked, BackupOptions, ChangeTracker, Changes, Datastore, NoProgress, TakenChanges,
};
use strata_storage::{Result, StorageError};

const CHUNK: u32 = 64 << 10;

/// An in-memory dirty bitmap: records written ranges; `take` hands them over and restarts.
#[derive(Default)]
struct TestBitmap {
    started: bool,
    valid: bool,
    live: Vec<(u64, u64)>,
    last_take: Option<TakenChanges>,
    takes: usize,
}

impl ChangeTracker for TestBitmap {
    fn describe(&self) -> String {
        "bitmap test of disk".into()
    }
    fn take(&mut self) -> Result<Option<TakenChanges>> {
        self.takes += 1;
        if !self.started {
            self.started = true;
            self.valid = true;
            return Ok(None);
        }
        let t = TakenChanges {
            ranges: std::mem::take(&mut self.live),
            valid: self.valid,
            invalid_reason: (!self.valid).then(|| "unclean shutdown".to_string()),
        };
        self.valid = true;
        self.last_take = Some(t.clone());
        Ok(Some(t))
    }
    fn give_back(&mut self) -> Result<()> {
        if let Some(t) = self.last_take.take() {
            self.live.extend(t.ranges);
            self.valid &= t.valid;
        }
        Ok(())
    }
    fn snapshot(&self) -> Option<std::sync::Arc<dyn strata_storage::BlockDevice>> {
        None
    }
    fn commit(&mut self) -> Result<()> {
        Ok(())
    }
}

fn opts(id: &str) -> BackupOptions {
    BackupOptions {
        id: id.into(),
        source_label: "disk".into(),
        source_format: "raw".into(),
        changes: Changes::Untracked,
        pipeline: PipelineOptions {
            workers: 2,
            read_depth: 4,
            compress_level: 1,
        },
    }
}

fn write(
    path: &std::path::Path,
    data: &mut [u8],
    bm: &mut TestBitmap,
    off: usize,
    len: usize,
    seed: u64,
) {
    use std::os::unix::fs::FileExt;
    fastrand::Rng::with_seed(seed).fill(&mut data[off..off + len]);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&data[off..off + len], off as u64).unwrap();
    bm.live.push((off as u64, len as u64));
}

#[test]
fn tracked_backups_are_incremental_fall_back_when_they_must_and_give_back_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let store = Datastore::create_with_chunk_size(&dir.path().join("store"), CHUNK).unwrap();
    let src = dir.path().join("disk.img");
    let mut data = mixed_data(8 << 20, CHUNK as usize, 31);
    write_raw(&src, &data);
    let mut bm = TestBitmap::default();
    let id = "volume/vg0/vm-100-disk-0";

    // First backup: tracking starts, full read.
    let a = create_tracked(
        &store,
        open_ro(&src).unwrap(),
        &opts(id),
        &mut bm,
        &NoProgress,
    )
    .unwrap();
    assert_eq!(a.manifest.change_tracking.mode, "full");
    assert_eq!(
        a.manifest.change_tracking.bitmap.as_deref(),
        Some("bitmap test of disk")
    );

    // Two writes in two chunks: only those are read.
    write(&src, &mut data, &mut bm, 100_000, 10, 1);
    write(&src, &mut data, &mut bm, 5 << 20, 70_000, 2);
    let b = create_tracked(
        &store,
        open_ro(&src).unwrap(),
        &opts(id),
        &mut bm,
        &NoProgress,
    )
    .unwrap();
    assert_eq!(b.manifest.change_tracking.mode, "incremental");
    // 100_000..100_010 is in chunk 1; 5 MiB..+70_000 spans chunks 80 and 81.
    assert_eq!(b.manifest.stats.bytes_read, 3 * CHUNK as u64);
    assert!(restore_raw(&store, &b.snapshot, &dir.path().join("b.img")).unwrap() == data);

    // A failed backup gives its take back: the next one still reads those chunks.
    write(&src, &mut data, &mut bm, 2 << 20, 1, 3);
    let (hold, _) = strata_backup::lock::lock_group(&store, id).unwrap();
    let e = create_tracked(
        &store,
        open_ro(&src).unwrap(),
        &opts(id),
        &mut bm,
        &NoProgress,
    )
    .unwrap_err();
    assert!(matches!(e, StorageError::Busy(_)), "{e}");
    drop(hold);
    assert_eq!(
        bm.live,
        [(2 << 20, 1)],
        "the failed backup gave its changes back"
    );
    let c = create_tracked(
        &store,
        open_ro(&src).unwrap(),
        &opts(id),
        &mut bm,
        &NoProgress,
    )
    .unwrap();
    assert_eq!(c.manifest.change_tracking.mode, "incremental");
    assert_eq!(c.manifest.stats.bytes_read, CHUNK as u64);
    assert!(restore_raw(&store, &c.snapshot, &dir.path().join("c.img")).unwrap() == data);

    // An unclean stop invalidates the bitmap: full read, saying why.
    write(&src, &mut data, &mut bm, 0, 1, 4);
    bm.valid = false;
    let d = create_tracked(
        &store,
        open_ro(&src).unwrap(),
        &opts(id),
        &mut bm,
        &NoProgress,
    )
    .unwrap();
    assert_eq!(d.manifest.change_tracking.mode, "full");
    assert!(d
        .manifest
        .change_tracking
        .fallback_reason
        .as_deref()
        .unwrap()
        .contains("unclean"));

    // A snapshot made without the tracker breaks the chain: the next tracked backup reads all.
    backup(&store, open_ro(&src).unwrap(), id, Changes::Untracked).unwrap();
    write(&src, &mut data, &mut bm, 1 << 20, 1, 5);
    let e2 = create_tracked(
        &store,
        open_ro(&src).unwrap(),
        &opts(id),
        &mut bm,
        &NoProgress,
    )
    .unwrap();
    assert_eq!(e2.manifest.change_tracking.mode, "full");
    assert!(e2
        .manifest
        .change_tracking
        .fallback_reason
        .as_deref()
        .unwrap()
        .contains("not made with"));
    // And after it, incremental again.
    write(&src, &mut data, &mut bm, 3 << 20, 1, 6);
    let f = create_tracked(
        &store,
        open_ro(&src).unwrap(),
        &opts(id),
        &mut bm,
        &NoProgress,
    )
    .unwrap();
    assert_eq!(f.manifest.change_tracking.mode, "incremental");
    assert_eq!(f.manifest.stats.bytes_read, CHUNK as u64);
    assert!(restore_raw(&store, &f.snapshot, &dir.path().join("f.img")).unwrap() == data);
    // Every older snapshot still restores its own state and the store verifies.
    let report =
        strata_backup::verify::verify(&store, &store.list().unwrap(), 2, &NoProgress).unwrap();
    assert!(report.ok());
    assert_eq!(bm.takes, 7);
}

//! Backup → restore round trips through the library: full, incremental from dirty ranges (with
//! bytes-read accounting), the fallbacks to a full read, every image format the block layer can
//! open, and sparse output.

mod common;

use std::os::unix::fs::MetadataExt;

use common::*;
use strata_backup::{Changes, Datastore};
use strata_storage::format::ImageFormat;

const CHUNK: u32 = 64 << 10;

fn full_backup_restores_identically_and_sparsely() {
    let dir = tempfile::tempdir().unwrap();
    let store = Datastore::create_with_chunk_size(&dir.path().join("store"), CHUNK).unwrap();
    let src = dir.path().join("src.img");
    // Not a multiple of the chunk size: the last chunk is short.
    let data = mixed_data(8 << 20 | 12345, CHUNK as usize, 1);
    write_raw(&src, &data);
    let out = backup(
        &store,
        open_ro(&src).unwrap(),
        "image/src",
        Changes::Untracked,
    )
    .unwrap();
    let m = &out.manifest;
    assert_eq!(m.change_tracking.mode, "full");
    assert_eq!(m.stats.bytes_read, data.len() as u64);
    assert!(m.stats.chunks_zero > 0, "zero chunks recognised");
    let stored_files: u64 = walk_chunks(&store);
    assert_eq!(
        stored_files, m.stats.chunks_new,
        "zero chunks are not stored"
    );

    let target = dir.path().join("restored.img");
    let restored = restore_raw(&store, &out.snapshot, &target).unwrap();
    assert!(restored == data, "restored image differs");
    let alloc = std::fs::metadata(&target).unwrap().blocks() * 512;
    assert!(
        alloc < data.len() as u64,
        "zero chunks stay sparse: {alloc} bytes allocated of {}",
        data.len()
    );

    // A second full backup of unchanged data stores nothing new.
    let again = backup(
        &store,
        open_ro(&src).unwrap(),
        "image/src",
        Changes::Untracked,
    )
    .unwrap();
    assert_eq!(again.manifest.stats.chunks_new, 0);
    assert_eq!(
        again.manifest.change_tracking.fallback_reason.as_deref(),
        Some("the source has no dirty bitmap")
    );
    assert!(again.snapshot.time() > out.snapshot.time());
}

fn walk_chunks(store: &Datastore) -> u64 {
    let mut n = 0;
    for d in std::fs::read_dir(store.chunks_dir()).unwrap() {
        n += std::fs::read_dir(d.unwrap().path()).unwrap().count() as u64;
    }
    n
}

/// Random writes to `data` and the file at `path`; returns the dirty ranges.
fn random_writes(path: &std::path::Path, data: &mut [u8], n: usize, seed: u64) -> Vec<(u64, u64)> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut ranges = Vec::new();
    for _ in 0..n {
        let len = rng.usize(1..20_000);
        let off = rng.usize(..data.len() - len);
        rng.fill(&mut data[off..off + len]);
        f.write_all_at(&data[off..off + len], off as u64).unwrap();
        ranges.push((off as u64, len as u64));
    }
    ranges
}

fn incremental_reads_only_dirty_chunks_and_both_snapshots_restore() {
    let dir = tempfile::tempdir().unwrap();
    let store = Datastore::create_with_chunk_size(&dir.path().join("store"), CHUNK).unwrap();
    let src = dir.path().join("src.img");
    let mut data = mixed_data(16 << 20, CHUNK as usize, 2);
    write_raw(&src, &data);
    let old = data.clone();
    let first = backup(
        &store,
        open_ro(&src).unwrap(),
        "volume/vg/a",
        Changes::Untracked,
    )
    .unwrap();

    let ranges = random_writes(&src, &mut data, 12, 3);
    let dirty = strata_backup::changes::dirty_chunks(&ranges, data.len() as u64, CHUNK).unwrap();
    let dirty_bytes: u64 = dirty
        .iter()
        .enumerate()
        .filter(|(_, d)| **d)
        .map(|(i, _)| {
            strata_backup::index::chunk_range(data.len() as u64, CHUNK, i as u64).1 as u64
        })
        .sum();
    let changes = Changes::Dirty {
        origin: "test bitmap".into(),
        base: first.snapshot.to_string(),
        ranges,
    };
    let second = backup(&store, open_ro(&src).unwrap(), "volume/vg/a", changes).unwrap();
    let m = &second.manifest;
    assert_eq!(
        m.change_tracking.mode, "incremental",
        "{:?}",
        m.change_tracking
    );
    assert_eq!(
        m.parent.as_deref(),
        Some(first.snapshot.to_string().as_str())
    );
    assert_eq!(
        m.stats.bytes_read, dirty_bytes,
        "an incremental backup reads exactly the dirty chunks"
    );
    assert!(dirty_bytes < data.len() as u64 / 2);
    assert_eq!(
        m.change_tracking.dirty_chunks,
        Some(dirty.iter().filter(|d| **d).count() as u64)
    );

    let new_restored = restore_raw(&store, &second.snapshot, &dir.path().join("new.img")).unwrap();
    assert!(
        new_restored == data,
        "incremental snapshot restores the new state"
    );
    let old_restored = restore_raw(&store, &first.snapshot, &dir.path().join("old.img")).unwrap();
    assert!(
        old_restored == old,
        "the older snapshot still restores the old state"
    );
    let report = strata_backup::verify::verify(
        &store,
        &store.list().unwrap(),
        2,
        &strata_backup::NoProgress,
    )
    .unwrap();
    assert!(report.ok());
}

fn unusable_change_tracking_falls_back_to_a_full_read_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let store = Datastore::create_with_chunk_size(&dir.path().join("store"), CHUNK).unwrap();
    let src = dir.path().join("src.img");
    let mut data = mixed_data(4 << 20, CHUNK as usize, 4);
    write_raw(&src, &data);
    let size = data.len() as u64;
    let dirty_first = Changes::Dirty {
        origin: "t".into(),
        base: "volume/vg/a/2020-01-01T00:00:00Z".into(),
        ranges: vec![],
    };
    let first = backup(&store, open_ro(&src).unwrap(), "volume/vg/a", dirty_first).unwrap();
    assert_eq!(
        first.manifest.change_tracking.fallback_reason.as_deref(),
        Some("no previous snapshot in this group")
    );

    let cases = [
        (
            Changes::Invalid {
                origin: "bitmap b".into(),
                reason: "not saved at shutdown".into(),
            },
            "invalid",
        ),
        (
            Changes::Dirty {
                origin: "t".into(),
                base: "volume/vg/a/2020-01-01T00:00:00Z".into(),
                ranges: vec![],
            },
            "relative to",
        ),
    ];
    for (changes, needle) in cases {
        let ranges = random_writes(&src, &mut data, 2, 9);
        let _ = ranges;
        let out = backup(&store, open_ro(&src).unwrap(), "volume/vg/a", changes).unwrap();
        let ct = &out.manifest.change_tracking;
        assert_eq!(ct.mode, "full");
        assert!(
            ct.fallback_reason.as_deref().unwrap().contains(needle),
            "{ct:?}"
        );
        assert_eq!(out.manifest.stats.bytes_read, size);
        let restored = restore_raw(
            &store,
            &out.snapshot,
            &dir.path().join(format!("r{needle}.img")),
        )
        .unwrap();
        assert!(restored == data);
    }

    // A parent whose chunk vanished is not trusted: full read.
    let latest = store.list_group("volume/vg/a").unwrap().pop().unwrap();
    let (_, idx) = store.read_snapshot(&latest).unwrap();
    let victim = idx.entries().iter().find_map(|e| e.digest()).unwrap();
    std::fs::remove_file(store.chunk_path(&victim)).unwrap();
    let changes = Changes::Dirty {
        origin: "t".into(),
        base: latest.to_string(),
        ranges: vec![(0, 1)],
    };
    let out = backup(&store, open_ro(&src).unwrap(), "volume/vg/a", changes).unwrap();
    let reason = out
        .manifest
        .change_tracking
        .fallback_reason
        .clone()
        .unwrap();
    assert!(reason.contains("missing"), "{reason}");
    assert_eq!(out.manifest.stats.bytes_read, size);
    // The full read stored the lost chunk again.
    assert!(store.chunk_path(&victim).exists());
}

/// Round trips for every image format, each source made by qemu-img and each restored image
/// compared and checked by it.
fn round_trip_through_each_image_format() {
    strata_testkit::require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let store = Datastore::create_with_chunk_size(&dir.path().join("store"), CHUNK).unwrap();
    let data = mixed_data(6 << 20, CHUNK as usize, 5);
    let raw = dir.path().join("src.raw");
    write_raw(&raw, &data);
    let mut ran = Vec::new();
    for fmt in ["raw", "qcow2", "vmdk"] {
        let src = dir.path().join(format!("src.{fmt}"));
        if fmt != "raw" {
            let st = std::process::Command::new("qemu-img")
                .args(["convert", "-O", fmt])
                .arg(&raw)
                .arg(&src)
                .status();
            assert!(st.is_ok_and(|s| s.success()), "qemu-img convert -O {fmt}");
        }
        let dev = open_ro(&src).unwrap_or_else(|e| panic!("{fmt} source: {e}"));
        let out = backup(&store, dev, &format!("image/{fmt}"), Changes::Untracked).unwrap();
        let restored = restore_raw(
            &store,
            &out.snapshot,
            &dir.path().join(format!("out-{fmt}.raw")),
        )
        .unwrap();
        assert!(restored == data, "{fmt} round trip differs");
        ran.push(format!("{fmt} source"));
        // Restore into a new image of the same format, then compare with qemu-img.
        let target = dir.path().join(format!("out.{fmt}"));
        let f: ImageFormat = fmt.parse().unwrap();
        match strata_storage::format::create_image(
            &target,
            f,
            data.len() as u64,
            &Default::default(),
        ) {
            Ok(()) => {
                let dev = open_rw(&target, Some(f)).unwrap();
                strata_backup::restore::restore(
                    &store,
                    &out.snapshot,
                    dev,
                    Default::default(),
                    &strata_backup::NoProgress,
                )
                .unwrap();
                let st = std::process::Command::new("qemu-img")
                    .args(["compare", "-f", "raw", "-F", fmt])
                    .arg(&raw)
                    .arg(&target)
                    .status();
                assert!(
                    st.is_ok_and(|s| s.success()),
                    "qemu-img compare raw vs restored {fmt}"
                );
                if fmt != "raw" {
                    let st = std::process::Command::new("qemu-img")
                        .args(["check", "-f", fmt])
                        .arg(&target)
                        .status();
                    assert!(
                        st.is_ok_and(|s| s.success()),
                        "qemu-img check of the restored {fmt}"
                    );
                }
                ran.push(format!("{fmt} target"));
            }
            Err(e) => panic!("{fmt} target: {e}"),
        }
    }
    eprintln!("ran rows: {}", ran.join(", "));
    assert!(ran.contains(&"raw source".to_string()));
}

/// A huge sparse source (here 2^60 bytes) is refused before the backup allocates anything
/// per chunk: the plan of such a backup would need terabytes of memory.
fn a_source_too_large_for_an_index_is_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let store = Datastore::create_with_chunk_size(&dir.path().join("store"), CHUNK).unwrap();
    let huge = strata_storage::io::memory::MemoryDevice::new(1 << 60);
    let err = backup(&store, huge, "image/huge", Changes::Untracked).unwrap_err();
    assert!(
        matches!(err, strata_storage::StorageError::InvalidInput(_)),
        "{err}"
    );
    assert!(err.to_string().contains("backup index"), "{err}");
    assert!(store.list_group("image/huge").unwrap().is_empty());
}

strata_testkit::main!(
    full_backup_restores_identically_and_sparsely,
    incremental_reads_only_dirty_chunks_and_both_snapshots_restore,
    unusable_change_tracking_falls_back_to_a_full_read_and_says_why,
    round_trip_through_each_image_format,
    a_source_too_large_for_an_index_is_refused_up_front,
);

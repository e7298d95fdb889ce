//! Changed-block tracking: bitmaps record what was written (on images and volumes alike), keep
//! across a clean close, become invalid after an unclean one, and a take for a backup never
//! loses a write that completes meanwhile. The tracking wrapper passes the conformance suite.

mod volume_util;

use std::collections::BTreeSet;
use std::sync::Arc;

use strata_storage::bitmap::{sidecar_path, BitmapSet, ImageBitmaps, TrackedDevice};
use strata_storage::conformance::run_all;
use strata_storage::format::{open_image, raw, OpenOptions};
use strata_storage::io::blocking::BlockingQueue;
use strata_storage::io::memory::MemoryDevice;
use strata_storage::volume::VolumeStore;
use strata_storage::{BlockDevice, StorageError};
use volume_util::*;

const G: u64 = 64 << 10;

fn image(dir: &std::path::Path) -> (std::path::PathBuf, Arc<dyn BlockDevice>) {
    let p = dir.join("disk.raw");
    raw::create(&p, 16 * MIB, &Default::default()).unwrap();
    let img = open_image(&p, &OpenOptions::default()).unwrap();
    (p, img)
}

#[test]
fn image_writes_are_tracked_and_persist_across_a_clean_close() {
    let dir = tempfile::tempdir().unwrap();
    let (p, img) = image(dir.path());
    {
        // Writes before any bitmap exists are not recorded anywhere (and create no file).
        let dev: Arc<dyn BlockDevice> =
            Arc::new(TrackedDevice::open(img.clone(), &sidecar_path(&p)).unwrap());
        bq(&dev).write_at(100, b"x").unwrap();
        assert!(!sidecar_path(&p).exists());
    }
    let tracked = Arc::new(TrackedDevice::open(img.clone(), &sidecar_path(&p)).unwrap());
    tracked.bitmaps().add("backup", G).unwrap();
    let dev: Arc<dyn BlockDevice> = tracked.clone();
    let mut q = bq(&dev);
    q.write_at(G + 10, &[1u8; 10]).unwrap();
    q.write_at(5 * G - 1, &[1u8; 2]).unwrap();
    q.discard(10 * G, 2 * G).unwrap();
    q.read_at(14 * G, 4096).unwrap();
    let (ranges, valid) = tracked.bitmaps().dirty_ranges("backup").unwrap();
    assert!(valid);
    assert_eq!(ranges, vec![(G, G), (4 * G, 2 * G), (10 * G, 2 * G)]);
    drop((q, dev, tracked));
    // Clean close: the next open finds the same bits, valid.
    let tracked = TrackedDevice::open(img.clone(), &sidecar_path(&p)).unwrap();
    let info = tracked.bitmaps().info("backup").unwrap();
    assert!(info.valid);
    assert_eq!(info.dirty_bytes, 5 * G);
    // Unclean stop: the process dies with the device open (no close runs).
    let dev: Arc<dyn BlockDevice> = Arc::new(tracked);
    bq(&dev).write_at(0, b"lost?").unwrap();
    std::mem::forget(dev);
    let set = BitmapSet::open(&sidecar_path(&p), 16 * MIB).unwrap();
    assert!(
        !set.info("backup").unwrap().valid,
        "an unclean stop must invalidate the bitmap"
    );
    // A take hands out the invalid state, and the bitmap restarts valid and empty.
    let taken = set.take("backup").unwrap();
    assert!(!taken.valid);
    assert!(set.info("backup").unwrap().valid);
    assert_eq!(set.info("backup").unwrap().dirty_bytes, 0);
}

#[test]
fn opening_an_image_s_bitmaps_removes_temporaries_a_cut_short_save_left() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _img) = image(dir.path());
    {
        let held = ImageBitmaps::open(&p, 16 * MIB).unwrap();
        held.set.add("backup", G).unwrap();
    }
    let sidecar = std::fs::read(sidecar_path(&p)).unwrap();
    // What a save killed between writing its temporary file and renaming it leaves, and files
    // that are not temporaries of this sidecar.
    let stale = dir
        .path()
        .join(".tmp-disk.raw.bitmaps-4242-0-00000000deadbeef");
    let others = [
        dir.path().join(".tmp-disk.raw-4242-0-00000000deadbeef"),
        dir.path()
            .join(".tmp-other.raw.bitmaps-4242-0-00000000deadbeef"),
        dir.path().join("disk.raw.bitmaps.tmp"),
    ];
    std::fs::write(&stale, b"half a save").unwrap();
    for o in &others {
        std::fs::write(o, b"keep").unwrap();
    }
    let held = ImageBitmaps::open(&p, 16 * MIB).unwrap();
    assert!(!stale.exists(), "the stale temporary was left");
    for o in &others {
        assert!(o.exists(), "{} was removed", o.display());
    }
    assert_eq!(std::fs::read(sidecar_path(&p)).unwrap(), sidecar);
    assert_eq!(held.set.info("backup").unwrap().name, "backup");
    // While the bitmaps are held, nobody else may open them, and so remove temporaries.
    assert!(ImageBitmaps::open(&p, 16 * MIB).is_err());
}

#[test]
fn clear_merge_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let (p, img) = image(dir.path());
    let tracked = Arc::new(TrackedDevice::open(img, &sidecar_path(&p)).unwrap());
    let set = tracked.bitmaps().clone();
    set.add("a", G).unwrap();
    assert!(matches!(
        set.add("a", G),
        Err(StorageError::AlreadyExists(_))
    ));
    assert!(set.add("bad/name", G).is_err());
    assert!(set.add("g", 1000).is_err());
    let dev: Arc<dyn BlockDevice> = tracked.clone();
    bq(&dev).write_at(0, &[1]).unwrap();
    set.add("b", G).unwrap();
    bq(&dev).write_at(3 * G, &[1]).unwrap();
    assert_eq!(set.dirty_ranges("b").unwrap().0, vec![(3 * G, G)]);
    set.merge("a", "b").unwrap();
    assert_eq!(set.dirty_ranges("b").unwrap().0, vec![(0, G), (3 * G, G)]);
    set.clear("a").unwrap();
    assert!(set.dirty_ranges("a").unwrap().0.is_empty());
    set.add("fine", 4096).unwrap();
    bq(&dev).write_at(5 * G + 8192, &[1]).unwrap();
    set.merge("fine", "a").unwrap();
    assert_eq!(
        set.dirty_ranges("a").unwrap().0,
        vec![(5 * G, G)],
        "a finer bitmap merges into a coarser one rounded out"
    );
    set.remove("a").unwrap();
    assert!(matches!(set.remove("a"), Err(StorageError::NotFound(_))));
    assert_eq!(
        set.infos()
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>(),
        vec!["b", "fine"]
    );
}

/// Writes keep completing on another thread while bitmaps are taken: every chunk written must
/// be in some taken bitmap or in the live one at the end.
#[test]
fn a_take_loses_no_concurrent_write() {
    let dir = tempfile::tempdir().unwrap();
    let (p, img) = image(dir.path());
    let tracked = Arc::new(TrackedDevice::open(img, &sidecar_path(&p)).unwrap());
    tracked.bitmaps().add("b", 4096).unwrap();
    let dev: Arc<dyn BlockDevice> = tracked.clone();
    let writer = std::thread::spawn(move || {
        let mut q = bq(&dev);
        let mut rng = fastrand::Rng::with_seed(5);
        let mut written = BTreeSet::new();
        for _ in 0..3000 {
            let chunk = rng.u64(..4096);
            q.write_at(chunk * 4096, &[7u8; 4096]).unwrap();
            written.insert(chunk);
        }
        written
    });
    let mut seen = BTreeSet::new();
    let mut takes = 0;
    while !writer.is_finished() {
        let t = tracked.bitmaps().take("b").unwrap();
        for (o, l) in t.dirty_ranges() {
            seen.extend(o / 4096..(o + l) / 4096);
        }
        takes += 1;
    }
    let written = writer.join().unwrap();
    let (last, _) = tracked.bitmaps().dirty_ranges("b").unwrap();
    for (o, l) in last {
        seen.extend(o / 4096..(o + l) / 4096);
    }
    assert!(takes > 1);
    let missing: Vec<_> = written.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "{} written chunks were in no bitmap",
        missing.len()
    );
}

#[test]
fn tracked_devices_pass_the_conformance_suite() {
    run_all(
        &|size| {
            let dir = tempfile::tempdir().unwrap().keep();
            let t = TrackedDevice::open(MemoryDevice::new(size), &dir.join("m.bitmaps")).unwrap();
            t.bitmaps().add("b", 4096).unwrap();
            Arc::new(t) as Arc<dyn BlockDevice>
        },
        24,
    );
}

#[test]
fn volume_bitmaps_follow_the_volume() {
    let dir = tempfile::tempdir().unwrap();
    let store = VolumeStore::new(&dir.path().join("data"));
    let pv = dir.path().join("pv");
    store.pv_create(&pv, Some(64 * MIB)).unwrap();
    let vg = store.vg_create("vg", &[pv], 0).unwrap();
    vg.create_pool("pool", 32 * MIB, 0, 0).unwrap();
    vg.create_thin("pool", "t", 8 * MIB).unwrap();
    vg.create_linear("l", 4 * MIB, &[]).unwrap();
    for name in ["t", "l"] {
        // A bitmap added while the volume is open records the writes through that handle.
        let dev = vg.open_lv(name, false).unwrap();
        vg.bitmaps(name).unwrap().add("inc", G).unwrap();
        let mut q = BlockingQueue::open(dev.as_ref(), 4).unwrap();
        q.write_at(2 * G, &[3u8; 100]).unwrap();
        assert_eq!(
            vg.bitmaps(name).unwrap().dirty_ranges("inc").unwrap(),
            (vec![(2 * G, G)], true)
        );
        drop((q, dev));
    }
    vg.rename_lv("t", "t2").unwrap();
    vg.resize_lv("t2", 16 * MIB).unwrap();
    drop(vg);
    let vg = store.open_vg("vg", false).unwrap();
    let (r, valid) = vg.bitmaps("t2").unwrap().dirty_ranges("inc").unwrap();
    assert!(valid);
    assert_eq!(r[0], (2 * G, G));
    assert_eq!(
        r.last().map(|x| x.0 + x.1),
        Some(16 * MIB),
        "the grown part is dirty"
    );
    let file = dir.path().join("data/bitmaps").join(vg.uuid());
    assert_eq!(std::fs::read_dir(&file).unwrap().count(), 2);
    vg.remove_lv("t2").unwrap();
    vg.remove_lv("l").unwrap();
    assert_eq!(
        std::fs::read_dir(&file).unwrap().count(),
        0,
        "bitmaps go with their volume"
    );
}

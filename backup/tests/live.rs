//! Live restore: guest-like I/O while the copy runs, a power cut mid-restore, and damaged
//! chunks.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};

use strata_backup::live::{LiveOptions, LiveRestore, RestorePaths};
use strata_backup::{Changes, Datastore, NoProgress, SnapshotName};
use strata_storage::format::ImageFormat;
use strata_storage::io::blocking::BlockingQueue;
use strata_storage::io::fault::{FaultDevice, LossMode};
use strata_storage::io::memory::MemoryDevice;
use strata_storage::io::{IoBuf, QueueOptions, Request};
use strata_storage::{BlockDevice, StorageError};

const CS: u32 = 64 << 10;
const SIZE: usize = 16 << 20;
/// Guest threads own interleaved regions of this many bytes (three chunks and a half, so ops
/// cross chunk boundaries and leave chunks partly written).
const REGION: usize = 224 << 10;
const WRITERS: usize = 3;

/// Whether the target lost power (errors are expected from then on).
type Crashed = Arc<dyn Fn() -> bool + Send + Sync>;

struct Setup {
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    store: Datastore,
    snap: SnapshotName,
    data: Vec<u8>,
}

fn setup(seed: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = Datastore::create_with_chunk_size(&dir.path().join("ds"), CS).unwrap();
    let data = common::mixed_data(SIZE, CS as usize / 2, seed);
    let src: Arc<dyn BlockDevice> = MemoryDevice::read_only_with(&data);
    let out = common::backup(&store, src, "volume/vg0/disk", Changes::Untracked).unwrap();
    Setup {
        dir: dir.path().to_path_buf(),
        _dir: dir,
        store,
        snap: out.snapshot,
        data,
    }
}

fn paths(s: &Setup) -> RestorePaths {
    RestorePaths::of(&s.dir.join("data"), "vg0", "disk")
}

fn opts(workers: usize) -> LiveOptions {
    LiveOptions {
        workers,
        ..Default::default()
    }
}

/// A raw image full of junk (so zero chunks must really be zeroed), or a sparse one.
fn target_file(path: &Path, junk: bool) -> Arc<dyn BlockDevice> {
    if junk {
        std::fs::write(path, vec![0xee; SIZE]).unwrap();
    } else {
        let f = std::fs::File::create(path).unwrap();
        f.set_len(SIZE as u64).unwrap();
    }
    common::open_rw(path, Some(ImageFormat::Raw)).unwrap()
}

/// Which guest thread owns the byte at `off`: writers 0..WRITERS, and WRITERS for the regions
/// only ever read (by the thread with many reads in flight).
fn owner(off: usize) -> usize {
    (off / REGION) % (WRITERS + 1)
}

/// A random range inside one region of `who`, 512-byte aligned.
fn pick_range(rng: &mut fastrand::Rng, who: usize) -> (usize, usize) {
    let regions: Vec<usize> = (0..SIZE.div_ceil(REGION))
        .filter(|r| r % (WRITERS + 1) == who)
        .collect();
    let r = regions[rng.usize(..regions.len())];
    let start = r * REGION;
    let end = ((r + 1) * REGION).min(SIZE);
    let off = start + rng.usize(..(end - start) / 512) * 512;
    let len = 512 * (1 + rng.usize(..(end - off) / 512));
    (off, len)
}

/// What one writer thread did: every write and zeroing in order, split by the flushes that
/// completed after them.
#[derive(Default)]
struct Log {
    flushed: Vec<(usize, Vec<u8>)>,
    pending: Vec<(usize, Vec<u8>)>,
}

/// Random reads (checked against `model`), writes, whole-chunk writes, discards,
/// write-zeroes and flushes on the regions of writer `who`. Stops at the first error once
/// `crashed()` says the power was cut; any other error fails the test.
fn writer(
    dev: Arc<dyn BlockDevice>,
    who: usize,
    ops: usize,
    model: Arc<Mutex<Vec<u8>>>,
    log: Arc<Mutex<Log>>,
    crashed: Crashed,
) {
    let mut rng = fastrand::Rng::with_seed(who as u64 * 7919 + 1);
    let mut q = BlockingQueue::open(dev.as_ref(), 1).unwrap();
    for _ in 0..ops {
        if crashed() {
            return;
        }
        let (off, len) = pick_range(&mut rng, who);
        let kind = rng.u8(..100);
        let r: Result<(), StorageError> = (|| {
            match kind {
                0..=44 => {
                    let got = q.read_at(off as u64, len)?;
                    let m = model.lock().unwrap();
                    assert!(
                        got == m[off..off + len],
                        "writer {who}: read at {off}+{len} differs from the model"
                    );
                }
                45..=94 => {
                    // Writes, some of them covering whole chunks (which claim the chunk).
                    let (off, len) = if kind >= 85 {
                        let c = off / CS as usize * CS as usize;
                        if owner(c) == who && owner(c + CS as usize - 1) == who {
                            (c, CS as usize)
                        } else {
                            (off, len)
                        }
                    } else {
                        (off, len)
                    };
                    let mut data = vec![0u8; len];
                    rng.fill(&mut data);
                    let zero = kind % 5 == 0;
                    if zero {
                        data.fill(0);
                    }
                    log.lock().unwrap().pending.push((off, data.clone()));
                    if !zero {
                        q.write_at(off as u64, &data)?;
                    } else if kind % 2 == 0 {
                        q.discard(off as u64, len as u64)?;
                    } else {
                        q.write_zeroes(off as u64, len as u64, kind % 3 == 0)?;
                    }
                    model.lock().unwrap()[off..off + len].copy_from_slice(&data);
                }
                _ => {
                    q.flush()?;
                    let mut l = log.lock().unwrap();
                    let p = std::mem::take(&mut l.pending);
                    l.flushed.extend(p);
                }
            }
            Ok(())
        })();
        if let Err(e) = r {
            assert!(crashed(), "writer {who}: unexpected error {e}");
            return;
        }
    }
}

/// Many reads in flight at once over the read-only regions, checked against the snapshot.
fn reader(dev: Arc<dyn BlockDevice>, data: Arc<Vec<u8>>, rounds: usize, crashed: Crashed) {
    let mut rng = fastrand::Rng::with_seed(4242);
    let mut q = dev.open_queue(&QueueOptions::with_depth(8)).unwrap();
    let mut done = Vec::new();
    for _ in 0..rounds {
        let mut want = Vec::new();
        for t in 0..8u64 {
            let (off, len) = pick_range(&mut rng, WRITERS);
            q.submit(Request::read(t, off as u64, IoBuf::new(len)))
                .unwrap();
            want.push((off, len));
        }
        let mut got = 0;
        while got < 8 {
            q.wait(None).unwrap();
            done.clear();
            q.reap(&mut done);
            for c in done.drain(..) {
                got += 1;
                if crashed() {
                    continue;
                }
                let (off, len) = want[c.tag as usize];
                c.result.unwrap();
                assert!(
                    c.buf.unwrap().to_vec() == data[off..off + len],
                    "reader: read at {off}+{len} differs from the snapshot"
                );
            }
        }
        if crashed() {
            return;
        }
    }
}

/// Runs the guest threads on `dev` while `during` runs; returns the model and logs.
fn with_guests(
    dev: &LiveRestore,
    data: &[u8],
    ops: usize,
    crashed: Crashed,
    during: impl FnOnce(),
) -> (Vec<u8>, Vec<Arc<Mutex<Log>>>) {
    let model = Arc::new(Mutex::new(data.to_vec()));
    let logs: Vec<_> = (0..WRITERS)
        .map(|_| Arc::new(Mutex::new(Log::default())))
        .collect();
    let shared_data = Arc::new(data.to_vec());
    std::thread::scope(|s| {
        for (who, log) in logs.iter().enumerate() {
            let d: Arc<dyn BlockDevice> = Arc::new(dev.clone());
            let (m, l, st) = (model.clone(), log.clone(), crashed.clone());
            s.spawn(move || writer(d, who, ops, m, l, st));
        }
        let d: Arc<dyn BlockDevice> = Arc::new(dev.clone());
        let (sd, st) = (shared_data.clone(), crashed.clone());
        s.spawn(move || reader(d, sd, ops / 8, st));
        during();
    });
    let model = model.lock().unwrap().clone();
    (model, logs)
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[test]
fn guest_io_during_a_live_restore_ends_as_restore_plus_writes() {
    for junk in [true, false] {
        let s = setup(11);
        let p = paths(&s);
        let path = s.dir.join("target.raw");
        let target = target_file(&path, junk);
        let dev =
            LiveRestore::start(&s.store, &s.snap, target, "lv:vg0/disk", &p, opts(2)).unwrap();
        assert!(p.read().unwrap().is_some());
        let (model, _) = with_guests(&dev, &s.data, 400, Arc::new(|| false), || {});
        let st = dev.copy_to_end(&NoProgress).unwrap();
        assert!(st.finished && st.lost.is_empty(), "{st:?}");
        assert_eq!(p.read().unwrap(), None, "the record is removed when done");
        assert!(!p.map().exists());
        if junk {
            assert!(st.bytes_zeroed > 0, "{st:?}");
        } else {
            assert!(st.bytes_zero_skipped > 0, "{st:?}");
        }
        drop(dev);
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(
            first_difference(&on_disk, &model),
            None,
            "junk={junk}: the volume differs from restore + guest writes"
        );
    }
}

#[test]
fn a_power_cut_mid_restore_resumes_to_restore_plus_flushed_writes() {
    for (round, mode) in [
        LossMode::DropUnflushed,
        LossMode::TearAndReorder { seed: 5 },
    ]
    .into_iter()
    .enumerate()
    {
        // The cut must land while the restore runs. On a loaded host the copy can finish
        // before the cut is armed (its record is then gone): such a round says nothing, and is
        // run again on a new setup.
        let mut attempt = 0u64;
        let (s, target2, logs) = loop {
            attempt += 1;
            assert!(
                attempt <= 5,
                "{mode:?}: the copy finished before the cut in 5 attempts"
            );
            let s = setup(20 + round as u64 + 100 * attempt);
            let p = paths(&s);
            let (fault, ctl) = FaultDevice::new(SIZE as u64);
            {
                let mut q = BlockingQueue::open(fault.as_ref(), 1).unwrap();
                q.write_at(0, &vec![0xee; SIZE]).unwrap();
                q.flush().unwrap();
            }
            ctl.set_loss_mode(mode);
            let target: Arc<dyn BlockDevice> = fault.clone();
            let dev =
                LiveRestore::start(&s.store, &s.snap, target, "lv:vg0/disk", &p, opts(1)).unwrap();
            let total = dev.status().chunks_total;
            let c2 = ctl.clone();
            let crashed: Crashed = Arc::new(move || c2.crashed());
            let (_, logs) = with_guests(&dev, &s.data, 100_000, crashed, || {
                // Cut the power at the first flush (the guests' or the copy's) once a quarter of
                // the chunks are there.
                while dev.status().chunks_done < total / 4 {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                // One flush from the host makes sure some progress was recorded before.
                dev.flush().unwrap();
                ctl.crash_at_flush(1);
                while !ctl.crashed() {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            });
            drop(dev);
            let image = ctl.durable_image().unwrap();
            if !p.record().exists() && total > 0 {
                eprintln!("{mode:?}: attempt {attempt}: the copy finished before the cut; again");
                continue;
            }
            // The map is never ahead of the volume: resume on what survived and finish.
            let (fault2, _ctl2) = FaultDevice::from_durable(&image);
            let target2: Arc<dyn BlockDevice> = fault2.clone();
            {
                let dev = LiveRestore::resume(&p, target2.clone(), opts(2))
                    .unwrap_or_else(|e| panic!("{mode:?}: resume: {e}"));
                let done = dev.status().chunks_done;
                assert!(done > 0, "the restore resumed from zero");
                let st = dev.copy_to_end(&NoProgress).unwrap();
                assert!(st.finished, "{st:?}");
            }
            break (s, target2, logs);
        };
        let got = common::read_all(&target2);
        // Expected: the snapshot with every flushed write; each sector of a write not flushed
        // may hold the old bytes or the bytes of any such write covering it.
        let mut expected = s.data.clone();
        let mut pending = Vec::new();
        for l in &logs {
            let l = l.lock().unwrap();
            for (off, d) in &l.flushed {
                expected[*off..off + d.len()].copy_from_slice(d);
            }
            pending.extend(l.pending.iter().cloned());
        }
        for sector in (0..SIZE).step_by(512) {
            let g = &got[sector..sector + 512];
            if g == &expected[sector..sector + 512] {
                continue;
            }
            let ok = pending.iter().any(|(off, d)| {
                *off <= sector
                    && sector + 512 <= off + d.len()
                    && g == &d[sector - off..sector - off + 512]
            });
            assert!(ok, "{mode:?}: sector at {sector} holds neither the durable data nor an unflushed write");
        }
    }
}

#[test]
fn damaged_chunks_fail_their_ranges_only_and_are_reported() {
    let s = setup(31);
    let (_, index) = s.store.read_snapshot(&s.snap).unwrap();
    let stored: Vec<(u64, strata_backup::Digest)> = index
        .entries()
        .iter()
        .enumerate()
        .filter_map(|(i, e)| e.digest().map(|d| (i as u64, d)))
        .collect();
    // One chunk's blob flipped, another's deleted (chunks whose digests occur once).
    let once = |d: &strata_backup::Digest| stored.iter().filter(|(_, x)| x == d).count() == 1;
    let mut picks = stored.iter().filter(|(_, d)| once(d));
    let (bad, bad_d) = *picks.next().unwrap();
    let (gone, gone_d) = *picks.nth(5).unwrap();
    let blob = s.store.chunk_path(&bad_d);
    let good_blob = std::fs::read(&blob).unwrap();
    let mut flipped = good_blob.clone();
    let n = flipped.len();
    flipped[n - 7] ^= 0x55;
    std::fs::write(&blob, &flipped).unwrap();
    let gone_path = s.store.chunk_path(&gone_d);
    let gone_blob = std::fs::read(&gone_path).unwrap();
    std::fs::remove_file(&gone_path).unwrap();

    let p = paths(&s);
    let path = s.dir.join("target.raw");
    let target = target_file(&path, true);
    let dev = LiveRestore::start(&s.store, &s.snap, target, "lv:vg0/disk", &p, opts(2)).unwrap();
    let d: Arc<dyn BlockDevice> = Arc::new(dev.clone());
    let mut q = BlockingQueue::open(d.as_ref(), 1).unwrap();
    let cs = CS as usize;
    for c in 0..SIZE / cs {
        let r = q.read_at((c * cs) as u64, cs);
        if c as u64 == bad || c as u64 == gone {
            let e = r.expect_err("a damaged chunk was served");
            assert!(e.to_string().contains("could not be restored"), "{e}");
            assert_eq!(e.errno(), libc::EIO, "{e}");
        } else {
            assert!(r.unwrap() == s.data[c * cs..(c + 1) * cs], "chunk {c}");
        }
    }
    // A read crossing into a damaged chunk fails too; a partial write into one fails; a write
    // covering one whole replaces it.
    assert!(q.read_at((bad as usize * cs - 512) as u64, 1024).is_err());
    assert!(q
        .write_at((gone as usize * cs) as u64, &[1u8; 512])
        .is_err());
    let err = dev.copy_to_end(&NoProgress).unwrap_err().to_string();
    assert!(
        err.contains(&format!("chunk {bad} ")) && err.contains(&format!("chunk {gone} ")),
        "{err}"
    );
    let st = dev.status();
    assert_eq!(st.lost.len(), 2, "{st:?}");
    assert!(!st.finished);
    assert!(
        p.read().unwrap().is_some(),
        "the volume stays under live restore"
    );
    q.write_at((bad as usize * cs) as u64, &vec![7u8; cs])
        .unwrap();
    assert!(q.read_at((bad as usize * cs) as u64, cs).unwrap() == vec![7u8; cs]);
    drop(q);
    drop(d);
    drop(dev);
    // Everything but the damaged chunks is the snapshot.
    let on_disk = std::fs::read(&path).unwrap();
    for c in 0..SIZE / cs {
        if c as u64 == gone {
            continue;
        }
        let want: &[u8] = if c as u64 == bad {
            &[7u8; 64 << 10]
        } else {
            &s.data[c * cs..(c + 1) * cs]
        };
        assert!(on_disk[c * cs..(c + 1) * cs] == *want, "chunk {c}");
    }
    // Repaired datastore: the resumed restore fetches the missing chunk and finishes.
    std::fs::write(&blob, &good_blob).unwrap();
    std::fs::write(&gone_path, &gone_blob).unwrap();
    let target = common::open_rw(&path, Some(ImageFormat::Raw)).unwrap();
    let dev = LiveRestore::resume(&p, target, opts(2)).unwrap();
    assert!(dev.copy_to_end(&NoProgress).unwrap().finished);
    drop(dev);
    let on_disk = std::fs::read(&path).unwrap();
    assert!(
        on_disk[gone as usize * cs..(gone as usize + 1) * cs]
            == s.data[gone as usize * cs..(gone as usize + 1) * cs]
    );
    assert!(on_disk[bad as usize * cs..(bad as usize + 1) * cs] == [7u8; 64 << 10]);
}

#[test]
fn a_second_opener_is_refused_and_a_wrong_target_size_too() {
    let s = setup(41);
    let p = paths(&s);
    let t1: Arc<dyn BlockDevice> = MemoryDevice::new(SIZE as u64);
    let dev =
        LiveRestore::start(&s.store, &s.snap, t1.clone(), "lv:vg0/disk", &p, opts(1)).unwrap();
    assert!(matches!(
        LiveRestore::start(&s.store, &s.snap, t1.clone(), "lv:vg0/disk", &p, opts(1)),
        Err(StorageError::Busy(_))
    ));
    assert!(matches!(
        LiveRestore::resume(&p, t1.clone(), opts(1)),
        Err(StorageError::Busy(_))
    ));
    drop(dev);
    let small: Arc<dyn BlockDevice> = MemoryDevice::new(SIZE as u64 - 512);
    assert!(LiveRestore::resume(&p, small, opts(1)).is_err());
    let dev = LiveRestore::resume(&p, t1.clone(), opts(1)).unwrap();
    assert!(dev.copy_to_end(&NoProgress).unwrap().finished);
    drop(dev);
    assert_eq!(common::read_all(&t1), s.data);
}

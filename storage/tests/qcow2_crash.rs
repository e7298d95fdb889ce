//! Crash safety: power loss at every flush point (every sync the engine issues, inside metadata
//! write-back too) of a random workload on a fault-injecting device. After each crash the image
//! reopens, our check finds at most leaked clusters, and everything a completed flush covered
//! reads back. Some crashed images are also written to files for `qemu-img check`.

mod qcow2_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use qcow2_support::*;
use strata_storage::format::qcow2::{self, check::Repair, Qcow2Options};
use strata_storage::format::{create_image, ImageFormat};
use strata_storage::io::fault::{DurableImage, FaultDevice, LossMode};
use strata_storage::io::{IoBuf, QueueOptions, Request};
use strata_storage::{BlockDevice, HostFile, SharedFile};

const SIZE: u64 = 4 << 20;

fn image_bytes(dir: &Path, opts: &[(&str, String)]) -> Vec<u8> {
    let p = dir.join(format!("img-{}.qcow2", fastrand::u64(..)));
    let map: BTreeMap<String, String> = opts
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    create_image(&p, ImageFormat::Qcow2, SIZE, &map).unwrap();
    std::fs::read(&p).unwrap()
}

fn device_with(bytes: &[u8]) -> (Arc<FaultDevice>, strata_storage::io::fault::FaultController) {
    let (dev, ctl) = FaultDevice::new(bytes.len() as u64);
    dev.write_all_at(0, bytes).unwrap();
    dev.sync_data().unwrap();
    (dev, ctl)
}

struct Outcome {
    /// Contents as of the last completed guest flush.
    flushed: Vec<u8>,
    /// Ranges written (or discarded) after it: their contents are either old or new.
    touched: Vec<(u64, u64)>,
    completed_all: bool,
}

/// Runs the workload until it finishes or the device dies.
fn run_workload(
    dev: SharedFile,
    base: &[u8],
    actions: &[Action],
    snapshots: bool,
    cache: Option<u64>,
) -> Outcome {
    let opts = Qcow2Options {
        l2_cache_bytes: cache,
        rb_cache_bytes: cache,
        ..Qcow2Options::default()
    };
    let img = qcow2::open(dev, &opts).unwrap();
    let mut model = base.to_vec();
    let mut out = Outcome {
        flushed: base.to_vec(),
        touched: Vec::new(),
        completed_all: false,
    };
    let mut q = img.open_queue(&QueueOptions::with_depth(16)).unwrap();
    let mut i = 0;
    let mut flushes = 0u32;
    let mut snaps: Vec<String> = Vec::new();
    while i < actions.len() {
        // A batch of non-overlapping requests, then a flush if the next action is one.
        let mut batch = Vec::new();
        while i < actions.len() && batch.len() < 8 {
            let a = actions[i];
            if matches!(a, Action::Flush) {
                break;
            }
            batch.push(a);
            i += 1;
        }
        for (t, a) in batch.iter().enumerate() {
            let req = match *a {
                Action::Write { offset, len, seed } => Request::write(
                    t as u64,
                    offset,
                    IoBuf::from_slice(&pattern(offset, len as usize, seed)),
                ),
                Action::Discard { offset, len } => Request::discard(t as u64, offset, len),
                Action::Zero { offset, len, unmap } => {
                    Request::write_zeroes(t as u64, offset, len, unmap)
                }
                Action::Flush => unreachable!(),
            };
            q.submit(req).unwrap();
        }
        let mut done = Vec::new();
        while done.len() < batch.len() {
            q.wait(Some(Duration::from_secs(30))).unwrap();
            q.reap(&mut done);
        }
        // Apply in submission order: batches are non-overlapping by construction below.
        done.sort_by_key(|c| c.tag);
        let mut failed = false;
        for c in &done {
            let a = batch[c.tag as usize];
            let (o, l) = match a {
                Action::Write { offset, len, .. }
                | Action::Discard { offset, len }
                | Action::Zero { offset, len, .. } => (offset, len),
                Action::Flush => unreachable!(),
            };
            out.touched.push((o, l));
            if let Err(e) = &c.result {
                eprintln!("{a:?} failed: {e}");
                failed = true;
                continue;
            }
            match a {
                Action::Write { offset, len, seed } => model
                    [offset as usize..(offset + len) as usize]
                    .copy_from_slice(&pattern(offset, len as usize, seed)),
                _ => model[o as usize..(o + l) as usize].fill(0),
            }
        }
        if failed {
            return out;
        }
        if i < actions.len() && matches!(actions[i], Action::Flush) {
            i += 1;
            q.submit(Request::flush(99)).unwrap();
            let mut done = Vec::new();
            while done.is_empty() {
                q.wait(Some(Duration::from_secs(30))).unwrap();
                q.reap(&mut done);
            }
            if done[0].result.is_err() {
                return out;
            }
            out.flushed = model.clone();
            out.touched.clear();
            flushes += 1;
            if snapshots && flushes % 4 == 2 {
                let name = format!("s{flushes}");
                if let Err(e) = img.snapshot_create(&name) {
                    eprintln!("snapshot create failed: {e}");
                    return out;
                }
                snaps.push(name);
            } else if snapshots && flushes % 4 == 0 && !snaps.is_empty() {
                if let Err(e) = img.snapshot_delete(&snaps.remove(0)) {
                    eprintln!("snapshot delete failed: {e}");
                    return out;
                }
            }
        }
    }
    q.submit(Request::flush(99)).unwrap();
    let mut done = Vec::new();
    while done.is_empty() {
        q.wait(Some(Duration::from_secs(30))).unwrap();
        q.reap(&mut done);
    }
    if done[0].result.is_ok() {
        out.flushed = model;
        out.touched.clear();
        out.completed_all = true;
    }
    out
}

/// Non-overlapping batches between flushes (overlapping actions are spread out by flushes).
fn crash_workload(seed: u64) -> Vec<Action> {
    let raw = workload(SIZE, 70, seed);
    let mut out = Vec::new();
    let mut batch: Vec<(u64, u64)> = Vec::new();
    for a in raw {
        let r = match a {
            Action::Write { offset, len, .. }
            | Action::Discard { offset, len }
            | Action::Zero { offset, len, .. } => Some((offset, len.min(128 * 1024))),
            Action::Flush => None,
        };
        let a = match a {
            Action::Write { offset, len, seed } => Action::Write {
                offset,
                len: len.min(128 * 1024),
                seed,
            },
            Action::Discard { offset, len } => Action::Discard {
                offset,
                len: len.min(128 * 1024),
            },
            Action::Zero { offset, len, unmap } => Action::Zero {
                offset,
                len: len.min(128 * 1024),
                unmap,
            },
            f => f,
        };
        match r {
            Some((o, l)) => {
                if batch.iter().any(|&(bo, bl)| o < bo + bl && bo < o + l) {
                    out.push(Action::Flush);
                    batch.clear();
                }
                batch.push((o, l));
                out.push(a);
            }
            None => {
                out.push(Action::Flush);
                batch.clear();
            }
        }
    }
    out
}

fn verify(image: &DurableImage, outcome: &Outcome, what: &str, dir: &Path, qemu: bool) {
    let (dev, _) = FaultDevice::from_durable(image);
    let img = qcow2::open(dev.clone(), &Qcow2Options::default())
        .unwrap_or_else(|e| panic!("{what}: reopening after the crash failed: {e}"));
    let report = img.check(Repair::None).unwrap();
    assert_eq!(
        (report.corruptions, report.check_errors),
        (0, 0),
        "{what}: our check after the crash: {:?}",
        report.messages
    );
    let got = read_all(img.as_ref());
    let mut want = outcome.flushed.clone();
    for &(o, l) in &outcome.touched {
        want[o as usize..(o + l) as usize].copy_from_slice(&got[o as usize..(o + l) as usize]);
    }
    assert_same(
        &got,
        &want,
        &format!("{what}: data covered by a completed flush"),
    );
    drop(img);
    if qemu {
        // The durable image as it was at the crash (before our reopen repaired anything).
        let path = dir.join(format!("crashed-{}.qcow2", fastrand::u64(..)));
        std::fs::write(&path, image.read(0, image.len() as usize)).unwrap();
        let (code, out) = run_status("qemu-img", &["check", path.to_str().unwrap()]);
        assert!(
            code == 0 || code == 3,
            "{what}: qemu-img check found more than leaks:\n{out}"
        );
    }
}

fn crash_everywhere(name: &str, opts: &[(&str, String)], seed: u64, snapshots: bool) {
    crash_with_cache(name, opts, seed, snapshots, None);
}

fn crash_with_cache(
    name: &str,
    opts: &[(&str, String)],
    seed: u64,
    snapshots: bool,
    cache: Option<u64>,
) {
    let qemu = strata_testkit::part_has_tool("qemu-img", "qemu-utils");
    let dir = tempdir();
    let bytes = image_bytes(dir.path(), opts);
    let actions = crash_workload(seed);
    let base = {
        let (dev, _) = device_with(&bytes);
        let img = qcow2::open(dev, &Qcow2Options::default()).unwrap();
        read_all(img.as_ref())
    };
    // Count the flushes of a run without a crash.
    let (dev, ctl) = device_with(&bytes);
    let before = ctl.flushes();
    let full = run_workload(dev, &base, &actions, snapshots, cache);
    assert!(
        full.completed_all,
        "{name}: the workload failed without a crash"
    );
    let flushes = ctl.flushes() - before;
    assert!(flushes > 10, "{name}: only {flushes} flushes");
    let lazy = opts.iter().any(|(k, _)| *k == "lazy_refcounts");
    // Every crash point when there are few; an even sample (always with the first and last)
    // when eviction makes many.
    let step = (flushes / 48).max(1) as usize;
    let points: Vec<u64> = (1..=flushes).step_by(step).chain([flushes]).collect();
    eprintln!(
        "{name}: {flushes} flush points, crashing at {}",
        points.len()
    );
    for k in points {
        for (mi, mode) in [
            LossMode::DropUnflushed,
            LossMode::TearAndReorder { seed: seed ^ k },
        ]
        .into_iter()
        .enumerate()
        {
            let (dev, ctl) = device_with(&bytes);
            ctl.set_loss_mode(mode);
            ctl.crash_at_flush(k);
            let outcome = run_workload(dev, &base, &actions, snapshots, cache);
            let image = ctl.durable_image().unwrap_or_else(|| ctl.power_loss());
            // qemu-img check on a sample of crash points (lazy images are repaired on open).
            let ask_qemu = qemu && !lazy && mi == 1 && k % 6 == 1;
            verify(
                &image,
                &outcome,
                &format!("{name}: crash at flush {k} ({mode:?})"),
                dir.path(),
                ask_qemu,
            );
        }
    }
}

#[test]
fn crash_at_every_flush_64k_clusters() {
    crash_everywhere("crash_64k", &[], 1, true);
}

#[test]
fn crash_at_every_flush_small_clusters_and_narrow_refcounts() {
    crash_everywhere(
        "crash_4k_rc2",
        &[
            ("cluster_size", "4096".into()),
            ("refcount_bits", "2".into()),
        ],
        2,
        true,
    );
}

#[test]
fn crash_at_every_flush_extended_l2() {
    crash_everywhere(
        "crash_extl2",
        &[
            ("extended_l2", "on".into()),
            ("cluster_size", "32768".into()),
        ],
        3,
        true,
    );
}

#[test]
fn crash_at_every_flush_lazy_refcounts() {
    crash_everywhere(
        "crash_lazy",
        &[
            ("lazy_refcounts", "on".into()),
            ("cluster_size", "4096".into()),
        ],
        4,
        false,
    );
}

#[test]
fn crash_at_every_flush_with_copy_on_write_from_a_backing_file() {
    let dir = tempdir();
    let base = dir.path().join("base.raw");
    let data: Vec<u8> = (0..SIZE as u32).map(|i| (i % 253) as u8 | 1).collect();
    std::fs::write(&base, &data).unwrap();
    crash_everywhere(
        "crash_backing",
        &[
            ("backing_file", base.display().to_string()),
            ("backing_fmt", "raw".into()),
            ("cluster_size", "16384".into()),
        ],
        5,
        true,
    );
}

#[test]
fn crash_at_every_flush_with_tiny_metadata_caches() {
    // Four L2 tables and four refcount blocks: dirty tables are evicted (refcounts, sync, then
    // the table) between flushes, and those syncs are crash points too.
    crash_with_cache(
        "crash_tiny_cache",
        &[("cluster_size", "512".into())],
        6,
        false,
        Some(2048),
    );
}

//! Crash safety of change tracking inside a qcow2 image: a session opens a qcow2 v3 image with
//! an enabled bitmap of its own on a fault-injecting device, writes through the tracked device
//! (flushing after each batch) and closes cleanly — the close writes the bits back and clears
//! the bitmap's in-use flag. Power is lost at every flush of the session, at operations of any
//! kind (a seeded sample, plus every operation of the close's write-back) with late,
//! out-of-order completions, and after an injected EIO at the Nth write or flush. After each
//! crash the image reopens and checks clean (ours; `qemu-img check` finds at most leaks), data
//! a completed flush covered reads back, and the bitmap is either still flagged in use
//! (untrusted) or consistent and covering every write a completed flush acknowledged and every
//! sector that differs from before the session: a consistent bitmap never misses a write.
//!
//! Fixed seeds in CI; `STRATA_FAULT_SEEDS=N` runs N seeds.

mod qcow2_support;
mod tracked_session;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use qcow2_support::*;
use strata_storage::bitmap::bits::ranges;
use strata_storage::bitmap::{BitmapSet, TrackedDevice};
use strata_storage::format::qcow2::{self, check::Repair, Qcow2Options};
use strata_storage::format::{create_image, open_host_file, ImageFormat, OpenOptions};
use strata_storage::io::fault::{DurableImage, Fault, FaultController, FaultDevice, OpKind};
use strata_storage::io::QueueOptions;
use strata_storage::BlockDevice;
use tracked_session::{
    at_every_cut, check_covers, check_data, write_batches, writes, Cut, Faults, Outcome, Tally, G,
    SIZE,
};

const NAME: &str = "backup";

/// A fresh qcow2 v3 image (4 KiB clusters) with an enabled, empty in-image bitmap.
fn image_bytes(dir: &Path) -> Vec<u8> {
    let path = dir.join("base.qcow2");
    let opts: BTreeMap<String, String> = [("cluster_size", "4096"), ("compat", "1.1")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    create_image(&path, ImageFormat::Qcow2, SIZE, &opts).unwrap();
    {
        let file = open_host_file(&path, &OpenOptions::default()).unwrap();
        let img = qcow2::open(file, &Qcow2Options::default()).unwrap();
        let set = BitmapSet::open_in_image(img, &path).unwrap();
        set.add(NAME, G).unwrap();
        set.save().unwrap();
    }
    std::fs::read(&path).unwrap()
}

/// One session: open, track, write and flush the batches, close. Stops at the first error.
/// `close_at` receives the device's operation count when the close begins.
fn session(
    dev: Arc<FaultDevice>,
    batches: &[Vec<(u64, Vec<u8>)>],
    close_at: &mut u64,
    ctl: &FaultController,
) -> Outcome {
    let mut out = Outcome::default();
    let Ok(img) = qcow2::open(dev, &Qcow2Options::default()) else {
        return out;
    };
    let Ok(set) = BitmapSet::open_in_image(img.clone(), Path::new("crash.qcow2")) else {
        return out;
    };
    let Ok(tracked) = TrackedDevice::with_set(img, Arc::new(set)) else {
        return out;
    };
    if let Ok(mut q) = tracked.open_queue(&QueueOptions::with_depth(8)) {
        write_batches(&mut q, batches, &mut out, |_, _| {});
    }
    // The clean close: the last queue and the tracked device go, the bits are written back and
    // the in-use flag cleared, then the image closes.
    *close_at = ctl.ops();
    drop(tracked);
    out
}

/// Checks the image a crash left; returns whether its bitmap is consistent (trusted).
fn verify(
    image: &DurableImage,
    outcome: &Outcome,
    base: &[u8],
    what: &str,
    dir: &Path,
    qemu: bool,
) -> bool {
    // The bitmap as the crash left it, read from a read-only open (a writable one flags it).
    let path = dir.join(format!("crashed-{}.qcow2", fastrand::u64(..)));
    std::fs::write(&path, image.read(0, image.len() as usize)).unwrap();
    let bitmap = {
        let file = open_host_file(
            &path,
            &OpenOptions {
                read_only: true,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        let img = qcow2::open(file, &Qcow2Options::default())
            .unwrap_or_else(|e| panic!("{what}: opening after the crash failed: {e}"));
        let list = img.bitmaps().unwrap();
        let b = list
            .iter()
            .find(|b| b.name == NAME)
            .unwrap_or_else(|| panic!("{what}: bitmap gone: {list:?}"));
        (!b.in_use).then(|| img.bitmap_words(NAME).unwrap().1)
    };
    if qemu {
        let (code, out) = run_status("qemu-img", &["check", path.to_str().unwrap()]);
        assert!(
            code == 0 || code == 3,
            "{what}: qemu-img check found more than leaks:\n{out}"
        );
    }
    std::fs::remove_file(&path).unwrap();
    let (dev, _) = FaultDevice::from_durable(image);
    let img = qcow2::open(dev, &Qcow2Options::default())
        .unwrap_or_else(|e| panic!("{what}: reopening after the crash failed: {e}"));
    let report = img.check(Repair::None).unwrap();
    assert_eq!(
        (report.corruptions, report.check_errors),
        (0, 0),
        "{what}: our check after the crash: {:?}",
        report.messages
    );
    let got = read_all(img.as_ref());
    check_data(&got, base, outcome, what);
    let Some(words) = bitmap else {
        return false;
    };
    check_covers(&ranges(&words, G, SIZE), &got, base, outcome, what);
    true
}

fn crash_sessions(seed: u64, faults: Faults) {
    let qemu = strata_testkit::part_has_tool("qemu-img", "qemu-utils");
    let dir = tempdir();
    let bytes = image_bytes(dir.path());
    let batches = writes(seed, 6);
    let base = {
        let (dev, _) = device_with(&bytes);
        read_all(qcow2::open(dev, &Qcow2Options::default()).unwrap().as_ref())
    };
    let async_seed = faults.async_seed();
    let device = || {
        let (dev, ctl) = device_with(&bytes);
        if let Some(s) = async_seed {
            ctl.async_completions(s);
        }
        (dev, ctl)
    };
    // A run without a crash: counts, and the bitmap it leaves is consistent and exact.
    let (dev, ctl) = device();
    let (f0, o0, w0) = (ctl.flushes(), ctl.ops(), ctl.ops_of(OpKind::Write));
    let mut close_at = 0;
    let full = session(dev, &batches, &mut close_at, &ctl);
    assert!(
        full.finished && full.touched.is_empty(),
        "the session failed without a crash"
    );
    let image = ctl.power_loss();
    assert!(
        verify(&image, &full, &base, "no crash", dir.path(), qemu),
        "a clean close left the bitmap in use"
    );
    let (flushes, ops) = (ctl.flushes() - f0, ctl.ops() - o0);
    let (writes, close_from) = (ctl.ops_of(OpKind::Write) - w0, close_at - o0 + 1);
    {
        let (dev, _) = FaultDevice::from_durable(&image);
        let img = qcow2::open(dev, &Qcow2Options::default()).unwrap();
        let set = BitmapSet::open_in_image(img, Path::new("x")).unwrap();
        let (dirty, valid) = set.dirty_ranges(NAME).unwrap();
        let mut words = vec![0u64; (SIZE / G).div_ceil(64) as usize];
        for (o, _) in &full.flushed {
            words[(o / G / 64) as usize] |= 1 << (o / G % 64);
        }
        let want = ranges(&words, G, SIZE);
        assert!(valid, "a clean close left the bitmap untrusted");
        assert_eq!(dirty, want, "the bitmap after a clean close");
    }
    let cuts: Vec<Cut> = match faults {
        Faults::Flushes => (1..=flushes).map(Cut::Flush).collect(),
        Faults::AnyOpAsync(s) => {
            let mut rng = fastrand::Rng::with_seed(s);
            let mut v: Vec<u64> = (0..12).map(|_| rng.u64(1..=ops)).collect();
            v.extend(close_from..=ops);
            v.sort_unstable();
            v.dedup();
            v.into_iter().map(Cut::Op).collect()
        }
        Faults::EioAsync(s) => {
            let mut rng = fastrand::Rng::with_seed(s);
            (0..16)
                .map(|_| match rng.u64(1..=writes + flushes) {
                    k if k <= writes => Cut::Nth(OpKind::Write, k, Fault::Eio),
                    k => Cut::Nth(OpKind::Flush, k - writes, Fault::Eio),
                })
                .collect()
        }
    };
    eprintln!(
        "{flushes} flushes, {ops} operations (the close from {close_from}), {writes} writes; crashing at {} ({faults:?})",
        cuts.len()
    );
    // The torn mode's seed: the cut's number among the flushes, operations, or writes and
    // flushes counted together.
    let point = |cut: Cut| match cut {
        Cut::Flush(k) | Cut::Op(k) | Cut::Nth(OpKind::Write, k, _) => k,
        Cut::Nth(_, n, _) => writes + n,
    };
    let Tally {
        trusted,
        trusted_with_writes,
        untrusted,
    } = at_every_cut(
        &cuts,
        |_, cut| seed ^ point(cut),
        |cut, mi, mode| {
            let (dev, ctl) = device();
            ctl.set_loss_mode(mode);
            cut.arm(&ctl);
            let outcome = session(dev, &batches, &mut close_at, &ctl);
            let image = ctl.durable_image().unwrap_or_else(|| ctl.power_loss());
            let after = if matches!(cut, Cut::Nth(..)) {
                ", power lost after the close"
            } else {
                ""
            };
            let what = format!("crash at {cut:?}{after} ({mode:?}, {faults:?})");
            let ask_qemu = qemu && (mi == 1 || matches!(faults, Faults::EioAsync(_)));
            let trusted = verify(&image, &outcome, &base, &what, dir.path(), ask_qemu);
            (trusted, !outcome.flushed.is_empty())
        },
    );
    eprintln!(
        "{faults:?}: bitmap consistent after {trusted} crashes ({trusted_with_writes} with flushed writes), in use after {untrusted}"
    );
    assert!(
        trusted_with_writes > 0,
        "no crash left a consistent bitmap holding writes"
    );
    assert!(untrusted > 0, "no crash left the bitmap in use");
}

#[test]
fn power_loss_at_every_flush_of_a_tracked_session() {
    crash_sessions(1, Faults::Flushes);
}

#[test]
fn power_loss_at_any_operation_of_a_tracked_session_and_its_close() {
    for s in strata_storage::io::fault::fault_seeds(&[0xb17]) {
        crash_sessions(2, Faults::AnyOpAsync(s));
    }
}

#[test]
fn eio_at_the_nth_write_or_flush_of_a_tracked_session() {
    for s in strata_storage::io::fault::fault_seeds(&[0xe10]) {
        crash_sessions(3, Faults::EioAsync(s));
    }
}

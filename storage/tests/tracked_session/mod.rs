//! Helpers shared by the crash tests of change tracking (`bitmap_crash.rs`: bitmaps inside a
//! qcow2 image; `sidecar_bitmap_crash.rs`: sidecar files): a workload of disjoint writes in
//! batches through a tracked device's queue, and the checks of what a crash left. Needs the
//! crate's `qcow2_support` module.
#![allow(dead_code)]

use std::time::Duration;

use strata_storage::io::fault::{Fault, FaultController, LossMode, OpKind};
use strata_storage::io::{Completion, IoBuf, IoQueue, Request};

use crate::qcow2_support::{assert_same, pattern};

/// The tracked device's size.
pub const SIZE: u64 = 4 << 20;
/// The bitmap's granularity, and the slot each write stays inside (writes never overlap).
pub const G: u64 = 64 << 10;

/// `batches` batches of four disjoint writes (each inside its own granule-sized slot).
pub fn writes(seed: u64, batches: usize) -> Vec<Vec<(u64, Vec<u8>)>> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut slots: Vec<u64> = (0..SIZE / G).collect();
    rng.shuffle(&mut slots);
    let all: Vec<(u64, Vec<u8>)> = slots[..4 * batches]
        .iter()
        .map(|&s| {
            let sectors = G / 512;
            let len = rng.u64(1..=sectors / 2);
            let start = rng.u64(0..=sectors - len);
            let offset = s * G + start * 512;
            (offset, pattern(offset, (len * 512) as usize, rng.u8(1..)))
        })
        .collect();
    all.chunks(4).map(<[_]>::to_vec).collect()
}

/// What a session did before it stopped.
#[derive(Default)]
pub struct Outcome {
    /// Writes a completed flush covered.
    pub flushed: Vec<(u64, Vec<u8>)>,
    /// Writes submitted since: each sector holds the old data or theirs.
    pub touched: Vec<(u64, Vec<u8>)>,
    /// What a successful take handed out: dirty ranges, and whether they were valid.
    pub taken: Option<(Vec<(u64, u64)>, bool)>,
    /// A take failed (the backup would fail; the writes go on).
    pub take_failed: bool,
    /// The session ran to its end (the close itself may still have failed).
    pub finished: bool,
}

fn wait_all(q: &mut Box<dyn IoQueue>, want: usize) -> Option<Vec<Completion>> {
    let mut done = Vec::new();
    while done.len() < want {
        q.wait(Some(Duration::from_secs(30))).ok()?;
        q.reap(&mut done);
    }
    Some(done)
}

/// Writes each batch through `q` and flushes it, recording what was written and flushed in
/// `out`; after the flush of batch `b` (from 0), calls `after(b, out)`. Stops at the first error
/// (and returns false); otherwise marks the session finished.
pub fn write_batches(
    q: &mut Box<dyn IoQueue>,
    batches: &[Vec<(u64, Vec<u8>)>],
    out: &mut Outcome,
    mut after: impl FnMut(usize, &mut Outcome),
) -> bool {
    for (b, batch) in batches.iter().enumerate() {
        if !write_unflushed(q, batch, out) || q.submit(Request::flush(99)).is_err() {
            return false;
        }
        match wait_all(q, 1) {
            Some(d) if d[0].result.is_ok() => out.flushed.append(&mut out.touched),
            _ => return false,
        }
        after(b, out);
    }
    out.finished = true;
    true
}

/// Writes `batch` through `q` without a flush (the writes stay in `out.touched`); false at the
/// first error.
pub fn write_unflushed(
    q: &mut Box<dyn IoQueue>,
    batch: &[(u64, Vec<u8>)],
    out: &mut Outcome,
) -> bool {
    for (t, (offset, data)) in batch.iter().enumerate() {
        out.touched.push((*offset, data.clone()));
        if q.submit(Request::write(t as u64, *offset, IoBuf::from_slice(data)))
            .is_err()
        {
            return false;
        }
    }
    wait_all(q, batch.len()).is_some_and(|done| done.iter().all(|c| c.result.is_ok()))
}

/// Checks the data a crash left: flushed writes exact; later ones old or new, sector by
/// sector; the rest as in `base`.
pub fn check_data(got: &[u8], base: &[u8], out: &Outcome, what: &str) {
    let mut want = base.to_vec();
    for (o, d) in &out.flushed {
        want[*o as usize..][..d.len()].copy_from_slice(d);
    }
    for (o, d) in &out.touched {
        for s in (0..d.len()).step_by(512) {
            let r = *o as usize + s..*o as usize + s + 512;
            if got[r.clone()] == d[s..s + 512] {
                want[r].copy_from_slice(&d[s..s + 512]);
            }
        }
    }
    assert_same(got, &want, &format!("{what}: data"));
}

/// The granules `ranges` (offset, length) cover.
pub fn granules(ranges: &[(u64, u64)]) -> Vec<bool> {
    let mut g = vec![false; (SIZE / G) as usize];
    for &(o, l) in ranges {
        for i in o / G..(o + l).div_ceil(G) {
            g[i as usize] = true;
        }
    }
    g
}

fn covered(dirty: &[bool], offset: u64, len: u64) -> bool {
    (offset / G..(offset + len).div_ceil(G)).all(|g| dirty[g as usize])
}

/// Checks a consistent bitmap's dirty ranges (with what a take handed out, if any): every
/// flushed write, and every sector of `got` that differs from `base`, is dirty.
pub fn check_covers(dirty: &[(u64, u64)], got: &[u8], base: &[u8], out: &Outcome, what: &str) {
    let mut all = dirty.to_vec();
    if let Some((taken, _)) = &out.taken {
        all.extend_from_slice(taken);
    }
    let g = granules(&all);
    for (o, d) in &out.flushed {
        assert!(
            covered(&g, *o, d.len() as u64),
            "{what}: the consistent bitmap misses the flushed write at {o}+{}: dirty {dirty:?}, taken {:?}",
            d.len(),
            out.taken
        );
    }
    for s in (0..SIZE).step_by(512) {
        let r = s as usize..s as usize + 512;
        assert!(
            got[r.clone()] == base[r] || covered(&g, s, 512),
            "{what}: sector {s} changed but the consistent bitmap misses it: dirty {dirty:?}, taken {:?}",
            out.taken
        );
    }
}

/// The faults a crash test of tracking injects.
#[derive(Clone, Copy, Debug)]
pub enum Faults {
    /// At every flush; requests complete at submit.
    Flushes,
    /// At a seeded sample of operations and every operation of the close (and, for a sidecar,
    /// every sidecar operation); late, out-of-order completions.
    AnyOpAsync(u64),
    /// EIO at a seeded sample of writes and flushes (and every sidecar operation), then the
    /// session stops, closes, and the power goes; late, out-of-order completions.
    EioAsync(u64),
}

impl Faults {
    /// The seed of late, out-of-order completions, if they are on.
    pub fn async_seed(self) -> Option<u64> {
        match self {
            Faults::Flushes => None,
            Faults::AnyOpAsync(s) | Faults::EioAsync(s) => Some(s),
        }
    }
}

/// Where a crash run is cut.
#[derive(Clone, Copy, Debug)]
pub enum Cut {
    /// Power lost at the Nth flush of the device.
    Flush(u64),
    /// Power lost at the Nth operation of any kind.
    Op(u64),
    /// `Fault` at the Nth operation of a kind (for EIO, the power goes after the close).
    Nth(OpKind, u64, Fault),
}

impl Cut {
    /// Sets `ctl` to cut there.
    pub fn arm(self, ctl: &FaultController) {
        match self {
            Cut::Flush(k) => ctl.crash_at_flush(k),
            Cut::Op(k) => ctl.crash_at_op(k),
            Cut::Nth(kind, n, fault) => ctl.fail_nth(kind, n, fault),
        }
    }
}

/// What the crash runs left the bitmap: consistent (with flushed writes, or none yet), or
/// untrusted.
#[derive(Debug, Default)]
pub struct Tally {
    pub trusted: u64,
    pub trusted_with_writes: u64,
    pub untrusted: u64,
}

/// Runs `run(cut, mode index, mode)` for every cut in both loss modes — unflushed writes
/// dropped, and written torn and reordered with the seed `tear_seed(index of the cut, cut)` —
/// and tallies what it returns: whether the bitmap came back consistent, and whether the
/// session had flushed writes.
pub fn at_every_cut(
    cuts: &[Cut],
    tear_seed: impl Fn(usize, Cut) -> u64,
    mut run: impl FnMut(Cut, usize, LossMode) -> (bool, bool),
) -> Tally {
    let mut tally = Tally::default();
    for (i, &cut) in cuts.iter().enumerate() {
        let modes = [
            LossMode::DropUnflushed,
            LossMode::TearAndReorder {
                seed: tear_seed(i, cut),
            },
        ];
        for (mi, mode) in modes.into_iter().enumerate() {
            match run(cut, mi, mode) {
                (true, with_writes) => {
                    tally.trusted += 1;
                    tally.trusted_with_writes += u64::from(with_writes);
                }
                (false, _) => tally.untrusted += 1,
            }
        }
    }
    tally
}

//! The fault modes the image crash tests (vmdk, vhd, vhdx) run a random workload under: where
//! the power goes and how the device completes requests; and a fresh image laid out on a
//! fault-injecting device. See docs/testing.md.
#![allow(dead_code)]

use std::sync::Arc;

use strata_storage::format::{self, ImageFormat};
use strata_storage::io::fault::{
    fault_seeds, Fault, FaultController, FaultDevice, LossMode, OpKind,
};
use strata_storage::HostFile;

/// A fresh image of `format` and `size` bytes (`opts` as `-o` pairs) on a fault-injecting
/// device, all of it durable.
pub fn image_on_fault_device(
    f: ImageFormat,
    opts: &str,
    size: u64,
) -> (Arc<FaultDevice>, FaultController) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("img");
    format::create_image(&p, f, size, &format::parse_options(opts).unwrap()).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let (dev, ctl) = FaultDevice::new(0);
    dev.write_all_at(0, &bytes).unwrap();
    dev.sync_data().unwrap();
    (dev, ctl)
}

/// Where a run cuts the power (the new modes also complete requests late and out of order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// At a random flush; requests complete at submit; unflushed writes torn and reordered.
    Flush,
    /// At a random flush; late, out-of-order completions.
    FlushAsync,
    /// At a random operation of any kind; late, out-of-order completions.
    AnyOpAsync,
    /// Right after an injected failure (EIO, ENOSPC, or a short transfer cut by power loss) at
    /// the Nth read, write or flush; late, out-of-order completions.
    ErrorAsync,
}

/// Arms `ctl` for a run in `mode` (call it once the image is open: faults count from here, and
/// queues opened afterwards complete late). `rng` makes the first choice the old mode made.
pub fn arm(ctl: &FaultController, mode: Mode, seed: u64, rng: &mut fastrand::Rng) {
    ctl.set_loss_mode(if mode != Mode::Flush && seed % 2 == 0 {
        LossMode::DropUnflushed
    } else {
        LossMode::TearAndReorder { seed }
    });
    match mode {
        Mode::Flush | Mode::FlushAsync => ctl.crash_at_flush(rng.u64(1..40)),
        Mode::AnyOpAsync => ctl.crash_at_op(rng.u64(1..400)),
        Mode::ErrorAsync => {
            let (kind, n) = [
                (OpKind::Read, 20),
                (OpKind::Write, 200),
                (OpKind::Flush, 40),
            ][rng.usize(..3)];
            let fault = match kind {
                OpKind::Flush => [Fault::Eio, Fault::NoSpace][rng.usize(..2)],
                _ => [Fault::Eio, Fault::NoSpace, Fault::ShortThenPowerLoss][rng.usize(..3)],
            };
            ctl.fail_nth(kind, rng.u64(1..n), fault);
        }
    }
    if mode != Mode::Flush {
        ctl.async_completions(seed);
    }
}

/// Seeds of the new modes: a fixed list in CI, more with `STRATA_FAULT_SEEDS`.
pub fn new_mode_seeds() -> Vec<u64> {
    fault_seeds(&(100..140).collect::<Vec<u64>>())
}

/// Whether sector `at` of `got` holds the data of the write that failed, if one did.
pub fn from_failed_write(failed: &Option<(u64, Vec<u8>)>, at: u64, got: &[u8]) -> bool {
    failed.as_ref().is_some_and(|(o, d)| {
        at >= *o
            && at + got.len() as u64 <= o + d.len() as u64
            && got == &d[(at - o) as usize..][..got.len()]
    })
}

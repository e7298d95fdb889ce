//! Crash safety of dynamic VHDs and VHDXs: random writes and flushes on the fault-injecting
//! engine, power lost at a random flush (the flushes inside a metadata write-back and the VHDX
//! log included) with unflushed writes torn and reordered; the image must reopen (a VHDX
//! replaying its log), every write covered by a completed flush must be there, and every other
//! sector must hold its old or its new data.

mod fault_modes;

use std::sync::Arc;

use fault_modes::{new_mode_seeds, Mode};
use strata_storage::format::{open_image_on, ImageFormat};
use strata_storage::io::blocking::BlockingQueue;
use strata_storage::io::fault::{FaultController, FaultDevice};
use strata_storage::BlockDevice;

const SIZE: u64 = 8 << 20;

fn on_fault_device(f: ImageFormat, opts: &str) -> (Arc<FaultDevice>, FaultController) {
    fault_modes::image_on_fault_device(f, opts, SIZE)
}

fn read(img: &dyn BlockDevice) -> Vec<u8> {
    let mut q = BlockingQueue::open(img, 4).unwrap();
    q.read_at(0, SIZE as usize).unwrap()
}

fn one_run(f: ImageFormat, opts: &str, seed: u64) {
    run_mode(f, opts, seed, Mode::Flush);
}

fn run_mode(f: ImageFormat, opts: &str, seed: u64, mode: Mode) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let (dev, ctl) = on_fault_device(f, opts);
    let img = open_image_on(dev, Some(f)).unwrap();
    // Faults count from here: the image is open.
    fault_modes::arm(&ctl, mode, seed, &mut rng);
    let mut q = BlockingQueue::open(img.as_ref(), 8).unwrap();
    let mut durable = vec![0u8; SIZE as usize];
    let mut current = durable.clone();
    // A write that failed: its sectors may hold their old data or its own.
    let mut failed: Option<(u64, Vec<u8>)> = None;
    'work: for _round in 0..30 {
        let mut used: Vec<(u64, u64)> = Vec::new();
        for _ in 0..rng.usize(1..6) {
            let len = rng.u64(1..40) * 512 * if rng.bool() { 1 } else { 16 };
            let off = rng.u64(0..(SIZE - len) / 512) * 512;
            if used.iter().any(|&(o, l)| off < o + l && o < off + len) {
                continue;
            }
            used.push((off, len));
            let (r, data) = if rng.u8(..5) == 0 {
                let r = q.write_zeroes(off, len, rng.bool());
                (r, vec![0u8; len as usize])
            } else {
                let data: Vec<u8> = (0..len).map(|_| rng.u8(1..)).collect();
                (q.write_at(off, &data), data)
            };
            match r {
                Ok(()) => current[off as usize..(off + len) as usize].copy_from_slice(&data),
                Err(_) => {
                    failed = Some((off, data));
                    break 'work;
                }
            }
        }
        match q.flush() {
            Ok(()) => durable.clone_from(&current),
            Err(_) => break,
        }
    }
    drop(q);
    let survived = match ctl.durable_image() {
        Some(i) => i,
        None => ctl.power_loss(),
    };
    drop(img);
    let (dev, _) = FaultDevice::from_durable(&survived);
    let img = open_image_on(dev, Some(f)).unwrap_or_else(|e| {
        panic!("{f} seed {seed}: the image does not reopen after a crash: {e}")
    });
    assert_eq!(img.size(), SIZE);
    let got = read(img.as_ref());
    for s in 0..(SIZE / 512) as usize {
        let r = s * 512..(s + 1) * 512;
        let theirs = fault_modes::from_failed_write(&failed, (s * 512) as u64, &got[r.clone()]);
        assert!(
            got[r.clone()] == durable[r.clone()] || got[r.clone()] == current[r.clone()] || theirs,
            "{f} {opts} seed {seed} ({mode:?}): sector {s} holds neither its flushed nor its newest data"
        );
    }
}

#[test]
fn vhd_power_loss_at_any_flush_keeps_flushed_writes() {
    for seed in 0..40 {
        one_run(
            ImageFormat::Vhd,
            if seed % 2 == 0 {
                "force_size=on"
            } else {
                "force_size=on,block_size=64K"
            },
            seed,
        );
    }
}

#[test]
fn vhdx_power_loss_at_any_flush_keeps_flushed_writes() {
    for seed in 0..40 {
        one_run(
            ImageFormat::Vhdx,
            if seed % 2 == 0 {
                "block_size=1M"
            } else {
                "block_size=1M,block_state_zero=on"
            },
            seed,
        );
    }
}

/// The new fault modes on VHD and VHDX (alternately, by seed).
fn new_modes(mode: Mode) {
    for seed in new_mode_seeds() {
        let (f, opts) = match seed % 4 {
            0 => (ImageFormat::Vhd, "force_size=on"),
            1 => (ImageFormat::Vhd, "force_size=on,block_size=64K"),
            2 => (ImageFormat::Vhdx, "block_size=1M"),
            _ => (ImageFormat::Vhdx, "block_size=1M,block_state_zero=on"),
        };
        run_mode(f, opts, seed, mode);
    }
}

#[test]
fn power_loss_at_any_flush_with_late_out_of_order_completions() {
    new_modes(Mode::FlushAsync);
}

#[test]
fn power_loss_at_any_operation() {
    new_modes(Mode::AnyOpAsync);
}

#[test]
fn injected_errors_then_power_loss() {
    new_modes(Mode::ErrorAsync);
}

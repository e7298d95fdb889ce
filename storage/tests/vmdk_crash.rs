//! Crash safety of vmdk sparse extents: random writes and flushes on the fault-injecting
//! engine, power lost at a random flush (including the flushes inside a metadata write-back)
//! with unflushed writes torn and reordered; the image must reopen, every write covered by a
//! completed flush must be there, and every other sector must hold its old or its new data.

mod fault_modes;
mod vmdk_util;

use fault_modes::{new_mode_seeds, Mode};
use strata_storage::format::{open_image_on, ImageFormat};
use strata_storage::io::blocking::BlockingQueue;
use strata_storage::io::fault::FaultDevice;
use vmdk_util::sparse_on_fault_device;

const SIZE: u64 = 8 << 20;

fn one_run(seed: u64, zeroed: bool) {
    run_mode(seed, zeroed, Mode::Flush);
}

fn run_mode(seed: u64, zeroed: bool, mode: Mode) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let (dev, ctl) = sparse_on_fault_device(SIZE, zeroed);
    let img = open_image_on(dev, Some(ImageFormat::Vmdk)).unwrap();
    // Faults count from here: the image is open.
    fault_modes::arm(&ctl, mode, seed, &mut rng);
    let mut q = BlockingQueue::open(img.as_ref(), 8).unwrap();
    let mut durable = vec![0u8; SIZE as usize];
    let mut current = durable.clone();
    // A write that failed: its sectors may hold their old data or its own.
    let mut failed: Option<(u64, Vec<u8>)> = None;
    'work: for _round in 0..30 {
        // Non-overlapping writes in a round, so each sector has one candidate new value.
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
    let img = open_image_on(dev, Some(ImageFormat::Vmdk))
        .unwrap_or_else(|e| panic!("seed {seed}: the image does not reopen after a crash: {e}"));
    let got = vmdk_util::read_range(img.as_ref(), 0, SIZE);
    for s in 0..(SIZE / 512) as usize {
        let r = s * 512..(s + 1) * 512;
        let theirs = fault_modes::from_failed_write(&failed, (s * 512) as u64, &got[r.clone()]);
        assert!(
            got[r.clone()] == durable[r.clone()] || got[r.clone()] == current[r.clone()] || theirs,
            "seed {seed} ({mode:?}): sector {s} holds neither its flushed nor its newest data"
        );
    }
    assert_eq!(img.size(), SIZE);
}

#[test]
fn power_loss_at_any_flush_keeps_flushed_writes() {
    for seed in 0..60 {
        one_run(seed, seed % 3 == 0);
    }
}

#[test]
fn power_loss_at_any_flush_with_late_out_of_order_completions() {
    for seed in new_mode_seeds() {
        run_mode(seed, seed % 3 == 0, Mode::FlushAsync);
    }
}

#[test]
fn power_loss_at_any_operation() {
    for seed in new_mode_seeds() {
        run_mode(seed, seed % 3 == 0, Mode::AnyOpAsync);
    }
}

#[test]
fn injected_errors_then_power_loss() {
    for seed in new_mode_seeds() {
        run_mode(seed, seed % 3 == 0, Mode::ErrorAsync);
    }
}

#[test]
fn a_failed_data_write_leaves_the_image_consistent() {
    let (dev, ctl) = sparse_on_fault_device(SIZE, false);
    let img = open_image_on(dev, Some(ImageFormat::Vmdk)).unwrap();
    let mut q = BlockingQueue::open(img.as_ref(), 4).unwrap();
    q.write_at(0, &[1u8; 65536]).unwrap();
    q.flush().unwrap();
    ctl.fail_nth_op(1);
    assert!(q.write_at(1 << 20, &[2u8; 4096]).is_err());
    q.write_at(2 << 20, &[3u8; 4096]).unwrap();
    q.flush().unwrap();
    let survived = ctl.power_loss();
    drop(q);
    drop(img);
    let (dev, _) = FaultDevice::from_durable(&survived);
    let img = open_image_on(dev, Some(ImageFormat::Vmdk)).unwrap();
    assert_eq!(
        vmdk_util::read_range(img.as_ref(), 0, 65536),
        vec![1u8; 65536]
    );
    assert_eq!(
        vmdk_util::read_range(img.as_ref(), 2 << 20, 4096),
        vec![3u8; 4096]
    );
}

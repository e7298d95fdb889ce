//! Crash safety of dynamic VHDs and VHDXs: random writes and flushes on the fault-injecting
//! engine, power lost at a random flush (the flushes inside a metadata write-back and the VHDX
//! log included) with unflushed writes torn and reordered; the image must reopen (a VHDX
//! replaying its log), every write covered by a completed flush must be there, and every other
//! sector must hold its old or its new data.

use std::sync::Arc;

use strata_storage::format::{self, open_image_on, ImageFormat};
use strata_storage::io::blocking::BlockingQueue;
use strata_storage::io::fault::{FaultController, FaultDevice, LossMode};
use strata_storage::{BlockDevice, HostFile};

const SIZE: u64 = 8 << 20;

fn on_fault_device(f: ImageFormat, opts: &str) -> (Arc<FaultDevice>, FaultController) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("img");
    format::create_image(&p, f, SIZE, &format::parse_options(opts).unwrap()).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let (dev, ctl) = FaultDevice::new(0);
    dev.write_all_at(0, &bytes).unwrap();
    dev.sync_data().unwrap();
    (dev, ctl)
}

fn read(img: &dyn BlockDevice) -> Vec<u8> {
    let mut q = BlockingQueue::open(img, 4).unwrap();
    q.read_at(0, SIZE as usize).unwrap()
}

fn one_run(f: ImageFormat, opts: &str, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let (dev, ctl) = on_fault_device(f, opts);
    ctl.set_loss_mode(LossMode::TearAndReorder { seed });
    ctl.crash_at_flush(rng.u64(1..40));
    let img = open_image_on(dev, Some(f)).unwrap();
    let mut q = BlockingQueue::open(img.as_ref(), 8).unwrap();
    let mut durable = vec![0u8; SIZE as usize];
    let mut current = durable.clone();
    'work: for _round in 0..30 {
        let mut used: Vec<(u64, u64)> = Vec::new();
        for _ in 0..rng.usize(1..6) {
            let len = rng.u64(1..40) * 512 * if rng.bool() { 1 } else { 16 };
            let off = rng.u64(0..(SIZE - len) / 512) * 512;
            if used.iter().any(|&(o, l)| off < o + l && o < off + len) {
                continue;
            }
            used.push((off, len));
            let r = if rng.u8(..5) == 0 {
                q.write_zeroes(off, len, rng.bool())
                    .map(|_| vec![0u8; len as usize])
            } else {
                let data: Vec<u8> = (0..len).map(|_| rng.u8(1..)).collect();
                q.write_at(off, &data).map(|_| data)
            };
            match r {
                Ok(data) => current[off as usize..(off + len) as usize].copy_from_slice(&data),
                Err(_) => break 'work,
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
        assert!(
            got[r.clone()] == durable[r.clone()] || got[r.clone()] == current[r.clone()],
            "{f} {opts} seed {seed}: sector {s} holds neither its flushed nor its newest data"
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

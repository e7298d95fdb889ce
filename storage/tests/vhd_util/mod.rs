//! Helpers shared by the VHD and VHDX tests: writing patterns through queues, reading whole
//! devices. The tests find the real tools with `strata_testkit`.
#![allow(dead_code)]

use std::path::Path;

use strata_storage::io::blocking::BlockingQueue;
use strata_storage::BlockDevice;

#[path = "../vmdk_util/mod.rs"]
mod vmdk_util;
#[allow(unused_imports)]
pub use vmdk_util::{first_diff, p, qemu_io_writes, run};

/// The virtual size qemu-img reports for an image.
pub fn qemu_size(path: &Path, fmt: &str) -> u64 {
    let out = run("qemu-img", &["info", "-f", fmt, "--output=json", p(path)]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v["virtual-size"].as_u64().expect("virtual-size")
}

/// Writes `writes` (offset, length, pattern byte) through a queue and flushes.
pub fn write_patterns(dev: &dyn BlockDevice, writes: &[(u64, u64, u8)]) {
    let mut q = BlockingQueue::open(dev, 8).expect("queue");
    for &(o, l, pat) in writes {
        q.write_at(o, &vec![pat; l as usize])
            .unwrap_or_else(|e| panic!("write {l} at {o}: {e}"));
    }
    q.flush().expect("flush");
}

/// Applies `writes` to a model.
pub fn apply(model: &mut [u8], writes: &[(u64, u64, u8)]) {
    for &(o, l, pat) in writes {
        model[o as usize..(o + l) as usize].fill(pat);
    }
}

/// Reads the whole device.
pub fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut q = BlockingQueue::open(dev, 8).expect("queue");
    let size = dev.size();
    let mut out = Vec::with_capacity(size as usize);
    let mut at = 0;
    while at < size {
        let n = (size - at).min(8 << 20) as usize;
        out.extend(
            q.read_at(at, n)
                .unwrap_or_else(|e| panic!("read at {at}: {e}")),
        );
        at += n as u64;
    }
    out
}

/// Writes of patterns at pseudo-random places; unaligned ones when `unaligned`, and some of
/// zeros.
pub fn random_writes(
    seed: u64,
    size: u64,
    count: usize,
    max_len: u64,
    unaligned: bool,
) -> Vec<(u64, u64, u8)> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..count)
        .map(|i| {
            let (len, off) = if unaligned {
                let len = rng.u64(1..=max_len.min(size));
                (len, rng.u64(0..=size - len))
            } else {
                let len = rng.u64(1..=(max_len / 512).max(1)) * 512;
                let len = len.min(size / 512 * 512);
                (len, rng.u64(0..=(size - len) / 512) * 512)
            };
            let pat = if i % 7 == 3 { 0 } else { rng.u8(1..=255) };
            (off, len, pat)
        })
        .collect()
}

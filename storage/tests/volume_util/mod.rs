//! Helpers shared by the volume tests: volume groups on in-memory, fault-injecting or file PVs.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use strata_storage::io::blocking::BlockingQueue;
use strata_storage::io::engine::{EngineChoice, FileDevice};
use strata_storage::io::fault::{FaultController, FaultDevice};
use strata_storage::io::file::FileOptions;
use strata_storage::io::memory::MemoryDevice;
use strata_storage::volume::label::PE_START;
use strata_storage::volume::vg::format_pv;
use strata_storage::volume::{PvHandle, Vg, VgOptions};
use strata_storage::{BlockDevice, SharedFile};

pub const MIB: u64 = 1 << 20;

/// A PV of `data` bytes of extents (plus room for the label and metadata).
pub fn mem_pv(data: u64) -> Arc<MemoryDevice> {
    let d = MemoryDevice::new(PE_START + data);
    format_pv(d.as_ref()).unwrap();
    d
}

/// A group on in-memory PVs holding `data[i]` bytes of extents each.
pub fn mem_vg(name: &str, data: &[u64], extent: u64) -> Vg {
    let pvs = data
        .iter()
        .map(|&d| PvHandle::new(mem_pv(d) as SharedFile))
        .collect();
    Vg::create(name, pvs, extent, VgOptions::default()).unwrap()
}

/// A group on one fault-injecting PV; the controller cuts its power.
pub fn fault_vg(name: &str, data: u64, extent: u64) -> (Vg, Arc<FaultDevice>, FaultController) {
    let (d, ctl) = FaultDevice::new(PE_START + data);
    format_pv(d.as_ref()).unwrap();
    let vg = Vg::create(
        name,
        vec![PvHandle::new(d.clone() as SharedFile)],
        extent,
        VgOptions::default(),
    )
    .unwrap();
    (vg, d, ctl)
}

/// A PV file of `data` bytes of extents in `dir`, opened with `engine` and O_DIRECT.
pub fn file_pv(dir: &Path, n: usize, data: u64, engine: EngineChoice) -> SharedFile {
    let p = dir.join(format!("pv{n}.img"));
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(PE_START + data).unwrap();
    drop(f);
    let d = FileDevice::open(&p, FileOptions::default(), engine).unwrap();
    format_pv(d.as_ref()).unwrap();
    d
}

pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn bq(dev: &Arc<dyn BlockDevice>) -> BlockingQueue {
    BlockingQueue::open(dev.as_ref(), 32).unwrap()
}

/// Writes real zero bytes over the whole device (so every thin block is mapped).
pub fn fill_zero_data(dev: &Arc<dyn BlockDevice>) {
    let mut q = bq(dev);
    let chunk = vec![0u8; MIB as usize];
    let mut at = 0;
    while at < dev.size() {
        let n = (dev.size() - at).min(MIB) as usize;
        q.write_at(at, &chunk[..n]).unwrap();
        at += n as u64;
    }
    q.flush().unwrap();
}

//! The conformance suite on every kind of volume: linear volumes spanning two PVs (in memory,
//! on the fault-injecting engine, and on files with io_uring and threads), thin volumes (two
//! block sizes), the origin of a snapshot (every block shared, so every write copies), and
//! linked clones of a snapshot.

mod volume_util;

use std::sync::{Arc, Mutex};

use strata_storage::conformance::run_all;
use strata_storage::io::engine::EngineChoice;
use strata_storage::io::fault::FaultDevice;
use strata_storage::volume::label::PE_START;
use strata_storage::volume::vg::format_pv;
use strata_storage::volume::{PvHandle, Vg, VgOptions};
use strata_storage::{BlockDevice, SharedFile};
use volume_util::*;

const CASES: u32 = 32;
const EXTENT: u64 = 256 << 10;

/// A linear volume of `size` bytes spanning two PVs of half its size each (plus one extent).
fn spanning_linear(pvs: Vec<SharedFile>, size: u64) -> Arc<dyn BlockDevice> {
    let vg = Vg::create(
        "vg",
        pvs.into_iter().map(PvHandle::new).collect(),
        EXTENT,
        VgOptions::default(),
    )
    .unwrap();
    vg.create_linear("lv", size, &[]).unwrap();
    let info = vg.lv_info("lv").unwrap();
    assert_eq!(info.segments, Some(2), "the volume must span both PVs");
    vg.open_lv("lv", false).unwrap()
}

fn half(size: u64) -> u64 {
    (size / 2).div_ceil(EXTENT) * EXTENT + EXTENT
}

#[test]
fn linear_on_memory_pvs() {
    run_all(
        &|size| spanning_linear(vec![mem_pv(half(size)), mem_pv(half(size))], size),
        CASES,
    );
}

#[test]
fn linear_on_fault_pvs() {
    run_all(
        &|size| {
            let pvs = (0..2)
                .map(|_| {
                    let (d, _) = FaultDevice::new(PE_START + half(size));
                    format_pv(d.as_ref()).unwrap();
                    d as SharedFile
                })
                .collect();
            spanning_linear(pvs, size)
        },
        CASES,
    );
}

#[test]
fn linear_on_file_pvs_each_engine() {
    for engine in [EngineChoice::Uring, EngineChoice::Threads] {
        let dir = tempfile::tempdir().unwrap();
        let n = Mutex::new(0);
        run_all(
            &|size| {
                let mut k = n.lock().unwrap();
                *k += 2;
                let pvs = vec![
                    file_pv(dir.path(), *k, half(size), engine),
                    file_pv(dir.path(), *k + 1, half(size), engine),
                ];
                spanning_linear(pvs, size)
            },
            CASES / 2,
        );
    }
}

/// A thin volume of `size` in a pool with room for two full copies of it.
fn thin(size: u64, block: u64) -> (Vg, Arc<dyn BlockDevice>) {
    let vg = mem_vg("vg", &[size * 3 + 16 * MIB], MIB);
    vg.create_pool("pool", size * 2 + 4 * MIB, block, 0)
        .unwrap();
    vg.create_thin("pool", "thin", size).unwrap();
    let dev = vg.open_lv("thin", false).unwrap();
    (vg, dev)
}

#[test]
fn thin_volumes() {
    for block in [64 << 10, 4 << 10] {
        run_all(&|size| thin(size, block).1, CASES);
    }
}

#[test]
fn thin_on_file_pvs() {
    let dir = tempfile::tempdir().unwrap();
    let n = Mutex::new(0);
    run_all(
        &|size| {
            let mut k = n.lock().unwrap();
            *k += 1;
            let pv = file_pv(dir.path(), *k, size * 2 + 16 * MIB, EngineChoice::Auto);
            let vg = Vg::create("vg", vec![PvHandle::new(pv)], MIB, VgOptions::default()).unwrap();
            vg.create_pool("pool", size + 4 * MIB, 0, 0).unwrap();
            vg.create_thin("pool", "thin", size).unwrap();
            vg.open_lv("thin", false).unwrap()
        },
        CASES / 2,
    );
}

/// The origin of a snapshot whose blocks are all mapped (with zeros) and shared.
#[test]
fn origin_of_a_snapshot_copies_on_write() {
    run_all(
        &|size| {
            let (vg, dev) = thin(size, 64 << 10);
            fill_zero_data(&dev);
            vg.snapshot("thin", "snap").unwrap();
            dev
        },
        CASES,
    );
}

/// A clone of a snapshot: every block shared with it.
#[test]
fn clones_of_a_snapshot() {
    run_all(
        &|size| {
            let (vg, dev) = thin(size, 64 << 10);
            fill_zero_data(&dev);
            drop(dev);
            vg.snapshot("thin", "snap").unwrap();
            vg.clone_lv("snap", "clone").unwrap();
            vg.open_lv("clone", false).unwrap()
        },
        CASES,
    );
}

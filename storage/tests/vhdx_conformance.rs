//! The conformance suite on fresh writable VHDXs: dynamic (both engines, both absent-block
//! states), fixed, and dynamic on the fault-injecting engine.

use std::sync::{Arc, Mutex};

use strata_storage::conformance::run_all;
use strata_storage::format::{self, open_image, open_image_on, ImageFormat, OpenOptions};
use strata_storage::io::engine::EngineChoice;
use strata_storage::io::fault::FaultDevice;
use strata_storage::{BlockDevice, HostFile};

const CASES: u32 = 24;

fn on_files(opts: &str, engine: EngineChoice) {
    let dir = tempfile::tempdir().unwrap();
    let n = Mutex::new(0);
    let make = |size: u64| -> Arc<dyn BlockDevice> {
        let mut k = n.lock().unwrap();
        *k += 1;
        let p = dir.path().join(format!("{k}.vhdx"));
        let m = format::parse_options(opts).unwrap();
        format::create_image(&p, ImageFormat::Vhdx, size, &m).unwrap();
        let o = OpenOptions {
            engine,
            ..OpenOptions::default()
        };
        open_image(&p, &o).unwrap()
    };
    run_all(&make, CASES);
}

#[test]
fn dynamic() {
    on_files("block_size=1M", EngineChoice::Auto);
    on_files("", EngineChoice::Threads);
}

#[test]
fn dynamic_with_zero_state_blocks() {
    on_files("block_state_zero=on,block_size=1M", EngineChoice::Auto);
}

#[test]
fn fixed() {
    on_files("subformat=fixed,block_size=1M", EngineChoice::Auto);
}

#[test]
fn dynamic_on_the_fault_engine() {
    let dir = tempfile::tempdir().unwrap();
    let n = Mutex::new(0);
    let make = |size: u64| -> Arc<dyn BlockDevice> {
        let mut k = n.lock().unwrap();
        *k += 1;
        let p = dir.path().join(format!("{k}.vhdx"));
        let m = format::parse_options("block_size=1M").unwrap();
        format::create_image(&p, ImageFormat::Vhdx, size, &m).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let (dev, _ctl) = FaultDevice::new(0);
        dev.write_all_at(0, &bytes).unwrap();
        dev.sync_data().unwrap();
        open_image_on(dev, Some(ImageFormat::Vhdx)).unwrap()
    };
    run_all(&make, CASES);
}

//! The conformance suite on fresh writable vmdk images of every random-writable subformat, on
//! files (both engines) and on the fault-injecting engine.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use strata_storage::conformance::run_all;
use strata_storage::format::{self, open_image, open_image_on, ImageFormat, OpenOptions};
use strata_storage::io::engine::EngineChoice;
use strata_storage::BlockDevice;

mod vmdk_util;
use vmdk_util::sparse_on_fault_device;

const CASES: u32 = 24;

struct Files {
    dir: tempfile::TempDir,
    n: Mutex<u32>,
}

impl Files {
    fn fresh(&self, size: u64, sub: &str) -> PathBuf {
        let mut n = self.n.lock().unwrap();
        *n += 1;
        let p = self.dir.path().join(format!("{n}.vmdk"));
        let opts = format::parse_options(&format!("subformat={sub}")).unwrap();
        format::create_image(&p, ImageFormat::Vmdk, size, &opts).unwrap();
        p
    }
}

fn on_files(sub: &str, engine: EngineChoice) {
    let files = Files {
        dir: tempfile::tempdir().unwrap(),
        n: Mutex::new(0),
    };
    let make = |size: u64| -> Arc<dyn BlockDevice> {
        let opts = OpenOptions {
            engine,
            ..OpenOptions::default()
        };
        open_image(&files.fresh(size, sub), &opts).unwrap()
    };
    run_all(&make, CASES);
}

#[test]
fn monolithic_sparse() {
    on_files("monolithicSparse", EngineChoice::Auto);
    on_files("monolithicSparse", EngineChoice::Threads);
}

#[test]
fn monolithic_flat() {
    on_files("monolithicFlat", EngineChoice::Auto);
}

#[test]
fn two_gb_max_extent_sparse() {
    on_files("twoGbMaxExtentSparse", EngineChoice::Auto);
}

#[test]
fn two_gb_max_extent_flat() {
    on_files("twoGbMaxExtentFlat", EngineChoice::Threads);
}

#[test]
fn monolithic_sparse_on_the_fault_engine() {
    for zeroed in [false, true] {
        let make = |size: u64| -> Arc<dyn BlockDevice> {
            let (dev, _) = sparse_on_fault_device(size, zeroed);
            open_image_on(dev, Some(ImageFormat::Vmdk)).unwrap()
        };
        run_all(&make, CASES);
    }
}

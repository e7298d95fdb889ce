//! The conformance suite on fresh writable VHDs: fixed, dynamic (two block sizes) and
//! differencing, on files (both engines) and on the fault-injecting engine.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use strata_storage::conformance::run_all;
use strata_storage::format::{self, open_image, open_image_on, ImageFormat, OpenOptions};
use strata_storage::io::engine::EngineChoice;
use strata_storage::io::fault::FaultDevice;
use strata_storage::{BlockDevice, HostFile};

const CASES: u32 = 24;

struct Files {
    dir: tempfile::TempDir,
    n: Mutex<u32>,
}

impl Files {
    fn new() -> Files {
        Files {
            dir: tempfile::tempdir().unwrap(),
            n: Mutex::new(0),
        }
    }

    fn fresh(&self, size: u64, opts: &str) -> PathBuf {
        let mut n = self.n.lock().unwrap();
        *n += 1;
        let p = self.dir.path().join(format!("{n}.vhd"));
        let mut o = format::parse_options(opts).unwrap();
        if let Some(b) = o.get("backing_file").cloned() {
            let base = self.dir.path().join(&b);
            if !base.exists() {
                let m = format::parse_options("force_size=on").unwrap();
                format::create_image(&base, ImageFormat::Vhd, size, &m).unwrap();
            }
            o.insert("backing_file".into(), b);
            format::create_image(&p, ImageFormat::Vhd, 0, &o).unwrap();
        } else {
            format::create_image(&p, ImageFormat::Vhd, size, &o).unwrap();
        }
        p
    }
}

fn on_files(opts: &str, engine: EngineChoice) {
    let files = Files::new();
    let make = |size: u64| -> Arc<dyn BlockDevice> {
        let o = OpenOptions {
            engine,
            ..OpenOptions::default()
        };
        let img = open_image(&files.fresh(size, opts), &o).unwrap();
        assert!(img.size() >= size);
        img
    };
    run_all(&make, CASES);
}

#[test]
fn dynamic() {
    on_files("force_size=on", EngineChoice::Auto);
    on_files("force_size=on", EngineChoice::Threads);
}

#[test]
fn dynamic_rounded_to_the_geometry_with_small_blocks() {
    on_files("force_size=off,block_size=512K", EngineChoice::Auto);
}

#[test]
fn fixed() {
    let files = Files::new();
    let make = |size: u64| -> Arc<dyn BlockDevice> {
        let o = OpenOptions {
            format: Some(ImageFormat::Vhd),
            ..OpenOptions::default()
        };
        open_image(&files.fresh(size, "subformat=fixed,force_size=on"), &o).unwrap()
    };
    run_all(&make, CASES);
}

#[test]
fn differencing_over_an_empty_parent() {
    // Each image gets its own parent (the base name is unique per image through the counter).
    let files = Files::new();
    let make = |size: u64| -> Arc<dyn BlockDevice> {
        let n = *files.n.lock().unwrap();
        let p = files.fresh(size, &format!("backing_file=base{n}.vhd"));
        open_image(&p, &OpenOptions::default()).unwrap()
    };
    run_all(&make, CASES);
}

#[test]
fn dynamic_on_the_fault_engine() {
    let dir = tempfile::tempdir().unwrap();
    let n = Mutex::new(0);
    let make = |size: u64| -> Arc<dyn BlockDevice> {
        let mut k = n.lock().unwrap();
        *k += 1;
        let p = dir.path().join(format!("{k}.vhd"));
        let m = format::parse_options("force_size=on").unwrap();
        format::create_image(&p, ImageFormat::Vhd, size, &m).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let (dev, _ctl) = FaultDevice::new(0);
        dev.write_all_at(0, &bytes).unwrap();
        dev.sync_data().unwrap();
        open_image_on(dev, Some(ImageFormat::Vhd)).unwrap()
    };
    run_all(&make, CASES);
}

//! The conformance suite on every engine and on raw images.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use strata_storage::conformance::run_all;
use strata_storage::format::{open_image, raw, OpenOptions};
use strata_storage::io::engine::{EngineChoice, FileDevice};
use strata_storage::io::fault::FaultDevice;
use strata_storage::io::file::{CacheMode, FileOptions};
use strata_storage::io::memory::MemoryDevice;
use strata_storage::BlockDevice;

const CASES: u32 = 48;

/// Makes fresh files in one temporary folder; the folder lives as long as the factory.
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

    fn fresh(&self, size: u64) -> PathBuf {
        let mut n = self.n.lock().unwrap();
        *n += 1;
        let p = self.dir.path().join(format!("{n}.img"));
        raw::create(&p, size, &raw::RawCreateOptions::default()).unwrap();
        p
    }
}

fn file_engine(engine: EngineChoice, cache: CacheMode) {
    let files = Files::new();
    let make = |size: u64| -> Arc<dyn BlockDevice> {
        let opts = FileOptions {
            read_only: false,
            cache,
        };
        FileDevice::open(&files.fresh(size), opts, engine).unwrap()
    };
    run_all(&make, CASES);
}

#[test]
fn uring_engine_direct() {
    let dev = FileDevice::open(
        &Files::new().fresh(4096),
        FileOptions::default(),
        EngineChoice::Uring,
    )
    .unwrap();
    assert!(
        dev.handle().is_direct(),
        "the test folder must allow O_DIRECT so that alignment is exercised"
    );
    file_engine(EngineChoice::Uring, CacheMode::None);
}

#[test]
fn uring_engine_buffered() {
    file_engine(EngineChoice::Uring, CacheMode::Writeback);
}

#[test]
fn thread_engine_direct() {
    file_engine(EngineChoice::Threads, CacheMode::None);
}

#[test]
fn thread_engine_buffered() {
    file_engine(EngineChoice::Threads, CacheMode::Writeback);
}

#[test]
fn memory_engine() {
    run_all(
        &|size| MemoryDevice::new(size) as Arc<dyn BlockDevice>,
        CASES,
    );
}

#[test]
fn fault_engine() {
    run_all(
        &|size| FaultDevice::new(size).0 as Arc<dyn BlockDevice>,
        CASES,
    );
}

#[test]
fn raw_images_on_each_engine() {
    let files = Files::new();
    for engine in [EngineChoice::Uring, EngineChoice::Threads] {
        let make = |size: u64| -> Arc<dyn BlockDevice> {
            let opts = OpenOptions {
                engine,
                ..OpenOptions::default()
            };
            open_image(&files.fresh(size), &opts).unwrap()
        };
        run_all(&make, CASES / 2);
    }
}

#[test]
fn raw_image_on_the_fault_engine() {
    let make = |size: u64| -> Arc<dyn BlockDevice> {
        let (dev, _) = FaultDevice::new(size);
        strata_storage::format::open_image_on(dev, Some(strata_storage::format::ImageFormat::Raw))
            .unwrap()
    };
    run_all(&make, CASES / 2);
}

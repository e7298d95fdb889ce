//! The conformance suite on fresh qcow2 images: several cluster sizes, with and without extended
//! L2 entries, version 2, and with a backing file, on io_uring, threads and the fault engine.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use strata_storage::conformance::run_all;
use strata_storage::format::{create_image, open_image, open_image_on, ImageFormat, OpenOptions};
use strata_storage::io::engine::EngineChoice;
use strata_storage::io::fault::FaultDevice;
use strata_storage::BlockDevice;

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

    fn fresh(&self, size: u64, opts: &str, backing: bool) -> PathBuf {
        let mut n = self.n.lock().unwrap();
        *n += 1;
        let mut map: BTreeMap<String, String> =
            strata_storage::format::parse_options(opts).unwrap();
        if backing {
            // A backing file whose clusters are allocated but zero, so that reads and copy-on-write
            // really go to it while the device still starts zero-filled.
            let base = self.dir.path().join(format!("{n}.base.qcow2"));
            let mut bopts = BTreeMap::new();
            bopts.insert("preallocation".to_string(), "full".to_string());
            bopts.insert("cluster_size".to_string(), "4096".to_string());
            create_image(&base, ImageFormat::Qcow2, size, &bopts).unwrap();
            map.insert("backing_file".into(), base.display().to_string());
            map.insert("backing_fmt".into(), "qcow2".into());
        }
        let p = self.dir.path().join(format!("{n}.qcow2"));
        create_image(&p, ImageFormat::Qcow2, size, &map).unwrap();
        p
    }
}

fn suite(opts: &str, backing: bool, engine: EngineChoice) {
    let files = Files::new();
    let make = |size: u64| -> Arc<dyn BlockDevice> {
        let o = OpenOptions {
            engine,
            ..OpenOptions::default()
        };
        open_image(&files.fresh(size, opts, backing), &o).unwrap()
    };
    run_all(&make, CASES);
}

#[test]
fn clusters_of_64k() {
    suite("", false, EngineChoice::Uring);
}

#[test]
fn clusters_of_512_bytes() {
    suite("cluster_size=512", false, EngineChoice::Uring);
}

#[test]
fn clusters_of_4k_on_threads() {
    suite("cluster_size=4096", false, EngineChoice::Threads);
}

#[test]
fn clusters_of_2m() {
    suite("cluster_size=2M", false, EngineChoice::Uring);
}

#[test]
fn extended_l2_entries() {
    suite(
        "extended_l2=on,cluster_size=32768",
        false,
        EngineChoice::Uring,
    );
}

#[test]
fn version_2() {
    suite("compat=0.10", false, EngineChoice::Uring);
}

#[test]
fn narrow_and_wide_refcounts() {
    suite(
        "refcount_bits=1,cluster_size=4096",
        false,
        EngineChoice::Uring,
    );
    suite(
        "refcount_bits=64,cluster_size=4096",
        false,
        EngineChoice::Uring,
    );
}

#[test]
fn with_a_backing_file() {
    suite("cluster_size=16384", true, EngineChoice::Uring);
}

#[test]
fn with_a_backing_file_and_extended_l2() {
    suite("extended_l2=on", true, EngineChoice::Uring);
}

#[test]
fn version_2_with_a_backing_file() {
    suite("compat=0.10,cluster_size=4096", true, EngineChoice::Threads);
}

#[test]
fn lazy_refcounts() {
    suite(
        "lazy_refcounts=on,cluster_size=4096",
        false,
        EngineChoice::Uring,
    );
}

#[test]
fn on_the_fault_engine() {
    let dir = tempfile::tempdir().unwrap();
    let make = |size: u64| -> Arc<dyn BlockDevice> {
        // Build the image in a file, then load its bytes into a fault-injecting device.
        let p = dir.path().join(format!("f{}.qcow2", fastrand::u64(..)));
        create_image(&p, ImageFormat::Qcow2, size, &BTreeMap::new()).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let (dev, _) = FaultDevice::new(bytes.len() as u64);
        strata_storage::HostFile::write_all_at(dev.as_ref(), 0, &bytes).unwrap();
        strata_storage::BlockDevice::flush(dev.as_ref()).unwrap();
        open_image_on(dev, Some(ImageFormat::Qcow2)).unwrap()
    };
    run_all(&make, CASES);
}

#[test]
fn tiny_metadata_caches_evict_in_order() {
    // 512-byte clusters: 4 MiB needs 128 L2 tables and several refcount blocks; the caches hold
    // four of each, so dirty tables are written back (refcounts first) all the time.
    let files = Files::new();
    let make = |size: u64| -> Arc<dyn BlockDevice> {
        let p = files.fresh(size, "cluster_size=512", false);
        let f = strata_storage::format::open_host_file(&p, &OpenOptions::default()).unwrap();
        let opts = strata_storage::format::qcow2::Qcow2Options {
            l2_cache_bytes: Some(2048),
            rb_cache_bytes: Some(2048),
            ..Default::default()
        };
        strata_storage::format::qcow2::open(f, &opts).unwrap()
    };
    run_all(&make, CASES / 2);
}

#[test]
fn queues_on_several_threads_share_one_image() {
    use strata_storage::io::{IoBuf, QueueOptions, Request};
    let files = Files::new();
    let size = 8u64 << 20;
    let p = files.fresh(size, "cluster_size=65536", false);
    let img = open_image(&p, &OpenOptions::default()).unwrap();
    const THREADS: u64 = 4;
    // Every thread writes its own 4 KiB slots, interleaved so that all of them allocate the same
    // clusters at the same time.
    let data = |slot: u64, round: u64| vec![(slot * 7 + round * 13) as u8 | 1; 4096];
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let img = img.clone();
            s.spawn(move || {
                let mut q = img.open_queue(&QueueOptions::with_depth(16)).unwrap();
                let slots: Vec<u64> = (0..size / 4096).filter(|s| s % THREADS == t).collect();
                for round in 0..2u64 {
                    for chunk in slots.chunks(16) {
                        for (i, &slot) in chunk.iter().enumerate() {
                            q.submit(Request::write(
                                i as u64,
                                slot * 4096,
                                IoBuf::from_slice(&data(slot, round)),
                            ))
                            .unwrap();
                        }
                        let mut done = Vec::new();
                        while done.len() < chunk.len() {
                            q.wait(Some(std::time::Duration::from_secs(30))).unwrap();
                            q.reap(&mut done);
                        }
                        assert!(done.iter().all(|c| c.result.is_ok()));
                    }
                }
            });
        }
    });
    img.flush().unwrap();
    let mut bq = strata_storage::io::blocking::BlockingQueue::open(img.as_ref(), 8).unwrap();
    for slot in 0..size / 4096 {
        assert_eq!(
            bq.read_at(slot * 4096, 4096).unwrap(),
            data(slot, 1),
            "slot {slot}"
        );
    }
    drop(bq);
    drop(img);
    let img = open_image(&p, &OpenOptions::default()).unwrap();
    let mut bq = strata_storage::io::blocking::BlockingQueue::open(img.as_ref(), 8).unwrap();
    assert_eq!(
        bq.read_at(12345 * 512, 512).unwrap()[0],
        data(12345 * 512 / 4096, 1)[0]
    );
}

//! Error paths of qcow2 allocation: an EIO injected at every operation of a workload that
//! allocates data clusters, L2 tables and refcount blocks, copies on write into partial clusters,
//! overwrites, discards and zeroes. After each injected error:
//! - the error reaches the caller (a request or a flush fails), except a failed hole punch of a
//!   freed cluster, which is harmless and absorbed;
//! - later I/O works on the same open image: a new allocating write and a flush succeed;
//! - every byte reads back as the model says, except in the one failed request's range, where
//!   each sector is either what was there before or what the request wrote;
//! - after closing, our check finds the image consistent (no corruption, no leaked cluster: a
//!   failed allocation is rolled back) and, for a sample, so does `qemu-img check`.

mod qcow2_support;

use std::collections::BTreeMap;
use std::sync::Arc;

use qcow2_support::*;
use strata_storage::format::qcow2::{self, check::Repair, Qcow2Options};
use strata_storage::format::{create_image, ImageFormat};
use strata_storage::io::blocking::BlockingQueue;
use strata_storage::io::fault::{FaultDevice, OpKind};
use strata_storage::HostFile;

const SIZE: u64 = 16 << 20;

#[derive(Clone, Copy, Debug)]
enum Step {
    Write { offset: u64, len: u64, seed: u8 },
    Discard { offset: u64, len: u64 },
    Zero { offset: u64, len: u64, unmap: bool },
    Flush,
}

/// New data clusters and L2 tables, a partial cluster (copy-on-write of zeros), a write across
/// an L2 table's boundary, an overwrite, 2.5 MiB of new clusters (new refcount blocks with
/// 64-bit refcounts), writes in four more L2 tables, a discard that frees clusters, zeroes, and
/// flushes between.
fn workload() -> Vec<Step> {
    use Step::*;
    vec![
        Write {
            offset: 0,
            len: 4096,
            seed: 1,
        },
        Write {
            offset: 4096 + 512,
            len: 512,
            seed: 2,
        },
        Write {
            offset: (2 << 20) - 32768,
            len: 65536,
            seed: 3,
        },
        Flush,
        Write {
            offset: 0,
            len: 4096,
            seed: 4,
        },
        Write {
            offset: 4 << 20,
            len: 5 << 19,
            seed: 5,
        },
        // Four more L2 tables: with a cache of four, earlier ones are evicted (written back)
        // in the middle of these allocations.
        Write {
            offset: 8 << 20,
            len: 4096,
            seed: 6,
        },
        Write {
            offset: (10 << 20) + 4096,
            len: 4096,
            seed: 7,
        },
        Write {
            offset: 12 << 20,
            len: 8192,
            seed: 8,
        },
        Write {
            offset: (14 << 20) + 8192,
            len: 4096,
            seed: 9,
        },
        Discard {
            offset: 4 << 20,
            len: 8192,
        },
        Zero {
            offset: (4 << 20) + 65536,
            len: 16384,
            unmap: false,
        },
        Flush,
    ]
}

fn base_image(dir: &std::path::Path) -> Vec<u8> {
    let p = dir.join("base.qcow2");
    let mut opts = BTreeMap::new();
    opts.insert("cluster_size".to_string(), "4096".to_string());
    opts.insert("refcount_bits".to_string(), "64".to_string());
    create_image(&p, ImageFormat::Qcow2, SIZE, &opts).unwrap();
    std::fs::read(&p).unwrap()
}

fn open(dev: Arc<FaultDevice>, cache: Option<u64>) -> Arc<qcow2::Qcow2Image> {
    let opts = Qcow2Options {
        l2_cache_bytes: cache,
        rb_cache_bytes: cache,
        ..Qcow2Options::default()
    };
    qcow2::open(dev, &opts).unwrap()
}

/// What one run saw.
struct Run {
    errors: usize,
    model: Vec<u8>,
    /// The failed request's range and what it would have written.
    uncertain: Vec<(u64, Vec<u8>)>,
}

fn run(q: &mut BlockingQueue, steps: &[Step], model: &mut [u8]) -> Run {
    let mut out = Run {
        errors: 0,
        model: Vec::new(),
        uncertain: Vec::new(),
    };
    for s in steps {
        let (result, range) = match *s {
            Step::Write { offset, len, seed } => {
                let data = pattern(offset, len as usize, seed);
                (q.write_at(offset, &data), Some((offset, data)))
            }
            Step::Discard { offset, len } => {
                // A discard may leave data or zeros: both are right.
                (
                    q.discard(offset, len),
                    Some((offset, vec![0u8; len as usize])),
                )
            }
            Step::Zero { offset, len, unmap } => (
                q.write_zeroes(offset, len, unmap),
                Some((offset, vec![0u8; len as usize])),
            ),
            Step::Flush => (q.flush(), None),
        };
        match (result, range) {
            (Ok(()), Some((offset, data))) => {
                model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            }
            (Ok(()), None) => {}
            (Err(_), range) => {
                out.errors += 1;
                out.uncertain.extend(range);
            }
        }
    }
    out.model = model.to_vec();
    out
}

/// Checks the contents: exact outside the uncertain ranges, old-or-new sector by sector inside.
fn check_contents(got: &[u8], run: &Run, before_failed: &[u8], what: &str) {
    for (k, (g, m)) in got.chunks(512).zip(run.model.chunks(512)).enumerate() {
        if g == m {
            continue;
        }
        let at = (k * 512) as u64;
        let new = run.uncertain.iter().find_map(|(o, d)| {
            (at >= *o && at < o + d.len() as u64)
                .then(|| &d[(at - o) as usize..(at - o) as usize + 512])
        });
        let old = &before_failed[at as usize..at as usize + 512];
        assert!(
            new.is_some_and(|n| g == n) || (new.is_some() && g == old),
            "{what}: sector at {at:#x} holds neither the old nor the new data"
        );
    }
}

fn sweep(cache: Option<u64>, qemu_every: u64) {
    let dir = tempdir();
    let base = base_image(dir.path());
    let steps = workload();
    // A clean run counts the operations the workload makes.
    let (dev, ctl) = device_with(&base);
    let img = open(dev, cache);
    let start = ctl.ops();
    let mut q = BlockingQueue::open(img.as_ref(), 8).unwrap();
    let clean = run(&mut q, &steps, &mut vec![0u8; SIZE as usize]);
    assert_eq!(clean.errors, 0);
    let total = ctl.ops() - start;
    drop(q);
    drop(img);
    assert!(total > 20, "only {total} operations");
    let mut leaks = 0;
    let only: Option<u64> = std::env::var("EIO_AT").ok().and_then(|v| v.parse().ok());
    for n in (1..=total).filter(|n| only.is_none_or(|o| o == *n)) {
        let mut what = format!("EIO at operation {n} of {total}");
        let (dev, ctl) = device_with(&base);
        let img = open(dev.clone(), cache);
        let mut q = BlockingQueue::open(img.as_ref(), 8).unwrap();
        ctl.fail_nth_op(n);
        // Step by step, so the contents before the failed step are known.
        let mut model = vec![0u8; SIZE as usize];
        let mut before_failed = model.clone();
        let mut r = Run {
            errors: 0,
            model: Vec::new(),
            uncertain: Vec::new(),
        };
        for s in &steps {
            let snapshot = model.clone();
            let one = run(&mut q, std::slice::from_ref(s), &mut model);
            if one.errors > 0 {
                what = format!("{what} ({s:?} failed)");
                before_failed = snapshot;
                r.errors += one.errors;
                r.uncertain.extend(one.uncertain);
            }
        }
        r.model = model.clone();
        // A failed hole punch of a freed cluster is harmless and absorbed (the cluster is free
        // either way); every other failure reaches the caller.
        let expected = usize::from(ctl.injected() != Some(OpKind::Discard));
        assert_eq!(
            r.errors,
            expected,
            "{what} ({:?}): errors reaching the caller",
            ctl.injected()
        );
        // Later I/O works on the same image.
        let late = pattern(7 << 20, 8192, 9);
        q.write_at(7 << 20, &late)
            .unwrap_or_else(|e| panic!("{what}: a later write failed: {e}"));
        q.flush()
            .unwrap_or_else(|e| panic!("{what}: a later flush failed: {e}"));
        r.model[7 << 20..(7 << 20) + 8192].copy_from_slice(&late);
        let got = q.read_at(0, SIZE as usize).unwrap();
        check_contents(&got, &r, &before_failed, &what);
        drop(q);
        drop(img);
        // Consistent after closing: our check, and qemu-img for a sample.
        let mut bytes = vec![0u8; HostFile::len(dev.as_ref()) as usize];
        dev.read_exact_at(0, &mut bytes).unwrap();
        let (dev2, _) = device_with(&bytes);
        let report = open(dev2, None).check(Repair::None).unwrap();
        let first: Vec<&String> = report.messages.iter().take(6).collect();
        assert_eq!(
            report.corruptions + report.check_errors,
            0,
            "{what}: {first:?}"
        );
        leaks += report.leaks;
        assert_eq!(report.leaks, 0, "{what}: leaked clusters: {first:?}");
        if n % qemu_every == 0 {
            let p = dir.path().join(format!("eio-{n}.qcow2"));
            std::fs::write(&p, &bytes).unwrap();
            assert_qemu_check_clean(&p);
            std::fs::remove_file(&p).unwrap();
        }
    }
    eprintln!("EIO at each of {total} operations; {leaks} leaked clusters in all");
}

fn eio_at_every_operation_of_allocating_writes() {
    strata_testkit::require_qemu_utils();
    sweep(None, 7);
}

fn eio_at_every_operation_with_tiny_metadata_caches() {
    strata_testkit::require_qemu_utils();
    // Four L2 tables and four refcount blocks at most (the smallest cache): evictions write
    // back in the middle of allocations, and those writes fail too.
    sweep(Some(4096), 13);
}

strata_testkit::main!(
    eio_at_every_operation_of_allocating_writes,
    eio_at_every_operation_with_tiny_metadata_caches,
);

//! Helpers for tests (feature `test-utils`): damaging images on purpose.

// Test support (feature `test-utils`): a failed step panics the test, by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use crate::format::{open_host_file, OpenOptions};

use super::meta::{Meta, MetaOptions};

/// Adds `delta` to the refcount of host cluster `cluster` of the image at `path`, writing it
/// back — a leak (positive) or a corruption (negative) for check tests.
///
/// # Panics
/// On any error: it is a test helper.
pub fn bump_refcount(path: &Path, cluster: u64, delta: i64) {
    let file = open_host_file(path, &OpenOptions::default()).expect("open the image file");
    let mut m = Meta::open(
        file,
        MetaOptions {
            writable: true,
            ..MetaOptions::default()
        },
    )
    .expect("open the metadata");
    m.update_refcount_blocking(cluster, delta)
        .expect("change the refcount");
    m.close().expect("write the refcount back");
}

/// The body of the `qcow2_open` fuzz target, also run by the test suite on the committed seeds:
/// opens `data` as a read-only qcow2 image (backing files not opened), and if that works, reads
/// a few ranges, asks for block status and runs a check. It must never panic, whatever `data`
/// holds; errors are fine.
pub fn fuzz_open(data: &[u8]) {
    use crate::device::BlockDevice;
    use crate::format::Image;
    use crate::io::blocking::BlockingQueue;

    let dev = crate::io::memory::MemoryDevice::read_only_with(data);
    let opts = super::Qcow2Options {
        no_backing: true,
        ..super::Qcow2Options::default()
    };
    let Ok(img) = super::open(dev, &opts) else {
        return;
    };
    let size = img.size();
    if size > 0 {
        if let Ok(mut q) = BlockingQueue::open(img.as_ref(), 4) {
            for frac in [0u64, 1, 2, 3] {
                let at = size / 4 * frac;
                let len = (size - at).min(64 * 1024) as usize;
                let _ = q.read_at(at, len);
            }
        }
        let _ = img.block_status(0, size);
        let _ = img.map(0, size.min(1 << 30));
    }
    let _ = img.check(super::check::Repair::None);
    let _ = img.info();
}

/// The body of the `qcow2_header` fuzz target: a header that parses serializes to bytes that
/// parse back to the same header.
pub fn fuzz_header(data: &[u8]) {
    let Ok(h) = super::header::Header::parse(data) else {
        return;
    };
    let Ok(bytes) = h.serialize() else { return };
    let mut padded = bytes;
    padded.resize(h.cluster_size() as usize, 0);
    let again = super::header::Header::parse(&padded).expect("a serialized header parses");
    assert_eq!(again, h, "a header changed in a round trip");
}

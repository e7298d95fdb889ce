//! Entry points for the cargo-fuzz targets in `fuzz/` and for the seed-corpus test that runs
//! in CI without cargo-fuzz (feature `test-utils`). Each takes untrusted bytes and panics only
//! if the code under test misbehaves.
#![allow(clippy::panic)]

use crate::device::BlockDevice;
use crate::format::vmdk::descriptor::Descriptor;
use crate::format::{Image, OpenOptions};
use crate::io::blocking::BlockingQueue;
use crate::io::memory::MemoryDevice;

/// Parses a descriptor; a parsed one must survive rendering and parsing again.
pub fn descriptor(data: &[u8]) {
    if let Ok(d) = Descriptor::parse(data) {
        let again = Descriptor::parse(d.render().as_bytes())
            .unwrap_or_else(|e| panic!("a rendered descriptor does not parse: {e}"));
        assert_eq!(
            again.extents.len(),
            d.extents.len(),
            "rendering lost extents"
        );
        assert_eq!(again.size(), d.size(), "rendering changed the size");
    }
}

/// Opens an image held in `data` (read-only, without a path) and exercises it.
pub fn image(data: &[u8]) {
    let dev = MemoryDevice::read_only_with(data);
    let opts = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    let Ok(img) = super::open(dev, None, &opts) else {
        return;
    };
    let size = img.size();
    let _ = img.info();
    let Ok(mut q) = BlockingQueue::open(img.as_ref(), 4) else {
        return;
    };
    // Bounded work: a few reads and status queries spread over the disk.
    for i in 0..8u64 {
        let at = (size / 8).saturating_mul(i) & !511;
        let len = (size - at).min(128 << 10) as usize;
        if len > 0 {
            if let Ok(buf) = q.read_at(at, len) {
                assert_eq!(buf.len(), len);
            }
            if let Ok(e) = img.block_status(at, len as u64) {
                assert!(
                    e.len >= 1 && e.offset == at && e.len <= len as u64,
                    "bad extent {e:?}"
                );
            }
        }
    }
}

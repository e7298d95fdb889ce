//! Shared by the fuzz entry points of every format (feature `test-utils`): what is done with an
//! image that opened from untrusted bytes.
#![allow(clippy::panic)]

use crate::format::Image;
use crate::io::blocking::BlockingQueue;

/// Bounded work on an open image: a few reads and status queries spread over the disk.
pub fn poke(img: &dyn Image) {
    let size = img.size();
    let _ = img.info();
    let Ok(mut q) = BlockingQueue::open(img, 4) else {
        return;
    };
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

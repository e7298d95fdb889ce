//! Entry points for the cargo-fuzz targets in `fuzz/` and for the seed-corpus test that runs in
//! CI without cargo-fuzz (feature `test-utils`). Each takes untrusted bytes and panics only if
//! the code under test misbehaves. Inputs are tried as they are and with their checksums
//! recomputed, so that mutations reach the BAT and locator code behind the checksums.
#![allow(clippy::panic)]

use crate::format::vhd::dynamic::HEADER_LEN;
use crate::format::vhd::footer::checksum;
use crate::format::{ImageFormat, OpenOptions};
use crate::io::memory::MemoryDevice;

/// Recomputes the footer (at the end and at 0) and dynamic header checksums of `data`.
pub fn reseal(data: &[u8]) -> Vec<u8> {
    fn fix(d: &mut [u8], at: usize, len: usize, sum_at: usize) {
        if at.checked_add(len).is_some_and(|e| e <= d.len()) {
            let s = checksum(&d[at..at + len], sum_at);
            d[at + sum_at..at + sum_at + 4].copy_from_slice(&s.to_be_bytes());
        }
    }
    let mut d = data.to_vec();
    let n = d.len();
    if n >= 512 {
        fix(&mut d, n - 512, 512, 64);
    }
    fix(&mut d, 0, 512, 64);
    if n >= 24 {
        let mut off = [0u8; 8];
        off.copy_from_slice(&d[16..24]);
        if let Ok(off) = usize::try_from(u64::from_be_bytes(off)) {
            fix(&mut d, off, HEADER_LEN, 36);
        }
    }
    d
}

/// Opens `data` as a VHD (read-only, without a path) and exercises what opens.
pub fn image(data: &[u8]) {
    for bytes in [data.to_vec(), reseal(data)] {
        exercise(&bytes, ImageFormat::Vhd);
    }
}

/// Opens `data` read-only as `format` and reads a little of it; shared with the VHDX targets.
pub fn exercise(data: &[u8], format: ImageFormat) {
    let dev = MemoryDevice::read_only_with(data);
    let opts = OpenOptions {
        format: Some(format),
        read_only: true,
        ..OpenOptions::default()
    };
    let Ok(img) = crate::format::open_image_on(dev, opts.format) else {
        return;
    };
    crate::format::fuzzing::poke(img.as_ref());
}

/// Decodes parent locator data under every platform code.
pub fn locator(data: &[u8]) {
    for code in [b"W2ku", b"W2ru", b"MacX"] {
        if let Some(Ok(l)) = super::locator::decode(code, data) {
            let dir = std::path::Path::new("/nonexistent-strata-fuzz");
            let _ = super::locator::resolve(dir, &l);
        }
    }
}

//! Entry points for the cargo-fuzz targets in `fuzz/` and for the seed-corpus test (feature
//! `test-utils`). Inputs are tried as they are and with every CRC-32C recomputed (headers,
//! region tables, log entries), so that mutations reach the metadata, BAT and log replay code.
#![allow(clippy::panic)]

use crate::device::HostFile;
use crate::format::fuzzing::poke;
use crate::format::vhd::fuzz::exercise;
use crate::format::vhdx::header::{
    le32, seal, HEADER_LEN, HEADER_OFFSETS, REGION_OFFSETS, REGION_TABLE_LEN,
};
use crate::format::{open_image_on, ImageFormat};
use crate::io::memory::MemoryDevice;

/// Recomputes the CRC-32C of both headers, both region tables and every log entry found at a
/// 4 KiB boundary.
pub fn reseal(data: &[u8]) -> Vec<u8> {
    let mut d = data.to_vec();
    for at in HEADER_OFFSETS {
        let at = at as usize;
        if at + HEADER_LEN <= d.len() {
            seal(&mut d[at..at + HEADER_LEN], 4);
        }
    }
    for at in REGION_OFFSETS {
        let at = at as usize;
        if at + REGION_TABLE_LEN <= d.len() {
            seal(&mut d[at..at + REGION_TABLE_LEN], 4);
        }
    }
    let mut at = 1 << 20;
    while at + 4096 <= d.len() {
        if &d[at..at + 4] == b"loge" {
            let len = le32(&d, at + 8) as usize;
            if len >= 64 && at + len <= d.len() {
                seal(&mut d[at..at + len], 4);
            }
        }
        at += 4096;
    }
    d
}

/// Opens `data` as a VHDX read-only and exercises what opens.
pub fn image(data: &[u8]) {
    for bytes in [data.to_vec(), reseal(data)] {
        exercise(&bytes, ImageFormat::Vhdx);
    }
}

/// Opens `data` as a VHDX for writing (which replays its log) and exercises what opens.
pub fn replay(data: &[u8]) {
    let d = reseal(data);
    let dev = MemoryDevice::new(0);
    if dev.write_all_at(0, &d).is_err() {
        return;
    }
    let Ok(img) = open_image_on(dev, Some(ImageFormat::Vhdx)) else {
        return;
    };
    poke(img.as_ref());
}

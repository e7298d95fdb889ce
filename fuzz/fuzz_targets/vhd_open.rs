//! Fuzzes opening a VHD from untrusted bytes: footer and its copy, dynamic header, BAT, sector
//! bitmaps (checksums recomputed too, to get past them). No input may panic; whatever opens must
//! answer reads and block-status queries with data or an error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    strata_storage::format::vhd::fuzz::image(data);
});

//! Fuzzes opening a VHDX read-only from untrusted bytes: headers, region tables, metadata, BAT
//! (CRC-32Cs recomputed too, to get past them).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    strata_storage::format::vhdx::fuzz::image(data);
});

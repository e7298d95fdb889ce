//! Fuzzes decoding and resolving VHD parent locator data (W2ku, W2ru, MacX).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    strata_storage::format::vhd::fuzz::locator(data);
});

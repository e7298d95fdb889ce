//! Fuzzes opening a VHDX for writing, which searches its log for the active sequence and
//! replays it: entry headers, descriptors, data sectors, tails and sequence numbers.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    strata_storage::format::vhdx::fuzz::replay(data);
});

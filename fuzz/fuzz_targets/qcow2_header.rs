//! Header and header-extension parsing: never panics, and a parsed header round-trips.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    strata_storage::format::qcow2::testing::fuzz_header(data);
});

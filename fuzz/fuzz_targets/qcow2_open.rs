//! Opening an image (header, L1 and refcount tables, snapshot table), reading through its L2
//! tables, block status, map and a full check: errors are fine, panics and runaway memory are not.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    strata_storage::format::qcow2::testing::fuzz_open(data);
});

//! The virtio-blk chain parser on descriptors of any address, length and direction and on the
//! guest bytes they point at; every outcome is checked against the descriptors
//! (`strata_vmm::blk::testing::fuzz_chain`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    strata_vmm::blk::testing::fuzz_chain(data);
});

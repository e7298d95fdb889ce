//! The virtio-blk request engine over an in-memory disk, driven by arbitrary descriptor tables,
//! indirect tables, heads and guest bytes; after every run guest memory may have changed only
//! where a writable descriptor says so (`strata_vmm::blk::testing::fuzz_engine`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    strata_vmm::blk::testing::fuzz_engine(data);
});

//! The virtio-net receive and transmit paths against an in-memory tap: the input is played as
//! driver actions (chains of any shape, headers of any value) and host actions (frames of any
//! length), and the harness checks the device's invariants (strata_vmm::net::testing::run_ops).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    strata_vmm::net::testing::run_ops(data);
});

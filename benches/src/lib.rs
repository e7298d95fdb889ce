//! Benchmarks live in scripts beside this crate; their figures are in benches/RESULTS.md. The library holds what
//! several bench binaries could share: [`qtest`], a virtio-pci driver for QEMU devices over
//! QEMU's qtest protocol.

pub mod qtest;

//! Virtio transports. Strata uses virtio-mmio, described to the guest in ACPI tables (see
//! docs/architecture.md, "The VMM", for why).

pub mod mmio;

pub use mmio::VirtioMmio;

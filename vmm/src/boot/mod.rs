//! Loading the guest: Linux through the 64-bit boot protocol (linux-loader), with an e820 map,
//! initrd, command line and ACPI tables describing the virtio-mmio devices.

pub mod acpi;
pub mod linux;

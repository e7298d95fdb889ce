//! Strata's virtual machine monitor: KVM vCPUs and memory, Linux boot, a serial console and a
//! virtio-blk device served straight from the block layer's I/O queues.

// No unwrap or expect outside tests: every failure is an error the caller sees.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod blk;
pub mod boot;
pub mod bus;
pub mod control;
pub mod devices;
pub mod error;
pub mod ged;
pub mod hostnet;
pub mod kvm;
pub mod memory;
pub mod net;
pub mod process;
pub mod ratelimit;
pub mod sandbox;
pub mod transport;
pub mod vhost_user;
pub mod vm;

pub use error::{Result, VmmError};

//! Strata's virtual machine monitor: KVM vCPUs and memory, Linux boot, a serial console and a
//! virtio-blk device served straight from the block layer's I/O queues.
//!
//! Nothing is implemented yet; this crate exists so that the workspace has its final shape.

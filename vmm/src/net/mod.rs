//! The virtio-net device (virtio 1.2, 5.1) on a tap device.
//!
//! - [`config`]: what the device offers for one NIC (feature bits, the configuration space with
//!   the MAC, link status and queue pairs) and the user's options (MAC, queue pairs, rate);
//! - [`tap`]: the tap device (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE`, one
//!   descriptor per queue pair, offloads with `TUNSETOFFLOAD`), and [`tap::TapIo`], the one
//!   trait the data path uses, which an in-memory tap also implements for tests and fuzzing;
//! - [`hdr`]: the `virtio_net_hdr` a guest sends, validated against the negotiated features
//!   before it reaches the tap;
//! - [`tx`] and [`rx`]: one virtqueue each way (untrusted chains: bounded length and count,
//!   every address checked); [`rx`] copies each frame from a bounce buffer into the guest's
//!   buffers, merging several with `MRG_RXBUF`;
//! - [`filter`] and [`ctrl`]: the control queue (RX mode, MAC filter tables, MAC address, the
//!   number of queue pairs) and the receive filter it sets;
//! - [`bucket`]: the token bucket of a NIC's rate limit;
//! - [`worker`]: one thread per queue pair, woken by epoll on the kicks, the tap and a timer;
//! - [`device`]: the [`crate::transport::VirtioDevice`] that starts and stops the workers.
//!
//! vhost-net is not implemented: every NIC uses this user-space data path (the hosts this was
//! built on have no `/dev/vhost-net`; [`device::vhost_net_notice`] says so once per process).

pub mod bucket;
pub mod chain;
pub mod config;
pub mod ctrl;
pub mod device;
pub mod filter;
pub mod hdr;
pub mod rx;
pub mod tap;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod tx;
pub mod worker;

#[cfg(test)]
mod tests;

pub use config::{NetConfig, NetOptions};
pub use device::NetDevice;

/// The virtio device ID of a network device.
pub const DEVICE_ID_NET: u32 = 1;

/// Bytes of the `virtio_net_hdr` in front of every frame (VERSION_1 always has `num_buffers`).
pub const HDR_LEN: usize = 12;

/// The largest frame (without the virtio header) either way: a 64 KiB GSO packet plus an
/// Ethernet header with a VLAN tag. Longer TX chains are refused; the RX bounce buffer holds
/// one frame of this size.
pub const MAX_FRAME: usize = 65536 + 14 + 4;

/// The smallest frame accepted from a guest: an Ethernet header.
pub const MIN_FRAME: usize = 14;

/// Most descriptors looked at in one chain (direct or indirect).
pub const MAX_CHAIN_DESCRIPTORS: usize = 1024 + 2;

/// Feature bits (virtio 1.2, 5.1.3 and 6).
pub mod features {
    /// The device handles packets with a partial checksum (the guest may offload).
    pub const CSUM: u64 = 1 << 0;
    /// The driver handles packets with a partial checksum.
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// The device has a MAC address in its configuration space.
    pub const MAC: u64 = 1 << 5;
    /// The driver can receive TSOv4.
    pub const GUEST_TSO4: u64 = 1 << 7;
    /// The driver can receive TSOv6.
    pub const GUEST_TSO6: u64 = 1 << 8;
    /// The driver can receive TSO with ECN.
    pub const GUEST_ECN: u64 = 1 << 9;
    /// The driver can receive UFO.
    pub const GUEST_UFO: u64 = 1 << 10;
    /// The device can receive TSOv4.
    pub const HOST_TSO4: u64 = 1 << 11;
    /// The device can receive TSOv6.
    pub const HOST_TSO6: u64 = 1 << 12;
    /// The device can receive TSO with ECN.
    pub const HOST_ECN: u64 = 1 << 13;
    /// The device can receive UFO.
    pub const HOST_UFO: u64 = 1 << 14;
    /// The driver can merge receive buffers.
    pub const MRG_RXBUF: u64 = 1 << 15;
    /// The configuration space has a link status.
    pub const STATUS: u64 = 1 << 16;
    /// A control virtqueue.
    pub const CTRL_VQ: u64 = 1 << 17;
    /// RX mode control (promiscuous, all-multicast).
    pub const CTRL_RX: u64 = 1 << 18;
    /// More than one queue pair.
    pub const MQ: u64 = 1 << 22;
    /// The MAC address can be set through the control queue.
    pub const CTRL_MAC_ADDR: u64 = 1 << 23;
    /// Indirect descriptors.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// used_event / avail_event notification suppression.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// Virtio 1.0 or later.
    pub const VERSION_1: u64 = 1 << 32;
}

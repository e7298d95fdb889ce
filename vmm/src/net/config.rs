//! What a virtio-net device offers for one NIC: the user's options, feature bits and the
//! configuration space (`struct virtio_net_config`: MAC, status, max_virtqueue_pairs).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::features as f;

/// Bytes of the configuration space we expose (mac, status, max_virtqueue_pairs).
pub const CONFIG_SPACE_LEN: usize = 10;
/// `status`: the link is up.
pub const STATUS_LINK_UP: u16 = 1;
/// Most queue pairs per NIC.
pub const MAX_QUEUE_PAIRS: u16 = 16;

/// How the user asked for a NIC.
#[derive(Clone, Debug)]
pub struct NetOptions {
    /// The guest's MAC address (unicast, not all zeros).
    pub mac: [u8; 6],
    /// Queue pairs (one per vCPU is usual; 1 to [`MAX_QUEUE_PAIRS`]); the tap needs as many
    /// queues.
    pub queue_pairs: u16,
    /// Entries per virtqueue (a power of two, 2 to 1024).
    pub queue_size: u16,
    /// A rate limit in bytes per second, each way (none when `None`).
    pub rate_bytes_per_sec: Option<u64>,
    /// Counters shared with whoever reports them (kept across guest reboots when the caller
    /// passes the same ones each time).
    pub counters: Option<Arc<NetCounters>>,
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            queue_pairs: 1,
            queue_size: 256,
            rate_bytes_per_sec: None,
            counters: None,
        }
    }
}

/// A NIC's counters, updated by its workers (relaxed atomics).
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Frames the guest sent that reached the tap.
    pub tx_frames: AtomicU64,
    /// Their bytes (without the virtio header).
    pub tx_bytes: AtomicU64,
    /// Chains the guest sent that were refused (malformed, too long, a bad header) or that the
    /// tap refused.
    pub tx_errors: AtomicU64,
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Their bytes (without the virtio header).
    pub rx_bytes: AtomicU64,
    /// Frames read from the tap and dropped (filtered, or no usable guest buffer).
    pub rx_dropped: AtomicU64,
}

/// A snapshot of [`NetCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCountersSnapshot {
    /// See [`NetCounters::tx_frames`].
    pub tx_frames: u64,
    /// See [`NetCounters::tx_bytes`].
    pub tx_bytes: u64,
    /// See [`NetCounters::tx_errors`].
    pub tx_errors: u64,
    /// See [`NetCounters::rx_frames`].
    pub rx_frames: u64,
    /// See [`NetCounters::rx_bytes`].
    pub rx_bytes: u64,
    /// See [`NetCounters::rx_dropped`].
    pub rx_dropped: u64,
}

impl NetCounters {
    /// The counters now.
    pub fn snapshot(&self) -> NetCountersSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NetCountersSnapshot {
            tx_frames: l(&self.tx_frames),
            tx_bytes: l(&self.tx_bytes),
            tx_errors: l(&self.tx_errors),
            rx_frames: l(&self.rx_frames),
            rx_bytes: l(&self.rx_bytes),
            rx_dropped: l(&self.rx_dropped),
        }
    }

    pub(crate) fn add(a: &AtomicU64, n: u64) {
        a.fetch_add(n, Ordering::Relaxed);
    }
}

/// A NIC as the device sees it.
#[derive(Clone, Debug)]
pub struct NetConfig {
    mac: [u8; 6],
    queue_pairs: u16,
    queue_size: u16,
    rate: Option<u64>,
    ufo: bool,
    counters: Arc<NetCounters>,
}

/// Checks a MAC address: unicast and not all zeros.
pub fn check_mac(mac: &[u8; 6]) -> Result<(), String> {
    if mac[0] & 1 != 0 || mac == &[0; 6] {
        return Err(format!("MAC {} is not a unicast address", format_mac(mac)));
    }
    Ok(())
}

/// `52:54:00:12:34:56`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `52:54:00:12:34:56`.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = text.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!(
            "{text:?} is not a MAC address (six hex bytes with colons)"
        ));
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(format!("{text:?} is not a MAC address"));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("{text:?} is not a MAC address"))?;
    }
    Ok(mac)
}

impl NetConfig {
    /// Describes a NIC with `opts` on a tap that does (`ufo`) or does not take UFO.
    pub fn new(opts: &NetOptions, ufo: bool) -> Result<NetConfig, String> {
        check_mac(&opts.mac)?;
        if opts.queue_pairs == 0 || opts.queue_pairs > MAX_QUEUE_PAIRS {
            return Err(format!(
                "{} queue pairs is out of range (1 to {MAX_QUEUE_PAIRS})",
                opts.queue_pairs
            ));
        }
        if !opts.queue_size.is_power_of_two() || !(2..=1024).contains(&opts.queue_size) {
            return Err(format!(
                "queue size {} must be a power of two from 2 to 1024",
                opts.queue_size
            ));
        }
        if opts.rate_bytes_per_sec == Some(0) {
            return Err("a rate limit of 0 bytes per second".into());
        }
        Ok(NetConfig {
            mac: opts.mac,
            queue_pairs: opts.queue_pairs,
            queue_size: opts.queue_size,
            rate: opts.rate_bytes_per_sec,
            ufo,
            counters: opts.counters.clone().unwrap_or_default(),
        })
    }

    /// The MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Queue pairs offered.
    pub fn queue_pairs(&self) -> u16 {
        self.queue_pairs
    }

    /// Entries per virtqueue.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// The rate limit in bytes per second, each way.
    pub fn rate(&self) -> Option<u64> {
        self.rate
    }

    /// The live counters.
    pub fn counters(&self) -> &Arc<NetCounters> {
        &self.counters
    }

    /// Virtqueues: a receive and a transmit queue per pair, and the control queue.
    pub fn num_queues(&self) -> usize {
        2 * usize::from(self.queue_pairs) + 1
    }

    /// The device feature bits.
    pub fn features(&self) -> u64 {
        let mut x = f::VERSION_1
            | f::RING_EVENT_IDX
            | f::RING_INDIRECT_DESC
            | f::MAC
            | f::STATUS
            | f::MRG_RXBUF
            | f::CSUM
            | f::GUEST_CSUM
            | f::GUEST_TSO4
            | f::GUEST_TSO6
            | f::GUEST_ECN
            | f::HOST_TSO4
            | f::HOST_TSO6
            | f::HOST_ECN
            | f::CTRL_VQ
            | f::CTRL_RX
            | f::CTRL_MAC_ADDR;
        if self.queue_pairs > 1 {
            x |= f::MQ;
        }
        if self.ufo {
            x |= f::GUEST_UFO | f::HOST_UFO;
        }
        x
    }

    /// The configuration space (little-endian).
    pub fn config_space(&self) -> [u8; CONFIG_SPACE_LEN] {
        let mut c = [0u8; CONFIG_SPACE_LEN];
        c[0..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&STATUS_LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&self.queue_pairs.to_le_bytes());
        c
    }

    /// Reads configuration space at `offset`; bytes past the end read as zero.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::transport::read_config_space(&self.config_space(), offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_and_features_describe_the_nic() {
        let opts = NetOptions {
            queue_pairs: 2,
            ..NetOptions::default()
        };
        let cfg = NetConfig::new(&opts, false).unwrap();
        let mut c = [0u8; 12];
        cfg.read_config(0, &mut c);
        assert_eq!(&c[0..6], &opts.mac);
        assert_eq!(&c[6..8], &[1, 0], "link up");
        assert_eq!(&c[8..10], &[2, 0]);
        assert_eq!(&c[10..12], &[0, 0], "past the end reads as zero");
        assert_ne!(cfg.features() & f::MQ, 0);
        assert_eq!(cfg.features() & (f::HOST_UFO | f::GUEST_UFO), 0);
        assert_eq!(cfg.num_queues(), 5);
    }

    #[test]
    fn bad_options_are_refused() {
        for bad in [
            NetOptions {
                mac: [1, 2, 3, 4, 5, 6],
                ..NetOptions::default()
            },
            NetOptions {
                mac: [0; 6],
                ..NetOptions::default()
            },
            NetOptions {
                queue_pairs: 0,
                ..NetOptions::default()
            },
            NetOptions {
                queue_size: 100,
                ..NetOptions::default()
            },
            NetOptions {
                rate_bytes_per_sec: Some(0),
                ..NetOptions::default()
            },
        ] {
            assert!(NetConfig::new(&bad, true).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn macs_parse_and_print() {
        let m = parse_mac("52:54:00:ab:cd:ef").unwrap();
        assert_eq!(format_mac(&m), "52:54:00:ab:cd:ef");
        for bad in ["52:54:00:ab:cd", "52:54:00:ab:cd:eg", "5254:00:ab:cd:ef:0"] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }
}

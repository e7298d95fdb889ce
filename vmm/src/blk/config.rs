//! What a virtio-blk device offers for one disk: feature bits and the configuration space.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use strata_storage::{BlockDevice, Capabilities};

use super::{features, ID_BYTES, SECTOR_SIZE};

/// Bytes of `struct virtio_blk_config` we expose (up to and including `write_zeroes_may_unmap`
/// and its padding).
pub const CONFIG_SPACE_LEN: usize = 60;

/// Largest discard or write-zeroes request, in sectors (1 GiB), advertised to the driver.
pub(crate) const MAX_DISCARD_SECTORS: u32 = 1 << 21;

/// How the user asked for a disk to be attached.
#[derive(Clone, Debug)]
pub struct DiskOptions {
    /// Refuse writes and offer VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// Number of virtqueues (one worker each).
    pub num_queues: u16,
    /// Entries per virtqueue (a power of two, at most 1024).
    pub queue_size: u16,
    /// The ID string GET_ID returns (at most 20 bytes).
    pub serial: String,
    /// Counters shared with whoever reports the disk's statistics (kept across guest reboots
    /// when the caller passes the same ones each time).
    pub counters: Option<Arc<DiskCounters>>,
    /// The longest a queue's worker polls for its next event before it sleeps (see
    /// [`crate::blk::poll`]); zero never polls. At most [`MAX_POLL`]. The VMM's queue workers
    /// poll; the vhost-user backend waits in vhost-user-backend's event loop, which does not.
    pub poll_max: Duration,
}

/// The default [`DiskOptions::poll_max`]. QEMU's IOThreads default to 32 µs; that measured no
/// gain here, where the guest's round trip after an interrupt (the wake-up of an idle CPU, then
/// its refill and kick) takes 32–64 µs and a wait for the disk longer, so a 32 µs window keeps
/// closing. At QD32 (`vmm_datapath --only-strata-depth 32`, 2026-12-08, benches/RESULTS.md),
/// against no polling: 128 µs gained -1% to 20% on raw and 3% on qcow2, 256 µs 9–17% on raw and
/// 9–22% on qcow2.
pub const DEFAULT_POLL: Duration = Duration::from_micros(256);

/// The largest [`DiskOptions::poll_max`] accepted: no wait polls longer than this.
pub const MAX_POLL: Duration = Duration::from_millis(1);

impl Default for DiskOptions {
    fn default() -> Self {
        DiskOptions {
            read_only: false,
            num_queues: 1,
            queue_size: 256,
            serial: String::new(),
            counters: None,
            poll_max: DEFAULT_POLL,
        }
    }
}

/// A disk's counters, updated by its queues' workers as they go (relaxed atomics: one add per
/// request, no lock on the data path).
#[derive(Debug, Default)]
pub struct DiskCounters {
    /// Requests taken from the virtqueues.
    pub requests: AtomicU64,
    /// Requests that completed with an error.
    pub errors: AtomicU64,
    /// Bytes read or written by completed requests.
    pub bytes: AtomicU64,
}

impl DiskCounters {
    /// (requests, errors, bytes) now.
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

/// A disk as a virtio-blk device sees it: the block device, the options, and the features and
/// configuration space derived from both.
#[derive(Clone, Debug)]
pub struct BlkConfig {
    disk: Arc<dyn BlockDevice>,
    read_only: bool,
    num_queues: u16,
    queue_size: u16,
    serial: [u8; ID_BYTES],
    block_size: u32,
    counters: Arc<DiskCounters>,
    poll_max: Duration,
}

impl BlkConfig {
    /// Describes `disk` with `opts`. The disk is read-only for the guest if either says so.
    pub fn new(disk: Arc<dyn BlockDevice>, opts: &DiskOptions) -> Result<BlkConfig, String> {
        if opts.num_queues == 0 || opts.num_queues > 64 {
            return Err(format!(
                "queues={} is out of range (1 to 64)",
                opts.num_queues
            ));
        }
        if !opts.queue_size.is_power_of_two() || !(2..=1024).contains(&opts.queue_size) {
            return Err(format!(
                "queue size {} must be a power of two from 2 to 1024",
                opts.queue_size
            ));
        }
        if opts.serial.len() > ID_BYTES {
            return Err(format!(
                "serial '{}' is longer than {ID_BYTES} bytes",
                opts.serial
            ));
        }
        if opts.poll_max > MAX_POLL {
            return Err(format!(
                "poll time {} µs is longer than the {} µs allowed",
                opts.poll_max.as_micros(),
                MAX_POLL.as_micros()
            ));
        }
        if disk.size() % SECTOR_SIZE != 0 {
            return Err(format!(
                "disk size {} is not a multiple of {SECTOR_SIZE} bytes",
                disk.size()
            ));
        }
        let mut serial = [0u8; ID_BYTES];
        serial[..opts.serial.len()].copy_from_slice(opts.serial.as_bytes());
        let block_size = disk.alignment().clamp(512, 4096) as u32;
        Ok(BlkConfig {
            read_only: opts.read_only || disk.read_only(),
            disk,
            num_queues: opts.num_queues,
            queue_size: opts.queue_size,
            serial,
            block_size,
            counters: opts.counters.clone().unwrap_or_default(),
            poll_max: opts.poll_max,
        })
    }

    /// The longest a queue's worker polls before it sleeps.
    pub fn poll_max(&self) -> Duration {
        self.poll_max
    }

    /// The disk's live counters.
    pub fn counters(&self) -> &DiskCounters {
        &self.counters
    }

    /// The disk.
    pub fn disk(&self) -> &Arc<dyn BlockDevice> {
        &self.disk
    }

    /// Whether the guest may not write.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Number of virtqueues.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Maximum entries per virtqueue.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// The GET_ID string, zero-padded.
    pub fn serial(&self) -> &[u8; ID_BYTES] {
        &self.serial
    }

    /// Capacity in sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.size() / SECTOR_SIZE
    }

    /// Whether discard is offered (a writable disk that can discard).
    pub fn offers_discard(&self) -> bool {
        !self.read_only && self.disk.capabilities().contains(Capabilities::DISCARD)
    }

    /// Whether write-zeroes is offered (every writable disk can: the block layer writes zeros
    /// itself where the device has no shortcut).
    pub fn offers_write_zeroes(&self) -> bool {
        !self.read_only
    }

    /// Whether write-zeroes may deallocate.
    pub fn write_zeroes_may_unmap(&self) -> bool {
        self.disk
            .capabilities()
            .contains(Capabilities::WRITE_ZEROES_UNMAP)
    }

    /// Largest number of data segments in one request: the queue size less header and status.
    pub fn seg_max(&self) -> u32 {
        u32::from(self.queue_size) - 2
    }

    /// The device feature bits.
    pub fn features(&self) -> u64 {
        let mut f = features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | features::SEG_MAX
            | features::BLK_SIZE
            | features::FLUSH;
        if self.num_queues > 1 {
            f |= features::MQ;
        }
        if self.read_only {
            f |= features::RO;
        }
        if self.offers_discard() {
            f |= features::DISCARD;
        }
        if self.offers_write_zeroes() {
            f |= features::WRITE_ZEROES;
        }
        f
    }

    /// The configuration space (`struct virtio_blk_config`, little-endian).
    pub fn config_space(&self) -> [u8; CONFIG_SPACE_LEN] {
        let mut c = [0u8; CONFIG_SPACE_LEN];
        let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &self.capacity_sectors().to_le_bytes());
        put(12, &self.seg_max().to_le_bytes());
        put(20, &self.block_size.to_le_bytes());
        put(34, &self.num_queues.to_le_bytes());
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &1u32.to_le_bytes()); // max_discard_seg
        put(44, &(self.block_size / SECTOR_SIZE as u32).to_le_bytes());
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(52, &1u32.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[u8::from(self.write_zeroes_may_unmap())]);
        c
    }

    /// Reads `data.len()` bytes of configuration space at `offset`; bytes past the end read as
    /// zero.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::transport::read_config_space(&self.config_space(), offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_storage::io::memory::MemoryDevice;

    #[test]
    fn config_space_describes_the_disk() {
        let disk = MemoryDevice::new(1 << 20);
        let opts = DiskOptions {
            num_queues: 2,
            serial: "disk-1".into(),
            ..DiskOptions::default()
        };
        let cfg = BlkConfig::new(disk, &opts).unwrap();
        let space = cfg.config_space();
        assert_eq!(u64::from_le_bytes(space[0..8].try_into().unwrap()), 2048);
        assert_eq!(u16::from_le_bytes(space[34..36].try_into().unwrap()), 2);
        assert_ne!(cfg.features() & features::MQ, 0);
        assert_eq!(cfg.features() & features::RO, 0);
        assert_eq!(&cfg.serial()[..6], b"disk-1");
        let mut tail = [0xffu8; 8];
        cfg.read_config(56, &mut tail);
        assert_eq!(&tail[4..], &[0, 0, 0, 0], "bytes past the end read as zero");
    }

    #[test]
    fn read_only_disks_offer_ro_and_no_discard() {
        let disk = MemoryDevice::new(1 << 20);
        let opts = DiskOptions {
            read_only: true,
            ..DiskOptions::default()
        };
        let cfg = BlkConfig::new(disk, &opts).unwrap();
        assert_ne!(cfg.features() & features::RO, 0);
        assert_eq!(
            cfg.features() & (features::DISCARD | features::WRITE_ZEROES),
            0
        );
    }

    #[test]
    fn bad_options_are_refused() {
        let disk = MemoryDevice::new(1 << 20);
        let bad = [
            DiskOptions {
                num_queues: 0,
                ..DiskOptions::default()
            },
            DiskOptions {
                queue_size: 100,
                ..DiskOptions::default()
            },
            DiskOptions {
                serial: "x".repeat(21),
                ..DiskOptions::default()
            },
        ];
        for opts in bad {
            assert!(BlkConfig::new(disk.clone(), &opts).is_err());
        }
    }

    #[test]
    fn a_polling_window_past_the_limit_is_refused() {
        let disk = MemoryDevice::new(1 << 20);
        let at_limit = DiskOptions {
            poll_max: MAX_POLL,
            ..DiskOptions::default()
        };
        assert_eq!(
            BlkConfig::new(disk.clone(), &at_limit).unwrap().poll_max(),
            MAX_POLL
        );
        let past = DiskOptions {
            poll_max: MAX_POLL + Duration::from_micros(1),
            ..DiskOptions::default()
        };
        let e = BlkConfig::new(disk, &past).unwrap_err();
        assert!(e.contains("poll time 1001 µs"), "{e}");
    }
}

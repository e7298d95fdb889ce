//! Per-volume I/O counters: every volume the service opens (for VMs, jobs, downloads, NBD
//! exports) is wrapped in the block layer's [`CountedDevice`], counting into one
//! [`IoCounters`] per volume that lives as long as the server (so the counts only grow, as
//! Prometheus counters must) or until the volume is removed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use strata_storage::io::counted::{CountedDevice, IoCounters, IoCounts};
use strata_storage::BlockDevice;

/// Volumes whose counters are kept at most (beyond it new volumes are not counted).
pub const MAX_COUNTED_VOLUMES: usize = 4096;

/// The counters of the server's volumes, by `VG/NAME`.
#[derive(Debug, Default)]
pub struct IoStats {
    volumes: Mutex<BTreeMap<String, Arc<IoCounters>>>,
}

impl IoStats {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<IoCounters>>> {
        self.volumes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `device`, the volume `VG/NAME`, with its I/O counted.
    pub fn wrap(&self, volume: &str, device: Arc<dyn BlockDevice>) -> Arc<dyn BlockDevice> {
        let mut volumes = self.lock();
        if !volumes.contains_key(volume) && volumes.len() >= MAX_COUNTED_VOLUMES {
            return device;
        }
        let counters = volumes.entry(volume.to_string()).or_default().clone();
        Arc::new(CountedDevice::new(device, counters))
    }

    /// Forgets a removed volume's counters.
    pub fn forget(&self, volume: &str) {
        self.lock().remove(volume);
    }

    /// Every counted volume and its counts.
    pub fn counts(&self) -> Vec<(String, IoCounts)> {
        self.lock()
            .iter()
            .map(|(k, c)| (k.clone(), c.get()))
            .collect()
    }
}

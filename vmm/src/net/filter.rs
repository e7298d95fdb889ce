//! The receive filter the control queue sets (virtio 1.2, 5.1.6.5.1 and 5.1.6.5.2): promiscuous
//! and all-multicast modes, the MAC address, and unicast and multicast MAC tables.
//!
//! The tap sits on a bridge, which floods frames for unknown addresses to every port: without
//! the filter a guest that asked not to be promiscuous would still get them. Workers read the
//! filter through [`SharedFilter::current`], which copies it only when it changed (a
//! generation counter), so the receive path takes no lock per frame.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Most entries in each MAC table.
pub const MAX_TABLE_ENTRIES: usize = 64;

/// What frames the guest wants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxFilter {
    /// Every frame.
    pub promisc: bool,
    /// Every multicast frame.
    pub allmulti: bool,
    /// The NIC's address.
    pub mac: [u8; 6],
    /// More unicast addresses.
    pub unicast: Vec<[u8; 6]>,
    /// Multicast addresses.
    pub multicast: Vec<[u8; 6]>,
}

impl RxFilter {
    /// The state at reset: promiscuous (as the device is until the driver says otherwise).
    pub fn new(mac: [u8; 6]) -> RxFilter {
        RxFilter {
            promisc: true,
            allmulti: true,
            mac,
            unicast: Vec::new(),
            multicast: Vec::new(),
        }
    }

    /// Whether a frame starting with destination `frame[0..6]` is for the guest.
    pub fn accepts(&self, frame: &[u8]) -> bool {
        if self.promisc {
            return true;
        }
        let Some(dst) = frame.get(0..6) else {
            return false;
        };
        if dst == [0xff; 6] {
            return true;
        }
        if dst[0] & 1 != 0 {
            return self.allmulti || self.multicast.iter().any(|m| m == dst);
        }
        dst == self.mac || self.unicast.iter().any(|m| m == dst)
    }
}

/// A filter shared by the control queue (which sets it) and the workers (which read it).
#[derive(Debug)]
pub struct SharedFilter {
    generation: AtomicU64,
    filter: Mutex<RxFilter>,
}

impl SharedFilter {
    /// A promiscuous filter for `mac`.
    pub fn new(mac: [u8; 6]) -> SharedFilter {
        SharedFilter {
            generation: AtomicU64::new(1),
            filter: Mutex::new(RxFilter::new(mac)),
        }
    }

    /// Changes the filter.
    pub fn update(&self, f: impl FnOnce(&mut RxFilter)) {
        let mut filter = self.filter.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut filter);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Refreshes `cached` (with its generation) if the filter changed since.
    pub fn current(&self, cached: &mut (u64, RxFilter)) {
        let g = self.generation.load(Ordering::Acquire);
        if g != cached.0 {
            let filter = self.filter.lock().unwrap_or_else(|p| p.into_inner());
            *cached = (self.generation.load(Ordering::Acquire), filter.clone());
        }
    }

    /// A copy of the filter now.
    pub fn snapshot(&self) -> RxFilter {
        self.filter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_promiscuous_filter_takes_only_its_addresses() {
        let mac = [0x52, 0x54, 0, 0, 0, 1];
        let mut f = RxFilter::new(mac);
        let other = [0x52, 0x54, 0, 0, 0, 2];
        let mcast = [0x01, 0, 0x5e, 0, 0, 1];
        assert!(f.accepts(&other));
        f.promisc = false;
        f.allmulti = false;
        assert!(f.accepts(&mac));
        assert!(!f.accepts(&other));
        assert!(f.accepts(&[0xff; 6]));
        assert!(!f.accepts(&mcast));
        f.multicast.push(mcast);
        f.unicast.push(other);
        assert!(f.accepts(&mcast) && f.accepts(&other));
        assert!(!f.accepts(&[1, 2, 3]), "a runt is never accepted");
    }

    #[test]
    fn workers_see_updates_through_the_generation() {
        let shared = SharedFilter::new([2, 0, 0, 0, 0, 1]);
        let mut cached = (0, RxFilter::new([0; 6]));
        shared.current(&mut cached);
        assert!(cached.1.promisc);
        shared.update(|f| f.promisc = false);
        shared.current(&mut cached);
        assert!(!cached.1.promisc);
    }
}

//! Allocating writes in flight, by guest cluster: a second write to a cluster whose allocation
//! is in flight waits for it (it must not allocate twice), and the L2 table the allocation will
//! change is pinned in the cache until it is committed or rolled back.

use std::collections::HashMap;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::io::stack::wake::Waiters;

#[derive(Debug)]
struct InFlight {
    /// Host offset of the L2 table the commit changes.
    l2: u64,
    waiters: Waiters,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct Allocations {
    map: HashMap<u64, InFlight>,
}

impl Allocations {
    /// Whether guest cluster `gc` has an allocation in flight; if so, `waker` is woken when it
    /// ends.
    pub fn wait_for(&mut self, gc: u64, waker: Option<&Arc<EventFd>>) -> bool {
        match self.map.get_mut(&gc) {
            Some(a) => {
                if let Some(w) = waker {
                    a.waiters.add(w);
                }
                true
            }
            None => false,
        }
    }

    /// Records an allocation of guest cluster `gc` that will change the L2 table at `l2`.
    pub fn begin(&mut self, gc: u64, l2: u64) {
        self.map.insert(
            gc,
            InFlight {
                l2,
                waiters: Waiters::default(),
            },
        );
    }

    /// Ends the allocation of `gc`: its L2 table (to unpin) and whom to wake.
    pub fn end(&mut self, gc: u64) -> Option<(u64, Waiters)> {
        self.map.remove(&gc).map(|a| (a.l2, a.waiters))
    }

    /// Whether no allocation is in flight.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

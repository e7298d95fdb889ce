//! The virtio-blk device as a vhost-user-blk back-end (vhost-user-backend 0.24): QEMU, Cloud
//! Hypervisor or any vhost-user front-end can attach a Strata image or volume.
//!
//! The same [`QueueEngine`] as in Strata's own VMM serves each virtqueue: the library's thread
//! for the queue wakes on the front-end's kick eventfd, our engine's completion eventfd is
//! registered on that thread's epoll set, and interrupts go out through the front-end's call
//! eventfd. Guest memory is the front-end's shared memory (memfd), mapped by the library into a
//! `GuestMemoryMmap` that every in-flight request keeps alive.
//!
//! One thread per queue (`queues_per_thread`); `stop_vring` drains the queue's in-flight I/O
//! before the front-end reads the ring's position.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::warn;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::blk::chain::SharedMemory;
use crate::blk::config::{BlkConfig, CONFIG_SPACE_LEN};
use crate::blk::engine::QueueEngine;
use crate::error::{Result, VmmError};

type Vring = VringRwLock<GuestMemoryAtomic<GuestMemoryMmap>>;

/// How long `stop_vring` waits for in-flight I/O before giving up on it.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The back-end state shared by the library's threads.
pub struct BlkBackend {
    cfg: Arc<BlkConfig>,
    engines: Vec<Mutex<QueueEngine>>,
    mem: Mutex<Option<SharedMemory>>,
    /// Each queue's vring, learnt from the first event on it (for draining in `stop_vring`).
    vrings: Mutex<Vec<Option<Vring>>>,
    /// Per thread: the event that ends it when the front-end goes away.
    exits: Vec<(EventConsumer, EventNotifier)>,
}

impl std::fmt::Debug for BlkBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkBackend")
            .field("cfg", &self.cfg)
            .field("engines", &self.engines)
            .finish()
    }
}

impl BlkBackend {
    /// A back-end for `cfg`, with one open I/O queue per virtqueue.
    pub fn new(cfg: Arc<BlkConfig>) -> Result<Arc<BlkBackend>> {
        let cfg_queues = cfg.num_queues();
        let engines = (0..cfg.num_queues())
            .map(|i| {
                QueueEngine::new(format!("vhost-user-q{i}"), cfg.clone())
                    .map(Mutex::new)
                    .map_err(|e| VmmError::Disk {
                        path: "vhost-user disk".into(),
                        source: e,
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let exits = (0..cfg_queues)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| VmmError::io("Creating exit events", e))?;
        Ok(Arc::new(BlkBackend {
            exits,
            cfg,
            engines,
            mem: Mutex::new(None),
            vrings: Mutex::new(vec![None; usize::from(cfg_queues)]),
        }))
    }

    fn memory(&self) -> Option<SharedMemory> {
        self.mem.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn run_queue(&self, index: usize, vring: &Vring, completions: bool) {
        let (Some(mem), Some(engine)) = (self.memory(), self.engines.get(index)) else {
            return;
        };
        let mut engine = engine.lock().unwrap_or_else(|p| p.into_inner());
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        let interrupt = if completions {
            engine.process_completions(queue, &mem)
        } else {
            engine.process_avail(queue, &mem)
        };
        if interrupt {
            if let Err(e) = state.signal_used_queue() {
                warn!("signalling the front-end failed: {e}");
            }
        }
        if engine.wants_rerun() {
            // Chains are left in the ring that no kick will announce: come back through our own
            // kick eventfd once the thread's other events are served.
            if let Some(kick) = state.get_kick() {
                let one = 1u64.to_ne_bytes();
                let fd = std::os::fd::AsRawFd::as_raw_fd(kick);
                // SAFETY: `fd` is the vring's kick eventfd, kept open by `state` for the call;
                // `one` is an 8-byte buffer that lives for the call, as eventfd writes require.
                let _ = unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
            }
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.cfg.num_queues())
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.cfg.queue_size())
    }

    fn features(&self) -> u64 {
        self.cfg.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The library sets EVENT_IDX on each queue; the engine asks the queue.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let size = (size as usize).min(CONFIG_SPACE_LEN);
        let mut out = vec![0u8; size];
        self.cfg.read_config(u64::from(offset), &mut out);
        out
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        *self.mem.lock().unwrap_or_else(|p| p.into_inner()) = Some(mem.memory().into_inner());
        Ok(())
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (c, n) = self.exits.get(thread_index)?;
        Some((c.try_clone().ok()?, n.try_clone().ok()?))
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues()).map(|i| 1u64 << i).collect()
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        let vring = self
            .vrings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(queue_index as usize)
            .cloned()
            .flatten();
        let (Some(vring), Some(engine)) = (vring, self.engines.get(queue_index as usize)) else {
            return Ok(());
        };
        let deadline = std::time::Instant::now() + DRAIN_TIMEOUT;
        while engine.lock().unwrap_or_else(|p| p.into_inner()).in_flight() > 0 {
            if std::time::Instant::now() > deadline {
                warn!(
                    "queue {queue_index}: in-flight I/O did not finish before the ring stopped; \
                     its completions will not be reported"
                );
                engine
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .abandon_in_flight();
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
            self.run_queue(queue_index as usize, &vring, true);
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> std::io::Result<()> {
        // One queue per thread: the library gives each thread only its own vring and numbers
        // its kick 0 (an index within the thread; it has read the kick already), while our
        // completion eventfd was registered on thread i as `num_queues + 1 + i`.
        let n = self.num_queues();
        let index = thread_id;
        let completions = match usize::from(device_event) {
            0 => false,
            e if e == n + 1 + thread_id => true,
            other => {
                warn!("unexpected vhost-user event {other} on thread {thread_id}");
                return Ok(());
            }
        };
        let (Some(vring), true) = (vrings.first(), index < n) else {
            return Ok(());
        };
        if let Some(slot) = self
            .vrings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(index)
        {
            slot.get_or_insert_with(|| vring.clone());
        }
        self.run_queue(index, vring, completions);
        Ok(())
    }
}

/// Serves `cfg` on the vhost-user socket `socket` until the front-end disconnects.
pub fn serve(cfg: Arc<BlkConfig>, socket: &std::path::Path) -> Result<()> {
    let backend = BlkBackend::new(cfg)?;
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new("strata-vhost-user-blk".into(), backend.clone(), mem)
        .map_err(|e| VmmError::VhostUser(format!("starting the back-end: {e}")))?;
    for (i, handler) in daemon.get_epoll_handlers().iter().enumerate() {
        let engine = backend.engines[i].lock().unwrap_or_else(|p| p.into_inner());
        let fd = std::os::fd::AsRawFd::as_raw_fd(engine.completion_fd().as_ref());
        handler
            .register_listener(fd, EventSet::IN, (backend.num_queues() + 1 + i) as u64)
            .map_err(|e| VmmError::VhostUser(format!("watching completions: {e}")))?;
    }
    let mut listener = Listener::new(socket, true)
        .map_err(|e| VmmError::VhostUser(format!("listening on {}: {e}", socket.display())))?;
    daemon
        .start(&mut listener)
        .map_err(|e| VmmError::VhostUser(format!("accepting the front-end: {e}")))?;
    let result = daemon.wait();
    // The library's threads end on their exit events; without them dropping the daemon hangs.
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    match result {
        Ok(()) => Ok(()),
        Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => Ok(()),
        Err(e) => Err(VmmError::VhostUser(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_storage::io::memory::MemoryDevice;
    use vm_memory::{Address, Bytes, GuestAddress};

    use crate::blk::DiskOptions;

    /// A ring of 16 in guest memory at `base` with one GET_ID chain (header, 20-byte buffer,
    /// status) available.
    fn ring_with_get_id(mem: &GuestMemoryAtomic<GuestMemoryMmap>, base: u64) -> Vring {
        let m = mem.memory();
        let (desc, avail, used, hdr, buf, status) = (
            base,
            base + 0x1000,
            base + 0x2000,
            base + 0x3000,
            base + 0x3100,
            base + 0x3200,
        );
        let mut h = [0u8; 16];
        h[0] = 8; // GET_ID
        m.write_slice(&h, GuestAddress(hdr)).unwrap();
        for (i, (addr, len, flags)) in [(hdr, 16u32, 1u16), (buf, 20, 1 | 2), (status, 1, 2)]
            .into_iter()
            .enumerate()
        {
            let at = GuestAddress(desc + 16 * i as u64);
            m.write_obj(addr, at).unwrap();
            m.write_obj(len, at.unchecked_add(8)).unwrap();
            m.write_obj(flags, at.unchecked_add(12)).unwrap();
            m.write_obj(i as u16 + 1, at.unchecked_add(14)).unwrap();
        }
        m.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
        m.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
        m.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let vring = Vring::new(mem.clone(), 16).unwrap();
        vring.set_queue_size(16);
        vring.set_queue_info(desc, avail, used).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        vring
    }

    /// Each library thread owns one queue and numbers its kick 0: a kick on thread 1 must run
    /// queue 1's engine and complete into queue 1's ring.
    #[test]
    fn a_kick_on_a_queues_thread_is_served_by_that_queues_engine() {
        let opts = DiskOptions {
            num_queues: 2,
            serial: "mq-serial".into(),
            ..DiskOptions::default()
        };
        let cfg = Arc::new(BlkConfig::new(MemoryDevice::new(1 << 20), &opts).unwrap());
        let backend = BlkBackend::new(cfg).unwrap();
        let mmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mem = GuestMemoryAtomic::new(mmap);
        backend.update_memory(mem.clone()).unwrap();
        let q1 = ring_with_get_id(&mem, 0x10_000);
        backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&q1), 1)
            .unwrap();
        let requests: Vec<u64> = backend
            .engines
            .iter()
            .map(|e| e.lock().unwrap().stats().requests)
            .collect();
        assert_eq!(requests, vec![0, 1], "the request went to the wrong engine");
        assert_eq!(q1.queue_used_idx().unwrap(), 1);
        let m = mem.memory();
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(0x13_200)).unwrap(),
            0,
            "status"
        );
        let mut id = [0u8; 9];
        m.read_slice(&mut id, GuestAddress(0x13_100)).unwrap();
        assert_eq!(&id, b"mq-serial");
        // An event number that is neither the thread's kick nor its completions is ignored.
        backend
            .handle_event(7, EventSet::IN, std::slice::from_ref(&q1), 1)
            .unwrap();
        assert_eq!(backend.engines[1].lock().unwrap().stats().requests, 1);
    }
}

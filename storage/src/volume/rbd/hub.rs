//! Completion routing for one open RBD image: librbd's event notification, fanned out to the
//! image's queues.
//!
//! librbd signals one eventfd per image (`rbd_set_image_notification`) and hands completions out
//! through `rbd_poll_io_events`, whichever queue they belong to. Each completion carries its
//! queue's number and slot in its argument. Whoever reads the image's eventfd "pumps": it polls
//! the finished completions, keeps its own and moves the others into their queues' inboxes,
//! waking each queue's eventfd.
//!
//! - A queue opened without an eventfd (convert, backup, benchmarks) pumps in `reap` and `wait`
//!   itself: librbd's thread writes the image eventfd and the waiting consumer wakes directly.
//! - A queue opened with the consumer's eventfd (the VMM's virtio workers) must be woken through
//!   that descriptor, so the hub starts one pump thread that waits on the image eventfd and
//!   forwards; it runs while the hub exists.
//!
//! Two pumpers at once are fine: librbd hands each completion to exactly one poller.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::ffi::{self, check, CompletionT};
use super::image::Image;
use crate::error::{Result, StorageError};

/// A finished librbd operation: the slot it ran in and librbd's return value.
#[derive(Clone, Copy, Debug)]
pub(super) struct Done {
    pub slot: u32,
    pub ret: isize,
}

/// Completions routed to one queue, and the eventfd that wakes its consumer.
#[derive(Debug)]
pub(super) struct Inbox {
    pub done: Mutex<Vec<Done>>,
    pub wake: Arc<EventFd>,
}

/// Completions polled per `rbd_poll_io_events` call.
const POLL_BATCH: usize = 64;

/// See the module documentation.
pub(super) struct Hub {
    // Declared before `event`: the image is closed before the eventfd it signals.
    image: Image,
    event: EventFd,
    size: AtomicU64,
    inboxes: Mutex<HashMap<u32, Arc<Inbox>>>,
    next_queue: AtomicU32,
    pump: Mutex<Option<PumpThread>>,
}

struct PumpThread {
    stop: EventFd,
    thread: JoinHandle<()>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("image", &self.image).finish()
    }
}

impl Hub {
    /// Registers the image's completion eventfd.
    pub fn new(image: Image) -> Result<Arc<Hub>> {
        let event = EventFd::new(EFD_NONBLOCK)
            .map_err(|e| StorageError::io("Creating an eventfd for an RBD image", e))?;
        // SAFETY: valid image handle and an eventfd that lives as long as the image (the hub
        // owns both and closes the image first).
        let r = unsafe {
            (image.api().rbd_set_image_notification)(
                image.raw(),
                event.as_raw_fd(),
                ffi::EVENT_TYPE_EVENTFD,
            )
        };
        check(r, || format!("Event notification for {image:?}"))?;
        let size = image.size()?;
        Ok(Arc::new(Hub {
            image,
            event,
            size: AtomicU64::new(size),
            inboxes: Mutex::new(HashMap::new()),
            next_queue: AtomicU32::new(0),
            pump: Mutex::new(None),
        }))
    }

    pub fn image(&self) -> &Image {
        &self.image
    }

    /// The image size as last read (requests are checked against it).
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Release);
    }

    pub fn event_fd(&self) -> i32 {
        self.event.as_raw_fd()
    }

    /// Registers a queue whose consumer `wake` wakes; returns its number and inbox.
    pub fn add_queue(&self, wake: Arc<EventFd>) -> (u32, Arc<Inbox>) {
        let id = self.next_queue.fetch_add(1, Ordering::Relaxed);
        let inbox = Arc::new(Inbox {
            done: Mutex::new(Vec::new()),
            wake,
        });
        self.lock_inboxes().insert(id, inbox.clone());
        (id, inbox)
    }

    pub fn remove_queue(&self, id: u32) {
        self.lock_inboxes().remove(&id);
    }

    fn lock_inboxes(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Inbox>>> {
        crate::sync::lock(&self.inboxes)
    }

    /// Collects every finished completion: those of queue `own` go to `mine`, the others to
    /// their inboxes (`scratch` is reusable space for them).
    pub fn pump(&self, own: Option<u32>, mine: &mut Vec<Done>, scratch: &mut Vec<(u32, Done)>) {
        // Reset the eventfd before polling: a completion that lands after the poll signals it
        // again, so none is missed.
        let _ = self.event.read();
        let api = self.image.api();
        let mut comps: [CompletionT; POLL_BATCH] = [std::ptr::null_mut(); POLL_BATCH];
        loop {
            // SAFETY: valid image handle; `comps` has room for POLL_BATCH completions.
            let n = unsafe {
                (api.rbd_poll_io_events)(self.image.raw(), comps.as_mut_ptr(), POLL_BATCH as i32)
            };
            if n <= 0 {
                break;
            }
            for &c in &comps[..n as usize] {
                // SAFETY: `c` is a finished completion librbd handed us; it is released once.
                let (arg, ret) = unsafe {
                    let arg = (api.rbd_aio_get_arg)(c) as usize as u64;
                    let ret = (api.rbd_aio_get_return_value)(c);
                    (api.rbd_aio_release)(c);
                    (arg, ret)
                };
                let (queue, slot) = ((arg >> 32) as u32, arg as u32);
                let done = Done { slot, ret };
                if Some(queue) == own {
                    mine.push(done);
                } else {
                    scratch.push((queue, done));
                }
            }
            if (n as usize) < POLL_BATCH {
                break;
            }
        }
        if scratch.is_empty() {
            return;
        }
        scratch.sort_unstable_by_key(|(q, _)| *q);
        let inboxes = self.lock_inboxes();
        for run in scratch.chunk_by(|a, b| a.0 == b.0) {
            let q = run[0].0;
            match inboxes.get(&q) {
                Some(inbox) => {
                    crate::sync::lock(&inbox.done).extend(run.iter().map(|(_, d)| *d));
                    let _ = inbox.wake.write(1);
                }
                // Cannot happen: a queue leaves only after its last completion.
                None => tracing::error!(queue = q, "an RBD completion for a closed queue"),
            }
        }
        scratch.clear();
    }

    /// Starts the pump thread if it is not running.
    pub fn ensure_pump(self: &Arc<Hub>) -> Result<()> {
        let mut pump = crate::sync::lock(&self.pump);
        if pump.is_some() {
            return Ok(());
        }
        let err = |e| StorageError::io("Starting the RBD completion thread", e);
        let stop = EventFd::new(EFD_NONBLOCK).map_err(err)?;
        let stop_fd = stop.try_clone().map_err(err)?;
        let event = self.event.try_clone().map_err(err)?;
        let hub = Arc::downgrade(self);
        let thread = std::thread::Builder::new()
            .name("rbd-completions".into())
            .spawn(move || pump_loop(hub, event, stop_fd))
            .map_err(err)?;
        *pump = Some(PumpThread { stop, thread });
        Ok(())
    }
}

fn pump_loop(hub: Weak<Hub>, event: EventFd, stop: EventFd) {
    let mut fds = [
        libc::pollfd {
            fd: event.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let (mut mine, mut scratch) = (Vec::new(), Vec::new());
    loop {
        // SAFETY: two valid pollfd entries.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %std::io::Error::last_os_error(), "the RBD completion thread stops");
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        let Some(hub) = hub.upgrade() else { return };
        hub.pump(None, &mut mine, &mut scratch);
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let pump = self
            .pump
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(p) = pump {
            let _ = p.stop.write(1);
            // The pump thread may itself drop the last reference; it must not join itself.
            if p.thread.thread().id() != std::thread::current().id() {
                let _ = p.thread.join();
            }
        }
    }
}

//! One virtqueue's worth of virtio-blk: requests from the avail ring to an [`IoQueue`], and
//! completions back to the used ring.
//!
//! A [`QueueEngine`] owns one I/O queue of the disk (opened with the engine's completion eventfd)
//! and a table of in-flight requests indexed by the I/O tag. Whoever drives it (the VMM's worker
//! thread, the vhost-user backend's thread) calls [`QueueEngine::process_avail`] when the driver
//! kicks and [`QueueEngine::process_completions`] when the completion eventfd fires; both return
//! whether the driver must be interrupted (EVENT_IDX decides), and the caller signals through its
//! [`Signal`].
//!
//! Bounds: at most `queue_size` requests are in flight (the table's size); when the table or the
//! I/O queue is full, the engine stops taking chains until completions free room, so a guest can
//! neither grow our memory nor make us spin.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use strata_storage::io::{Completion, IoQueue, QueueOptions, Request};
use strata_storage::StorageError;
use tracing::warn;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::chain::{self, BlkOp, Parsed, SharedMemory};
use super::config::BlkConfig;
use super::status;
use crate::ratelimit::LogLimiter;

/// A queue that works on more requests at a time than [`DEEP_FROM`] hands them to the I/O queue
/// in fours (the rest of a burst at the end of `process_avail`); a shallower one in pairs.
///
/// A submission of more than two entries is plugged, so the host's disk is notified once for
/// four requests rather than once a request. In November, whole bursts in one `io_uring_enter`
/// measured 20–25% slower at depth 32 than pairs, because the disk saw none of the burst until
/// all of it had been through the block layer, and pairs were chosen.
///
/// Since the worker polls before it sleeps (`super::poll`), fours measured faster than pairs at
/// depth 32 and slower below it. These are `vmm_datapath` figures from 2026-12-08, in
/// benches/RESULTS.md.
/// - Depth 32, our device alone: raw 156–175k IOPS in fours against 137–148k in pairs, qcow2
///   151–178k against 105–125k.
/// - Depth 32, full runs against fio: qcow2 1.11× and 1.24× in fours against 0.87× in pairs.
/// - Depths 4, 8 and 16: 7%, 10% and 5% slower in fours.
const SUBMIT_BATCH: usize = 4;

/// The submission batch of a queue working on at most [`DEEP_FROM`] requests at a time.
const SHALLOW_SUBMIT_BATCH: usize = 2;

/// Above this working depth, requests go down in [`SUBMIT_BATCH`]es.
const DEEP_FROM: usize = 16;

pub use crate::transport::Signal;

/// Counters for one queue, for benchmarks and the exit-per-request figure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Chains taken from the avail ring.
    pub requests: u64,
    /// Requests completed with a non-OK status or a zero used length.
    pub errors: u64,
    /// Times the engine asked for the driver to be interrupted.
    pub interrupts: u64,
}

/// An in-flight request: where its answer goes.
#[derive(Clone, Copy, Debug)]
struct Slot {
    head: u16,
    status_addr: GuestAddress,
    used_len: u32,
    /// Given up by [`QueueEngine::abandon_in_flight`]: its completion only frees the slot.
    abandoned: bool,
}

/// The virtio-blk engine for one virtqueue. See the module documentation.
#[derive(Debug)]
pub struct QueueEngine {
    name: String,
    cfg: Arc<BlkConfig>,
    io: Box<dyn IoQueue>,
    notifier: Arc<EventFd>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    deferred: VecDeque<Request>,
    completions: Vec<Completion>,
    limiter: LogLimiter,
    stats: QueueStats,
    /// `process_avail` left chains in the ring with notifications off.
    stalled: bool,
    /// Requests that were in flight when the last completion run found something to reap.
    depth_at_completion: usize,
}

impl QueueEngine {
    /// Opens an I/O queue on the disk for virtqueue `name`, with a completion eventfd of its own
    /// (see [`QueueEngine::completion_fd`]).
    pub fn new(
        name: impl Into<String>,
        cfg: Arc<BlkConfig>,
    ) -> strata_storage::Result<QueueEngine> {
        let notifier = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| StorageError::io("Creating a completion eventfd", e))?,
        );
        let depth = usize::from(cfg.queue_size());
        let io = cfg.disk().open_queue(
            &QueueOptions::with_depth(depth)
                .batch(SUBMIT_BATCH)
                .notify(notifier.clone()),
        )?;
        Ok(QueueEngine {
            name: name.into(),
            cfg,
            io,
            notifier,
            slots: vec![None; depth],
            free: (0..depth).rev().collect(),
            deferred: VecDeque::new(),
            completions: Vec::with_capacity(depth),
            limiter: LogLimiter::for_guest_errors(),
            stats: QueueStats::default(),
            stalled: false,
            depth_at_completion: 0,
        })
    }

    /// The completion eventfd to wait on.
    pub fn completion_fd(&self) -> &Arc<EventFd> {
        &self.notifier
    }

    /// Counters so far.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// Whether chains may be waiting in the avail ring that no kick will announce (the engine
    /// stopped taking them for lack of room, or at its pass limit) while there is room again:
    /// the caller must call [`QueueEngine::process_avail`] again without waiting for a kick.
    pub fn wants_rerun(&self) -> bool {
        self.stalled && !self.free.is_empty() && self.deferred.is_empty()
    }

    /// Gives up the requests in flight (their ring is being stopped and they did not finish in
    /// time): when they complete, their slots are freed but nothing is written to guest memory
    /// or to the used ring, which may by then belong to a restarted queue. Requests the engine
    /// has not submitted yet are dropped.
    pub fn abandon_in_flight(&mut self) {
        for slot in self.slots.iter_mut().flatten() {
            slot.abandoned = true;
        }
        for req in self.deferred.drain(..) {
            if let Ok(tag) = usize::try_from(req.tag) {
                if let Some(s) = self.slots.get_mut(tag) {
                    if s.take().is_some() {
                        self.free.push(tag);
                    }
                }
            }
        }
        self.stalled = false;
    }

    /// The longest its worker polls before it sleeps.
    pub fn poll_max(&self) -> std::time::Duration {
        self.cfg.poll_max()
    }

    /// How many requests the queue works on at a time: the requests in flight now, or when the
    /// last completion run began, whichever is more.
    pub fn working_depth(&self) -> usize {
        self.in_flight().max(self.depth_at_completion)
    }

    /// Requests in flight in the block layer.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Takes every available chain (as room allows), submits the requests, and completes the
    /// ones that fail validation. Returns whether the driver must be interrupted.
    pub fn process_avail(&mut self, queue: &mut Queue, mem: &SharedMemory) -> bool {
        let mut used_any = false;
        // Until the ring is seen empty with notifications on, chains may be waiting that no kick
        // will announce.
        self.stalled = true;
        if !self.resubmit_deferred() {
            return false;
        }
        // Bounded: each pass takes at most `slots.len()` chains, and another pass only happens
        // when the driver added chains while we were re-enabling notifications. Leaving after
        // the last pass keeps `stalled` set, and the caller comes back (see `wants_rerun`).
        let mut taken = 0usize;
        for _pass in 0..4 {
            if queue.event_idx_enabled() {
                let _ = queue.disable_notification(mem.as_ref());
            }
            while self.deferred.is_empty() {
                let Some(tag) = self.free.pop() else {
                    break;
                };
                let Some(chain) = queue.pop_descriptor_chain(mem.as_ref()) else {
                    self.free.push(tag);
                    break;
                };
                let head = chain.head_index();
                self.stats.requests += 1;
                self.cfg.counters().requests.fetch_add(1, Ordering::Relaxed);
                let parsed = chain::parse(chain, mem, &self.cfg);
                used_any |= self.start(queue, mem, head, parsed, tag);
                taken += 1;
                if taken % SHALLOW_SUBMIT_BATCH == 0 && self.working_depth() <= DEEP_FROM {
                    self.commit();
                }
            }
            if self.free.is_empty() || !self.deferred.is_empty() {
                break; // Completions will bring us back.
            }
            match queue.enable_notification(mem.as_ref()) {
                Ok(true) => continue,
                Ok(false) => {
                    self.stalled = false;
                    break;
                }
                Err(e) => {
                    // The ring is unusable until the driver resets it: do not spin on it.
                    self.log(format_args!("cannot enable notifications: {e}"));
                    self.stalled = false;
                    break;
                }
            }
        }
        self.commit();
        let mut interrupt = used_any && self.needs_interrupt(queue, mem);
        // Requests a device completes while they are submitted (without I/O below it) may not
        // signal the completion eventfd; take them now rather than wait for a signal.
        if self.in_flight() > 0 {
            interrupt |= self.complete_ready(queue, mem, false);
        }
        interrupt
    }

    /// Hands what was submitted to the I/O queue's engine now.
    fn commit(&mut self) {
        if let Err(e) = self.io.commit() {
            self.log(format_args!("committing I/O failed: {e}"));
        }
    }

    /// Reaps finished I/O, writes statuses and used entries, then takes more chains if room was
    /// made. Returns whether the driver must be interrupted.
    pub fn process_completions(&mut self, queue: &mut Queue, mem: &SharedMemory) -> bool {
        let _ = self.notifier.read();
        self.complete_ready(queue, mem, true)
    }

    /// Completes what the I/O queue has ready; with `refill`, takes more chains if that made
    /// room. Returns whether the driver must be interrupted.
    fn complete_ready(&mut self, queue: &mut Queue, mem: &SharedMemory, refill: bool) -> bool {
        let was_full = self.stalled || self.free.is_empty() || !self.deferred.is_empty();
        let mut done = std::mem::take(&mut self.completions);
        self.io.reap(&mut done);
        let used_any = !done.is_empty();
        if used_any {
            self.depth_at_completion = self.in_flight();
        }
        for c in done.drain(..) {
            let Some(slot) = usize::try_from(c.tag)
                .ok()
                .and_then(|i| self.slots.get_mut(i))
                .and_then(Option::take)
            else {
                continue;
            };
            self.free.push(c.tag as usize);
            if slot.abandoned {
                continue; // Its ring was given up; the buffer goes back with `c`.
            }
            let (st, len) = match &c.result {
                Ok(n) => {
                    self.cfg.counters().bytes.fetch_add(*n, Ordering::Relaxed);
                    (status::OK, slot.used_len)
                }
                Err(e) => {
                    self.stats.errors += 1;
                    self.cfg.counters().errors.fetch_add(1, Ordering::Relaxed);
                    self.log(format_args!("request failed: {e}"));
                    (status_of(e), 1)
                }
            };
            drop(c); // Hands the guest-memory buffer back before the driver sees the entry.
            self.finish(queue, mem, slot.head, slot.status_addr, st, len);
        }
        self.completions = done;
        let mut interrupt = used_any && self.needs_interrupt(queue, mem);
        if was_full && refill {
            interrupt |= self.process_avail(queue, mem);
        }
        interrupt
    }

    /// Starts one parsed chain in slot `tag`; returns whether it was completed at once (and
    /// the slot given back).
    fn start(
        &mut self,
        queue: &mut Queue,
        mem: &SharedMemory,
        head: u16,
        parsed: Parsed,
        tag: usize,
    ) -> bool {
        let req = match parsed {
            Parsed::Run(req) => req,
            Parsed::Fail {
                status,
                status_addr,
                reason,
            } => {
                self.free.push(tag);
                self.stats.errors += 1;
                self.log(format_args!("bad request (head {head}): {reason}"));
                self.finish(queue, mem, head, status_addr, status, 1);
                return true;
            }
            Parsed::Broken { reason } => {
                self.free.push(tag);
                self.stats.errors += 1;
                self.log(format_args!("malformed chain (head {head}): {reason}"));
                self.add_used(queue, mem, head, 0);
                return true;
            }
        };
        let io_req = match req.op {
            BlkOp::Read { offset, buf } => Request::read(tag as u64, offset, buf),
            BlkOp::Write { offset, buf } => Request::write(tag as u64, offset, buf),
            BlkOp::Flush => Request::flush(tag as u64),
            BlkOp::Discard { offset, len } => Request::discard(tag as u64, offset, len),
            BlkOp::WriteZeroes { offset, len, unmap } => {
                Request::write_zeroes(tag as u64, offset, len, unmap)
            }
            BlkOp::GetId { dst } => {
                self.free.push(tag);
                let serial = *self.cfg.serial();
                let mut at = 0;
                let mut st = status::OK;
                for (addr, n) in dst {
                    if mem.write_slice(&serial[at..at + n], addr).is_err() {
                        st = status::IOERR;
                    }
                    at += n;
                }
                self.finish(queue, mem, head, req.status_addr, st, req.used_len);
                return true;
            }
        };
        self.slots[tag] = Some(Slot {
            head,
            status_addr: req.status_addr,
            used_len: req.used_len,
            abandoned: false,
        });
        if let Err(full) = self.io.submit(io_req) {
            self.deferred.push_back(full.0);
        }
        false
    }

    /// Retries requests the I/O queue refused; returns whether all went in.
    fn resubmit_deferred(&mut self) -> bool {
        while let Some(req) = self.deferred.pop_front() {
            if let Err(full) = self.io.submit(req) {
                self.deferred.push_front(full.0);
                return false;
            }
        }
        true
    }

    fn finish(
        &mut self,
        queue: &mut Queue,
        mem: &SharedMemory,
        head: u16,
        status_addr: GuestAddress,
        st: u8,
        len: u32,
    ) {
        // The address was checked when the chain was parsed; guest memory does not shrink while
        // a queue runs, so a failure here is only logged.
        if mem.write_obj(st, status_addr).is_err() {
            self.log(format_args!(
                "status byte at {status_addr:?} became unwritable"
            ));
        }
        self.add_used(queue, mem, head, len);
    }

    fn add_used(&mut self, queue: &mut Queue, mem: &SharedMemory, head: u16, len: u32) {
        if let Err(e) = queue.add_used(mem.as_ref(), head, len) {
            self.log(format_args!("cannot add used entry {head}: {e}"));
        }
    }

    fn needs_interrupt(&mut self, queue: &mut Queue, mem: &SharedMemory) -> bool {
        let needed = queue.needs_notification(mem.as_ref()).unwrap_or(true);
        if needed {
            self.stats.interrupts += 1;
        }
        needed
    }

    fn log(&mut self, args: std::fmt::Arguments<'_>) {
        if let Some(suppressed) = self.limiter.check() {
            if suppressed > 0 {
                warn!(queue = %self.name, suppressed, "{args}");
            } else {
                warn!(queue = %self.name, "{args}");
            }
        }
    }
}

/// The virtio status for a block-layer error: UNSUPP for what the disk cannot do, IOERR for
/// everything else (a full thin pool included: the guest sees an I/O error on that request).
pub fn status_of(e: &StorageError) -> u8 {
    match e {
        StorageError::Unsupported(_) => status::UNSUPP,
        _ => status::IOERR,
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;

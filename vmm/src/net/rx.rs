//! The receive virtqueue: frames read from the tap into a bounce buffer, filtered, then copied
//! into the guest's buffers — one chain per frame, or as many as it takes with `MRG_RXBUF`
//! (`num_buffers` in the header says how many).
//!
//! Bounds: the bounce buffer holds one frame of at most [`MAX_FRAME`] bytes; a chain has at most
//! [`MAX_CHAIN_DESCRIPTORS`] descriptors, all device-writable; a frame takes at most
//! [`MAX_MERGED`] chains. A chain that breaks these rules is returned with used length 0 and the
//! frame is dropped (counted). When the guest has no buffers the frame waits in the bounce
//! buffer and the tap is not read until the guest adds some (its kick wakes the worker). One
//! call delivers at most [`BUDGET`] frames.

use std::sync::Arc;
use std::time::Instant;

use tracing::warn;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;

use super::bucket::TokenBucket;
use super::chain::{collect, Piece};
use super::config::NetCounters;
use super::filter::{RxFilter, SharedFilter};
use super::hdr::fix_rx_header;
use super::tap::TapIo;
use super::{features, HDR_LEN, MAX_CHAIN_DESCRIPTORS, MAX_FRAME, MIN_FRAME};
use crate::blk::chain::SharedMemory;
use crate::ratelimit::LogLimiter;

/// Most frames one call delivers.
pub const BUDGET: usize = 256;
/// Most chains one frame may take with `MRG_RXBUF`.
pub const MAX_MERGED: usize = 256;

/// Why a call returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The tap has nothing more.
    Idle,
    /// A frame waits and the guest has no buffers (notifications are on).
    NoBuffers,
    /// The rate limit holds frames back: call again after this long.
    Throttled(std::time::Duration),
    /// The budget ran out: call again soon.
    More,
}

/// One receive queue's engine.
#[derive(Debug)]
pub struct RxEngine {
    features: u64,
    buf: Vec<u8>,
    /// Length of the frame (header included) waiting in `buf`.
    pending: Option<usize>,
    pieces: Vec<Piece>,
    /// The chains taken for the frame being delivered: (head, range in `flat`).
    chains: Vec<(u16, usize, usize)>,
    flat: Vec<Piece>,
    filter: (u64, RxFilter),
    bucket: Option<TokenBucket>,
    counters: Arc<NetCounters>,
    limiter: LogLimiter,
}

impl RxEngine {
    /// An engine for the negotiated `features`, limited to `rate` bytes per second if given.
    pub fn new(features: u64, rate: Option<u64>, counters: Arc<NetCounters>) -> RxEngine {
        RxEngine {
            features,
            buf: vec![0; HDR_LEN + MAX_FRAME],
            pending: None,
            pieces: Vec::with_capacity(MAX_CHAIN_DESCRIPTORS),
            chains: Vec::new(),
            flat: Vec::new(),
            filter: (0, RxFilter::new([0; 6])),
            bucket: rate.map(|r| TokenBucket::new(r, Instant::now())),
            counters,
            limiter: LogLimiter::for_guest_errors(),
        }
    }

    /// Whether a frame waits for guest buffers.
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Moves frames from the tap to the guest; returns whether to interrupt the driver, and
    /// why it stopped.
    pub fn process(
        &mut self,
        queue: &mut Queue,
        mem: &SharedMemory,
        tap: &dyn TapIo,
        filter: &SharedFilter,
    ) -> (bool, Outcome) {
        filter.current(&mut self.filter);
        let mut used = false;
        let outcome = self.run(queue, mem, tap, &mut used);
        let interrupt = used && queue.needs_notification(mem.as_ref()).unwrap_or(true);
        (interrupt, outcome)
    }

    fn run(
        &mut self,
        queue: &mut Queue,
        mem: &SharedMemory,
        tap: &dyn TapIo,
        used: &mut bool,
    ) -> Outcome {
        if queue.event_idx_enabled() {
            let _ = queue.disable_notification(mem.as_ref());
        }
        for _ in 0..BUDGET {
            let len = match self.pending {
                Some(len) => len,
                None => {
                    if let Some(b) = self.bucket.as_mut() {
                        if let Err(wait) = b.check(Instant::now()) {
                            return Outcome::Throttled(wait);
                        }
                    }
                    match tap.read_frame(&mut self.buf) {
                        Ok(n) if n < HDR_LEN + MIN_FRAME => {
                            NetCounters::add(&self.counters.rx_dropped, 1);
                            continue;
                        }
                        Ok(n) => {
                            if !self.filter.1.accepts(&self.buf[HDR_LEN..n]) {
                                NetCounters::add(&self.counters.rx_dropped, 1);
                                continue;
                            }
                            self.pending = Some(n);
                            n
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        // WouldBlock, or a detached queue: nothing to read.
                        Err(_) => return Outcome::Idle,
                    }
                }
            };
            match self.deliver(queue, mem, len, used) {
                Delivery::Done => {
                    self.pending = None;
                    let bytes = (len - HDR_LEN) as u64;
                    NetCounters::add(&self.counters.rx_frames, 1);
                    NetCounters::add(&self.counters.rx_bytes, bytes);
                    if let Some(b) = self.bucket.as_mut() {
                        b.take(bytes);
                    }
                }
                Delivery::Dropped => {
                    self.pending = None;
                    NetCounters::add(&self.counters.rx_dropped, 1);
                }
                Delivery::NoBuffers => match queue.enable_notification(mem.as_ref()) {
                    Ok(true) => continue,
                    Ok(false) => return Outcome::NoBuffers,
                    Err(e) => {
                        self.log(format_args!("cannot enable notifications: {e}"));
                        return Outcome::NoBuffers;
                    }
                },
            }
        }
        Outcome::More
    }

    /// Copies the frame of `len` bytes in `buf` into guest buffers.
    fn deliver(
        &mut self,
        queue: &mut Queue,
        mem: &SharedMemory,
        len: usize,
        used: &mut bool,
    ) -> Delivery {
        let merge = self.features & features::MRG_RXBUF != 0;
        let max_chains = if merge { MAX_MERGED } else { 1 };
        self.chains.clear();
        self.flat.clear();
        let mut room = 0u64;
        while room < len as u64 {
            if self.chains.len() == max_chains {
                // Not enough room in as many buffers as a frame may take: give them back empty
                // and drop the frame.
                self.give_back_empty(queue, mem, used);
                self.log(format_args!(
                    "receive buffers too small for a {len}-byte frame"
                ));
                return Delivery::Dropped;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem.as_ref()) else {
                // Wait for more buffers with these ones back in the ring.
                for _ in 0..self.chains.len() {
                    queue.go_to_previous_position();
                }
                self.chains.clear();
                return Delivery::NoBuffers;
            };
            let head = chain.head_index();
            match collect(chain, true, &mut self.pieces) {
                Ok(total) => {
                    room += total;
                    let start = self.flat.len();
                    self.flat.extend_from_slice(&self.pieces);
                    self.chains.push((head, start, self.flat.len()));
                }
                Err(reason) => {
                    self.log(format_args!("bad receive chain (head {head}): {reason}"));
                    self.add_used(queue, mem, head, 0, used);
                    if !self.chains.is_empty() {
                        // The good chains before it cannot go back to the ring (the bad one
                        // is used now, behind them): return them empty and drop the frame.
                        self.give_back_empty(queue, mem, used);
                        return Delivery::Dropped;
                    }
                }
            }
        }
        let count = self.chains.len() as u16;
        fix_rx_header(&mut self.buf[..HDR_LEN], self.features, count);
        let mut at = 0usize;
        let chains = std::mem::take(&mut self.chains);
        let mut failed = false;
        for &(head, first, end) in &chains {
            let start = at;
            for p in &self.flat[first..end] {
                if at == len {
                    break;
                }
                let n = (p.len as usize).min(len - at);
                if mem.write_slice(&self.buf[at..at + n], p.addr).is_err() {
                    failed = true;
                    break;
                }
                at += n;
            }
            let written = if failed { 0 } else { (at - start) as u32 };
            self.add_used(queue, mem, head, written, used);
        }
        self.chains = chains;
        self.chains.clear();
        if failed {
            self.log(format_args!("a receive buffer is outside guest memory"));
            return Delivery::Dropped;
        }
        Delivery::Done
    }

    fn give_back_empty(&mut self, queue: &mut Queue, mem: &SharedMemory, used: &mut bool) {
        let chains = std::mem::take(&mut self.chains);
        for &(head, _, _) in &chains {
            self.add_used(queue, mem, head, 0, used);
        }
        self.chains = chains;
        self.chains.clear();
    }

    fn add_used(
        &mut self,
        queue: &mut Queue,
        mem: &SharedMemory,
        head: u16,
        len: u32,
        used: &mut bool,
    ) {
        if let Err(e) = queue.add_used(mem.as_ref(), head, len) {
            self.log(format_args!("cannot add used entry {head}: {e}"));
        }
        *used = true;
    }

    fn log(&mut self, args: std::fmt::Arguments<'_>) {
        if let Some(suppressed) = self.limiter.check() {
            warn!(suppressed, "virtio-net: {args}");
        }
    }
}

enum Delivery {
    Done,
    Dropped,
    NoBuffers,
}

//! The transmit virtqueue: chains from the guest, checked and copied into a frame buffer, then
//! written to the tap with a rebuilt virtio header.
//!
//! Bounds: a chain has at most [`MAX_CHAIN_DESCRIPTORS`] descriptors and at most
//! [`HDR_LEN`] + [`MAX_FRAME`] bytes, all device-readable; anything else is returned unsent
//! (used length 0) and counted. One call takes at most [`BUDGET`] chains, so that the receive
//! side gets its turn; a frame the tap cannot take now waits for the tap to become writable.

use std::time::Instant;

use tracing::warn;
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;

use super::bucket::TokenBucket;
use super::chain::{collect, Piece};
use super::config::NetCounters;
use super::hdr::TxHeader;
use super::tap::TapIo;
use super::{HDR_LEN, MAX_CHAIN_DESCRIPTORS, MAX_FRAME, MIN_FRAME};
use crate::blk::chain::SharedMemory;
use crate::ratelimit::LogLimiter;

/// Most chains one call takes.
pub const BUDGET: usize = 256;

/// Why a call returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The ring is empty (notifications are on).
    Idle,
    /// The tap cannot take a frame now: call again when it is writable.
    Blocked,
    /// The rate limit holds frames back: call again after this long.
    Throttled(std::time::Duration),
    /// The budget ran out: call again soon.
    More,
}

/// One transmit queue's engine.
#[derive(Debug)]
pub struct TxEngine {
    features: u64,
    buf: Vec<u8>,
    pieces: Vec<Piece>,
    /// A frame in `buf` the tap refused with EAGAIN: (head, length).
    pending: Option<(u16, usize)>,
    bucket: Option<TokenBucket>,
    counters: std::sync::Arc<NetCounters>,
    limiter: LogLimiter,
}

impl TxEngine {
    /// An engine for the negotiated `features`, limited to `rate` bytes per second if given.
    pub fn new(
        features: u64,
        rate: Option<u64>,
        counters: std::sync::Arc<NetCounters>,
    ) -> TxEngine {
        TxEngine {
            features,
            buf: vec![0; HDR_LEN + MAX_FRAME],
            pieces: Vec::with_capacity(MAX_CHAIN_DESCRIPTORS),
            pending: None,
            bucket: rate.map(|r| TokenBucket::new(r, Instant::now())),
            counters,
            limiter: LogLimiter::for_guest_errors(),
        }
    }

    /// Sends what the guest queued; returns whether to interrupt the driver, and why it stopped.
    pub fn process(
        &mut self,
        queue: &mut Queue,
        mem: &SharedMemory,
        tap: &dyn TapIo,
    ) -> (bool, Outcome) {
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
        if let Some((head, len)) = self.pending {
            match self.send(tap, len) {
                Err(Outcome::Blocked) => return Outcome::Blocked,
                _ => {
                    self.pending = None;
                    self.complete(queue, mem, head, used);
                }
            }
        }
        for _ in 0..BUDGET {
            if let Some(b) = self.bucket.as_mut() {
                if let Err(wait) = b.check(Instant::now()) {
                    return Outcome::Throttled(wait);
                }
            }
            if queue.event_idx_enabled() {
                let _ = queue.disable_notification(mem.as_ref());
            }
            let Some(chain) = queue.pop_descriptor_chain(mem.as_ref()) else {
                match queue.enable_notification(mem.as_ref()) {
                    Ok(true) => continue,
                    Ok(false) => return Outcome::Idle,
                    Err(e) => {
                        self.log(format_args!("cannot enable notifications: {e}"));
                        return Outcome::Idle;
                    }
                }
            };
            let head = chain.head_index();
            match self.gather(chain, mem) {
                Ok(len) => match self.send(tap, len) {
                    Err(Outcome::Blocked) => {
                        self.pending = Some((head, len));
                        return Outcome::Blocked;
                    }
                    _ => self.complete(queue, mem, head, used),
                },
                Err(reason) => {
                    NetCounters::add(&self.counters.tx_errors, 1);
                    self.log(format_args!(
                        "dropped a transmit chain (head {head}): {reason}"
                    ));
                    self.complete(queue, mem, head, used);
                }
            }
        }
        Outcome::More
    }

    /// Copies a chain's frame into `buf` with a checked header; returns its length.
    fn gather<I>(&mut self, chain: I, mem: &SharedMemory) -> Result<usize, &'static str>
    where
        I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
    {
        let total = collect(chain, false, &mut self.pieces)?;
        let total = usize::try_from(total).unwrap_or(usize::MAX);
        if total > self.buf.len() {
            return Err("frame longer than the device accepts");
        }
        if total < HDR_LEN + MIN_FRAME {
            return Err("frame shorter than a header and an Ethernet header");
        }
        let mut at = 0;
        for p in &self.pieces {
            let n = p.len as usize;
            mem.read_slice(&mut self.buf[at..at + n], p.addr)
                .map_err(|_| "transmit buffer outside guest memory")?;
            at += n;
        }
        let mut raw = [0u8; HDR_LEN];
        raw.copy_from_slice(&self.buf[..HDR_LEN]);
        let hdr = TxHeader::parse(&raw, total - HDR_LEN, self.features)?;
        self.buf[..HDR_LEN].copy_from_slice(&hdr.to_bytes());
        Ok(total)
    }

    /// Writes `buf[..len]` to the tap: Ok when it went or was dropped for good, Err(Blocked)
    /// when it should be tried again.
    fn send(&mut self, tap: &dyn TapIo, len: usize) -> Result<(), Outcome> {
        match tap.write_frame(&self.buf[..len]) {
            Ok(_) => {
                let bytes = (len - HDR_LEN) as u64;
                NetCounters::add(&self.counters.tx_frames, 1);
                NetCounters::add(&self.counters.tx_bytes, bytes);
                if let Some(b) = self.bucket.as_mut() {
                    b.take(bytes);
                }
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err(Outcome::Blocked),
            Err(e) => {
                // The kernel refused the frame (a header it does not accept, the tap is down).
                NetCounters::add(&self.counters.tx_errors, 1);
                self.log(format_args!("the tap refused a frame: {e}"));
                Ok(())
            }
        }
    }

    fn complete(&mut self, queue: &mut Queue, mem: &SharedMemory, head: u16, used: &mut bool) {
        if let Err(e) = queue.add_used(mem.as_ref(), head, 0) {
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

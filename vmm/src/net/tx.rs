//! The transmit virtqueue: chains from the guest, checked, then written to the tap with a
//! rebuilt virtio header. The header is read once into the device's own buffer; the frame goes
//! from guest memory straight to the tap (`writev`), except for a frame in more than
//! [`MAX_WRITE_PIECES`] pieces or one the tap cannot take now, which is copied into a bounce
//! buffer first.
//!
//! Bounds: a chain has at most [`MAX_CHAIN_DESCRIPTORS`] descriptors and at most
//! [`HDR_LEN`] + [`MAX_FRAME`] bytes, all device-readable; anything else is returned unsent
//! (used length 0) and counted. One call takes at most [`BUDGET`] chains, so that the receive
//! side gets its turn; a frame the tap cannot take now waits for the tap to become writable.

use std::time::Instant;

use tracing::warn;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::bucket::TokenBucket;
use super::chain::{collect, Piece};
use super::config::NetCounters;
use super::hdr::TxHeader;
use super::tap::{TapIo, MAX_WRITE_PIECES};
use super::{HDR_LEN, MAX_CHAIN_DESCRIPTORS, MAX_FRAME, MIN_FRAME};
use crate::blk::chain::{host_segments, SharedMemory};
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
    /// The bounce buffer: header and frame, for frames that cannot go from guest memory.
    buf: Vec<u8>,
    pieces: Vec<Piece>,
    /// The checked header of the frame at hand.
    hdr: [u8; HDR_LEN],
    /// The frame at hand after its header, in guest memory.
    frame: Vec<Piece>,
    /// The same as host (address, length) pieces within `mem`'s regions; empty when the frame
    /// is in `buf`.
    host: Vec<(usize, usize)>,
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
            hdr: [0; HDR_LEN],
            frame: Vec::with_capacity(MAX_CHAIN_DESCRIPTORS),
            host: Vec::with_capacity(MAX_WRITE_PIECES),
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
            match self.send(tap, mem, len) {
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
                Ok(len) => match self.send(tap, mem, len) {
                    Err(Outcome::Blocked) => {
                        // The retry comes in a later call: the frame moves to `buf`.
                        if let Err(reason) = self.bounce(mem) {
                            NetCounters::add(&self.counters.tx_errors, 1);
                            self.log(format_args!("dropped a transmit chain: {reason}"));
                            self.complete(queue, mem, head, used);
                            continue;
                        }
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

    /// Checks a chain: the total length, the header (read into `hdr`, checked and rebuilt)
    /// and where the frame lies (`frame`, and `host` when it can go from guest memory as it
    /// is; else it is copied into `buf`). Returns the length with the header.
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
        let mut raw = [0u8; HDR_LEN];
        let mut filled = 0;
        self.frame.clear();
        for p in &self.pieces {
            let mut piece = *p;
            if filled < HDR_LEN {
                let n = (piece.len as usize).min(HDR_LEN - filled);
                mem.read_slice(&mut raw[filled..filled + n], piece.addr)
                    .map_err(|_| "transmit buffer outside guest memory")?;
                filled += n;
                piece.len -= n as u32;
                piece.addr = GuestAddress(
                    piece
                        .addr
                        .0
                        .checked_add(n as u64)
                        .ok_or("transmit buffer wraps around")?,
                );
            }
            if piece.len > 0 {
                self.frame.push(piece);
            }
        }
        let hdr = TxHeader::parse(&raw, total - HDR_LEN, self.features)?;
        self.hdr = hdr.to_bytes();
        self.map_host(mem)?;
        if self.host.is_empty() && !self.frame.is_empty() {
            self.bounce(mem)?;
        }
        Ok(total)
    }

    /// Fills `host` with the frame's pieces as host addresses, split at memory region ends;
    /// leaves it empty when there would be more than [`MAX_WRITE_PIECES`].
    fn map_host(&mut self, mem: &SharedMemory) -> Result<(), &'static str> {
        self.host.clear();
        for p in &self.frame {
            let host = &mut self.host;
            host_segments(mem, p.addr, p.len as usize, |ptr, n| {
                host.push((ptr as usize, n))
            })
            .map_err(|_| "transmit buffer outside guest memory")?;
        }
        if self.host.len() > MAX_WRITE_PIECES {
            self.host.clear();
        }
        Ok(())
    }

    /// Copies the frame at hand (header and `frame`) into `buf`; `host` is emptied.
    fn bounce(&mut self, mem: &SharedMemory) -> Result<(), &'static str> {
        self.host.clear();
        self.buf[..HDR_LEN].copy_from_slice(&self.hdr);
        let mut at = HDR_LEN;
        for p in &self.frame {
            let n = p.len as usize;
            mem.read_slice(&mut self.buf[at..at + n], p.addr)
                .map_err(|_| "transmit buffer outside guest memory")?;
            at += n;
        }
        Ok(())
    }

    /// Writes the frame at hand (`len` bytes with the header) to the tap, from guest memory
    /// (`host`) or from `buf`: Ok when it went or was dropped for good, Err(Blocked) when it
    /// should be tried again.
    fn send(&mut self, tap: &dyn TapIo, mem: &SharedMemory, len: usize) -> Result<(), Outcome> {
        let result = if self.host.is_empty() {
            tap.write_frame(&self.buf[..len])
        } else {
            // `mem` is borrowed for the call: the regions `host` points into stay mapped.
            let _alive = mem;
            // SAFETY: every piece in `host` was cut by `map_host` to lie within one region of
            // `mem` (`get_slice` refuses ranges that leave a region), and those mappings live
            // as long as `mem`, which outlives this call. The guest may write those bytes
            // meanwhile; that only garbles its own frame (the header is our checked copy).
            unsafe { tap.write_frame_parts(&self.hdr, &self.host) }
        };
        match result {
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

//! A guest-side driver over guest memory for the receive and transmit engines, used by the unit
//! tests, the property test and the fuzz target (`fuzz/fuzz_targets/net_rxtx.rs`): it builds
//! descriptor chains (well-formed or not) in split rings, and [`run_ops`] plays a byte string as
//! a sequence of driver and host actions against an in-memory tap, checking the invariants the
//! device must keep whatever the guest does.
//!
//! Compiled for tests and with the `test-utils` feature (the fuzz target).

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::config::NetCounters;
use super::filter::SharedFilter;
use super::hdr::TxHeader;
use super::rx::RxEngine;
use super::tap::MemoryTap;
use super::tx::TxEngine;
use super::{features, HDR_LEN, MAX_FRAME, MIN_FRAME};
use crate::blk::chain::SharedMemory;

/// Guest memory of the harness.
pub const MEM_SIZE: u64 = 4 << 20;
/// Where buffers go.
pub const DATA: u64 = 0x10_0000;
/// Guest memory between the rings and the buffers, which no chain points into.
const GUARD: u64 = 0x8000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// One split ring as the driver sees it.
#[derive(Debug)]
pub struct Ring {
    /// The device's queue.
    pub queue: Queue,
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    free: Vec<u16>,
    chains: std::collections::HashMap<u16, Vec<u16>>,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    /// A ring of `size` entries with its tables at `base` (three pages).
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16, event_idx: bool) -> Ring {
        let mut queue = Queue::new(size).expect("queue size");
        queue.set_size(size);
        queue.set_desc_table_address(Some(base as u32), Some(0));
        queue.set_avail_ring_address(Some((base + 0x1000) as u32), Some(0));
        queue.set_used_ring_address(Some((base + 0x2000) as u32), Some(0));
        queue.set_ready(true);
        queue.set_event_idx(event_idx);
        let _ = mem.write_obj(0u16, GuestAddress(base + 0x1000 + 2));
        let _ = mem.write_obj(0u16, GuestAddress(base + 0x2000 + 2));
        Ring {
            queue,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            size,
            free: (0..size).rev().collect(),
            chains: Default::default(),
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Adds a chain of (address, length, device-writable) on free descriptors and publishes
    /// it; `looped` makes the last descriptor point back at the first. None when the table has
    /// too few free descriptors.
    pub fn add(
        &mut self,
        mem: &GuestMemoryMmap,
        bufs: &[(u64, u32, bool)],
        looped: bool,
    ) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > self.free.len() {
            return None;
        }
        let idx: Vec<u16> = (0..bufs.len()).filter_map(|_| self.free.pop()).collect();
        let head = idx[0];
        for (k, (addr, len, w)) in bufs.iter().enumerate() {
            let last = k + 1 == bufs.len();
            let mut flags = if *w { F_WRITE } else { 0 };
            let next = if last && looped {
                flags |= F_NEXT;
                head
            } else if last {
                0
            } else {
                flags |= F_NEXT;
                idx[k + 1]
            };
            let at = GuestAddress(self.desc + 16 * u64::from(idx[k]));
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            let _ = mem.write_slice(&raw, at);
        }
        self.chains.insert(head, idx);
        let slot = u64::from(self.avail_idx % self.size);
        let _ = mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let _ = mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2));
        Some(head)
    }

    /// Used entries (head, length) not seen before.
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap_or(0);
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % self.size);
            let at = self.used + 4 + 8 * slot;
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap_or(0);
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap_or(0);
            let head = id as u16;
            let descs = self
                .chains
                .remove(&head)
                .expect("the device used a chain it was not given");
            self.free.extend(descs);
            out.push((head, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// Chains published and not yet used.
    pub fn outstanding(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.used_seen)
    }
}

/// The harness: memory, an RX ring, a TX ring, engines and an in-memory tap.
#[derive(Debug)]
pub struct Harness {
    /// Guest memory.
    pub mem: SharedMemory,
    /// The receive ring.
    pub rx: Ring,
    /// The transmit ring.
    pub tx: Ring,
    /// The receive engine.
    pub rx_engine: RxEngine,
    /// The transmit engine.
    pub tx_engine: TxEngine,
    /// The tap.
    pub tap: MemoryTap,
    /// The filter.
    pub filter: SharedFilter,
    /// Counters.
    pub counters: Arc<NetCounters>,
}

impl Harness {
    /// A harness for the negotiated `features`, rings of `size` entries.
    pub fn new(features: u64, size: u16, rate: Option<u64>) -> Harness {
        let mem: SharedMemory = Arc::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
                .expect("guest memory"),
        );
        let event_idx = features & super::features::RING_EVENT_IDX != 0;
        let counters = Arc::new(NetCounters::default());
        Harness {
            rx: Ring::new(&mem, 0, size, event_idx),
            tx: Ring::new(&mem, 0x4000, size, event_idx),
            rx_engine: RxEngine::new(features, rate, counters.clone()),
            tx_engine: TxEngine::new(features, rate, counters.clone()),
            tap: MemoryTap::new().expect("eventfd"),
            filter: SharedFilter::new([0x52, 0x54, 0, 0, 0, 1]),
            counters,
            mem,
        }
    }

    /// Runs the receive engine once.
    pub fn run_rx(&mut self) -> super::rx::Outcome {
        self.rx_engine
            .process(&mut self.rx.queue, &self.mem, &self.tap, &self.filter)
            .1
    }

    /// Runs the transmit engine once.
    pub fn run_tx(&mut self) -> super::tx::Outcome {
        self.tx_engine
            .process(&mut self.tx.queue, &self.mem, &self.tap)
            .1
    }
}

/// A frame of `len` bytes (no header) whose bytes come from `seed`.
pub fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    if len >= 6 {
        f[0..6].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
    }
    f
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.byte()?, self.byte()?]))
    }
}

/// Plays `data` as driver and host actions on a fresh harness and checks the device's
/// invariants (panics when one breaks): memory no chain points into stays untouched, used
/// lengths never exceed what a chain offers, every frame that reaches the tap has a header
/// the negotiated features allow and a length within bounds, the rings never report more used
/// entries than chains published, and every call returns (bounded work).
pub fn run_ops(data: &[u8]) {
    let mut input = Input(data);
    let feats = match input.byte() {
        Some(b) => {
            let mut f = features::VERSION_1 | features::CSUM | features::HOST_TSO4;
            if b & 1 != 0 {
                f |= features::MRG_RXBUF;
            }
            if b & 2 != 0 {
                f |= features::RING_EVENT_IDX;
            }
            if b & 4 != 0 {
                f |= features::GUEST_CSUM;
            }
            f
        }
        None => return,
    };
    let mut h = Harness::new(feats, 16, None);
    let _ = h
        .mem
        .write_slice(&vec![0xaau8; (DATA - GUARD) as usize], GuestAddress(GUARD));
    let mut offered: std::collections::HashMap<u16, u64> = Default::default();
    for _ in 0..256 {
        let Some(op) = input.byte() else { break };
        match op % 6 {
            0 => {
                let len = usize::from(input.u16().unwrap_or(60)) % (HDR_LEN + MAX_FRAME + 64);
                let mut f = vec![0u8; HDR_LEN];
                f.extend(frame(len.saturating_sub(HDR_LEN), op));
                h.tap.push_inbound(f);
            }
            1 | 5 => {
                let n = 1 + usize::from(input.byte().unwrap_or(0) % 4);
                let mut bufs = Vec::new();
                for _ in 0..n {
                    let at = u64::from(input.u16().unwrap_or(0)) * 64;
                    let len = u32::from(input.u16().unwrap_or(1514));
                    let flags = input.byte().unwrap_or(0);
                    // Mostly inside guest memory, sometimes straddling its end.
                    let addr = if flags & 0x80 != 0 {
                        MEM_SIZE - 8
                    } else {
                        DATA + at
                    };
                    bufs.push((addr, len, flags & 1 == 0));
                }
                let total: u64 = bufs.iter().map(|b| u64::from(b.1)).sum();
                if let Some(head) = h.rx.add(&h.mem, &bufs, op % 6 == 5) {
                    offered.insert(head, total);
                }
            }
            2 => {
                let mut hdr = [0u8; HDR_LEN];
                for b in hdr.iter_mut() {
                    *b = input.byte().unwrap_or(0) & 0x0f;
                }
                let len = usize::from(input.u16().unwrap_or(100)) % (MAX_FRAME + 128);
                let split = 1 + usize::from(input.byte().unwrap_or(0) % 3);
                let at = DATA + 0x20_0000;
                let _ = h.mem.write_slice(&hdr, GuestAddress(at));
                let body = frame(len, op);
                let _ = h.mem.write_slice(&body, GuestAddress(at + HDR_LEN as u64));
                let total = (HDR_LEN + len) as u64;
                let step = total.div_ceil(split as u64).max(1);
                let mut bufs = Vec::new();
                let mut off = 0;
                while off < total {
                    let n = step.min(total - off);
                    bufs.push((at + off, n as u32, false));
                    off += n;
                }
                let _ = h.tx.add(&h.mem, &bufs, false);
            }
            3 => {
                let _ = h.run_rx();
                for (head, len) in h.rx.take_used(&h.mem) {
                    let room = offered.remove(&head).unwrap_or(0);
                    assert!(
                        u64::from(len) <= room,
                        "used length {len} beyond the chain's {room}"
                    );
                }
            }
            _ => {
                let _ = h.run_tx();
                for (_, len) in h.tx.take_used(&h.mem) {
                    assert_eq!(len, 0, "a transmit chain's used length");
                }
                for f in h.tap.take_outbound() {
                    assert!(f.len() >= HDR_LEN + MIN_FRAME && f.len() <= HDR_LEN + MAX_FRAME);
                    let mut raw = [0u8; HDR_LEN];
                    raw.copy_from_slice(&f[..HDR_LEN]);
                    assert!(
                        TxHeader::parse(&raw, f.len() - HDR_LEN, feats).is_ok(),
                        "the tap got a header the features do not allow"
                    );
                }
            }
        }
        assert!(h.rx.outstanding() <= 16 && h.tx.outstanding() <= 16);
    }
    // Whatever happened, the engines keep at most one frame each.
    assert!(h.tap.inbound_len() <= super::tap::MEMORY_TAP_FRAMES);
    let mut guard = vec![0u8; (DATA - GUARD) as usize];
    let _ = h.mem.read_slice(&mut guard, GuestAddress(GUARD));
    assert!(
        guard.iter().all(|&b| b == 0xaa),
        "the device wrote outside the buffers"
    );
}

/// For tests: reads what the tap got, header stripped.
pub fn tap_frames(tap: &MemoryTap) -> Vec<Vec<u8>> {
    tap.take_outbound()
        .into_iter()
        .map(|f| f[HDR_LEN..].to_vec())
        .collect()
}

/// For tests: reads `len` bytes of guest memory at `addr`.
pub fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let _ = mem.read_slice(&mut v, GuestAddress(addr));
    v
}

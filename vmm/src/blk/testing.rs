//! The guest side of the virtio-blk device for tests, property tests and the fuzz targets
//! (`fuzz/fuzz_targets/blk_chain.rs`, `blk_engine.rs`): a split ring in guest memory over an
//! in-memory disk, a byte-string reader that turns fuzzer input into descriptors and driver
//! actions, and the invariants the device must keep whatever the guest does:
//!
//! - no panic, and no write to guest memory outside the used ring and the device-writable
//!   buffers the descriptor tables name (checked byte for byte against a copy taken before);
//! - no more used entries than chains made available, each naming a descriptor of the table;
//! - a parsed request only ever points into descriptors of the right direction, inside guest
//!   memory and the disk; a failed one answers IOERR or UNSUPP at the chain's last byte.
//!
//! Compiled for tests and with the `test-utils` feature.

use std::sync::Arc;

use strata_storage::io::memory::MemoryDevice;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::chain::{self, BlkOp, Parsed, SharedMemory};
use super::config::{BlkConfig, DiskOptions};
use super::engine::QueueEngine;
use super::{status, ID_BYTES, SECTOR_SIZE};

/// Guest memory of the harness (one region, or two with a gap between them).
pub const MEM_SIZE: u64 = 256 << 10;
/// Entries of the harness's ring.
pub const QSIZE: u16 = 16;
/// The disk: 256 KiB.
pub const DISK_SIZE: u64 = 256 << 10;
/// Ring tables: descriptors, avail and used ring, each on its own page.
pub const DESC: u64 = 0;
/// The avail ring.
pub const AVAIL: u64 = 0x1000;
/// The used ring.
pub const USED: u64 = 0x2000;
/// Buffers, headers and indirect tables start here.
pub const DATA: u64 = 0x4000;
/// Descriptor flags.
pub const F_NEXT: u16 = 1;
/// Device-writable.
pub const F_WRITE: u16 = 2;
/// An indirect table.
pub const F_INDIRECT: u16 = 4;

/// Fuzzer input read as numbers; zeros once it runs out.
#[derive(Debug)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Reads `data`.
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }

    /// Bytes left.
    pub fn left(&self) -> usize {
        self.data.len()
    }

    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.data.len());
        out[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        out
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }

    /// The rest of the input.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    /// A guest address: mostly near the places that matter (buffers, the end of memory, the
    /// gap between regions, the top of the address space), sometimes anything.
    pub fn addr(&mut self) -> u64 {
        let k = u64::from(self.u16());
        match self.u8() % 8 {
            0 => self.u64(),
            1 => MEM_SIZE.wrapping_sub(k),
            2 => (MEM_SIZE / 2).wrapping_add(k).wrapping_sub(0x100),
            3 => u64::MAX - k,
            4 => DESC + k % 0x3000,
            _ => DATA + k * 16 % (MEM_SIZE - DATA),
        }
    }

    /// A descriptor length (a kind byte and an argument byte): mostly small and sector-shaped,
    /// sometimes anything.
    pub fn desc_len(&mut self) -> u32 {
        let (kind, arg) = (self.u8() % 6, self.u8());
        match kind {
            0 => self.u32(),
            1 => 16,
            2 => 1,
            3 => u32::from(arg),
            _ => u32::from(arg % 17) * 512,
        }
    }
}

/// Guest memory: one region of [`MEM_SIZE`], or two halves with a hole in the middle.
pub fn guest_memory(with_hole: bool) -> SharedMemory {
    let ranges: &[(GuestAddress, usize)] = if with_hole {
        let half = (MEM_SIZE / 2) as usize;
        &[
            (GuestAddress(0), half),
            (GuestAddress(MEM_SIZE / 2 + 0x1000), half - 0x1000),
        ]
    } else {
        &[(GuestAddress(0), MEM_SIZE as usize)]
    };
    Arc::new(GuestMemoryMmap::from_ranges(ranges).expect("guest memory"))
}

/// A disk configuration for the harness.
pub fn config(read_only: bool) -> (Arc<BlkConfig>, Arc<MemoryDevice>) {
    let disk = MemoryDevice::new(DISK_SIZE);
    let opts = DiskOptions {
        read_only,
        queue_size: QSIZE,
        serial: "strata-fuzz".into(),
        ..DiskOptions::default()
    };
    let cfg = BlkConfig::new(disk.clone(), &opts).expect("disk config");
    (Arc::new(cfg), disk)
}

/// The guest address of host pointer `ptr` into `mem`, if it points into it.
fn guest_addr_of(mem: &GuestMemoryMmap, ptr: *const u8) -> Option<u64> {
    mem.iter().find_map(|r| {
        let host = mem.get_host_address(r.start_addr()).ok()? as usize;
        let p = ptr as usize;
        (p >= host && p < host + r.len() as usize).then(|| r.start_addr().0 + (p - host) as u64)
    })
}

/// Whether `[addr, addr + len)` lies inside one of `ranges`.
fn inside(ranges: &[(u64, u64)], addr: u64, len: u64) -> bool {
    ranges.iter().any(|&(a, l)| {
        addr >= a
            && addr
                .checked_add(len)
                .is_some_and(|e| e <= a.saturating_add(l))
    })
}

/// Checks what [`chain::parse`] made of `descs` (see the module documentation).
///
/// # Panics
/// When the outcome breaks an invariant: that is the bug the fuzz target reports.
pub fn check_parsed(parsed: &Parsed, descs: &[Descriptor], mem: &SharedMemory, cfg: &BlkConfig) {
    let range = |d: &Descriptor| (d.addr().0, u64::from(d.len()));
    let readable: Vec<(u64, u64)> = descs
        .iter()
        .filter(|d| !d.is_write_only())
        .map(range)
        .collect();
    let writable: Vec<(u64, u64)> = descs
        .iter()
        .filter(|d| d.is_write_only())
        .map(range)
        .collect();
    let last_byte = writable
        .last()
        .map(|&(a, l)| a.wrapping_add(l).wrapping_sub(1));
    let capacity = cfg.capacity_sectors() * SECTOR_SIZE;
    let on_disk = |offset: u64, len: u64| offset.checked_add(len).is_some_and(|e| e <= capacity);
    let segments_inside = |buf: &strata_storage::io::IoBuf, ranges: &[(u64, u64)]| {
        buf.segments()
            .iter()
            .all(|s| guest_addr_of(mem, s.ptr()).is_some_and(|g| inside(ranges, g, s.len() as u64)))
    };
    match parsed {
        Parsed::Broken { .. } => {}
        Parsed::Fail {
            status: st,
            status_addr,
            ..
        } => {
            assert!(*st == status::IOERR || *st == status::UNSUPP, "status {st}");
            assert_eq!(Some(status_addr.0), last_byte, "status byte not at the end");
            assert!(mem.check_range(*status_addr, 1), "status outside memory");
        }
        Parsed::Run(req) => {
            assert_eq!(
                Some(req.status_addr.0),
                last_byte,
                "status byte not at the end"
            );
            assert!(mem.check_range(req.status_addr, 1), "status outside memory");
            match &req.op {
                BlkOp::Read { offset, buf } => {
                    assert!(
                        segments_inside(buf, &writable),
                        "read into a readable buffer"
                    );
                    assert_eq!(req.used_len as usize, buf.len() + 1);
                    assert!(on_disk(*offset, buf.len() as u64) && buf.len() % 512 == 0);
                }
                BlkOp::Write { offset, buf } => {
                    assert!(!cfg.read_only(), "a write to a read-only disk ran");
                    assert!(
                        segments_inside(buf, &readable),
                        "write from a writable buffer"
                    );
                    assert_eq!(req.used_len, 1);
                    assert!(on_disk(*offset, buf.len() as u64) && buf.len() % 512 == 0);
                }
                BlkOp::GetId { dst } => {
                    let total: usize = dst.iter().map(|&(_, n)| n).sum();
                    assert!(total <= ID_BYTES && req.used_len as usize == total + 1);
                    assert!(dst.iter().all(|&(a, n)| inside(&writable, a.0, n as u64)));
                }
                BlkOp::Discard { offset, len } | BlkOp::WriteZeroes { offset, len, .. } => {
                    assert!(on_disk(*offset, *len));
                    assert_eq!(req.used_len, 1);
                }
                BlkOp::Flush => assert_eq!(req.used_len, 1),
            }
        }
    }
}

/// The `blk_chain` fuzz target: `data` chooses a disk (read-only or not), guest memory (with a
/// hole or not), up to 24 descriptors of any address, length and direction, and the bytes of
/// guest memory they point at; the parser's outcome is checked with [`check_parsed`].
pub fn fuzz_chain(data: &[u8]) {
    chain_outcome(data);
}

/// [`fuzz_chain`], naming the outcome: the operation of a request that runs, `fail` or
/// `broken`.
pub fn chain_outcome(data: &[u8]) -> &'static str {
    let mut input = Input::new(data);
    let flags = input.u8();
    let mem = guest_memory(flags & 1 != 0);
    let (cfg, _disk) = config(flags & 2 != 0);
    let n = usize::from(input.u8() % 25);
    let descs: Vec<Descriptor> = (0..n)
        .map(|_| {
            let (addr, len) = (input.addr(), input.desc_len());
            let write = if input.u8() & 1 != 0 { F_WRITE } else { 0 };
            Descriptor::new(addr, len, write, 0)
        })
        .collect();
    // The rest is what the descriptors find in memory: headers, segments.
    let bytes = input.rest();
    let fill = bytes.len().min(0x4000);
    let _ = mem.write_slice(&bytes[..fill], GuestAddress(DATA));
    let parsed = chain::parse(descs.iter().copied(), &mem, &cfg);
    check_parsed(&parsed, &descs, &mem, &cfg);
    match parsed {
        Parsed::Run(r) => match r.op {
            BlkOp::Read { .. } => "read",
            BlkOp::Write { .. } => "write",
            BlkOp::Flush => "flush",
            BlkOp::GetId { .. } => "get_id",
            BlkOp::Discard { .. } => "discard",
            BlkOp::WriteZeroes { .. } => "write_zeroes",
        },
        Parsed::Fail { .. } => "fail",
        Parsed::Broken { .. } => "broken",
    }
}

/// A split ring in guest memory as the driver sees it, and the engine serving it.
#[derive(Debug)]
pub struct Ring {
    /// Guest memory.
    pub mem: SharedMemory,
    /// The device's view of the queue.
    pub queue: Queue,
    /// The engine under test.
    pub engine: QueueEngine,
    /// The disk's configuration.
    pub cfg: Arc<BlkConfig>,
    /// The disk.
    pub disk: Arc<MemoryDevice>,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    /// A ring of [`QSIZE`] entries over a fresh disk.
    pub fn new(event_idx: bool, with_hole: bool, read_only: bool) -> Ring {
        let mem = guest_memory(with_hole);
        let (cfg, disk) = config(read_only);
        let mut queue = Queue::new(QSIZE).expect("queue");
        queue.set_size(QSIZE);
        queue.set_desc_table_address(Some(DESC as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        let engine = QueueEngine::new("fuzz", cfg.clone()).expect("engine");
        Ring {
            mem,
            queue,
            engine,
            cfg,
            disk,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Writes descriptor `i` of the table at `table`.
    pub fn write_desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        let _ = self
            .mem
            .write_slice(&raw, GuestAddress(table + 16 * u64::from(i)));
    }

    /// Makes head `head` available.
    pub fn publish(&mut self, head: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        let _ = self.mem.write_obj(head, GuestAddress(slot));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let _ = self.mem.write_obj(self.avail_idx, GuestAddress(AVAIL + 2));
    }

    /// Chains made available so far.
    pub fn published(&self) -> u16 {
        self.avail_idx
    }

    /// Runs the engine on what is available and on what completed.
    pub fn run(&mut self) {
        self.engine.process_avail(&mut self.queue, &self.mem);
        self.engine.process_completions(&mut self.queue, &self.mem);
    }

    /// Used entries (head, length) not seen before.
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap_or(0);
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = USED + 4 + 8 * u64::from(self.used_seen % QSIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap_or(u32::MAX);
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap_or(u32::MAX);
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// Every range a device-writable descriptor names — in the table, and in the indirect
    /// tables its descriptors name — where the device may write (besides the used ring, which
    /// comes first); and whether one of them covers the descriptor table, the avail ring or an
    /// indirect table. Then the guest has asked the device to rewrite the tables it reads, so
    /// what the device may write next is decided by what it wrote: [`Ring::run_checked`] checks
    /// such a run for what holds whatever the tables become, not byte for byte.
    pub fn writable_ranges(&self) -> (Vec<(u64, u64)>, bool) {
        let mut out = vec![(USED, 0x1000)];
        let mut tables = vec![
            (DESC, 16 * u64::from(QSIZE)),
            (AVAIL, 6 + 2 * u64::from(QSIZE)),
        ];
        let read = |table: u64, i: u64| -> Option<(u64, u32, u16)> {
            let mut raw = [0u8; 16];
            self.mem
                .read_slice(&mut raw, GuestAddress(table.checked_add(16 * i)?))
                .ok()?;
            Some((
                u64::from_le_bytes(raw[0..8].try_into().ok()?),
                u32::from_le_bytes(raw[8..12].try_into().ok()?),
                u16::from_le_bytes(raw[12..14].try_into().ok()?),
            ))
        };
        for i in 0..u64::from(QSIZE) {
            let Some((addr, len, flags)) = read(DESC, i) else {
                continue;
            };
            if flags & F_WRITE != 0 {
                out.push((addr, u64::from(len)));
            }
            if flags & F_INDIRECT != 0 {
                tables.push((addr, u64::from(len)));
                for j in 0..(u64::from(len) / 16).min(4096) {
                    if let Some((a, l, f)) = read(addr, j) {
                        if f & F_WRITE != 0 {
                            out.push((a, u64::from(l)));
                        }
                    }
                }
            }
        }
        let overlap = |(a, l): (u64, u64), (b, m): (u64, u64)| {
            a < b.saturating_add(m) && b < a.saturating_add(l)
        };
        let self_modifying = out[1..]
            .iter()
            .any(|&w| tables.iter().any(|&t| overlap(w, t)));
        (out, self_modifying)
    }

    /// A copy of guest memory (each region in order).
    pub fn snapshot(&self) -> Vec<(u64, Vec<u8>)> {
        self.mem
            .iter()
            .map(|r| {
                let mut v = vec![0u8; r.len() as usize];
                let _ = self.mem.read_slice(&mut v, r.start_addr());
                (r.start_addr().0, v)
            })
            .collect()
    }

    /// Runs the engine and checks that guest memory changed only where the descriptor tables
    /// say the device may write (see [`Ring::writable_ranges`]; not checked when the tables
    /// name themselves as writable), and that each used entry names a descriptor of the table.
    ///
    /// # Panics
    /// On a broken invariant.
    pub fn run_checked(&mut self) -> Vec<(u32, u32)> {
        let (allowed, self_modifying) = self.writable_ranges();
        let before = (!self_modifying).then(|| self.snapshot());
        self.run();
        for ((start, old), (_, new)) in before.iter().flatten().zip(self.snapshot()) {
            for (page, (a, b)) in old.chunks(4096).zip(new.chunks(4096)).enumerate() {
                if a == b {
                    continue;
                }
                for (k, (x, y)) in a.iter().zip(b.iter()).enumerate() {
                    let at = start + (page * 4096 + k) as u64;
                    assert!(
                        x == y || inside(&allowed, at, 1),
                        "the device wrote guest memory at {at:#x}, which no writable descriptor names"
                    );
                }
            }
        }
        let used = self.take_used();
        for &(id, _) in &used {
            assert!(id < u32::from(QSIZE), "used entry names descriptor {id}");
        }
        used
    }
}

/// The `blk_engine` fuzz target: `data` is played as driver actions on a ring served by the
/// engine over an in-memory disk — descriptors of any address, length, flags and next index
/// written anywhere in the table or in indirect tables, heads of any value made available, bytes
/// of guest memory set, the engine run — and every run is checked with [`Ring::run_checked`].
pub fn fuzz_engine(data: &[u8]) {
    replay_engine(data);
}

/// [`fuzz_engine`], returning the ring afterwards.
pub fn replay_engine(data: &[u8]) -> Ring {
    let mut input = Input::new(data);
    let flags = input.u8();
    let mut ring = Ring::new(flags & 1 != 0, flags & 2 != 0, flags & 4 != 0);
    let mut available = 0u32;
    let mut used = 0u32;
    for _ in 0..96 {
        if input.left() == 0 {
            break;
        }
        match input.u8() % 6 {
            0 | 1 => {
                let (i, addr, len) = (input.u16() % QSIZE, input.addr(), input.desc_len());
                let (f, next) = (input.u16() & 7, input.u16() % (QSIZE + 2));
                ring.write_desc(DESC, i, addr, len, f, next);
            }
            2 => {
                // A descriptor of an indirect table somewhere in the data area.
                let table = DATA + u64::from(input.u8()) * 0x100;
                let (i, addr, len) = (input.u16() % 16, input.addr(), input.desc_len());
                let (f, next) = (input.u16() & 3, input.u16() % 18);
                ring.write_desc(table, i, addr, len, f, next);
            }
            3 => {
                // Bytes at a data address: headers, segments.
                let at = DATA + u64::from(input.u16()) * 16 % (MEM_SIZE - DATA);
                let n = usize::from(input.u8());
                let bytes: Vec<u8> = (0..n).map(|_| input.u8()).collect();
                let _ = ring.mem.write_slice(&bytes, GuestAddress(at));
            }
            4 => {
                if available - used < u32::from(QSIZE) {
                    ring.publish(input.u16() % QSIZE);
                    available += 1;
                }
            }
            _ => {
                used += ring.run_checked().len() as u32;
                assert!(
                    used <= available,
                    "{used} used entries for {available} chains"
                );
            }
        }
    }
    used += ring.run_checked().len() as u32;
    assert!(
        used <= available,
        "{used} used entries for {available} chains"
    );
    ring
}

/// Inputs that build well-formed requests of every type and a few malformed chains, as seeds
/// for the fuzz targets (`fuzz/corpus/blk_chain`, `blk_engine`), by name.
pub fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    // A descriptor for `fuzz_chain`: address chooser 5 with k (DATA + 16k), a length, direction.
    fn desc(k: u16, len_kind: u8, len_arg: u8, write: bool) -> Vec<u8> {
        let mut v = k.to_le_bytes().to_vec();
        v.push(5);
        v.push(len_kind);
        v.push(len_arg);
        v.push(u8::from(write));
        v
    }
    let header = |kind: u32, sector: u64| {
        let mut h = kind.to_le_bytes().to_vec();
        h.extend([0u8; 4]);
        h.extend(sector.to_le_bytes());
        h
    };
    let mut out = Vec::new();
    // A read: header at DATA (k=0, 16 bytes), 1024 bytes of data (k=1), status (k=0x80, 1 byte).
    for (name, kind, data_write) in [("read", 0u32, true), ("write", 1, false)] {
        let mut v = vec![0u8, 3];
        v.extend(desc(0, 1, 0, false));
        v.extend(desc(1, 4, 2, data_write));
        v.extend(desc(0x80, 2, 0, true));
        v.extend(header(kind, 8));
        out.push(("blk_chain", name, v));
    }
    for (name, kind) in [("flush", 4u32), ("get_id", 8), ("unknown", 99)] {
        let mut v = vec![0u8, 3];
        v.extend(desc(0, 1, 0, false));
        v.extend(desc(1, 3, 20, true));
        v.extend(desc(0x80, 2, 0, true));
        v.extend(header(kind, 0));
        out.push(("blk_chain", name, v));
    }
    for (name, kind) in [("discard", 11u32), ("write_zeroes", 13)] {
        let mut v = vec![1u8, 3];
        v.extend(desc(0, 1, 0, false));
        v.extend(desc(1, 1, 0, false));
        v.extend(desc(0x80, 2, 0, true));
        v.extend(header(kind, 0));
        v.extend(4u64.to_le_bytes());
        v.extend(8u32.to_le_bytes());
        v.extend(0u32.to_le_bytes());
        out.push(("blk_chain", name, v));
    }
    // The engine: three descriptors (header, data, status) made available, then run; a second
    // chain through an indirect table; a looped chain.
    let wd = |i: u16, k: u16, len_kind: u8, len_arg: u8, flags: u16, next: u16| {
        let mut v = vec![0u8];
        v.extend(i.to_le_bytes());
        v.extend(k.to_le_bytes());
        v.push(5);
        v.push(len_kind);
        v.push(len_arg);
        v.extend(flags.to_le_bytes());
        v.extend(next.to_le_bytes());
        v
    };
    let bytes_at = |k: u16, b: &[u8]| {
        let mut v = vec![3u8];
        v.extend(k.to_le_bytes());
        v.push(b.len() as u8);
        v.extend_from_slice(b);
        v
    };
    let mut e = vec![1u8];
    e.extend(bytes_at(0, &header(1, 2)));
    e.extend(bytes_at(1, &[0x5a; 200]));
    e.extend(wd(0, 0, 1, 0, F_NEXT, 1));
    e.extend(wd(1, 1, 4, 1, F_NEXT, 2));
    e.extend(wd(2, 0x80, 2, 0, F_WRITE, 0));
    e.extend([4u8, 0, 0, 5]);
    e.extend(bytes_at(2, &header(0, 2)));
    e.extend(wd(3, 2, 1, 0, F_NEXT, 4));
    e.extend(wd(4, 3, 4, 1, F_NEXT | F_WRITE, 5));
    e.extend(wd(5, 0x81, 2, 0, F_WRITE, 0));
    e.extend([4u8, 3, 0, 5]);
    out.push(("blk_engine", "write_then_read", e));
    let mut l = vec![0u8];
    l.extend(bytes_at(0, &header(0, 0)));
    l.extend(wd(0, 0, 1, 0, F_NEXT, 1));
    l.extend(wd(1, 0x80, 2, 0, F_WRITE | F_NEXT, 0));
    l.extend([4u8, 0, 0, 5]);
    out.push(("blk_engine", "looped", l));
    out
}

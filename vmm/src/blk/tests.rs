//! The engine against virtio-queue's mock driver: well-formed requests of every type, and the
//! malicious chains a guest can build.

use std::sync::Arc;

use strata_storage::io::memory::MemoryDevice;
use strata_storage::io::{Op, QueueOptions, SyncExecutor, SyncQueue};
use strata_storage::{BlockDevice, Capabilities, Extent, ExtentKind, HostFile, StorageError};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::blk::config::{BlkConfig, DiskOptions};
use crate::blk::{req_type, status, ID_BYTES};

const QSIZE: u16 = 16;
const MEM_SIZE: usize = 16 << 20;
const DATA: u64 = 0x10_0000;
const HDR: u64 = 0x8_0000;
const STATUS: u64 = 0x9_0000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

struct Harness {
    mem: SharedMemory,
    queue: Queue,
    engine: QueueEngine,
    desc_table: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    reqs: u64,
}

/// One descriptor: guest address, length, device-writable.
type D = (u64, u32, bool);

impl Harness {
    fn new(disk: Arc<dyn BlockDevice>, opts: DiskOptions) -> Harness {
        let mem: SharedMemory =
            Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
        let mock = MockSplitQueue::create(mem.as_ref(), GuestAddress(0), QSIZE);
        let mut queue: Queue = mock.create_queue().unwrap();
        // The mock places the used ring right after the avail ring's entries, on top of its
        // used_event field (it counts the ring's length in entries, not bytes), which breaks
        // EVENT_IDX; give each ring its own page instead.
        let (desc_table, avail, used) = (mock.desc_table_addr().0, 0x1000u64, 0x2000u64);
        drop(mock);
        queue.set_avail_ring_address(Some(avail as u32), Some(0));
        queue.set_used_ring_address(Some(used as u32), Some(0));
        let opts = DiskOptions {
            queue_size: QSIZE,
            serial: "strata-test".into(),
            ..opts
        };
        let cfg = Arc::new(BlkConfig::new(disk, &opts).unwrap());
        let engine = QueueEngine::new("q0", cfg).unwrap();
        Harness {
            mem,
            queue,
            engine,
            desc_table,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            reqs: 0,
        }
    }

    fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.desc_table + 16 * u64::from(i));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, at).unwrap();
    }

    fn publish(&mut self, head: u16) {
        let slot = GuestAddress(self.avail + 4 + 2 * u64::from(self.avail_idx % QSIZE));
        self.mem.write_obj(head, slot).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Adds a chain of descriptors linked in order; returns its head.
    fn add_chain(&mut self, descs: &[D]) -> u16 {
        let head = self.next_desc;
        for (k, &(addr, len, write)) in descs.iter().enumerate() {
            let i = (head + k as u16) % QSIZE;
            let last = k + 1 == descs.len();
            let flags = if write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            self.write_desc(i, addr, len, flags, (i + 1) % QSIZE);
        }
        self.next_desc = (head + descs.len() as u16) % QSIZE;
        self.publish(head);
        head
    }

    /// A request of `kind` at `sector` with `data` descriptors between header and status.
    /// Each request uses its own header and status address. Returns the status address.
    fn request(&mut self, kind: u32, sector: u64, data: &[D]) -> u64 {
        let hdr = HDR + 16 * self.reqs;
        let st = STATUS + self.reqs;
        self.reqs += 1;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
        let mut descs = vec![(hdr, 16, false)];
        descs.extend_from_slice(data);
        descs.push((st, 1, true));
        self.add_chain(&descs);
        st
    }

    /// Runs the engine until the disk has answered; returns whether it asked for an interrupt.
    fn run(&mut self) -> bool {
        let a = self.engine.process_avail(&mut self.queue, &self.mem);
        let c = self.engine.process_completions(&mut self.queue, &self.mem);
        a || c
    }

    fn status(&self, st: u64) -> u8 {
        self.mem.read_obj(GuestAddress(st)).unwrap()
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// The used entry `n`: (descriptor head, length).
    fn used(&self, n: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(n % QSIZE);
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    fn fill(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn harness() -> (Harness, Arc<MemoryDevice>) {
    let disk = MemoryDevice::new(1 << 20);
    (Harness::new(disk.clone(), DiskOptions::default()), disk)
}

#[test]
fn write_then_read_round_trips_through_split_buffers() {
    let (mut h, disk) = harness();
    let data = pattern(7, 8192);
    h.fill(DATA, &data[..4096]);
    h.fill(DATA + 0x10000, &data[4096..]);
    let st = h.request(
        req_type::OUT,
        8,
        &[(DATA, 4096, false), (DATA + 0x10000, 4096, false)],
    );
    assert!(h.run(), "a completed request interrupts without EVENT_IDX");
    assert_eq!(h.status(st), status::OK);
    assert_eq!(h.used_idx(), 1);
    assert_eq!(h.used(0).1, 1, "a write's used length is the status byte");
    let mut on_disk = vec![0u8; 8192];
    disk.read_exact_at(4096, &mut on_disk).unwrap();
    assert_eq!(on_disk, data);

    // Read it back into three odd-sized pieces.
    let st = h.request(
        req_type::IN,
        8,
        &[
            (0x20_0000, 512, true),
            (0x30_0000, 7168, true),
            (0x40_0000, 512, true),
        ],
    );
    h.run();
    assert_eq!(h.status(st), status::OK);
    assert_eq!(
        h.used(1).1,
        8193,
        "a read's used length is data plus status"
    );
    let mut got = h.read(0x20_0000, 512);
    got.extend(h.read(0x30_0000, 7168));
    got.extend(h.read(0x40_0000, 512));
    assert_eq!(got, data);
}

#[test]
fn header_data_and_status_may_share_descriptors() {
    let (mut h, disk) = harness();
    // One readable descriptor holding header and data, one writable for the status.
    let mut buf = vec![0u8; 16];
    buf[0..4].copy_from_slice(&req_type::OUT.to_le_bytes());
    buf[8..16].copy_from_slice(&2u64.to_le_bytes());
    buf.extend(pattern(3, 512));
    h.fill(DATA, &buf);
    h.add_chain(&[(DATA, 528, false), (STATUS, 1, true)]);
    h.run();
    assert_eq!(h.status(STATUS), status::OK);
    let mut got = vec![0u8; 512];
    disk.read_exact_at(1024, &mut got).unwrap();
    assert_eq!(got, pattern(3, 512));
    // A read whose data and status share one writable descriptor.
    let mut hdr = [0u8; 16];
    hdr[8..16].copy_from_slice(&2u64.to_le_bytes());
    h.fill(HDR, &hdr);
    h.add_chain(&[(HDR, 16, false), (0x20_0000, 513, true)]);
    h.run();
    assert_eq!(h.read(0x20_0000, 512), pattern(3, 512));
    assert_eq!(h.read(0x20_0000 + 512, 1), [status::OK]);
}

#[test]
fn flush_get_id_discard_and_write_zeroes() {
    let (mut h, disk) = harness();
    disk.write_all_at(0, &pattern(1, 65536)).unwrap();
    let st = h.request(req_type::FLUSH, 0, &[]);
    h.run();
    assert_eq!(h.status(st), status::OK);

    let st = h.request(req_type::GET_ID, 0, &[(DATA, ID_BYTES as u32, true)]);
    h.run();
    assert_eq!(h.status(st), status::OK);
    assert_eq!(&h.read(DATA, 11), b"strata-test");
    assert_eq!(h.used(1).1, ID_BYTES as u32 + 1);

    for (kind, sector, unmap) in [
        (req_type::DISCARD, 0u64, 0u32),
        (req_type::WRITE_ZEROES, 64, 1),
    ] {
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&sector.to_le_bytes());
        seg[8..12].copy_from_slice(&16u32.to_le_bytes());
        seg[12..16].copy_from_slice(&unmap.to_le_bytes());
        let at = DATA + 0x1000 + sector;
        h.fill(at, &seg);
        let st = h.request(kind, 0, &[(at, 16, false)]);
        h.run();
        assert_eq!(h.status(st), status::OK, "request type {kind}");
        let mut got = vec![0xffu8; 8192];
        disk.read_exact_at(sector * 512, &mut got).unwrap();
        assert!(got.iter().all(|&b| b == 0), "type {kind} leaves zeros");
    }
    let mut rest = vec![0u8; 512];
    disk.read_exact_at(8192, &mut rest).unwrap();
    assert_eq!(rest, pattern(1, 65536)[8192..8704], "neighbours untouched");
}

#[test]
fn several_requests_in_flight_complete_with_their_own_heads() {
    let (mut h, _disk) = harness();
    let mut sts = Vec::new();
    for i in 0..5u64 {
        h.fill(DATA + i * 4096, &pattern(i as u8, 4096));
        sts.push(h.request(req_type::OUT, i * 8, &[(DATA + i * 4096, 4096, false)]));
    }
    h.run();
    assert_eq!(h.used_idx(), 5);
    let heads: Vec<u32> = (0..5).map(|n| h.used(n).0).collect();
    assert_eq!(heads, vec![0, 3, 6, 9, 12]);
    assert!(sts.iter().all(|&s| h.status(s) == status::OK));
    assert_eq!(h.engine.stats().requests, 5);
}

#[test]
fn the_working_depth_is_what_was_in_flight_when_completions_came() {
    let (mut h, _disk) = harness();
    assert_eq!(h.engine.working_depth(), 0);
    for i in 0..5u64 {
        h.request(req_type::IN, i * 8, &[(DATA + i * 4096, 4096, true)]);
    }
    h.run();
    assert_eq!(h.engine.in_flight(), 0);
    assert_eq!(
        h.engine.working_depth(),
        5,
        "five were in flight when they completed: the worker may poll"
    );
    h.request(req_type::IN, 0, &[(DATA, 4096, true)]);
    h.run();
    assert_eq!(
        h.engine.working_depth(),
        1,
        "one at a time now: the worker sleeps without polling"
    );
}

/// A chain that must fail with `want` without touching the disk.
fn expect_status(h: &mut Harness, st: u64, want: u8) {
    let before = h.used_idx();
    h.run();
    assert_eq!(h.used_idx(), before.wrapping_add(1), "the head is returned");
    assert_eq!(h.status(st), want);
}

#[test]
fn malicious_data_addresses_and_directions_get_ioerr() {
    let (mut h, disk) = harness();
    disk.write_all_at(0, &pattern(9, 4096)).unwrap();
    // Outside guest memory, and straddling its end.
    let st = h.request(req_type::IN, 0, &[(MEM_SIZE as u64 + 0x1000, 512, true)]);
    expect_status(&mut h, st, status::IOERR);
    let st = h.request(req_type::OUT, 0, &[(MEM_SIZE as u64 - 256, 512, false)]);
    expect_status(&mut h, st, status::IOERR);
    // A read into a device-readable buffer, a write from a device-writable one.
    let st = h.request(req_type::IN, 0, &[(DATA, 512, false)]);
    expect_status(&mut h, st, status::IOERR);
    let st = h.request(req_type::OUT, 0, &[(DATA, 512, true)]);
    expect_status(&mut h, st, status::IOERR);
    // A readable descriptor after a writable one.
    h.fill(HDR, &[0u8; 16]);
    h.add_chain(&[
        (HDR, 16, false),
        (DATA, 512, true),
        (DATA + 4096, 512, false),
        (STATUS, 1, true),
    ]);
    expect_status(&mut h, STATUS, status::IOERR);
    // Overlapping read buffers.
    let st = h.request(
        req_type::IN,
        0,
        &[(DATA, 1024, true), (DATA + 512, 1024, true)],
    );
    expect_status(&mut h, st, status::IOERR);
    let mut still = vec![0u8; 4096];
    disk.read_exact_at(0, &mut still).unwrap();
    assert_eq!(still, pattern(9, 4096), "nothing was written");
}

#[test]
fn bad_headers_ranges_and_types_get_an_error_status() {
    let disk = MemoryDevice::new(1 << 20);
    let mut h = Harness::new(disk, DiskOptions::default());
    // Past the end of the 2048-sector disk, and an offset that overflows.
    let st = h.request(req_type::IN, 2047, &[(DATA, 1024, true)]);
    expect_status(&mut h, st, status::IOERR);
    let st = h.request(req_type::IN, u64::MAX / 256, &[(DATA, 512, true)]);
    expect_status(&mut h, st, status::IOERR);
    // Not a multiple of 512 bytes.
    let st = h.request(req_type::OUT, 0, &[(DATA, 100, false)]);
    expect_status(&mut h, st, status::IOERR);
    // Unknown type.
    let st = h.request(99, 0, &[]);
    expect_status(&mut h, st, status::UNSUPP);
    // Discard with the unmap flag (reserved for discard) and with two segments.
    h.fill(DATA, &[0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0]);
    let st = h.request(req_type::DISCARD, 0, &[(DATA, 16, false)]);
    expect_status(&mut h, st, status::UNSUPP);
    let st = h.request(req_type::WRITE_ZEROES, 0, &[(DATA, 32, false)]);
    expect_status(&mut h, st, status::IOERR);
    // A header shorter than 16 bytes.
    h.add_chain(&[(HDR, 8, false), (STATUS, 1, true)]);
    expect_status(&mut h, STATUS, status::IOERR);
}

#[test]
fn chains_without_a_usable_status_byte_are_returned_with_length_zero() {
    let (mut h, _disk) = harness();
    // Status outside guest memory.
    h.add_chain(&[(HDR, 16, false), (MEM_SIZE as u64 + 5, 1, true)]);
    // No writable descriptor at all.
    h.add_chain(&[(HDR, 16, false), (DATA, 512, false)]);
    // An empty status descriptor.
    h.add_chain(&[(HDR, 16, false), (STATUS, 0, true)]);
    h.run();
    assert_eq!(h.used_idx(), 3);
    for n in 0..3 {
        assert_eq!(h.used(n).1, 0);
    }
    assert_eq!(h.engine.stats().errors, 3);
}

#[test]
fn looping_and_oversized_chains_terminate() {
    let (mut h, _disk) = harness();
    // Descriptor 0 -> 1 -> 0 -> ...
    h.write_desc(0, HDR, 16, F_NEXT, 1);
    h.write_desc(1, DATA, 512, F_NEXT | F_WRITE, 0);
    h.publish(0);
    // A chain pointing past the descriptor table.
    h.write_desc(2, HDR, 16, F_NEXT, 500);
    h.publish(2);
    h.run();
    assert_eq!(h.used_idx(), 2, "both heads come back");
    assert_eq!(h.used(0), (0, 0));
    assert_eq!(h.used(1), (2, 0));

    // An indirect table with more descriptors than seg_max allows (QSIZE - 2 = 14 data
    // segments): 20 data descriptors.
    let table = 0x50_0000u64;
    let n = 22u16;
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&req_type::IN.to_le_bytes());
    h.fill(HDR, &hdr);
    for i in 0..n {
        let (addr, len, flags) = match i {
            0 => (HDR, 16u32, 0),
            _ if i == n - 1 => (STATUS, 1, F_WRITE),
            _ => (DATA + 4096 * u64::from(i), 512, F_WRITE),
        };
        let flags = flags | if i + 1 < n { F_NEXT } else { 0 };
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&(i + 1).to_le_bytes());
        h.fill(table + 16 * u64::from(i), &raw);
    }
    h.write_desc(3, table, 16 * u32::from(n), F_INDIRECT, 0);
    h.next_desc = 4;
    h.publish(3);
    expect_status(&mut h, STATUS, status::IOERR);
}

#[test]
fn indirect_chains_within_limits_work() {
    let (mut h, _disk) = harness();
    h.fill(DATA, &pattern(5, 1024));
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&req_type::OUT.to_le_bytes());
    h.fill(HDR, &hdr);
    let table = 0x50_0000u64;
    let descs: [(u64, u32, u16); 4] = [
        (HDR, 16, F_NEXT),
        (DATA, 512, F_NEXT),
        (DATA + 512, 512, F_NEXT),
        (STATUS, 1, F_WRITE),
    ];
    for (i, (addr, len, flags)) in descs.iter().enumerate() {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&(i as u16 + 1).to_le_bytes());
        h.fill(table + 16 * i as u64, &raw);
    }
    h.write_desc(0, table, 64, F_INDIRECT, 0);
    h.next_desc = 1;
    h.publish(0);
    expect_status(&mut h, STATUS, status::OK);
}

#[test]
fn read_only_disks_refuse_writes() {
    let disk = MemoryDevice::new(1 << 20);
    let opts = DiskOptions {
        read_only: true,
        ..DiskOptions::default()
    };
    let mut h = Harness::new(disk, opts);
    let st = h.request(req_type::OUT, 0, &[(DATA, 512, false)]);
    expect_status(&mut h, st, status::IOERR);
    h.fill(DATA, &[0u8; 16]);
    let st = h.request(req_type::DISCARD, 0, &[(DATA, 16, false)]);
    expect_status(&mut h, st, status::UNSUPP);
    let st = h.request(req_type::IN, 0, &[(DATA, 512, true)]);
    expect_status(&mut h, st, status::OK);
}

#[test]
fn event_idx_suppresses_interrupts_until_used_event() {
    let (mut h, _disk) = harness();
    h.queue.set_event_idx(true);
    // used_event (after the avail ring) = 2: interrupt only once the third entry is used.
    let used_event = GuestAddress(h.avail + 4 + 2 * u64::from(QSIZE));
    h.mem.write_obj(2u16, used_event).unwrap();
    let st = h.request(req_type::FLUSH, 0, &[]);
    assert!(!h.run(), "first completion: no interrupt");
    assert_eq!(h.status(st), status::OK);
    h.request(req_type::FLUSH, 0, &[]);
    assert!(!h.run(), "second: no interrupt");
    h.request(req_type::FLUSH, 0, &[]);
    assert!(h.run(), "third crosses used_event");
    // The device asks for kicks from the next avail index on (avail_event).
    let avail_event: u16 = h
        .mem
        .read_obj(GuestAddress(h.used + 4 + 8 * u64::from(QSIZE)))
        .unwrap();
    assert_eq!(avail_event, 3);
}

/// A disk whose writes fail as a full thin pool's do.
#[derive(Debug)]
struct FullPool;

impl SyncExecutor for FullPool {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn execute(&self, op: &mut Op) -> strata_storage::Result<u64> {
        match op {
            Op::Read { buf, .. } => Ok(buf.len() as u64),
            Op::Flush => Ok(0),
            Op::Discard { .. } => Err(StorageError::Unsupported("discard".into())),
            _ => Err(StorageError::OutOfSpace("thin pool is full".into())),
        }
    }
}

impl BlockDevice for FullPool {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::WRITE | Capabilities::FLUSH | Capabilities::DISCARD
    }
    fn alignment(&self) -> usize {
        512
    }
    fn open_queue(
        &self,
        opts: &QueueOptions,
    ) -> strata_storage::Result<Box<dyn strata_storage::io::IoQueue>> {
        Ok(Box::new(SyncQueue::new(Arc::new(FullPool), opts)))
    }
    fn flush(&self) -> strata_storage::Result<()> {
        Ok(())
    }
    fn resize(&self, _: u64) -> strata_storage::Result<()> {
        Err(StorageError::Unsupported("resize".into()))
    }
    fn block_status(&self, offset: u64, len: u64) -> strata_storage::Result<Extent> {
        Ok(Extent {
            offset,
            len,
            kind: ExtentKind::Data,
        })
    }
}

#[test]
fn a_full_pool_is_an_io_error_on_that_request_and_unsupported_is_unsupp() {
    let mut h = Harness::new(Arc::new(FullPool), DiskOptions::default());
    let st = h.request(req_type::OUT, 0, &[(DATA, 4096, false)]);
    expect_status(&mut h, st, status::IOERR);
    h.fill(DATA, &[0u8; 16]);
    let st = h.request(req_type::DISCARD, 0, &[(DATA, 16, false)]);
    expect_status(&mut h, st, status::UNSUPP);
    // The device goes on serving.
    let st = h.request(req_type::IN, 0, &[(DATA, 4096, true)]);
    expect_status(&mut h, st, status::OK);
}

/// A device whose queue completes every request as it is submitted and never signals its
/// eventfd (as a thin volume does for a discard that only changes metadata). While `hold` is
/// set, completions stay in the queue (I/O that takes its time).
#[derive(Debug, Default)]
struct SilentDevice {
    hold: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Debug, Default)]
struct SilentQueue(
    Vec<strata_storage::io::Completion>,
    Arc<std::sync::atomic::AtomicBool>,
);

impl strata_storage::io::IoQueue for SilentQueue {
    fn depth(&self) -> usize {
        64
    }
    fn in_flight(&self) -> usize {
        self.0.len()
    }
    fn submit(
        &mut self,
        req: strata_storage::io::Request,
    ) -> std::result::Result<(), strata_storage::io::QueueFull> {
        self.0.push(strata_storage::io::Completion::of(req, Ok(0)));
        Ok(())
    }
    fn commit(&mut self) -> strata_storage::Result<()> {
        Ok(())
    }
    fn reap(&mut self, out: &mut Vec<strata_storage::io::Completion>) -> usize {
        if self.1.load(std::sync::atomic::Ordering::SeqCst) {
            return 0;
        }
        let n = self.0.len();
        out.append(&mut self.0);
        n
    }
    fn wait(&mut self, _: Option<std::time::Duration>) -> strata_storage::Result<()> {
        Ok(())
    }
    fn notifier(&self) -> Option<&Arc<vmm_sys_util::eventfd::EventFd>> {
        None
    }
}

impl BlockDevice for SilentDevice {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::WRITE | Capabilities::FLUSH | Capabilities::DISCARD
    }
    fn alignment(&self) -> usize {
        512
    }
    fn open_queue(
        &self,
        _: &QueueOptions,
    ) -> strata_storage::Result<Box<dyn strata_storage::io::IoQueue>> {
        Ok(Box::new(SilentQueue(Vec::new(), self.hold.clone())))
    }
    fn flush(&self) -> strata_storage::Result<()> {
        Ok(())
    }
    fn resize(&self, _: u64) -> strata_storage::Result<()> {
        Err(StorageError::Unsupported("resize".into()))
    }
    fn block_status(&self, offset: u64, len: u64) -> strata_storage::Result<Extent> {
        Ok(Extent {
            offset,
            len,
            kind: ExtentKind::Data,
        })
    }
}

#[test]
fn requests_completed_at_submit_without_a_signal_are_not_left_waiting() {
    let mut h = Harness::new(Arc::new(SilentDevice::default()), DiskOptions::default());
    h.fill(DATA, &[0u8; 16]);
    let st = h.request(req_type::DISCARD, 0, &[(DATA, 16, false)]);
    // Only the avail pass runs: no completion event will ever come for this request.
    assert!(h.engine.process_avail(&mut h.queue, &h.mem));
    assert_eq!(h.used_idx(), 1);
    assert_eq!(h.status(st), status::OK);
    assert_eq!(h.engine.in_flight(), 0);
}

/// When the engine runs out of slots it leaves chains in the ring with notifications off, so no
/// kick will announce them: once room is back it must take them by itself (`wants_rerun`, or on
/// the next completion), or the queue hangs.
#[test]
fn a_full_engine_takes_the_rest_of_the_ring_once_room_is_back() {
    for via_completion in [false, true] {
        let disk = MemoryDevice::new(1 << 20);
        let mut h = Harness::new(disk.clone(), DiskOptions::default());
        let small = DiskOptions {
            queue_size: 4,
            ..DiskOptions::default()
        };
        h.engine =
            QueueEngine::new("small", Arc::new(BlkConfig::new(disk, &small).unwrap())).unwrap();
        h.queue.set_event_idx(true);
        let sts: Vec<u64> = (0..6).map(|_| h.request(req_type::FLUSH, 0, &[])).collect();
        h.engine.process_avail(&mut h.queue, &h.mem);
        // The memory disk answers at once: four done, their slots free, two chains waiting.
        assert_eq!(h.used_idx(), 4);
        assert!(h.engine.wants_rerun());
        if via_completion {
            h.engine.process_completions(&mut h.queue, &h.mem);
        } else {
            h.engine.process_avail(&mut h.queue, &h.mem);
        }
        assert_eq!(h.used_idx(), 6, "the waiting chains were left behind");
        assert!(sts.iter().all(|&s| h.status(s) == status::OK));
        assert!(!h.engine.wants_rerun());
        // Kicks are asked for again from the next chain on.
        let avail_event: u16 = h
            .mem
            .read_obj(GuestAddress(h.used + 4 + 8 * u64::from(QSIZE)))
            .unwrap();
        assert_eq!(avail_event, 6);
    }
}

#[test]
fn discard_and_write_zeroes_beyond_the_advertised_maximum_get_ioerr() {
    // 4 GiB (sparse): the range itself lies on the disk, only the length is too long.
    let disk = MemoryDevice::new(4 << 30);
    let mut h = Harness::new(disk, DiskOptions::default());
    let too_long = crate::blk::config::MAX_DISCARD_SECTORS + 1;
    for (kind, at) in [
        (req_type::DISCARD, DATA),
        (req_type::WRITE_ZEROES, DATA + 64),
    ] {
        let mut seg = [0u8; 16];
        seg[8..12].copy_from_slice(&too_long.to_le_bytes());
        h.fill(at, &seg);
        let st = h.request(kind, 0, &[(at, 16, false)]);
        expect_status(&mut h, st, status::IOERR);
    }
    let mut seg = [0u8; 16];
    seg[8..12].copy_from_slice(&8u32.to_le_bytes());
    h.fill(DATA + 128, &seg);
    let st = h.request(req_type::WRITE_ZEROES, 0, &[(DATA + 128, 16, false)]);
    expect_status(&mut h, st, status::OK);
}

/// Requests given up when their ring stops (vhost-user's drain timeout) complete without a
/// status byte or a used entry: the ring may belong to a restarted queue by then.
#[test]
fn abandoned_requests_complete_without_touching_the_ring() {
    let dev = Arc::new(SilentDevice::default());
    dev.hold.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut h = Harness::new(dev.clone(), DiskOptions::default());
    let st = h.request(req_type::FLUSH, 0, &[]);
    h.engine.process_avail(&mut h.queue, &h.mem);
    assert_eq!(h.engine.in_flight(), 1);
    h.engine.abandon_in_flight();
    dev.hold.store(false, std::sync::atomic::Ordering::SeqCst);
    h.engine.process_completions(&mut h.queue, &h.mem);
    assert_eq!(h.engine.in_flight(), 0, "the slot is free again");
    assert_eq!(h.used_idx(), 0, "no used entry for an abandoned request");
    assert_eq!(h.status(st), 0xff, "no status byte either");
    // New requests are served as usual.
    let st = h.request(req_type::FLUSH, 0, &[]);
    h.run();
    assert_eq!(h.used_idx(), 1);
    assert_eq!(h.status(st), status::OK);
}

//! Property tests of the virtio-blk engine: random batches of requests — well-formed ones of
//! every type, split over random segments and sometimes in indirect tables, and malformed ones of
//! every shape a guest can build — run against an in-memory disk and a `Vec<u8>` model. Each
//! chain is answered exactly once, with the right status and used length; a read returns the
//! model's bytes; the disk ends equal to the model; and guest memory changes only in the used
//! ring and in buffers the chains name as device-writable (`Ring::run_checked`). The fuzz target
//! `blk_engine` plays arbitrary tables against the same checks.

use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress};

use super::testing::{Ring, DATA, DESC, DISK_SIZE, F_INDIRECT, F_NEXT, F_WRITE, MEM_SIZE, QSIZE};
use super::{req_type, status, ID_BYTES, SECTOR_SIZE};

/// A chain the driver builds, and what the device must answer.
#[derive(Clone, Debug)]
enum Shape {
    Read {
        sector: u64,
        segs: Vec<u32>,
    },
    Write {
        sector: u64,
        segs: Vec<u32>,
        seed: u8,
    },
    Flush,
    GetId {
        len: u32,
    },
    Zero {
        discard: bool,
        sector: u64,
        sectors: u32,
    },
    /// A well-formed read or write whose descriptors sit in an indirect table.
    Indirect {
        write: bool,
        sector: u64,
        sectors: u32,
    },
    DataOutsideMemory {
        write: bool,
        at: u64,
    },
    WrongDirection {
        write: bool,
    },
    ReadableAfterWritable,
    UnalignedLength {
        len: u32,
    },
    BeyondDisk {
        back: u64,
    },
    UnknownType {
        kind: u32,
    },
    ShortHeader {
        len: u32,
    },
    NoStatus,
    EmptyStatus,
    StatusOutsideMemory {
        at: u64,
    },
    Looped,
    NextOutOfTable {
        next: u16,
    },
    OverlappingReads,
    ZeroFlags {
        discard: bool,
        flags: u32,
    },
    IndirectOutsideMemory,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// OK with this used length.
    Ok(u32),
    /// This status, used length 1.
    Status(u8),
    /// Head returned with used length 0.
    Broken,
}

fn shape() -> impl Strategy<Value = Shape> {
    let sector = 0..DISK_SIZE / SECTOR_SIZE - 16;
    let segs = prop::collection::vec(1u32..=4, 1..=4);
    prop_oneof![
        3 => (sector.clone(), segs.clone()).prop_map(|(sector, segs)| Shape::Read { sector, segs }),
        3 => (sector.clone(), segs, any::<u8>())
            .prop_map(|(sector, segs, seed)| Shape::Write { sector, segs, seed }),
        1 => Just(Shape::Flush),
        1 => (1u32..=32).prop_map(|len| Shape::GetId { len }),
        2 => (any::<bool>(), sector.clone(), 1u32..=16)
            .prop_map(|(discard, sector, sectors)| Shape::Zero { discard, sector, sectors }),
        2 => (any::<bool>(), sector, 1u32..=8)
            .prop_map(|(write, sector, sectors)| Shape::Indirect { write, sector, sectors }),
        1 => (any::<bool>(), MEM_SIZE - 256..MEM_SIZE + 0x10_0000)
            .prop_map(|(write, at)| Shape::DataOutsideMemory { write, at }),
        1 => any::<bool>().prop_map(|write| Shape::WrongDirection { write }),
        1 => Just(Shape::ReadableAfterWritable),
        1 => (1u32..4096).prop_filter("unaligned", |l| l % 512 != 0)
            .prop_map(|len| Shape::UnalignedLength { len }),
        1 => (0u64..8).prop_map(|back| Shape::BeyondDisk { back }),
        1 => prop_oneof![Just(2u32), Just(3), Just(5), Just(12), Just(99), Just(u32::MAX)]
            .prop_map(|kind| Shape::UnknownType { kind }),
        1 => (0u32..16).prop_map(|len| Shape::ShortHeader { len }),
        1 => Just(Shape::NoStatus),
        1 => Just(Shape::EmptyStatus),
        1 => (MEM_SIZE..MEM_SIZE + 0x1000).prop_map(|at| Shape::StatusOutsideMemory { at }),
        1 => Just(Shape::Looped),
        1 => (QSIZE..u16::MAX).prop_map(|next| Shape::NextOutOfTable { next }),
        1 => Just(Shape::OverlappingReads),
        1 => (any::<bool>(), 1u32..=u32::MAX)
            .prop_map(|(discard, flags)| Shape::ZeroFlags { discard, flags }),
        1 => Just(Shape::IndirectOutsideMemory),
    ]
}

/// Descriptors of a chain: address, length, flags.
type Descs = Vec<(u64, u32, u16)>;

/// A chain made available: its head, what must come back, where its status byte is, and the
/// buffers a read fills with the bytes they must hold.
type Expected = (u16, Outcome, u64, Vec<(u64, Vec<u8>)>);

/// Builds chains in a ring and remembers what each must come back with.
struct Driver {
    ring: Ring,
    model: Vec<u8>,
    free: Vec<u16>,
    /// Next free guest address for buffers (reset between batches).
    bump: u64,
    /// Head → (outcome, status address, read buffers and the bytes they must hold).
    pending: Vec<Expected>,
}

impl Driver {
    fn new(event_idx: bool) -> Driver {
        Driver {
            ring: Ring::new(event_idx, false, false),
            model: vec![0u8; DISK_SIZE as usize],
            free: (0..QSIZE).rev().collect(),
            bump: DATA + 0x1000,
            pending: Vec::new(),
        }
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let at = self.bump;
        self.bump = (at + len).next_multiple_of(64);
        assert!(self.bump < MEM_SIZE, "the test ran out of guest memory");
        at
    }

    fn header(&mut self, kind: u32, sector: u64) -> u64 {
        let at = self.alloc(16);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.ring.mem.write_slice(&h, GuestAddress(at)).unwrap();
        at
    }

    fn status(&mut self) -> u64 {
        let at = self.alloc(1);
        self.ring.mem.write_obj(0xa5u8, GuestAddress(at)).unwrap();
        at
    }

    /// Writes `descs` (address, length, flags) linked in order into free table entries; the
    /// last one's `next` is `last_next` (with its flags deciding whether it is followed).
    fn link(&mut self, descs: &[(u64, u32, u16)], last_next: Option<u16>) -> Option<u16> {
        if descs.len() > self.free.len() {
            return None;
        }
        let idx: Vec<u16> = (0..descs.len()).filter_map(|_| self.free.pop()).collect();
        for (k, &(addr, len, flags)) in descs.iter().enumerate() {
            let (flags, next) = match idx.get(k + 1) {
                Some(&n) => (flags | F_NEXT, n),
                None => (flags, last_next.unwrap_or(0)),
            };
            self.ring.write_desc(DESC, idx[k], addr, len, flags, next);
        }
        // Descriptors of a chain come back with its head: keep them out of the free list
        // until then (the head is the first).
        Some(idx[0])
    }

    /// Adds one chain for `s`; false when the table has no room.
    fn add(&mut self, s: &Shape) -> bool {
        let io = status::IOERR;
        let rw = |w: bool| if w { 0 } else { F_WRITE }; // data direction: device writes on a read
        let mut reads: Vec<(u64, Vec<u8>)> = Vec::new();
        let (descs, outcome, st, last_next): (Descs, Outcome, u64, Option<u16>) = match s {
            Shape::Read { sector, segs } | Shape::Write { sector, segs, .. } => {
                let write = matches!(s, Shape::Write { .. });
                let kind = if write { req_type::OUT } else { req_type::IN };
                let hdr = self.header(kind, *sector);
                let mut descs = vec![(hdr, 16, 0)];
                let mut off = (*sector * SECTOR_SIZE) as usize;
                let mut total = 0u32;
                for (i, &n) in segs.iter().enumerate() {
                    let len = n * SECTOR_SIZE as u32;
                    let at = self.alloc(u64::from(len));
                    if let Shape::Write { seed, .. } = s {
                        let data: Vec<u8> = (0..len)
                            .map(|b| (b as u8) ^ seed.wrapping_add(i as u8))
                            .collect();
                        self.ring.mem.write_slice(&data, GuestAddress(at)).unwrap();
                        self.model[off..off + len as usize].copy_from_slice(&data);
                    } else {
                        reads.push((at, self.model[off..off + len as usize].to_vec()));
                    }
                    off += len as usize;
                    total += len;
                    descs.push((at, len, rw(write)));
                }
                let st = self.status();
                descs.push((st, 1, F_WRITE));
                let used = if write { 1 } else { total + 1 };
                (descs, Outcome::Ok(used), st, None)
            }
            Shape::Flush => {
                let hdr = self.header(req_type::FLUSH, 0);
                let st = self.status();
                (
                    vec![(hdr, 16, 0), (st, 1, F_WRITE)],
                    Outcome::Ok(1),
                    st,
                    None,
                )
            }
            Shape::GetId { len } => {
                let hdr = self.header(req_type::GET_ID, 0);
                let at = self.alloc(u64::from(*len));
                let n = (*len as usize).min(ID_BYTES);
                reads.push((at, self.ring.cfg.serial()[..n].to_vec()));
                let st = self.status();
                let descs = vec![(hdr, 16, 0), (at, *len, F_WRITE), (st, 1, F_WRITE)];
                (descs, Outcome::Ok(n as u32 + 1), st, None)
            }
            Shape::Zero {
                discard,
                sector,
                sectors,
            } => {
                let kind = if *discard {
                    req_type::DISCARD
                } else {
                    req_type::WRITE_ZEROES
                };
                let hdr = self.header(kind, 0);
                let seg = self.alloc(16);
                let mut b = [0u8; 16];
                b[0..8].copy_from_slice(&sector.to_le_bytes());
                b[8..12].copy_from_slice(&sectors.to_le_bytes());
                self.ring.mem.write_slice(&b, GuestAddress(seg)).unwrap();
                let st = self.status();
                let (a, n) = ((*sector * SECTOR_SIZE) as usize, *sectors as usize * 512);
                self.model[a..a + n].fill(0);
                (
                    vec![(hdr, 16, 0), (seg, 16, 0), (st, 1, F_WRITE)],
                    Outcome::Ok(1),
                    st,
                    None,
                )
            }
            Shape::Indirect {
                write,
                sector,
                sectors,
            } => {
                let kind = if *write { req_type::OUT } else { req_type::IN };
                let hdr = self.header(kind, *sector);
                let len = sectors * SECTOR_SIZE as u32;
                let at = self.alloc(u64::from(len));
                let off = (*sector * SECTOR_SIZE) as usize;
                if *write {
                    let data: Vec<u8> = (0..len).map(|b| (b >> 3) as u8 ^ 0x6b).collect();
                    self.ring.mem.write_slice(&data, GuestAddress(at)).unwrap();
                    self.model[off..off + len as usize].copy_from_slice(&data);
                } else {
                    reads.push((at, self.model[off..off + len as usize].to_vec()));
                }
                let st = self.status();
                let table = self.alloc(48);
                let inner = [
                    (hdr, 16, F_NEXT, 1),
                    (at, len, rw(*write) | F_NEXT, 2),
                    (st, 1, F_WRITE, 0),
                ];
                for (i, &(a, l, f, n)) in inner.iter().enumerate() {
                    self.ring.write_desc(table, i as u16, a, l, f, n);
                }
                let used = if *write { 1 } else { len + 1 };
                (vec![(table, 48, F_INDIRECT)], Outcome::Ok(used), st, None)
            }
            Shape::DataOutsideMemory { write, at } => {
                let kind = if *write { req_type::OUT } else { req_type::IN };
                let hdr = self.header(kind, 0);
                let st = self.status();
                let descs = vec![(hdr, 16, 0), (*at, 512, rw(*write)), (st, 1, F_WRITE)];
                (descs, Outcome::Status(io), st, None)
            }
            Shape::WrongDirection { write } => {
                let kind = if *write { req_type::OUT } else { req_type::IN };
                let hdr = self.header(kind, 0);
                let at = self.alloc(512);
                let st = self.status();
                let descs = vec![(hdr, 16, 0), (at, 512, rw(!*write)), (st, 1, F_WRITE)];
                (descs, Outcome::Status(io), st, None)
            }
            Shape::ReadableAfterWritable => {
                let hdr = self.header(req_type::IN, 0);
                let (a, b) = (self.alloc(512), self.alloc(512));
                let st = self.status();
                let descs = vec![
                    (hdr, 16, 0),
                    (a, 512, F_WRITE),
                    (b, 512, 0),
                    (st, 1, F_WRITE),
                ];
                (descs, Outcome::Status(io), st, None)
            }
            Shape::UnalignedLength { len } => {
                let hdr = self.header(req_type::IN, 0);
                let at = self.alloc(u64::from(*len));
                let st = self.status();
                (
                    vec![(hdr, 16, 0), (at, *len, F_WRITE), (st, 1, F_WRITE)],
                    Outcome::Status(io),
                    st,
                    None,
                )
            }
            Shape::BeyondDisk { back } => {
                let hdr = self.header(req_type::IN, DISK_SIZE / SECTOR_SIZE - back);
                let at = self.alloc(8 * 512);
                let st = self.status();
                (
                    vec![(hdr, 16, 0), (at, 8 * 512, F_WRITE), (st, 1, F_WRITE)],
                    Outcome::Status(io),
                    st,
                    None,
                )
            }
            Shape::UnknownType { kind } => {
                let hdr = self.header(*kind, 0);
                let st = self.status();
                (
                    vec![(hdr, 16, 0), (st, 1, F_WRITE)],
                    Outcome::Status(status::UNSUPP),
                    st,
                    None,
                )
            }
            Shape::ShortHeader { len } => {
                let hdr = self.header(req_type::IN, 0);
                let st = self.status();
                (
                    vec![(hdr, *len, 0), (st, 1, F_WRITE)],
                    Outcome::Status(io),
                    st,
                    None,
                )
            }
            Shape::NoStatus => {
                let hdr = self.header(req_type::FLUSH, 0);
                let st = self.status();
                (vec![(hdr, 16, 0), (st, 1, 0)], Outcome::Broken, st, None)
            }
            Shape::EmptyStatus => {
                let hdr = self.header(req_type::FLUSH, 0);
                let st = self.status();
                (
                    vec![(hdr, 16, 0), (st, 0, F_WRITE)],
                    Outcome::Broken,
                    st,
                    None,
                )
            }
            Shape::StatusOutsideMemory { at } => {
                let hdr = self.header(req_type::FLUSH, 0);
                let st = self.status();
                (
                    vec![(hdr, 16, 0), (*at, 1, F_WRITE)],
                    Outcome::Broken,
                    st,
                    None,
                )
            }
            Shape::Looped => {
                let hdr = self.header(req_type::FLUSH, 0);
                let st = self.status();
                // The last descriptor leads back to the head (set below, once it is known).
                (
                    vec![(hdr, 16, 0), (st, 1, F_WRITE | F_NEXT)],
                    Outcome::Broken,
                    st,
                    Some(u16::MAX),
                )
            }
            Shape::NextOutOfTable { next } => {
                let hdr = self.header(req_type::FLUSH, 0);
                let st = self.status();
                (
                    vec![(hdr, 16, 0), (st, 1, F_WRITE | F_NEXT)],
                    Outcome::Broken,
                    st,
                    Some(*next),
                )
            }
            Shape::OverlappingReads => {
                let hdr = self.header(req_type::IN, 0);
                let at = self.alloc(1536);
                let st = self.status();
                let descs = vec![
                    (hdr, 16, 0),
                    (at, 1024, F_WRITE),
                    (at + 512, 1024, F_WRITE),
                    (st, 1, F_WRITE),
                ];
                (descs, Outcome::Status(io), st, None)
            }
            Shape::ZeroFlags { discard, flags } => {
                let kind = if *discard {
                    req_type::DISCARD
                } else {
                    req_type::WRITE_ZEROES
                };
                // Flags the request type does not allow: unmap on a discard, reserved bits.
                let flags = if *discard { *flags } else { *flags & !1 | 2 };
                let hdr = self.header(kind, 0);
                let seg = self.alloc(16);
                let mut b = [0u8; 16];
                b[8..12].copy_from_slice(&1u32.to_le_bytes());
                b[12..16].copy_from_slice(&flags.to_le_bytes());
                self.ring.mem.write_slice(&b, GuestAddress(seg)).unwrap();
                let st = self.status();
                (
                    vec![(hdr, 16, 0), (seg, 16, 0), (st, 1, F_WRITE)],
                    Outcome::Status(status::UNSUPP),
                    st,
                    None,
                )
            }
            Shape::IndirectOutsideMemory => {
                let st = self.status();
                (
                    vec![(MEM_SIZE + 0x1000, 48, F_INDIRECT)],
                    Outcome::Broken,
                    st,
                    None,
                )
            }
        };
        let Some(head) = self.link(&descs, last_next) else {
            return false;
        };
        if last_next == Some(u16::MAX) {
            // Close the loop: the last descriptor points at the head.
            let last = descs.len() - 1;
            let idx = self.chain_indices(head, descs.len());
            let (a, l, f) = descs[last];
            self.ring.write_desc(DESC, idx[last], a, l, f, head);
        }
        self.ring.publish(head);
        self.pending.push((head, outcome, st, reads));
        true
    }

    /// The table indices of a chain of `n` descriptors starting at `head` as `link` wrote it.
    fn chain_indices(&self, head: u16, n: usize) -> Vec<u16> {
        let mut idx = vec![head];
        let mut at = head;
        for _ in 1..n {
            let mut raw = [0u8; 2];
            self.ring
                .mem
                .read_slice(&mut raw, GuestAddress(DESC + 16 * u64::from(at) + 14))
                .unwrap();
            at = u16::from_le_bytes(raw);
            idx.push(at);
        }
        idx
    }

    /// Runs the engine, checks every pending chain's answer, and frees the table.
    fn run_and_check(&mut self) -> Result<(), TestCaseError> {
        let (_, self_modifying) = self.ring.writable_ranges();
        prop_assert!(
            !self_modifying,
            "the property test's chains never name the tables"
        );
        let used = self.ring.run_checked();
        prop_assert_eq!(
            used.len(),
            self.pending.len(),
            "every chain is answered once"
        );
        for (head, outcome, st, reads) in std::mem::take(&mut self.pending) {
            let Some(&(_, len)) = used.iter().find(|(id, _)| *id == u32::from(head)) else {
                return Err(TestCaseError::fail(format!("head {head} was not answered")));
            };
            let got: u8 = self.ring.mem.read_obj(GuestAddress(st)).unwrap();
            match outcome {
                Outcome::Ok(n) => {
                    prop_assert_eq!((got, len), (status::OK, n), "head {}", head);
                    for (at, want) in reads {
                        let mut buf = vec![0u8; want.len()];
                        self.ring
                            .mem
                            .read_slice(&mut buf, GuestAddress(at))
                            .unwrap();
                        prop_assert!(buf == want, "head {} read the wrong bytes", head);
                    }
                }
                Outcome::Status(want) => prop_assert_eq!((got, len), (want, 1), "head {}", head),
                Outcome::Broken => prop_assert_eq!((got, len), (0xa5, 0), "head {}", head),
            }
        }
        // Every chain came back: clear the table, so that no stale descriptor names buffers
        // the next batch reuses.
        let zeros = vec![0u8; 16 * usize::from(QSIZE)];
        self.ring
            .mem
            .write_slice(&zeros, GuestAddress(DESC))
            .unwrap();
        self.free = (0..QSIZE).rev().collect();
        self.bump = DATA + 0x1000;
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_chains_get_a_correct_answer_or_an_error(
        shapes in prop::collection::vec(shape(), 1..40),
        event_idx in any::<bool>(),
    ) {
        let mut d = Driver::new(event_idx);
        for s in &shapes {
            if !d.add(s) {
                d.run_and_check()?;
                prop_assert!(d.add(s), "a single chain fits an empty table");
            }
        }
        d.run_and_check()?;
        let mut disk = vec![0u8; DISK_SIZE as usize];
        strata_storage::HostFile::read_exact_at(d.ring.disk.as_ref(), 0, &mut disk).unwrap();
        prop_assert!(disk == d.model, "the disk differs from the model");
    }

    #[test]
    fn arbitrary_bytes_never_break_the_engine(data in prop::collection::vec(any::<u8>(), 0..2048)) {
        super::testing::fuzz_engine(&data);
    }

    #[test]
    fn arbitrary_chains_parse_within_their_descriptors(data in prop::collection::vec(any::<u8>(), 0..1024)) {
        super::testing::fuzz_chain(&data);
    }
}

/// The seeds of the fuzz targets are committed (`fuzz/corpus/blk_chain`, `blk_engine`; set
/// `STRATA_WRITE_SEEDS=1` to write them after changing [`super::testing::seeds`]), and every
/// file in those folders — seeds and whatever a fuzz run added — replays through the targets,
/// with a few hundred mutations of each, in ordinary `cargo test`.
#[test]
fn corpus_seeds_are_committed_and_replay_with_mutations() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (target, name, bytes) in super::testing::seeds() {
        let path = root.join(target).join(name);
        if std::env::var_os("STRATA_WRITE_SEEDS").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let committed = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (STRATA_WRITE_SEEDS=1 writes it)", path.display()));
        assert!(
            committed == bytes,
            "{} differs from seeds()",
            path.display()
        );
    }
    let mut rng = 0x5eed_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for (target, run) in [
        ("blk_chain", super::testing::fuzz_chain as fn(&[u8])),
        ("blk_engine", super::testing::fuzz_engine),
    ] {
        let mut files: Vec<_> = std::fs::read_dir(root.join(target))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty());
        for f in files {
            let seed = std::fs::read(&f).unwrap();
            run(&seed);
            for _ in 0..300 {
                let mut m = seed.clone();
                for _ in 0..1 + next() % 4 {
                    if m.is_empty() {
                        break;
                    }
                    let at = (next() % m.len() as u64) as usize;
                    match next() % 3 {
                        0 => m[at] ^= 1 << (next() % 8),
                        1 => m[at] = next() as u8,
                        _ => m.insert(at, next() as u8),
                    }
                }
                run(&m);
            }
        }
    }
}

/// The seeds do what their names say, so fuzzing starts from every request type.
#[test]
fn seeds_build_the_requests_they_are_named_after() {
    for (target, name, bytes) in super::testing::seeds() {
        if target == "blk_chain" {
            let want = if name == "unknown" { "fail" } else { name };
            assert_eq!(super::testing::chain_outcome(&bytes), want, "seed {name}");
        }
    }
    // write_then_read: the write lands on the disk, the read brings it back.
    let (_, _, bytes) = super::testing::seeds()
        .into_iter()
        .find(|s| s.1 == "write_then_read")
        .unwrap();
    let ring = super::testing::replay_engine(&bytes);
    let mut disk = vec![0u8; 1024];
    strata_storage::HostFile::read_exact_at(ring.disk.as_ref(), 1024, &mut disk).unwrap();
    assert!(
        disk[..512].iter().any(|&b| b != 0),
        "the write reached the disk"
    );
    let mut back = vec![0u8; 512];
    ring.mem
        .read_slice(&mut back, GuestAddress(DATA + 48))
        .unwrap();
    assert_eq!(back, disk[..512], "the read brought it back");
}

/// Found by `blk_engine`: a chain whose status byte lies in the descriptor table rewrote, as
/// asked, the address of the next chain's status byte. The harness knew only the table as it
/// was before the run and took the second (legitimate) write for a stray one; it now checks
/// byte for byte only runs whose tables do not name themselves as writable.
#[test]
fn regression_a_status_byte_inside_the_descriptor_table() {
    super::testing::fuzz_engine(include_bytes!("testdata/blk_engine_self_modifying_table"));
}

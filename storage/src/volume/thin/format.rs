//! The thin pool's on-disk metadata blocks: superblock, device table chunks and B-tree nodes.
//! Every block is 4 KiB, little-endian, checksummed with crc32, and records its own block number
//! and the transaction that wrote it, so a misdirected or stale block is recognised. The byte
//! layout is documented in docs/format-thin.md; this file is its implementation.

use crate::bytes::{le32, le64, put_le32, put_le64};
use crate::error::{Result, StorageError};
use crate::volume::codec::{seal, sealed, uuid_bytes, uuid_string};

/// Size of every metadata block.
pub const META_BLOCK: usize = 4096;
/// Superblock magic.
pub const SB_MAGIC: &[u8; 8] = b"STRTHINP";
/// Metadata format version.
pub const THIN_VERSION: u32 = 1;
/// Device table chunk magic.
pub const TABLE_MAGIC: &[u8; 4] = b"TDEV";
/// Node magic.
pub const NODE_MAGIC: &[u8; 4] = b"TNOD";
/// Entries per B-tree node.
pub const NODE_CAPACITY: usize = 254;
/// Entries per device table chunk.
pub const TABLE_ENTRIES: usize = 22;
/// Most device table chunks (so at most 22 × 480 = 10,560 thin devices).
pub const MAX_TABLE_CHUNKS: usize = 480;
/// Deepest tree accepted (254^8 keys is far more than 2^40 blocks).
pub const MAX_LEVEL: u8 = 8;
/// Size of one device table entry.
pub const ENTRY_SIZE: usize = 176;
/// Longest device name stored.
pub const ENTRY_NAME_MAX: usize = 128;
/// Data block numbers use the low 40 bits of a leaf value.
pub const BLOCK_BITS: u32 = 40;
/// No origin.
pub const NO_ORIGIN: u32 = u32::MAX;

/// Device flag: read-only (a snapshot).
pub const FLAG_READ_ONLY: u32 = 1;
/// Device flag: a template that clones may be made from.
pub const FLAG_TEMPLATE: u32 = 2;

const SB_CRC_AT: usize = 12;
const SB_CHUNKS_AT: usize = 112;
const BLOCK_CRC_AT: usize = 4;
const KEYS_AT: usize = 32;
const VALS_AT: usize = KEYS_AT + NODE_CAPACITY * 8;

const _: () = assert!(SB_CHUNKS_AT + MAX_TABLE_CHUNKS * 8 <= META_BLOCK);
const _: () = assert!(32 + TABLE_ENTRIES * ENTRY_SIZE <= META_BLOCK);
const _: () = assert!(VALS_AT + NODE_CAPACITY * 8 == META_BLOCK);

/// Packs a leaf value: data block and the low 24 bits of the transaction that allocated it.
pub fn pack(block: u64, birth: u64) -> u64 {
    (block & ((1 << BLOCK_BITS) - 1)) | ((birth & 0xff_ffff) << BLOCK_BITS)
}

/// The data block of a leaf value.
pub fn block_of(value: u64) -> u64 {
    value & ((1 << BLOCK_BITS) - 1)
}

/// The birth transaction (low 24 bits) of a leaf value.
pub fn birth_of(value: u64) -> u64 {
    value >> BLOCK_BITS
}

/// The superblock. Two slots, metadata blocks 0 and 1; transaction N is written to slot N % 2.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Transaction number (≥ 1).
    pub seq: u64,
    /// The pool's identifier (its volume's), so metadata is never read for the wrong pool.
    pub pool_uuid: String,
    /// Bytes per data block.
    pub block_size: u32,
    /// Data blocks in the pool.
    pub data_blocks: u64,
    /// Metadata blocks in the metadata volume.
    pub meta_blocks: u64,
    /// Data blocks in use at this transaction.
    pub used_data: u64,
    /// Metadata blocks in use at this transaction.
    pub used_meta: u64,
    /// Thin devices.
    pub device_count: u32,
    /// Next device identifier to hand out.
    pub next_id: u32,
    /// Every data block from this one on holds zeros on disk (never written since the data
    /// volume was zeroed); the data block count when nothing is known.
    pub zero_from: u64,
    /// Blocks of the device table chunks, in order.
    pub chunks: Vec<u64>,
}

impl Superblock {
    /// Encodes the superblock for its slot.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; META_BLOCK];
        b[0..8].copy_from_slice(SB_MAGIC);
        put_le32(&mut b, 8, THIN_VERSION);
        put_le64(&mut b, 16, self.seq);
        b[24..40].copy_from_slice(&uuid_bytes(&self.pool_uuid));
        put_le32(&mut b, 40, self.block_size);
        put_le32(&mut b, 44, META_BLOCK as u32);
        put_le64(&mut b, 48, self.data_blocks);
        put_le64(&mut b, 56, self.meta_blocks);
        put_le64(&mut b, 64, self.used_data);
        put_le64(&mut b, 72, self.used_meta);
        put_le32(&mut b, 80, self.device_count);
        put_le32(&mut b, 84, self.next_id);
        put_le32(&mut b, 88, self.chunks.len() as u32);
        put_le64(&mut b, 96, self.seq % 2);
        put_le64(&mut b, 104, self.zero_from);
        for (i, c) in self.chunks.iter().enumerate() {
            put_le64(&mut b, SB_CHUNKS_AT + i * 8, *c);
        }
        seal(&mut b, SB_CRC_AT);
        b
    }

    /// Decodes slot `slot`: `Ok(None)` for an all-zero (never written) slot, `Err` for damage.
    pub fn decode(b: &[u8], slot: u64, what: &str) -> Result<Option<Superblock>> {
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        let bad = |d: &str| {
            Err(StorageError::corrupt(
                what,
                format!("superblock {slot}: {d}"),
            ))
        };
        if &b[0..8] != SB_MAGIC {
            return bad("bad magic");
        }
        if !sealed(b, SB_CRC_AT) {
            return bad("checksum mismatch");
        }
        let version = le32(b, 8);
        if version != THIN_VERSION {
            return Err(StorageError::Unsupported(format!(
                "thin pool metadata version {version} ({what})"
            )));
        }
        let sb = Superblock {
            seq: le64(b, 16),
            pool_uuid: uuid_string(&b[24..40]),
            block_size: le32(b, 40),
            data_blocks: le64(b, 48),
            meta_blocks: le64(b, 56),
            used_data: le64(b, 64),
            used_meta: le64(b, 72),
            device_count: le32(b, 80),
            next_id: le32(b, 84),
            zero_from: le64(b, 104),
            chunks: Vec::new(),
        };
        let nchunks = le32(b, 88) as usize;
        if le32(b, 44) as usize != META_BLOCK
            || sb.seq == 0
            || sb.seq % 2 != slot
            || le64(b, 96) != slot
            || nchunks > MAX_TABLE_CHUNKS
            || sb.data_blocks >= 1 << BLOCK_BITS
            || sb.used_data > sb.data_blocks
            || sb.used_meta > sb.meta_blocks
            || sb.zero_from > sb.data_blocks
            || sb.device_count as usize > nchunks * TABLE_ENTRIES
        {
            return bad("impossible field values");
        }
        let chunks = (0..nchunks)
            .map(|i| le64(b, SB_CHUNKS_AT + i * 8))
            .collect::<Vec<_>>();
        if chunks.iter().any(|&c| c < 2 || c >= sb.meta_blocks) {
            return bad("device table block out of range");
        }
        Ok(Some(Superblock { chunks, ..sb }))
    }
}

/// One thin device as stored in the device table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevEntry {
    /// Identifier, unique in the pool, never reused.
    pub id: u32,
    /// [`FLAG_READ_ONLY`], [`FLAG_TEMPLATE`].
    pub flags: u32,
    /// Virtual size in bytes (a multiple of the block size).
    pub size: u64,
    /// Root node of its mapping tree (0: empty).
    pub root: u64,
    /// Blocks mapped.
    pub mapped: u64,
    /// Creation time, seconds since the epoch.
    pub created: u64,
    /// The device it was snapshotted or cloned from, if any.
    pub origin: Option<u32>,
    /// Its name (a logical volume name).
    pub name: String,
}

/// Encodes device table chunk `block` of transaction `seq`.
pub fn encode_table(entries: &[DevEntry], block: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; META_BLOCK];
    b[0..4].copy_from_slice(TABLE_MAGIC);
    put_le64(&mut b, 8, block);
    put_le64(&mut b, 16, seq);
    put_le32(&mut b, 24, entries.len() as u32);
    for (i, e) in entries.iter().enumerate() {
        let at = 32 + i * ENTRY_SIZE;
        put_le32(&mut b, at, e.id);
        put_le32(&mut b, at + 4, e.flags);
        put_le64(&mut b, at + 8, e.size);
        put_le64(&mut b, at + 16, e.root);
        put_le64(&mut b, at + 24, e.mapped);
        put_le64(&mut b, at + 32, e.created);
        put_le32(&mut b, at + 40, e.origin.unwrap_or(NO_ORIGIN));
        let name = e.name.as_bytes();
        let n = name.len().min(ENTRY_NAME_MAX);
        b[at + 44] = n as u8;
        b[at + 48..at + 48 + n].copy_from_slice(&name[..n]);
    }
    seal(&mut b, BLOCK_CRC_AT);
    b
}

/// Checks the common header of table chunks and nodes: magic, checksum, own block number
/// (catches misdirected writes), and a transaction no newer than the superblock's.
fn check_header(
    b: &[u8],
    magic: &[u8; 4],
    block: u64,
    max_seq: u64,
) -> std::result::Result<(), String> {
    if &b[0..4] != magic {
        return Err("bad magic".into());
    }
    if !sealed(b, BLOCK_CRC_AT) {
        return Err("checksum mismatch".into());
    }
    if le64(b, 8) != block {
        return Err(format!("holds block {} (misdirected write?)", le64(b, 8)));
    }
    let seq = le64(b, 16);
    if seq > max_seq {
        return Err(format!(
            "written by transaction {seq}, after the superblock's {max_seq}"
        ));
    }
    Ok(())
}

/// Decodes device table chunk `block`, written at or before transaction `max_seq`.
pub fn decode_table(b: &[u8], block: u64, max_seq: u64, what: &str) -> Result<Vec<DevEntry>> {
    let bad = |d: String| StorageError::corrupt(what, format!("device table block {block}: {d}"));
    check_header(b, TABLE_MAGIC, block, max_seq).map_err(bad)?;
    let count = le32(b, 24) as usize;
    if count > TABLE_ENTRIES {
        return Err(bad(format!("{count} entries")));
    }
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let at = 32 + i * ENTRY_SIZE;
        let n = b[at + 44] as usize;
        if n == 0 || n > ENTRY_NAME_MAX {
            return Err(bad(format!("entry {i} has a name of {n} bytes")));
        }
        let name = std::str::from_utf8(&b[at + 48..at + 48 + n])
            .map_err(|_| bad(format!("entry {i} has a name that is not UTF-8")))?
            .to_string();
        let origin = le32(b, at + 40);
        out.push(DevEntry {
            id: le32(b, at),
            flags: le32(b, at + 4),
            size: le64(b, at + 8),
            root: le64(b, at + 16),
            mapped: le64(b, at + 24),
            created: le64(b, at + 32),
            origin: (origin != NO_ORIGIN).then_some(origin),
            name,
        });
    }
    Ok(out)
}

/// A B-tree node. Leaves (level 0) map virtual blocks to packed data blocks; interior nodes map
/// the lowest key of each child to the child's metadata block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// 0 for a leaf.
    pub level: u8,
    /// Keys, strictly increasing.
    pub keys: Vec<u64>,
    /// Values, one per key.
    pub vals: Vec<u64>,
}

impl Node {
    /// An empty node of `level`.
    pub fn new(level: u8) -> Node {
        Node {
            level,
            keys: Vec::with_capacity(NODE_CAPACITY),
            vals: Vec::with_capacity(NODE_CAPACITY),
        }
    }

    /// Whether the node is full.
    pub fn is_full(&self) -> bool {
        self.keys.len() >= NODE_CAPACITY
    }

    /// Encodes the node as block `block` of transaction `seq`.
    pub fn encode(&self, block: u64, seq: u64) -> Vec<u8> {
        let mut b = vec![0u8; META_BLOCK];
        b[0..4].copy_from_slice(NODE_MAGIC);
        put_le64(&mut b, 8, block);
        put_le64(&mut b, 16, seq);
        b[24] = self.level;
        put_le32(&mut b, 28, self.keys.len() as u32);
        for (i, (k, v)) in self.keys.iter().zip(&self.vals).enumerate() {
            put_le64(&mut b, KEYS_AT + i * 8, *k);
            put_le64(&mut b, VALS_AT + i * 8, *v);
        }
        seal(&mut b, BLOCK_CRC_AT);
        b
    }

    /// Decodes block `block`, written at or before transaction `max_seq`.
    pub fn decode(b: &[u8], block: u64, max_seq: u64, what: &str) -> Result<Node> {
        let bad = |d: String| StorageError::corrupt(what, format!("node {block}: {d}"));
        check_header(b, NODE_MAGIC, block, max_seq).map_err(bad)?;
        let level = b[24];
        let count = le32(b, 28) as usize;
        if level > MAX_LEVEL || count == 0 || count > NODE_CAPACITY {
            return Err(bad(format!("level {level} with {count} entries")));
        }
        let mut n = Node::new(level);
        for i in 0..count {
            let k = le64(b, KEYS_AT + i * 8);
            if n.keys.last().is_some_and(|&last| last >= k) {
                return Err(bad("keys out of order".into()));
            }
            n.keys.push(k);
            n.vals.push(le64(b, VALS_AT + i * 8));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trips_and_refuses_the_wrong_slot() {
        let sb = Superblock {
            seq: 7,
            pool_uuid: crate::volume::name::new_uuid(),
            block_size: 65536,
            data_blocks: 100,
            meta_blocks: 50,
            used_data: 3,
            used_meta: 4,
            device_count: 1,
            next_id: 2,
            zero_from: 40,
            chunks: vec![5],
        };
        let b = sb.encode();
        assert_eq!(Superblock::decode(&b, 1, "t").unwrap(), Some(sb));
        assert!(Superblock::decode(&b, 0, "t").is_err());
        assert_eq!(Superblock::decode(&[0u8; 4096], 0, "t").unwrap(), None);
    }

    #[test]
    fn nodes_and_tables_round_trip_and_detect_misdirection() {
        let mut n = Node::new(0);
        n.keys.extend([1, 5, 9]);
        n.vals
            .extend([pack(3, 2), pack(4, 2), pack(1 << 39, 0xff_ffff)]);
        let b = n.encode(12, 3);
        assert_eq!(Node::decode(&b, 12, 3, "t").unwrap(), n);
        assert!(Node::decode(&b, 13, 3, "t").is_err());
        assert!(Node::decode(&b, 12, 2, "t").is_err());
        assert_eq!(block_of(n.vals[2]), 1 << 39);
        assert_eq!(birth_of(n.vals[2]), 0xff_ffff);
        let e = DevEntry {
            id: 4,
            flags: FLAG_TEMPLATE,
            size: 1 << 30,
            root: 9,
            mapped: 2,
            created: 1,
            origin: Some(1),
            name: "vm-100-disk-0".into(),
        };
        let t = encode_table(std::slice::from_ref(&e), 20, 5);
        assert_eq!(decode_table(&t, 20, 5, "t").unwrap(), vec![e]);
    }
}

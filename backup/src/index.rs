//! The index of a snapshot: one entry per fixed-size chunk of the source, in order.
//!
//! Binary, little-endian: a 64-byte header, `count` 40-byte entries, an 8-byte trailer with a
//! crc32 over everything before it. Byte layout: docs/format-datastore.md. Parsing checks the
//! magic, the header crc, that the length is exactly what the count implies, that the count
//! matches the source size, and the trailer crc, so a truncated or damaged index is always
//! reported, never half-used.

use strata_storage::bytes::{le32, le64};
use strata_storage::{Result, StorageError};

use crate::digest::{Digest, DIGEST_LEN};

/// Magic at the start of every index.
pub const INDEX_MAGIC: [u8; 8] = *b"STRIDX01";
/// Index format version.
pub const INDEX_VERSION: u32 = 1;
/// Header size.
pub const INDEX_HEADER_LEN: usize = 64;
/// Entry size.
pub const INDEX_ENTRY_LEN: usize = 40;
/// Trailer size.
pub const INDEX_TRAILER_LEN: usize = 8;
/// Trailer magic.
pub const INDEX_END_MAGIC: [u8; 4] = *b"IEND";
/// Smallest and largest chunk sizes an index may declare.
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// See [`MIN_CHUNK_SIZE`].
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Largest index accepted (26 million chunks: 100 TiB at 4 MiB), bounding what a header sizes.
pub const MAX_INDEX_LEN: u64 = 1 << 30;

const ENTRY_ZERO: u32 = 1;

const _: () = assert!(INDEX_ENTRY_LEN == DIGEST_LEN + 8);

/// One chunk of a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// The chunk is all zeros and is not stored.
    Zero,
    /// The chunk is stored under `digest`; `stored_len` is its blob payload size.
    Stored {
        /// BLAKE3 of the uncompressed chunk.
        digest: Digest,
        /// Bytes of payload in its blob (for statistics).
        stored_len: u32,
    },
}

impl Entry {
    /// The chunk's digest, unless it is a zero chunk.
    pub fn digest(&self) -> Option<Digest> {
        match self {
            Entry::Zero => None,
            Entry::Stored { digest, .. } => Some(*digest),
        }
    }
}

/// A snapshot's index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Index {
    size: u64,
    chunk_size: u32,
    entries: Vec<Entry>,
}

/// How many chunks of `chunk_size` cover `size` bytes.
pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(chunk_size as u64)
}

impl Index {
    /// An index for a source of `size` bytes; `entries` must number `chunk_count(size, chunk_size)`.
    pub fn new(size: u64, chunk_size: u32, entries: Vec<Entry>) -> Result<Index> {
        check_chunk_size(chunk_size)?;
        if entries.len() as u64 != chunk_count(size, chunk_size) {
            return Err(StorageError::InvalidInput(format!(
                "Index of {} entries for {size} bytes in chunks of {chunk_size}",
                entries.len()
            )));
        }
        Ok(Index {
            size,
            chunk_size,
            entries,
        })
    }

    /// Source size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The entries, in source order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Byte offset and length of chunk `i`.
    pub fn chunk_range(&self, i: u64) -> (u64, usize) {
        chunk_range(self.size, self.chunk_size, i)
    }

    /// Serialises the index.
    pub fn encode(&self) -> Vec<u8> {
        let n = self.entries.len();
        let mut out = vec![0u8; INDEX_HEADER_LEN];
        out[0..8].copy_from_slice(&INDEX_MAGIC);
        out[8..12].copy_from_slice(&INDEX_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&self.chunk_size.to_le_bytes());
        out[16..24].copy_from_slice(&self.size.to_le_bytes());
        out[24..32].copy_from_slice(&(n as u64).to_le_bytes());
        out[32..36].copy_from_slice(&(INDEX_ENTRY_LEN as u32).to_le_bytes());
        let hcrc = crc32fast::hash(&out[..60]);
        out[60..64].copy_from_slice(&hcrc.to_le_bytes());
        out.reserve(n * INDEX_ENTRY_LEN + INDEX_TRAILER_LEN);
        for e in &self.entries {
            match e {
                Entry::Zero => {
                    out.extend_from_slice(&[0u8; DIGEST_LEN]);
                    out.extend_from_slice(&0u32.to_le_bytes());
                    out.extend_from_slice(&ENTRY_ZERO.to_le_bytes());
                }
                Entry::Stored { digest, stored_len } => {
                    out.extend_from_slice(&digest.0);
                    out.extend_from_slice(&stored_len.to_le_bytes());
                    out.extend_from_slice(&0u32.to_le_bytes());
                }
            }
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&INDEX_END_MAGIC);
        out
    }

    /// Parses and checks an index; `what` names it in errors.
    pub fn decode(bytes: &[u8], what: &str) -> Result<Index> {
        let corrupt = |d: String| StorageError::corrupt(what.to_string(), d);
        if bytes.len() < INDEX_HEADER_LEN + INDEX_TRAILER_LEN {
            return Err(corrupt(format!(
                "{} bytes is too short for an index (truncated?)",
                bytes.len()
            )));
        }
        if bytes[0..8] != INDEX_MAGIC {
            return Err(corrupt("bad index magic".into()));
        }
        if crc32fast::hash(&bytes[..60]) != le32(bytes, 60) {
            return Err(corrupt("index header checksum mismatch".into()));
        }
        let version = le32(bytes, 8);
        if version != INDEX_VERSION {
            return Err(StorageError::Unsupported(format!(
                "index version {version} in {what}"
            )));
        }
        let chunk_size = le32(bytes, 12);
        check_chunk_size(chunk_size).map_err(|e| corrupt(e.to_string()))?;
        let size = le64(bytes, 16);
        let count = le64(bytes, 24);
        if le32(bytes, 32) as usize != INDEX_ENTRY_LEN {
            return Err(corrupt("unexpected index entry size".into()));
        }
        if count != chunk_count(size, chunk_size) {
            return Err(corrupt(format!(
                "{count} entries do not cover {size} bytes in chunks of {chunk_size}"
            )));
        }
        let want = (INDEX_HEADER_LEN as u64)
            .checked_add(count.saturating_mul(INDEX_ENTRY_LEN as u64))
            .and_then(|v| v.checked_add(INDEX_TRAILER_LEN as u64))
            .unwrap_or(u64::MAX);
        if want != bytes.len() as u64 {
            return Err(corrupt(format!(
                "index is {} bytes, its header implies {want} (truncated or extended)",
                bytes.len()
            )));
        }
        let body_end = bytes.len() - INDEX_TRAILER_LEN;
        if bytes[body_end + 4..] != INDEX_END_MAGIC {
            return Err(corrupt("missing index end marker".into()));
        }
        if crc32fast::hash(&bytes[..body_end]) != le32(bytes, body_end) {
            return Err(corrupt("index checksum mismatch".into()));
        }
        let mut entries = Vec::with_capacity(count as usize);
        for (i, raw) in bytes[INDEX_HEADER_LEN..body_end]
            .chunks_exact(INDEX_ENTRY_LEN)
            .enumerate()
        {
            let stored_len = le32(raw, 32);
            let flags = le32(raw, 36);
            entries.push(match flags {
                0 => {
                    let mut d = [0u8; DIGEST_LEN];
                    d.copy_from_slice(&raw[..DIGEST_LEN]);
                    Entry::Stored {
                        digest: Digest(d),
                        stored_len,
                    }
                }
                ENTRY_ZERO => Entry::Zero,
                other => return Err(corrupt(format!("entry {i} has unknown flags {other:#x}"))),
            });
        }
        Ok(Index {
            size,
            chunk_size,
            entries,
        })
    }
}

/// Byte offset and length of chunk `i` of a source of `size` bytes.
pub fn chunk_range(size: u64, chunk_size: u32, i: u64) -> (u64, usize) {
    let off = i * chunk_size as u64;
    (off, (size - off).min(chunk_size as u64) as usize)
}

fn check_chunk_size(chunk_size: u32) -> Result<()> {
    if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(StorageError::InvalidInput(format!(
            "Chunk size {chunk_size} is not a power of two between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Index {
        let entries = vec![
            Entry::Stored {
                digest: Digest::of(b"a"),
                stored_len: 100,
            },
            Entry::Zero,
            Entry::Stored {
                digest: Digest::of(b"b"),
                stored_len: 7,
            },
        ];
        Index::new(2 * (1 << 20) + 5, 1 << 20, entries).unwrap()
    }

    #[test]
    fn round_trip() {
        let idx = sample();
        let bytes = idx.encode();
        assert_eq!(bytes.len(), 64 + 3 * 40 + 8);
        assert_eq!(Index::decode(&bytes, "t").unwrap(), idx);
        assert_eq!(idx.chunk_range(2), (2 << 20, 5));
    }

    #[test]
    fn truncation_and_damage_are_reported() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            assert!(Index::decode(&bytes[..len], "t").is_err(), "len {len}");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 1;
            assert!(Index::decode(&b, "t").is_err(), "flip {i}");
        }
    }

    #[test]
    fn wrong_entry_count_is_refused() {
        assert!(Index::new(10 << 20, 1 << 20, vec![Entry::Zero]).is_err());
        assert!(Index::new(1 << 20, 1000, vec![Entry::Zero]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let _ = Index::decode(&data, "fuzz");
        }
    }
}

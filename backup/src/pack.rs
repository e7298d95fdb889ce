//! Pack objects: many chunk blobs in one object, with the pack's own index at its end, so that a
//! backup makes one PUT per pack (default 16 MiB) instead of one per chunk, and a restore reads
//! one chunk with one ranged GET.
//!
//! Layout (byte by byte in docs/format-datastore.md): the blobs back to back from offset 0, then
//! `count` 48-byte index entries (chunk id, offset, blob length, raw length), then a 24-byte
//! trailer (magic `STRPACK1`, version, count, crc32 of the entries, crc32 of the trailer). The
//! blobs are the datastore's usual blobs (sealed in an encrypted datastore); the index holds
//! only chunk ids (keyed hashes there) and sizes.

use strata_storage::bytes::{le32, le64};
use strata_storage::{Result, StorageError};

use crate::blob::{BLOB_HEADER_LEN, MAX_PAYLOAD_LEN, MAX_RAW_LEN};
use crate::digest::{Digest, DIGEST_LEN};

/// Magic of a pack trailer.
pub const PACK_MAGIC: [u8; 8] = *b"STRPACK1";
/// Pack format version.
pub const PACK_VERSION: u32 = 1;
/// Size of the trailer.
pub const TRAILER_LEN: usize = 24;
/// Size of one index entry.
pub const ENTRY_LEN: usize = 48;
/// Most chunks a pack may hold (bounds what a trailer sizes).
pub const MAX_ENTRIES: u32 = 1 << 16;
/// Bytes read from a pack's end to get its index in one ranged GET (packs of up to ~340
/// chunks; larger ones take a second GET).
pub const TAIL_GUESS: u64 = (TRAILER_LEN + 340 * ENTRY_LEN) as u64;

const _: () = assert!(ENTRY_LEN == DIGEST_LEN + 16);

/// Where a chunk's blob is in its pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackEntry {
    /// The chunk id.
    pub digest: Digest,
    /// Offset of its blob in the pack.
    pub offset: u64,
    /// Length of the blob (header and payload).
    pub len: u32,
    /// Uncompressed length of the chunk.
    pub raw_len: u32,
}

/// A pack being filled.
#[derive(Debug, Default)]
pub struct PackBuilder {
    data: Vec<u8>,
    entries: Vec<PackEntry>,
}

impl PackBuilder {
    /// An empty pack.
    pub fn new() -> PackBuilder {
        PackBuilder::default()
    }

    /// Appends a blob (already encoded) for chunk `digest` of `raw_len` bytes.
    pub fn push(&mut self, digest: Digest, blob: &[u8], raw_len: u32) {
        self.entries.push(PackEntry {
            digest,
            offset: self.data.len() as u64,
            len: blob.len() as u32,
            raw_len,
        });
        self.data.extend_from_slice(blob);
    }

    /// Bytes of blobs so far.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the pack holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Chunks in the pack.
    pub fn count(&self) -> usize {
        self.entries.len()
    }

    /// The finished pack object and its entries.
    pub fn finish(mut self) -> (Vec<u8>, Vec<PackEntry>) {
        let tail = encode_tail(&self.entries);
        self.data.extend_from_slice(&tail);
        (self.data, self.entries)
    }
}

/// The index and trailer of a pack with `entries`.
pub fn encode_tail(entries: &[PackEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * ENTRY_LEN + TRAILER_LEN);
    for e in entries {
        out.extend_from_slice(&e.digest.0);
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.len.to_le_bytes());
        out.extend_from_slice(&e.raw_len.to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    let mut trailer = [0u8; TRAILER_LEN];
    trailer[..8].copy_from_slice(&PACK_MAGIC);
    trailer[8..12].copy_from_slice(&PACK_VERSION.to_le_bytes());
    trailer[12..16].copy_from_slice(&(entries.len() as u32).to_le_bytes());
    trailer[16..20].copy_from_slice(&crc.to_le_bytes());
    let tcrc = crc32fast::hash(&trailer[..20]);
    trailer[20..24].copy_from_slice(&tcrc.to_le_bytes());
    out.extend_from_slice(&trailer);
    out
}

/// Parses the trailer (the last [`TRAILER_LEN`] bytes of `tail`); returns the entry count.
pub fn parse_trailer(tail: &[u8], what: &str) -> Result<u32> {
    let corrupt = |d: String| StorageError::corrupt(what.to_string(), d);
    if tail.len() < TRAILER_LEN {
        return Err(corrupt("shorter than a pack trailer".into()));
    }
    let t = &tail[tail.len() - TRAILER_LEN..];
    if t[..8] != PACK_MAGIC {
        return Err(corrupt("no pack trailer magic".into()));
    }
    if crc32fast::hash(&t[..20]) != le32(t, 20) {
        return Err(corrupt("pack trailer checksum mismatch".into()));
    }
    let version = le32(t, 8);
    if version != PACK_VERSION {
        return Err(StorageError::Unsupported(format!(
            "pack version {version} in {what}"
        )));
    }
    let count = le32(t, 12);
    if count > MAX_ENTRIES {
        return Err(corrupt(format!("{count} entries exceed {MAX_ENTRIES}")));
    }
    Ok(count)
}

/// Bytes of index and trailer of a pack with `count` entries.
pub fn tail_len(count: u32) -> u64 {
    count as u64 * ENTRY_LEN as u64 + TRAILER_LEN as u64
}

/// Parses a pack's tail (at least its index and trailer, as the last bytes of `tail`) for a
/// pack object of `pack_size` bytes; checks every entry lies in the blob area, in order, without
/// overlap, within blob limits.
pub fn parse_tail(tail: &[u8], pack_size: u64, what: &str) -> Result<Vec<PackEntry>> {
    let corrupt = |d: String| StorageError::corrupt(what.to_string(), d);
    let count = parse_trailer(tail, what)?;
    let need = tail_len(count);
    if (tail.len() as u64) < need || pack_size < need {
        return Err(corrupt("pack shorter than its index".into()));
    }
    let idx = &tail[tail.len() - need as usize..tail.len() - TRAILER_LEN];
    let t = &tail[tail.len() - TRAILER_LEN..];
    if crc32fast::hash(idx) != le32(t, 16) {
        return Err(corrupt("pack index checksum mismatch".into()));
    }
    let blob_end = pack_size - need;
    let mut next = 0u64;
    let mut out = Vec::with_capacity(count as usize);
    for e in idx.chunks_exact(ENTRY_LEN) {
        let mut d = [0u8; DIGEST_LEN];
        d.copy_from_slice(&e[..DIGEST_LEN]);
        let entry = PackEntry {
            digest: Digest(d),
            offset: le64(e, 32),
            len: le32(e, 40),
            raw_len: le32(e, 44),
        };
        let end = entry.offset.checked_add(entry.len as u64);
        if entry.offset != next
            || end.is_none_or(|e| e > blob_end)
            || (entry.len as usize) < BLOB_HEADER_LEN
            || entry.len as usize > BLOB_HEADER_LEN + MAX_PAYLOAD_LEN
            || entry.raw_len as usize > MAX_RAW_LEN
        {
            return Err(corrupt(format!(
                "pack index entry {} at {}+{} is out of place",
                entry.digest, entry.offset, entry.len
            )));
        }
        next = entry.offset + entry.len as u64;
        out.push(entry);
    }
    if next != blob_end {
        return Err(corrupt("pack has bytes no index entry covers".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob;

    #[test]
    fn packs_round_trip_and_damage_is_caught() {
        let mut b = PackBuilder::new();
        let mut blobs = Vec::new();
        for i in 0..5u8 {
            let data = vec![i; 1000 + i as usize];
            let d = Digest::of(&data);
            let bl = blob::encode(&data, 1).unwrap();
            b.push(d, &bl, data.len() as u32);
            blobs.push((d, bl));
        }
        let (pack, entries) = b.finish();
        let parsed = parse_tail(&pack, pack.len() as u64, "p").unwrap();
        assert_eq!(parsed, entries);
        for (e, (d, bl)) in parsed.iter().zip(&blobs) {
            assert_eq!(e.digest, *d);
            assert_eq!(
                &pack[e.offset as usize..(e.offset + e.len as u64) as usize],
                &bl[..]
            );
        }
        // Just the tail, as a ranged GET gives it.
        let tail = &pack[pack.len() - tail_len(5) as usize..];
        assert!(parse_tail(tail, pack.len() as u64, "p").is_ok());
        let idx_start = pack.len() - tail_len(5) as usize;
        for i in idx_start..pack.len() {
            let mut bad = pack.clone();
            bad[i] ^= 4;
            assert!(
                parse_tail(&bad, pack.len() as u64, "p").is_err(),
                "flip {i}"
            );
        }
        assert!(parse_tail(&pack, pack.len() as u64 + 1, "p").is_err());
        assert!(parse_tail(&pack[..10], 10, "p").is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_tails_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..400), size in 0u64..1000) {
            let _ = parse_tail(&data, size, "fuzz");
        }
    }
}

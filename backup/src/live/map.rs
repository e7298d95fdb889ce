//! The map of restored chunks of a live restore: `DATA/restores/VG/NAME.restored`, one bit per
//! chunk, in two checksummed slots written alternately, so that a crash while one is written
//! leaves the other.
//!
//! ```text
//! header (offset 0, 64 bytes used of 4096):
//!   0  8  magic "STRLRM01"      8  4  version (1)       12 4  chunk size
//!   16 8  chunk count           24 16 restore id (as in the record)
//!   40 20 reserved, zero        60 4  crc32 of bytes 0-59
//! slot k (k = 0, 1) at 4096 + k * slot length (a multiple of 4096):
//!   0  8  sequence number (0: never written)   8 4  bitmap bytes n = ceil(count / 8)
//!   12 4  reserved, zero                      16 n  bits, chunk i = byte i/8, bit i%8
//!   16+n 4 crc32 of bytes 0..16+n
//! ```
//!
//! The valid slot with the higher sequence number is the map. A bit is set only for a chunk
//! whose data was flushed to the volume before the slot was written (see [`super`]).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use strata_storage::bytes::{le32, le64, put_le32, put_le64};
use strata_storage::{Result, StorageError};

use crate::fsutil::{self, io_err, Flock};
use crate::storefs::RealFs;

/// Magic of a map file.
pub const MAP_MAGIC: [u8; 8] = *b"STRLRM01";
/// Map format version.
pub const MAP_VERSION: u32 = 1;
/// Bytes before the first slot.
const HEADER_LEN: u64 = 4096;
const HEADER_USED: usize = 64;
const SLOT_HEAD: usize = 16;

/// An open, locked map file.
#[derive(Debug)]
pub struct RestoredMap {
    lock: Flock,
    path: PathBuf,
    count: u64,
    slot_len: u64,
    seq: u64,
}

fn bytes_for(count: u64) -> usize {
    count.div_ceil(8) as usize
}

fn slot_len(count: u64) -> u64 {
    ((SLOT_HEAD + bytes_for(count) + 4) as u64).div_ceil(4096) * 4096
}

fn header(chunk_size: u32, count: u64, id: &[u8; 16]) -> [u8; HEADER_USED] {
    let mut h = [0u8; HEADER_USED];
    h[0..8].copy_from_slice(&MAP_MAGIC);
    put_le32(&mut h, 8, MAP_VERSION);
    put_le32(&mut h, 12, chunk_size);
    put_le64(&mut h, 16, count);
    h[24..40].copy_from_slice(id);
    let crc = crc32fast::hash(&h[..60]);
    put_le32(&mut h, 60, crc);
    h
}

/// Words of a bitmap of `count` bits.
pub fn words_for(count: u64) -> usize {
    count.div_ceil(64) as usize
}

impl RestoredMap {
    /// Creates the map of a new restore (refusing an existing file), empty and durable.
    pub fn create(path: &Path, chunk_size: u32, count: u64, id: &[u8; 16]) -> Result<RestoredMap> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| io_err("Creating", dir, e))?;
        let lock = Flock::acquire(path, true, false, true, &busy(path))?;
        let f = lock.file();
        f.set_len(0).map_err(|e| io_err("Truncating", path, e))?;
        f.write_all_at(&header(chunk_size, count, id), 0)
            .map_err(|e| io_err("Writing", path, e))?;
        let mut map = RestoredMap {
            lock,
            path: path.to_path_buf(),
            count,
            slot_len: slot_len(count),
            seq: 0,
        };
        map.write(&vec![0u64; words_for(count)])?;
        fsutil::fsync_dir(&RealFs, dir)?;
        Ok(map)
    }

    /// Opens the map of restore `id` and returns it with its bits (as 64-bit words).
    pub fn open(
        path: &Path,
        chunk_size: u32,
        count: u64,
        id: &[u8; 16],
    ) -> Result<(RestoredMap, Vec<u64>)> {
        if !path.exists() {
            return Err(StorageError::corrupt(
                path.display().to_string(),
                "the map of restored chunks is missing",
            ));
        }
        let lock = Flock::acquire(path, true, false, true, &busy(path))?;
        let f = lock.file();
        let corrupt = |d: &str| StorageError::corrupt(path.display().to_string(), d.to_string());
        let mut h = [0u8; HEADER_USED];
        f.read_exact_at(&mut h, 0)
            .map_err(|_| corrupt("shorter than its header"))?;
        if h != header(chunk_size, count, id) {
            return Err(corrupt(
                "header does not match its restore record (magic, version, chunk size, count or id)",
            ));
        }
        let n = bytes_for(count);
        let len = slot_len(count);
        let mut best: Option<(u64, Vec<u8>)> = None;
        for k in 0..2u64 {
            let mut slot = vec![0u8; SLOT_HEAD + n + 4];
            if f.read_exact_at(&mut slot, HEADER_LEN + k * len).is_err() {
                continue;
            }
            let seq = le64(&slot, 0);
            let stored_n = le32(&slot, 8);
            let crc = le32(&slot, SLOT_HEAD + n);
            if seq == 0 || stored_n as usize != n || crc32fast::hash(&slot[..SLOT_HEAD + n]) != crc
            {
                continue;
            }
            if best.as_ref().is_none_or(|(s, _)| seq > *s) {
                best = Some((seq, slot[SLOT_HEAD..SLOT_HEAD + n].to_vec()));
            }
        }
        let (seq, bytes) = best.ok_or_else(|| corrupt("neither slot holds a valid map"))?;
        let mut words = vec![0u64; words_for(count)];
        for (i, b) in bytes.iter().enumerate() {
            words[i / 8] |= u64::from(*b) << (8 * (i % 8));
        }
        // Bits past the last chunk mean nothing.
        if count % 64 != 0 {
            if let Some(last) = words.last_mut() {
                *last &= (1u64 << (count % 64)) - 1;
            }
        }
        Ok((
            RestoredMap {
                lock,
                path: path.to_path_buf(),
                count,
                slot_len: len,
                seq,
            },
            words,
        ))
    }

    /// Writes `words` as the map: into the older slot with the next sequence number, then
    /// fdatasync. The previous map stays valid until this one is durable.
    pub fn write(&mut self, words: &[u64]) -> Result<()> {
        let n = bytes_for(self.count);
        let mut slot = vec![0u8; SLOT_HEAD + n + 4];
        let seq = self.seq + 1;
        put_le64(&mut slot, 0, seq);
        put_le32(&mut slot, 8, n as u32);
        for i in 0..n {
            slot[SLOT_HEAD + i] = (words.get(i / 8).copied().unwrap_or(0) >> (8 * (i % 8))) as u8;
        }
        let crc = crc32fast::hash(&slot[..SLOT_HEAD + n]);
        put_le32(&mut slot, SLOT_HEAD + n, crc);
        let at = HEADER_LEN + (seq % 2) * self.slot_len;
        let f = self.lock.file();
        f.write_all_at(&slot, at)
            .and_then(|_| f.sync_data())
            .map_err(|e| io_err("Writing", &self.path, e))?;
        self.seq = seq;
        Ok(())
    }
}

fn busy(path: &Path) -> String {
    format!(
        "The live restore recorded in {} is open in another process",
        path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_round_trip_and_survive_a_torn_slot() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("m.restored");
        let id = [7u8; 16];
        let count = 100;
        let mut m = RestoredMap::create(&path, 65536, count, &id).unwrap();
        // A second opener is refused while the first holds it.
        assert!(matches!(
            RestoredMap::open(&path, 65536, count, &id),
            Err(StorageError::Busy(_))
        ));
        let mut words = vec![0u64; words_for(count)];
        words[0] = 0b1011;
        m.write(&words).unwrap();
        words[1] = 1 << 35;
        m.write(&words).unwrap();
        drop(m);
        let (m, got) = RestoredMap::open(&path, 65536, count, &id).unwrap();
        assert_eq!(got, words);
        let seq = m.seq;
        drop(m);
        // Tear the newest slot: the one before it is the map.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff; 8], HEADER_LEN + (seq % 2) * slot_len(count) + 20)
            .unwrap();
        let (_m, got) = RestoredMap::open(&path, 65536, count, &id).unwrap();
        assert_eq!(got[0], 0b1011);
        assert_eq!(got[1], 0);
        // Another restore's map, or other geometry, is refused.
        assert!(RestoredMap::open(&path, 65536, count, &[8u8; 16]).is_err());
        assert!(RestoredMap::open(&path, 65536, count + 1, &id).is_err());
    }
}

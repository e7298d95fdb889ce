//! The VHDX metadata log: finding the active sequence and replaying it, and writing entries.
//!
//! The log is a circular buffer of 4 KiB sectors. An entry is a header sector (signature `loge`,
//! CRC-32C over the whole entry, length, tail, sequence number, descriptor count, the log GUID,
//! flushed and last file offsets) with its descriptors (`desc`: one 4 KiB data sector to write;
//! `zero`: a range to zero), then the data sectors (`data`, with the entry's sequence number split
//! around 4,084 bytes of payload). The active sequence is the run of valid, consecutive entries
//! ending in the entry with the highest sequence number whose tail starts the run; replay applies
//! its descriptors in order. Only entries carrying the header's log GUID count.
//!
//! The log is untrusted input: every length is checked against the log and the file, the search
//! reads a bounded number of bytes and follows a bounded number of links, and descriptors may not
//! write into the header section or the log itself.
//!
//! Our writer puts each batch of metadata pages in one self-contained entry (its tail is itself):
//! entry, flush, pages in place, flush. An entry that would wrap starts again at the log's start.

use std::collections::HashMap;

use crate::device::HostFile;
use crate::error::{Result, StorageError};
use crate::format::vhdx::guid::Guid;
use crate::format::vhdx::header::{le32, le64, seal, sealed, Header, MIB};

/// Log sector size.
pub const LOG_SECTOR: u64 = 4096;
/// Descriptors that fit in one descriptor sector with the entry header.
pub const DESCRIPTORS_PER_SECTOR: usize = (LOG_SECTOR as usize - 64) / 32;
/// Largest log we accept (the specification allows up to 4 GiB; Hyper-V and qemu write 1 MiB).
pub const MAX_LOG: u64 = 1 << 30;
/// How far past the file's end a replay may write.
const MAX_GROWTH: u64 = 4 << 30;

/// A log region: where it is and how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogPlace {
    /// File offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

impl LogPlace {
    /// The log of header `h`, checked against the file's length.
    pub fn of(h: &Header, file_len: u64, what: &str) -> Result<LogPlace> {
        let length = h.log_length as u64;
        if length == 0 || length > MAX_LOG {
            return Err(StorageError::corrupt(
                what,
                format!("VHDX log of {length} bytes (1 MiB to {MAX_LOG})"),
            ));
        }
        if h.log_offset + length > file_len {
            return Err(StorageError::corrupt(
                what,
                "VHDX log runs past the end of the file",
            ));
        }
        Ok(LogPlace {
            offset: h.log_offset,
            length,
        })
    }

    fn read(&self, file: &dyn HostFile, pos: u64, out: &mut [u8]) -> Result<()> {
        // Circular: an entry may wrap from the end of the log to its start.
        let first = ((self.length - pos) as usize).min(out.len());
        file.read_exact_at(self.offset + pos, &mut out[..first])?;
        if first < out.len() {
            file.read_exact_at(self.offset, &mut out[first..])?;
        }
        Ok(())
    }
}

/// One write the log asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogWrite {
    /// 4 KiB of data at a file offset.
    Data(u64, Box<[u8]>),
    /// Zeros over `len` bytes at a file offset.
    Zero(u64, u64),
}

#[derive(Clone, Debug)]
struct Entry {
    len: u64,
    tail: u64,
    seq: u64,
    flushed: u64,
    last: u64,
    writes: Vec<LogWrite>,
}

/// What replaying the active sequence does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replay {
    /// Writes in order.
    pub writes: Vec<LogWrite>,
    /// The file must be at least this long afterwards.
    pub last_file_offset: u64,
    /// Entries in the sequence.
    pub entries: usize,
}

fn parse_entry(
    file: &dyn HostFile,
    log: &LogPlace,
    pos: u64,
    guid: &Guid,
    budget: &mut u64,
) -> Result<Option<Entry>> {
    let mut head = vec![0u8; LOG_SECTOR as usize];
    log.read(file, pos, &mut head)?;
    if &head[..4] != b"loge" || Guid::read(&head, 32) != *guid {
        return Ok(None);
    }
    let len = le32(&head, 8) as u64;
    let tail = le32(&head, 12) as u64;
    let count = le32(&head, 24) as u64;
    let desc_sectors = (64 + 32 * count).div_ceil(LOG_SECTOR);
    if len == 0
        || len % LOG_SECTOR != 0
        || len > log.length
        || tail % LOG_SECTOR != 0
        || tail >= log.length
        || desc_sectors * LOG_SECTOR > len
    {
        return Ok(None);
    }
    if *budget < len {
        return Err(StorageError::Unsupported(
            "replaying a VHDX log this large or tangled (the search read more than its bound)"
                .into(),
        ));
    }
    *budget -= len;
    let mut e = vec![0u8; len as usize];
    log.read(file, pos, &mut e)?;
    if !sealed(&e, 4) {
        return Ok(None);
    }
    let seq = le64(&e, 16);
    let mut writes = Vec::new();
    let mut data_sector = desc_sectors;
    for i in 0..count as usize {
        let d = &e[64 + 32 * i..96 + 32 * i];
        if le64(d, 24) != seq {
            return Ok(None);
        }
        match &d[..4] {
            b"zero" => writes.push(LogWrite::Zero(le64(d, 16), le64(d, 8))),
            b"desc" => {
                let at = (data_sector * LOG_SECTOR) as usize;
                if at + LOG_SECTOR as usize > e.len() {
                    return Ok(None);
                }
                let s = &e[at..at + LOG_SECTOR as usize];
                if &s[..4] != b"data"
                    || le32(s, 4) as u64 != seq >> 32
                    || le32(s, 4092) as u64 != seq & 0xffff_ffff
                {
                    return Ok(None);
                }
                let mut page = vec![0u8; LOG_SECTOR as usize].into_boxed_slice();
                page[..8].copy_from_slice(&d[8..16]);
                page[8..4092].copy_from_slice(&s[8..4092]);
                page[4092..].copy_from_slice(&d[4..8]);
                writes.push(LogWrite::Data(le64(d, 16), page));
                data_sector += 1;
            }
            _ => return Ok(None),
        }
    }
    if data_sector * LOG_SECTOR != len {
        return Ok(None);
    }
    Ok(Some(Entry {
        len,
        tail,
        seq,
        flushed: le64(&e, 48),
        last: le64(&e, 56),
        writes,
    }))
}

/// Finds the active sequence of the log of header `h`; `None` when the log is empty (a zero log
/// GUID, or no valid sequence).
pub fn find_replay(file: &dyn HostFile, h: &Header) -> Result<Option<Replay>> {
    if h.log_guid.is_zero() {
        return Ok(None);
    }
    let name = file.name().to_string();
    let log = LogPlace::of(h, file.len(), &name)?;
    let mut budget = 8 * log.length + 64 * MIB;
    let mut entries: HashMap<u64, Entry> = HashMap::new();
    for s in 0..log.length / LOG_SECTOR {
        let pos = s * LOG_SECTOR;
        if let Some(e) = parse_entry(file, &log, pos, &h.log_guid, &mut budget)? {
            entries.insert(pos, e);
        }
    }
    let mut heads: Vec<(u64, u64)> = entries.iter().map(|(p, e)| (e.seq, *p)).collect();
    heads.sort_unstable_by(|a, b| b.cmp(a));
    let mut steps: u64 = 1 << 20;
    for (_, head_pos) in heads {
        let head = &entries[&head_pos];
        let mut chain = Vec::new();
        let mut pos = head.tail;
        let mut want: Option<u64> = None;
        let complete = loop {
            if steps == 0 {
                return Err(StorageError::Unsupported(format!(
                    "replaying the VHDX log of {name}: too many entries to search"
                )));
            }
            steps -= 1;
            let Some(e) = entries.get(&pos) else {
                break false;
            };
            if want.is_some_and(|w| e.seq != w) || chain.len() as u64 > log.length / LOG_SECTOR {
                break false;
            }
            chain.push(pos);
            if pos == head_pos {
                break true;
            }
            want = Some(e.seq.wrapping_add(1));
            pos = (pos + e.len) % log.length;
        };
        if !complete {
            continue;
        }
        let file_len = file.len();
        if head.flushed > file_len {
            return Err(StorageError::corrupt(
                &name,
                format!(
                    "VHDX log says the file was {} bytes but it is {file_len} (truncated)",
                    head.flushed
                ),
            ));
        }
        let limit = file_len.max(head.last).min(file_len + MAX_GROWTH);
        let mut r = Replay {
            last_file_offset: head.last.min(limit),
            entries: chain.len(),
            ..Replay::default()
        };
        for p in chain {
            for w in &entries[&p].writes {
                let (at, n) = match w {
                    LogWrite::Data(at, _) => (*at, LOG_SECTOR),
                    LogWrite::Zero(at, n) => (*at, *n),
                };
                let end = at.checked_add(n);
                let hits_log = at < log.offset + log.length && log.offset < at + n;
                if at % LOG_SECTOR != 0
                    || n % LOG_SECTOR != 0
                    || at < MIB
                    || hits_log
                    || end.is_none_or(|e| e > limit)
                {
                    return Err(StorageError::corrupt(
                        &name,
                        format!(
                            "VHDX log entry writes {n} bytes at {at}: outside the file's metadata and data"
                        ),
                    ));
                }
                r.writes.push(w.clone());
            }
        }
        return Ok(Some(r));
    }
    Ok(None)
}

/// Applies a replay to the file and syncs it.
pub fn apply(file: &dyn HostFile, r: &Replay) -> Result<()> {
    for w in &r.writes {
        match w {
            LogWrite::Data(at, page) => file.write_all_at(*at, page)?,
            LogWrite::Zero(at, n) => file.zero_range(*at, *n)?,
        }
    }
    if file.len() < r.last_file_offset {
        file.set_len(r.last_file_offset)?;
    }
    file.sync_data()
}

/// Writes log entries for metadata pages.
#[derive(Debug)]
pub struct LogWriter {
    log: LogPlace,
    head: u64,
    seq: u64,
}

impl LogWriter {
    /// A writer at the start of `log`.
    pub fn new(log: LogPlace) -> LogWriter {
        LogWriter {
            log,
            head: 0,
            seq: 1,
        }
    }

    /// Most pages one entry holds.
    pub fn max_pages(&self) -> usize {
        DESCRIPTORS_PER_SECTOR.min((self.log.length / LOG_SECTOR) as usize - 1)
    }

    /// Writes one entry carrying `pages` (file offset, 4 KiB each) and syncs it. The caller
    /// then writes the pages in place and syncs.
    pub fn write_entry(
        &mut self,
        file: &dyn HostFile,
        guid: &Guid,
        pages: &[(u64, &[u8])],
    ) -> Result<()> {
        let n = pages.len();
        if n == 0 || n > self.max_pages() {
            return Err(StorageError::InvalidInput(format!(
                "a VHDX log entry of {n} pages"
            )));
        }
        let len = (1 + n as u64) * LOG_SECTOR;
        if self.head + len > self.log.length {
            self.head = 0;
        }
        let seq = self.seq;
        let file_len = file.len();
        let mut e = vec![0u8; len as usize];
        e[..4].copy_from_slice(b"loge");
        e[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        e[12..16].copy_from_slice(&(self.head as u32).to_le_bytes());
        e[16..24].copy_from_slice(&seq.to_le_bytes());
        e[24..28].copy_from_slice(&(n as u32).to_le_bytes());
        e[32..48].copy_from_slice(&guid.0);
        e[48..56].copy_from_slice(&file_len.to_le_bytes());
        e[56..64].copy_from_slice(&file_len.to_le_bytes());
        for (i, (at, page)) in pages.iter().enumerate() {
            let d = 64 + 32 * i;
            e[d..d + 4].copy_from_slice(b"desc");
            e[d + 4..d + 8].copy_from_slice(&page[4092..4096]);
            e[d + 8..d + 16].copy_from_slice(&page[..8]);
            e[d + 16..d + 24].copy_from_slice(&at.to_le_bytes());
            e[d + 24..d + 32].copy_from_slice(&seq.to_le_bytes());
            let s = ((1 + i) as u64 * LOG_SECTOR) as usize;
            e[s..s + 4].copy_from_slice(b"data");
            e[s + 4..s + 8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
            e[s + 8..s + 4092].copy_from_slice(&page[8..4092]);
            e[s + 4092..s + 4096].copy_from_slice(&(seq as u32).to_le_bytes());
        }
        seal(&mut e, 4);
        file.write_all_at(self.log.offset + self.head, &e)?;
        file.sync_data()?;
        self.head = (self.head + len) % self.log.length;
        self.seq += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::memory::MemoryDevice;

    fn header(guid: Guid) -> Header {
        Header {
            sequence: 1,
            file_write_guid: Guid::random(),
            data_write_guid: Guid::random(),
            log_guid: guid,
            log_length: MIB as u32,
            log_offset: MIB,
        }
    }

    #[test]
    fn written_entries_replay_in_order_and_wrap() {
        let dev = MemoryDevice::new(8 * MIB);
        let guid = Guid::random();
        let h = header(guid);
        let mut w = LogWriter::new(LogPlace::of(&h, dev.len(), "t").unwrap());
        let a = vec![1u8; 4096];
        let b = vec![2u8; 4096];
        // Fill the log so that later entries wrap to its start.
        for i in 0..300u64 {
            let page = if i % 2 == 0 { &a } else { &b };
            w.write_entry(dev.as_ref(), &guid, &[(4 * MIB + (i % 3) * 4096, page)])
                .unwrap();
        }
        let r = find_replay(dev.as_ref(), &h).unwrap().unwrap();
        // Our entries are self-contained: the last one alone is the active sequence.
        assert_eq!(r.entries, 1);
        assert_eq!(
            r.writes,
            vec![LogWrite::Data(4 * MIB + 4096 * (299 % 3), b.clone().into())]
        );
        // Another GUID's entries do not count.
        assert!(find_replay(dev.as_ref(), &header(Guid::random()))
            .unwrap()
            .is_none());
        assert!(find_replay(dev.as_ref(), &header(Guid::ZERO))
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_damaged_entry_is_not_replayed() {
        let dev = MemoryDevice::new(8 * MIB);
        let guid = Guid::random();
        let h = header(guid);
        let mut w = LogWriter::new(LogPlace::of(&h, dev.len(), "t").unwrap());
        w.write_entry(dev.as_ref(), &guid, &[(4 * MIB, &[7u8; 4096])])
            .unwrap();
        dev.write_all_at(MIB + 5000, &[9]).unwrap();
        assert!(find_replay(dev.as_ref(), &h).unwrap().is_none());
    }
}

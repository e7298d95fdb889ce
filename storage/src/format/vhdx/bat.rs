//! The VHDX block allocation table: payload block entries interleaved with sector bitmap block
//! entries (one after every `chunk ratio` payload entries), each a state in bits 0–2 and a file
//! offset in MiB in bits 20–63.
//!
//! New payload blocks go at the end of the file (1 MiB-aligned, past anything the file holds, so
//! they read as zeros); their entries are written at the next flush through the log, after the
//! data is synced. Sector bitmaps (differencing disks, read-only here) are cached per payload
//! block within a bound.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};

use crate::device::SharedFile;
use crate::error::{Result, StorageError};
use crate::format::vhdx::header::{Region, MIB};
use crate::format::vhdx::metadata::Metadata;

/// Most BAT entries we load (128 MiB of table).
pub const MAX_ENTRIES: u64 = 1 << 24;
/// Bytes of a sector bitmap block.
const BITMAP_BLOCK: u64 = MIB;
/// Most payload-block bitmaps kept in memory.
const MAX_CACHED_BITMAPS: usize = 1024;
/// Bytes of a BAT page written through the log.
pub const PAGE: u64 = 4096;

const STATE_MASK: u64 = 7;
const OFFSET_MASK: u64 = !((1 << 20) - 1);

/// A payload block's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload {
    /// Not in this file (a differencing disk reads the parent).
    NotPresent,
    /// Contents undefined: read as zeros (a differencing disk reads the parent).
    Undefined,
    /// Reads as zeros.
    Zero,
    /// Unmapped: reads as zeros.
    Unmapped,
    /// All of it at this file offset.
    Full(u64),
    /// Some sectors at this file offset, the rest from the parent (sector bitmap).
    Partial(u64),
}

struct State {
    entries: Vec<u64>,
    dirty_pages: BTreeSet<u64>,
    next_free: u64,
    bitmaps: HashMap<u64, Vec<u8>>,
}

/// The BAT of an open VHDX.
pub struct Bat {
    file: SharedFile,
    name: String,
    region: Region,
    block_size: u64,
    sector: u64,
    chunk_ratio: u64,
    data_blocks: u64,
    differencing: bool,
    state: Mutex<State>,
}

impl std::fmt::Debug for Bat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bat")
            .field("name", &self.name)
            .field("block_size", &self.block_size)
            .finish()
    }
}

/// Entries a BAT needs for `data_blocks` payload blocks.
pub fn entry_count(data_blocks: u64, chunk_ratio: u64, differencing: bool) -> u64 {
    if differencing {
        data_blocks.div_ceil(chunk_ratio) * (chunk_ratio + 1)
    } else {
        data_blocks + data_blocks.saturating_sub(1) / chunk_ratio
    }
}

/// Payload blocks per sector bitmap block.
pub fn chunk_ratio(m: &Metadata) -> u64 {
    (1u64 << 23) * m.logical_sector as u64 / m.block_size as u64
}

/// A payload entry.
pub fn payload_entry(state: u64, offset: u64) -> u64 {
    (offset & OFFSET_MASK) | state
}

impl Bat {
    /// Loads and validates the BAT. `reserved` are the file ranges blocks must not overlap
    /// (header section, log, metadata and BAT regions).
    pub fn open(
        file: SharedFile,
        region: &Region,
        m: &Metadata,
        reserved: &[(u64, u64)],
    ) -> Result<Bat> {
        let name = file.name().to_string();
        let bad = |d: String| StorageError::corrupt(&name, d);
        let block_size = m.block_size as u64;
        let cr = chunk_ratio(m);
        let data_blocks = m.virtual_size.div_ceil(block_size);
        let count = entry_count(data_blocks, cr, m.has_parent);
        if count > MAX_ENTRIES {
            return Err(StorageError::Unsupported(format!(
                "VHDX BATs of more than {MAX_ENTRIES} entries ({name} needs {count})"
            )));
        }
        if count * 8 > region.length as u64 {
            return Err(bad(format!(
                "VHDX BAT region of {} bytes is too small for {count} entries",
                region.length
            )));
        }
        let mut raw = vec![0u8; (count * 8) as usize];
        file.read_exact_at(region.offset, &mut raw)?;
        let entries: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let file_len = file.len();
        let mut used: Vec<(u64, u64)> = reserved.to_vec();
        for (i, &e) in entries.iter().enumerate() {
            let is_bitmap = (i as u64 + 1) % (cr + 1) == 0;
            let state = e & STATE_MASK;
            let off = e & OFFSET_MASK;
            let len = if is_bitmap { BITMAP_BLOCK } else { block_size };
            let placed =
                match (is_bitmap, state) {
                    (false, 0..=3) | (true, 0) => false,
                    (false, 6) => true,
                    (false, 7) if m.has_parent => true,
                    (true, 6) if m.has_parent => true,
                    _ => {
                        return Err(bad(format!(
                        "VHDX BAT entry {i} has state {state}, invalid for a {} entry of a {} disk",
                        if is_bitmap { "sector bitmap" } else { "payload" },
                        if m.has_parent { "differencing" } else { "non-differencing" }
                    )))
                    }
                };
            if placed {
                if off < MIB || off >= file_len {
                    return Err(bad(format!(
                        "VHDX BAT entry {i} points to byte {off}, outside the file ({file_len} bytes)"
                    )));
                }
                used.push((off, len));
            }
        }
        used.sort_unstable();
        if let Some(w) = used.windows(2).find(|w| w[0].0 + w[0].1 > w[1].0) {
            return Err(bad(format!(
                "VHDX blocks or regions at bytes {} and {} overlap",
                w[0].0, w[1].0
            )));
        }
        let next_free = used
            .iter()
            .map(|(o, l)| o + l)
            .max()
            .unwrap_or(0)
            .max(file_len)
            .next_multiple_of(MIB);
        Ok(Bat {
            file,
            name,
            region: *region,
            block_size,
            sector: m.logical_sector as u64,
            chunk_ratio: cr,
            data_blocks,
            differencing: m.has_parent,
            state: Mutex::new(State {
                entries,
                dirty_pages: BTreeSet::new(),
                next_free,
                bitmaps: HashMap::new(),
            }),
        })
    }

    /// Locks the BAT; a poisoned lock fails the image (`crate::sync`).
    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        crate::sync::lock_meta(&self.state, format_args!("VHDX image {}", self.name))
    }

    fn index(&self, b: u64) -> usize {
        (b + b / self.chunk_ratio) as usize
    }

    /// Bytes per payload block.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Payload blocks of the disk.
    pub fn data_blocks(&self) -> u64 {
        self.data_blocks
    }

    /// Payload blocks per sector bitmap block.
    pub fn chunk_ratio(&self) -> u64 {
        self.chunk_ratio
    }

    /// The state of payload block `b`.
    pub fn lookup(&self, b: u64) -> Result<Payload> {
        let st = self.lock()?;
        Ok(Self::decode(
            st.entries.get(self.index(b)).copied().unwrap_or(0),
        ))
    }

    fn decode(e: u64) -> Payload {
        let off = e & OFFSET_MASK;
        match e & STATE_MASK {
            6 => Payload::Full(off),
            7 => Payload::Partial(off),
            1 => Payload::Undefined,
            2 => Payload::Zero,
            3 => Payload::Unmapped,
            _ => Payload::NotPresent,
        }
    }

    /// For partially present block `b`, calls `f(byte offset in block, len, present)` for the
    /// runs of `within..within + n` by the sector bitmap.
    pub fn runs(
        &self,
        b: u64,
        within: u64,
        n: u64,
        mut f: impl FnMut(u64, u64, bool),
    ) -> Result<()> {
        let mut st = self.lock()?;
        if !st.bitmaps.contains_key(&b) {
            let chunk = b / self.chunk_ratio;
            let bi = (chunk * (self.chunk_ratio + 1) + self.chunk_ratio) as usize;
            let e = st.entries.get(bi).copied().unwrap_or(0);
            if e & STATE_MASK != 6 {
                return Err(StorageError::corrupt(
                    &self.name,
                    format!(
                        "VHDX block {b} is partially present but its sector bitmap block is not"
                    ),
                ));
            }
            let per_block = self.block_size / self.sector / 8;
            let at = (e & OFFSET_MASK) + (b % self.chunk_ratio) * per_block;
            let mut bits = vec![0u8; per_block as usize];
            self.file.read_exact_at(at, &mut bits)?;
            if st.bitmaps.len() >= MAX_CACHED_BITMAPS {
                st.bitmaps.clear();
            }
            st.bitmaps.insert(b, bits);
        }
        let bits = &st.bitmaps[&b];
        let bit = |s: u64| bits[(s / 8) as usize] & (1 << (s % 8)) != 0;
        let first = within / self.sector;
        let last = (within + n).div_ceil(self.sector);
        let mut s = first;
        while s < last {
            let present = bit(s);
            let mut k = 1;
            while s + k < last && bit(s + k) == present {
                k += 1;
            }
            let lo = (s * self.sector).max(within);
            let hi = ((s + k) * self.sector).min(within + n);
            f(lo - within, hi - lo, present);
            s += k;
        }
        Ok(())
    }

    /// Allocates payload block `b` (fully present) if it is not, returning its file offset.
    pub fn allocate(&self, b: u64) -> Result<u64> {
        let mut st = self.lock()?;
        let i = self.index(b);
        if let Some(&e) = st.entries.get(i) {
            if let Payload::Full(off) = Self::decode(e) {
                return Ok(off);
            }
        } else {
            return Err(StorageError::corrupt(&self.name, "block beyond the BAT"));
        }
        let at = st.next_free;
        let end = at + self.block_size;
        if self.file.len() < end {
            self.file.set_len(end)?;
        }
        st.entries[i] = payload_entry(6, at);
        st.dirty_pages.insert(i as u64 * 8 / PAGE);
        st.next_free = end;
        Ok(at)
    }

    /// Takes the dirty BAT pages: (file offset, 4 KiB of entries) each.
    pub fn take_dirty(&self) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut st = self.lock()?;
        let pages = std::mem::take(&mut st.dirty_pages);
        let per = (PAGE / 8) as usize;
        Ok(pages
            .into_iter()
            .map(|p| {
                let first = p as usize * per;
                let last = (first + per).min(st.entries.len());
                let mut page = vec![0u8; PAGE as usize];
                for (k, e) in st.entries[first..last].iter().enumerate() {
                    page[8 * k..8 * k + 8].copy_from_slice(&e.to_le_bytes());
                }
                // Entries past the table in its last page keep what the file has there.
                if last - first < per {
                    let _ = self.file.read_exact_at(
                        self.region.offset + p * PAGE + 8 * (last - first) as u64,
                        &mut page[8 * (last - first)..],
                    );
                }
                (self.region.offset + p * PAGE, page)
            })
            .collect())
    }

    /// Number of payload blocks with data in this file.
    pub fn allocated_blocks(&self) -> Result<u64> {
        let st = self.lock()?;
        Ok((0..self.data_blocks)
            .filter(|&b| {
                let e = st.entries.get(self.index(b)).copied().unwrap_or(0);
                matches!(Self::decode(e), Payload::Full(_) | Payload::Partial(_))
            })
            .count() as u64)
    }

    /// Whether the disk is a differencing disk.
    pub fn differencing(&self) -> bool {
        self.differencing
    }

    /// Calls `f(block, offset within block, length)` per block of a guest range.
    pub fn blocks_of(
        &self,
        offset: u64,
        len: u64,
        f: impl FnMut(u64, u64, u64) -> Result<()>,
    ) -> Result<()> {
        crate::format::mapped::for_each_block(offset, len, self.block_size, f)
    }
}

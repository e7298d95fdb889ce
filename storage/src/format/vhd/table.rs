//! The block allocation table of a dynamic or differencing VHD, its sector bitmaps, allocation
//! and write-back.
//!
//! Each block is a sector bitmap (one bit per sector, most significant bit first, padded to whole
//! sectors) followed by the block's data. A dynamic disk's blocks hold all their sectors (we write
//! all-ones bitmaps, as qemu does, and read data regardless of the bitmap); a differencing disk's
//! bitmap says which sectors it holds, the rest come from the parent.
//!
//! Crash safety: a new block goes where the footer was; its bitmap and a new footer after it are
//! written at once, but the BAT entry pointing at it only at the next flush, after the data and
//! bitmaps are synced — so a BAT entry on disk never names a block whose contents are not durable.
//! Dirty bitmap bits are also written only at a flush, after the data they describe. A block placed
//! over leftovers of an interrupted session is zeroed first.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};

use crate::device::SharedFile;
use crate::error::{Result, StorageError};
use crate::format::vhd::dynamic::{DynamicHeader, UNALLOCATED};
use crate::format::vhd::footer::SECTOR;

/// Most bitmaps kept in memory; past it a write-back makes room (dirty ones are written first).
const MAX_CACHED_BITMAPS: usize = 4096;
/// Most BAT entries we load (64 MiB of table; with 2 MiB blocks a 32 TiB disk).
pub const MAX_BAT_ENTRIES: u64 = 1 << 24;

/// Where a block is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockState {
    /// Not allocated.
    Unallocated,
    /// Allocated: its bitmap at this file offset, its data right after.
    At(u64),
}

struct Bitmap {
    bits: Vec<u8>,
    dirty: bool,
}

struct State {
    bat: Vec<u32>,
    dirty_bat: BTreeSet<u64>,
    /// Where the next block goes (where the footer is).
    next_free: u64,
    /// Whether a footer must be written at `next_free` at the next flush.
    footer_dirty: bool,
    bitmaps: HashMap<u64, Bitmap>,
}

/// The BAT and bitmaps of an open dynamic or differencing VHD.
pub struct Table {
    file: SharedFile,
    name: String,
    table_offset: u64,
    block_size: u64,
    bitmap_bytes: u64,
    differencing: bool,
    footer: [u8; SECTOR as usize],
    state: Mutex<State>,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("name", &self.name)
            .field("block_size", &self.block_size)
            .finish()
    }
}

fn bit(bits: &[u8], sector: u64) -> bool {
    bits.get((sector / 8) as usize)
        .is_some_and(|b| b & (0x80 >> (sector % 8)) != 0)
}

impl Table {
    /// Loads and validates the BAT of `file` for a disk of `size` bytes. `meta_end` is the end of
    /// the metadata before the data area (header, BAT, locator data); `footer` the footer bytes
    /// written after the last block.
    pub fn open(
        file: SharedFile,
        header: &DynamicHeader,
        size: u64,
        meta_end: u64,
        differencing: bool,
        footer: [u8; SECTOR as usize],
    ) -> Result<Table> {
        let name = file.name().to_string();
        let bad = |d: String| StorageError::corrupt(&name, d);
        let block_size = header.block_size as u64;
        let blocks = size.div_ceil(block_size);
        if blocks > MAX_BAT_ENTRIES {
            return Err(StorageError::Unsupported(format!(
                "VHDs of more than {MAX_BAT_ENTRIES} blocks ({name} has {blocks})"
            )));
        }
        if (header.max_table_entries as u64) < blocks {
            return Err(bad(format!(
                "BAT has {} entries but the disk needs {blocks}",
                header.max_table_entries
            )));
        }
        let bat_bytes = blocks * 4;
        let file_len = file.len();
        if header
            .table_offset
            .checked_add(bat_bytes)
            .is_none_or(|e| e > file_len)
        {
            return Err(bad(format!(
                "BAT of {blocks} entries at {} runs past the end of the file ({file_len} bytes)",
                header.table_offset
            )));
        }
        let mut raw = vec![0u8; bat_bytes as usize];
        file.read_exact_at(header.table_offset, &mut raw)?;
        let bat: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let bitmap_bytes = header.bitmap_bytes();
        let span = bitmap_bytes + block_size;
        let mut starts: Vec<u64> = Vec::new();
        for (i, &e) in bat.iter().enumerate() {
            if e == UNALLOCATED {
                continue;
            }
            let at = e as u64 * SECTOR;
            if at < meta_end || at >= file_len {
                return Err(bad(format!(
                    "BAT entry {i} points to byte {at}, outside the data area ({meta_end}..{file_len})"
                )));
            }
            starts.push(at);
        }
        starts.sort_unstable();
        if let Some(w) = starts.windows(2).find(|w| w[1] - w[0] < span) {
            return Err(bad(format!(
                "blocks at bytes {} and {} overlap",
                w[0], w[1]
            )));
        }
        let next_free = starts
            .last()
            .map_or(meta_end, |&s| s + span)
            .max(meta_end)
            .next_multiple_of(SECTOR);
        Ok(Table {
            file,
            name,
            table_offset: header.table_offset,
            block_size,
            bitmap_bytes,
            differencing,
            footer,
            state: Mutex::new(State {
                bat,
                dirty_bat: BTreeSet::new(),
                next_free,
                footer_dirty: false,
                bitmaps: HashMap::new(),
            }),
        })
    }

    /// Locks the table; a poisoned lock fails the image (`crate::sync`).
    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        crate::sync::lock_meta(&self.state, format_args!("VHD image {}", self.name))
    }

    /// Bytes per block.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Bytes of each block's bitmap.
    pub fn bitmap_bytes(&self) -> u64 {
        self.bitmap_bytes
    }

    /// Where block `b` is.
    pub fn lookup(&self, b: u64) -> Result<BlockState> {
        let st = self.lock()?;
        Ok(Self::state_of(&st, b))
    }

    fn state_of(st: &State, b: u64) -> BlockState {
        match st.bat.get(b as usize) {
            Some(&e) if e != UNALLOCATED => BlockState::At(e as u64 * SECTOR),
            _ => BlockState::Unallocated,
        }
    }

    /// Number of allocated blocks.
    pub fn allocated_blocks(&self) -> Result<u64> {
        Ok(self
            .lock()?
            .bat
            .iter()
            .filter(|&&e| e != UNALLOCATED)
            .count() as u64)
    }

    /// For block `b` at `at`, calls `f(first sector, sectors, present)` for each run of sectors
    /// in `first..first + count` with one presence state (differencing disks).
    pub fn sector_runs(
        &self,
        b: u64,
        first: u64,
        count: u64,
        mut f: impl FnMut(u64, u64, bool),
    ) -> Result<()> {
        let mut st = self.lock()?;
        let BlockState::At(at) = Self::state_of(&st, b) else {
            f(first, count, false);
            return Ok(());
        };
        let bits = self.bitmap(&mut st, b, at)?;
        let mut s = first;
        let end = first + count;
        while s < end {
            let present = bit(bits, s);
            let mut n = 1;
            while s + n < end && bit(bits, s + n) == present {
                n += 1;
            }
            f(s, n, present);
            s += n;
        }
        Ok(())
    }

    fn bitmap<'a>(&self, st: &'a mut State, b: u64, at: u64) -> Result<&'a mut Vec<u8>> {
        if !st.bitmaps.contains_key(&b) {
            if st.bitmaps.len() >= MAX_CACHED_BITMAPS {
                self.write_back_locked(st)?;
                st.bitmaps.clear();
            }
            let mut bits = vec![0u8; self.bitmap_bytes as usize];
            self.file.read_exact_at(at, &mut bits)?;
            st.bitmaps.insert(b, Bitmap { bits, dirty: false });
        }
        st.bitmaps
            .get_mut(&b)
            .map(|m| &mut m.bits)
            .ok_or_else(|| StorageError::Unavailable("bitmap cache".into()))
    }

    /// Marks sectors `first..first + count` of allocated block `b` present (differencing disks);
    /// written at the next flush.
    pub fn set_present(&self, b: u64, first: u64, count: u64) -> Result<()> {
        let mut st = self.lock()?;
        let BlockState::At(at) = Self::state_of(&st, b) else {
            return Err(StorageError::corrupt(
                &self.name,
                "marking sectors of an unallocated block",
            ));
        };
        let bits = self.bitmap(&mut st, b, at)?;
        for s in first..first + count {
            if let Some(byte) = bits.get_mut((s / 8) as usize) {
                *byte |= 0x80 >> (s % 8);
            }
        }
        if let Some(m) = st.bitmaps.get_mut(&b) {
            m.dirty = true;
        }
        Ok(())
    }

    /// Allocates block `b` if it is not, returning where it is. A dynamic disk's new block has
    /// every bitmap bit set; a differencing disk's none.
    pub fn allocate(&self, b: u64) -> Result<u64> {
        let mut st = self.lock()?;
        if let BlockState::At(at) = Self::state_of(&st, b) {
            return Ok(at);
        }
        if b as usize >= st.bat.len() {
            return Err(StorageError::corrupt(&self.name, "block beyond the BAT"));
        }
        let at = st.next_free;
        let end = at + self.bitmap_bytes + self.block_size;
        let sector = at / SECTOR;
        if sector >= UNALLOCATED as u64 {
            return Err(StorageError::OutOfSpace(format!(
                "{}: a VHD file cannot grow past 2 TiB",
                self.name
            )));
        }
        let len = self.file.len();
        if len > at + SECTOR {
            // Leftovers of an interrupted session where the new block goes: make it read zeros.
            self.file.zero_range(at, len.min(end) - at)?;
        }
        let fill = if self.differencing { 0 } else { 0xff };
        let bits = vec![fill; self.bitmap_bytes as usize];
        self.file.write_all_at(at, &bits)?;
        self.file.write_all_at(end, &self.footer)?;
        st.bat[b as usize] = sector as u32;
        st.dirty_bat.insert(b * 4 / SECTOR);
        st.next_free = end;
        st.footer_dirty = true;
        if self.differencing {
            if st.bitmaps.len() >= MAX_CACHED_BITMAPS {
                self.write_back_locked(&mut st)?;
                st.bitmaps.clear();
            }
            st.bitmaps.insert(b, Bitmap { bits, dirty: false });
        }
        Ok(at)
    }

    /// Writes the footer after the last block and cuts off whatever follows it (leftovers of an
    /// interrupted allocation: no BAT entry points there), then syncs. Used when the footer at
    /// the end was found damaged.
    pub fn repair_end(&self) -> Result<()> {
        let mut st = self.lock()?;
        st.footer_dirty = true;
        self.write_back_locked(&mut st)?;
        let end = st.next_free + SECTOR;
        if self.file.len() > end {
            self.file.set_len(end)?;
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Syncs the data, then writes dirty bitmaps, BAT sectors and the footer, and syncs again.
    pub fn write_back(&self) -> Result<()> {
        let mut st = self.lock()?;
        self.write_back_locked(&mut st)
    }

    fn write_back_locked(&self, st: &mut State) -> Result<()> {
        let dirty_maps = st.bitmaps.values().any(|m| m.dirty);
        if st.dirty_bat.is_empty() && !dirty_maps && !st.footer_dirty {
            return self.file.sync_data();
        }
        self.file.sync_data()?;
        let mut blocks: Vec<u64> = st
            .bitmaps
            .iter()
            .filter(|(_, m)| m.dirty)
            .map(|(b, _)| *b)
            .collect();
        blocks.sort_unstable();
        for b in blocks {
            if let (BlockState::At(at), Some(m)) = (Self::state_of(st, b), st.bitmaps.get(&b)) {
                self.file.write_all_at(at, &m.bits)?;
            }
        }
        for m in st.bitmaps.values_mut() {
            m.dirty = false;
        }
        let per_sector = (SECTOR / 4) as usize;
        for s in std::mem::take(&mut st.dirty_bat) {
            let first = s as usize * per_sector;
            let last = (first + per_sector).min(st.bat.len());
            let bytes: Vec<u8> = st.bat[first..last]
                .iter()
                .flat_map(|e| e.to_be_bytes())
                .collect();
            self.file
                .write_all_at(self.table_offset + s * SECTOR, &bytes)?;
        }
        if st.footer_dirty {
            self.file.write_all_at(st.next_free, &self.footer)?;
            st.footer_dirty = false;
        }
        self.file.sync_data()
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

    /// The file the table lives in.
    pub fn file(&self) -> &SharedFile {
        &self.file
    }

    /// Whether sectors come from a parent where the bitmap is clear.
    pub fn differencing(&self) -> bool {
        self.differencing
    }
}

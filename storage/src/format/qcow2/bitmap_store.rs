//! Writing persistent dirty bitmaps into the qcow2 bitmaps extension (the reading side and the
//! layout are in `bitmaps.rs`): adding a bitmap with given bits and flags, removing one, and
//! storing new bits for existing bitmaps (what change tracking does on a clean close, see
//! `bitmap_track.rs`).
//!
//! Both run on the control plane with the image idle. A change never rewrites a structure in
//! place: the new bitmap's data clusters, its table and a new directory (the old entries copied
//! byte for byte, so bitmaps QEMU wrote stay exactly as they were) go to newly allocated
//! clusters; their refcounts are written and synced; only then does the header point at the new
//! directory (and set auto-clear bit 0), synced; and last the clusters nothing points at any
//! more lose their references. A crash at any point leaves the old or the new directory whole,
//! at worst with leaked clusters.

use crate::bitmap::BitmapBits;
use crate::bytes::{put_be32, put_be64};
use crate::error::{Result, StorageError};

use super::bitmaps::{self, Qcow2Bitmap, MAX_BITMAPS, MAX_NAME_BYTES};
use super::header::{autoclear, ext};
use super::meta::{read_u64_table, Meta};

/// A bitmap to add.
#[derive(Clone, Debug)]
pub struct NewBitmap<'a> {
    /// Its name (1 to 1023 bytes of UTF-8).
    pub name: &'a str,
    /// Bytes per bit: a power of two from 512 B to 2 GiB.
    pub granularity: u64,
    /// The bits, as `crate::bitmap` lays them out (bit `i` of word `w` is granule `64 w + i`).
    pub words: &'a [u64],
    /// Its flags: 0 (disabled), or [`bitmaps::FLAG_AUTO`] (enabled) with
    /// [`bitmaps::FLAG_IN_USE`] while a writer tracks it.
    pub flags: u32,
}

/// The bitmap directory as it stands.
struct Directory {
    bytes: Vec<u8>,
    list: Vec<Qcow2Bitmap>,
    /// Offset and size in the file, when there is one.
    at: Option<(u64, u64)>,
}

impl Meta {
    /// The directory as it stands (bytes and parsed entries); empty without a consistent
    /// bitmaps extension.
    fn bitmap_directory(&self) -> Result<Directory> {
        let consistent = self.header.autoclear_features & autoclear::BITMAPS != 0;
        let Some(data) = self.header.extension(ext::BITMAPS).filter(|_| consistent) else {
            return Ok(Directory {
                bytes: Vec::new(),
                list: Vec::new(),
                at: None,
            });
        };
        let (e, bytes, list) = bitmaps::read_directory(
            self.file.as_ref(),
            data,
            self.header.size,
            self.geo.cluster_size,
        )?;
        Ok(Directory {
            bytes,
            list,
            at: Some((e.directory_offset, e.directory_size)),
        })
    }

    /// Whether the image holds persistent bitmaps (in a consistent extension).
    pub(super) fn has_bitmaps(&self) -> Result<bool> {
        Ok(!self.bitmap_directory()?.list.is_empty())
    }

    /// Allocates clusters for `bytes`, writes them (padded to whole clusters) and returns where.
    fn write_new(&mut self, bytes: &[u8]) -> Result<u64> {
        let cs = self.geo.cluster_size;
        let n = (bytes.len() as u64).div_ceil(cs).max(1);
        let (at, _) = self.alloc_clusters_blocking(n)?;
        let mut padded = bytes.to_vec();
        padded.resize((n * cs) as usize, 0);
        for (i, chunk) in padded.chunks(cs as usize).enumerate() {
            self.write_cluster(at + i as u64 * cs, chunk)?;
        }
        Ok(at)
    }

    /// Points the header at `dir` (written to new clusters), with refcounts made durable first;
    /// then drops the references in `release` (host cluster offsets).
    fn switch_directory(&mut self, nb: usize, dir: &[u8], release: Vec<u64>) -> Result<()> {
        let ext_data = if nb == 0 {
            None
        } else {
            let at = self.write_new(dir)?;
            let mut e = Vec::with_capacity(24);
            e.extend_from_slice(&(nb as u32).to_be_bytes());
            e.extend_from_slice(&0u32.to_be_bytes());
            e.extend_from_slice(&(dir.len() as u64).to_be_bytes());
            e.extend_from_slice(&at.to_be_bytes());
            Some(e)
        };
        self.write_everything()?;
        let mut h = self.header.clone();
        if ext_data.is_some() {
            h.autoclear_features |= autoclear::BITMAPS;
        } else {
            h.autoclear_features &= !autoclear::BITMAPS;
        }
        h.set_extension(ext::BITMAPS, ext_data);
        // Refuse before anything points anywhere if the header no longer fits.
        h.serialize()?;
        self.header = h;
        self.write_header()?;
        self.file.sync_data()?;
        let cs = self.geo.cluster_size;
        for off in release {
            self.update_refcount_blocking(off / cs, -1)?;
        }
        self.write_everything()
    }

    /// The clusters of the directory at `(offset, size)`.
    fn directory_clusters(&self, dir_at: Option<(u64, u64)>) -> Vec<u64> {
        let cs = self.geo.cluster_size;
        match dir_at {
            Some((off, size)) => (0..size.div_ceil(cs)).map(|i| off + i * cs).collect(),
            None => Vec::new(),
        }
    }

    /// Writes `words` (a bitmap of `granularity` over the disk) to new data clusters and a new
    /// table; returns the table's offset and entries. All-zero clusters are left unallocated.
    fn write_bitmap_table(
        &mut self,
        name: &str,
        granularity: u64,
        words: &[u64],
    ) -> Result<(u64, u64)> {
        let cs = self.geo.cluster_size;
        let size = self.header.size;
        let bits = size.div_ceil(granularity);
        let bytes_len = bits.div_ceil(8);
        if (words.len() as u64) * 8 < bytes_len {
            return Err(StorageError::InvalidInput(format!(
                "Bitmap '{name}' holds {} words, fewer than the disk needs",
                words.len()
            )));
        }
        let mut data: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        data.truncate(bytes_len as usize);
        let entries = bitmaps::table_entries(size, granularity, cs);
        let mut table = Vec::with_capacity(entries as usize * 8);
        for i in 0..entries {
            let start = (i * cs) as usize;
            let chunk = &data[start..(start + cs as usize).min(data.len())];
            let entry = if chunk.iter().all(|&x| x == 0) {
                0
            } else {
                self.write_new(chunk)?
            };
            table.extend_from_slice(&entry.to_be_bytes());
        }
        Ok((self.write_new(&table)?, entries))
    }

    /// The host clusters of bitmap `b`: its table's and its data's, each once. The table comes
    /// from the image, so its entries are checked as for reading the bits, and an entry naming a
    /// cluster of the image's own tables is left out (with a warning): releasing it would free
    /// metadata still in use.
    fn bitmap_clusters(&self, b: &Qcow2Bitmap) -> Result<Vec<u64>> {
        let cs = self.geo.cluster_size;
        let file_len = self.file.len();
        let table = read_u64_table(self.file.as_ref(), b.table_offset, b.table_size as usize)?;
        let mut out = Vec::with_capacity(table.len());
        for (i, &e) in table.iter().enumerate() {
            out.extend(bitmaps::table_entry_cluster(b, i, e, cs, 1, file_len)?);
        }
        let table_clusters = (u64::from(b.table_size) * 8).div_ceil(cs);
        out.extend((0..table_clusters).map(|k| b.table_offset + k * cs));
        out.sort_unstable();
        out.dedup();
        out.retain(|&off| {
            let metadata = self.refs.holds_metadata(off / cs);
            if metadata {
                tracing::warn!(
                    file = self.file.name(),
                    cluster = off,
                    "bitmap '{}' named a cluster of the image's own tables; it is not released",
                    b.name
                );
            }
            !metadata
        });
        Ok(out)
    }

    /// Gives the bitmaps named in `updates` new tables holding the given bits and sets their
    /// in-use flags as given (their other flags and every other bitmap stay as they were),
    /// crash-ordered as the module documentation says.
    pub fn store_bitmaps(&mut self, updates: &[BitmapBits<'_>]) -> Result<()> {
        if !self.writable {
            return Err(StorageError::ReadOnly(self.file.name().to_string()));
        }
        let Directory {
            bytes: mut dir,
            list,
            at: dir_at,
        } = self.bitmap_directory()?;
        let mut release = self.directory_clusters(dir_at);
        for &BitmapBits {
            name,
            words,
            in_use,
        } in updates
        {
            let Some(b) = list.iter().find(|x| x.name == name) else {
                return Err(StorageError::InvalidInput(format!(
                    "{} has no bitmap named '{name}'",
                    self.file.name()
                )));
            };
            release.extend(self.bitmap_clusters(b)?);
            let (table_at, entries) = self.write_bitmap_table(name, b.granularity, words)?;
            let at = b.entry_at;
            let mut flags = crate::bytes::be32(&dir, at + 12) & !bitmaps::FLAG_IN_USE;
            if in_use {
                flags |= bitmaps::FLAG_IN_USE;
            }
            put_be64(&mut dir, at, table_at);
            put_be32(&mut dir, at + 8, entries as u32);
            put_be32(&mut dir, at + 12, flags);
        }
        self.switch_directory(list.len(), &dir, release)
    }

    /// Adds the bitmap `b` (see the module documentation).
    pub fn add_bitmap(&mut self, b: &NewBitmap<'_>) -> Result<()> {
        if !self.writable {
            return Err(StorageError::ReadOnly(self.file.name().to_string()));
        }
        if !self.geo.v3 {
            return Err(StorageError::Unsupported(
                "persistent bitmaps in qcow2 version 2 images (compat=0.10)".into(),
            ));
        }
        if b.name.is_empty() || b.name.len() > MAX_NAME_BYTES {
            return Err(StorageError::InvalidInput(
                "Bitmap names must be 1 to 1023 bytes long".into(),
            ));
        }
        if b.flags & !(bitmaps::FLAG_AUTO | bitmaps::FLAG_IN_USE) != 0 {
            return Err(StorageError::InvalidInput(format!(
                "Bitmap flags {:#x} (only auto and in-use)",
                b.flags
            )));
        }
        let gbits = b.granularity.trailing_zeros();
        if !b.granularity.is_power_of_two() || !(9..=31).contains(&gbits) {
            return Err(StorageError::InvalidInput(format!(
                "Bitmap granularity must be a power of two from 512 B to 2 GiB ({} given)",
                b.granularity
            )));
        }
        let Directory {
            bytes: mut dir,
            list,
            at: dir_at,
        } = self.bitmap_directory()?;
        if list.iter().any(|x| x.name == b.name) {
            return Err(StorageError::AlreadyExists(format!("Bitmap '{}'", b.name)));
        }
        if list.len() as u32 >= MAX_BITMAPS {
            return Err(StorageError::InvalidInput(format!(
                "An image holds at most {MAX_BITMAPS} bitmaps"
            )));
        }
        let (table_at, entries) = self.write_bitmap_table(b.name, b.granularity, b.words)?;
        dir.extend_from_slice(&table_at.to_be_bytes());
        dir.extend_from_slice(&(entries as u32).to_be_bytes());
        dir.extend_from_slice(&b.flags.to_be_bytes());
        dir.push(1);
        dir.push(gbits as u8);
        dir.extend_from_slice(&(b.name.len() as u16).to_be_bytes());
        dir.extend_from_slice(&0u32.to_be_bytes());
        dir.extend_from_slice(b.name.as_bytes());
        dir.resize(dir.len().next_multiple_of(8), 0);
        let release = self.directory_clusters(dir_at);
        self.switch_directory(list.len() + 1, &dir, release)
    }

    /// Removes the bitmap `name` with its table and data.
    pub fn remove_bitmap(&mut self, name: &str) -> Result<()> {
        if !self.writable {
            return Err(StorageError::ReadOnly(self.file.name().to_string()));
        }
        let Directory {
            bytes: dir,
            list,
            at: dir_at,
        } = self.bitmap_directory()?;
        let Some(i) = list.iter().position(|x| x.name == name) else {
            return Err(StorageError::InvalidInput(format!(
                "{} has no bitmap named '{name}'",
                self.file.name()
            )));
        };
        let gone = &list[i];
        let end = list.get(i + 1).map_or(dir.len(), |n| n.entry_at);
        let mut new_dir = dir[..gone.entry_at].to_vec();
        new_dir.extend_from_slice(&dir[end..]);
        let mut release = self.directory_clusters(dir_at);
        release.extend(self.bitmap_clusters(gone)?);
        self.switch_directory(list.len() - 1, &new_dir, release)
    }
}

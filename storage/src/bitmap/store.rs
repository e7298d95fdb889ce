//! The dirty bitmaps of one device and their persistence: in a sidecar file, or inside the
//! image itself when its format keeps bitmaps (a qcow2 image's bitmaps extension, see
//! [`BitmapSet::open_in_image`] and `crate::bitmap::persistent`).
//!
//! The file is rewritten whole and replaced atomically (temporary file, fsync, rename, fsync of
//! the directory), through a [`FileSystem`] seam: the host's, or in crash tests one that loses
//! power together with the device (see `crate::durable`). While the device is open for
//! writing, the file carries an *in use* flag, written before the first write is accepted; a
//! clean close saves the bits and clears it. A file found with the flag set was not closed
//! cleanly, so every bitmap in it may be missing changes: all are marked invalid, and a backup
//! from one falls back to reading everything.
//!
//! Layout (little-endian; see docs/format-volume.md):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `STRATABM` |
//! | 8 | 4 | version (1) |
//! | 12 | 4 | crc32 of the 4096-byte header with this field zeroed |
//! | 16 | 8 | flags: bit 0 in use |
//! | 24 | 8 | device size in bytes |
//! | 32 | 4 | number of bitmaps (at most 31) |
//! | 40 | 128 × n | entries |
//!
//! Entry: name (64 bytes, UTF-8, zero padded), name length (1), flags (1; bit 0 valid), 2
//! reserved, crc32 of the bit words (4), granularity (8), offset of the words in the file (8),
//! length of the words in bytes (8), dirty bit count (8), 24 reserved. The words follow the
//! header, each bitmap's at a 4096-aligned offset, as little-endian u64s (bit `i` of word `w` is
//! chunk `64 w + i`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use serde::Serialize;

use crate::bitmap::bits::{ranges, Bits};
use crate::bitmap::persistent::{BitmapBits, PersistentBitmaps};
use crate::bytes::{le32, le64, put_le32, put_le64};
use crate::device::BlockDevice;
use crate::durable::{host_fs, write_atomically_on, Create, FileSystem};
use crate::error::{Result, StorageError};
use crate::volume::codec::{seal, sealed};
use crate::volume::name::{check_name, NameKind};

const MAGIC: &[u8; 8] = b"STRATABM";
const VERSION: u32 = 1;
const HEADER: usize = 4096;
const ENTRY: usize = 128;
const ENTRIES_AT: usize = 40;
/// Most bitmaps per device.
pub const MAX_BITMAPS: usize = (HEADER - ENTRIES_AT) / ENTRY;
const FLAG_IN_USE: u64 = 1;
const ENTRY_VALID: u8 = 1;
const NAME_MAX: usize = 64;

/// One named bitmap.
#[derive(Debug)]
pub struct Bitmap {
    name: String,
    bits: Bits,
    /// Whether the bits are known to hold every change since the bitmap was created, cleared
    /// or last taken.
    valid: AtomicBool,
}

/// Facts about a bitmap, for listings.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct BitmapInfo {
    /// Name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Whether it holds every change (false after an unclean stop).
    pub valid: bool,
    /// Dirty bytes (dirty bits times the granularity, clipped to the device).
    pub dirty_bytes: u64,
}

/// A bitmap's contents taken for a backup: its dirty ranges at the moment of the take, and
/// whether they can be trusted. The live bitmap restarts empty (and valid) at that moment.
#[derive(Clone, Debug)]
pub struct TakenBitmap {
    /// Name of the bitmap it was taken from.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Device size at the take.
    pub size: u64,
    /// False if changes may be missing: back up everything instead.
    pub valid: bool,
    words: Vec<u64>,
}

impl TakenBitmap {
    /// Dirty byte ranges `(offset, len)`, merged and in order.
    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        ranges(&self.words, self.granularity, self.size)
    }

    /// Dirty bytes.
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_ranges().iter().map(|r| r.1).sum()
    }
}

impl Bitmap {
    fn info(&self) -> BitmapInfo {
        let size = self.bits.size();
        BitmapInfo {
            name: self.name.clone(),
            granularity: self.bits.granularity(),
            valid: self.valid.load(Ordering::Acquire),
            dirty_bytes: ranges(&self.bits.words(), self.bits.granularity(), size)
                .iter()
                .map(|r| r.1)
                .sum(),
        }
    }
}

/// The bitmaps of one device. See the module documentation.
#[derive(Debug)]
pub struct BitmapSet {
    path: PathBuf,
    /// Where the sidecar file lives.
    fs: Arc<dyn FileSystem>,
    bitmaps: RwLock<Vec<Arc<Bitmap>>>,
    /// Number of bitmaps, readable without the lock (the write path checks it first).
    count: std::sync::atomic::AtomicUsize,
    /// Writers tracking changes: while there are any, the file says "in use".
    writers: Mutex<usize>,
    size: Mutex<u64>,
    /// Serialises saves.
    save: Mutex<()>,
    /// When the bitmaps live in the image: the image, and whether they are flagged in use on
    /// disk.
    image: Option<InImage>,
}

/// Bitmaps kept inside the image (see [`BitmapSet::open_in_image`]).
#[derive(Debug)]
struct InImage {
    device: Arc<dyn BlockDevice>,
    flagged: Mutex<bool>,
}

impl InImage {
    fn store(&self) -> Result<&dyn PersistentBitmaps> {
        self.device.persistent_bitmaps().ok_or_else(|| {
            StorageError::Unsupported("dirty bitmaps inside this image's format".into())
        })
    }
}

fn corrupt(path: &Path, detail: impl Into<String>) -> StorageError {
    StorageError::corrupt(format!("bitmap file {}", path.display()), detail)
}

impl BitmapSet {
    /// Opens the bitmaps of a device of `size` bytes stored at `path` (none if the file does
    /// not exist).
    pub fn open(path: &Path, size: u64) -> Result<BitmapSet> {
        BitmapSet::open_with(host_fs(), path, size)
    }

    /// [`BitmapSet::open`] with the file at `path` in `fs`.
    pub fn open_with(fs: Arc<dyn FileSystem>, path: &Path, size: u64) -> Result<BitmapSet> {
        let (bitmaps, was_in_use) = match fs.read(path) {
            Ok(bytes) => decode(path, &bytes, size)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), false),
            Err(e) => return Err(StorageError::io(format!("Reading {}", path.display()), e)),
        };
        if was_in_use && !bitmaps.is_empty() {
            tracing::warn!(file = %path.display(), "the device was not closed cleanly: its dirty bitmaps are now invalid");
            for b in &bitmaps {
                b.valid.store(false, Ordering::Release);
            }
        }
        let set = BitmapSet {
            path: path.to_path_buf(),
            fs,
            count: std::sync::atomic::AtomicUsize::new(bitmaps.len()),
            bitmaps: RwLock::new(bitmaps.into_iter().map(Arc::new).collect()),
            writers: Mutex::new(0),
            size: Mutex::new(size),
            save: Mutex::new(()),
            image: None,
        };
        if was_in_use {
            set.save()?;
        }
        Ok(set)
    }

    /// Opens the bitmaps `device` (the image at `path`) keeps itself: its enabled bitmaps
    /// (see `crate::bitmap::persistent`). A writable open has flagged them in use already; one
    /// the image says was not saved consistently is invalid. Bitmaps whose granularity this
    /// module cannot hold are left alone (and stay flagged in use by a writable open).
    pub fn open_in_image(device: Arc<dyn BlockDevice>, path: &Path) -> Result<BitmapSet> {
        let image = InImage {
            flagged: Mutex::new(!device.read_only()),
            device,
        };
        let size = image.device.size();
        let mut bitmaps = Vec::new();
        for b in image.store()?.load_enabled()? {
            let valid = b.words.is_some();
            let bits = match &b.words {
                Some(w) => Bits::from_words(size, b.granularity, w),
                None => Bits::new(size, b.granularity),
            };
            match bits {
                Ok(bits) => bitmaps.push(Arc::new(Bitmap {
                    name: b.name,
                    bits,
                    valid: AtomicBool::new(valid),
                })),
                Err(e) => {
                    tracing::warn!(image = %path.display(), bitmap = b.name, error = %e, "bitmap not tracked")
                }
            }
        }
        Ok(BitmapSet {
            path: path.to_path_buf(),
            fs: host_fs(),
            count: std::sync::atomic::AtomicUsize::new(bitmaps.len()),
            bitmaps: RwLock::new(bitmaps),
            writers: Mutex::new(0),
            size: Mutex::new(size),
            save: Mutex::new(()),
            image: Some(image),
        })
    }

    /// Whether the bitmaps live inside the image rather than in a sidecar file.
    pub fn in_image(&self) -> bool {
        self.image.is_some()
    }

    fn writers(&self) -> MutexGuard<'_, usize> {
        crate::sync::lock(&self.writers)
    }

    /// A writer starts tracking: the file is marked in use before this returns, so that a
    /// crash from here on invalidates the bitmaps.
    pub fn begin_tracking(&self) -> Result<()> {
        let mut w = self.writers();
        *w += 1;
        if *w == 1 {
            if let Err(e) = self.write(true) {
                *w -= 1;
                return Err(e);
            }
        }
        Ok(())
    }

    /// A writer stops tracking; when the last one stops, the bits are saved as complete.
    pub fn end_tracking(&self) -> Result<()> {
        let mut w = self.writers();
        *w = w.saturating_sub(1);
        if *w == 0 {
            self.write(false)?;
        }
        Ok(())
    }

    /// Where the bitmaps are stored (the image itself for [`BitmapSet::open_in_image`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn list(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Bitmap>>> {
        crate::sync::read(&self.bitmaps)
    }

    fn size(&self) -> MutexGuard<'_, u64> {
        crate::sync::lock(&self.size)
    }

    /// Whether there are any bitmaps.
    pub fn is_empty(&self) -> bool {
        self.list().is_empty()
    }

    /// Marks `len` bytes at `offset` dirty in every bitmap.
    pub fn mark(&self, offset: u64, len: u64) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        for b in self.list().iter() {
            b.bits.mark(offset, len);
        }
    }

    fn find(&self, name: &str) -> Result<Arc<Bitmap>> {
        self.list()
            .iter()
            .find(|b| b.name == name)
            .cloned()
            .ok_or_else(|| StorageError::NotFound(PathBuf::from(format!("bitmap {name}"))))
    }

    /// The bitmaps.
    pub fn infos(&self) -> Vec<BitmapInfo> {
        self.list().iter().map(|b| b.info()).collect()
    }

    /// One bitmap's facts.
    pub fn info(&self, name: &str) -> Result<BitmapInfo> {
        Ok(self.find(name)?.info())
    }

    /// The dirty ranges of a bitmap now (without clearing it), and whether it is valid.
    pub fn dirty_ranges(&self, name: &str) -> Result<(Vec<(u64, u64)>, bool)> {
        let b = self.find(name)?;
        Ok((
            ranges(&b.bits.words(), b.bits.granularity(), b.bits.size()),
            b.valid.load(Ordering::Acquire),
        ))
    }

    /// The state of bitmap `name` at `offset`: whether that byte is dirty (always true for a
    /// bitmap that is not valid, which may miss changes), and for how many bytes from `offset`
    /// on (at most `max_len`) the state stays the same. `None` at or past the device's end.
    pub fn dirty_run(&self, name: &str, offset: u64, max_len: u64) -> Result<Option<(bool, u64)>> {
        let b = self.find(name)?;
        if !b.valid.load(Ordering::Acquire) {
            let size = b.bits.size();
            return Ok((offset < size && max_len > 0).then(|| (true, max_len.min(size - offset))));
        }
        Ok(b.bits.run_at(offset, max_len))
    }

    /// Adds an empty, valid bitmap. A bitmap added to a device that is not open for writing is
    /// still valid: nothing can have changed the device meanwhile except through a tracked open.
    pub fn add(&self, name: &str, granularity: u64) -> Result<()> {
        check_name(name, NameKind::Bitmap)?;
        if name.len() > NAME_MAX {
            return Err(StorageError::InvalidInput(format!(
                "Bitmap name '{name}' is longer than {NAME_MAX} bytes"
            )));
        }
        let size = *self.size();
        let bits = Bits::new(size, granularity)?;
        // In the image: written there first (enabled, flagged in use while writers track), with
        // saves held off (taken before the list, the order `write` takes them in) and the list
        // only read, so that no tracked write waits on the image's metadata.
        let _serial = self.image.as_ref().map(|_| crate::sync::lock(&self.save));
        if let Some(img) = &self.image {
            check_room(&self.list(), name)?;
            let flagged = *crate::sync::lock(&img.flagged);
            img.store()?.add_enabled(name, granularity, flagged)?;
        }
        {
            let mut list = crate::sync::write(&self.bitmaps);
            check_room(&list, name)?;
            list.push(Arc::new(Bitmap {
                name: name.to_string(),
                bits,
                valid: AtomicBool::new(true),
            }));
            self.count.store(list.len(), Ordering::Release);
        }
        if self.image.is_some() {
            return Ok(());
        }
        self.save()
    }

    /// Deletes a bitmap.
    pub fn remove(&self, name: &str) -> Result<()> {
        // In the image: removed there first, as `add` does it.
        let _serial = self.image.as_ref().map(|_| crate::sync::lock(&self.save));
        if let Some(img) = &self.image {
            self.find(name)?;
            img.store()?.remove(name)?;
        }
        {
            let mut list = crate::sync::write(&self.bitmaps);
            if !list.iter().any(|b| b.name == name) {
                return Err(StorageError::NotFound(PathBuf::from(format!(
                    "bitmap {name}"
                ))));
            }
            list.retain(|b| b.name != name);
            self.count.store(list.len(), Ordering::Release);
        }
        if self.image.is_some() {
            return Ok(());
        }
        self.save()
    }

    /// Clears a bitmap; it is valid from now on.
    pub fn clear(&self, name: &str) -> Result<()> {
        let b = self.find(name)?;
        b.bits.clear();
        b.valid.store(true, Ordering::Release);
        self.save()
    }

    /// Marks every range dirty in `source` in `target` too. An invalid source makes the target
    /// invalid. Granularities may differ: a coarser target rounds the ranges out to its own.
    pub fn merge(&self, source: &str, target: &str) -> Result<()> {
        let (s, t) = (self.find(source)?, self.find(target)?);
        if s.bits.granularity() == t.bits.granularity() {
            t.bits.or_words(&s.bits.words());
        } else {
            for (offset, len) in ranges(&s.bits.words(), s.bits.granularity(), s.bits.size()) {
                t.bits.mark(offset, len);
            }
        }
        if !s.valid.load(Ordering::Acquire) {
            t.valid.store(false, Ordering::Release);
        }
        self.save()
    }

    /// Takes a bitmap for a backup: returns its bits and validity and restarts it empty and
    /// valid, atomically with respect to writes completing meanwhile. If saving the restarted
    /// bitmap fails, the bits stay in it and the error is returned. Take it *before*
    /// snapshotting the device for the backup, so that a write between the two is in the next
    /// bitmap (copied twice at worst), never in neither.
    pub fn take(&self, name: &str) -> Result<TakenBitmap> {
        let b = self.find(name)?;
        let size = b.bits.size();
        let valid = b.valid.swap(true, Ordering::AcqRel);
        let words = b.bits.take();
        if let Err(e) = self.save() {
            // Not taken after all: the caller gets no bits, so they go back into the live
            // bitmap (else the next backup through it would miss these changes).
            b.bits.or_words(&words);
            if !valid {
                b.valid.store(false, Ordering::Release);
            }
            return Err(e);
        }
        Ok(TakenBitmap {
            name: name.to_string(),
            granularity: b.bits.granularity(),
            size,
            valid,
            words,
        })
    }

    /// Puts a taken bitmap back after a failed backup: its bits are merged into the live one,
    /// which becomes invalid if the taken one was.
    pub fn restore(&self, taken: &TakenBitmap) -> Result<()> {
        let b = self.find(&taken.name)?;
        if b.bits.granularity() != taken.granularity {
            return Err(StorageError::InvalidInput(
                "the taken bitmap has another granularity".into(),
            ));
        }
        b.bits.or_words(&taken.words);
        if !taken.valid {
            b.valid.store(false, Ordering::Release);
        }
        self.save()
    }

    /// Follows a resize of the device (a grown part is dirty).
    pub fn resize(&self, new_size: u64) -> Result<()> {
        for b in self.list().iter() {
            b.bits.resize(new_size)?;
        }
        *self.size() = new_size;
        self.save()
    }

    /// Saves the bitmaps (still marked in use while writers track).
    pub fn save(&self) -> Result<()> {
        let in_use = *self.writers() > 0;
        self.write(in_use)
    }

    fn write(&self, in_use: bool) -> Result<()> {
        let _serial = crate::sync::lock(&self.save);
        let list: Vec<Arc<Bitmap>> = self.list().clone();
        if let Some(img) = &self.image {
            return write_in_image(img, &list, in_use);
        }
        if list.is_empty() && !self.file_exists()? {
            return Ok(());
        }
        if let Some(dir) = self.path.parent() {
            self.fs
                .create_dir_all(dir)
                .map_err(|e| StorageError::io(format!("Creating {}", dir.display()), e))?;
        }
        let size = *self.size();
        let mut header = vec![0u8; HEADER];
        header[0..8].copy_from_slice(MAGIC);
        put_le32(&mut header, 8, VERSION);
        put_le64(&mut header, 16, if in_use { FLAG_IN_USE } else { 0 });
        put_le64(&mut header, 24, size);
        put_le32(&mut header, 32, list.len() as u32);
        let mut body = Vec::new();
        for (i, b) in list.iter().enumerate() {
            let words = b.bits.words();
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            let offset = HEADER + body.len();
            let at = ENTRIES_AT + i * ENTRY;
            let name = b.name.as_bytes();
            header[at..at + name.len()].copy_from_slice(name);
            header[at + 64] = name.len() as u8;
            header[at + 65] = if b.valid.load(Ordering::Acquire) {
                ENTRY_VALID
            } else {
                0
            };
            put_le32(&mut header, at + 68, crc32fast::hash(&bytes));
            put_le64(&mut header, at + 72, b.bits.granularity());
            put_le64(&mut header, at + 80, offset as u64);
            put_le64(&mut header, at + 88, bytes.len() as u64);
            put_le64(&mut header, at + 96, b.bits.count());
            body.extend_from_slice(&bytes);
            body.resize(body.len().div_ceil(4096) * 4096, 0);
        }
        seal(&mut header, 12);
        header.extend_from_slice(&body);
        write_atomically_on(
            self.fs.as_ref(),
            &self.path,
            &header,
            0o644,
            Create::OrReplace,
        )
    }

    fn file_exists(&self) -> Result<bool> {
        self.fs
            .exists(&self.path)
            .map_err(|e| StorageError::io(format!("Looking for {}", self.path.display()), e))
    }

    /// Deletes the file of a device's bitmaps (the device was removed).
    pub fn delete_file(fs: &dyn FileSystem, path: &Path) -> Result<()> {
        match fs.remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StorageError::io(format!("Removing {}", path.display()), e)),
        }
    }
}

/// Refuses a new bitmap `name` in `list` that exists already or would be one too many.
fn check_room(list: &[Arc<Bitmap>], name: &str) -> Result<()> {
    if list.iter().any(|b| b.name == name) {
        return Err(StorageError::AlreadyExists(format!("bitmap {name}")));
    }
    if list.len() >= MAX_BITMAPS {
        return Err(StorageError::OutOfSpace(format!(
            "a device holds at most {MAX_BITMAPS} bitmaps"
        )));
    }
    Ok(())
}

/// Saves `list` into the image: while tracking (`in_use`) only the flags matter, and a writable
/// open has set them already; otherwise every bitmap gets its bits written and its flag cleared,
/// except an invalid one, which keeps the flag (the one way the image can say "do not trust").
fn write_in_image(img: &InImage, list: &[Arc<Bitmap>], in_use: bool) -> Result<()> {
    let mut flagged = crate::sync::lock(&img.flagged);
    if (in_use && *flagged) || list.is_empty() {
        return Ok(());
    }
    let words: Vec<Vec<u64>> = list.iter().map(|b| b.bits.words()).collect();
    let bits: Vec<BitmapBits<'_>> = list
        .iter()
        .zip(&words)
        .map(|(b, w)| BitmapBits {
            name: &b.name,
            words: w,
            in_use: in_use || !b.valid.load(Ordering::Acquire),
        })
        .collect();
    img.store()?.store(&bits)?;
    *flagged = in_use;
    Ok(())
}

/// Decodes a bitmap file; returns the bitmaps and whether it was marked in use.
fn decode(path: &Path, b: &[u8], size: u64) -> Result<(Vec<Bitmap>, bool)> {
    if b.len() < HEADER || &b[0..8] != MAGIC {
        return Err(corrupt(path, "not a bitmap file"));
    }
    if !sealed(&b[..HEADER], 12) {
        return Err(corrupt(path, "header checksum mismatch"));
    }
    let version = le32(b, 8);
    if version != VERSION {
        return Err(StorageError::Unsupported(format!(
            "bitmap file version {version} ({})",
            path.display()
        )));
    }
    let in_use = le64(b, 16) & FLAG_IN_USE != 0;
    let saved_size = le64(b, 24);
    let n = le32(b, 32) as usize;
    if n > MAX_BITMAPS {
        return Err(corrupt(path, format!("{n} bitmaps")));
    }
    let mut out = Vec::new();
    for i in 0..n {
        let at = ENTRIES_AT + i * ENTRY;
        let len = b[at + 64] as usize;
        let name = std::str::from_utf8(&b[at..at + len.min(NAME_MAX)])
            .map_err(|_| corrupt(path, format!("bitmap {i} has a name that is not UTF-8")))?
            .to_string();
        check_name(&name, NameKind::Bitmap).map_err(|e| corrupt(path, e.to_string()))?;
        let granularity = le64(b, at + 72);
        let (offset, bytes) = (le64(b, at + 80) as usize, le64(b, at + 88) as usize);
        let words = b
            .get(offset..offset.saturating_add(bytes))
            .filter(|w| w.len() % 8 == 0)
            .ok_or_else(|| corrupt(path, format!("bitmap {name} points outside the file")))?;
        if crc32fast::hash(words) != le32(b, at + 68) {
            return Err(corrupt(path, format!("bitmap {name}: checksum mismatch")));
        }
        let words: Vec<u64> = words.chunks(8).map(|c| le64(c, 0)).collect();
        let bits = Bits::from_words(saved_size, granularity, &words)
            .map_err(|e| corrupt(path, e.to_string()))?;
        if saved_size != size {
            // The device was resized while closed (a grown part is marked dirty).
            bits.resize(size)?;
        }
        out.push(Bitmap {
            name,
            bits,
            valid: AtomicBool::new(b[at + 65] & ENTRY_VALID != 0),
        });
    }
    Ok((out, in_use))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmaps_persist_across_a_clean_close_and_are_invalid_after_an_unclean_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.bitmaps");
        {
            let s = BitmapSet::open(&p, 1 << 20).unwrap();
            s.begin_tracking().unwrap();
            s.add("b0", 65536).unwrap();
            s.mark(70_000, 10);
            s.end_tracking().unwrap();
        }
        {
            let s = BitmapSet::open(&p, 1 << 20).unwrap();
            s.begin_tracking().unwrap();
            assert_eq!(s.dirty_ranges("b0").unwrap(), (vec![(65536, 65536)], true));
            s.mark(0, 1);
            // A crash: tracking never ends.
        }
        let s = BitmapSet::open(&p, 1 << 20).unwrap();
        let (r, valid) = s.dirty_ranges("b0").unwrap();
        assert!(
            !valid,
            "after an unclean stop the bitmap must not be trusted"
        );
        assert_eq!(
            r,
            vec![(65536, 65536)],
            "bits saved at the last clean close are kept"
        );
        // A take hands out the invalid state and restarts valid.
        let t = s.take("b0").unwrap();
        assert!(!t.valid);
        assert!(s.info("b0").unwrap().valid);
        s.restore(&t).unwrap();
        assert!(!s.info("b0").unwrap().valid);
    }

    #[test]
    fn a_take_whose_save_fails_keeps_the_bits() {
        use crate::io::fault::{Fault, FaultDevice, OpKind};
        let (_, ctl) = FaultDevice::new(0);
        let s = BitmapSet::open_with(ctl.files(), Path::new("/d/x.bitmaps"), 1 << 20).unwrap();
        s.add("b0", 65536).unwrap();
        s.begin_tracking().unwrap();
        s.mark(70_000, 10);
        ctl.fail_nth(OpKind::File, 2, Fault::Eio);
        assert!(s.take("b0").is_err());
        assert_eq!(
            s.dirty_ranges("b0").unwrap(),
            (vec![(65536, 65536)], true),
            "a failed take hands out nothing, so it must keep the bits"
        );
        let t = s.take("b0").unwrap();
        assert_eq!(t.dirty_ranges(), vec![(65536, 65536)]);
    }

    #[test]
    fn damaged_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.bitmaps");
        {
            let s = BitmapSet::open(&p, 1 << 20).unwrap();
            s.add("b0", 65536).unwrap();
        }
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[HEADER] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        assert!(matches!(
            BitmapSet::open(&p, 1 << 20),
            Err(StorageError::Corrupt { .. })
        ));
        std::fs::write(&p, b"short").unwrap();
        assert!(BitmapSet::open(&p, 1 << 20).is_err());
    }

    #[test]
    fn merging_across_granularities_rounds_out_to_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let s = BitmapSet::open(&dir.path().join("d.bitmaps"), (1 << 20) + 4096).unwrap();
        s.add("fine", 4096).unwrap();
        s.add("coarse", 65536).unwrap();
        s.add("fine2", 4096).unwrap();
        s.mark(70_000, 10);
        s.mark(1 << 20, 4096);
        s.clear("coarse").unwrap();
        s.merge("fine", "coarse").unwrap();
        assert_eq!(
            s.dirty_ranges("coarse").unwrap(),
            (vec![(65536, 65536), (1 << 20, 4096)], true),
            "the coarse target covers every fine range"
        );
        s.clear("fine").unwrap();
        s.merge("coarse", "fine2").unwrap();
        assert_eq!(
            s.dirty_ranges("fine2").unwrap().0,
            vec![(65536, 65536), (1 << 20, 4096)],
            "a finer target gets exactly the coarse ranges"
        );
        assert_eq!(s.dirty_ranges("fine").unwrap().0, vec![]);
    }
}

//! Reading the persistent dirty bitmaps a qcow2 image keeps in its bitmaps extension
//! (docs/interop/qcow2.rst, "Bitmaps extension", "Bitmap directory", "Bitmap table", "Bitmap
//! data"), as QEMU writes them (`qemu-img bitmap`, a running VM's persistent bitmaps).
//!
//! [`parse_extension`] and [`parse_directory`] validate everything they read against the file and
//! the image before anything else trusts it: a directory or table outside the file, a table whose
//! size does not match the disk and granularity, bad name sizes, reserved bits and unknown flags
//! are clear errors, and every allocation is bounded by those checks. A bitmap flagged `in_use`
//! was not saved by whoever had it open (QEMU sets the flag while the image is open with the
//! bitmap enabled and clears it on a clean close): it is reported as inconsistent and its bits are
//! never used. The extension is considered only while auto-clear bit 0 ("bitmaps extension is
//! consistent") is set. Opening an image for writing with Strata flags every enabled bitmap in
//! use before the first write ([`mark_enabled_in_use`], `meta.rs`); only change tracking clears
//! the flag again, on a clean close with the bits written (`bitmap_track.rs`). A writer without
//! tracking leaves it set, so QEMU reports those bitmaps as inconsistent instead of trusting
//! stale bits; disabled bitmaps stay valid, and the clusters stay referenced (`qemu-img check`
//! clean). An extension that does not parse has its auto-clear bit cleared instead.
//!
//! Adding, removing and storing bitmaps is in `bitmap_store.rs`.

use serde::Serialize;

use crate::bytes::{be16, be32, be64};
use crate::device::HostFile;
use crate::error::{Result, StorageError};

use super::entry::OFFSET_MASK;

/// Most bitmaps in one image (QEMU's limit).
pub const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory (QEMU's limit: 1 KiB per bitmap).
pub const MAX_DIRECTORY_BYTES: u64 = 1024 * MAX_BITMAPS as u64;
/// Longest bitmap name.
pub const MAX_NAME_BYTES: usize = 1023;
/// Largest bitmap table, in entries (QEMU's limit).
pub const MAX_TABLE_ENTRIES: u32 = 0x800_0000;
/// Most bytes of bitmap data Strata reads into memory for one bitmap.
pub const MAX_DATA_BYTES: u64 = 64 << 20;

/// Flag bit 0: the bitmap was not saved consistently.
pub const FLAG_IN_USE: u32 = 1;
/// Flag bit 1: the bitmap tracks writes while the image is open (enabled).
pub const FLAG_AUTO: u32 = 1 << 1;
/// Flag bit 2: extra data may be ignored by readers that do not know it.
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
const KNOWN_FLAGS: u32 = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE;
/// Bitmap type 1: dirty tracking (the only one defined).
const TYPE_DIRTY_TRACKING: u8 = 1;
/// Reserved bits of a bitmap table entry.
const TABLE_RESERVED: u64 = 0xff00_0000_0000_01fe;

/// The bitmaps extension's fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extension {
    /// Number of bitmaps.
    pub nb_bitmaps: u32,
    /// Size of the directory in bytes.
    pub directory_size: u64,
    /// Offset of the directory.
    pub directory_offset: u64,
}

/// One bitmap directory entry, validated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Qcow2Bitmap {
    /// Name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Not saved consistently: the bits must not be trusted.
    pub in_use: bool,
    /// Enabled: tracks writes while the image is open.
    pub auto: bool,
    /// Offset of the bitmap table.
    #[serde(skip)]
    pub table_offset: u64,
    /// Entries in the bitmap table.
    #[serde(skip)]
    pub table_size: u32,
    /// Byte offset of the entry in the directory.
    #[serde(skip)]
    pub entry_at: usize,
}

impl Qcow2Bitmap {
    /// The flags as `qemu-img info` names them.
    pub fn flag_names(&self) -> Vec<&'static str> {
        let mut f = Vec::new();
        if self.in_use {
            f.push("in-use");
        }
        if self.auto {
            f.push("auto");
        }
        f
    }
}

/// The data cluster entry `i` (`e`) of bitmap `b`'s table names (`None`: an all-zero or
/// all-one cluster with no data), checked: no reserved bits, on a cluster boundary, and `len`
/// bytes of it inside a file of `file_len` bytes. The table comes from the image: unchecked, an
/// entry could name any cluster to read, or to release when the bitmap goes.
pub(super) fn table_entry_cluster(
    b: &Qcow2Bitmap,
    i: usize,
    e: u64,
    cluster_size: u64,
    len: u64,
    file_len: u64,
) -> Result<Option<u64>> {
    if e & TABLE_RESERVED != 0 {
        return Err(corrupt(format!(
            "bitmap '{}': table entry {i} ({e:#x}) has reserved bits set",
            b.name
        )));
    }
    let off = e & OFFSET_MASK;
    if off == 0 {
        return Ok(None);
    }
    if off % cluster_size != 0 || off.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(corrupt(format!(
            "bitmap '{}': data cluster {off:#x} lies outside the file",
            b.name
        )));
    }
    Ok(Some(off))
}

fn corrupt(detail: impl Into<String>) -> StorageError {
    StorageError::corrupt("qcow2 bitmaps", detail)
}

/// Parses the bitmaps extension's data, checking the directory lies inside a file of `file_len`
/// bytes with clusters of `cluster_size`.
pub fn parse_extension(data: &[u8], file_len: u64, cluster_size: u64) -> Result<Extension> {
    if data.len() != 24 {
        return Err(corrupt(format!(
            "the bitmaps extension holds {} bytes (24 expected)",
            data.len()
        )));
    }
    let e = Extension {
        nb_bitmaps: be32(data, 0),
        directory_size: be64(data, 8),
        directory_offset: be64(data, 16),
    };
    if be32(data, 4) != 0 {
        return Err(corrupt("reserved bytes of the bitmaps extension are set"));
    }
    if e.nb_bitmaps == 0 || e.nb_bitmaps > MAX_BITMAPS {
        return Err(corrupt(format!(
            "{} bitmaps (1 to {MAX_BITMAPS})",
            e.nb_bitmaps
        )));
    }
    if e.directory_size == 0 || e.directory_size > MAX_DIRECTORY_BYTES {
        return Err(corrupt(format!(
            "a bitmap directory of {} bytes (at most {MAX_DIRECTORY_BYTES})",
            e.directory_size
        )));
    }
    if e.directory_offset == 0 || e.directory_offset % cluster_size != 0 {
        return Err(corrupt(format!(
            "the bitmap directory offset {:#x} is not a cluster boundary",
            e.directory_offset
        )));
    }
    if e.directory_offset
        .checked_add(e.directory_size)
        .is_none_or(|end| end > file_len)
    {
        return Err(corrupt(format!(
            "the bitmap directory at {:#x} ({} bytes) lies outside the file ({file_len} bytes)",
            e.directory_offset, e.directory_size
        )));
    }
    Ok(e)
}

/// Bitmap table entries a bitmap of `granularity` over `disk_size` bytes needs.
pub fn table_entries(disk_size: u64, granularity: u64, cluster_size: u64) -> u64 {
    let bits = disk_size.div_ceil(granularity);
    bits.div_ceil(cluster_size * 8)
}

/// Parses the `nb` entries of the directory `dir`, validating each against an image of
/// `disk_size` bytes in a file of `file_len` bytes.
pub fn parse_directory(
    dir: &[u8],
    nb: u32,
    disk_size: u64,
    file_len: u64,
    cluster_size: u64,
) -> Result<Vec<Qcow2Bitmap>> {
    let mut out: Vec<Qcow2Bitmap> = Vec::with_capacity(nb.min(1024) as usize);
    // Names seen so far: a directory may hold 65535 entries, too many to compare pairwise.
    let mut names = std::collections::HashSet::new();
    let mut at = 0usize;
    for i in 0..nb {
        if at + 24 > dir.len() {
            return Err(corrupt(format!(
                "bitmap directory entry {i} runs past the directory ({} bytes)",
                dir.len()
            )));
        }
        let table_offset = be64(dir, at);
        let table_size = be32(dir, at + 8);
        let flags = be32(dir, at + 12);
        let kind = dir[at + 16];
        let granularity_bits = u32::from(dir[at + 17]);
        let name_size = be16(dir, at + 18) as usize;
        let extra_size = be32(dir, at + 20) as usize;
        let entry = |d: String| corrupt(format!("bitmap directory entry {i}: {d}"));
        if flags & !KNOWN_FLAGS != 0 {
            return Err(entry(format!("unknown flags {flags:#x}")));
        }
        if kind != TYPE_DIRTY_TRACKING {
            return Err(entry(format!(
                "bitmap type {kind} (only 1, dirty tracking)"
            )));
        }
        if !(9..=31).contains(&granularity_bits) {
            return Err(entry(format!(
                "granularity 2^{granularity_bits} (2^9 to 2^31)"
            )));
        }
        if name_size == 0 || name_size > MAX_NAME_BYTES {
            return Err(entry(format!("a name of {name_size} bytes (1 to 1023)")));
        }
        if extra_size != 0 && flags & FLAG_EXTRA_DATA_COMPATIBLE == 0 {
            return Err(StorageError::Unsupported(format!(
                "qcow2 bitmap directory entry {i}: {extra_size} bytes of extra data Strata does not know"
            )));
        }
        let name_at = at + 24 + extra_size;
        let end = name_at
            .checked_add(name_size)
            .filter(|&e| e <= dir.len())
            .ok_or_else(|| entry("its name runs past the directory".into()))?;
        let name = std::str::from_utf8(&dir[name_at..end])
            .map_err(|_| entry("its name is not UTF-8".into()))?
            .to_string();
        let granularity = 1u64 << granularity_bits;
        let want = table_entries(disk_size, granularity, cluster_size);
        if u64::from(table_size) != want || table_size > MAX_TABLE_ENTRIES {
            return Err(entry(format!(
                "a bitmap table of {table_size} entries ({want} expected for the disk size)"
            )));
        }
        if table_offset % cluster_size != 0
            || table_offset == 0
            || table_offset
                .checked_add(u64::from(table_size) * 8)
                .is_none_or(|e| e > file_len)
        {
            return Err(entry(format!(
                "the bitmap table at {table_offset:#x} lies outside the file or off a cluster boundary"
            )));
        }
        if !names.insert(name.clone()) {
            return Err(entry(format!("the name '{name}' appears twice")));
        }
        out.push(Qcow2Bitmap {
            name,
            granularity,
            in_use: flags & FLAG_IN_USE != 0,
            auto: flags & FLAG_AUTO != 0,
            table_offset,
            table_size,
            entry_at: at,
        });
        at = end.next_multiple_of(8);
    }
    Ok(out)
}

/// The bitmap directory named by the bitmaps extension `data`, read from `file` and parsed
/// against an image of `disk_size` bytes: the extension's fields, the directory's bytes and its
/// entries, every one validated (see [`parse_extension`], [`parse_directory`]).
pub fn read_directory(
    file: &dyn HostFile,
    data: &[u8],
    disk_size: u64,
    cluster_size: u64,
) -> Result<(Extension, Vec<u8>, Vec<Qcow2Bitmap>)> {
    let file_len = file.len();
    let ext = parse_extension(data, file_len, cluster_size)?;
    // Bounded: parse_extension checked the size against MAX_DIRECTORY_BYTES and the file.
    let mut dir = vec![0u8; ext.directory_size as usize];
    file.read_exact_at(ext.directory_offset, &mut dir)?;
    let list = parse_directory(&dir, ext.nb_bitmaps, disk_size, file_len, cluster_size)?;
    Ok((ext, dir, list))
}

/// Sets the in-use flag of every enabled (`auto`) bitmap in the directory `dir` (parsed into
/// `list`); returns the names of those it flagged (they were consistent until now). A writer
/// that does not record its writes in those bitmaps leaves them flagged: QEMU and Strata then
/// know them to be inconsistent, while disabled bitmaps, which no write changes, stay valid.
pub fn mark_enabled_in_use(dir: &mut [u8], list: &[Qcow2Bitmap]) -> Vec<String> {
    let mut flagged = Vec::new();
    for b in list.iter().filter(|b| b.auto && !b.in_use) {
        let at = b.entry_at + 12;
        let flags = be32(dir, at) | FLAG_IN_USE;
        crate::bytes::put_be32(dir, at, flags);
        flagged.push(b.name.clone());
    }
    flagged
}

/// Reads the bits of `b` (of an image of `disk_size` bytes) as little-endian u64 words: bit `i`
/// of word `w` covers bytes from `(64 w + i) * granularity`, the layout of `crate::bitmap`.
/// Refuses a bitmap flagged in use.
pub fn read_words(
    file: &dyn HostFile,
    b: &Qcow2Bitmap,
    disk_size: u64,
    cluster_size: u64,
) -> Result<Vec<u64>> {
    if b.in_use {
        return Err(StorageError::corrupt(
            file.name(),
            format!(
                "bitmap '{}' is marked in use: it was not saved consistently (the image was not \
                 closed cleanly) and cannot be trusted",
                b.name
            ),
        ));
    }
    let bits = disk_size.div_ceil(b.granularity);
    let bytes = bits.div_ceil(8);
    if bytes > MAX_DATA_BYTES {
        return Err(StorageError::Unsupported(format!(
            "qcow2 bitmap '{}' of {bytes} bytes (Strata reads at most {MAX_DATA_BYTES})",
            b.name
        )));
    }
    let table = super::meta::read_u64_table(file, b.table_offset, b.table_size as usize)?;
    let mut data = vec![0u8; bytes.next_multiple_of(8) as usize];
    let file_len = file.len();
    for (i, &e) in table.iter().enumerate() {
        let start = i as u64 * cluster_size;
        if start >= bytes {
            break;
        }
        let n = cluster_size.min(bytes - start) as usize;
        let dst = &mut data[start as usize..start as usize + n];
        match table_entry_cluster(b, i, e, cluster_size, n as u64, file_len)? {
            Some(off) => file.read_exact_at(off, dst)?,
            None if e & 1 != 0 => dst.fill(0xff),
            None => {}
        }
    }
    // Bits past the end of the disk are not part of the bitmap.
    let mut words: Vec<u64> = data
        .chunks_exact(8)
        .map(|c| crate::bytes::le64(c, 0))
        .collect();
    let tail = bits % 64;
    if tail != 0 {
        if let Some(last) = words.last_mut() {
            *last &= (1u64 << tail) - 1;
        }
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(nb: u32, size: u64, off: u64) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&nb.to_be_bytes());
        d.extend_from_slice(&0u32.to_be_bytes());
        d.extend_from_slice(&size.to_be_bytes());
        d.extend_from_slice(&off.to_be_bytes());
        d
    }

    fn entry(table: u64, size: u32, flags: u32, gbits: u8, name: &[u8]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&table.to_be_bytes());
        d.extend_from_slice(&size.to_be_bytes());
        d.extend_from_slice(&flags.to_be_bytes());
        d.push(1);
        d.push(gbits);
        d.extend_from_slice(&(name.len() as u16).to_be_bytes());
        d.extend_from_slice(&0u32.to_be_bytes());
        d.extend_from_slice(name);
        d.resize(d.len().next_multiple_of(8), 0);
        d
    }

    const CS: u64 = 65536;
    const FILE: u64 = 16 * CS;
    const DISK: u64 = 1 << 30;

    #[test]
    fn extension_bounds_are_checked() {
        assert!(parse_extension(&ext(1, 64, 2 * CS), FILE, CS).is_ok());
        let e = parse_extension(&ext(1, 64, 64 * CS), FILE, CS).unwrap_err();
        assert!(e.to_string().contains("outside the file"), "{e}");
        let e = parse_extension(&ext(1, u64::MAX, 2 * CS), FILE, CS).unwrap_err();
        assert!(e.to_string().contains("directory of"), "{e}");
        let e = parse_extension(&ext(1, 64, u64::MAX - 7), FILE, CS).unwrap_err();
        assert!(e.to_string().contains("cluster boundary"), "{e}");
        assert!(parse_extension(&ext(0, 64, 2 * CS), FILE, CS).is_err());
        assert!(parse_extension(&ext(70000, 64, 2 * CS), FILE, CS).is_err());
        assert!(parse_extension(&[0u8; 16], FILE, CS).is_err());
    }

    #[test]
    fn directory_entries_are_checked() {
        // 1 GiB at 64 KiB granularity: 16384 bits, one table entry.
        let good = entry(3 * CS, 1, FLAG_AUTO, 16, b"b0");
        let b = parse_directory(&good, 1, DISK, FILE, CS).unwrap();
        assert_eq!(b[0].name, "b0");
        assert_eq!(b[0].granularity, 65536);
        assert_eq!(b[0].flag_names(), vec!["auto"]);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (entry(3 * CS, 0x7fff_ffff, 0, 16, b"b"), "bitmap table of"),
            (entry(64 * CS, 1, 0, 16, b"b"), "outside the file"),
            (entry(3 * CS, 1, 1 << 7, 16, b"b"), "unknown flags"),
            (entry(3 * CS, 1, 0, 40, b"b"), "granularity"),
            (entry(3 * CS, 1, 0, 16, b""), "name of 0 bytes"),
            (entry(3 * CS, 1, 0, 16, &[0xff, 0xfe]), "not UTF-8"),
        ];
        for (dir, want) in cases {
            let e = parse_directory(&dir, 1, DISK, FILE, CS).unwrap_err();
            assert!(e.to_string().contains(want), "{want}: {e}");
        }
        // A name size that points past the directory.
        let mut long = good.clone();
        long[18..20].copy_from_slice(&1000u16.to_be_bytes());
        let e = parse_directory(&long, 1, DISK, FILE, CS).unwrap_err();
        assert!(e.to_string().contains("runs past"), "{e}");
        // More entries claimed than the directory holds.
        let e = parse_directory(&good, 2, DISK, FILE, CS).unwrap_err();
        assert!(e.to_string().contains("runs past"), "{e}");
        // Two bitmaps of one name.
        let mut two = good.clone();
        two.extend_from_slice(&good);
        assert!(parse_directory(&two, 2, DISK, FILE, CS).is_err());
    }
}

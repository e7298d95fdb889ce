//! Creating vmdk images: the descriptor, and the files of each subformat, laid out as qemu-img
//! lays them out (so that every tool that reads qemu's vmdks reads ours).
//!
//! A hosted sparse extent: header (sector 0), embedded descriptor (sectors 1–20, empty in split
//! extents), redundant grain directory and tables, grain directory and tables, padded to a
//! grain; all tables are preallocated, so a grain directory never changes after creation.

use std::collections::BTreeMap;
use std::fs::OpenOptions as FsOpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::device::HostFile;
use crate::error::{Result, StorageError};
use crate::format::raw::sync_parent_dir;
use crate::format::vmdk::descriptor::{
    Access, Descriptor, ExtentLine, ExtentType, Subformat, NO_PARENT_CID,
};
use crate::format::vmdk::header::{
    SparseHeader, COMPRESS_DEFLATE, FLAG_COMPRESSED, FLAG_MARKERS, FLAG_NL_DETECT,
    FLAG_REDUNDANT_GD, FLAG_ZEROED_GRAIN, SECTOR,
};
use crate::format::vmdk::stream::StreamWriter;
use crate::format::{open_host_file, OpenOptions};
use crate::io::file::CacheMode;

/// Default grain: 64 KiB.
pub const GRAIN_SECTORS: u64 = 128;
/// Entries per grain table.
pub const GTES_PER_GT: u32 = 512;
/// Sectors reserved for an embedded descriptor.
pub const DESCRIPTOR_SECTORS: u64 = 20;
/// Size of each extent of the twoGbMaxExtent layouts.
pub const SPLIT_EXTENT_BYTES: u64 = 2 << 30;
/// Largest single sparse extent: grain offsets are 32-bit sector numbers.
pub const MAX_SPARSE_EXTENT_BYTES: u64 = (2 << 40) - (64 << 20);

/// Adapter types qemu-img and VMware know.
const ADAPTERS: [&str; 4] = ["ide", "lsilogic", "buslogic", "legacyESX"];

/// Options for creating a vmdk (`-o` pairs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmdkCreateOptions {
    /// The layout.
    pub subformat: Subformat,
    /// `ddb.adapterType`.
    pub adapter_type: String,
    /// `ddb.virtualHWVersion`.
    pub hwversion: String,
    /// Zeroed-grain entries (version 2 sparse extents).
    pub zeroed_grain: bool,
}

impl Default for VmdkCreateOptions {
    fn default() -> Self {
        VmdkCreateOptions {
            subformat: Subformat::MonolithicSparse,
            adapter_type: "ide".into(),
            hwversion: "4".into(),
            zeroed_grain: false,
        }
    }
}

use crate::util::parse_bool;

impl VmdkCreateOptions {
    /// Reads `-o` options; unknown keys are refused by name.
    pub fn from_map(map: &BTreeMap<String, String>) -> Result<VmdkCreateOptions> {
        let mut o = VmdkCreateOptions::default();
        let mut compat6 = false;
        let mut hw_given = false;
        for (k, v) in map {
            match k.as_str() {
                "subformat" => {
                    o.subformat = Subformat::parse(v)?;
                    if o.subformat == Subformat::Vmfs {
                        return Err(StorageError::Unsupported("creating vmfs-layout vmdks (use monolithicFlat)".into()));
                    }
                }
                "adapter_type" => {
                    let a = ADAPTERS.iter().find(|a| a.eq_ignore_ascii_case(v)).ok_or_else(|| {
                        StorageError::InvalidInput(format!(
                            "Unknown adapter_type '{v}' (expected ide, lsilogic, buslogic or legacyESX)"
                        ))
                    })?;
                    o.adapter_type = (*a).to_string();
                }
                "hwversion" => {
                    if v.is_empty() || !v.chars().all(|c| c.is_ascii_digit()) {
                        return Err(StorageError::InvalidInput(format!("hwversion '{v}' is not a number")));
                    }
                    o.hwversion = v.clone();
                    hw_given = true;
                }
                "compat6" => compat6 = parse_bool(k, v)?,
                "zeroed_grain" => o.zeroed_grain = parse_bool(k, v)?,
                "preallocation" if v == "off" => {}
                "preallocation" => {
                    return Err(StorageError::Unsupported(format!("preallocation={v} for vmdk images (only off)")))
                }
                other => {
                    return Err(StorageError::InvalidInput(format!(
                        "Unknown option '{other}' for vmdk images (supported: subformat, adapter_type, hwversion, compat6, zeroed_grain)"
                    )))
                }
            }
        }
        if compat6 {
            if hw_given && o.hwversion != "6" {
                return Err(StorageError::InvalidInput(
                    "compat6 and hwversion contradict each other".into(),
                ));
            }
            o.hwversion = "6".into();
        }
        Ok(o)
    }
}

/// The layout of a fresh hosted sparse extent. See the module documentation.
#[derive(Clone, Debug)]
pub struct SparseLayout {
    /// The header to write.
    pub header: SparseHeader,
}

impl SparseLayout {
    /// Layout of an extent of `bytes` (a multiple of 512).
    pub fn new(
        bytes: u64,
        zeroed_grain: bool,
        compressed: bool,
        _descriptor: Option<&str>,
    ) -> SparseLayout {
        let mut header = SparseHeader {
            version: if compressed {
                3
            } else if zeroed_grain {
                2
            } else {
                1
            },
            flags: FLAG_NL_DETECT | FLAG_REDUNDANT_GD,
            capacity: bytes / SECTOR,
            grain_sectors: GRAIN_SECTORS,
            descriptor_offset: 1,
            descriptor_size: DESCRIPTOR_SECTORS,
            gtes_per_gt: GTES_PER_GT,
            rgd_offset: 1 + DESCRIPTOR_SECTORS,
            gd_offset: 0,
            overhead: 0,
            unclean_shutdown: false,
            compress_algorithm: 0,
        };
        if zeroed_grain {
            header.flags |= FLAG_ZEROED_GRAIN;
        }
        if compressed {
            header.flags |= FLAG_COMPRESSED | FLAG_MARKERS;
            header.compress_algorithm = COMPRESS_DEFLATE;
        }
        let gd_sectors = header.gd_bytes().div_ceil(SECTOR);
        let tables = header.gd_entries() * header.gt_sectors();
        header.gd_offset = header.rgd_offset + gd_sectors + tables;
        let end = header.gd_offset + gd_sectors + tables;
        header.overhead = end.div_ceil(GRAIN_SECTORS) * GRAIN_SECTORS;
        SparseLayout { header }
    }

    fn directory(&self, gd_start: u64) -> Vec<u8> {
        let h = &self.header;
        let first_table = gd_start + h.gd_bytes().div_ceil(SECTOR);
        (0..h.gd_entries())
            .flat_map(|i| ((first_table + i * h.gt_sectors()) as u32).to_le_bytes())
            .collect()
    }
}

/// Writes a fresh sparse extent into an empty `file`: header, descriptor, both directories;
/// the tables are holes (zeros) up to the overhead.
pub fn init_sparse_extent(
    file: &dyn HostFile,
    layout: &SparseLayout,
    descriptor: Option<&str>,
) -> Result<()> {
    let h = &layout.header;
    if let Some(d) = descriptor {
        if d.len() as u64 > h.descriptor_size * SECTOR {
            return Err(StorageError::InvalidInput(
                "the descriptor does not fit in its 20 sectors".into(),
            ));
        }
    }
    file.set_len(h.overhead * SECTOR)?;
    file.write_all_at(0, &h.to_bytes())?;
    if let Some(d) = descriptor {
        let mut text = d.as_bytes().to_vec();
        text.resize(text.len().div_ceil(SECTOR as usize) * SECTOR as usize, 0);
        file.write_all_at(h.descriptor_offset * SECTOR, &text)?;
    }
    file.write_all_at(h.rgd_offset * SECTOR, &layout.directory(h.rgd_offset))?;
    file.write_all_at(h.gd_offset * SECTOR, &layout.directory(h.gd_offset))?;
    file.sync_data()
}

/// Bytes of a fresh sparse extent's metadata (for tests on in-memory devices).
#[cfg(test)]
pub fn sparse_extent_bytes(layout: &SparseLayout, descriptor: Option<&str>) -> Vec<u8> {
    let dev = crate::io::memory::MemoryDevice::new(0);
    init_sparse_extent(dev.as_ref(), layout, descriptor).expect("in-memory device");
    let mut v = vec![0u8; dev.len() as usize];
    dev.read_exact_at(0, &mut v).expect("in-memory device");
    v
}

/// A fresh content ID (never `ffffffff`).
pub fn new_cid() -> u32 {
    loop {
        let c = fastrand::u32(..);
        if c != NO_PARENT_CID {
            return c;
        }
    }
}

/// The descriptor of a new disk with `extents`.
pub fn new_descriptor(opts: &VmdkCreateOptions, size: u64, extents: Vec<ExtentLine>) -> Descriptor {
    let sectors = size / SECTOR;
    let (heads, secs) = if opts.adapter_type == "ide" {
        (16u64, 63u64)
    } else {
        (255, 63)
    };
    let cylinders = (sectors / (heads * secs)).min(16383);
    Descriptor {
        version: 1,
        cid: new_cid(),
        parent_cid: NO_PARENT_CID,
        create_type: opts.subformat,
        parent_hint: None,
        extents,
        ddb: vec![
            ("ddb.virtualHWVersion".into(), opts.hwversion.clone()),
            ("ddb.geometry.cylinders".into(), cylinders.to_string()),
            ("ddb.geometry.heads".into(), heads.to_string()),
            ("ddb.geometry.sectors".into(), secs.to_string()),
            ("ddb.adapterType".into(), opts.adapter_type.clone()),
            ("ddb.toolsVersion".into(), "2147483647".into()),
        ],
    }
}

/// Creates a new file, refusing to overwrite.
pub(crate) fn create_new(path: &Path) -> Result<std::fs::File> {
    let name = path.display().to_string();
    FsOpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => StorageError::AlreadyExists(name.clone()),
            io::ErrorKind::NotFound => {
                StorageError::NotFound(path.parent().unwrap_or(path).to_path_buf())
            }
            _ => StorageError::io(format!("Creating {name}"), e),
        })
}

/// The name of extent `n` (1-based) of a descriptor at `path`, as qemu-img names them.
fn extent_name(path: &Path, subformat: Subformat, n: usize) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "vmdk".into());
    match subformat {
        Subformat::MonolithicFlat => format!("{stem}-flat.{ext}"),
        Subformat::TwoGbMaxExtentSparse => format!("{stem}-s{n:03}.{ext}"),
        Subformat::TwoGbMaxExtentFlat => format!("{stem}-f{n:03}.{ext}"),
        _ => path
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

/// Removes the files made so far when creation fails.
struct Cleanup(Vec<PathBuf>);

impl Cleanup {
    fn keep(mut self) {
        self.0.clear();
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn open_new_extent(path: &Path) -> Result<crate::device::SharedFile> {
    create_new(path)?;
    let opts = OpenOptions {
        cache: CacheMode::Writeback,
        ..OpenOptions::default()
    };
    Ok(open_host_file(path, &opts)?)
}

/// Creates a vmdk of `size` bytes at `path` (the descriptor, or the only file). Refuses to
/// overwrite any file; removes what it made if it fails.
/// Checks that an image of `size` bytes can be made with `opts`, without making anything.
pub fn check(size: u64, opts: &VmdkCreateOptions) -> Result<()> {
    if size == 0 {
        return Err(StorageError::InvalidInput(
            "Image size must be greater than zero".into(),
        ));
    }
    let size = size.checked_next_multiple_of(SECTOR).ok_or_else(|| {
        StorageError::InvalidInput(format!("Size {size} is too large for a vmdk image"))
    })?;
    let sub = opts.subformat;
    if matches!(
        sub,
        Subformat::MonolithicSparse | Subformat::StreamOptimized
    ) && size > MAX_SPARSE_EXTENT_BYTES
    {
        return Err(StorageError::InvalidInput(format!(
            "A {} vmdk holds at most 2 TiB less 64 MiB; use twoGbMaxExtentSparse for larger disks",
            sub.name()
        )));
    }
    if size > crate::format::vmdk::header::MAX_CAPACITY_BYTES {
        return Err(StorageError::InvalidInput(
            "vmdk images hold at most 64 TiB".into(),
        ));
    }
    if opts.zeroed_grain && (sub.is_flat() || sub == Subformat::StreamOptimized) {
        return Err(StorageError::InvalidInput(format!(
            "zeroed_grain applies to sparse subformats, not {}",
            sub.name()
        )));
    }
    Ok(())
}

pub fn create(path: &Path, size: u64, opts: &VmdkCreateOptions) -> Result<()> {
    check(size, opts)?;
    let size = size.div_ceil(SECTOR) * SECTOR;
    let sub = opts.subformat;
    if sub == Subformat::StreamOptimized {
        let w = StreamWriter::create(path, size, opts)?;
        return w.finish_stream();
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut made = Cleanup(Vec::new());
    let chunk = match sub {
        Subformat::TwoGbMaxExtentSparse | Subformat::TwoGbMaxExtentFlat => SPLIT_EXTENT_BYTES,
        _ => size,
    };
    let mut lines = Vec::new();
    let mut at = 0u64;
    let mut n = 0usize;
    while at < size {
        n += 1;
        let len = chunk.min(size - at);
        let name = extent_name(path, sub, n);
        lines.push(ExtentLine {
            access: Access::ReadWrite,
            sectors: len / SECTOR,
            kind: if sub.is_flat() {
                ExtentType::Flat
            } else {
                ExtentType::Sparse
            },
            file: name,
            offset: 0,
        });
        at += len;
    }
    let desc = new_descriptor(opts, size, lines.clone());
    let text = desc.render();
    if sub == Subformat::MonolithicSparse {
        made.0.push(path.to_path_buf());
        let f = open_new_extent(path)?;
        init_sparse_extent(
            f.as_ref(),
            &SparseLayout::new(size, opts.zeroed_grain, false, Some(&text)),
            Some(&text),
        )?;
    } else {
        for line in &lines {
            let p = dir.join(&line.file);
            made.0.push(p.clone());
            let f = open_new_extent(&p)?;
            let bytes = line.sectors * SECTOR;
            if sub.is_flat() {
                f.set_len(bytes)?;
                f.sync_data()?;
            } else {
                init_sparse_extent(
                    f.as_ref(),
                    &SparseLayout::new(bytes, opts.zeroed_grain, false, None),
                    None,
                )?;
            }
        }
        made.0.push(path.to_path_buf());
        let f = open_new_extent(path)?;
        f.write_all_at(0, text.as_bytes())?;
        f.sync_data()?;
    }
    sync_parent_dir(path)?;
    made.keep();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_qemu_for_5_gib() {
        // qemu-img create -f vmdk x 5G: rgd 21, gd 0x297, overhead 0x580 sectors.
        let l = SparseLayout::new(5 << 30, false, false, None);
        assert_eq!(l.header.rgd_offset, 21);
        assert_eq!(l.header.gd_offset, 0x297);
        assert_eq!(l.header.overhead, 0x580);
    }

    #[test]
    fn options_are_checked() {
        let m = |s: &str| VmdkCreateOptions::from_map(&crate::format::parse_options(s).unwrap());
        assert_eq!(
            m("subformat=streamOptimized").unwrap().subformat,
            Subformat::StreamOptimized
        );
        assert_eq!(m("compat6=on").unwrap().hwversion, "6");
        assert_eq!(m("adapter_type=LSILogic").unwrap().adapter_type, "lsilogic");
        assert!(m("subformat=bogus").is_err());
        assert!(m("adapter_type=scsi").is_err());
        assert!(m("cluster_size=4096").is_err());
        assert!(m("compat6=on,hwversion=4").is_err());
    }
}

//! Creating VHDs: fixed, dynamic, and differencing over a parent in the same folder.
//!
//! A new disk has exactly the size asked for (rounded up to whole sectors), so restores, uploads
//! and `convert -n` find the size they expect: its geometry is the CHS one when that addresses
//! exactly this size, else the largest one, which makes every reader (qemu, Hyper-V, XenServer)
//! use `current_size`. `force_size=off` rounds the size up to the next CHS geometry instead, as
//! qemu-img does by default (Virtual PC, which reads only the geometry, then sees the same disk). Layout of a dynamic disk: footer copy at 0, dynamic header at 512, BAT at
//! 1,536, parent locator data (differencing), then blocks, then the footer.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Result, StorageError};
use crate::format::raw::sync_parent_dir;
use crate::format::vhd::dynamic::{
    bitmap_bytes, DynamicHeader, LocatorEntry, DEFAULT_BLOCK, MAX_BLOCK, MIN_BLOCK,
};
use crate::format::vhd::footer::{
    vhd_now, DiskType, Footer, Geometry, CREATOR_APP, CREATOR_OS, MAX_SIZE, NO_DATA_OFFSET, SECTOR,
};
use crate::format::vhd::locator::utf16le;
use crate::format::vmdk::create::create_new;
use crate::format::{open_image, resolve_in_folder, ImageFormat, OpenOptions};

/// Options for a new VHD (`-o` pairs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VhdCreateOptions {
    /// Fixed instead of dynamic.
    pub fixed: bool,
    /// Keep the exact size (the default) instead of rounding up to a CHS geometry.
    pub force_size: bool,
    /// Block size of a dynamic disk.
    pub block_size: u32,
    /// The parent of a differencing disk, relative to the new disk's folder.
    pub backing_file: Option<String>,
}

impl VhdCreateOptions {
    /// Reads `-o` options; unknown keys are refused with their name.
    pub fn from_map(map: &BTreeMap<String, String>) -> Result<VhdCreateOptions> {
        let mut o = VhdCreateOptions {
            block_size: DEFAULT_BLOCK,
            force_size: true,
            ..Default::default()
        };
        for (k, v) in map {
            match k.as_str() {
                "subformat" => o.fixed = crate::format::fixed_subformat(v, "VHD")?,
                "force_size" => o.force_size = crate::util::parse_bool(k, v)?,
                "block_size" => {
                    let n = crate::util::parse_size(v)?;
                    if !n.is_power_of_two() || !(MIN_BLOCK as u64..=MAX_BLOCK as u64).contains(&n)
                    {
                        return Err(StorageError::InvalidInput(format!(
                            "VHD block_size must be a power of two from {MIN_BLOCK} to {MAX_BLOCK}"
                        )));
                    }
                    o.block_size = n as u32;
                }
                "backing_file" => o.backing_file = Some(v.clone()),
                "backing_fmt" => {
                    if v != "vhd" && v != "vpc" {
                        return Err(StorageError::Unsupported(format!(
                            "a differencing VHD over a {v} image (its parent must be a VHD)"
                        )));
                    }
                }
                other => {
                    return Err(StorageError::InvalidInput(format!(
                        "Unknown option '{other}' for VHD images (supported: subformat, force_size, block_size, backing_file, backing_fmt)"
                    )))
                }
            }
        }
        if o.fixed && o.backing_file.is_some() {
            return Err(StorageError::InvalidInput(
                "A fixed VHD cannot have a parent (differencing disks are dynamic)".into(),
            ));
        }
        Ok(o)
    }
}

/// The size and geometry of a new disk of (at least) `size` bytes.
pub fn sized(size: u64, force_size: bool) -> Result<(u64, Geometry)> {
    if size > MAX_SIZE {
        return Err(StorageError::InvalidInput(format!(
            "VHD images hold at most 2040 GiB ({MAX_SIZE} bytes), not {size}"
        )));
    }
    let sectors = size.div_ceil(SECTOR);
    let (g, n) = if force_size {
        (exact_geometry(sectors * SECTOR), sectors)
    } else {
        Geometry::covering(sectors)
    };
    let bytes = n * SECTOR;
    if bytes > MAX_SIZE {
        return Err(StorageError::InvalidInput(format!(
            "VHD images hold at most 2040 GiB ({MAX_SIZE} bytes), not {bytes}"
        )));
    }
    Ok((bytes, g))
}

/// The geometry that makes every reader see exactly `bytes`: the covering one when it is exact,
/// else the largest (which makes readers use `current_size`).
fn exact_geometry(bytes: u64) -> Geometry {
    let (g, n) = Geometry::covering(bytes / SECTOR);
    if n * SECTOR == bytes {
        g
    } else {
        Geometry::MAX
    }
}

fn footer(kind: DiskType, size: u64, geometry: Geometry) -> Footer {
    Footer {
        features: 2,
        data_offset: if kind == DiskType::Fixed {
            NO_DATA_OFFSET
        } else {
            SECTOR
        },
        timestamp: vhd_now(),
        creator_app: *CREATOR_APP,
        creator_version: 0x0001_0000,
        creator_os: *CREATOR_OS,
        original_size: size,
        current_size: size,
        geometry,
        disk_type: kind,
        unique_id: std::array::from_fn(|_| fastrand::u8(..)),
        saved_state: 0,
    }
}

/// Checks that a VHD of `size` bytes without a parent can be made with `opts`, without making
/// anything.
pub fn check(size: u64, opts: &VhdCreateOptions) -> Result<()> {
    if size == 0 && opts.backing_file.is_none() {
        return Err(StorageError::InvalidInput(
            "Image size must be greater than zero".into(),
        ));
    }
    sized(size, opts.force_size).map(|_| ())
}

/// Creates a VHD at `path`; refuses to overwrite. `size` may be 0 for a differencing disk (the
/// parent's size is used).
pub fn create(path: &Path, size: u64, opts: &VhdCreateOptions) -> Result<()> {
    let parent = match &opts.backing_file {
        Some(b) => Some(parent_facts(path, b)?),
        None => None,
    };
    let (bytes, geometry) = match &parent {
        Some(p) => {
            if size != 0 && size != p.size {
                return Err(StorageError::InvalidInput(format!(
                    "A differencing VHD has its parent's size ({} bytes), not {size}",
                    p.size
                )));
            }
            (p.size, exact_geometry(p.size))
        }
        None => {
            if size == 0 {
                return Err(StorageError::InvalidInput(
                    "Image size must be greater than zero".into(),
                ));
            }
            sized(size, opts.force_size)?
        }
    };
    let file = create_new(path)?;
    let name = path.display().to_string();
    let io = |e| StorageError::io(format!("Writing {name}"), e);
    let write = || -> Result<()> {
        if opts.fixed {
            let f = footer(DiskType::Fixed, bytes, geometry);
            file.set_len(bytes).map_err(io)?;
            file.write_all_at(&f.render(), bytes).map_err(io)?;
        } else {
            let kind = if parent.is_some() {
                DiskType::Differencing
            } else {
                DiskType::Dynamic
            };
            let f = footer(kind, bytes, geometry);
            let blocks = bytes.div_ceil(opts.block_size as u64);
            let entries = u32::try_from(blocks)
                .map_err(|_| StorageError::InvalidInput("too many blocks for a VHD BAT".into()))?;
            let table_offset = 3 * SECTOR;
            let bat_len = (blocks * 4).next_multiple_of(SECTOR);
            let mut header = DynamicHeader {
                table_offset,
                max_table_entries: entries,
                block_size: opts.block_size,
                parent_id: [0; 16],
                parent_timestamp: 0,
                parent_name: String::new(),
                locators: Default::default(),
            };
            let mut end = table_offset + bat_len;
            if let Some(p) = &parent {
                header.parent_id = p.unique_id;
                header.parent_timestamp = p.timestamp;
                header.parent_name = p.file_name.rsplit('/').next().unwrap_or_default().into();
                let datas: [(&[u8; 4], Vec<u8>); 2] = [
                    (
                        b"W2ru",
                        utf16le(&format!(".\\{}", p.file_name.replace('/', "\\"))),
                    ),
                    (b"MacX", format!("file://./{}", p.file_name).into_bytes()),
                ];
                for (i, (code, data)) in datas.into_iter().enumerate() {
                    let space = (data.len() as u64).next_multiple_of(SECTOR);
                    header.locators[i] = LocatorEntry {
                        code: *code,
                        space: (space / SECTOR) as u32,
                        len: data.len() as u32,
                        offset: end,
                    };
                    file.write_all_at(&data, end).map_err(io)?;
                    end += space;
                }
            }
            file.write_all_at(&f.render(), 0).map_err(io)?;
            file.write_all_at(&header.render(), SECTOR).map_err(io)?;
            let bat = vec![0xffu8; bat_len as usize];
            file.write_all_at(&bat, table_offset).map_err(io)?;
            file.write_all_at(&f.render(), end).map_err(io)?;
            debug_assert_eq!(bitmap_bytes(opts.block_size) % SECTOR, 0);
        }
        file.sync_all()
            .map_err(|e| StorageError::io(format!("Syncing {name}"), e))?;
        sync_parent_dir(path)
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(path);
    })
}

struct ParentFacts {
    size: u64,
    unique_id: [u8; 16],
    timestamp: u32,
    file_name: String,
}

fn parent_facts(child: &Path, backing: &str) -> Result<ParentFacts> {
    let dir = crate::format::folder_of(child);
    let ppath = resolve_in_folder(&dir, backing, "VHD parent").map_err(|e| {
        StorageError::InvalidInput(format!(
            "{e} (a differencing VHD's parent must be in its folder)"
        ))
    })?;
    let opts = OpenOptions {
        read_only: true,
        format: Some(ImageFormat::Vhd),
        ..OpenOptions::default()
    };
    let img = open_image(&ppath, &opts)?;
    let pfile = crate::format::open_host_file(&ppath, &opts)?;
    let shared: crate::device::SharedFile = pfile;
    let (pf, _) = super::read_footer(&shared)?;
    let meta = std::fs::metadata(&ppath)
        .map_err(|e| StorageError::io(format!("Reading {}", ppath.display()), e))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let file_name = backing.trim_start_matches("./").to_string();
    Ok(ParentFacts {
        size: crate::device::BlockDevice::size(img.as_ref()),
        unique_id: pf.unique_id,
        timestamp: mtime.saturating_sub(super::footer::VHD_EPOCH) as u32,
        file_name,
    })
}

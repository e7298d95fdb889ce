//! Creating VHDXs: fixed and dynamic.
//!
//! Layout: header section (1 MiB), log (`log_size`, default 1 MiB), metadata region (1 MiB), BAT
//! (rounded up to 1 MiB), then payload blocks. A fixed disk has every block present in order
//! (the file is sparse until written); a dynamic disk's blocks are not present (or, with
//! `block_state_zero=on`, in the zero state as qemu writes them). Without `block_size` the block
//! size follows qemu's choice by disk size (8 MiB up to 1 GiB, 16 MiB to 100 GiB, 32 MiB to 32 TiB,
//! 64 MiB above). Sizes are rounded up to whole 512-byte sectors.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Result, StorageError};
use crate::format::raw::sync_parent_dir;
use crate::format::vhdx::bat::{chunk_ratio, entry_count, payload_entry};
use crate::format::vhdx::guid::{Guid, BAT_REGION, METADATA_REGION};
use crate::format::vhdx::header::{
    render_file_identifier, render_regions, Header, Region, Regions, HEADER_OFFSETS, MIB,
    REGION_OFFSETS,
};
use crate::format::vhdx::metadata::{Metadata, MAX_BLOCK, MAX_SIZE, MIN_BLOCK};
use crate::format::vmdk::create::create_new;
use crate::util::{parse_bool, parse_size};

/// Options for a new VHDX (`-o` pairs, qemu-img's names).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VhdxCreateOptions {
    /// Fixed instead of dynamic.
    pub fixed: bool,
    /// Payload block size; 0 picks one by disk size.
    pub block_size: u32,
    /// Log size in bytes (multiple of 1 MiB).
    pub log_size: u64,
    /// Mark absent blocks of a dynamic disk as zero instead of not present.
    pub block_state_zero: bool,
}

impl Default for VhdxCreateOptions {
    fn default() -> Self {
        VhdxCreateOptions {
            fixed: false,
            block_size: 0,
            log_size: MIB,
            block_state_zero: false,
        }
    }
}

impl VhdxCreateOptions {
    /// Reads `-o` options; unknown keys are refused with their name.
    pub fn from_map(map: &BTreeMap<String, String>) -> Result<VhdxCreateOptions> {
        let mut o = VhdxCreateOptions::default();
        for (k, v) in map {
            match k.as_str() {
                "subformat" => o.fixed = crate::format::fixed_subformat(v, "VHDX")?,
                "block_size" => {
                    let n = parse_size(v)?;
                    if n != 0
                        && (!n.is_power_of_two()
                            || !(MIN_BLOCK as u64..=MAX_BLOCK as u64).contains(&n))
                    {
                        return Err(StorageError::InvalidInput(format!(
                            "VHDX block_size must be a power of two from 1 MiB to 256 MiB, not {n}"
                        )));
                    }
                    o.block_size = n as u32;
                }
                "log_size" => {
                    let n = parse_size(v)?;
                    if n == 0 || n % MIB != 0 || n > crate::format::vhdx::log::MAX_LOG {
                        return Err(StorageError::InvalidInput(format!(
                            "VHDX log_size must be a multiple of 1 MiB up to 1 GiB, not {n}"
                        )));
                    }
                    o.log_size = n;
                }
                "block_state_zero" => o.block_state_zero = parse_bool(k, v)?,
                "backing_file" | "backing_fmt" => {
                    return Err(StorageError::Unsupported(
                        "creating differencing VHDX images (they are read-only here)".into(),
                    ))
                }
                other => {
                    return Err(StorageError::InvalidInput(format!(
                        "Unknown option '{other}' for VHDX images (supported: subformat, block_size, log_size, block_state_zero)"
                    )))
                }
            }
        }
        Ok(o)
    }
}

/// qemu-img's block size for a disk of `size` bytes.
pub fn default_block_size(size: u64) -> u32 {
    if size > 32 << 40 {
        64 << 20
    } else if size > 100 << 30 {
        32 << 20
    } else if size > 1 << 30 {
        16 << 20
    } else {
        8 << 20
    }
}

/// Creates a VHDX at `path`; refuses to overwrite.
/// Checks that a VHDX of `size` bytes can be made, without making anything.
pub fn check(size: u64) -> Result<()> {
    if size == 0 || size > MAX_SIZE {
        return Err(StorageError::InvalidInput(format!(
            "VHDX images hold 512 bytes to 64 TiB, not {size}"
        )));
    }
    Ok(())
}

pub fn create(path: &Path, size: u64, opts: &VhdxCreateOptions) -> Result<()> {
    check(size)?;
    let size = size.next_multiple_of(512);
    let block_size = if opts.block_size == 0 {
        default_block_size(size)
    } else {
        opts.block_size
    };
    let meta = Metadata {
        block_size,
        leave_blocks_allocated: opts.fixed,
        has_parent: false,
        virtual_size: size,
        logical_sector: 512,
        physical_sector: 4096,
        page83: Guid::random(),
        parent_locator: BTreeMap::new(),
    };
    let cr = chunk_ratio(&meta);
    let blocks = size.div_ceil(block_size as u64);
    let entries = entry_count(blocks, cr, false);
    let log_offset = MIB;
    let meta_offset = log_offset + opts.log_size;
    let bat_offset = meta_offset + MIB;
    let bat_len = (entries * 8).next_multiple_of(MIB);
    let data_offset = bat_offset + bat_len;
    let regions = Regions {
        bat: Region {
            guid: BAT_REGION,
            offset: bat_offset,
            length: u32::try_from(bat_len)
                .map_err(|_| StorageError::InvalidInput("VHDX BAT too large".into()))?,
            required: true,
        },
        metadata: Region {
            guid: METADATA_REGION,
            offset: meta_offset,
            length: MIB as u32,
            required: true,
        },
    };
    let file = create_new(path)?;
    let name = path.display().to_string();
    let io = |e| StorageError::io(format!("Writing {name}"), e);
    let write = || -> Result<()> {
        let mut bat = vec![0u8; (entries * 8) as usize];
        let mut end = data_offset;
        for b in 0..blocks {
            let state = if opts.fixed {
                let e = payload_entry(6, end);
                end += block_size as u64;
                e
            } else if opts.block_state_zero {
                payload_entry(2, 0)
            } else {
                0
            };
            let i = (b + b / cr) as usize;
            bat[8 * i..8 * i + 8].copy_from_slice(&state.to_le_bytes());
        }
        file.set_len(end).map_err(io)?;
        file.write_all_at(&render_file_identifier("Strata"), 0)
            .map_err(io)?;
        let h = Header {
            sequence: 0,
            file_write_guid: Guid::random(),
            data_write_guid: Guid::random(),
            log_guid: Guid::ZERO,
            log_length: opts.log_size as u32,
            log_offset,
        };
        for (i, at) in HEADER_OFFSETS.iter().enumerate() {
            let hi = Header {
                sequence: i as u64,
                ..h.clone()
            };
            file.write_all_at(&hi.render(), *at).map_err(io)?;
        }
        let rt = render_regions(&regions);
        for at in REGION_OFFSETS {
            file.write_all_at(&rt, at).map_err(io)?;
        }
        file.write_all_at(&meta.render(MIB as usize), meta_offset)
            .map_err(io)?;
        file.write_all_at(&bat, bat_offset).map_err(io)?;
        file.sync_all()
            .map_err(|e| StorageError::io(format!("Syncing {name}"), e))?;
        sync_parent_dir(path)
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(path);
    })
}

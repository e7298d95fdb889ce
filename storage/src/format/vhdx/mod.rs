//! Microsoft VHDX (Hyper-V's virtual hard disk v2): fixed and dynamic disks read and written,
//! differencing disks read, per Microsoft's VHDX Format Specification v1.0.
//!
//! | file | job |
//! |---|---|
//! | `guid.rs` | GUIDs in the on-disk (mixed-endian) order and the ones the format defines |
//! | `header.rs` | file identifier, the two headers (sequence numbers), the region table, CRC-32C |
//! | `log.rs` | the metadata log: active sequence search and replay, entry writing |
//! | `metadata.rs` | the metadata region: file parameters, sizes, sector sizes, parent locator |
//! | `bat.rs` | the BAT: payload and sector bitmap entries, allocation, dirty pages |
//! | `image.rs` | the open image: session protocol, `BlockDevice`, `Image`, block status |
//! | `queue.rs` | the data path: guest ranges mapped onto blocks, zeros or parent |
//! | `create.rs` | creating fixed and dynamic disks |
//! | `check.rs` | `strata image check` for VHDXs (log replay with `-r all`) |
//!
//! CRC-32C comes from the `crc32c` crate: the one well-kept crate that does exactly Castagnoli's
//! CRC, with the SSE 4.2 instruction where the CPU has it and a table fallback; nothing here is
//! hand-written.
//!
//! A non-empty log is replayed when the image is opened for writing; opened read-only, an image
//! with a log to replay is refused with an error saying how to replay it, so it is never read
//! without its log. A differencing disk's parent is found through its locator (only inside the
//! child's folder) and must carry the data-write GUID the child links to.
//!
//! # Locking
//! | object | shared by | guarded by |
//! |---|---|---|
//! | BAT entries, dirty pages, bitmap cache, end of file | every queue of the image | one mutex in [`bat::Bat`] |
//! | header, log writer, session state | flushes and the first write | one mutex per image (taken before the BAT's) |
//! | a queue's pending requests | one thread | `&mut self` |

pub mod bat;
pub mod check;
pub mod create;
#[cfg(feature = "test-utils")]
pub mod fuzz;
pub mod guid;
pub mod header;
mod image;
pub mod log;
pub mod metadata;
mod queue;

use std::path::Path;
use std::sync::{Arc, Mutex};

pub use image::VhdxImage;

use crate::device::SharedFile;
use crate::error::{Result, StorageError};
use crate::format::vhd::locator::{classify_windows_path, resolve};
use crate::format::vhdx::bat::Bat;
use crate::format::vhdx::guid::Guid;
use crate::format::vhdx::header::{read_current_header, read_regions, update_header, Header, MIB};
use crate::format::vhdx::image::{Session, Vhdx};
use crate::format::vhdx::log::{find_replay, LogPlace, LogWriter};
use crate::format::vhdx::metadata::Metadata;
use crate::format::{
    open_host_file, parent_folder, probe, ImageFormat, OpenOptions, Probed, References,
};

/// Longest differencing chain followed (also stops loops).
pub const MAX_CHAIN_DEPTH: u32 = 32;

/// Opens the VHDX in `file`; `path` is where it lives (needed for a differencing disk's parent).
pub fn open(file: SharedFile, path: Option<&Path>, opts: &OpenOptions) -> Result<Arc<VhdxImage>> {
    open_at_depth(file, path, opts, 0)
}

/// Replays the log of `file` if it has one to replay (the file must be writable); returns the
/// header afterwards, its slot and the number of entries replayed.
pub fn replay_log(file: &SharedFile, writable: bool) -> Result<(Header, usize, usize)> {
    let (mut header, mut slot) = read_current_header(file.as_ref())?;
    let name = file.name().to_string();
    let replay = find_replay(file.as_ref(), &header)?;
    let mut replayed = 0;
    if let Some(r) = &replay {
        if !writable {
            return Err(StorageError::Unsupported(format!(
                "reading {name} before its VHDX log ({} entries) is replayed: open it for writing, or run `strata image check -r all {name}` first",
                r.entries
            )));
        }
        log::apply(file.as_ref(), r)?;
        replayed = r.entries;
        tracing::info!(image = %name, entries = r.entries, "replayed the VHDX log");
    }
    if writable && !header.log_guid.is_zero() {
        header.log_guid = Guid::ZERO;
        slot = update_header(file.as_ref(), &mut header, slot)?;
    }
    Ok((header, slot, replayed))
}

fn open_at_depth(
    file: SharedFile,
    path: Option<&Path>,
    opts: &OpenOptions,
    depth: u32,
) -> Result<Arc<VhdxImage>> {
    let name = file.name().to_string();
    let writable = !opts.read_only;
    let (header, slot, replayed) = replay_log(&file, writable)?;
    let regions = read_regions(file.as_ref())?;
    let meta = Metadata::read(file.as_ref(), &regions.metadata)?;
    if meta.has_parent && writable {
        return Err(StorageError::Unsupported(format!(
            "writing to the differencing VHDX {name} (differencing VHDXs are read-only here; open it read-only)"
        )));
    }
    let log = LogPlace::of(&header, file.len(), &name)?;
    let reserved = [
        (0, MIB),
        (log.offset, log.length),
        (regions.bat.offset, regions.bat.length as u64),
        (regions.metadata.offset, regions.metadata.length as u64),
    ];
    let bat = Bat::open(file.clone(), &regions.bat, &meta, &reserved)?;
    let (parent, parent_path) = if meta.has_parent {
        let (p, pp) = open_parent(&name, &meta, path, opts, depth)?;
        (Some(p), Some(pp))
    } else {
        (None, None)
    };
    let size = meta.virtual_size;
    Ok(Arc::new(VhdxImage {
        inner: Arc::new(Vhdx {
            name,
            file,
            meta,
            bat,
            size,
            parent,
            parent_path,
            writable,
            replayed,
            session: Mutex::new(Session {
                header,
                slot,
                log: LogWriter::new(log),
                touched: false,
            }),
        }),
    }))
}

fn open_parent(
    name: &str,
    meta: &Metadata,
    path: Option<&Path>,
    opts: &OpenOptions,
    depth: u32,
) -> Result<(Arc<dyn crate::format::Image>, String)> {
    if opts.references == References::Refuse {
        return Err(StorageError::Forbidden(format!(
            "{name} is a differencing VHDX that names a parent disk; this image must be \
             self-contained"
        )));
    }
    let dir = parent_folder(name, path, depth, MAX_CHAIN_DEPTH, "VHDX")?;
    let loc = &meta.parent_locator;
    let linkage: Vec<Guid> = ["parent_linkage", "parent_linkage2"]
        .iter()
        .filter_map(|k| loc.get(*k).and_then(|v| Guid::parse(v)))
        .collect();
    if linkage.is_empty() {
        return Err(StorageError::corrupt(
            name,
            "differencing VHDX parent locator has no parent_linkage",
        ));
    }
    let mut candidates = Vec::new();
    for key in ["relative_path", "absolute_win32_path", "volume_path"] {
        if let Some(v) = loc.get(key) {
            if let Some(p) = resolve(&dir, &classify_windows_path(v))? {
                if !candidates.contains(&p) {
                    candidates.push(p);
                }
            }
        }
    }
    let popts = OpenOptions {
        read_only: true,
        format: None,
        ..*opts
    };
    for cand in &candidates {
        if !cand.exists() {
            continue;
        }
        let pfile: SharedFile = open_host_file(cand, &popts)?;
        if probe(pfile.as_ref())? != Probed::Known(ImageFormat::Vhdx) {
            return Err(StorageError::Unsupported(format!(
                "a differencing VHDX whose parent {} is not a VHDX",
                cand.display()
            )));
        }
        let parent = open_at_depth(pfile, Some(cand), &popts, depth + 1)?;
        let got = parent.header()?.data_write_guid;
        if !linkage.contains(&got) {
            return Err(StorageError::corrupt(
                name,
                format!(
                    "its parent {} has data-write GUID {got} but the differencing disk links to {} (the parent changed since)",
                    cand.display(),
                    linkage[0]
                ),
            ));
        }
        return Ok((parent, cand.display().to_string()));
    }
    Err(StorageError::corrupt(
        name,
        format!(
            "parent disk not found (locator {:?})",
            loc.iter()
                .filter(|(k, _)| k.ends_with("path"))
                .collect::<Vec<_>>()
        ),
    ))
}

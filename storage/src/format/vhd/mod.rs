//! Microsoft Virtual Hard Disk (VHD; qemu calls the format "vpc"): fixed, dynamic and
//! differencing disks, read and written, per Microsoft's VHD Image Format Specification.
//!
//! | file | job |
//! |---|---|
//! | `footer.rs` | the footer and its copy, checksums, CHS geometry, which size counts |
//! | `dynamic.rs` | the dynamic header: BAT place, block size, parent identity and locators |
//! | `locator.rs` | parent locators (W2ku, W2ru, MacX) decoded and resolved inside the folder |
//! | `table.rs` | the BAT and sector bitmaps: lookup, allocation, write-back order |
//! | `image.rs` | the open image: `BlockDevice`, `Image`, block status, info |
//! | `queue.rs` | the data path: guest ranges mapped onto file, zeros or parent |
//! | `create.rs` | creating fixed, dynamic and differencing disks |
//! | `check.rs` | `strata image check` for VHDs |
//!
//! A differencing disk reads through its parent as a backing chain does; the parent is found
//! through the locators (only inside the child's folder) and must carry the unique ID the child
//! recorded. Everything read from the file is bounded by the file's size before it is used.
//!
//! # Locking
//! | object | shared by | guarded by |
//! |---|---|---|
//! | the BAT, bitmap cache and end of file | every queue of the image | one mutex in [`table::Table`], held for lookups, allocation and write-back |
//! | copy-on-write of sectors over a parent | every queue of the image | one mutex per image, held while sectors are filled, written and marked |
//! | a queue's pending requests | one thread | `&mut self` |

pub mod check;
pub mod create;
pub mod dynamic;
pub mod footer;
#[cfg(feature = "test-utils")]
pub mod fuzz;
mod image;
pub mod locator;
mod queue;
pub mod table;

use std::path::Path;
use std::sync::{Arc, Mutex};

pub use image::VhdImage;

use crate::device::SharedFile;
use crate::error::{Result, StorageError};
use crate::format::vhd::dynamic::{DynamicHeader, HEADER_LEN};
use crate::format::vhd::footer::{DiskType, Footer, SECTOR};
use crate::format::vhd::image::Vhd;
use crate::format::vhd::table::Table;
use crate::format::{
    open_host_file, parent_folder, probe, ImageFormat, OpenOptions, Probed, References,
};

/// Longest differencing chain followed (also stops loops).
pub const MAX_CHAIN_DEPTH: u32 = 32;

/// Opens the VHD in `file`; `path` is where it lives (needed to find a differencing disk's
/// parent).
pub fn open(file: SharedFile, path: Option<&Path>, opts: &OpenOptions) -> Result<Arc<VhdImage>> {
    open_at_depth(file, path, opts, 0)
}

/// Reads the footer: the one at the end, or for dynamic disks the copy at offset 0 when the end
/// is damaged (an interrupted block allocation can leave it so). Returns the footer and whether
/// the end must be rewritten.
pub fn read_footer(file: &SharedFile) -> Result<(Footer, bool)> {
    let name = file.name().to_string();
    let len = file.len();
    if len < SECTOR {
        return Err(StorageError::corrupt(&name, "too short for a VHD footer"));
    }
    let mut end = [0u8; SECTOR as usize];
    file.read_exact_at(len - SECTOR, &mut end)?;
    let at_end = Footer::parse(&end, &name);
    if let Ok(f) = at_end {
        return Ok((f, false));
    }
    let mut head = [0u8; SECTOR as usize];
    file.read_exact_at(0, &mut head)?;
    match Footer::parse(&head, &name) {
        Ok(f) if f.disk_type != DiskType::Fixed && len >= 3 * SECTOR => {
            tracing::warn!(image = %name, "VHD footer at the end is damaged; using the copy at offset 0");
            Ok((f, true))
        }
        _ => at_end.map(|f| (f, false)),
    }
}

fn open_at_depth(
    file: SharedFile,
    path: Option<&Path>,
    opts: &OpenOptions,
    depth: u32,
) -> Result<Arc<VhdImage>> {
    let name = file.name().to_string();
    let (footer, repair_end) = read_footer(&file)?;
    let size = footer.guest_size();
    let len = file.len();
    let writable = !opts.read_only;
    if footer.disk_type == DiskType::Fixed {
        if size > len - SECTOR {
            return Err(StorageError::corrupt(
                &name,
                format!(
                    "fixed VHD of {size} bytes in a file of {len} bytes (data and footer do not fit)"
                ),
            ));
        }
        return Ok(Arc::new(VhdImage {
            inner: Arc::new(Vhd {
                name,
                file,
                footer,
                dynamic: None,
                table: None,
                size,
                parent: None,
                parent_path: None,
                writable,
                cow: Mutex::new(None),
            }),
        }));
    }
    let hdr_at = footer.data_offset;
    if hdr_at < SECTOR
        || hdr_at
            .checked_add(HEADER_LEN as u64)
            .is_none_or(|e| e > len)
    {
        return Err(StorageError::corrupt(
            &name,
            format!("dynamic header offset {hdr_at} is outside the file"),
        ));
    }
    let mut hb = vec![0u8; HEADER_LEN];
    file.read_exact_at(hdr_at, &mut hb)?;
    let header = DynamicHeader::parse(&hb, &name)?;
    let differencing = footer.disk_type == DiskType::Differencing;
    let blocks = size.div_ceil(header.block_size as u64);
    let mut meta_end = (hdr_at + HEADER_LEN as u64)
        .max(header.table_offset.saturating_add(blocks * 4))
        .next_multiple_of(SECTOR);
    if differencing {
        for l in header.locators.iter().filter(|l| l.used() && l.len > 0) {
            let e = l
                .offset
                .saturating_add(l.reserved_bytes().max(l.len as u64));
            if e <= len {
                meta_end = meta_end.max(e.next_multiple_of(SECTOR));
            }
        }
    }
    let table = Table::open(
        file.clone(),
        &header,
        size,
        meta_end,
        differencing,
        footer.render(),
    )?;
    let (parent, parent_path) = if differencing {
        let (p, pp) = open_parent(&file, &header, path, opts, depth)?;
        (Some(p), Some(pp))
    } else {
        (None, None)
    };
    let img = Arc::new(VhdImage {
        inner: Arc::new(Vhd {
            name,
            file,
            footer,
            dynamic: Some(header),
            table: Some(table),
            size,
            parent,
            parent_path,
            writable,
            cow: Mutex::new(None),
        }),
    });
    if repair_end && writable {
        img.inner.flush_footer()?;
    }
    Ok(img)
}

fn open_parent(
    file: &SharedFile,
    header: &DynamicHeader,
    path: Option<&Path>,
    opts: &OpenOptions,
    depth: u32,
) -> Result<(Arc<dyn crate::format::Image>, String)> {
    let name = file.name();
    if opts.references == References::Refuse {
        return Err(StorageError::Forbidden(format!(
            "{name} is a differencing VHD that names a parent disk; this image must be \
             self-contained"
        )));
    }
    let dir = parent_folder(name, path, depth, MAX_CHAIN_DEPTH, "VHD")?;
    let candidates = locator::parent_candidates(file.as_ref(), header, &dir)?;
    let popts = OpenOptions {
        read_only: true,
        format: None,
        ..*opts
    };
    let mut mismatch = None;
    for cand in &candidates {
        if !cand.exists() {
            continue;
        }
        let pfile: SharedFile = open_host_file(cand, &popts)?;
        // A fixed parent's footer is only at its end, which probing does not look at.
        let is_vhd = matches!(probe(pfile.as_ref())?, Probed::Known(ImageFormat::Vhd))
            || read_footer(&pfile).is_ok();
        if !is_vhd {
            return Err(StorageError::Unsupported(format!(
                "a differencing VHD whose parent {} is not a VHD",
                cand.display()
            )));
        }
        let parent = open_at_depth(pfile, Some(cand), &popts, depth + 1)?;
        if parent.footer().unique_id != header.parent_id {
            mismatch = Some(cand.clone());
            continue;
        }
        return Ok((parent, cand.display().to_string()));
    }
    if let Some(m) = mismatch {
        return Err(StorageError::corrupt(
            name,
            format!(
                "its parent {} has unique ID {} but the differencing disk was made from {} (the parent changed or is another disk)",
                m.display(),
                image::hex(&read_footer(&open_host_file(&m, &popts)?)?.0.unique_id),
                image::hex(&header.parent_id)
            ),
        ));
    }
    let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    Err(StorageError::corrupt(
        name,
        if tried.is_empty() {
            "differencing VHD without a usable parent locator".to_string()
        } else {
            format!("parent disk not found (looked for {})", tried.join(", "))
        },
    ))
}

impl Vhd {
    /// Rewrites the footer at the end of the data (after a damaged end was found).
    fn flush_footer(&self) -> Result<()> {
        match &self.table {
            Some(t) => t.repair_end(),
            None => Ok(()),
        }
    }
}

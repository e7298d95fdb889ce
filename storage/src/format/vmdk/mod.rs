//! VMware virtual disks (vmdk): the five layouts qemu-img writes — monolithicSparse,
//! monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat and streamOptimized — read and
//! written, and delta disks (`parentCID`/`parentFileNameHint`) read as backing chains.
//!
//! | file | job |
//! |---|---|
//! | `descriptor.rs` | the text descriptor: parse (untrusted), render, safe extent paths |
//! | `header.rs` | the sparse extent header and stream markers |
//! | `sparse.rs` | grain directory and tables of a sparse extent, allocation, write-back order |
//! | `image.rs` | the open image: extents, parent, mapping of guest ranges, `BlockDevice` |
//! | `queue.rs` | the data plane: split requests, run pieces on the extent files' queues |
//! | `create.rs` | creating each layout |
//! | `stream.rs` | writing streamOptimized extents as a stream ([`crate::format::CompressedWriter`]) |
//!
//! A streamOptimized image is read-only once written: it is made in one pass by
//! `strata image convert -c` (or `create -o subformat=streamOptimized` for an empty one).
//! Extent and parent file names are relative to the descriptor's folder; names that leave the
//! folder (`..`, absolute paths, symbolic links pointing out) are refused, so an image cannot
//! make us read arbitrary host files.
//!
//! # Locking
//! | object | shared by | guarded by |
//! |---|---|---|
//! | a sparse extent's directory, table cache and end of file | every queue of the image | one mutex per extent, held for lookups, allocations and write-back |
//! | copy-on-write of a grain over a parent | every queue of the image | one mutex per image, held while the grain is filled and mapped |
//! | a vmdk queue's pending requests | one thread | `&mut self` |

pub mod check;
pub mod create;
pub mod descriptor;
#[cfg(feature = "test-utils")]
pub mod fuzz;
pub mod header;
mod image;
mod queue;
pub mod sparse;
pub mod stream;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

pub use image::VmdkImage;

use crate::device::SharedFile;
use crate::error::{Result, StorageError};
use crate::format::vmdk::descriptor::{
    resolve_extent_path, Access, Descriptor, ExtentLine, ExtentType, Subformat, NO_PARENT_CID,
};
use crate::format::vmdk::header::{SparseHeader, MAGIC, SECTOR};
use crate::format::vmdk::image::{Backing, DescriptorPlace, Inner, Placed};
use crate::format::vmdk::sparse::SparseExtent;
use crate::format::{open_host_file, probe, ImageFormat, OpenOptions, Probed, References};

/// Longest backing chain followed (also stops loops).
pub const MAX_CHAIN_DEPTH: u32 = 32;

/// Opens the vmdk whose descriptor (or only sparse extent) is `file`. `path` is where it lives:
/// needed to find extent files and parents; without it only self-contained images open.
pub fn open(file: SharedFile, path: Option<&Path>, opts: &OpenOptions) -> Result<Arc<VmdkImage>> {
    open_at_depth(file, path, opts, 0)
}

fn folder(path: Option<&Path>, name: &str, what: &str) -> Result<PathBuf> {
    match path {
        Some(p) => Ok(match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        }),
        None => Err(StorageError::Unsupported(format!(
            "opening {name} without its path: the vmdk refers to {what}"
        ))),
    }
}

fn open_at_depth(
    file: SharedFile,
    path: Option<&Path>,
    opts: &OpenOptions,
    depth: u32,
) -> Result<Arc<VmdkImage>> {
    let name = file.name().to_string();
    let mut head = [0u8; SECTOR as usize];
    let n = file.len().min(SECTOR) as usize;
    file.read_exact_at(0, &mut head[..n])?;
    let want_write = !opts.read_only;
    let refuse = opts.references == References::Refuse;
    let (descriptor, desc_place, files, extents) = if head[..n].starts_with(MAGIC) {
        open_monolithic(&file, &head[..n], &name, want_write)?
    } else if refuse {
        return Err(StorageError::Forbidden(format!(
            "{name} is a vmdk descriptor that names extent files; this image must be a single \
             self-contained file (monolithicSparse or streamOptimized)"
        )));
    } else {
        open_with_descriptor_file(&file, path, &name, opts)?
    };
    if refuse && descriptor.has_parent() {
        return Err(StorageError::Forbidden(format!(
            "{name} is a vmdk delta disk that names a parent disk; this image must be \
             self-contained"
        )));
    }
    let stream = descriptor.create_type == Subformat::StreamOptimized;
    if want_write {
        if stream {
            return Err(StorageError::Unsupported(format!(
                "writing to the streamOptimized vmdk {name} in place (it is written once, as a stream, by `strata image convert -c`; open it read-only)"
            )));
        }
        if let Some(e) = descriptor
            .extents
            .iter()
            .find(|e| e.access != Access::ReadWrite)
        {
            return Err(StorageError::ReadOnly(format!(
                "{name}: extent '{}' is not read-write (open the image read-only)",
                e.file
            )));
        }
    }
    let parent = if descriptor.has_parent() {
        Some(open_parent(&descriptor, path, &name, opts, depth)?)
    } else {
        None
    };
    let size = descriptor.size();
    let inner = Inner {
        name,
        descriptor,
        desc_place,
        files,
        extents,
        parent,
        size,
        writable: want_write,
        cid_updated: AtomicBool::new(false),
        cow: Mutex::new(()),
    };
    Ok(Arc::new(VmdkImage {
        inner: Arc::new(inner),
    }))
}

type Opened = (Descriptor, DescriptorPlace, Vec<SharedFile>, Vec<Placed>);

/// A single sparse file with its descriptor embedded (monolithicSparse, streamOptimized), or
/// a bare sparse extent opened on its own.
fn open_monolithic(file: &SharedFile, head: &[u8], name: &str, want_write: bool) -> Result<Opened> {
    let header = SparseHeader::parse(head, name)?;
    let stream = header.compressed();
    let (descriptor, place) = if header.descriptor_offset != 0 && header.descriptor_size != 0 {
        let at = header.descriptor_offset * SECTOR;
        let len = header.descriptor_size * SECTOR;
        if at.checked_add(len).is_none_or(|end| end > file.len()) {
            return Err(StorageError::corrupt(
                name,
                "embedded descriptor lies beyond the end of the file",
            ));
        }
        let mut text = vec![0u8; len as usize];
        file.read_exact_at(at, &mut text)?;
        let d = Descriptor::parse(&text)?;
        (
            d,
            DescriptorPlace {
                file: file.clone(),
                offset: at,
                len,
            },
        )
    } else {
        // A bare extent (one of a twoGbMaxExtentSparse set, say): describe it as a disk.
        let d = Descriptor {
            version: 1,
            cid: 0,
            parent_cid: NO_PARENT_CID,
            create_type: if stream {
                Subformat::StreamOptimized
            } else {
                Subformat::MonolithicSparse
            },
            parent_hint: None,
            extents: vec![ExtentLine {
                access: Access::ReadWrite,
                sectors: header.capacity,
                kind: ExtentType::Sparse,
                file: name.to_string(),
                offset: 0,
            }],
            ddb: Vec::new(),
        };
        (
            d,
            DescriptorPlace {
                file: file.clone(),
                offset: 0,
                len: 0,
            },
        )
    };
    if descriptor.extents.len() != 1 || descriptor.extents[0].kind != ExtentType::Sparse {
        return Err(StorageError::corrupt(
            name,
            "an embedded descriptor must list exactly one SPARSE extent, the file itself",
        ));
    }
    let ext = SparseExtent::open(file.clone(), want_write && !stream)?;
    let len = descriptor.extents[0].sectors * SECTOR;
    if len > ext.capacity() {
        return Err(StorageError::corrupt(
            name,
            "the descriptor's extent is larger than the sparse extent's capacity",
        ));
    }
    let placed = Placed {
        start: 0,
        len,
        backing: Backing::Sparse {
            file: 0,
            ext: Box::new(ext),
        },
    };
    Ok((descriptor, place, vec![file.clone()], vec![placed]))
}

fn open_with_descriptor_file(
    file: &SharedFile,
    path: Option<&Path>,
    name: &str,
    opts: &OpenOptions,
) -> Result<Opened> {
    let len = file.len();
    if len > descriptor::MAX_DESCRIPTOR_BYTES as u64 {
        return Err(StorageError::corrupt(
            name,
            "not a vmdk: no KDMV magic and too large for a descriptor",
        ));
    }
    let mut text = vec![0u8; len as usize];
    file.read_exact_at(0, &mut text)?;
    let descriptor = Descriptor::parse(&text).map_err(|e| match e {
        StorageError::Corrupt { detail, .. } => {
            StorageError::corrupt(name, format!("vmdk descriptor: {detail}"))
        }
        other => other,
    })?;
    let stream = descriptor.create_type == Subformat::StreamOptimized;
    let mut files: Vec<SharedFile> = Vec::new();
    let mut paths: Vec<PathBuf> = Vec::new();
    let mut extents = Vec::new();
    let mut start = 0u64;
    let mut sparse_files: Vec<usize> = Vec::new();
    for line in &descriptor.extents {
        let bytes = line.sectors * SECTOR;
        let backing = if line.kind == ExtentType::Zero {
            Backing::Zero
        } else {
            let dir = folder(path, name, "separate extent files")?;
            let p = resolve_extent_path(&dir, &line.file)?;
            let index = match paths.iter().position(|q| *q == p) {
                Some(i) => i,
                None => {
                    let fopts = OpenOptions {
                        read_only: opts.read_only || stream || line.access != Access::ReadWrite,
                        ..*opts
                    };
                    let f: SharedFile = open_host_file(&p, &fopts)?;
                    files.push(f);
                    paths.push(p.clone());
                    files.len() - 1
                }
            };
            let f = &files[index];
            match line.kind {
                ExtentType::Flat => {
                    let end = line
                        .offset
                        .checked_mul(SECTOR)
                        .and_then(|o| o.checked_add(bytes));
                    if end.is_none_or(|e| e > f.len()) {
                        return Err(StorageError::corrupt(
                            f.name(),
                            format!("flat extent file is shorter than the {} sectors the descriptor gives it", line.sectors),
                        ));
                    }
                    Backing::Flat {
                        file: index,
                        base: line.offset * SECTOR,
                    }
                }
                _ => {
                    // Each sparse extent owns its file's directory and allocation; the same
                    // file on two lines would be read twice and, writable, corrupted.
                    if sparse_files.contains(&index) {
                        return Err(StorageError::corrupt(
                            f.name(),
                            "a sparse extent file is listed more than once",
                        ));
                    }
                    sparse_files.push(index);
                    let ext = SparseExtent::open(f.clone(), !opts.read_only && !stream)?;
                    if bytes > ext.capacity() {
                        return Err(StorageError::corrupt(
                            f.name(),
                            "the descriptor's extent is larger than the sparse extent's capacity",
                        ));
                    }
                    Backing::Sparse {
                        file: index,
                        ext: Box::new(ext),
                    }
                }
            }
        };
        extents.push(Placed {
            start,
            len: bytes,
            backing,
        });
        start += bytes;
    }
    let place = DescriptorPlace {
        file: file.clone(),
        offset: 0,
        len,
    };
    Ok((descriptor, place, files, extents))
}

fn open_parent(
    d: &Descriptor,
    path: Option<&Path>,
    name: &str,
    opts: &OpenOptions,
    depth: u32,
) -> Result<Arc<dyn crate::format::Image>> {
    let hint = d.parent_hint.as_deref().ok_or_else(|| {
        StorageError::corrupt(name, "delta disk has a parentCID but no parentFileNameHint")
    })?;
    if depth + 1 >= MAX_CHAIN_DEPTH {
        return Err(StorageError::Unsupported(format!(
            "vmdk backing chains deeper than {MAX_CHAIN_DEPTH} ({name}; a loop?)"
        )));
    }
    let dir = folder(path, name, "its parent disk")?;
    let ppath = resolve_extent_path(&dir, hint).map_err(|e| match e {
        StorageError::InvalidInput(m) => {
            StorageError::InvalidInput(m.replace("extent path", "parent path"))
        }
        other => other,
    })?;
    let popts = OpenOptions {
        read_only: true,
        format: None,
        ..*opts
    };
    let pfile: SharedFile = open_host_file(&ppath, &popts)?;
    match probe(pfile.as_ref())? {
        Probed::Known(ImageFormat::Vmdk) => {}
        _ => {
            return Err(StorageError::Unsupported(format!(
                "a vmdk delta disk whose parent {} is not a vmdk",
                ppath.display()
            )))
        }
    }
    let parent = open_at_depth(pfile, Some(&ppath), &popts, depth + 1)?;
    let pcid = parent.descriptor().cid;
    if d.parent_cid != NO_PARENT_CID && pcid != d.parent_cid {
        return Err(StorageError::corrupt(
            name,
            format!(
                "its parent {} has content ID {pcid:08x} but the delta disk was made from {:08x} (the parent changed since)",
                ppath.display(),
                d.parent_cid
            ),
        ));
    }
    Ok(parent)
}

//! An open vmdk: its descriptor, extents (flat, sparse, zero), optional parent, and the mapping
//! of guest ranges onto them. The data plane is in [`super::queue`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::json;

use crate::device::{BlockDevice, Capabilities, Extent, ExtentKind, SharedFile};
use crate::error::{Result, StorageError};
use crate::format::vmdk::descriptor::{Descriptor, ExtentType, NO_PARENT_CID};
use crate::format::vmdk::sparse::{GrainMap, SparseExtent};
use crate::format::{Image, ImageFormat, ImageInfo};
use crate::io::{IoQueue, QueueOptions};

/// Most grains one [`BlockDevice::block_status`] call walks before answering with a shorter
/// extent (callers ask again from where it ended).
const STATUS_SCAN_GRAINS: u64 = 1 << 16;

/// What backs one extent of the disk.
#[derive(Debug)]
pub(crate) enum Backing {
    /// A flat file: guest offset `o` within the extent is at `base + o` of file `file`.
    Flat { file: usize, base: u64 },
    /// A hosted sparse extent in file `file`.
    Sparse { file: usize, ext: Box<SparseExtent> },
    /// Reads as zeros; refuses writes.
    Zero,
}

/// One extent of the disk, placed at `start` (bytes) for `len` bytes.
#[derive(Debug)]
pub(crate) struct Placed {
    pub start: u64,
    pub len: u64,
    pub backing: Backing,
}

/// Where the descriptor text is kept, for the content-ID update on the first write.
#[derive(Debug)]
pub(crate) struct DescriptorPlace {
    pub file: SharedFile,
    pub offset: u64,
    pub len: u64,
}

/// Where a piece of a read comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReadTarget {
    /// Zeros.
    Zero,
    /// The parent image at the same guest offset.
    Parent,
    /// File `file` at byte `offset`.
    Host { file: usize, offset: u64 },
    /// Inside a compressed grain: extent `extent`, marker at `marker`, `within` bytes into the grain.
    Compressed {
        extent: usize,
        marker: u64,
        within: u64,
    },
}

/// Where a piece of a write goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WriteTarget {
    /// File `file` at byte `offset`.
    Host { file: usize, offset: u64 },
    /// An unallocated grain over a parent: copy-on-write, done synchronously.
    Cow {
        extent: usize,
        grain: u64,
        grain_start: u64,
    },
}

/// What zeroing a piece takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ZeroTarget {
    /// Already reads as zeros.
    Nothing,
    /// Zero (or discard, with `unmap`) a range of a file.
    Host {
        file: usize,
        offset: u64,
        unmap: bool,
    },
    /// A partial grain over a parent: copy-on-write with zeros.
    Cow {
        extent: usize,
        grain: u64,
        grain_start: u64,
    },
}

/// A piece of a request: `len` bytes at `pos` within it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Piece<T> {
    pub pos: u64,
    pub len: u64,
    pub target: T,
}

fn push_merged<T: Copy + PartialEq>(
    out: &mut Vec<Piece<T>>,
    p: Piece<T>,
    contiguous: impl Fn(&T, &T, u64) -> bool,
) {
    if let Some(last) = out.last_mut() {
        if last.pos + last.len == p.pos && contiguous(&last.target, &p.target, last.len) {
            last.len += p.len;
            return;
        }
    }
    out.push(p);
}

/// The shared state of an open vmdk.
#[derive(Debug)]
pub(crate) struct Inner {
    pub name: String,
    pub descriptor: Descriptor,
    pub desc_place: DescriptorPlace,
    pub files: Vec<SharedFile>,
    pub extents: Vec<Placed>,
    pub parent: Option<Arc<dyn Image>>,
    pub size: u64,
    pub writable: bool,
    pub cid_updated: AtomicBool,
    /// Serialises copy-on-write allocations so a grain is filled before it is mapped.
    pub cow: Mutex<()>,
}

/// An open vmdk image. See the module documentation.
#[derive(Debug)]
pub struct VmdkImage {
    pub(crate) inner: Arc<Inner>,
}

impl Inner {
    /// Index of the extent holding byte `offset`.
    fn extent_at(&self, offset: u64) -> Option<usize> {
        let i = self.extents.partition_point(|e| e.start + e.len <= offset);
        (i < self.extents.len()).then_some(i)
    }

    /// Calls `f(extent index, offset within extent, length)` for each extent piece of a range.
    fn walk(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(usize, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let i = self.extent_at(at).ok_or(StorageError::OutOfRange {
                offset,
                len,
                size: self.size,
            })?;
            let e = &self.extents[i];
            let within = at - e.start;
            let n = (e.len - within).min(end - at);
            f(i, within, n)?;
            at += n;
        }
        Ok(())
    }

    /// Calls `f(grain index, grain start within the extent, offset in grain, length)` per grain.
    fn grains(
        ext: &SparseExtent,
        within: u64,
        len: u64,
        mut f: impl FnMut(u64, u64, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let g = ext.grain();
        let mut at = within;
        let end = within + len;
        while at < end {
            let grain = at / g;
            let in_grain = at % g;
            let n = (g - in_grain).min(end - at);
            f(grain, grain * g, in_grain, n)?;
            at += n;
        }
        Ok(())
    }

    pub fn map_read(&self, offset: u64, len: u64) -> Result<Vec<Piece<ReadTarget>>> {
        let mut out: Vec<Piece<ReadTarget>> = Vec::new();
        let contiguous = |a: &ReadTarget, b: &ReadTarget, alen: u64| match (a, b) {
            (ReadTarget::Zero, ReadTarget::Zero) | (ReadTarget::Parent, ReadTarget::Parent) => true,
            (
                ReadTarget::Host {
                    file: f1,
                    offset: o1,
                },
                ReadTarget::Host {
                    file: f2,
                    offset: o2,
                },
            ) => f1 == f2 && o1 + alen == *o2,
            _ => false,
        };
        let has_parent = self.parent.is_some();
        self.walk(offset, len, |i, within, n| {
            let e = &self.extents[i];
            let pos = e.start + within - offset;
            match &e.backing {
                Backing::Flat { file, base } => push_merged(
                    &mut out,
                    Piece {
                        pos,
                        len: n,
                        target: ReadTarget::Host {
                            file: *file,
                            offset: base + within,
                        },
                    },
                    contiguous,
                ),
                Backing::Zero => push_merged(
                    &mut out,
                    Piece {
                        pos,
                        len: n,
                        target: ReadTarget::Zero,
                    },
                    contiguous,
                ),
                Backing::Sparse { file, ext } => {
                    Self::grains(ext, within, n, |grain, gstart, in_grain, gl| {
                        let target = match ext.lookup(grain)? {
                            GrainMap::Unallocated if has_parent => ReadTarget::Parent,
                            GrainMap::Unallocated | GrainMap::Zero => ReadTarget::Zero,
                            GrainMap::Data(host) => ReadTarget::Host {
                                file: *file,
                                offset: host + in_grain,
                            },
                            GrainMap::Compressed(marker) => ReadTarget::Compressed {
                                extent: i,
                                marker,
                                within: in_grain,
                            },
                        };
                        let p = e.start + gstart + in_grain - offset;
                        push_merged(
                            &mut out,
                            Piece {
                                pos: p,
                                len: gl,
                                target,
                            },
                            contiguous,
                        );
                        Ok(())
                    })?;
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    pub fn map_write(&self, offset: u64, len: u64) -> Result<Vec<Piece<WriteTarget>>> {
        self.check_writable()?;
        let mut out: Vec<Piece<WriteTarget>> = Vec::new();
        let contiguous = |a: &WriteTarget, b: &WriteTarget, alen: u64| match (a, b) {
            (
                WriteTarget::Host {
                    file: f1,
                    offset: o1,
                },
                WriteTarget::Host {
                    file: f2,
                    offset: o2,
                },
            ) => f1 == f2 && o1 + alen == *o2,
            _ => false,
        };
        let has_parent = self.parent.is_some();
        self.walk(offset, len, |i, within, n| {
            let e = &self.extents[i];
            let pos = e.start + within - offset;
            match &e.backing {
                Backing::Flat { file, base } => push_merged(
                    &mut out,
                    Piece {
                        pos,
                        len: n,
                        target: WriteTarget::Host {
                            file: *file,
                            offset: base + within,
                        },
                    },
                    contiguous,
                ),
                Backing::Zero => {
                    return Err(StorageError::ReadOnly(format!(
                        "the ZERO extent of {}",
                        self.name
                    )))
                }
                Backing::Sparse { file, ext } => {
                    Self::grains(ext, within, n, |grain, gstart, in_grain, gl| {
                        let target = match ext.lookup(grain)? {
                            GrainMap::Data(host) => WriteTarget::Host {
                                file: *file,
                                offset: host + in_grain,
                            },
                            GrainMap::Compressed(_) => {
                                return Err(StorageError::Unsupported(format!(
                                    "writing compressed grains of {}",
                                    self.name
                                )))
                            }
                            GrainMap::Unallocated if has_parent => WriteTarget::Cow {
                                extent: i,
                                grain,
                                grain_start: e.start + gstart,
                            },
                            GrainMap::Unallocated | GrainMap::Zero => {
                                let (host, _) = ext.allocate(grain)?;
                                WriteTarget::Host {
                                    file: *file,
                                    offset: host + in_grain,
                                }
                            }
                        };
                        let p = e.start + gstart + in_grain - offset;
                        push_merged(
                            &mut out,
                            Piece {
                                pos: p,
                                len: gl,
                                target,
                            },
                            contiguous,
                        );
                        Ok(())
                    })?;
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Plans zeroing a range; whole grains are unmapped here (their old data offsets go to
    /// `punch`, for the caller to deallocate), partial ones become pieces.
    pub fn map_zero(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
        punch: &mut Vec<(usize, u64, u64)>,
    ) -> Result<Vec<Piece<ZeroTarget>>> {
        self.check_writable()?;
        let mut out = Vec::new();
        let has_parent = self.parent.is_some();
        self.walk(offset, len, |i, within, n| {
            let e = &self.extents[i];
            let pos = e.start + within - offset;
            match &e.backing {
                Backing::Flat { file, base } => out.push(Piece {
                    pos,
                    len: n,
                    target: ZeroTarget::Host {
                        file: *file,
                        offset: base + within,
                        unmap,
                    },
                }),
                Backing::Zero => {}
                Backing::Sparse { file, ext } => {
                    Self::grains(ext, within, n, |grain, gstart, in_grain, gl| {
                        let whole = in_grain == 0 && gl == ext.grain();
                        let state = ext.lookup(grain)?;
                        let target = match state {
                            GrainMap::Compressed(_) => {
                                return Err(StorageError::Unsupported(format!(
                                    "writing compressed grains of {}",
                                    self.name
                                )))
                            }
                            _ if whole && (!has_parent || ext.has_zeroed_grains()) => {
                                if let Some(old) = ext.deallocate(grain, true)? {
                                    punch.push((*file, old, ext.grain()));
                                }
                                ZeroTarget::Nothing
                            }
                            GrainMap::Data(host) => ZeroTarget::Host {
                                file: *file,
                                offset: host + in_grain,
                                unmap: false,
                            },
                            GrainMap::Zero => ZeroTarget::Nothing,
                            GrainMap::Unallocated if !has_parent => ZeroTarget::Nothing,
                            GrainMap::Unallocated if whole => {
                                // A fresh grain reads as zeros and hides the parent's data.
                                let _guard = crate::sync::lock(&self.cow);
                                ext.allocate(grain)?;
                                ZeroTarget::Nothing
                            }
                            GrainMap::Unallocated => ZeroTarget::Cow {
                                extent: i,
                                grain,
                                grain_start: e.start + gstart,
                            },
                        };
                        if target != ZeroTarget::Nothing {
                            out.push(Piece {
                                pos: e.start + gstart + in_grain - offset,
                                len: gl,
                                target,
                            });
                        }
                        Ok(())
                    })?;
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(StorageError::ReadOnly(self.name.clone()))
        }
    }

    /// The sparse extent `i`.
    pub fn sparse(&self, i: usize) -> Result<&SparseExtent> {
        match self.extents.get(i).map(|e| &e.backing) {
            Some(Backing::Sparse { ext, .. }) => Ok(ext),
            _ => Err(StorageError::corrupt(
                &self.name,
                format!("extent {i} is not sparse"),
            )),
        }
    }

    /// Gives the disk a new content ID on its first write, as VMware and qemu do, so that
    /// delta disks made from it notice the change. The CID is patched in place (same length,
    /// one sector), so the descriptor is never torn.
    pub fn touch(&self) -> Result<()> {
        if self.cid_updated.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let place = &self.desc_place;
        let mut text = vec![0u8; place.len as usize];
        place.file.read_exact_at(place.offset, &mut text)?;
        let at = text.windows(5).position(|w| w == b"\nCID=").map(|p| p + 5);
        let Some(at) =
            at.filter(|&a| a + 8 <= text.len() && text[a..a + 8].iter().all(u8::is_ascii_hexdigit))
        else {
            tracing::debug!(image = %self.name, "descriptor has no 8-digit CID line; not updating it");
            return Ok(());
        };
        let mut cid = fastrand::u32(..);
        if cid == NO_PARENT_CID {
            cid = 1;
        }
        place
            .file
            .write_all_at(place.offset + at as u64, format!("{cid:08x}").as_bytes())
    }

    pub(crate) fn flush(&self) -> Result<()> {
        for e in &self.extents {
            if let Backing::Sparse { ext, .. } = &e.backing {
                ext.write_back()?;
            }
        }
        if self.writable {
            for f in &self.files {
                f.sync_data()?;
            }
            if self.cid_updated.load(Ordering::Acquire) {
                self.desc_place.file.sync_data()?;
            }
        }
        Ok(())
    }

    fn status(&self, offset: u64, len: u64) -> Result<Extent> {
        let size = self.size;
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Err(StorageError::OutOfRange { offset, len, size });
        }
        let i = self
            .extent_at(offset)
            .ok_or(StorageError::OutOfRange { offset, len, size })?;
        let e = &self.extents[i];
        let within = offset - e.start;
        let max = (e.len - within).min(end - offset);
        let found = |kind, n| {
            Ok(Extent {
                offset,
                len: n,
                kind,
            })
        };
        match &e.backing {
            Backing::Zero => found(ExtentKind::Zero, max),
            Backing::Flat { file, base } => {
                let f = &self.files[*file];
                let s = f.block_status(base + within, max)?;
                found(
                    if s.kind == ExtentKind::Data {
                        ExtentKind::Data
                    } else {
                        ExtentKind::Zero
                    },
                    s.len.min(max),
                )
            }
            Backing::Sparse { ext, .. } => {
                let g = ext.grain();
                let classify = |m: GrainMap| match m {
                    GrainMap::Data(_) | GrainMap::Compressed(_) => 0u8,
                    GrainMap::Zero => 1,
                    GrainMap::Unallocated => 2,
                };
                let first = classify(ext.lookup(within / g)?);
                let mut n = (g - within % g).min(max);
                let mut scanned = 1;
                while n < max
                    && scanned < STATUS_SCAN_GRAINS
                    && classify(ext.lookup((within + n) / g)?) == first
                {
                    n = (n + g).min(max);
                    scanned += 1;
                }
                match (first, &self.parent) {
                    (0, _) => found(ExtentKind::Data, n),
                    (1, _) => found(ExtentKind::Zero, n),
                    (_, None) => found(ExtentKind::Unallocated, n),
                    (_, Some(p)) if offset >= p.size() => found(ExtentKind::Unallocated, n),
                    (_, Some(p)) => {
                        let s = p.block_status(offset, n.min(p.size() - offset))?;
                        found(s.kind, s.len)
                    }
                }
            }
        }
    }
}

impl VmdkImage {
    /// The parsed descriptor.
    pub fn descriptor(&self) -> &Descriptor {
        &self.inner.descriptor
    }

    /// The parent image of a delta disk.
    pub fn parent(&self) -> Option<&Arc<dyn Image>> {
        self.inner.parent.as_ref()
    }

    fn chain(&self) -> Vec<serde_json::Value> {
        let d = &self.inner.descriptor;
        let mut chain = vec![json!({
            "file": self.inner.name,
            "cid": format!("{:08x}", d.cid),
            "parent-cid": format!("{:08x}", d.parent_cid),
        })];
        if let Some(p) = &self.inner.parent {
            if let Ok(info) = p.info() {
                match info.format_specific.get("chain") {
                    Some(serde_json::Value::Array(rest)) => chain.extend(rest.iter().cloned()),
                    _ => chain.push(json!({ "file": info.filename, "format": info.format })),
                }
            }
        }
        chain
    }
}

impl Drop for VmdkImage {
    fn drop(&mut self) {
        if self.inner.writable {
            if let Err(e) = self.inner.flush() {
                tracing::warn!(image = %self.inner.name, error = %e, "flushing vmdk metadata on close failed");
            }
        }
    }
}

impl BlockDevice for VmdkImage {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::FLUSH | Capabilities::BLOCK_STATUS;
        if self.inner.writable {
            caps |= Capabilities::WRITE | Capabilities::DISCARD | Capabilities::WRITE_ZEROES;
        }
        caps
    }

    fn alignment(&self) -> usize {
        self.inner
            .files
            .iter()
            .map(|f| f.alignment())
            .max()
            .unwrap_or(1)
    }

    fn open_queue(&self, opts: &QueueOptions) -> Result<Box<dyn IoQueue>> {
        crate::format::vmdk::queue::open_queue(self.inner.clone(), opts)
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    fn resize(&self, _new_size: u64) -> Result<()> {
        Err(StorageError::Unsupported("resizing vmdk images".into()))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.inner.status(offset, len)
    }
}

impl Image for VmdkImage {
    fn format(&self) -> ImageFormat {
        ImageFormat::Vmdk
    }

    fn info(&self) -> Result<ImageInfo> {
        let inner = &self.inner;
        let d = &inner.descriptor;
        let mut actual = 0;
        let mut seen = Vec::new();
        for f in inner
            .files
            .iter()
            .chain(std::iter::once(&inner.desc_place.file))
        {
            if seen.iter().any(|n: &String| n == f.name()) {
                continue;
            }
            seen.push(f.name().to_string());
            actual += f.allocated_bytes()?;
        }
        let extents: Vec<serde_json::Value> = d
            .extents
            .iter()
            .zip(&inner.extents)
            .map(|(line, placed)| {
                let mut v = json!({
                    "type": match line.kind { ExtentType::Flat => "FLAT", ExtentType::Sparse => "SPARSE", ExtentType::Zero => "ZERO" },
                    "file": line.file,
                    "virtual-size": placed.len,
                });
                if let Backing::Sparse { ext, .. } = &placed.backing {
                    v["grain-size"] = json!(ext.grain());
                    v["compressed"] = json!(ext.header().compressed());
                    v["version"] = json!(ext.header().version);
                    v["zeroed-grain"] = json!(ext.header().zeroed_grain());
                }
                if let Backing::Flat { base, .. } = &placed.backing {
                    v["offset"] = json!(base);
                }
                v
            })
            .collect();
        let mut fs = BTreeMap::new();
        fs.insert("subformat".into(), json!(d.create_type.name()));
        fs.insert("cid".into(), json!(format!("{:08x}", d.cid)));
        fs.insert("parent-cid".into(), json!(format!("{:08x}", d.parent_cid)));
        if let Some(h) = &d.parent_hint {
            fs.insert("parent".into(), json!(h));
        }
        if let Some(a) = d.ddb("ddb.adapterType") {
            fs.insert("adapter-type".into(), json!(a));
        }
        if let Some(h) = d.ddb("ddb.virtualHWVersion") {
            fs.insert("hwversion".into(), json!(h));
        }
        fs.insert("extents".into(), json!(extents));
        fs.insert("chain".into(), json!(self.chain()));
        Ok(ImageInfo {
            filename: inner.name.clone(),
            format: ImageFormat::Vmdk,
            virtual_size: inner.size,
            actual_size: actual,
            format_specific: fs,
        })
    }
}

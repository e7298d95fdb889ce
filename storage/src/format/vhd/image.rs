//! An open VHD: footer, optional BAT, optional parent; its [`BlockDevice`] and [`Image`] faces.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_json::json;

use crate::device::{Extent, ExtentKind, SharedFile};
use crate::error::{Result, StorageError};
use crate::format::mapped::{block_table_status, BlockClass, BlockMap};
use crate::format::vhd::dynamic::DynamicHeader;
use crate::format::vhd::footer::Footer;
use crate::format::vhd::table::{BlockState, Table};
use crate::format::{Image, ImageFormat, ImageInfo};
use crate::io::blocking::BlockingQueue;

/// The shared state of an open VHD.
#[derive(Debug)]
pub(crate) struct Vhd {
    pub name: String,
    pub file: SharedFile,
    pub footer: Footer,
    pub dynamic: Option<DynamicHeader>,
    /// The BAT; `None` for a fixed disk.
    pub table: Option<Table>,
    pub size: u64,
    pub parent: Option<Arc<dyn Image>>,
    /// The parent's path as found through its locator.
    pub parent_path: Option<String>,
    pub writable: bool,
    /// Serialises copy-on-write of sectors over the parent; holds a reader of the parent.
    pub cow: Mutex<Option<BlockingQueue>>,
}

impl Vhd {
    /// Block status: see [`BlockMap::status`].
    pub(crate) fn block_status_of(&self, offset: u64, len: u64) -> Result<Extent> {
        let v = self;
        let Some(t) = &v.table else {
            let end = offset.saturating_add(len).min(v.size);
            if offset >= end {
                return Err(StorageError::OutOfRange {
                    offset,
                    len,
                    size: v.size,
                });
            }
            let s = v.file.block_status(offset, end - offset)?;
            let kind = if s.kind == ExtentKind::Data {
                ExtentKind::Data
            } else {
                ExtentKind::Zero
            };
            return Ok(Extent {
                offset,
                len: s.len.min(end - offset),
                kind,
            });
        };
        // A differencing block's absent sectors come from the parent: no host-hole shortcut.
        let class = |b| {
            Ok(match t.lookup(b)? {
                BlockState::At(_) if t.differencing() => BlockClass::Data(None),
                BlockState::At(at) => BlockClass::Data(Some(at + t.bitmap_bytes())),
                BlockState::Unallocated => BlockClass::Absent,
            })
        };
        block_table_status(
            offset,
            len,
            v.size,
            t.block_size(),
            class,
            v.parent.as_ref(),
            &v.file,
        )
    }
}

/// An open VHD image. See the module documentation of [`crate::format::vhd`].
#[derive(Debug)]
pub struct VhdImage {
    pub(crate) inner: Arc<Vhd>,
}

impl VhdImage {
    /// The footer.
    pub fn footer(&self) -> &Footer {
        &self.inner.footer
    }

    /// The dynamic header of a dynamic or differencing disk.
    pub fn dynamic_header(&self) -> Option<&DynamicHeader> {
        self.inner.dynamic.as_ref()
    }

    /// The parent of a differencing disk.
    pub fn parent(&self) -> Option<&Arc<dyn Image>> {
        self.inner.parent.as_ref()
    }

    fn chain(&self) -> Vec<serde_json::Value> {
        let v = &self.inner;
        let mut chain = vec![json!({
            "file": v.name,
            "subformat": v.footer.disk_type.name(),
        })];
        if let Some(p) = &v.parent {
            if let Ok(info) = p.info() {
                match info.format_specific.get("chain") {
                    Some(serde_json::Value::Array(rest)) => chain.extend(rest.iter().cloned()),
                    _ => chain.push(json!({ "file": info.filename })),
                }
            }
        }
        chain
    }
}

impl Drop for VhdImage {
    fn drop(&mut self) {
        if self.inner.writable {
            if let Err(e) = self.inner.flush() {
                tracing::warn!(image = %self.inner.name, error = %e, "flushing VHD metadata on close failed");
            }
        }
    }
}

crate::format::mapped::mapped_block_device!(VhdImage, "VHD");

impl Image for VhdImage {
    fn format(&self) -> ImageFormat {
        ImageFormat::Vhd
    }

    fn info(&self) -> Result<ImageInfo> {
        let v = &self.inner;
        let f = &v.footer;
        let mut fs = BTreeMap::new();
        fs.insert("subformat".into(), json!(f.disk_type.name()));
        fs.insert(
            "creator".into(),
            json!(String::from_utf8_lossy(&f.creator_app).trim_end_matches('\0')),
        );
        fs.insert(
            "geometry".into(),
            json!(format!(
                "{}/{}/{}",
                f.geometry.cylinders, f.geometry.heads, f.geometry.sectors
            )),
        );
        fs.insert("current-size".into(), json!(f.current_size));
        fs.insert(
            "size-from".into(),
            json!(if f.sized_by_current_size() {
                "current_size"
            } else {
                "geometry"
            }),
        );
        fs.insert("unique-id".into(), json!(hex(&f.unique_id)));
        if let (Some(t), Some(h)) = (&v.table, &v.dynamic) {
            fs.insert("cluster-size".into(), json!(t.block_size()));
            fs.insert("allocated-blocks".into(), json!(t.allocated_blocks()?));
            fs.insert("bat-entries".into(), json!(h.max_table_entries));
            if f.disk_type == crate::format::vhd::footer::DiskType::Differencing {
                fs.insert(
                    "parent".into(),
                    json!(v
                        .parent_path
                        .clone()
                        .unwrap_or_else(|| h.parent_name.clone())),
                );
                fs.insert("parent-id".into(), json!(hex(&h.parent_id)));
                fs.insert("chain".into(), json!(self.chain()));
            }
        }
        Ok(ImageInfo {
            filename: v.name.clone(),
            format: ImageFormat::Vhd,
            virtual_size: v.size,
            actual_size: v.file.allocated_bytes()?,
            format_specific: fs,
        })
    }
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

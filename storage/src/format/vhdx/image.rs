//! An open VHDX: header state, metadata, BAT, optional parent; its [`BlockDevice`] and [`Image`]
//! faces, and the session protocol for writing.
//!
//! Writing follows the specification's order: before the first change of a session the header
//! is updated (new file- and data-write GUIDs and a fresh log GUID, written to the other slot
//! with the next sequence number, flushed); each flush syncs the data, writes the dirty BAT pages
//! as a log entry, flushes, writes them in place and flushes; closing the image updates the
//! header once more with an empty log GUID, so other readers see a clean log.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::json;

use crate::device::{Extent, SharedFile};
use crate::error::Result;
use crate::format::mapped::{block_table_status, BlockClass};
use crate::format::vhdx::bat::{Bat, Payload};
use crate::format::vhdx::guid::Guid;
use crate::format::vhdx::header::{update_header, Header};
use crate::format::vhdx::log::LogWriter;
use crate::format::vhdx::metadata::Metadata;
use crate::format::{Image, ImageFormat, ImageInfo};

/// The header and log as a writing session changes them.
#[derive(Debug)]
pub(crate) struct Session {
    pub header: Header,
    pub slot: usize,
    pub log: LogWriter,
    /// The header was updated for this session (first change made).
    pub touched: bool,
}

/// The shared state of an open VHDX.
#[derive(Debug)]
pub(crate) struct Vhdx {
    pub name: String,
    pub file: SharedFile,
    pub meta: Metadata,
    pub bat: Bat,
    pub size: u64,
    pub parent: Option<Arc<dyn Image>>,
    pub parent_path: Option<String>,
    pub writable: bool,
    /// Whether a log was replayed when the image was opened.
    pub replayed: usize,
    pub session: Mutex<Session>,
}

impl Vhdx {
    /// Locks the header and log; a poisoned lock fails the image (`crate::sync`).
    fn session(&self) -> Result<MutexGuard<'_, Session>> {
        crate::sync::lock_meta(&self.session, format_args!("VHDX image {}", self.name))
    }

    /// Starts a writing session on the first change (see the module documentation).
    pub fn touch(&self) -> Result<()> {
        let mut s = self.session()?;
        if s.touched {
            return Ok(());
        }
        let mut h = s.header.clone();
        h.file_write_guid = Guid::random();
        h.data_write_guid = Guid::random();
        h.log_guid = Guid::random();
        let slot = update_header(self.file.as_ref(), &mut h, s.slot)?;
        s.header = h;
        s.slot = slot;
        s.touched = true;
        Ok(())
    }

    /// Syncs data, then logs and writes the dirty BAT pages.
    pub fn flush_metadata(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut s = self.session()?;
        self.file.sync_data()?;
        let pages = self.bat.take_dirty()?;
        if pages.is_empty() {
            return Ok(());
        }
        let guid = s.header.log_guid;
        for group in pages.chunks(s.log.max_pages()) {
            let refs: Vec<(u64, &[u8])> = group.iter().map(|(o, p)| (*o, p.as_slice())).collect();
            s.log.write_entry(self.file.as_ref(), &guid, &refs)?;
            for (at, page) in group {
                self.file.write_all_at(*at, page)?;
            }
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Ends a writing session: flushes and clears the log GUID.
    fn close(&self) -> Result<()> {
        self.flush_metadata()?;
        let mut s = self.session()?;
        if !s.touched {
            return Ok(());
        }
        let mut h = s.header.clone();
        h.log_guid = Guid::ZERO;
        let slot = update_header(self.file.as_ref(), &mut h, s.slot)?;
        s.header = h;
        s.slot = slot;
        s.touched = false;
        Ok(())
    }
}

impl Vhdx {
    /// Block status: see [`BlockMap::status`].
    pub(crate) fn block_status_of(&self, offset: u64, len: u64) -> Result<Extent> {
        let v = self;
        let bat = &v.bat;
        let diff = bat.differencing();
        let class = |b| {
            Ok(match bat.lookup(b)? {
                Payload::Full(at) => BlockClass::Data(Some(at)),
                Payload::Partial(_) => BlockClass::Data(None),
                Payload::Zero | Payload::Unmapped => BlockClass::Zero,
                Payload::Undefined if !diff => BlockClass::Zero,
                Payload::NotPresent | Payload::Undefined => BlockClass::Absent,
            })
        };
        block_table_status(
            offset,
            len,
            v.size,
            bat.block_size(),
            class,
            v.parent.as_ref(),
            &v.file,
        )
    }
}

/// An open VHDX image. See the module documentation of [`crate::format::vhdx`].
#[derive(Debug)]
pub struct VhdxImage {
    pub(crate) inner: Arc<Vhdx>,
}

impl VhdxImage {
    /// The metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.inner.meta
    }

    /// The current header.
    pub fn header(&self) -> Result<Header> {
        Ok(self.inner.session()?.header.clone())
    }

    /// The parent of a differencing disk.
    pub fn parent(&self) -> Option<&Arc<dyn Image>> {
        self.inner.parent.as_ref()
    }

    /// Log entries replayed when the image was opened.
    pub fn replayed_entries(&self) -> usize {
        self.inner.replayed
    }
}

impl Drop for VhdxImage {
    fn drop(&mut self) {
        if self.inner.writable {
            if let Err(e) = self.inner.close() {
                tracing::warn!(image = %self.inner.name, error = %e, "closing the VHDX failed");
            }
        }
    }
}

crate::format::mapped::mapped_block_device!(VhdxImage, "VHDX");

impl Image for VhdxImage {
    fn format(&self) -> ImageFormat {
        ImageFormat::Vhdx
    }

    fn info(&self) -> Result<ImageInfo> {
        let v = &self.inner;
        let m = &v.meta;
        let h = v.session()?.header.clone();
        let mut fs = BTreeMap::new();
        let sub = if m.has_parent {
            "differencing"
        } else if m.leave_blocks_allocated {
            "fixed"
        } else {
            "dynamic"
        };
        fs.insert("subformat".into(), json!(sub));
        fs.insert("cluster-size".into(), json!(m.block_size));
        fs.insert("logical-sector-size".into(), json!(m.logical_sector));
        fs.insert("physical-sector-size".into(), json!(m.physical_sector));
        fs.insert("log-size".into(), json!(h.log_length));
        fs.insert("allocated-blocks".into(), json!(v.bat.allocated_blocks()?));
        fs.insert("disk-id".into(), json!(m.page83.to_string()));
        fs.insert(
            "data-write-guid".into(),
            json!(h.data_write_guid.to_string()),
        );
        if v.replayed > 0 {
            fs.insert("log-entries-replayed".into(), json!(v.replayed));
        }
        if m.has_parent {
            fs.insert(
                "parent".into(),
                json!(v.parent_path.clone().unwrap_or_default()),
            );
        }
        Ok(ImageInfo {
            filename: v.name.clone(),
            format: ImageFormat::Vhdx,
            virtual_size: v.size,
            actual_size: v.file.allocated_bytes()?,
            format_specific: fs,
        })
    }
}

//! Writing compressed qcow2 images as a stream of clusters (`convert -c`), the
//! [`CompressedWriter`] of the format layer.
//!
//! Each cluster is compressed (deflate with QEMU's 4 KiB window, or zstd) and packed right after
//! the previous one, several to a host cluster and spilling into the next one when it is
//! adjacent, as QEMU packs them; every host cluster a compressed cluster touches holds one
//! reference for it. Clusters that do not shrink are stored uncompressed; all-zero clusters are
//! left unallocated. Packed bytes are buffered and written in large runs.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::device::BlockDevice;
use crate::error::{Result, StorageError};
use crate::format::CompressedWriter;
use crate::io::engine::{EngineChoice, FileDevice};
use crate::io::file::{CacheMode, FileOptions};
use crate::util::is_zero;

use super::codec;
use super::create::{create, CreateOptions};
use super::entry::{COMPRESSED, COPIED};
use super::{Qcow2Image, Qcow2Options};

/// Bytes buffered before they are written.
const BUFFER: usize = 4 << 20;

/// See the module documentation.
#[derive(Debug)]
pub struct Qcow2CompressedWriter {
    img: Arc<Qcow2Image>,
    cs: u64,
    size: u64,
    next_unit: u64,
    /// Host byte offset where the next compressed cluster goes (0: start a new host cluster).
    tail: u64,
    /// Bytes waiting to be written, starting at host offset `buf_at`.
    buf: Vec<u8>,
    buf_at: u64,
}

/// Creates `path` with `options` and returns a writer of compressed clusters into it.
pub fn create_compressed(
    path: &Path,
    size: u64,
    options: &BTreeMap<String, String>,
) -> Result<Box<dyn CompressedWriter>> {
    let opts = CreateOptions::from_map(options)?;
    if opts.backing_file.is_some() {
        return Err(StorageError::InvalidInput(
            "Compressed images are written without a backing file".into(),
        ));
    }
    create(path, size, &opts)?;
    let file = FileDevice::open(
        path,
        FileOptions {
            read_only: false,
            cache: CacheMode::Writeback,
        },
        EngineChoice::Auto,
    )?;
    let img = super::open(file, &Qcow2Options::default())?;
    Ok(Box::new(Qcow2CompressedWriter {
        cs: img.cluster_size(),
        size: img.size(),
        img,
        next_unit: 0,
        tail: 0,
        buf: Vec::new(),
        buf_at: 0,
    }))
}

impl Qcow2CompressedWriter {
    fn write_buffer(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.img.file().write_all_at(self.buf_at, &self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }

    fn append(&mut self, at: u64, bytes: &[u8]) -> Result<()> {
        if self.buf.is_empty() || self.buf_at + self.buf.len() as u64 != at {
            self.write_buffer()?;
            self.buf_at = at;
        }
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= BUFFER {
            self.write_buffer()?;
        }
        Ok(())
    }

    /// Places `len` compressed bytes; returns their host offset, with the references taken.
    fn place(&mut self, len: u64) -> Result<u64> {
        let cs = self.cs;
        let (_wb, mut m) = self.img.control()?;
        let room = if self.tail == 0 {
            0
        } else {
            cs - self.tail % cs
        };
        if self.tail != 0 && self.tail % cs != 0 && len <= room {
            let at = self.tail;
            m.update_refcount_blocking(at / cs, 1)?;
            self.tail = at + len;
            return Ok(at);
        }
        if self.tail != 0 && self.tail % cs != 0 {
            // Spill into the next cluster if it comes out adjacent.
            let (next, _) = m.alloc_clusters_blocking(1)?;
            if next == self.tail.next_multiple_of(cs) {
                let at = self.tail;
                m.update_refcount_blocking(at / cs, 1)?;
                self.tail = at + len;
                return Ok(at);
            }
            self.tail = next + len;
            return Ok(next);
        }
        let (next, _) = m.alloc_clusters_blocking(1)?;
        self.tail = next + len;
        Ok(next)
    }
}

impl CompressedWriter for Qcow2CompressedWriter {
    fn unit(&self) -> u64 {
        self.cs
    }

    fn write_unit(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let cs = self.cs;
        if offset % cs != 0 || offset < self.next_unit || offset >= self.size {
            return Err(StorageError::InvalidInput(format!(
                "Compressed units must be written at increasing multiples of {cs} inside the image (got {offset})"
            )));
        }
        if data.len() as u64 > cs || (data.len() as u64) < cs.min(self.size - offset) {
            return Err(StorageError::InvalidInput(format!(
                "A compressed unit at {offset} must be {} bytes long (got {})",
                cs.min(self.size - offset),
                data.len()
            )));
        }
        self.next_unit = offset + cs;
        if is_zero(data) {
            return Ok(());
        }
        let mut cluster = data.to_vec();
        cluster.resize(cs as usize, 0);
        let codec_type = self.img.shared.codec;
        let compressed = codec::compress(codec_type, &cluster, cs as usize - 512)?;
        let (entry, host_bytes) = match compressed {
            Some(c) => {
                let at = self.place(c.len() as u64)?;
                let geo = self.img.shared.geo;
                let extra = ((at + c.len() as u64 - 1) >> 9) - (at >> 9);
                (
                    COMPRESSED | (extra << geo.csize_shift()) | at,
                    Some((at, c)),
                )
            }
            None => {
                let (host, _) = self.img.control()?.1.alloc_clusters_blocking(1)?;
                self.write_buffer()?;
                self.img.file().write_all_at(host, &cluster)?;
                (host | COPIED, None)
            }
        };
        if let Some((at, c)) = host_bytes {
            self.append(at, &c)?;
        }
        let (_wb, mut m) = self.img.control()?;
        let (l1i, l2i) = m.geo.indices(offset);
        let slot = m.writable_l2_blocking(l1i)?;
        // Uncompressed clusters in extended L2 entries: every subcluster allocated.
        let bitmap = if m.geo.extended && entry & COMPRESSED == 0 {
            u64::from(u32::MAX)
        } else {
            0
        };
        m.set_l2_raw(slot, l2i, entry, bitmap);
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        self.write_buffer()?;
        self.img.flush()?;
        let (_wb, mut m) = self.img.control()?;
        m.write_everything()
    }
}

//! Writing streamOptimized extents: one pass, grains compressed with deflate (zlib framing),
//! each behind a grain marker; a grain table (behind its marker) after the grains it maps; at
//! the end the grain directory, the footer (a header copy that holds the directory's offset)
//! and the end-of-stream marker. The header itself says the directory is in the footer
//! (`gdOffset` all ones), which is the layout ESXi and OVF tools import.
//!
//! ```text
//! header (v3) | descriptor | pad to 64 KiB | {grain marker+data}* [GT marker, GT]* ... |
//! GD marker | GD | footer marker | footer | EOS marker
//! ```
//!
//! The file is written through a buffered writer and synced once by `finish`. A stream that is
//! dropped unfinished has no footer and is refused on open as incomplete.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use flate2::write::ZlibEncoder;
use flate2::Compression;

use crate::error::{Result, StorageError};
use crate::format::raw::sync_parent_dir;
use crate::format::vmdk::create::{
    create_new, new_descriptor, VmdkCreateOptions, GRAIN_SECTORS, GTES_PER_GT,
};
use crate::format::vmdk::descriptor::{Access, ExtentLine, ExtentType, Subformat};
use crate::format::vmdk::header::{
    marker, SparseHeader, COMPRESS_DEFLATE, FLAG_COMPRESSED, FLAG_MARKERS, FLAG_NL_DETECT,
    GD_AT_END, MARKER_EOS, MARKER_FOOTER, MARKER_GD, MARKER_GT, SECTOR,
};
use crate::format::CompressedWriter;

/// Sectors before the first grain (header, descriptor, padding): one grain, as VMware writes.
const STREAM_OVERHEAD: u64 = GRAIN_SECTORS;

/// A streamOptimized writer. See the module documentation.
pub struct StreamWriter {
    path: PathBuf,
    out: BufWriter<File>,
    /// Bytes written so far (always a multiple of 512).
    pos: u64,
    header: SparseHeader,
    size: u64,
    gd: Vec<u32>,
    table: Option<(u32, Vec<u32>)>,
    next_offset: u64,
    level: Compression,
    scratch: Vec<u8>,
    padded: Vec<u8>,
}

impl std::fmt::Debug for StreamWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamWriter")
            .field("path", &self.path)
            .field("pos", &self.pos)
            .finish()
    }
}

impl StreamWriter {
    /// Creates the file and writes the header and descriptor.
    pub fn create(path: &Path, size: u64, opts: &VmdkCreateOptions) -> Result<StreamWriter> {
        if size == 0 {
            return Err(StorageError::InvalidInput(
                "Image size must be greater than zero".into(),
            ));
        }
        let size = size.div_ceil(SECTOR) * SECTOR;
        let name = path
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut dopts = opts.clone();
        dopts.subformat = Subformat::StreamOptimized;
        let desc = new_descriptor(
            &dopts,
            size,
            vec![ExtentLine {
                access: Access::ReadWrite,
                sectors: size / SECTOR,
                kind: ExtentType::Sparse,
                file: name,
                offset: 0,
            }],
        );
        let text = desc.render();
        let desc_sectors = (text.len() as u64).div_ceil(SECTOR).max(1);
        if 1 + desc_sectors > STREAM_OVERHEAD {
            return Err(StorageError::InvalidInput(
                "the descriptor is too large".into(),
            ));
        }
        let header = SparseHeader {
            version: 3,
            flags: FLAG_NL_DETECT | FLAG_COMPRESSED | FLAG_MARKERS,
            capacity: size / SECTOR,
            grain_sectors: GRAIN_SECTORS,
            descriptor_offset: 1,
            descriptor_size: desc_sectors,
            gtes_per_gt: GTES_PER_GT,
            rgd_offset: 0,
            gd_offset: GD_AT_END,
            overhead: STREAM_OVERHEAD,
            unclean_shutdown: false,
            compress_algorithm: COMPRESS_DEFLATE,
        };
        let file = create_new(path)?;
        let mut w = StreamWriter {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(1 << 20, file),
            pos: 0,
            gd: vec![0u32; header.gd_entries() as usize],
            header,
            size,
            table: None,
            next_offset: 0,
            level: Compression::new(6),
            scratch: Vec::new(),
            padded: Vec::new(),
        };
        let result = (|| {
            let h = w.header.to_bytes();
            w.put(&h)?;
            w.put(text.as_bytes())?;
            w.pad_to((STREAM_OVERHEAD * SECTOR) as usize)
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(w)
    }

    fn io_err(&self, e: std::io::Error) -> StorageError {
        StorageError::io(format!("Writing {}", self.path.display()), e)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes).map_err(|e| self.io_err(e))?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Pads with zeros up to the next multiple of 512 (or up to `upto` bytes if larger).
    fn pad_to(&mut self, upto: usize) -> Result<()> {
        let target = (self.pos.div_ceil(SECTOR) * SECTOR).max(upto as u64);
        let zeros = vec![0u8; (target - self.pos) as usize];
        self.put(&zeros)
    }

    fn sector(&self) -> Result<u32> {
        u32::try_from(self.pos / SECTOR).map_err(|_| {
            StorageError::OutOfSpace(
                "a streamOptimized vmdk cannot exceed 2 TiB of compressed data".into(),
            )
        })
    }

    fn flush_table(&mut self) -> Result<()> {
        let Some((index, entries)) = self.table.take() else {
            return Ok(());
        };
        let gt_sectors = self.header.gt_sectors();
        self.put(&marker(gt_sectors, MARKER_GT))?;
        self.gd[index as usize] = self.sector()?;
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        self.put(&bytes)?;
        self.pad_to(0)
    }

    /// Writes one grain's already-compressed data (`compressed`, zlib framing).
    pub fn write_compressed(&mut self, offset: u64, compressed: &[u8]) -> Result<()> {
        self.check_offset(offset)?;
        let grain = self.header.grain_bytes();
        let g = offset / grain;
        let per = self.header.gtes_per_gt as u64;
        let index = (g / per) as u32;
        if self.table.as_ref().is_some_and(|(i, _)| *i != index) {
            self.flush_table()?;
        }
        let sector = self.sector()?;
        let mut head = [0u8; 12];
        head[0..8].copy_from_slice(&(offset / SECTOR).to_le_bytes());
        head[8..12].copy_from_slice(&(compressed.len() as u32).to_le_bytes());
        self.put(&head)?;
        self.put(compressed)?;
        self.pad_to(0)?;
        let table = self
            .table
            .get_or_insert_with(|| (index, vec![0u32; per as usize]));
        table.1[(g % per) as usize] = sector;
        self.next_offset = offset + grain;
        Ok(())
    }

    fn check_offset(&self, offset: u64) -> Result<()> {
        let grain = self.header.grain_bytes();
        if offset % grain != 0 || offset < self.next_offset || offset >= self.size {
            return Err(StorageError::InvalidInput(format!(
                "streamOptimized grains must be written in increasing, grain-aligned order inside the disk (offset {offset})"
            )));
        }
        Ok(())
    }

    /// Writes the directory, the footer and the end-of-stream marker, and syncs the file.
    pub fn finish_stream(mut self) -> Result<()> {
        let result = (|| {
            self.flush_table()?;
            let gd_sectors = self.header.gd_bytes().div_ceil(SECTOR);
            self.put(&marker(gd_sectors, MARKER_GD))?;
            let gd_sector = self.sector()?;
            let bytes: Vec<u8> = self.gd.iter().flat_map(|e| e.to_le_bytes()).collect();
            self.put(&bytes)?;
            self.pad_to(0)?;
            self.put(&marker(1, MARKER_FOOTER))?;
            let mut footer = self.header.clone();
            footer.gd_offset = gd_sector as u64;
            self.put(&footer.to_bytes())?;
            self.put(&marker(0, MARKER_EOS))?;
            self.out.flush().map_err(|e| self.io_err(e))?;
            self.out.get_ref().sync_all().map_err(|e| self.io_err(e))?;
            sync_parent_dir(&self.path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&self.path);
        }
        result
    }
}

/// Compresses one grain (zero-padded to the grain size) in zlib framing.
pub fn compress_grain(
    data: &[u8],
    grain: usize,
    level: Compression,
    out: &mut Vec<u8>,
    padded: &mut Vec<u8>,
) -> Result<()> {
    out.clear();
    let src: &[u8] = if data.len() < grain {
        padded.clear();
        padded.extend_from_slice(data);
        padded.resize(grain, 0);
        padded
    } else {
        data
    };
    let mut enc = ZlibEncoder::new(std::mem::take(out), level);
    enc.write_all(src)
        .map_err(|e| StorageError::io("Compressing a grain", e))?;
    *out = enc
        .finish()
        .map_err(|e| StorageError::io("Compressing a grain", e))?;
    Ok(())
}

impl CompressedWriter for StreamWriter {
    fn unit(&self) -> u64 {
        self.header.grain_bytes()
    }

    fn write_unit(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_offset(offset)?;
        let grain = self.header.grain_bytes() as usize;
        let want = (self.size - offset).min(grain as u64) as usize;
        if data.len() != want {
            return Err(StorageError::InvalidInput(format!(
                "a unit at {offset} must be {want} bytes long, not {}",
                data.len()
            )));
        }
        if crate::util::is_zero(data) {
            self.next_offset = offset + grain as u64;
            return Ok(());
        }
        let mut out = std::mem::take(&mut self.scratch);
        let mut padded = std::mem::take(&mut self.padded);
        compress_grain(data, grain, self.level, &mut out, &mut padded)?;
        let r = self.write_compressed(offset, &out);
        self.scratch = out;
        self.padded = padded;
        r
    }

    fn finish(self: Box<Self>) -> Result<()> {
        (*self).finish_stream()
    }
}

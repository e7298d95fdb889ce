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

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

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
    pool: Option<Compressors>,
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
            pool: None,
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

    /// Appends one grain's compressed data (zlib framing); `offset` was checked when the
    /// grain was submitted.
    fn append_grain(&mut self, offset: u64, compressed: &[u8]) -> Result<()> {
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
        Ok(())
    }

    /// Writes compressed grains that are ready, in order, until at most `keep` are in flight.
    fn drain(&mut self, keep: usize) -> Result<()> {
        while let Some(pool) = self.pool.as_mut() {
            let Some((offset, data)) = pool.next(keep)? else {
                break;
            };
            self.append_grain(offset, &data)?;
        }
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
            self.drain(0)?;
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

/// Bytes of a grain test-compressed to decide whether deflating it is worth the time.
const PROBE_BYTES: usize = 4096;

/// Compresses one grain (zero-padded to the grain size) in zlib framing.
///
/// Incompressible grains (random or already compressed data) are detected by deflating their
/// first 4 KiB (at the same level: the fastest levels use fixed Huffman codes and would call text
/// incompressible): if that saves less than 3%, the grain is stored in deflate's
/// uncompressed blocks, which any inflater reads, instead of spending a full deflate search
/// that would save nothing (it costs 0.03% in size: 5 bytes per 64 KiB block).
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
    let deflate = |level: Compression, input: &[u8], out: Vec<u8>| -> Result<Vec<u8>> {
        let mut enc = ZlibEncoder::new(out, level);
        enc.write_all(input)
            .map_err(|e| StorageError::io("Compressing a grain", e))?;
        enc.finish()
            .map_err(|e| StorageError::io("Compressing a grain", e))
    };
    let probe = &src[..PROBE_BYTES.min(src.len())];
    let sample = deflate(level, probe, std::mem::take(out))?;
    let incompressible = sample.len() * 100 >= probe.len() * 97;
    let mut sample = sample;
    sample.clear();
    *out = deflate(
        if incompressible {
            Compression::none()
        } else {
            level
        },
        src,
        sample,
    )?;
    Ok(())
}

type Job = (u64, u64, Vec<u8>);
type Done = (u64, u64, Result<Vec<u8>>);

/// Compresses grains on worker threads (one per core) and hands them back in order, so that
/// deflate, the bottleneck of a stream, uses every core while the file stays sequential.
struct Compressors {
    jobs: Option<mpsc::SyncSender<Job>>,
    done: mpsc::Receiver<Done>,
    workers: Vec<std::thread::JoinHandle<()>>,
    waiting: BTreeMap<u64, (u64, Vec<u8>)>,
    next_seq: u64,
    submitted: u64,
    limit: usize,
}

impl Compressors {
    fn start(grain: usize, level: Compression) -> Compressors {
        let n = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 8);
        let limit = 4 * n;
        let (jobs, rx) = mpsc::sync_channel::<Job>(limit);
        let rx = Arc::new(Mutex::new(rx));
        let (tx, done) = mpsc::channel::<Done>();
        let workers = (0..n)
            .map(|_| {
                let rx = rx.clone();
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let mut padded = Vec::new();
                    loop {
                        let job = crate::sync::lock(&rx).recv();
                        let Ok((seq, offset, data)) = job else { break };
                        let mut out = Vec::with_capacity(grain / 2);
                        let r =
                            compress_grain(&data, grain, level, &mut out, &mut padded).map(|_| out);
                        if tx.send((seq, offset, r)).is_err() {
                            break;
                        }
                    }
                })
            })
            .collect();
        Compressors {
            jobs: Some(jobs),
            done,
            workers,
            waiting: BTreeMap::new(),
            next_seq: 0,
            submitted: 0,
            limit,
        }
    }

    fn submit(&mut self, offset: u64, data: Vec<u8>) -> Result<()> {
        let jobs = self
            .jobs
            .as_ref()
            .ok_or_else(|| StorageError::Unavailable("compressor pool".into()))?;
        jobs.send((self.submitted, offset, data))
            .map_err(|_| StorageError::Unavailable("a compression worker stopped".into()))?;
        self.submitted += 1;
        Ok(())
    }

    /// The next grain in order, waiting for it only while more than `keep` are in flight.
    fn next(&mut self, keep: usize) -> Result<Option<(u64, Vec<u8>)>> {
        loop {
            if let Some((offset, data)) = self.waiting.remove(&self.next_seq) {
                self.next_seq += 1;
                return Ok(Some((offset, data)));
            }
            let in_flight = (self.submitted - self.next_seq) as usize;
            if in_flight == 0 || in_flight <= keep {
                // Take what is already done without blocking.
                match self.done.try_recv() {
                    Ok((seq, offset, r)) => {
                        self.waiting.insert(seq, (offset, r?));
                        continue;
                    }
                    Err(_) => return Ok(None),
                }
            }
            let (seq, offset, r) = self
                .done
                .recv()
                .map_err(|_| StorageError::Unavailable("the compression workers stopped".into()))?;
            self.waiting.insert(seq, (offset, r?));
        }
    }
}

impl Drop for Compressors {
    fn drop(&mut self) {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
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
        self.next_offset = offset + grain as u64;
        if crate::util::is_zero(data) {
            return Ok(());
        }
        let pool = self
            .pool
            .get_or_insert_with(|| Compressors::start(grain, self.level));
        let limit = pool.limit;
        pool.submit(offset, data.to_vec())?;
        self.drain(limit)
    }

    fn finish(self: Box<Self>) -> Result<()> {
        (*self).finish_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn inflate(z: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        flate2::read::ZlibDecoder::new(z)
            .read_to_end(&mut v)
            .unwrap();
        v
    }

    #[test]
    fn grains_round_trip_and_incompressible_ones_are_stored() {
        let grain = 65536;
        let mut rng = fastrand::Rng::with_seed(3);
        let random: Vec<u8> = (0..grain).map(|_| rng.u8(..)).collect();
        let text: Vec<u8> = (0..grain)
            .map(|i| b"the quick brown fox jumps "[i % 26] ^ (rng.u8(..4)))
            .collect();
        let (mut out, mut pad) = (Vec::new(), Vec::new());
        compress_grain(&random, grain, Compression::new(6), &mut out, &mut pad).unwrap();
        assert_eq!(inflate(&out), random);
        assert!(out.len() < grain + 64, "stored grain grew to {}", out.len());
        compress_grain(&text, grain, Compression::new(6), &mut out, &mut pad).unwrap();
        assert_eq!(inflate(&out), text);
        assert!(
            out.len() < grain / 2,
            "text compressed to only {}",
            out.len()
        );
        compress_grain(
            &text[..1000],
            grain,
            Compression::new(6),
            &mut out,
            &mut pad,
        )
        .unwrap();
        let back = inflate(&out);
        assert_eq!(&back[..1000], &text[..1000]);
        assert!(back[1000..].iter().all(|&b| b == 0) && back.len() == grain);
    }
}

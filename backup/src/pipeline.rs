//! The backup data path: read → hash → compress → store, on all cores.
//!
//! One reader thread keeps `read_depth` chunk reads in flight on an [`IoQueue`] of the source
//! (chunks the source reports as zero are not read at all); completed chunks go through a bounded
//! channel to one worker per core, which recognises zero chunks, hashes the rest, and stores those
//! the datastore lacks (compressed). The calling thread collects results into index entries and
//! reports progress. Buffers circulate through a fixed pool, so memory stays bounded by
//! `(read_depth + 2 × workers) × chunk size`. The first error cancels the run.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use strata_storage::io::{Completion, IoBuf, QueueOptions, Request};
use strata_storage::util::is_zero;
use strata_storage::{BlockDevice, Capabilities, ExtentKind, Result, StorageError};

use crate::digest::Digest;
use crate::index::{chunk_range, Entry};
use crate::progress::Progress;
use crate::store::{Datastore, Stored};
use crate::writer::ChunkWriter;

/// How to run the pipeline.
#[derive(Clone, Copy, Debug)]
pub struct PipelineOptions {
    /// Hash/compress workers.
    pub workers: usize,
    /// Chunk reads in flight.
    pub read_depth: usize,
    /// zstd level (0: store uncompressed).
    pub compress_level: i32,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            read_depth: 8,
            compress_level: 1,
        }
    }
}

/// What the pipeline did.
#[derive(Clone, Debug, Default)]
pub struct PipelineResult {
    /// Entries for the chunks read, by chunk index.
    pub entries: Vec<(u64, Entry)>,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Zero chunks (read and found zero, or reported zero by the source).
    pub zero: u64,
    /// Chunks stored anew.
    pub new: u64,
    /// Chunks found already stored.
    pub reused: u64,
    /// Blob payload bytes written.
    pub bytes_stored: u64,
    /// First bytes of the digests of new chunks (their fan-out directories need an fsync).
    pub new_dirs: Vec<u8>,
}

struct Job {
    idx: u64,
    len: usize,
    buf: IoBuf,
}

enum Outcome {
    Zero {
        idx: u64,
        read: bool,
    },
    Data {
        idx: u64,
        digest: Digest,
        stored: Option<Stored>,
    },
}

/// Reads, hashes and stores chunks `to_read` (ascending chunk indexes) of `dev`.
pub fn run(
    store: &Datastore,
    writer: &ChunkWriter,
    dev: &Arc<dyn BlockDevice>,
    to_read: &[u64],
    opts: PipelineOptions,
    progress: &dyn Progress,
) -> Result<PipelineResult> {
    let size = dev.size();
    let chunk_size = store.chunk_size();
    let workers = opts.workers.max(1);
    let depth = opts.read_depth.max(1);
    let cancel = AtomicBool::new(false);
    let run_set: Mutex<HashMap<Digest, u32>> = Mutex::new(HashMap::new());
    let (work_tx, work_rx) = bounded::<Job>(workers * 2);
    let (pool_tx, pool_rx) = unbounded::<IoBuf>();
    let (res_tx, res_rx) = unbounded::<Result<Outcome>>();
    for _ in 0..depth + workers * 2 {
        let _ = pool_tx.send(IoBuf::new(chunk_size as usize));
    }
    let mut result = PipelineResult::default();
    let mut first_err: Option<StorageError> = None;
    std::thread::scope(|s| {
        {
            let res_tx = res_tx.clone();
            let cancel = &cancel;
            s.spawn(move || {
                let r = read_chunks(
                    dev, to_read, size, chunk_size, depth, &work_tx, &pool_rx, &res_tx, cancel,
                );
                if let Err(e) = r {
                    let _ = res_tx.send(Err(e));
                }
                // work_tx drops here: workers finish the queue and exit.
            });
        }
        for _ in 0..workers {
            let (work_rx, pool_tx, res_tx) = (work_rx.clone(), pool_tx.clone(), res_tx.clone());
            let (cancel, run_set) = (&cancel, &run_set);
            s.spawn(move || {
                worker(
                    store,
                    writer,
                    opts.compress_level,
                    &work_rx,
                    &pool_tx,
                    &res_tx,
                    cancel,
                    run_set,
                )
            });
        }
        drop(res_tx);
        drop(work_rx);
        for r in res_rx.iter() {
            match r {
                Ok(Outcome::Zero { idx, read }) => {
                    let len = chunk_range(size, chunk_size, idx).1 as u64;
                    if read {
                        result.bytes_read += len;
                    }
                    result.zero += 1;
                    result.entries.push((idx, Entry::Zero));
                    progress.advance(len);
                }
                Ok(Outcome::Data {
                    idx,
                    digest,
                    stored,
                }) => {
                    let len = chunk_range(size, chunk_size, idx).1 as u64;
                    result.bytes_read += len;
                    let stored_len = match stored {
                        Some(Stored::New(n)) => {
                            result.new += 1;
                            result.bytes_stored += n as u64;
                            result.new_dirs.push(digest.0[0]);
                            n
                        }
                        Some(Stored::Existing(n)) => {
                            result.reused += 1;
                            n
                        }
                        // Stored by another worker in this run; its size is filled in below.
                        None => {
                            result.reused += 1;
                            u32::MAX
                        }
                    };
                    result
                        .entries
                        .push((idx, Entry::Stored { digest, stored_len }));
                    progress.advance(len);
                }
                Err(e) => {
                    cancel.store(true, Ordering::Relaxed);
                    first_err.get_or_insert(e);
                }
            }
            if first_err.is_none() && progress.cancelled() {
                cancel.store(true, Ordering::Relaxed);
                first_err = Some(StorageError::Cancelled);
            }
        }
    });
    if let Some(e) = first_err {
        return Err(e);
    }
    if result.entries.len() != to_read.len() {
        return Err(StorageError::Unavailable(format!(
            "Backup pipeline finished {} of {} chunks",
            result.entries.len(),
            to_read.len()
        )));
    }
    let sizes = run_set.into_inner().unwrap_or_else(|p| p.into_inner());
    for (_, e) in result.entries.iter_mut() {
        if let Entry::Stored { digest, stored_len } = e {
            if *stored_len == u32::MAX {
                *stored_len = sizes.get(digest).copied().unwrap_or(0);
            }
        }
    }
    result.entries.sort_by_key(|e| e.0);
    result.new_dirs.sort_unstable();
    result.new_dirs.dedup();
    Ok(result)
}

/// Whether the source says chunk `[off, off+len)` reads as zeros without reading it.
fn known_zero(dev: &dyn BlockDevice, off: u64, len: u64) -> Result<bool> {
    if !dev.capabilities().contains(Capabilities::BLOCK_STATUS) {
        return Ok(false);
    }
    let ext = dev.block_status(off, len)?;
    Ok(ext.kind == ExtentKind::Zero && ext.len >= len)
}

#[allow(clippy::too_many_arguments)]
fn read_chunks(
    dev: &Arc<dyn BlockDevice>,
    to_read: &[u64],
    size: u64,
    chunk_size: u32,
    depth: usize,
    work_tx: &Sender<Job>,
    pool_rx: &Receiver<IoBuf>,
    res_tx: &Sender<Result<Outcome>>,
    cancel: &AtomicBool,
) -> Result<()> {
    let mut queue = dev.open_queue(&QueueOptions::with_depth(depth))?;
    let mut next = 0usize;
    let mut in_flight = 0usize;
    let mut done: Vec<Completion> = Vec::with_capacity(depth);
    let mut lens: HashMap<u64, usize> = HashMap::with_capacity(depth);
    loop {
        if cancel.load(Ordering::Relaxed) {
            break;
        }
        while in_flight < depth && next < to_read.len() {
            let idx = to_read[next];
            let (off, len) = chunk_range(size, chunk_size, idx);
            next += 1;
            if known_zero(dev.as_ref(), off, len as u64)? {
                let _ = res_tx.send(Ok(Outcome::Zero { idx, read: false }));
                continue;
            }
            let pooled = pool_rx
                .recv()
                .map_err(|_| StorageError::Unavailable("buffer pool closed".into()))?;
            let buf = if pooled.len() == len {
                pooled
            } else {
                IoBuf::new(len)
            };
            if let Err(full) = queue.submit(Request::read(idx, off, buf)) {
                // Cannot happen below `depth`; hand the request back to the pool and stop.
                drop(full);
                return Err(StorageError::Unavailable(
                    "source queue refused a read".into(),
                ));
            }
            lens.insert(idx, len);
            in_flight += 1;
        }
        if in_flight == 0 {
            break;
        }
        queue.wait(None)?;
        done.clear();
        queue.reap(&mut done);
        for c in done.drain(..) {
            in_flight -= 1;
            let len = lens.remove(&c.tag).unwrap_or(0);
            let n = c.result?;
            let buf = c
                .buf
                .ok_or_else(|| StorageError::Unavailable("read lost its buffer".into()))?;
            if n as usize != len {
                return Err(StorageError::Unavailable(format!(
                    "Short read of chunk {}: {n} of {len} bytes",
                    c.tag
                )));
            }
            if work_tx
                .send(Job {
                    idx: c.tag,
                    len,
                    buf,
                })
                .is_err()
            {
                return Ok(());
            }
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn worker(
    store: &Datastore,
    writer: &ChunkWriter,
    level: i32,
    work_rx: &Receiver<Job>,
    pool_tx: &Sender<IoBuf>,
    res_tx: &Sender<Result<Outcome>>,
    cancel: &AtomicBool,
    run_set: &Mutex<HashMap<Digest, u32>>,
) {
    for job in work_rx.iter() {
        if cancel.load(Ordering::Relaxed) {
            let _ = pool_tx.send(job.buf);
            continue;
        }
        let outcome = process(store, writer, level, &job, run_set);
        let _ = pool_tx.send(job.buf);
        let _ = res_tx.send(outcome);
    }
}

fn process(
    store: &Datastore,
    writer: &ChunkWriter,
    level: i32,
    job: &Job,
    run_set: &Mutex<HashMap<Digest, u32>>,
) -> Result<Outcome> {
    let data = match job.buf.as_slice() {
        Some(s) => &s[..job.len],
        None => {
            return Err(StorageError::Unavailable(
                "read buffer is not contiguous".into(),
            ))
        }
    };
    if is_zero(data) {
        return Ok(Outcome::Zero {
            idx: job.idx,
            read: true,
        });
    }
    let digest = store.digest_of(data);
    let first_in_run = run_set
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(digest, 0)
        .is_none();
    let stored = if first_in_run {
        let stored = writer.insert(&digest, data, level)?;
        let len = match stored {
            Stored::New(n) | Stored::Existing(n) => n,
        };
        run_set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest, len);
        Some(stored)
    } else {
        None
    };
    Ok(Outcome::Data {
        idx: job.idx,
        digest,
        stored,
    })
}

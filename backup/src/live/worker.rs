//! The workers of a live restore: each takes the next chunk from the table (guest demands
//! first, then the background copy in order), fetches it through the [`crate::fetch::ChunkFetcher`] into its
//! own reused I/O buffer, writes it to the volume through its own queue, and marks it done or
//! lost. Every [`PERSIST_EVERY`] or [`PERSIST_BYTES`] one of them makes progress durable
//! (volume flush, then the map); when the last chunk is done one of them makes the restore
//! final.

use std::sync::Arc;
use std::time::Duration;

use strata_storage::io::{Completion, IoBuf, IoQueue, QueueOptions, Request};
use strata_storage::{Capabilities, ExtentKind, Result, StorageError};

use super::chunks::Job;
use super::Shared;
use crate::index::Entry;

/// How often the background copy makes its progress durable.
pub const PERSIST_EVERY: Duration = Duration::from_secs(1);
/// Bytes of chunks copied after which progress is made durable, whatever the time.
pub const PERSIST_BYTES: u64 = 64 << 20;

/// Most extents looked at to decide that a chunk of the volume already reads as zeros.
const MAX_STATUS_EXTENTS: usize = 4096;

pub(super) fn run(shared: Arc<Shared>) {
    let mut queue = match shared.target.open_queue(&QueueOptions::with_depth(1)) {
        Ok(q) => q,
        Err(e) => {
            tracing::error!(restore = %shared.snapshot, error = %e, "a live-restore worker cannot open a queue on its volume");
            return;
        }
    };
    let mut w = Worker {
        shared: &shared,
        buf: None,
        scratch: Vec::new(),
        done: Vec::new(),
    };
    loop {
        match shared.chunks.next_job() {
            Job::Stop => return,
            Job::Finish => {
                if let Err(e) = shared.finish() {
                    tracing::error!(restore = %shared.snapshot, error = %e, "making the live restore final failed");
                    shared.record_error(format!("making the restore final: {e}"));
                }
            }
            Job::Chunk(i) => {
                let r = w.copy(i, &mut queue);
                let copied = if r.is_ok() {
                    shared.index.chunk_range(i).1 as u64
                } else {
                    0
                };
                shared.chunks.complete(i, r.err().map(|e| e.to_string()));
                shared.maybe_persist(copied);
            }
        }
    }
}

struct Worker<'a> {
    shared: &'a Shared,
    /// A chunk-sized buffer, back from the last write.
    buf: Option<IoBuf>,
    scratch: Vec<u8>,
    done: Vec<Completion>,
}

impl Worker<'_> {
    /// Puts chunk `i` on the volume.
    fn copy(&mut self, i: u64, queue: &mut Box<dyn IoQueue>) -> Result<()> {
        let s = self.shared;
        let (off, len) = s.index.chunk_range(i);
        let entry = s.index.entries().get(i as usize).copied().ok_or_else(|| {
            StorageError::InvalidInput(format!("chunk {i} is past the snapshot's end"))
        })?;
        let req = match entry {
            Entry::Zero => {
                if self.reads_zero(off, len as u64)? {
                    s.stats.zero_skipped(len as u64);
                    return Ok(());
                }
                let caps = s.target.capabilities();
                s.stats.zero_written(len as u64);
                if caps.contains(Capabilities::WRITE_ZEROES) {
                    Request::write_zeroes(i, off, len as u64, true)
                } else if caps.contains(Capabilities::DISCARD) {
                    Request::discard(i, off, len as u64)
                } else {
                    Request::write(i, off, IoBuf::new(len))
                }
            }
            Entry::Stored { digest, .. } => {
                let mut buf = match self.buf.take() {
                    Some(b) if b.len() == len => b,
                    _ => IoBuf::new(len),
                };
                let out = buf.as_mut_slice().ok_or_else(|| {
                    StorageError::Unavailable("restore buffer is not contiguous".into())
                })?;
                s.fetcher
                    .fetch_into(&digest, out, &mut self.scratch)
                    .map_err(|e| {
                        StorageError::corrupt(
                            format!("snapshot {}", s.snapshot),
                            format!("chunk {i} at offset {off}: {e}"),
                        )
                    })?;
                s.stats.fetched(len as u64);
                Request::write(i, off, buf)
            }
        };
        if queue.submit(req).is_err() {
            return Err(StorageError::Unavailable(
                "the volume's queue refused a write".into(),
            ));
        }
        loop {
            queue.wait(None)?;
            self.done.clear();
            queue.reap(&mut self.done);
            if let Some(c) = self.done.pop() {
                if let Some(b) = c.buf {
                    if b.len() == s.index.chunk_size() as usize {
                        self.buf = Some(b);
                    }
                }
                return c.result.map(|_| ()).map_err(|e| {
                    StorageError::Unavailable(format!("writing chunk {i} to the volume: {e}"))
                });
            }
        }
    }

    /// Whether the volume already reads as zeros at `off..off+len` (a fresh thin volume): then
    /// a zero chunk needs no write.
    fn reads_zero(&self, off: u64, len: u64) -> Result<bool> {
        let t = &self.shared.target;
        if !t.capabilities().contains(Capabilities::BLOCK_STATUS) {
            return Ok(false);
        }
        let end = off + len;
        let mut pos = off;
        for _ in 0..MAX_STATUS_EXTENTS {
            if pos >= end {
                return Ok(true);
            }
            let e = t.block_status(pos, end - pos)?;
            if e.kind == ExtentKind::Data || e.len == 0 {
                return Ok(false);
            }
            pos += e.len;
        }
        Ok(false)
    }
}

//! Blocking helpers over a queue, for control-plane callers, metadata workers and tests: one
//! request at a time, or a batch of writes, submitted and waited for.

use std::collections::VecDeque;
use std::fmt;

use crate::device::BlockDevice;
use crate::error::{Result, StorageError};
use crate::io::{Completion, IoBuf, IoQueue, Op, QueueOptions, Request};

/// A queue used one request at a time. See the module documentation.
pub struct BlockingQueue {
    queue: Box<dyn IoQueue>,
    next_tag: u64,
    done: Vec<Completion>,
}

impl fmt::Debug for BlockingQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockingQueue")
            .field("queue", &self.queue)
            .finish()
    }
}

impl BlockingQueue {
    /// Opens a queue of `depth` on `dev`.
    pub fn open(dev: &dyn BlockDevice, depth: usize) -> Result<BlockingQueue> {
        Ok(Self::new(dev.open_queue(&QueueOptions::with_depth(depth))?))
    }

    /// Wraps an open queue.
    pub fn new(queue: Box<dyn IoQueue>) -> BlockingQueue {
        BlockingQueue {
            queue,
            next_tag: 1,
            done: Vec::new(),
        }
    }

    /// Runs one operation and returns its completion.
    pub fn run(&mut self, op: Op) -> Completion {
        let tag = self.next_tag;
        self.next_tag += 1;
        let mut req = Request { tag, op };
        loop {
            match self.queue.submit(req) {
                Ok(()) => break,
                Err(full) => {
                    // Only possible if the queue is shared with earlier, unreaped work.
                    req = full.0;
                    if let Err(e) = self.queue.wait(None) {
                        return Completion::of(req, Err(e));
                    }
                    self.collect();
                }
            }
        }
        loop {
            if let Some(pos) = self.done.iter().position(|c| c.tag == tag) {
                return self.done.swap_remove(pos);
            }
            if let Err(e) = self.queue.wait(None) {
                return Completion {
                    tag,
                    result: Err(e),
                    buf: None,
                };
            }
            self.collect();
        }
    }

    fn collect(&mut self) {
        let mut out = std::mem::take(&mut self.done);
        self.queue.reap(&mut out);
        self.done = out;
    }

    /// Reads `len` bytes at `offset`.
    pub fn read_at(&mut self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let buf = self.read_buf(offset, IoBuf::new(len))?;
        Ok(buf.to_vec())
    }

    /// Reads into `buf` at `offset` and returns it.
    pub fn read_buf(&mut self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let c = self.run(Op::Read { offset, buf });
        c.result?;
        c.buf
            .ok_or_else(|| StorageError::Unavailable("the queue lost a read buffer".into()))
    }

    /// Writes `data` at `offset`.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_buf(offset, IoBuf::from_slice(data)).map(|_| ())
    }

    /// Writes `buf` at `offset` and returns it.
    pub fn write_buf(&mut self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let c = self.run(Op::Write { offset, buf });
        c.result?;
        c.buf
            .ok_or_else(|| StorageError::Unavailable("the queue lost a write buffer".into()))
    }

    /// Writes every `(offset, buf)` of `writes`, as many at once as the queue takes, and waits
    /// for all of them; the first error, if any, after all have ended.
    pub fn write_all(&mut self, writes: Vec<(u64, IoBuf)>) -> Result<()> {
        self.collect();
        let first = self.next_tag;
        self.next_tag += writes.len() as u64;
        let mut pending: VecDeque<Request> = writes
            .into_iter()
            .zip(first..)
            .map(|((offset, buf), tag)| Request::write(tag, offset, buf))
            .collect();
        let mut left = 0usize;
        let mut error: Option<StorageError> = None;
        loop {
            while let Some(req) = pending.pop_front() {
                if let Err(full) = self.queue.submit(req) {
                    pending.push_front(full.0);
                    break;
                }
                left += 1;
            }
            if left == 0 && pending.is_empty() {
                return error.map_or(Ok(()), Err);
            }
            self.queue.commit()?;
            if let Err(e) = self.queue.wait(None) {
                // What is in flight is drained when the queue is dropped.
                return Err(error.unwrap_or(e));
            }
            self.collect();
            let before = self.done.len();
            self.done.retain(|c| {
                if c.tag < first {
                    return true;
                }
                if let Err(e) = &c.result {
                    error.get_or_insert_with(|| e.duplicate());
                }
                false
            });
            left = left.saturating_sub(before - self.done.len());
        }
    }

    /// Flushes.
    pub fn flush(&mut self) -> Result<()> {
        self.run(Op::Flush).result.map(|_| ())
    }

    /// Discards `len` bytes at `offset`.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.run(Op::Discard { offset, len }).result.map(|_| ())
    }

    /// Zeroes `len` bytes at `offset`.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.run(Op::WriteZeroes { offset, len, unmap })
            .result
            .map(|_| ())
    }

    /// The underlying queue.
    pub fn queue(&mut self) -> &mut dyn IoQueue {
        self.queue.as_mut()
    }
}

//! Blocking helpers over a queue, for control-plane callers and tests: one request at a time,
//! submit and wait.

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

//! The data plane: I/O queues and the engines behind them.
//!
//! A consumer (a virtio queue worker, a convert or backup pipeline, the benchmark) opens one
//! [`IoQueue`] per thread from a [`crate::BlockDevice`], submits [`Request`]s, commits them in a
//! batch, and reaps [`Completion`]s, waking on the queue's eventfd or blocking in
//! [`IoQueue::wait`]. Every request moves its buffer into the queue and gets it back in its
//! completion.
//!
//! Engines:
//! - [`uring`]: io_uring, one ring per queue (the default where the kernel has it);
//! - [`threads`]: a pool of threads doing positional system calls (where io_uring is missing, or
//!   chosen explicitly);
//! - `memory` and `fault` (feature `test-utils`): in-memory devices for tests, the second of which
//!   injects failures and simulates power loss — of the device and of the small files beside it
//!   (`fault_fs`, the fault-injecting side of `crate::durable::FileSystem`).

pub mod blocking;
pub mod buf;
pub mod counted;
pub mod engine;
pub mod file;
pub mod stack;
mod sync_queue;
pub mod threads;
pub mod uring;
pub mod volatile;

#[cfg(feature = "test-utils")]
pub mod fault;
#[cfg(feature = "test-utils")]
mod fault_fs;
#[cfg(feature = "test-utils")]
mod fault_queue;
#[cfg(feature = "test-utils")]
pub mod memory;
#[cfg(feature = "test-utils")]
mod sparse;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

pub use buf::IoBuf;
pub use sync_queue::{SyncExecutor, SyncQueue};

use crate::error::{Result, StorageError};

/// One operation on a device.
#[derive(Debug)]
pub enum Op {
    /// Read `buf.len()` bytes at `offset` into `buf` (vectored when `buf` has several segments).
    Read {
        /// Byte offset on the device.
        offset: u64,
        /// Destination; returned in the completion.
        buf: IoBuf,
    },
    /// Write `buf` at `offset` (vectored when `buf` has several segments).
    Write {
        /// Byte offset on the device.
        offset: u64,
        /// Source; returned in the completion.
        buf: IoBuf,
    },
    /// Make every write completed before this request was submitted durable.
    Flush,
    /// Tell the device that a range is no longer needed; reads of it return zeros afterwards on
    /// every engine and format of this crate.
    Discard {
        /// Byte offset on the device.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Make a range read as zeros; with `unmap` the device may free the space as well.
    WriteZeroes {
        /// Byte offset on the device.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Whether the device may deallocate the range.
        unmap: bool,
    },
}

impl Op {
    /// A short name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Read { .. } => "read",
            Op::Write { .. } => "write",
            Op::Flush => "flush",
            Op::Discard { .. } => "discard",
            Op::WriteZeroes { .. } => "write-zeroes",
        }
    }

    /// The byte range the operation touches, if any.
    pub fn range(&self) -> Option<(u64, u64)> {
        match self {
            Op::Read { offset, buf } | Op::Write { offset, buf } => {
                Some((*offset, buf.len() as u64))
            }
            Op::Discard { offset, len } | Op::WriteZeroes { offset, len, .. } => {
                Some((*offset, *len))
            }
            Op::Flush => None,
        }
    }

    /// Takes the buffer out of a read or write, leaving an empty one.
    pub fn take_buf(&mut self) -> Option<IoBuf> {
        match self {
            Op::Read { buf, .. } | Op::Write { buf, .. } => {
                Some(std::mem::replace(buf, IoBuf::empty()))
            }
            _ => None,
        }
    }
}

/// A request: an operation and the caller's tag, returned unchanged in the completion.
#[derive(Debug)]
pub struct Request {
    /// Caller-chosen identifier (a virtio descriptor head, an index into a table).
    pub tag: u64,
    /// What to do.
    pub op: Op,
}

impl Request {
    /// A read of `buf.len()` bytes at `offset`.
    pub fn read(tag: u64, offset: u64, buf: IoBuf) -> Request {
        Request {
            tag,
            op: Op::Read { offset, buf },
        }
    }

    /// A write of `buf` at `offset`.
    pub fn write(tag: u64, offset: u64, buf: IoBuf) -> Request {
        Request {
            tag,
            op: Op::Write { offset, buf },
        }
    }

    /// A flush.
    pub fn flush(tag: u64) -> Request {
        Request { tag, op: Op::Flush }
    }

    /// A discard of `len` bytes at `offset`.
    pub fn discard(tag: u64, offset: u64, len: u64) -> Request {
        Request {
            tag,
            op: Op::Discard { offset, len },
        }
    }

    /// A write-zeroes of `len` bytes at `offset`.
    pub fn write_zeroes(tag: u64, offset: u64, len: u64, unmap: bool) -> Request {
        Request {
            tag,
            op: Op::WriteZeroes { offset, len, unmap },
        }
    }
}

/// The outcome of a request.
#[derive(Debug)]
pub struct Completion {
    /// The request's tag.
    pub tag: u64,
    /// Bytes transferred (reads and writes) or zero, or the error.
    pub result: Result<u64>,
    /// The request's buffer, returned to its owner (reads and writes only).
    pub buf: Option<IoBuf>,
}

impl Completion {
    /// Completes `req` with `result`, handing its buffer back.
    pub fn of(mut req: Request, result: Result<u64>) -> Completion {
        Completion {
            tag: req.tag,
            buf: req.op.take_buf(),
            result,
        }
    }
}

/// Returned by [`IoQueue::submit`] when the queue already holds `depth` requests: the caller gets
/// its request back, reaps some completions and tries again (back-pressure, never a panic).
#[derive(Debug)]
pub struct QueueFull(pub Request);

impl fmt::Display for QueueFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "I/O queue is full")
    }
}

/// How to open a queue.
#[derive(Clone, Debug)]
pub struct QueueOptions {
    /// Most requests in flight at once (submitted and not yet reaped).
    pub depth: usize,
    /// An eventfd to signal when completions are ready. Stacked devices pass theirs down so that
    /// a consumer waits on one descriptor. `None`: the consumer uses [`IoQueue::wait`] only.
    pub notifier: Option<Arc<EventFd>>,
    /// Requests a queue accumulates before handing them to the engine on its own (at least 1).
    /// 1, the default, sends each request down as it is submitted: on virtual disks the device
    /// then starts sooner, which measured faster than batching (benches/RESULTS.md); larger
    /// values save system calls where the device prefers batches.
    pub submit_batch: usize,
}

impl QueueOptions {
    /// Options with the given depth and no eventfd.
    pub fn with_depth(depth: usize) -> QueueOptions {
        QueueOptions {
            depth: depth.max(1),
            notifier: None,
            submit_batch: 1,
        }
    }

    /// Sets how many requests accumulate before the queue submits them itself.
    pub fn batch(mut self, submit_batch: usize) -> QueueOptions {
        self.submit_batch = submit_batch.max(1);
        self
    }

    /// Adds an eventfd to signal on completion.
    pub fn notify(mut self, notifier: Arc<EventFd>) -> QueueOptions {
        self.notifier = Some(notifier);
        self
    }
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions::with_depth(128)
    }
}

/// A data-plane queue on one device. Not shared between threads: open one per thread.
pub trait IoQueue: Send + fmt::Debug {
    /// Most requests in flight at once.
    fn depth(&self) -> usize;

    /// Requests submitted and not yet reaped.
    fn in_flight(&self) -> usize;

    /// Queues a request. It goes to the engine once [`QueueOptions::submit_batch`] requests are
    /// queued, or at the next [`IoQueue::commit`] or [`IoQueue::wait`]. Errors in the request itself
    /// (out of range, read-only device) come back as its completion.
    fn submit(&mut self, req: Request) -> std::result::Result<(), QueueFull>;

    /// Hands every queued request to the engine.
    fn commit(&mut self) -> Result<()>;

    /// Moves every finished request's completion to `out` without blocking; returns how many.
    fn reap(&mut self, out: &mut Vec<Completion>) -> usize;

    /// Commits, then blocks until at least one completion can be reaped, `timeout` passes, or
    /// nothing is in flight.
    fn wait(&mut self, timeout: Option<Duration>) -> Result<()>;

    /// The eventfd signalled when completions are ready, if the queue was opened with one.
    fn notifier(&self) -> Option<&Arc<EventFd>>;
}

/// Checks a request's range against a device of `size` bytes.
pub fn check_range(op: &Op, size: u64) -> Result<()> {
    if let Some((offset, len)) = op.range() {
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(StorageError::OutOfRange { offset, len, size });
        }
    }
    Ok(())
}

/// Signals `notifier` if there is one; a failed write to an eventfd only happens when its counter
/// would overflow, in which case the consumer is already awake.
pub(crate) fn notify(notifier: Option<&Arc<EventFd>>) {
    if let Some(n) = notifier {
        let _ = n.write(1);
    }
}

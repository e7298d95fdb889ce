//! I/O counters for a device: a wrapper whose queues count the requests they accept (reads,
//! writes, flushes, discards and write-zeroes, with bytes) and the completions that fail, into
//! an [`IoCounters`] shared by every handle on the same device. The appliance keeps one per
//! volume for its metrics.
//!
//! Requests are counted when the queue below accepts them (a `QueueFull` is not counted); a
//! request that then fails is counted once more in `errors`. Counting is a relaxed atomic add
//! per request: nothing is locked on the data path.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::device::{BlockDevice, Capabilities, Extent};
use crate::error::Result;
use crate::io::{Completion, IoQueue, Op, QueueFull, QueueOptions, Request};

/// Counters of one device. See the module documentation.
#[derive(Debug, Default)]
pub struct IoCounters {
    reads: AtomicU64,
    read_bytes: AtomicU64,
    writes: AtomicU64,
    written_bytes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    discarded_bytes: AtomicU64,
    errors: AtomicU64,
}

/// The counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoCounts {
    /// Read requests.
    pub reads: u64,
    /// Bytes asked for by read requests.
    pub read_bytes: u64,
    /// Write requests.
    pub writes: u64,
    /// Bytes of write requests.
    pub written_bytes: u64,
    /// Flush requests (queue flushes and device-wide flushes).
    pub flushes: u64,
    /// Discard and write-zeroes requests.
    pub discards: u64,
    /// Bytes of discard and write-zeroes requests.
    pub discarded_bytes: u64,
    /// Requests that completed with an error.
    pub errors: u64,
}

impl IoCounters {
    /// The counts now.
    pub fn get(&self) -> IoCounts {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        IoCounts {
            reads: l(&self.reads),
            read_bytes: l(&self.read_bytes),
            writes: l(&self.writes),
            written_bytes: l(&self.written_bytes),
            flushes: l(&self.flushes),
            discards: l(&self.discards),
            discarded_bytes: l(&self.discarded_bytes),
            errors: l(&self.errors),
        }
    }

    fn count(&self, kind: OpKind, bytes: u64) {
        let (n, b) = match kind {
            OpKind::Read => (&self.reads, Some(&self.read_bytes)),
            OpKind::Write => (&self.writes, Some(&self.written_bytes)),
            OpKind::Flush => (&self.flushes, None),
            OpKind::Discard => (&self.discards, Some(&self.discarded_bytes)),
        };
        n.fetch_add(1, Ordering::Relaxed);
        if let Some(b) = b {
            b.fetch_add(bytes, Ordering::Relaxed);
        }
    }
}

#[derive(Clone, Copy)]
enum OpKind {
    Read,
    Write,
    Flush,
    Discard,
}

fn kind_of(op: &Op) -> (OpKind, u64) {
    match op {
        Op::Read { buf, .. } => (OpKind::Read, buf.len() as u64),
        Op::Write { buf, .. } => (OpKind::Write, buf.len() as u64),
        Op::Flush => (OpKind::Flush, 0),
        Op::Discard { len, .. } | Op::WriteZeroes { len, .. } => (OpKind::Discard, *len),
    }
}

/// A device whose I/O is counted. See the module documentation.
pub struct CountedDevice {
    inner: Arc<dyn BlockDevice>,
    counters: Arc<IoCounters>,
}

impl fmt::Debug for CountedDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CountedDevice")
            .field("inner", &self.inner)
            .finish()
    }
}

impl CountedDevice {
    /// Counts the I/O of `inner` into `counters`.
    pub fn new(inner: Arc<dyn BlockDevice>, counters: Arc<IoCounters>) -> CountedDevice {
        CountedDevice { inner, counters }
    }
}

impl BlockDevice for CountedDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn alignment(&self) -> usize {
        self.inner.alignment()
    }

    fn open_queue(&self, opts: &QueueOptions) -> Result<Box<dyn IoQueue>> {
        Ok(Box::new(CountedQueue {
            inner: self.inner.open_queue(opts)?,
            counters: self.counters.clone(),
        }))
    }

    fn flush(&self) -> Result<()> {
        self.counters.count(OpKind::Flush, 0);
        self.inner.flush().inspect_err(|_| {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        })
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.inner.resize(new_size)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.inner.block_status(offset, len)
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
}

struct CountedQueue {
    inner: Box<dyn IoQueue>,
    counters: Arc<IoCounters>,
}

impl fmt::Debug for CountedQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CountedQueue")
            .field("inner", &self.inner)
            .finish()
    }
}

impl IoQueue for CountedQueue {
    fn depth(&self) -> usize {
        self.inner.depth()
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }

    fn submit(&mut self, req: Request) -> std::result::Result<(), QueueFull> {
        let (kind, bytes) = kind_of(&req.op);
        self.inner.submit(req)?;
        self.counters.count(kind, bytes);
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        self.inner.commit()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        let start = out.len();
        let n = self.inner.reap(out);
        let failed = out[start..].iter().filter(|c| c.result.is_err()).count();
        if failed > 0 {
            self.counters
                .errors
                .fetch_add(failed as u64, Ordering::Relaxed);
        }
        n
    }

    fn wait(&mut self, timeout: Option<Duration>) -> Result<()> {
        self.inner.wait(timeout)
    }

    fn notifier(&self) -> Option<&Arc<EventFd>> {
        self.inner.notifier()
    }
}

#[cfg(all(test, feature = "test-utils"))]
mod tests {
    use super::*;
    use crate::io::memory::MemoryDevice;
    use crate::io::IoBuf;

    #[test]
    fn requests_bytes_and_failures_are_counted() {
        let counters = Arc::new(IoCounters::default());
        let dev = CountedDevice::new(MemoryDevice::new(1 << 20), counters.clone());
        let mut q = dev.open_queue(&QueueOptions::with_depth(8)).unwrap();
        let mut buf = IoBuf::new(4096);
        buf.as_mut_slice().unwrap().fill(7);
        q.submit(Request::write(1, 0, buf)).unwrap();
        q.submit(Request::read(2, 0, IoBuf::new(8192))).unwrap();
        q.submit(Request::discard(3, 8192, 4096)).unwrap();
        q.submit(Request::flush(4)).unwrap();
        // Past the end: accepted, then fails.
        q.submit(Request::read(5, 1 << 20, IoBuf::new(4096)))
            .unwrap();
        let mut done = Vec::new();
        while done.len() < 5 {
            q.wait(Some(Duration::from_secs(5))).unwrap();
            q.reap(&mut done);
        }
        dev.flush().unwrap();
        assert_eq!(
            counters.get(),
            IoCounts {
                reads: 2,
                read_bytes: 8192 + 4096,
                writes: 1,
                written_bytes: 4096,
                flushes: 2,
                discards: 1,
                discarded_bytes: 4096,
                errors: 1,
            }
        );
    }
}

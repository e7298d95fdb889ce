//! The changed-block tracking seam: a block device wrapper that reports every range the guest
//! changed to a [`DirtyTracker`].
//!
//! The dirty bitmap itself belongs to the storage layer (a bitmap per source, persisted with
//! it); the VMM only has to tell it what changed. [`TrackedDisk`] wraps any
//! `Arc<dyn BlockDevice>`; its queues pass every request through and, when a write,
//! write-zeroes or discard completes successfully, mark its range. Marking after completion and
//! before the completion is handed to the device means a range is marked before the guest can
//! see its write acknowledged, so a backup that reads the bitmap after a flush misses nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use strata_storage::io::{Completion, IoQueue, Op, QueueFull, QueueOptions, Request};
use strata_storage::{BlockDevice, Capabilities, Extent, Result};
use vmm_sys_util::eventfd::EventFd;

/// Receives the ranges the guest changed (byte offset and length).
pub trait DirtyTracker: Send + Sync + std::fmt::Debug {
    /// Marks `len` bytes at `offset` as changed.
    fn mark(&self, offset: u64, len: u64);
}

/// A block device whose completed writes are reported to a tracker.
#[derive(Debug)]
pub struct TrackedDisk {
    inner: Arc<dyn BlockDevice>,
    tracker: Arc<dyn DirtyTracker>,
}

impl TrackedDisk {
    /// Wraps `inner`, reporting its changes to `tracker`.
    pub fn new(inner: Arc<dyn BlockDevice>, tracker: Arc<dyn DirtyTracker>) -> Arc<TrackedDisk> {
        Arc::new(TrackedDisk { inner, tracker })
    }
}

impl BlockDevice for TrackedDisk {
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
        Ok(Box::new(TrackedQueue {
            inner: self.inner.open_queue(opts)?,
            tracker: self.tracker.clone(),
            ranges: HashMap::new(),
        }))
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.inner.resize(new_size)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.inner.block_status(offset, len)
    }
}

#[derive(Debug)]
struct TrackedQueue {
    inner: Box<dyn IoQueue>,
    tracker: Arc<dyn DirtyTracker>,
    /// The range of each in-flight request that changes data, by tag.
    ranges: HashMap<u64, (u64, u64)>,
}

impl IoQueue for TrackedQueue {
    fn depth(&self) -> usize {
        self.inner.depth()
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }

    fn submit(&mut self, req: Request) -> std::result::Result<(), QueueFull> {
        let changes = match &req.op {
            Op::Write { .. } | Op::WriteZeroes { .. } | Op::Discard { .. } => req.op.range(),
            Op::Read { .. } | Op::Flush => None,
        };
        let tag = req.tag;
        self.inner.submit(req)?;
        if let Some(range) = changes {
            self.ranges.insert(tag, range);
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        self.inner.commit()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        let start = out.len();
        let n = self.inner.reap(out);
        for c in &out[start..] {
            if let Some((offset, len)) = self.ranges.remove(&c.tag) {
                if c.result.is_ok() && len > 0 {
                    self.tracker.mark(offset, len);
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use strata_storage::io::memory::MemoryDevice;
    use strata_storage::io::IoBuf;

    #[derive(Debug, Default)]
    struct Ranges(Mutex<Vec<(u64, u64)>>);
    impl DirtyTracker for Ranges {
        fn mark(&self, offset: u64, len: u64) {
            self.0.lock().unwrap().push((offset, len));
        }
    }

    #[test]
    fn completed_changes_are_marked_and_reads_and_failures_are_not() {
        let tracker = Arc::new(Ranges::default());
        let disk = TrackedDisk::new(MemoryDevice::new(1 << 20), tracker.clone());
        let mut q = disk.open_queue(&QueueOptions::with_depth(8)).unwrap();
        q.submit(Request::write(1, 4096, IoBuf::new(8192))).unwrap();
        q.submit(Request::read(2, 0, IoBuf::new(4096))).unwrap();
        q.submit(Request::discard(3, 65536, 4096)).unwrap();
        q.submit(Request::write_zeroes(4, 131072, 512, false))
            .unwrap();
        q.submit(Request::write(5, 1 << 20, IoBuf::new(512)))
            .unwrap(); // out of range: fails
        q.submit(Request::flush(6)).unwrap();
        let mut out = Vec::new();
        while out.len() < 6 {
            q.wait(Some(Duration::from_secs(1))).unwrap();
            q.reap(&mut out);
        }
        let mut marked = tracker.0.lock().unwrap().clone();
        marked.sort();
        assert_eq!(marked, vec![(4096, 8192), (65536, 4096), (131072, 512)]);
    }
}

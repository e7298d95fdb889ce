//! A block device that records changes in dirty bitmaps: its queues mark every completed write,
//! discard and write-zeroes (successful or not: a failed write may have changed some bytes) in
//! every bitmap of its [`BitmapSet`]. It wraps any device — a volume or an image — so that
//! changed-block tracking works the same for both.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::bitmap::store::BitmapSet;
use crate::device::{BlockDevice, Capabilities, Extent};
use crate::error::Result;
use crate::io::{Completion, IoQueue, Op, QueueFull, QueueOptions, Request};

/// Keeps a bitmap set tracking (its file marked in use) while a device or queue on it exists.
#[derive(Debug)]
struct Tracking {
    bitmaps: Arc<BitmapSet>,
    writable: bool,
}

impl Drop for Tracking {
    fn drop(&mut self) {
        if self.writable {
            if let Err(e) = self.bitmaps.end_tracking() {
                tracing::error!(file = %self.bitmaps.path().display(), error = %e, "saving dirty bitmaps failed; they will be invalid");
            }
        }
    }
}

/// A device whose changes are tracked. See the module documentation.
pub struct TrackedDevice {
    inner: Arc<dyn BlockDevice>,
    tracking: Arc<Tracking>,
}

impl fmt::Debug for TrackedDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrackedDevice")
            .field("inner", &self.inner)
            .field("bitmaps", &self.tracking.bitmaps.path())
            .finish()
    }
}

/// The sidecar bitmap file of an image file: `IMAGE.bitmaps` next to it.
pub fn sidecar_path(image: &Path) -> PathBuf {
    let mut name = image
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".bitmaps");
    image.with_file_name(name)
}

impl TrackedDevice {
    /// Tracks writes to `inner` in the bitmaps stored at `path` (an image's sidecar file, see
    /// [`sidecar_path`]).
    pub fn open(inner: Arc<dyn BlockDevice>, path: &Path) -> Result<TrackedDevice> {
        let bitmaps = Arc::new(BitmapSet::open(path, inner.size())?);
        TrackedDevice::with_set(inner, bitmaps)
    }

    /// Tracks writes to `inner` in `bitmaps` (shared with other handles on the same device).
    /// The set's file is marked in use until this device and its queues are gone.
    pub fn with_set(inner: Arc<dyn BlockDevice>, bitmaps: Arc<BitmapSet>) -> Result<TrackedDevice> {
        let writable = !inner.read_only();
        if writable {
            bitmaps.begin_tracking()?;
        }
        Ok(TrackedDevice {
            inner,
            tracking: Arc::new(Tracking { bitmaps, writable }),
        })
    }

    /// The bitmaps: list, add, take for a backup, ...
    pub fn bitmaps(&self) -> &Arc<BitmapSet> {
        &self.tracking.bitmaps
    }

    /// The device underneath.
    pub fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }
}

impl BlockDevice for TrackedDevice {
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
            tracking: self.tracking.clone(),
            slots: Vec::new(),
            free: Vec::new(),
            scratch: Vec::new(),
        }))
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.inner.resize(new_size)?;
        self.tracking.bitmaps.resize(self.inner.size())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.inner.block_status(offset, len)
    }
}

/// A request in flight: the caller's tag and the range it changes, if any.
type InFlight = (u64, Option<(u64, u64)>);

/// A tracked queue: what each request in flight changes.
struct TrackedQueue {
    inner: Box<dyn IoQueue>,
    tracking: Arc<Tracking>,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    scratch: Vec<Completion>,
}

impl fmt::Debug for TrackedQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrackedQueue")
            .field("inner", &self.inner)
            .finish()
    }
}

impl IoQueue for TrackedQueue {
    fn depth(&self) -> usize {
        self.inner.depth()
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }

    fn submit(&mut self, mut req: Request) -> std::result::Result<(), QueueFull> {
        let changes = match req.op {
            Op::Read { .. } | Op::Flush => None,
            _ => req.op.range(),
        };
        let slot = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.slots[slot] = Some((req.tag, changes));
        req.tag = slot as u64;
        self.inner.submit(req).map_err(|QueueFull(mut back)| {
            if let Some((tag, _)) = self.slots[slot].take() {
                back.tag = tag;
            }
            self.free.push(slot);
            QueueFull(back)
        })
    }

    fn commit(&mut self) -> Result<()> {
        self.inner.commit()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        let mut done = std::mem::take(&mut self.scratch);
        self.inner.reap(&mut done);
        let n = done.len();
        for mut c in done.drain(..) {
            let slot = c.tag as usize;
            if let Some((tag, changes)) = self.slots.get_mut(slot).and_then(Option::take) {
                self.free.push(slot);
                if let Some((offset, len)) = changes {
                    self.tracking.bitmaps.mark(offset, len);
                }
                c.tag = tag;
            }
            out.push(c);
        }
        self.scratch = done;
        n
    }

    fn wait(&mut self, timeout: Option<Duration>) -> Result<()> {
        self.inner.wait(timeout)
    }

    fn notifier(&self) -> Option<&Arc<EventFd>> {
        self.inner.notifier()
    }
}

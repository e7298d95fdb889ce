//! A block device that records changes in dirty bitmaps: its queues mark every completed write,
//! discard and write-zeroes (successful or not: a failed write may have changed some bytes) in
//! every bitmap of its [`BitmapSet`]. It wraps any device — a volume or an image — so that
//! changed-block tracking works the same for both.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::bitmap::store::BitmapSet;
use crate::device::{BlockDevice, Capabilities, Extent};
use crate::error::Result;
use crate::io::stack::{Layer, Lower, Stack, StackedQueue};
use crate::io::{Completion, IoQueue, Op, QueueOptions, Request};
use crate::volume::lock::{try_lock_exclusive, FileLock};

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
    /// For an image: the lock on its file held while its bitmaps are in use.
    _image_lock: Option<FileLock>,
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

/// The dirty bitmaps of an image file (its sidecar, see [`sidecar_path`]), with the image
/// locked (an exclusive `flock` on the image file) for as long as this lives: one process at a
/// time tracks writes to an image or changes its bitmaps, as with a volume group.
#[derive(Debug)]
pub struct ImageBitmaps {
    /// The bitmaps.
    pub set: Arc<BitmapSet>,
    lock: FileLock,
}

impl ImageBitmaps {
    /// Locks `image` (a clear "busy" error if another process holds it) and opens its sidecar
    /// bitmaps for a device of `size` bytes.
    ///
    /// Temporary files a crash left from saving the sidecar (`.tmp-NAME.bitmaps-…`) are removed
    /// first: every save of an image's sidecar happens under this lock, so none of them can be
    /// a save in progress.
    pub fn open(image: &Path, size: u64) -> Result<ImageBitmaps> {
        let lock = lock_image(image)?;
        let sidecar = sidecar_path(image);
        crate::durable::remove_leftover_temporaries(&sidecar);
        let set = Arc::new(BitmapSet::open(&sidecar, size)?);
        Ok(ImageBitmaps { set, lock })
    }

    /// Locks `image`, opened as `device`, and opens its bitmaps: inside the image when its
    /// format keeps them ([`BitmapSet::open_in_image`]; a sidecar left beside it is ignored),
    /// else its sidecar.
    pub fn open_on(device: &Arc<dyn BlockDevice>, image: &Path) -> Result<ImageBitmaps> {
        if device.persistent_bitmaps().is_none() {
            return ImageBitmaps::open(image, device.size());
        }
        let lock = lock_image(image)?;
        if sidecar_path(image).exists() {
            tracing::warn!(image = %image.display(), "the image keeps its dirty bitmaps itself; the sidecar beside it is ignored");
        }
        let set = Arc::new(BitmapSet::open_in_image(device.clone(), image)?);
        Ok(ImageBitmaps { set, lock })
    }
}

fn lock_image(image: &Path) -> Result<FileLock> {
    try_lock_exclusive(image, &format!("the bitmaps of image {}", image.display()))
}

impl TrackedDevice {
    /// Tracks writes to `inner` in the bitmaps stored at `path` (an image's sidecar file, see
    /// [`sidecar_path`]). Nothing is locked: see [`TrackedDevice::open_image`].
    pub fn open(inner: Arc<dyn BlockDevice>, path: &Path) -> Result<TrackedDevice> {
        let bitmaps = Arc::new(BitmapSet::open(path, inner.size())?);
        TrackedDevice::with_set(inner, bitmaps)
    }

    /// Tracks writes to `inner`, the image at `image`, in its bitmaps (see
    /// [`ImageBitmaps::open_on`]), holding the image's lock until the device is dropped.
    pub fn open_image(inner: Arc<dyn BlockDevice>, image: &Path) -> Result<TrackedDevice> {
        let held = ImageBitmaps::open_on(&inner, image)?;
        TrackedDevice::from_image_bitmaps(inner, held)
    }

    /// Tracks writes to `inner` in `held`, the bitmaps of its image, keeping the image locked.
    pub fn from_image_bitmaps(
        inner: Arc<dyn BlockDevice>,
        held: ImageBitmaps,
    ) -> Result<TrackedDevice> {
        let ImageBitmaps { set, lock } = held;
        let mut device = TrackedDevice::with_set(inner, set)?;
        device._image_lock = Some(lock);
        Ok(device)
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
            _image_lock: None,
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
        let inner = self.inner.clone();
        let lower = Lower {
            opener: Box::new(move |_, o| inner.open_queue(o)),
            depth: opts.depth,
            own_eventfd: false,
        };
        let layer = TrackedLayer {
            tracking: self.tracking.clone(),
        };
        let mut q = StackedQueue::new(layer, opts, lower)?;
        q.open_lower(0)?;
        Ok(Box::new(q))
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

/// What a tracked queue does: passes each request down and marks what it changed when it
/// completes. The stacked-queue mechanism (`crate::io::stack`) does the rest.
struct TrackedLayer {
    tracking: Arc<Tracking>,
}

impl fmt::Debug for TrackedLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrackedLayer")
            .field("bitmaps", &self.tracking.bitmaps.path())
            .finish()
    }
}

impl Layer for TrackedLayer {
    type Sub = InFlight;

    fn start(&mut self, st: &mut Stack<InFlight>, req: Request) {
        let changes = match req.op {
            Op::Read { .. } | Op::Flush => None,
            _ => req.op.range(),
        };
        st.send(0, (req.tag, changes), req.op);
    }

    fn finished(&mut self, st: &mut Stack<InFlight>, (tag, changes): InFlight, c: Completion) {
        if let Some((offset, len)) = changes {
            self.tracking.bitmaps.mark(offset, len);
        }
        st.complete(Completion { tag, ..c });
    }
}

//! The one rule for an image's dirty bitmaps: wherever an image file is opened for use (a VM
//! disk, an NBD export, a backup source, `strata vm run`), its sidecar bitmaps (see
//! [`sidecar_path`]) come with it — writes are tracked when the image is writable, the bitmaps
//! are readable either way, and the image stays locked against another process tracking it.

use std::path::Path;
use std::sync::Arc;

use crate::bitmap::{sidecar_path, BitmapSet, ImageBitmaps, TrackedDevice};
use crate::device::BlockDevice;
use crate::error::Result;

/// An image's device with its sidecar bitmaps attached (or none).
#[derive(Debug)]
pub struct WithBitmaps {
    device: Arc<dyn BlockDevice>,
    bitmaps: Option<Arc<BitmapSet>>,
    /// Holds the image's lock for a read-only device (a writable one holds it itself).
    _held: Option<ImageBitmaps>,
}

impl WithBitmaps {
    /// A device without bitmaps.
    pub fn none(device: Arc<dyn BlockDevice>) -> WithBitmaps {
        WithBitmaps {
            device,
            bitmaps: None,
            _held: None,
        }
    }

    /// The device to use: writes through it are tracked.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }

    /// The bitmaps, when the image has a sidecar.
    pub fn bitmaps(&self) -> Option<&Arc<BitmapSet>> {
        self.bitmaps.as_ref()
    }
}

/// Attaches the sidecar bitmaps of the image file `image`, opened as `device`, when it has
/// them.
pub fn attach_image_bitmaps(device: Arc<dyn BlockDevice>, image: &Path) -> Result<WithBitmaps> {
    if !sidecar_path(image).exists() {
        return Ok(WithBitmaps::none(device));
    }
    if device.read_only() {
        let held = ImageBitmaps::open(image, device.size())?;
        return Ok(WithBitmaps {
            device,
            bitmaps: Some(held.set.clone()),
            _held: Some(held),
        });
    }
    let tracked = TrackedDevice::open_image(device, image)?;
    let bitmaps = Some(tracked.bitmaps().clone());
    Ok(WithBitmaps {
        device: Arc::new(tracked),
        bitmaps,
        _held: None,
    })
}

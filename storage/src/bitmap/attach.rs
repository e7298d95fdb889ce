//! The one rule for an image's dirty bitmaps: wherever an image file is opened for use (a VM
//! disk, an NBD export, a backup source, `strata vm run`), its bitmaps (inside a qcow2 image,
//! else its sidecar, see [`sidecar_path`]) come with it — writes are tracked when the image is writable, the bitmaps
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

    /// The bitmaps, when the image has any.
    pub fn bitmaps(&self) -> Option<&Arc<BitmapSet>> {
        self.bitmaps.as_ref()
    }
}

/// Attaches the bitmaps of the image file `image`, opened as `device`, when it has any: the
/// enabled bitmaps inside the image when its format keeps them (qcow2), else its sidecar.
pub fn attach_image_bitmaps(device: Arc<dyn BlockDevice>, image: &Path) -> Result<WithBitmaps> {
    let in_image = device.persistent_bitmaps().is_some();
    if !in_image && !sidecar_path(image).exists() {
        return Ok(WithBitmaps::none(device));
    }
    let held = ImageBitmaps::open_on(&device, image)?;
    if in_image && held.set.is_empty() {
        return Ok(WithBitmaps::none(device));
    }
    if device.read_only() {
        return Ok(WithBitmaps {
            device,
            bitmaps: Some(held.set.clone()),
            _held: Some(held),
        });
    }
    let tracked = TrackedDevice::from_image_bitmaps(device, held)?;
    let bitmaps = Some(tracked.bitmaps().clone());
    Ok(WithBitmaps {
        device: Arc::new(tracked),
        bitmaps,
        _held: None,
    })
}

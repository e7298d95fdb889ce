//! Resolving what a command or the VMM names as its disk: `lv:VG/NAME` is a logical volume,
//! found through the devices file of the data directory; anything else is an image file opened
//! with [`crate::format::open_image`]. Convert, backup and the VMM use this so that volumes and
//! images are interchangeable.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::bitmap::{attach_image_bitmaps, BitmapSet, WithBitmaps};
use crate::device::BlockDevice;
use crate::error::Result;
use crate::format::{open_image, Image, OpenOptions};
use crate::volume::name::split_lv_path;
use crate::volume::{Group, VolumeStore};

/// The prefix naming a logical volume.
pub const LV_PREFIX: &str = "lv:";

/// What a source name refers to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    /// A logical volume `VG/NAME`.
    Volume {
        /// Volume group.
        vg: String,
        /// Volume.
        lv: String,
    },
    /// An image file.
    Path(PathBuf),
}

impl SourceSpec {
    /// Parses a source name; a malformed `lv:` name is an error.
    pub fn parse(spec: &str) -> Result<SourceSpec> {
        match spec.strip_prefix(LV_PREFIX) {
            Some(rest) => {
                let (vg, lv) = split_lv_path(rest)?;
                Ok(SourceSpec::Volume {
                    vg: vg.to_string(),
                    lv: lv.to_string(),
                })
            }
            None => Ok(SourceSpec::Path(PathBuf::from(spec))),
        }
    }
}

/// An opened source.
#[derive(Debug)]
pub enum Source {
    /// An image file, with its sidecar dirty bitmaps attached when it has them (writes tracked).
    Image {
        /// The image.
        image: Arc<dyn Image>,
        /// The device to use, and the bitmaps.
        tracked: WithBitmaps,
    },
    /// A logical volume, with its (locked) volume group.
    Volume {
        /// The volume.
        device: Arc<dyn BlockDevice>,
        /// Its group, kept open (a local one locked) as long as the source lives.
        vg: Group,
        /// `VG/NAME`.
        name: String,
    },
}

impl Source {
    /// An image without its bitmaps (a conversion reads it once).
    pub fn image(image: Arc<dyn Image>) -> Source {
        Source::Image {
            tracked: WithBitmaps::none(image.clone()),
            image,
        }
    }

    /// The block device (for an image with bitmaps, the one that tracks writes).
    pub fn device(&self) -> Arc<dyn BlockDevice> {
        match self {
            Source::Image { tracked, .. } => tracked.device().clone(),
            Source::Volume { device, .. } => device.clone(),
        }
    }

    /// The dirty bitmaps: an image's sidecar, a local volume's own; none for RBD volumes.
    pub fn bitmaps(&self) -> Option<Arc<BitmapSet>> {
        match self {
            Source::Image { tracked, .. } => tracked.bitmaps().cloned(),
            Source::Volume { vg, name, .. } => {
                let lv = name.split_once('/').map_or(name.as_str(), |(_, lv)| lv);
                vg.local("track changes of")
                    .and_then(|g| g.bitmaps(lv))
                    .ok()
            }
        }
    }

    /// The name to show.
    pub fn describe(&self) -> String {
        match self {
            Source::Image { image: i, .. } => i
                .info()
                .map(|i| i.filename)
                .unwrap_or_else(|_| "image".into()),
            Source::Volume { name, .. } => format!("{LV_PREFIX}{name}"),
        }
    }
}

/// Opens `spec` (see the module documentation) with `opts` (format, read-only, cache, engine);
/// volumes are looked up in `data_dir`.
pub fn open_source(spec: &str, opts: &OpenOptions, data_dir: &Path) -> Result<Source> {
    match SourceSpec::parse(spec)? {
        SourceSpec::Path(p) => {
            let image = open_image(&p, opts)?;
            let tracked = attach_image_bitmaps(image.clone(), &p)?;
            Ok(Source::Image { image, tracked })
        }
        SourceSpec::Volume { vg, lv } => {
            let store = VolumeStore::new(data_dir).with_io(opts.engine, opts.cache);
            let group = store.open_group(&vg, opts.read_only)?;
            let device = group.open_lv(&lv, opts.read_only)?;
            Ok(Source::Volume {
                device,
                vg: group,
                name: format!("{vg}/{lv}"),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        assert_eq!(
            SourceSpec::parse("lv:vg0/vm-100-disk-0").unwrap(),
            SourceSpec::Volume {
                vg: "vg0".into(),
                lv: "vm-100-disk-0".into()
            }
        );
        assert_eq!(
            SourceSpec::parse("/x/lv:y").unwrap(),
            SourceSpec::Path("/x/lv:y".into())
        );
        assert!(SourceSpec::parse("lv:vg0").is_err());
        assert!(SourceSpec::parse("lv:../x").is_err());
    }
}

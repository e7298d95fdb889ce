//! The image catalogue: the format of every appliance image, recorded when Strata makes it.
//!
//! An image's bytes are not evidence of its format. A raw image holds whatever its uploader or
//! its guest wrote, including a qcow2 header naming `/etc/shadow` as a backing file (QEMU's
//! CVE-2008-2004). So the server never probes the images in `DATA/images`: each one has a
//! record, `DATA/catalog/images/NAME.json`, written atomically by the operation that made the
//! image (create, upload, convert, restore) or by an admin who adopts a file that was put there
//! by hand. An image is always opened with its recorded format, and with
//! [`References::Refuse`], so that no image, whatever its bytes say, makes the server open
//! another file (a backing file, a parent disk, extent files). An image without a record is
//! listed as `unknown` and refused for use until adopted.
//!
//! # Ordering
//! A new image is moved to its name first and recorded second; removing one forgets the record
//! first and removes the file second. A crash in between leaves an image without a record
//! (refused until adopted), never a record that describes a file it was not written for.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use strata_storage::format::{self, Image, ImageFormat, OpenOptions, References};
use strata_storage::io::file::CacheMode;

use super::{names, write_atomically, Service, ServiceError, ServiceResult};

/// Version of the record layout.
const RECORD_VERSION: u32 = 1;

/// Largest record file read; records are a few hundred bytes.
const MAX_RECORD_BYTES: u64 = 64 << 10;

/// How an image came to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// `POST /api/images`.
    Create,
    /// An upload, converted into the image.
    Upload,
    /// A conversion from another image, a volume or an import file.
    Convert,
    /// A restore from the backup datastore.
    Restore,
    /// A file put into the image folder by hand, whose format an admin stated.
    Adopt,
}

/// What the catalogue knows about one image.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Layout version ([`RECORD_VERSION`]).
    pub version: u32,
    /// The format the image is always opened with.
    pub format: String,
    /// How it was made.
    pub origin: Origin,
    /// When it was recorded, seconds since the Unix epoch.
    pub recorded: u64,
}

impl ImageRecord {
    /// The recorded format.
    pub fn image_format(&self) -> ServiceResult<ImageFormat> {
        self.format.parse().map_err(|_| {
            ServiceError::internal(format!(
                "The image record names an unknown format {:?}",
                self.format
            ))
        })
    }
}

/// How appliance images are opened: with their recorded format, never following references to
/// other files.
pub fn appliance_open_options(format: ImageFormat, read_only: bool) -> OpenOptions {
    OpenOptions {
        format: Some(format),
        references: References::Refuse,
        read_only,
        ..OpenOptions::default()
    }
}

impl Service {
    fn record_path(&self, name: &str) -> ServiceResult<PathBuf> {
        names::validate("image", name)?;
        Ok(self.data().image_records_dir().join(format!("{name}.json")))
    }

    /// Records `name`'s format. Called after the image file has its name (see the module
    /// documentation for the order).
    pub fn record_image(&self, name: &str, fmt: ImageFormat, origin: Origin) -> ServiceResult<()> {
        let path = self.record_path(name)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| ServiceError::internal(format!("Creating {}: {e}", dir.display())))?;
        }
        let record = ImageRecord {
            version: RECORD_VERSION,
            format: fmt.to_string(),
            origin,
            recorded: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let text = serde_json::to_vec_pretty(&record)
            .map_err(|e| ServiceError::internal(format!("Encoding an image record: {e}")))?;
        write_atomically(&path, &text)
    }

    /// The record of `name`, or `None` when the image has none (its format is unknown).
    pub fn image_record(&self, name: &str) -> ServiceResult<Option<ImageRecord>> {
        let path = self.record_path(name)?;
        let text = match read_bounded(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(ServiceError::internal(format!(
                    "Reading {}: {e}",
                    path.display()
                )))
            }
        };
        let record: ImageRecord = serde_json::from_slice(&text).map_err(|e| {
            ServiceError::internal(format!("The record {} is damaged: {e}", path.display()))
        })?;
        if record.version != RECORD_VERSION {
            return Err(ServiceError::internal(format!(
                "The record {} has version {}, this server reads {RECORD_VERSION}",
                path.display(),
                record.version
            )));
        }
        Ok(Some(record))
    }

    /// Removes records whose image is gone (removed by hand): a file put there later under the
    /// same name must be unknown, not inherit the old record. Returns how many were removed.
    pub fn forget_stale_records(&self) -> ServiceResult<usize> {
        let dir = self.data().image_records_dir();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(0);
        };
        let mut removed = 0;
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            let Some(name) = file.strip_suffix(".json") else {
                continue;
            };
            if names::validate("image", name).is_ok()
                && !self.data().images_dir().join(name).exists()
                && std::fs::remove_file(e.path()).is_ok()
            {
                tracing::info!(
                    image = name,
                    "forgot the record of an image removed by hand"
                );
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Forgets `name`'s record (before its file is removed).
    pub fn forget_image_record(&self, name: &str) -> ServiceResult<()> {
        let path = self.record_path(name)?;
        match std::fs::remove_file(&path) {
            Ok(()) => strata_storage::format::raw::sync_parent_dir(&path).map_err(Into::into),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ServiceError::internal(format!(
                "Removing {}: {e}",
                path.display()
            ))),
        }
    }

    /// The recorded format of the existing image `name`: 409 when it has none.
    pub fn image_format(&self, name: &str) -> ServiceResult<ImageFormat> {
        match self.image_record(name)? {
            Some(r) => r.image_format(),
            None => Err(unknown_format(name)),
        }
    }

    /// Opens the appliance image `name` with its recorded format, refusing references to
    /// other files.
    pub fn open_appliance_image(
        &self,
        name: &str,
        read_only: bool,
    ) -> ServiceResult<(Arc<dyn Image>, ImageFormat)> {
        let path = self.image_path(name)?;
        if !path.is_file() {
            return Err(ServiceError::NotFound(format!("Image {name}")));
        }
        let fmt = self.image_format(name)?;
        let img = format::open_image(&path, &appliance_open_options(fmt, read_only))?;
        Ok((img, fmt))
    }

    /// Records the format of an image put into the image folder by hand, after checking that
    /// it opens in that format, names no other file, and (qcow2) passes a consistency check.
    /// Only admins may do this: the caller vouches for the file's origin.
    pub fn adopt_image(&self, name: &str, fmt: ImageFormat) -> ServiceResult<()> {
        let path = self.image_path(name)?;
        if !path.is_file() {
            return Err(ServiceError::NotFound(format!("Image {name}")));
        }
        if let Some(r) = self.image_record(name)? {
            return Err(ServiceError::Conflict(format!(
                "Image {name} is already recorded as {}",
                r.format
            )));
        }
        let opts = OpenOptions {
            cache: CacheMode::Writeback,
            ..appliance_open_options(fmt, true)
        };
        if fmt == ImageFormat::Qcow2 {
            let file = format::open_host_file(&path, &opts)?;
            let q = format::qcow2::open(
                file,
                &format::qcow2::Qcow2Options {
                    refuse_references: true,
                    ..Default::default()
                },
            )?;
            let report = q.check(format::qcow2::check::Repair::None)?;
            // Leaked clusters waste space but harm no data; anything else must be repaired.
            if report.check_errors > 0 || report.corruptions > 0 {
                return Err(ServiceError::Storage(
                    strata_storage::StorageError::corrupt(
                        name,
                        format!(
                            "qcow2 check found {} corruptions and {} errors; repair it with \
                             `strata image check -r all` before adopting it",
                            report.corruptions, report.check_errors
                        ),
                    ),
                ));
            }
        }
        let img = format::open_image(&path, &opts)?;
        drop(img);
        self.record_image(name, fmt, Origin::Adopt)
    }
}

/// The error for an image without a record.
pub fn unknown_format(name: &str) -> ServiceError {
    ServiceError::Conflict(format!(
        "Image {name} has no recorded format (it was put into the image folder by hand, or \
         made before formats were recorded); an admin must state it first: strata images \
         adopt {name} --format FORMAT"
    ))
}

fn read_bounded(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    let mut out = Vec::new();
    f.take(MAX_RECORD_BYTES).read_to_end(&mut out)?;
    Ok(out)
}

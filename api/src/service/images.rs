//! Images managed through the API: files in `DATA/images`, addressed by name.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use strata_storage::format::{self, ImageFormat, OpenOptions};
use strata_storage::io::file::CacheMode;
use strata_storage::util::parse_size;
use utoipa::ToSchema;

use super::catalog::Origin;
use super::{names, Service, ServiceError, ServiceResult};

/// An image as listed.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ImageSummary {
    /// Name (the file name in the image folder).
    pub name: String,
    /// Format (raw, qcow2, vmdk).
    pub format: String,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Bytes allocated on the host.
    pub actual_size: u64,
    /// Format-specific facts.
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
}

/// A request to create an image.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct CreateImage {
    /// Name of the new image.
    pub name: String,
    /// Format: raw, qcow2 or vmdk.
    #[serde(default = "default_format")]
    pub format: String,
    /// Virtual size, bytes or with a suffix ("10G").
    pub size: String,
    /// Format options, as with `strata image create -o`.
    #[serde(default)]
    pub options: String,
}

/// The format shown for an image without a record.
pub const UNKNOWN_FORMAT: &str = "unknown";

fn default_format() -> String {
    "raw".into()
}

impl Service {
    /// The path of the image called `name`, after validating the name.
    pub fn image_path(&self, name: &str) -> ServiceResult<PathBuf> {
        names::validate("image", name)?;
        Ok(self.data().images_dir().join(name))
    }

    fn existing_image(&self, name: &str) -> ServiceResult<PathBuf> {
        let p = self.image_path(name)?;
        if !p.is_file() {
            return Err(ServiceError::NotFound(format!("Image {name}")));
        }
        Ok(p)
    }

    /// Facts about one image. An image without a recorded format is reported as `unknown`
    /// with its host size only: it is not opened, since only its format record says how.
    pub fn image_info(&self, name: &str) -> ServiceResult<ImageSummary> {
        let path = self.existing_image(name)?;
        let Some(record) = self.image_record(name)? else {
            let allocated = std::fs::metadata(&path)
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .unwrap_or(0);
            return Ok(ImageSummary {
                name: name.to_string(),
                format: UNKNOWN_FORMAT.into(),
                virtual_size: 0,
                actual_size: allocated,
                details: serde_json::json!({
                    "error": super::catalog::unknown_format(name).to_string()
                }),
            });
        };
        let fmt = record.image_format()?;
        let opts = OpenOptions {
            cache: CacheMode::Writeback,
            ..super::catalog::appliance_open_options(fmt, true)
        };
        let img = format::open_image(&path, &opts)?;
        let info = img.info()?;
        Ok(ImageSummary {
            name: name.to_string(),
            format: info.format.to_string(),
            virtual_size: info.virtual_size,
            actual_size: info.actual_size,
            details: serde_json::to_value(&info.format_specific).unwrap_or_default(),
        })
    }

    /// Every image, by name. Files that fail to open are listed with their error as format.
    pub fn list_images(&self) -> ServiceResult<Vec<ImageSummary>> {
        let dir = self.data().images_dir();
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| ServiceError::internal(format!("Listing {}: {e}", dir.display())))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if names::validate("image", &name).is_err() || !entry.path().is_file() {
                continue;
            }
            out.push(self.image_info(&name).unwrap_or_else(|e| ImageSummary {
                name: name.clone(),
                format: format!("unreadable: {e}"),
                virtual_size: 0,
                actual_size: 0,
                details: serde_json::Value::Null,
            }));
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Creates an image.
    pub fn create_image(&self, req: &CreateImage) -> ServiceResult<ImageSummary> {
        let path = self.image_path(&req.name)?;
        let fmt: ImageFormat = req.format.parse()?;
        let size = parse_size(&req.size)?;
        let opts = format::parse_options(&req.options)?;
        self.server_paths.new_image_options(&opts)?;
        if opts
            .get("preallocation")
            .is_some_and(|p| p == "full" || p == "falloc")
        {
            // Preallocation writes (or reserves) the whole size at once.
            self.ensure_space(&path, size)?;
        }
        format::create_image(&path, fmt, size, &opts)?;
        self.record_image(&req.name, fmt, Origin::Create)?;
        // Another client may already have removed it again; report what was created anyway.
        self.image_info(&req.name).or_else(|e| match e {
            ServiceError::NotFound(_) => Ok(ImageSummary {
                name: req.name.clone(),
                format: fmt.to_string(),
                virtual_size: size,
                actual_size: 0,
                details: serde_json::Value::Null,
            }),
            other => Err(other),
        })
    }

    /// Removes an image.
    pub fn remove_image(&self, name: &str) -> ServiceResult<()> {
        let path = self.existing_image(name)?;
        let source = format!("{}{name}", super::vms::IMAGE_PREFIX);
        self.vms.unless_in_use(&source, || {
            // The record goes first: a crash in between leaves an unknown image, never a
            // record without its image.
            self.forget_image_record(name)?;
            std::fs::remove_file(&path).map_err(|e| match e.kind() {
                // Another client removed it first.
                std::io::ErrorKind::NotFound => ServiceError::NotFound(format!("Image {name}")),
                _ => ServiceError::internal(format!("Removing {}: {e}", path.display())),
            })
        })?;
        strata_storage::format::raw::sync_parent_dir(&path)?;
        Ok(())
    }
}

/// Eight hex digits for temporary file names.
pub(crate) fn random_tag() -> String {
    let mut suffix = [0u8; 4];
    let _ = getrandom::fill(&mut suffix);
    suffix.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::DataDir;

    #[test]
    fn images_are_created_listed_and_removed_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let svc = Service::open(DataDir::at(dir.path())).unwrap();
        let req = CreateImage {
            name: "a.img".into(),
            format: "raw".into(),
            size: "1M".into(),
            options: String::new(),
        };
        let s = svc.create_image(&req).unwrap();
        assert_eq!(s.virtual_size, 1 << 20);
        assert!(matches!(
            svc.create_image(&req),
            Err(ServiceError::Storage(_))
        ));
        assert_eq!(svc.list_images().unwrap().len(), 1);
        let bad = CreateImage {
            name: "../escape".into(),
            ..req.clone()
        };
        assert!(matches!(
            svc.create_image(&bad),
            Err(ServiceError::BadRequest(_))
        ));
        svc.remove_image("a.img").unwrap();
        assert!(matches!(
            svc.image_info("a.img"),
            Err(ServiceError::NotFound(_))
        ));
    }
}

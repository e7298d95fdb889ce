//! Images managed through the API: files in `DATA/images`, addressed by name.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use strata_storage::format::{self, ImageFormat, OpenOptions};
use strata_storage::io::file::CacheMode;
use strata_storage::util::parse_size;

use super::catalog::Origin;
use super::{names, Service, ServiceError, ServiceResult};

/// An image as listed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageSummary {
    /// Name (the file name in the image folder).
    pub name: String,
    /// Format (raw, qcow2, vmdk, vhd, vhdx).
    pub format: String,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Bytes allocated on the host.
    pub actual_size: u64,
    /// Format-specific facts.
    pub details: serde_json::Value,
}

/// A request to create an image.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateImage {
    /// Name of the new image.
    pub name: String,
    /// Format: raw, qcow2, vmdk, vhd or vhdx.
    #[serde(default = "default_format")]
    pub format: String,
    /// Virtual size, bytes or with a suffix ("10G").
    pub size: String,
    /// Format options, as with `strata image create -o`.
    #[serde(default)]
    pub options: String,
}

/// What creating an image gave: the image, or the job that writes it.
#[derive(Debug)]
pub enum Created {
    /// Made at once.
    Image(ImageSummary),
    /// Being written (preallocation).
    Job(Arc<super::jobs::Job>),
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

    /// Creates an image. With preallocation (`full`, `falloc`, qcow2 `metadata`) the image is
    /// written by a cancellable job, built under a hidden name and published when complete, with
    /// its space reserved; without, it is made at once.
    pub fn create_image(self: &Arc<Self>, req: &CreateImage) -> ServiceResult<Created> {
        let path = self.image_path(&req.name)?;
        let fmt: ImageFormat = req.format.parse()?;
        let size = parse_size(&req.size)?;
        let opts = format::parse_options(&req.options)?;
        check_new_image(fmt, size, &opts, false)?;
        if path.exists() {
            return Err(ServiceError::Conflict(format!(
                "Image {} already exists",
                req.name
            )));
        }
        let prealloc = opts
            .get("preallocation")
            .map(String::as_str)
            .filter(|p| *p != "off");
        if let Some(mode) = prealloc {
            // What preallocation writes: the data (full, falloc) and the tables (qcow2).
            let tables = if fmt == ImageFormat::Qcow2 {
                size / 8192 + (1 << 20)
            } else {
                0
            };
            let data = if mode == "metadata" { 0 } else { size };
            let reservation = self.reserve_space(&path, data.saturating_add(tables))?;
            let staged = strata_storage::convert::Staged::new(&path, fmt)?;
            let svc = self.clone();
            let name = req.name.clone();
            let desc = format!(
                "create {} ({fmt}, {size} bytes, preallocation={mode})",
                req.name
            );
            let job = self.jobs.clone().spawn("create", desc, move |ctx| {
                ctx.set_total(size);
                format::create_image_cancellable(staged.build_path(), fmt, size, &opts, &|| {
                    ctx.is_cancelled()
                })?;
                ctx.check_cancelled()?;
                staged.commit()?;
                svc.record_image(&name, fmt, Origin::Create)?;
                drop(reservation);
                ctx.set_done(size);
                Ok(serde_json::to_value(svc.image_info(&name)?).unwrap_or_default())
            })?;
            return Ok(Created::Job(job));
        }
        format::create_image(&path, fmt, size, &opts)?;
        self.record_image(&req.name, fmt, Origin::Create)?;
        // Another client may already have removed it again; report what was created anyway.
        let summary = self.image_info(&req.name).or_else(|e| match e {
            ServiceError::NotFound(_) => Ok(ImageSummary {
                name: req.name.clone(),
                format: fmt.to_string(),
                virtual_size: size,
                actual_size: 0,
                details: serde_json::Value::Null,
            }),
            other => Err(other),
        })?;
        Ok(Created::Image(summary))
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

/// Format options that would make an image read another file.
const FILE_OPTIONS: [&str; 4] = ["backing_file", "backing_fmt", "data_file", "data_file_raw"];

/// Checks a new appliance image before anything is made or a job starts: it must be one
/// self-contained file (no backing or data file, no vmdk split into extent files), and the
/// options must suit the format and size. What the job would refuse as bad input is refused
/// here, as a 400 or 403 instead of a failed job.
pub fn check_new_image(
    fmt: ImageFormat,
    size: u64,
    options: &std::collections::BTreeMap<String, String>,
    compress: bool,
) -> ServiceResult<()> {
    if let Some(k) = FILE_OPTIONS.iter().find(|k| options.contains_key(**k)) {
        return Err(ServiceError::Forbidden(format!(
            "The option {k} makes an image read another file on the server; appliance images \
             are self-contained (use volume snapshots and clones for linked copies)"
        )));
    }
    if fmt == ImageFormat::Vmdk {
        let sub = options
            .get("subformat")
            .map(String::as_str)
            .unwrap_or(if compress {
                "streamOptimized"
            } else {
                "monolithicSparse"
            });
        if !["monolithicSparse", "streamOptimized"]
            .iter()
            .any(|s| s.eq_ignore_ascii_case(sub))
        {
            return Err(ServiceError::BadRequest(format!(
                "A vmdk of subformat {sub} is several files; appliance images are single files \
                 (subformat=monolithicSparse or streamOptimized)"
            )));
        }
        if compress && !sub.eq_ignore_ascii_case("streamOptimized") {
            return Err(ServiceError::BadRequest(format!(
                "Compressed vmdk images are streamOptimized, not {sub}"
            )));
        }
    }
    if compress && fmt == ImageFormat::Raw {
        return Err(ServiceError::BadRequest(
            "Raw images cannot be compressed (use qcow2 or vmdk)".into(),
        ));
    }
    format::check_create_options(fmt, size, options)?;
    Ok(())
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
    use crate::DataDir;

    #[test]
    fn images_are_created_listed_and_removed_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let svc = Arc::new(Service::open(DataDir::at(dir.path())).unwrap());
        let req = CreateImage {
            name: "a.img".into(),
            format: "raw".into(),
            size: "1M".into(),
            options: String::new(),
        };
        let Created::Image(s) = svc.create_image(&req).unwrap() else {
            panic!("an image without preallocation is made at once")
        };
        assert_eq!(s.virtual_size, 1 << 20);
        assert_eq!(svc.create_image(&req).unwrap_err().status(), 409);
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

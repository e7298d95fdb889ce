//! Moving disk contents: conversion between images and volumes, uploads and downloads.
//!
//! A conversion runs as a job. Its target is a new image in the image folder (`image:NAME`,
//! built under a temporary name and moved into place only when complete; removed again if the
//! job is cancelled after that) or an existing volume (`lv:VG/NAME`, written in place like `convert -n`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use strata_storage::convert::{self, ConvertOptions, ConvertProgress, ConvertTarget};
use strata_storage::format::{self, ImageFormat};
use strata_storage::source::SourceSpec;
use strata_storage::{BlockDevice, ExtentKind};

use super::catalog::{appliance_open_options, Origin};
use super::jobs::{Job, JobContext};
use super::progress::JobProgress;
use super::space::Reservation;
use super::volumes::Resolved;
use super::{names, Service, ServiceError, ServiceResult};

/// A request to convert (import, export, copy) disk contents.
#[derive(Clone, Debug, Deserialize)]
pub struct ConvertRequest {
    /// `lv:VG/NAME`, `image:NAME`, or an absolute path on the server.
    pub source: String,
    /// `image:NAME` (a new image) or `lv:VG/NAME` (an existing volume at least as large).
    pub target: String,
    /// Format of a new image (raw, qcow2, vmdk, vhd, vhdx); default qcow2.
    pub format: Option<String>,
    /// Format options of a new image, as with `strata image create -o`.
    #[serde(default)]
    pub options: String,
    /// Write a compressed image (qcow2, or streamOptimized vmdk).
    #[serde(default)]
    pub compress: bool,
    /// Format of a source given as a server path (raw, qcow2, vmdk, vhd, vhdx); probed when absent.
    /// Appliance images and volumes have a recorded format and take none.
    #[serde(default)]
    pub source_format: Option<String>,
}

impl Service {
    /// A scratch folder for uploads and downloads in progress.
    pub fn scratch_dir(&self) -> ServiceResult<PathBuf> {
        let d = self.data().root().join("scratch");
        std::fs::create_dir_all(&d)
            .map_err(|e| ServiceError::internal(format!("Creating {}: {e}", d.display())))?;
        Ok(d)
    }

    /// Removes what jobs of an earlier server process left behind when it died: uploads in the
    /// scratch folder and hidden partial images. Called by `strata serve` before it listens,
    /// when no job of this process can be running.
    pub fn remove_leftovers(&self) -> ServiceResult<usize> {
        let mut removed = self.forget_stale_records()?;
        let scratch = self.scratch_dir()?;
        let leftovers = [
            // Uploads that were never converted.
            (scratch, None),
            // Staged images of conversions and restores (files, or folders for vmdk).
            (self.data().images_dir(), Some(".convert-")),
        ];
        for (dir, marker) in leftovers {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let stale = match marker {
                    None => true,
                    Some(m) => name.starts_with('.') && name.contains(m),
                };
                if !stale {
                    continue;
                }
                let path = e.path();
                let gone = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                if gone.is_ok() {
                    tracing::info!(file = %path.display(), "removed a leftover of an interrupted job");
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Starts a conversion job.
    pub fn start_convert(self: &Arc<Self>, req: ConvertRequest) -> ServiceResult<Arc<Job>> {
        let source_format = parse_format(req.source_format.as_deref())?;
        let source =
            self.resolve_source_as(&req.source, true, source_format, "a conversion job")?;
        self.start_convert_from(req, source, None, Origin::Convert)
    }

    /// Starts a conversion job from the opened `source` (named `req.source` in the job's
    /// description) that removes `upload` (an uploaded file) when it ends. The job holds a
    /// reservation for what it may write.
    fn start_convert_from(
        self: &Arc<Self>,
        req: ConvertRequest,
        source: Resolved,
        upload: Option<Upload>,
        origin: Origin,
    ) -> ServiceResult<Arc<Job>> {
        let desc = format!("convert {} to {}", req.source, req.target);
        if let Some(image) = req.target.strip_prefix("image:") {
            let path = self.image_path(image)?;
            if path.exists() {
                return Err(ServiceError::Conflict(format!(
                    "Image {image} already exists"
                )));
            }
            let fmt: ImageFormat = req.format.as_deref().unwrap_or("qcow2").parse()?;
            let opts = format::parse_options(&req.options)?;
            super::images::check_new_image(fmt, source.device().size(), &opts, req.compress)?;
            let reservation = self.reserve_for(&path, source.device().as_ref())?;
            // The conversion builds a hidden file (names never start with '.', so listings skip
            // it) and moves it to its name only once complete and flushed.
            let svc = self.clone();
            let name = image.to_string();
            return self.jobs.clone().spawn("convert", desc, move |ctx| {
                let result = convert_to_new(
                    source.device().as_ref(),
                    &path,
                    fmt,
                    &opts,
                    req.compress,
                    ctx,
                )
                .and_then(|report| {
                    svc.record_image(&name, fmt, origin)?;
                    Ok(report)
                });
                drop(upload);
                drop(reservation);
                result
            });
        }
        if !req.target.starts_with("lv:") {
            return Err(ServiceError::BadRequest(format!(
                "Conversion target {:?} must be image:NAME (a new image) or lv:VG/NAME (an existing volume)",
                req.target
            )));
        }
        if req.compress || !req.options.is_empty() || req.format.is_some() {
            return Err(ServiceError::BadRequest(
                "format, options and compress apply to new images, not volumes".into(),
            ));
        }
        if let (Resolved::Volume { vg, lv, .. }, Ok(SourceSpec::Volume { vg: tvg, lv: tlv })) =
            (&source, SourceSpec::parse(&req.target))
        {
            if vg.name() == tvg && *lv == tlv {
                return Err(ServiceError::Conflict(format!(
                    "Cannot convert {} onto itself",
                    req.target
                )));
            }
        }
        let target = self.resolve_source(&req.target, false, "a conversion job")?;
        let (have, need) = (target.device().size(), source.device().size());
        if have < need {
            return Err(ServiceError::BadRequest(format!(
                "{} holds {have} bytes, less than the source's {need}; resize it first",
                req.target
            )));
        }
        let reservation = self.reserve_in_volume(&target, data_bytes(source.device().as_ref())?)?;
        self.jobs.clone().spawn("convert", desc, move |ctx| {
            let opts = ConvertOptions {
                existing_target: true,
                ..Default::default()
            };
            let result = run_convert(
                source.device().as_ref(),
                ConvertTarget::Device(target.device().as_ref()),
                &opts,
                ctx,
            );
            drop(upload);
            drop(reservation);
            result
        })
    }

    /// Reserves `len` bytes on the file system that will hold `path` (507 when they are not
    /// free after other writers' reservations).
    pub fn reserve_space(&self, path: &Path, len: u64) -> ServiceResult<Reservation> {
        let dir = path.parent().unwrap_or(path);
        self.space.on_file_system(dir, len)
    }

    /// Reserves room for a new image at `path` that will receive `src`'s data: a small
    /// compressed upload or image can expand a hundredfold, so the source's file size is no
    /// guide; its data, measured by its block status, is.
    pub fn reserve_for(&self, path: &Path, src: &dyn BlockDevice) -> ServiceResult<Reservation> {
        self.reserve_space(path, data_bytes(src)?)
    }

    /// Reserves what writing `bytes` into the volume `target` may take: room in its thin pool
    /// (a linear volume's extents are its own), and, when the group's physical volumes are
    /// sparse files (the embedded default), room on the file systems holding them, which fill
    /// as the volume is written.
    pub fn reserve_in_volume(
        &self,
        target: &Resolved,
        bytes: u64,
    ) -> ServiceResult<Vec<Reservation>> {
        let Resolved::Volume { vg, lv, .. } = target else {
            return Ok(Vec::new());
        };
        let mut held = Vec::new();
        // RBD groups have no thin pools here; their pool's quota answers for itself.
        let Ok(vg) = vg.local("reserve space in") else {
            return Ok(held);
        };
        if let Some(pool) = vg.lv_info(lv)?.pool {
            let usage = vg.pool(&pool)?.usage();
            let free = usage
                .data_blocks
                .saturating_sub(usage.used_blocks)
                .saturating_mul(usage.block_size);
            held.push(self.space.in_pool(&vg.name(), &pool, free, bytes)?);
        }
        let mut file_systems = std::collections::BTreeSet::new();
        for pv in vg.info().pvs {
            let path = std::path::Path::new(&pv.path);
            let Ok(meta) = std::fs::metadata(path) else {
                continue;
            };
            use std::os::unix::fs::MetadataExt;
            if meta.is_file() && file_systems.insert(meta.dev()) {
                held.push(self.reserve_space(path, bytes)?);
            }
        }
        Ok(held)
    }

    /// A file to receive an upload into; the caller streams the body into it.
    pub fn upload_path(&self, name: &str) -> ServiceResult<PathBuf> {
        names::validate("image", name)?;
        if self.image_path(name)?.exists() {
            return Err(ServiceError::Conflict(format!(
                "Image {name} already exists"
            )));
        }
        Ok(self
            .scratch_dir()?
            .join(format!("upload-{name}-{}", super::images::random_tag())))
    }

    /// Starts converting an uploaded file (already written to `uploaded`, from
    /// [`Service::upload_path`]) into the new image `name`; the upload is removed when the job
    /// ends. Uploads must be self-contained: a backing file or an extent in another file would
    /// let a client read files on the server, so they are refused.
    pub fn start_import_upload(
        self: &Arc<Self>,
        name: &str,
        upload: Upload,
        format: Option<String>,
        source_format: Option<String>,
    ) -> ServiceResult<Arc<Job>> {
        let uploaded = upload.path.clone();
        let checked = (|| {
            // The uploader wrote every byte of the upload, so its format may be probed like a
            // file handed to qemu-img; but it may not name other files on the server.
            let img = format::open_image(
                &uploaded,
                &format::OpenOptions {
                    format: parse_format(source_format.as_deref())?,
                    references: format::References::Refuse,
                    read_only: true,
                    ..Default::default()
                },
            )?;
            let fmt = img.format().to_string();
            Ok::<_, ServiceError>(Resolved::image_untracked(img, fmt))
        })();
        let source = checked.map_err(|e| upload_error(e, &uploaded))?;
        let req = ConvertRequest {
            source: format!("the upload of {name}"),
            target: format!("image:{name}"),
            format,
            options: String::new(),
            compress: false,
            source_format: None,
        };
        self.start_convert_from(req, source, Some(upload), Origin::Upload)
    }

    /// Prepares an image for download in `format`: the image itself when it already has that
    /// format, else a converted copy in the scratch folder (second value: delete it afterwards).
    /// The conversion stops, and its copy is removed, once `gone` says the client went away.
    pub fn download_file(
        &self,
        name: &str,
        fmt: ImageFormat,
        gone: &dyn Fn() -> bool,
    ) -> ServiceResult<(PathBuf, bool)> {
        let own = self.image_format(name)?;
        let path = self.image_path(name)?;
        if own == fmt {
            return Ok((path, false));
        }
        // A name of its own per download: two downloads of one image must not share a file.
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let out = self.scratch_dir()?.join(format!(
            "download-{name}-{}-{nonce:x}.{fmt}",
            std::process::id()
        ));
        let src = self.resolve_source(&format!("image:{name}"), true, "a download")?;
        let _reservation = self.reserve_for(&out, src.device().as_ref())?;
        let result = (|| -> ServiceResult<()> {
            format::create_image(&out, fmt, src.device().size(), &Default::default())?;
            let dst = format::open_image(&out, &appliance_open_options(fmt, false))?;
            convert::convert(
                src.device().as_ref(),
                ConvertTarget::Device(dst.as_ref()),
                &ConvertOptions::default(),
                &UntilGone(gone),
            )?;
            Ok(())
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&out);
            return Err(e);
        }
        Ok((out, true))
    }
}

/// A conversion's progress for a download: nowhere, but it stops when the client is gone.
struct UntilGone<'a>(&'a dyn Fn() -> bool);

impl ConvertProgress for UntilGone<'_> {
    fn progress(&self, _done: u64, _total: u64) {}

    fn cancelled(&self) -> bool {
        (self.0)()
    }
}

/// An upload received into the scratch folder: removed, and its reservation released, when
/// dropped (when its conversion ends, or when the request fails before that).
#[derive(Debug)]
pub struct Upload {
    /// The file.
    pub path: PathBuf,
    /// The space it takes.
    pub reservation: Reservation,
}

impl Drop for Upload {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// An error about the uploaded file as its uploader should see it: the scratch file's path is
/// the server's business, and an upload naming other files is a bad request (400).
fn upload_error(e: ServiceError, uploaded: &Path) -> ServiceError {
    use strata_storage::StorageError as S;
    let path = uploaded.display().to_string();
    let clean = |t: &str| t.replace(&path, "the upload");
    match e {
        ServiceError::Storage(S::Forbidden(m)) => ServiceError::BadRequest(format!(
            "{}; upload self-contained images only (qemu-img convert them first)",
            clean(&m)
        )),
        ServiceError::Storage(S::Corrupt { detail, .. }) => {
            ServiceError::Storage(S::corrupt("upload", clean(&detail)))
        }
        ServiceError::Storage(S::Unsupported(m)) => {
            ServiceError::Storage(S::Unsupported(clean(&m)))
        }
        ServiceError::Storage(S::InvalidInput(m)) => ServiceError::BadRequest(clean(&m)),
        ServiceError::Storage(S::Io { context, source }) => {
            ServiceError::internal(format!("{}: {source}", clean(&context)))
        }
        other => other,
    }
}

/// A format named in a request, if any.
pub(crate) fn parse_format(name: Option<&str>) -> ServiceResult<Option<ImageFormat>> {
    name.map(str::parse::<ImageFormat>)
        .transpose()
        .map_err(|e| ServiceError::BadRequest(e.to_string()))
}

/// Most calls of `block_status` spent measuring a source's data; beyond, its whole size counts.
const MAX_STATUS_CALLS: u32 = 1 << 20;

/// Bytes of `dev` that hold data (what a conversion may write), from its block status; its
/// virtual size when the map is too fragmented to walk quickly.
fn data_bytes(dev: &dyn BlockDevice) -> ServiceResult<u64> {
    let size = dev.size();
    let (mut at, mut data) = (0u64, 0u64);
    for _ in 0..MAX_STATUS_CALLS {
        if at >= size {
            return Ok(data);
        }
        let e = dev.block_status(at, size - at)?;
        if e.len == 0 {
            break;
        }
        if e.kind == ExtentKind::Data {
            data += e.len;
        }
        at += e.len;
    }
    Ok(if at >= size { data } else { size })
}

fn convert_to_new(
    src: &dyn strata_storage::BlockDevice,
    path: &Path,
    fmt: ImageFormat,
    opts: &std::collections::BTreeMap<String, String>,
    compress: bool,
    ctx: &JobContext,
) -> ServiceResult<serde_json::Value> {
    ctx.set_total(src.size());
    let new = convert::NewImage {
        path,
        format: fmt,
        options: opts,
        compress,
        open: format::OpenOptions::default(),
    };
    let report = convert::convert_to_new_image(
        src,
        &new,
        &ConvertOptions::default(),
        &JobProgress::new(ctx),
    )?;
    if let Err(e) = ctx.check_cancelled() {
        // Cancelled just as the image was completed: take back what this job made.
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(serde_json::to_value(report).unwrap_or_default())
}

fn run_convert(
    src: &dyn strata_storage::BlockDevice,
    target: ConvertTarget<'_>,
    opts: &ConvertOptions,
    ctx: &JobContext,
) -> ServiceResult<serde_json::Value> {
    ctx.set_total(src.size());
    let report = convert::convert(src, target, opts, &JobProgress::new(ctx))?;
    ctx.check_cancelled()?;
    Ok(serde_json::to_value(report).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn data_bytes_counts_what_a_conversion_would_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.raw");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&vec![7u8; 1 << 20], 4 << 20).unwrap();
        f.sync_all().unwrap();
        let img = format::open_image(
            &path,
            &format::OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(data_bytes(img.as_ref()).unwrap(), 1 << 20);
    }
}

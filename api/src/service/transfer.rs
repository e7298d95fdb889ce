//! Moving disk contents: conversion between images and volumes, uploads and downloads.
//!
//! A conversion runs as a job. Its target is a new image in the image folder (`image:NAME`,
//! created by the job in the requested format and removed again if the job fails or is
//! cancelled) or an existing volume (`lv:VG/NAME`, written in place like `convert -n`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use strata_storage::convert::{self, ConvertOptions, ConvertTarget};
use strata_storage::format::{self, ImageFormat};
use utoipa::ToSchema;

use super::jobs::{Job, JobContext};
use super::progress::JobProgress;
use super::{names, Service, ServiceError, ServiceResult};

/// A request to convert (import, export, copy) disk contents.
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct ConvertRequest {
    /// `lv:VG/NAME`, `image:NAME`, or an absolute path on the server.
    pub source: String,
    /// `image:NAME` (a new image) or `lv:VG/NAME` (an existing volume at least as large).
    pub target: String,
    /// Format of a new image (raw, qcow2, vmdk); default qcow2.
    pub format: Option<String>,
    /// Format options of a new image, as with `strata image create -o`.
    #[serde(default)]
    pub options: String,
    /// Write a compressed image (qcow2, or streamOptimized vmdk).
    #[serde(default)]
    pub compress: bool,
}

impl Service {
    /// A scratch folder for uploads and downloads in progress.
    pub fn scratch_dir(&self) -> ServiceResult<PathBuf> {
        let d = self.data().root().join("scratch");
        std::fs::create_dir_all(&d)
            .map_err(|e| ServiceError::internal(format!("Creating {}: {e}", d.display())))?;
        Ok(d)
    }

    /// Starts a conversion job.
    pub fn start_convert(self: &Arc<Self>, req: ConvertRequest) -> ServiceResult<Arc<Job>> {
        self.start_convert_then(req, None)
    }

    /// Starts a conversion job that removes `cleanup` (an uploaded file) when it ends.
    pub fn start_convert_then(
        self: &Arc<Self>,
        req: ConvertRequest,
        cleanup: Option<PathBuf>,
    ) -> ServiceResult<Arc<Job>> {
        let source = self.resolve_source(&req.source, true)?;
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
            return self.jobs.clone().spawn("convert", desc, move |ctx| {
                let result = convert_to_new(
                    source.device().as_ref(),
                    &path,
                    fmt,
                    &opts,
                    req.compress,
                    ctx,
                );
                if result.is_err() {
                    let _ = std::fs::remove_file(&path);
                }
                if let Some(c) = cleanup {
                    let _ = std::fs::remove_file(c);
                }
                result
            });
        }
        if !req.target.starts_with("lv:") {
            return Err(ServiceError::BadRequest(format!(
                "Conversion target {:?} must be image:NAME (a new image) or lv:VG/NAME (an existing volume)",
                req.target
            )));
        }
        if req.compress || !req.options.is_empty() {
            return Err(ServiceError::BadRequest(
                "compress and options apply to new images, not volumes".into(),
            ));
        }
        let target = self.resolve_source(&req.target, false)?;
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
            if let Some(c) = cleanup {
                let _ = std::fs::remove_file(c);
            }
            result
        })
    }

    /// A file to receive an upload into; the caller streams the body into it.
    pub fn upload_path(&self, name: &str) -> ServiceResult<PathBuf> {
        names::validate("image", name)?;
        if self.image_path(name)?.exists() {
            return Err(ServiceError::Conflict(format!(
                "Image {name} already exists"
            )));
        }
        let mut suffix = [0u8; 4];
        let _ = getrandom::fill(&mut suffix);
        let tag: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
        Ok(self.scratch_dir()?.join(format!("upload-{name}-{tag}")))
    }

    /// Prepares an image for download in `format`: the image itself when it already has that
    /// format, else a converted copy in the scratch folder (second value: delete it afterwards).
    pub fn download_file(&self, name: &str, fmt: ImageFormat) -> ServiceResult<(PathBuf, bool)> {
        let info = self.image_info(name)?;
        let path = self.image_path(name)?;
        if info.format == fmt.to_string() {
            return Ok((path, false));
        }
        let out = self.scratch_dir()?.join(format!("download-{name}.{fmt}"));
        let _ = std::fs::remove_file(&out);
        let src = self.resolve_source(&format!("image:{name}"), true)?;
        let result = (|| -> ServiceResult<()> {
            format::create_image(&out, fmt, src.device().size(), &Default::default())?;
            let dst = format::open_image(
                &out,
                &format::OpenOptions {
                    format: Some(fmt),
                    ..Default::default()
                },
            )?;
            convert::convert(
                src.device().as_ref(),
                ConvertTarget::Device(dst.as_ref()),
                &ConvertOptions::default(),
                &convert::NoProgress,
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

fn convert_to_new(
    src: &dyn strata_storage::BlockDevice,
    path: &Path,
    fmt: ImageFormat,
    opts: &std::collections::BTreeMap<String, String>,
    compress: bool,
    ctx: &JobContext,
) -> ServiceResult<serde_json::Value> {
    let size = src.size();
    if compress {
        let w = format::create_compressed(path, fmt, size, opts)?;
        return run_convert(
            src,
            ConvertTarget::Compressed(w),
            &ConvertOptions::default(),
            ctx,
        );
    }
    format::create_image(path, fmt, size, opts)?;
    let dst = format::open_image(
        path,
        &format::OpenOptions {
            format: Some(fmt),
            ..Default::default()
        },
    )?;
    run_convert(
        src,
        ConvertTarget::Device(dst.as_ref()),
        &ConvertOptions::default(),
        ctx,
    )
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

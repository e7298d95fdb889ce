//! Moving disk contents over HTTP: conversion jobs, uploads into new images, downloads in any
//! format.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use utoipa::IntoParams;

use super::limits::{declared_length, HttpLimits};
use super::{blocking, ApiError, ApiJson, ApiResult};
use strata_service::jobs::JobStatus;
use strata_service::transfer::{ConvertRequest, Upload};
use strata_service::volumes::Resolved;
use strata_service::{Service, ServiceError};
use strata_storage::format::ImageFormat;

pub(super) fn routes() -> Router<Arc<Service>> {
    Router::new()
        .route("/api/convert", post(convert))
        .route(
            "/api/images/{name}/upload",
            put(upload).layer(DefaultBodyLimit::disable()),
        )
        .route("/api/images/{name}/download", get(download))
        .route("/api/volumes/{vg}/{name}/download", get(download_volume))
}

/// Convert an image or volume into a new image or onto an existing volume (a job).
#[utoipa::path(post, path = "/api/convert", tag = "images", request_body = super::schema::ConvertRequest,
    responses((status = 202, body = super::schema::JobStatus), (status = 400, body = super::ErrorBody),
              (status = 401, body = super::ErrorBody), (status = 404, body = super::ErrorBody),
              (status = 409, body = super::ErrorBody)))]
pub(super) async fn convert(
    State(svc): State<Arc<Service>>,
    ApiJson(req): ApiJson<ConvertRequest>,
) -> ApiResult<(StatusCode, Json<JobStatus>)> {
    let job = blocking(&svc, move |s| s.start_convert(req)).await?;
    Ok((StatusCode::ACCEPTED, Json(job.status())))
}

/// Format of a new or downloaded image.
#[derive(Debug, Deserialize, IntoParams)]
pub(super) struct FormatQuery {
    /// raw, qcow2, vmdk, vhd or vhdx (upload: the new image's format, default qcow2; download: the
    /// format to send, default the image's own).
    format: Option<String>,
    /// Upload only: the uploaded file's format (raw, qcow2, vmdk, vhd, vhdx); probed when absent. The
    /// upload may not name other files (backing files, extents) either way.
    source_format: Option<String>,
}

/// Upload a disk image (raw, qcow2, vmdk, vhd or vhdx; probed unless source_format says) as the body; it is converted into the new
/// image `name` by a job. The body must state its length.
#[utoipa::path(put, path = "/api/images/{name}/upload", tag = "images",
    params(("name" = String, Path, description = "Name of the new image"), FormatQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 202, body = super::schema::JobStatus), (status = 400, body = super::ErrorBody),
              (status = 401, body = super::ErrorBody), (status = 409, body = super::ErrorBody),
              (status = 411, body = super::ErrorBody), (status = 507, body = super::ErrorBody)))]
pub(super) async fn upload(
    State(svc): State<Arc<Service>>,
    Extension(limits): Extension<HttpLimits>,
    Path(name): Path<String>,
    Query(q): Query<FormatQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<JobStatus>)> {
    let length = declared_length(&headers)?.ok_or(ApiError(ServiceError::LengthRequired))?;
    if length > limits.max_upload {
        super::limits::linger(body);
        return Err(ApiError(ServiceError::TooLarge {
            limit: limits.max_upload,
        }));
    }
    let n = name.clone();
    // The upload's file and its reserved space go with this value: dropped (the client went
    // away, a check failed) they are removed and released.
    let upload = blocking(&svc, move |s| {
        let path = s.upload_path(&n)?;
        let reservation = s.reserve_space(&path, length)?;
        Ok(Upload { path, reservation })
    })
    .await?;
    receive(body, &upload, length, &limits).await?;
    let job = blocking(&svc, move |s| {
        s.start_import_upload(&name, upload, q.format, q.source_format)
    })
    .await?;
    Ok((StatusCode::ACCEPTED, Json(job.status())))
}

/// Streams `body` into the upload's new file, refusing more or fewer than `length` bytes, a
/// pause longer than the idle timeout and an upload past its deadline.
async fn receive(body: Body, upload: &Upload, length: u64, limits: &HttpLimits) -> ApiResult<()> {
    let path = &upload.path;
    let io = |e: std::io::Error| {
        ApiError(ServiceError::internal(format!(
            "Writing {}: {e}",
            path.display()
        )))
    };
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .await
        .map_err(io)?;
    let mut stream = body.into_data_stream();
    let mut got = 0u64;
    let deadline = tokio::time::Instant::now() + limits.upload_deadline;
    loop {
        let idle_until = tokio::time::Instant::now() + limits.body_idle_timeout;
        let next = tokio::time::timeout_at(idle_until.min(deadline), stream.next())
            .await
            .map_err(|_| {
                let why = if tokio::time::Instant::now() >= deadline {
                    format!(
                        "The upload did not finish within {} s",
                        limits.upload_deadline.as_secs()
                    )
                } else {
                    format!(
                        "The upload paused for more than {} s",
                        limits.body_idle_timeout.as_secs()
                    )
                };
                ApiError(ServiceError::Timeout(why))
            })?;
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| {
            ApiError(ServiceError::BadRequest(format!(
                "The upload broke off: {e}"
            )))
        })?;
        got += chunk.len() as u64;
        if got > length {
            return Err(ApiError(ServiceError::BadRequest(format!(
                "The upload is longer than its Content-Length of {length} bytes"
            ))));
        }
        file.write_all(&chunk).await.map_err(io)?;
        upload.reservation.consumed(got);
    }
    if got != length {
        return Err(ApiError(ServiceError::BadRequest(format!(
            "The upload ended after {got} of {length} bytes"
        ))));
    }
    file.sync_all().await.map_err(io)?;
    Ok(())
}

/// Download an image: its own file, its contents as raw read straight from the image (for
/// `format=raw`), or a converted copy (for another format).
#[utoipa::path(get, path = "/api/images/{name}/download", tag = "images",
    params(("name" = String, Path, description = "Image name"), FormatQuery),
    responses((status = 200, description = "The image file", content_type = "application/octet-stream"),
              (status = 400, body = super::ErrorBody), (status = 401, body = super::ErrorBody),
              (status = 404, body = super::ErrorBody)))]
pub(super) async fn download(
    State(svc): State<Arc<Service>>,
    Path(name): Path<String>,
    Query(q): Query<FormatQuery>,
) -> ApiResult<Response> {
    let n = name.clone();
    // Set when this request is dropped (the client went away): a conversion for it stops.
    let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _guard = SetOnDrop(gone.clone());
    let source = blocking(&svc, move |s| {
        let own = s.image_format(&n)?;
        let fmt: ImageFormat = match q.format.as_deref() {
            Some(f) => f.parse()?,
            None => own,
        };
        if fmt == ImageFormat::Raw && own != ImageFormat::Raw {
            return Ok(Download::Device(s.resolve_source(
                &format!("image:{n}"),
                true,
                "a download",
            )?));
        }
        let (path, temporary) =
            s.download_file(&n, fmt, &|| gone.load(std::sync::atomic::Ordering::Relaxed))?;
        let file = std::fs::File::open(&path)
            .map_err(|e| ServiceError::internal(format!("Opening {}: {e}", path.display())));
        if temporary {
            // The open descriptor keeps the converted copy readable until the response ends.
            let _ = std::fs::remove_file(&path);
        }
        Ok(Download::File(file?))
    })
    .await?;
    send(source, &name)
}

/// Download a volume's contents as raw, read straight from the volume.
#[utoipa::path(get, path = "/api/volumes/{vg}/{name}/download", tag = "volumes",
    params(("vg" = String, Path, description = "Volume group"), ("name" = String, Path, description = "Volume")),
    responses((status = 200, description = "The volume's bytes", content_type = "application/octet-stream"),
              (status = 400, body = super::ErrorBody), (status = 401, body = super::ErrorBody),
              (status = 404, body = super::ErrorBody)))]
pub(super) async fn download_volume(
    State(svc): State<Arc<Service>>,
    Path((vg, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    let spec = format!("lv:{vg}/{name}");
    let source = blocking(&svc, move |s| {
        Ok(Download::Device(s.resolve_source(
            &spec,
            true,
            "a download",
        )?))
    })
    .await?;
    send(source, &format!("{vg}-{name}.raw"))
}

/// Sets its flag when dropped.
struct SetOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What a download sends.
enum Download {
    /// A file as it is.
    File(std::fs::File),
    /// A device's contents, read in order.
    Device(Resolved),
}

/// Bytes per read of a device streamed as raw.
const STREAM_CHUNK: u64 = 1 << 20;

fn send(source: Download, filename: &str) -> ApiResult<Response> {
    let (len, body) = match source {
        Download::File(file) => {
            let len = file
                .metadata()
                .map_err(|e| ServiceError::internal(format!("{filename}: {e}")))?
                .len();
            let stream = tokio_util::io::ReaderStream::with_capacity(
                tokio::fs::File::from_std(file),
                1 << 20,
            );
            (len, Body::from_stream(stream))
        }
        Download::Device(resolved) => {
            let len = resolved.device().size();
            (len, Body::from_stream(device_stream(resolved)))
        }
    };
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{filename}\""),
            ),
        ],
        body,
    )
        .into_response())
}

/// Reads `source` front to back on its own thread, one chunk at a time, as the client takes
/// them (a bounded channel: a slow client slows the reads, memory stays at a few chunks). A
/// read error ends the body early, so the client sees a short transfer, never wrong bytes.
fn device_stream(
    source: Resolved,
) -> impl futures_util::Stream<Item = Result<axum::body::Bytes, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<axum::body::Bytes, std::io::Error>>(4);
    let spawned = std::thread::Builder::new()
        .name("strata-download".into())
        .spawn(move || {
            let dev = source.device();
            let size = dev.size();
            let fail = |e: strata_storage::StorageError| {
                tracing::warn!(error = %e, "a download stopped");
                let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
            };
            let mut queue = match strata_storage::io::blocking::BlockingQueue::open(dev.as_ref(), 1)
            {
                Ok(q) => q,
                Err(e) => return fail(e),
            };
            let mut offset = 0u64;
            while offset < size {
                let n = (size - offset).min(STREAM_CHUNK) as usize;
                match queue.read_at(offset, n) {
                    Ok(data) => {
                        if tx.blocking_send(Ok(axum::body::Bytes::from(data))).is_err() {
                            return; // The client went away.
                        }
                    }
                    Err(e) => return fail(e),
                }
                offset += n as u64;
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start a download thread");
    }
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

//! Virtual machines: define, list, start, stop (power button, or forced), pause, resume, status,
//! disk statistics, console (the log, or the live stream), remove.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};

use super::{blocking, ApiError, ApiJson, ApiResult};
use serde::Deserialize;
use strata_service::vm_runner::{ControlError, StopMode, DEFAULT_STOP_TIMEOUT};
use strata_service::vms::{ConsoleChunk, ConsoleQuery, DefineVm, VmDiskStats, VmInfo, VmStatus};
use strata_service::{Service, ServiceError};

pub(super) fn routes() -> Router<Arc<Service>> {
    Router::new()
        .route("/api/vms", get(list_vms).post(define_vm))
        .route("/api/vms/{name}", get(vm_info).delete(remove_vm))
        .route("/api/vms/{name}/start", post(start_vm))
        .route("/api/vms/{name}/stop", post(stop_vm))
        .route("/api/vms/{name}/status", get(vm_status))
        .route("/api/vms/{name}/console", get(vm_console))
        .route("/api/vms/{name}/console/stream", get(vm_console_stream))
        .route("/api/vms/{name}/pause", post(pause_vm))
        .route("/api/vms/{name}/resume", post(resume_vm))
        .route("/api/vms/{name}/power-button", post(power_button))
        .route("/api/vms/{name}/disk-stats", get(disk_stats))
}

/// The longest graceful stop a request may ask for.
const MAX_STOP_TIMEOUT: u64 = 3600;

/// How to stop.
#[derive(Debug, Default, Deserialize)]
pub(super) struct StopQuery {
    force: Option<bool>,
    timeout: Option<u64>,
}

fn bad_query(e: QueryRejection) -> ApiError {
    ApiError(ServiceError::BadRequest(format!(
        "Invalid query: {}",
        e.body_text()
    )))
}

/// List VMs with their status.
#[utoipa::path(get, path = "/api/vms", tag = "vms",
    responses((status = 200, body = Vec<super::schema::VmInfo>), (status = 401, body = super::ErrorBody)))]
pub(super) async fn list_vms(State(svc): State<Arc<Service>>) -> ApiResult<Json<Vec<VmInfo>>> {
    Ok(Json(blocking(&svc, |s| s.list_vms()).await?))
}

/// Define a VM: memory, vCPUs, a kernel (and initrd, command line) on the server, and disks
/// (`lv:VG/NAME` or `image:NAME`).
#[utoipa::path(post, path = "/api/vms", tag = "vms", request_body = super::schema::DefineVm,
    responses((status = 201, body = super::schema::VmInfo), (status = 400, body = super::ErrorBody),
              (status = 401, body = super::ErrorBody), (status = 404, body = super::ErrorBody),
              (status = 409, body = super::ErrorBody)))]
pub(super) async fn define_vm(
    State(svc): State<Arc<Service>>,
    ApiJson(req): ApiJson<DefineVm>,
) -> ApiResult<(StatusCode, Json<VmInfo>)> {
    let info = blocking(&svc, move |s| s.define_vm(&req)).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

/// One VM: definition and status.
#[utoipa::path(get, path = "/api/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = "VM")),
    responses((status = 200, body = super::schema::VmInfo), (status = 401, body = super::ErrorBody),
              (status = 404, body = super::ErrorBody)))]
pub(super) async fn vm_info(
    State(svc): State<Arc<Service>>,
    Path(name): Path<String>,
) -> ApiResult<Json<VmInfo>> {
    Ok(Json(blocking(&svc, move |s| s.vm_info(&name)).await?))
}

/// Remove a VM that is not running (its disks stay).
#[utoipa::path(delete, path = "/api/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = "VM")),
    responses((status = 204, description = "Removed"), (status = 401, body = super::ErrorBody),
              (status = 404, body = super::ErrorBody), (status = 409, body = super::ErrorBody)))]
pub(super) async fn remove_vm(
    State(svc): State<Arc<Service>>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    blocking(&svc, move |s| s.remove_vm(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Start a VM on this server (409 if it runs already or a disk is in use; 501 without KVM).
#[utoipa::path(post, path = "/api/vms/{name}/start", tag = "vms",
    params(("name" = String, Path, description = "VM")),
    responses((status = 200, body = super::schema::VmStatus), (status = 401, body = super::ErrorBody),
              (status = 404, body = super::ErrorBody), (status = 409, body = super::ErrorBody),
              (status = 501, body = super::ErrorBody)))]
pub(super) async fn start_vm(
    State(svc): State<Arc<Service>>,
    Path(name): Path<String>,
) -> ApiResult<Json<VmStatus>> {
    Ok(Json(blocking(&svc, move |s| s.start_vm(&name)).await?))
}

/// Stop a running VM and wait until it has ended: press its ACPI power button, wait for the
/// guest to power off (`timeout` seconds, default 60), then stop it hard; with `force=true`
/// stop it hard at once (the vCPUs stop and the disks are flushed).
#[utoipa::path(post, path = "/api/vms/{name}/stop", tag = "vms",
    params(("name" = String, Path, description = "VM"), super::schema::StopQuery),
    responses((status = 200, body = super::schema::VmStatus), (status = 400, body = super::ErrorBody),
              (status = 401, body = super::ErrorBody), (status = 404, body = super::ErrorBody),
              (status = 409, body = super::ErrorBody)))]
pub(super) async fn stop_vm(
    State(svc): State<Arc<Service>>,
    Path(name): Path<String>,
    query: Result<Query<StopQuery>, QueryRejection>,
) -> ApiResult<Json<VmStatus>> {
    let Query(q) = query.map_err(bad_query)?;
    let mode = match (q.force, q.timeout) {
        (Some(true), _) => StopMode::Force,
        (_, Some(t)) if t > MAX_STOP_TIMEOUT => {
            return Err(ApiError(ServiceError::BadRequest(format!(
                "timeout {t} is longer than {MAX_STOP_TIMEOUT} s"
            ))))
        }
        (_, Some(t)) => StopMode::Graceful(std::time::Duration::from_secs(t)),
        (_, None) => StopMode::Graceful(DEFAULT_STOP_TIMEOUT),
    };
    Ok(Json(
        blocking(&svc, move |s| s.stop_vm_with(&name, mode)).await?,
    ))
}

/// Pause a running VM's vCPUs (its devices finish the I/O in flight).
#[utoipa::path(post, path = "/api/vms/{name}/pause", tag = "vms",
    params(("name" = String, Path, description = "VM")),
    responses((status = 200, body = super::schema::VmStatus), (status = 401, body = super::ErrorBody),
              (status = 404, body = super::ErrorBody), (status = 409, body = super::ErrorBody)))]
pub(super) async fn pause_vm(
    State(svc): State<Arc<Service>>,
    Path(name): Path<String>,
) -> ApiResult<Json<VmStatus>> {
    Ok(Json(blocking(&svc, move |s| s.pause_vm(&name)).await?))
}

/// Let a paused VM run again.
#[utoipa::path(post, path = "/api/vms/{name}/resume", tag = "vms",
    params(("name" = String, Path, description = "VM")),
    responses((status = 200, body = super::schema::VmStatus), (status = 401, body = super::ErrorBody),
              (status = 404, body = super::ErrorBody), (status = 409, body = super::ErrorBody)))]
pub(super) async fn resume_vm(
    State(svc): State<Arc<Service>>,
    Path(name): Path<String>,
) -> ApiResult<Json<VmStatus>> {
    Ok(Json(blocking(&svc, move |s| s.resume_vm(&name)).await?))
}

/// Press a running VM's ACPI power button and return at once.
#[utoipa::path(post, path = "/api/vms/{name}/power-button", tag = "vms",
    params(("name" = String, Path, description = "VM")),
    responses((status = 200, body = super::schema::VmStatus), (status = 401, body = super::ErrorBody),
              (status = 404, body = super::ErrorBody), (status = 409, body = super::ErrorBody)))]
pub(super) async fn power_button(
    State(svc): State<Arc<Service>>,
    Path(name): Path<String>,
) -> ApiResult<Json<VmStatus>> {
    Ok(Json(
        blocking(&svc, move |s| s.press_power_button(&name)).await?,
    ))
}

/// A running VM's disk counters (requests, errors, bytes), one entry per disk.
#[utoipa::path(get, path = "/api/vms/{name}/disk-stats", tag = "vms",
    params(("name" = String, Path, description = "VM")),
    responses((status = 200, body = Vec<super::schema::VmDiskStats>), (status = 401, body = super::ErrorBody),
              (status = 404, body = super::ErrorBody), (status = 409, body = super::ErrorBody)))]
pub(super) async fn disk_stats(
    State(svc): State<Arc<Service>>,
    Path(name): Path<String>,
) -> ApiResult<Json<Vec<VmDiskStats>>> {
    Ok(Json(blocking(&svc, move |s| s.vm_disk_stats(&name)).await?))
}

/// Where a live console stream starts.
#[derive(Debug, Default, Deserialize)]
pub(super) struct StreamQuery {
    from: Option<u64>,
}

/// The live console of a running VM: newline-delimited JSON, one `ConsoleChunk`-like object
/// (`offset`, `data`, `next_offset`, `skipped`) per line, from byte offset `from` (default:
/// the current end) until the VM ends or the client goes away. Older output than the VMM
/// keeps is reported as `skipped`; read it from `/console`.
#[utoipa::path(get, path = "/api/vms/{name}/console/stream", tag = "vms",
    params(("name" = String, Path, description = "VM"), super::schema::StreamQuery),
    responses((status = 200, content_type = "application/x-ndjson", description = "The stream"),
              (status = 400, body = super::ErrorBody), (status = 401, body = super::ErrorBody),
              (status = 404, body = super::ErrorBody), (status = 409, body = super::ErrorBody)))]
pub(super) async fn vm_console_stream(
    State(svc): State<Arc<Service>>,
    Path(name): Path<String>,
    query: Result<Query<StreamQuery>, QueryRejection>,
) -> ApiResult<axum::response::Response> {
    let Query(q) = query.map_err(bad_query)?;
    let mut stream = blocking(&svc, move |s| s.vm_console_stream(&name, q.from)).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(16);
    tokio::task::spawn_blocking(move || loop {
        match stream.next_chunk() {
            Ok(Some(chunk)) => {
                let mut line = serde_json::to_vec(&chunk).unwrap_or_default();
                line.push(b'\n');
                if tx.blocking_send(Ok(line)).is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(ControlError::Idle) if !tx.is_closed() => {}
            Err(_) => return,
        }
    });
    let body = axum::body::Body::from_stream(tokio_stream_of(rx));
    axum::response::Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(body)
        .map_err(|e| ApiError(ServiceError::internal(e.to_string())))
}

/// A VM's state (defined, running, stopped, failed), exit reason and uptime.
#[utoipa::path(get, path = "/api/vms/{name}/status", tag = "vms",
    params(("name" = String, Path, description = "VM")),
    responses((status = 200, body = super::schema::VmStatus), (status = 401, body = super::ErrorBody),
              (status = 404, body = super::ErrorBody)))]
pub(super) async fn vm_status(
    State(svc): State<Arc<Service>>,
    Path(name): Path<String>,
) -> ApiResult<Json<VmStatus>> {
    Ok(Json(blocking(&svc, move |s| s.vm_status(&name)).await?))
}

/// The serial console log of the current or last run, from a byte offset (to poll) or its
/// tail.
#[utoipa::path(get, path = "/api/vms/{name}/console", tag = "vms",
    params(("name" = String, Path, description = "VM"), super::schema::ConsoleQuery),
    responses((status = 200, body = super::schema::ConsoleChunk), (status = 400, body = super::ErrorBody),
              (status = 401, body = super::ErrorBody), (status = 404, body = super::ErrorBody)))]
pub(super) async fn vm_console(
    State(svc): State<Arc<Service>>,
    Path(name): Path<String>,
    query: Result<Query<ConsoleQuery>, QueryRejection>,
) -> ApiResult<Json<ConsoleChunk>> {
    let Query(q) = query.map_err(bad_query)?;
    Ok(Json(
        blocking(&svc, move |s| s.vm_console(&name, &q)).await?,
    ))
}

/// A receiver as a body stream.
fn tokio_stream_of(
    rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

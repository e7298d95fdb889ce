//! Virtual machines: define, list, start, stop, status, console, remove.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};

use super::{blocking, ApiError, ApiJson, ApiResult};
use strata_service::vms::{ConsoleChunk, ConsoleQuery, DefineVm, VmInfo, VmStatus};
use strata_service::{Service, ServiceError};

pub(super) fn routes() -> Router<Arc<Service>> {
    Router::new()
        .route("/api/vms", get(list_vms).post(define_vm))
        .route("/api/vms/{name}", get(vm_info).delete(remove_vm))
        .route("/api/vms/{name}/start", post(start_vm))
        .route("/api/vms/{name}/stop", post(stop_vm))
        .route("/api/vms/{name}/status", get(vm_status))
        .route("/api/vms/{name}/console", get(vm_console))
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

/// Stop a running VM (a hard stop: the vCPUs stop and the disks are flushed) and wait until it
/// has ended.
#[utoipa::path(post, path = "/api/vms/{name}/stop", tag = "vms",
    params(("name" = String, Path, description = "VM")),
    responses((status = 200, body = super::schema::VmStatus), (status = 401, body = super::ErrorBody),
              (status = 404, body = super::ErrorBody), (status = 409, body = super::ErrorBody)))]
pub(super) async fn stop_vm(
    State(svc): State<Arc<Service>>,
    Path(name): Path<String>,
) -> ApiResult<Json<VmStatus>> {
    Ok(Json(blocking(&svc, move |s| s.stop_vm(&name)).await?))
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
    let Query(q) = query.map_err(|e| {
        ApiError(ServiceError::BadRequest(format!(
            "Invalid query: {}",
            e.body_text()
        )))
    })?;
    Ok(Json(
        blocking(&svc, move |s| s.vm_console(&name, &q)).await?,
    ))
}

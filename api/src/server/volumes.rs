//! Storage overview and logical volumes.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};

use super::{blocking, quick, require_admin, ApiJson, ApiResult, Caller};
use strata_service::volumes::{
    AdoptVolume, CreateRbdGroup, CreateVolume, GroupCheck, NewName, ResizeVolume, StorageGroup,
    VolumeSummary,
};
use strata_service::Service;

pub(super) fn routes() -> Router<Arc<Service>> {
    Router::new()
        .route("/api/storage", get(storage))
        .route("/api/storage/{vg}/check", post(check_group))
        .route("/api/storage/rbd", post(create_rbd_group))
        .route("/api/storage/{vg}", delete(remove_group))
        .route("/api/volumes/{vg}/adopt", post(adopt_volume))
        .route("/api/volumes", get(list_volumes).post(create_volume))
        .route(
            "/api/volumes/{vg}/{name}",
            get(volume_info).delete(remove_volume),
        )
        .route("/api/volumes/{vg}/{name}/resize", post(resize_volume))
        .route("/api/volumes/{vg}/{name}/snapshot", post(snapshot_volume))
        .route("/api/volumes/{vg}/{name}/clone", post(clone_volume))
        .route("/api/volumes/{vg}/{name}/template", post(set_template))
}

/// Volume groups with their size, free space and thin pools' usage (overcommit).
#[utoipa::path(get, path = "/api/storage", tag = "storage",
    responses((status = 200, body = Vec<super::schema::StorageGroup>), (status = 401, body = super::ErrorBody)))]
pub(super) async fn storage(State(svc): State<Arc<Service>>) -> ApiResult<Json<Vec<StorageGroup>>> {
    // RBD groups ask their cluster: not a call for the async workers.
    Ok(Json(blocking(&svc, |s| s.storage_overview()).await?))
}

/// Add a volume group on a Ceph RBD pool (admin tokens only). The configuration and keyring
/// are files in an import folder on the server.
#[utoipa::path(post, path = "/api/storage/rbd", tag = "storage", request_body = super::schema::CreateRbdGroup,
    responses((status = 200, body = super::schema::StorageGroup), (status = 400, body = super::ErrorBody),
              (status = 401, body = super::ErrorBody), (status = 403, body = super::ErrorBody),
              (status = 409, body = super::ErrorBody), (status = 501, body = super::ErrorBody)))]
pub(super) async fn create_rbd_group(
    State(svc): State<Arc<Service>>,
    caller: Option<Extension<Caller>>,
    ApiJson(req): ApiJson<CreateRbdGroup>,
) -> ApiResult<Json<StorageGroup>> {
    require_admin(caller.as_ref(), "add storage")?;
    Ok(Json(
        blocking(&svc, move |s| s.create_rbd_group(&req)).await?,
    ))
}

/// Remove a volume group on RBD that holds no volumes (admin tokens only).
#[utoipa::path(delete, path = "/api/storage/{vg}", tag = "storage",
    params(("vg" = String, Path, description = "Volume group")),
    responses((status = 204, description = "Removed"), (status = 401, body = super::ErrorBody),
              (status = 403, body = super::ErrorBody), (status = 404, body = super::ErrorBody),
              (status = 409, body = super::ErrorBody), (status = 501, body = super::ErrorBody)))]
pub(super) async fn remove_group(
    State(svc): State<Arc<Service>>,
    caller: Option<Extension<Caller>>,
    Path(vg): Path<String>,
) -> ApiResult<StatusCode> {
    require_admin(caller.as_ref(), "remove storage")?;
    blocking(&svc, move |s| s.remove_group(&vg)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Take in an image made outside Strata in an RBD group's pool as a volume (admin tokens only).
#[utoipa::path(post, path = "/api/volumes/{vg}/adopt", tag = "volumes", request_body = super::schema::AdoptVolume,
    params(("vg" = String, Path, description = "Volume group")),
    responses((status = 200, body = super::schema::VolumeSummary), (status = 401, body = super::ErrorBody),
              (status = 403, body = super::ErrorBody), (status = 404, body = super::ErrorBody),
              (status = 501, body = super::ErrorBody)))]
pub(super) async fn adopt_volume(
    State(svc): State<Arc<Service>>,
    caller: Option<Extension<Caller>>,
    Path(vg): Path<String>,
    ApiJson(req): ApiJson<AdoptVolume>,
) -> ApiResult<Json<VolumeSummary>> {
    require_admin(caller.as_ref(), "adopt volumes")?;
    Ok(Json(
        blocking(&svc, move |s| s.adopt_volume(&vg, &req)).await?,
    ))
}

/// Check a volume group's metadata and pools: no block leaked or owned twice.
#[utoipa::path(post, path = "/api/storage/{vg}/check", tag = "storage",
    params(("vg" = String, Path, description = "Volume group")),
    responses((status = 200, body = super::schema::GroupCheck), (status = 401, body = super::ErrorBody),
              (status = 404, body = super::ErrorBody)))]
pub(super) async fn check_group(
    State(svc): State<Arc<Service>>,
    Path(vg): Path<String>,
) -> ApiResult<Json<GroupCheck>> {
    Ok(Json(blocking(&svc, move |s| s.check_group(&vg)).await?))
}

/// List volumes (linear, thin, snapshots, clones).
#[utoipa::path(get, path = "/api/volumes", tag = "volumes",
    responses((status = 200, body = Vec<super::schema::VolumeSummary>), (status = 401, body = super::ErrorBody)))]
pub(super) async fn list_volumes(
    State(svc): State<Arc<Service>>,
) -> ApiResult<Json<Vec<VolumeSummary>>> {
    Ok(Json(quick(&svc, |s| s.list_volumes())?))
}

/// Create a linear volume, or a thin volume in a pool.
#[utoipa::path(post, path = "/api/volumes", tag = "volumes", request_body = super::schema::CreateVolume,
    responses((status = 200, body = super::schema::VolumeSummary), (status = 400, body = super::ErrorBody),
              (status = 401, body = super::ErrorBody), (status = 404, body = super::ErrorBody),
              (status = 409, body = super::ErrorBody), (status = 507, body = super::ErrorBody)))]
pub(super) async fn create_volume(
    State(svc): State<Arc<Service>>,
    ApiJson(req): ApiJson<CreateVolume>,
) -> ApiResult<Json<VolumeSummary>> {
    Ok(Json(blocking(&svc, move |s| s.create_volume(&req)).await?))
}

/// One volume.
#[utoipa::path(get, path = "/api/volumes/{vg}/{name}", tag = "volumes",
    params(("vg" = String, Path, description = "Volume group"), ("name" = String, Path, description = "Volume")),
    responses((status = 200, body = super::schema::VolumeSummary), (status = 401, body = super::ErrorBody),
              (status = 404, body = super::ErrorBody)))]
pub(super) async fn volume_info(
    State(svc): State<Arc<Service>>,
    Path((vg, name)): Path<(String, String)>,
) -> ApiResult<Json<VolumeSummary>> {
    Ok(Json(quick(&svc, move |s| s.volume_info(&vg, &name))?))
}

/// Remove a volume; its snapshots and clones stay intact.
#[utoipa::path(delete, path = "/api/volumes/{vg}/{name}", tag = "volumes",
    params(("vg" = String, Path, description = "Volume group"), ("name" = String, Path, description = "Volume")),
    responses((status = 204, description = "Removed"), (status = 401, body = super::ErrorBody),
              (status = 404, body = super::ErrorBody), (status = 409, body = super::ErrorBody)))]
pub(super) async fn remove_volume(
    State(svc): State<Arc<Service>>,
    Path((vg, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    blocking(&svc, move |s| s.remove_volume(&vg, &name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Change a volume's size.
#[utoipa::path(post, path = "/api/volumes/{vg}/{name}/resize", tag = "volumes", request_body = super::schema::ResizeVolume,
    params(("vg" = String, Path, description = "Volume group"), ("name" = String, Path, description = "Volume")),
    responses((status = 200, body = super::schema::VolumeSummary), (status = 400, body = super::ErrorBody),
              (status = 401, body = super::ErrorBody), (status = 404, body = super::ErrorBody),
              (status = 507, body = super::ErrorBody)))]
pub(super) async fn resize_volume(
    State(svc): State<Arc<Service>>,
    Path((vg, name)): Path<(String, String)>,
    ApiJson(req): ApiJson<ResizeVolume>,
) -> ApiResult<Json<VolumeSummary>> {
    Ok(Json(
        blocking(&svc, move |s| s.resize_volume(&vg, &name, &req)).await?,
    ))
}

/// Take a read-only snapshot of a thin volume (O(1)).
#[utoipa::path(post, path = "/api/volumes/{vg}/{name}/snapshot", tag = "volumes", request_body = super::schema::NewName,
    params(("vg" = String, Path, description = "Volume group"), ("name" = String, Path, description = "Volume")),
    responses((status = 200, body = super::schema::VolumeSummary), (status = 400, body = super::ErrorBody),
              (status = 401, body = super::ErrorBody), (status = 404, body = super::ErrorBody),
              (status = 409, body = super::ErrorBody)))]
pub(super) async fn snapshot_volume(
    State(svc): State<Arc<Service>>,
    Path((vg, name)): Path<(String, String)>,
    ApiJson(req): ApiJson<NewName>,
) -> ApiResult<Json<VolumeSummary>> {
    Ok(Json(
        blocking(&svc, move |s| s.snapshot_volume(&vg, &name, &req)).await?,
    ))
}

/// Make a writable linked clone of a snapshot or template (O(1)).
#[utoipa::path(post, path = "/api/volumes/{vg}/{name}/clone", tag = "volumes", request_body = super::schema::NewName,
    params(("vg" = String, Path, description = "Volume group"), ("name" = String, Path, description = "Snapshot or template")),
    responses((status = 200, body = super::schema::VolumeSummary), (status = 400, body = super::ErrorBody),
              (status = 401, body = super::ErrorBody), (status = 404, body = super::ErrorBody),
              (status = 409, body = super::ErrorBody)))]
pub(super) async fn clone_volume(
    State(svc): State<Arc<Service>>,
    Path((vg, name)): Path<(String, String)>,
    ApiJson(req): ApiJson<NewName>,
) -> ApiResult<Json<VolumeSummary>> {
    Ok(Json(
        blocking(&svc, move |s| s.clone_volume(&vg, &name, &req)).await?,
    ))
}

/// Mark a thin volume or snapshot as a template (read-only; clones are made from it) or
/// unmark it (409 while it is open or held).
#[utoipa::path(post, path = "/api/volumes/{vg}/{name}/template", tag = "volumes", request_body = super::schema::SetTemplate,
    params(("vg" = String, Path, description = "Volume group"), ("name" = String, Path, description = "Volume")),
    responses((status = 200, body = super::schema::VolumeSummary), (status = 400, body = super::ErrorBody),
              (status = 401, body = super::ErrorBody), (status = 404, body = super::ErrorBody),
              (status = 409, body = super::ErrorBody)))]
pub(super) async fn set_template(
    State(svc): State<Arc<Service>>,
    Path((vg, name)): Path<(String, String)>,
    ApiJson(req): ApiJson<strata_service::volumes::SetTemplate>,
) -> ApiResult<Json<VolumeSummary>> {
    Ok(Json(
        blocking(&svc, move |s| s.set_volume_template(&vg, &name, &req)).await?,
    ))
}

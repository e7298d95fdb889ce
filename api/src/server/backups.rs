//! Backups: list, create, restore, verify, prune, garbage collection, sync; the datastores
//! (local folders, S3 buckets).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use utoipa::IntoParams;

use super::{blocking, ApiJson, ApiResult};
use strata_service::backup_stores::{AddStore, StoreSummary, SyncBackups};
use strata_service::backups::{
    BackupSummary, CreateBackup, GcBackups, PruneBackups, RestoreBackup, VerifyBackups,
};
use strata_service::jobs::JobStatus;
use strata_service::Service;

pub(super) fn routes() -> Router<Arc<Service>> {
    Router::new()
        .route("/api/backups", get(list_backups).post(create_backup))
        .route("/api/backups/restore", post(restore_backup))
        .route("/api/backups/verify", post(verify_backups))
        .route("/api/backups/prune", post(prune_backups))
        .route("/api/backups/gc", post(gc))
        .route("/api/backups/sync", post(sync_backups))
        .route("/api/backups/stores", get(list_stores).post(add_store))
        .route("/api/backups/stores/{name}", delete(remove_store))
}

/// Filter for the snapshot list.
#[derive(Debug, Deserialize, IntoParams)]
pub(super) struct ListQuery {
    /// Only this group (e.g. `volume/strata/vm-100-disk-0`).
    id: Option<String>,
    /// The datastore (default `local`).
    store: Option<String>,
}

/// List backup snapshots with their manifests.
#[utoipa::path(get, path = "/api/backups", tag = "backups", params(ListQuery),
    responses((status = 200, body = Vec<super::schema::BackupSummary>), (status = 401, body = super::ErrorBody)))]
pub(super) async fn list_backups(
    State(svc): State<Arc<Service>>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Vec<BackupSummary>>> {
    Ok(Json(
        blocking(&svc, move |s| {
            s.list_backups_in(q.store.as_deref(), q.id.as_deref())
        })
        .await?,
    ))
}

/// Back up a volume or image (a job; incremental through the volume's dirty bitmap).
#[utoipa::path(post, path = "/api/backups", tag = "backups", request_body = super::schema::CreateBackup,
    responses((status = 202, body = super::schema::JobStatus), (status = 400, body = super::ErrorBody),
              (status = 401, body = super::ErrorBody), (status = 404, body = super::ErrorBody)))]
pub(super) async fn create_backup(
    State(svc): State<Arc<Service>>,
    ApiJson(req): ApiJson<CreateBackup>,
) -> ApiResult<(StatusCode, Json<JobStatus>)> {
    let job = blocking(&svc, move |s| s.start_backup(req)).await?;
    Ok((StatusCode::ACCEPTED, Json(job.status())))
}

/// Restore a snapshot to a new image or onto a volume (a job).
#[utoipa::path(post, path = "/api/backups/restore", tag = "backups", request_body = super::schema::RestoreBackup,
    responses((status = 202, body = super::schema::JobStatus), (status = 400, body = super::ErrorBody),
              (status = 401, body = super::ErrorBody), (status = 404, body = super::ErrorBody),
              (status = 409, body = super::ErrorBody)))]
pub(super) async fn restore_backup(
    State(svc): State<Arc<Service>>,
    ApiJson(req): ApiJson<RestoreBackup>,
) -> ApiResult<(StatusCode, Json<JobStatus>)> {
    let job = blocking(&svc, move |s| s.start_restore(req)).await?;
    Ok((StatusCode::ACCEPTED, Json(job.status())))
}

/// Verify one snapshot or all (a job that fails naming damaged chunks and snapshots).
#[utoipa::path(post, path = "/api/backups/verify", tag = "backups", request_body = super::schema::VerifyBackups,
    responses((status = 202, body = super::schema::JobStatus), (status = 401, body = super::ErrorBody),
              (status = 404, body = super::ErrorBody)))]
pub(super) async fn verify_backups(
    State(svc): State<Arc<Service>>,
    ApiJson(req): ApiJson<VerifyBackups>,
) -> ApiResult<(StatusCode, Json<JobStatus>)> {
    let job = blocking(&svc, move |s| s.start_verify(req)).await?;
    Ok((StatusCode::ACCEPTED, Json(job.status())))
}

/// Remove snapshots outside the retention rules (or, with dry_run, say which).
#[utoipa::path(post, path = "/api/backups/prune", tag = "backups", request_body = super::schema::PruneBackups,
    responses((status = 200, description = "Decisions per snapshot"), (status = 400, body = super::ErrorBody),
              (status = 401, body = super::ErrorBody)))]
pub(super) async fn prune_backups(
    State(svc): State<Arc<Service>>,
    ApiJson(req): ApiJson<PruneBackups>,
) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(blocking(&svc, move |s| s.prune_backups(&req)).await?))
}

/// Remove chunks no snapshot references (a job; safe while backups run). The body is optional.
#[utoipa::path(post, path = "/api/backups/gc", tag = "backups", request_body = Option<super::schema::GcBackups>,
    responses((status = 202, body = super::schema::JobStatus), (status = 401, body = super::ErrorBody),
              (status = 404, body = super::ErrorBody)))]
pub(super) async fn gc(
    State(svc): State<Arc<Service>>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<JobStatus>)> {
    let req: GcBackups = if body.iter().all(|b| b.is_ascii_whitespace()) {
        GcBackups::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            strata_service::ServiceError::BadRequest(format!("Invalid JSON body: {e}"))
        })?
    };
    let job = blocking(&svc, move |s| s.start_gc_in(req)).await?;
    Ok((StatusCode::ACCEPTED, Json(job.status())))
}

/// Copy snapshots between datastores, transferring only missing chunks (a job).
#[utoipa::path(post, path = "/api/backups/sync", tag = "backups", request_body = super::schema::SyncBackups,
    responses((status = 202, body = super::schema::JobStatus), (status = 400, body = super::ErrorBody),
              (status = 401, body = super::ErrorBody), (status = 404, body = super::ErrorBody)))]
pub(super) async fn sync_backups(
    State(svc): State<Arc<Service>>,
    ApiJson(req): ApiJson<SyncBackups>,
) -> ApiResult<(StatusCode, Json<JobStatus>)> {
    let job = blocking(&svc, move |s| s.start_sync(req)).await?;
    Ok((StatusCode::ACCEPTED, Json(job.status())))
}

/// List the backup datastores.
#[utoipa::path(get, path = "/api/backups/stores", tag = "backups",
    responses((status = 200, body = Vec<super::schema::StoreSummary>), (status = 401, body = super::ErrorBody)))]
pub(super) async fn list_stores(
    State(svc): State<Arc<Service>>,
) -> ApiResult<Json<Vec<StoreSummary>>> {
    Ok(Json(blocking(&svc, move |s| s.list_stores()).await?))
}

/// Add a backup datastore: a local folder, or an S3 bucket (encrypted unless
/// `insecure_plaintext`).
#[utoipa::path(post, path = "/api/backups/stores", tag = "backups", request_body = super::schema::AddStore,
    responses((status = 201, body = super::schema::StoreSummary), (status = 400, body = super::ErrorBody),
              (status = 401, body = super::ErrorBody), (status = 409, body = super::ErrorBody)))]
pub(super) async fn add_store(
    State(svc): State<Arc<Service>>,
    ApiJson(req): ApiJson<AddStore>,
) -> ApiResult<(StatusCode, Json<StoreSummary>)> {
    let st = blocking(&svc, move |s| s.add_store(req)).await?;
    Ok((StatusCode::CREATED, Json(st)))
}

/// Forget a backup datastore (its data stays in its folder or bucket).
#[utoipa::path(delete, path = "/api/backups/stores/{name}", tag = "backups",
    params(("name" = String, Path, description = "Datastore name")),
    responses((status = 204), (status = 401, body = super::ErrorBody), (status = 404, body = super::ErrorBody)))]
pub(super) async fn remove_store(
    State(svc): State<Arc<Service>>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    blocking(&svc, move |s| s.remove_store(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

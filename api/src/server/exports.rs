//! NBD exports: volumes, snapshots, images and backup snapshots served to other hosts.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};

use super::{blocking, quick, ApiJson, ApiResult};
use strata_service::exports::{CreateExport, ExportSummary};
use strata_service::Service;

pub(super) fn routes() -> Router<Arc<Service>> {
    Router::new()
        .route("/api/exports", get(list_exports).post(create_export))
        .route("/api/exports/{id}", get(export_info).delete(remove_export))
}

/// List NBD exports with their clients.
#[utoipa::path(get, path = "/api/exports", tag = "exports",
    responses((status = 200, body = Vec<super::schema::ExportSummary>), (status = 401, body = super::ErrorBody)))]
pub(super) async fn list_exports(
    State(svc): State<Arc<Service>>,
) -> ApiResult<Json<Vec<ExportSummary>>> {
    Ok(Json(quick(&svc, |s| s.list_exports())?))
}

/// Export a volume, snapshot, image or backup snapshot over NBD. A secret export's name is in
/// this answer only. An exported volume is held: no resize, remove or other writer meanwhile.
#[utoipa::path(post, path = "/api/exports", tag = "exports", request_body = super::schema::CreateExport,
    responses((status = 200, body = super::schema::ExportSummary), (status = 400, body = super::ErrorBody),
              (status = 401, body = super::ErrorBody), (status = 404, body = super::ErrorBody),
              (status = 409, body = super::ErrorBody)))]
pub(super) async fn create_export(
    State(svc): State<Arc<Service>>,
    ApiJson(req): ApiJson<CreateExport>,
) -> ApiResult<Json<ExportSummary>> {
    Ok(Json(blocking(&svc, move |s| s.add_export(&req)).await?))
}

/// One export.
#[utoipa::path(get, path = "/api/exports/{id}", tag = "exports",
    params(("id" = String, Path, description = "Export id")),
    responses((status = 200, body = super::schema::ExportSummary), (status = 401, body = super::ErrorBody),
              (status = 404, body = super::ErrorBody)))]
pub(super) async fn export_info(
    State(svc): State<Arc<Service>>,
    Path(id): Path<String>,
) -> ApiResult<Json<ExportSummary>> {
    Ok(Json(quick(&svc, |s| s.export_info(&id))?))
}

/// Stop an export: its clients are disconnected and what it held is released.
#[utoipa::path(delete, path = "/api/exports/{id}", tag = "exports",
    params(("id" = String, Path, description = "Export id")),
    responses((status = 204, description = "Removed"), (status = 401, body = super::ErrorBody),
              (status = 404, body = super::ErrorBody)))]
pub(super) async fn remove_export(
    State(svc): State<Arc<Service>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    blocking(&svc, move |s| s.remove_export(&id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

//! Images in the data directory.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use utoipa::ToSchema;

use super::{blocking, require_admin, ApiJson, ApiResult, Caller};
use strata_service::images::{CreateImage, Created, ImageSummary};
use strata_service::{Service, ServiceError};

pub(super) fn routes() -> Router<Arc<Service>> {
    Router::new()
        .route("/api/images", get(list_images).post(create_image))
        .route("/api/images/{name}", get(image_info).delete(remove_image))
        .route("/api/images/{name}/adopt", post(adopt_image))
}

/// The format an admin states for an image put into the image folder by hand.
#[derive(Debug, Deserialize, ToSchema)]
pub struct AdoptImage {
    /// raw, qcow2, vmdk, vhd or vhdx.
    pub format: String,
}

/// Record the format of an image without one (admin tokens only). The image must open in that
/// format, name no other file and (qcow2) pass a consistency check.
#[utoipa::path(post, path = "/api/images/{name}/adopt", tag = "images", request_body = AdoptImage,
    params(("name" = String, Path, description = "Image name")),
    responses((status = 200, body = super::schema::ImageSummary), (status = 400, body = super::ErrorBody),
              (status = 401, body = super::ErrorBody), (status = 403, body = super::ErrorBody),
              (status = 404, body = super::ErrorBody), (status = 409, body = super::ErrorBody),
              (status = 422, body = super::ErrorBody)))]
pub(super) async fn adopt_image(
    State(svc): State<Arc<Service>>,
    caller: Option<Extension<Caller>>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<AdoptImage>,
) -> ApiResult<Json<ImageSummary>> {
    require_admin(caller.as_ref(), "adopt images")?;
    Ok(Json(
        blocking(&svc, move |s| {
            let fmt = req
                .format
                .parse()
                .map_err(|e: strata_storage::StorageError| {
                    ServiceError::BadRequest(e.to_string())
                })?;
            s.adopt_image(&name, fmt)?;
            s.image_info(&name)
        })
        .await?,
    ))
}

/// List images.
#[utoipa::path(get, path = "/api/images", tag = "images",
    responses((status = 200, body = Vec<super::schema::ImageSummary>), (status = 401, body = super::ErrorBody)))]
pub(super) async fn list_images(
    State(svc): State<Arc<Service>>,
) -> ApiResult<Json<Vec<ImageSummary>>> {
    Ok(Json(blocking(&svc, |s| s.list_images()).await?))
}

/// Create an image: 200 with the image, or, with preallocation, 202 with the job writing it.
#[utoipa::path(post, path = "/api/images", tag = "images", request_body = super::schema::CreateImage,
    responses((status = 200, body = super::schema::ImageSummary), (status = 202, body = super::schema::JobStatus),
              (status = 400, body = super::ErrorBody),
              (status = 401, body = super::ErrorBody), (status = 409, body = super::ErrorBody),
              (status = 507, body = super::ErrorBody)))]
pub(super) async fn create_image(
    State(svc): State<Arc<Service>>,
    ApiJson(req): ApiJson<CreateImage>,
) -> ApiResult<Response> {
    Ok(match blocking(&svc, move |s| s.create_image(&req)).await? {
        Created::Image(summary) => Json(summary).into_response(),
        Created::Job(job) => (StatusCode::ACCEPTED, Json(job.status())).into_response(),
    })
}

/// An image's format, sizes and details.
#[utoipa::path(get, path = "/api/images/{name}", tag = "images",
    params(("name" = String, Path, description = "Image name")),
    responses((status = 200, body = super::schema::ImageSummary), (status = 400, body = super::ErrorBody),
              (status = 401, body = super::ErrorBody), (status = 404, body = super::ErrorBody)))]
pub(super) async fn image_info(
    State(svc): State<Arc<Service>>,
    Path(name): Path<String>,
) -> ApiResult<Json<ImageSummary>> {
    Ok(Json(blocking(&svc, move |s| s.image_info(&name)).await?))
}

/// Remove an image.
#[utoipa::path(delete, path = "/api/images/{name}", tag = "images",
    params(("name" = String, Path, description = "Image name")),
    responses((status = 204, description = "Removed"), (status = 400, body = super::ErrorBody),
              (status = 401, body = super::ErrorBody), (status = 404, body = super::ErrorBody)))]
pub(super) async fn remove_image(
    State(svc): State<Arc<Service>>,
    Path(name): Path<String>,
) -> ApiResult<axum::http::StatusCode> {
    blocking(&svc, move |s| s.remove_image(&name)).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

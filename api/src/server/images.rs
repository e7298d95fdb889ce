//! Images in the data directory.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};

use super::{blocking, ApiJson, ApiResult};
use crate::service::images::{CreateImage, ImageSummary};
use crate::service::Service;

pub(super) fn routes() -> Router<Arc<Service>> {
    Router::new()
        .route("/api/images", get(list_images).post(create_image))
        .route("/api/images/{name}", get(image_info).delete(remove_image))
}

/// List images.
#[utoipa::path(get, path = "/api/images", tag = "images",
    responses((status = 200, body = Vec<ImageSummary>), (status = 401, body = super::ErrorBody)))]
pub(super) async fn list_images(
    State(svc): State<Arc<Service>>,
) -> ApiResult<Json<Vec<ImageSummary>>> {
    Ok(Json(blocking(&svc, |s| s.list_images()).await?))
}

/// Create an image.
#[utoipa::path(post, path = "/api/images", tag = "images", request_body = CreateImage,
    responses((status = 200, body = ImageSummary), (status = 400, body = super::ErrorBody),
              (status = 401, body = super::ErrorBody), (status = 409, body = super::ErrorBody),
              (status = 507, body = super::ErrorBody)))]
pub(super) async fn create_image(
    State(svc): State<Arc<Service>>,
    ApiJson(req): ApiJson<CreateImage>,
) -> ApiResult<Json<ImageSummary>> {
    Ok(Json(blocking(&svc, move |s| s.create_image(&req)).await?))
}

/// An image's format, sizes and details.
#[utoipa::path(get, path = "/api/images/{name}", tag = "images",
    params(("name" = String, Path, description = "Image name")),
    responses((status = 200, body = ImageSummary), (status = 400, body = super::ErrorBody),
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

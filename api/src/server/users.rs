//! Local users of the web UI (admins only): list, create, remove, set a password.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, put};
use axum::{Extension, Json, Router};
use strata_service::users::{CreateUser, SetPassword, UserInfo};
use strata_service::Service;

use super::{blocking, require_admin, ApiJson, ApiResult, Caller};

pub(super) fn routes() -> Router<Arc<Service>> {
    Router::new()
        .route("/api/users", get(list_users).post(create_user))
        .route("/api/users/{name}", delete(remove_user))
        .route("/api/users/{name}/password", put(set_password))
}

/// List the web UI's local users (admin).
#[utoipa::path(get, path = "/api/users", tag = "system",
    responses((status = 200, body = Vec<super::schema::UserInfo>), (status = 401, body = super::ErrorBody),
              (status = 403, body = super::ErrorBody)))]
pub(super) async fn list_users(
    State(svc): State<Arc<Service>>,
    caller: Option<Extension<Caller>>,
) -> ApiResult<Json<Vec<UserInfo>>> {
    require_admin(caller.as_ref(), "manage users")?;
    Ok(Json(blocking(&svc, |s| s.users.list()).await?))
}

/// Create a local user who signs in to the web UI with a password (admin).
#[utoipa::path(post, path = "/api/users", tag = "system", request_body = super::schema::CreateUser,
    responses((status = 201, body = super::schema::UserInfo), (status = 400, body = super::ErrorBody),
              (status = 401, body = super::ErrorBody), (status = 403, body = super::ErrorBody),
              (status = 409, body = super::ErrorBody)))]
pub(super) async fn create_user(
    State(svc): State<Arc<Service>>,
    caller: Option<Extension<Caller>>,
    ApiJson(req): ApiJson<CreateUser>,
) -> ApiResult<(StatusCode, Json<UserInfo>)> {
    require_admin(caller.as_ref(), "manage users")?;
    let user = blocking(&svc, move |s| s.users.create(&req)).await?;
    Ok((StatusCode::CREATED, Json(user)))
}

/// Remove a local user; their sessions end (admin).
#[utoipa::path(delete, path = "/api/users/{name}", tag = "system",
    params(("name" = String, Path, description = "User")),
    responses((status = 204, description = "Removed"), (status = 401, body = super::ErrorBody),
              (status = 403, body = super::ErrorBody), (status = 404, body = super::ErrorBody)))]
pub(super) async fn remove_user(
    State(svc): State<Arc<Service>>,
    caller: Option<Extension<Caller>>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    require_admin(caller.as_ref(), "manage users")?;
    blocking(&svc, move |s| s.users.remove(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Set a local user's password; their sessions end (admin).
#[utoipa::path(put, path = "/api/users/{name}/password", tag = "system",
    params(("name" = String, Path, description = "User")), request_body = super::schema::SetPassword,
    responses((status = 200, body = super::schema::UserInfo), (status = 400, body = super::ErrorBody),
              (status = 401, body = super::ErrorBody), (status = 403, body = super::ErrorBody),
              (status = 404, body = super::ErrorBody)))]
pub(super) async fn set_password(
    State(svc): State<Arc<Service>>,
    caller: Option<Extension<Caller>>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<SetPassword>,
) -> ApiResult<Json<UserInfo>> {
    require_admin(caller.as_ref(), "manage users")?;
    Ok(Json(
        blocking(&svc, move |s| s.users.set_password(&name, &req.password)).await?,
    ))
}

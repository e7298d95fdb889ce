//! Health, tokens and jobs.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::routing::{delete, get};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{blocking, quick, require_admin, ApiJson, ApiResult, Caller};
use strata_service::jobs::JobStatus;
use strata_service::tokens::TokenInfo;
use strata_service::Service;

/// Liveness.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always "ok".
    pub status: String,
    /// Strata's version.
    pub version: String,
}

/// A request to create a token.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateToken {
    /// Name of the new token.
    pub name: String,
    /// Whether the new token may manage tokens too (default: no).
    #[serde(default)]
    pub admin: bool,
}

/// A newly created token: the secret is shown only here.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedToken {
    /// The token's listing.
    #[serde(flatten)]
    #[schema(value_type = super::schema::TokenInfo)]
    pub info: TokenInfo,
    /// The full token to send as `Authorization: Bearer …`.
    pub token: String,
}

pub(super) fn routes() -> Router<Arc<Service>> {
    Router::new()
        .route("/api/tokens", get(list_tokens).post(create_token))
        .route("/api/tokens/{id}", delete(revoke_token))
        .route("/api/jobs", get(list_jobs))
        .route("/api/jobs/{id}", get(job_status).delete(cancel_job))
        .route("/api/jobs/{id}/log", get(job_log))
}

/// Is the server up? (No token needed.)
#[utoipa::path(get, path = "/api/health", tag = "system", security(()),
    responses((status = 200, description = "The server is up", body = Health)))]
pub(super) async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

/// List API tokens (without secrets).
#[utoipa::path(get, path = "/api/tokens", tag = "system",
    responses((status = 200, body = Vec<super::schema::TokenInfo>), (status = 401, body = super::ErrorBody)))]
pub(super) async fn list_tokens(
    State(svc): State<Arc<Service>>,
    caller: Option<Extension<Caller>>,
) -> ApiResult<Json<Vec<TokenInfo>>> {
    require_admin(caller.as_ref(), "manage tokens")?;
    Ok(Json(blocking(&svc, |s| s.tokens.list()).await?))
}

/// Create an API token; the response holds the secret, shown only once.
#[utoipa::path(post, path = "/api/tokens", tag = "system", request_body = CreateToken,
    responses((status = 200, body = CreatedToken), (status = 400, body = super::ErrorBody),
              (status = 401, body = super::ErrorBody), (status = 409, body = super::ErrorBody)))]
pub(super) async fn create_token(
    State(svc): State<Arc<Service>>,
    caller: Option<Extension<Caller>>,
    ApiJson(req): ApiJson<CreateToken>,
) -> ApiResult<Json<CreatedToken>> {
    require_admin(caller.as_ref(), "manage tokens")?;
    let (info, token) = blocking(&svc, move |s| s.tokens.create(&req.name, req.admin)).await?;
    Ok(Json(CreatedToken { info, token }))
}

/// Revoke an API token by id or name.
#[utoipa::path(delete, path = "/api/tokens/{id}", tag = "system",
    params(("id" = String, Path, description = "Token id or name")),
    responses((status = 200, body = super::schema::TokenInfo), (status = 401, body = super::ErrorBody),
              (status = 404, body = super::ErrorBody)))]
pub(super) async fn revoke_token(
    State(svc): State<Arc<Service>>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
) -> ApiResult<Json<TokenInfo>> {
    require_admin(caller.as_ref(), "manage tokens")?;
    Ok(Json(blocking(&svc, move |s| s.tokens.revoke(&id)).await?))
}

/// List jobs, oldest first.
#[utoipa::path(get, path = "/api/jobs", tag = "jobs",
    responses((status = 200, body = Vec<super::schema::JobStatus>), (status = 401, body = super::ErrorBody)))]
pub(super) async fn list_jobs(State(svc): State<Arc<Service>>) -> ApiResult<Json<Vec<JobStatus>>> {
    Ok(Json(quick(&svc, |s| Ok(s.jobs.list()))?))
}

/// A job's state, progress and result.
#[utoipa::path(get, path = "/api/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, body = super::schema::JobStatus), (status = 401, body = super::ErrorBody),
              (status = 404, body = super::ErrorBody)))]
pub(super) async fn job_status(
    State(svc): State<Arc<Service>>,
    Path(id): Path<String>,
) -> ApiResult<Json<JobStatus>> {
    Ok(Json(quick(&svc, move |s| s.jobs.status(&id))?))
}

/// Cancel a running job; it removes what it half-made.
#[utoipa::path(delete, path = "/api/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, body = super::schema::JobStatus), (status = 401, body = super::ErrorBody),
              (status = 404, body = super::ErrorBody), (status = 409, body = super::ErrorBody)))]
pub(super) async fn cancel_job(
    State(svc): State<Arc<Service>>,
    Path(id): Path<String>,
) -> ApiResult<Json<JobStatus>> {
    Ok(Json(blocking(&svc, move |s| s.jobs.cancel(&id)).await?))
}

/// A job's log: when it started, its progress every 10%, what it reported, how it ended.
#[utoipa::path(get, path = "/api/jobs/{id}/log", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, body = Vec<super::schema::LogLine>), (status = 401, body = super::ErrorBody),
              (status = 404, body = super::ErrorBody)))]
pub(super) async fn job_log(
    State(svc): State<Arc<Service>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<strata_service::job_log::LogLine>>> {
    Ok(Json(blocking(&svc, move |s| s.jobs.log(&id)).await?))
}

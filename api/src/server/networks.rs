//! Networks: the bridges VMs' NICs join — create (or adopt an existing bridge), list, show,
//! remove.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};

use super::{blocking, ApiJson, ApiResult};
use strata_service::networks::{CreateNetwork, NetworkInfo};
use strata_service::Service;

pub(super) fn routes() -> Router<Arc<Service>> {
    Router::new()
        .route("/api/networks", get(list_networks).post(create_network))
        .route(
            "/api/networks/{name}",
            get(network_info).delete(remove_network),
        )
}

/// List networks with their bridges' state.
#[utoipa::path(get, path = "/api/networks", tag = "networks",
    responses((status = 200, body = Vec<super::schema::NetworkInfo>), (status = 401, body = super::ErrorBody)))]
pub(super) async fn list_networks(
    State(svc): State<Arc<Service>>,
) -> ApiResult<Json<Vec<NetworkInfo>>> {
    Ok(Json(blocking(&svc, |s| s.list_networks()).await?))
}

/// Create a network: its bridge (adopted if it exists), VLAN-aware if asked, with an uplink
/// port if given.
#[utoipa::path(post, path = "/api/networks", tag = "networks", request_body = super::schema::CreateNetwork,
    responses((status = 201, body = super::schema::NetworkInfo), (status = 400, body = super::ErrorBody),
              (status = 401, body = super::ErrorBody), (status = 403, body = super::ErrorBody),
              (status = 404, body = super::ErrorBody), (status = 409, body = super::ErrorBody),
              (status = 501, body = super::ErrorBody)))]
pub(super) async fn create_network(
    State(svc): State<Arc<Service>>,
    ApiJson(req): ApiJson<CreateNetwork>,
) -> ApiResult<(StatusCode, Json<NetworkInfo>)> {
    let info = blocking(&svc, move |s| s.create_network(&req)).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

/// One network with its bridge's state.
#[utoipa::path(get, path = "/api/networks/{name}", tag = "networks",
    params(("name" = String, Path, description = "Network")),
    responses((status = 200, body = super::schema::NetworkInfo), (status = 401, body = super::ErrorBody),
              (status = 404, body = super::ErrorBody)))]
pub(super) async fn network_info(
    State(svc): State<Arc<Service>>,
    Path(name): Path<String>,
) -> ApiResult<Json<NetworkInfo>> {
    Ok(Json(blocking(&svc, move |s| s.get_network(&name)).await?))
}

/// Remove a network no VM uses (its bridge goes too if Strata created it).
#[utoipa::path(delete, path = "/api/networks/{name}", tag = "networks",
    params(("name" = String, Path, description = "Network")),
    responses((status = 204, description = "Removed"), (status = 401, body = super::ErrorBody),
              (status = 404, body = super::ErrorBody), (status = 409, body = super::ErrorBody)))]
pub(super) async fn remove_network(
    State(svc): State<Arc<Service>>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    blocking(&svc, move |s| s.remove_network(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

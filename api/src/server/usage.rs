//! `GET /api/usage`: the storage usage history with "estimated full" dates and the datastore's
//! last measurement, for the dashboard.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use strata_service::usage_history::UsageReport;
use strata_service::Service;

use super::{quick, ApiResult};

pub(super) fn routes() -> Router<Arc<Service>> {
    Router::new()
        .route("/api/usage", get(usage))
        .route("/api/metrics", get(super::metrics::serve))
}

/// Usage history of every volume group, thin pool (data and metadata), the datastore and the
/// data file system, sampled by the server, with a straight-line estimate of when each fills;
/// and the datastore's figures at the last sample.
#[utoipa::path(get, path = "/api/usage", tag = "storage",
    responses((status = 200, body = super::schema::UsageReport), (status = 401, body = super::ErrorBody)))]
pub(super) async fn usage(State(svc): State<Arc<Service>>) -> ApiResult<Json<UsageReport>> {
    Ok(Json(quick(&svc, |s| Ok(s.usage_report()))?))
}

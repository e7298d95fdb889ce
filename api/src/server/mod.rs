//! The HTTP API: an axum router over the service layer, token authentication, JSON errors, and
//! an OpenAPI document generated from the handlers.
//!
//! Handlers parse the request, call one service method on a blocking thread (the service does
//! file and block I/O) and render the result. Every route but `/api/health` requires
//! `Authorization: Bearer ID.SECRET`.

mod backups;
mod error;
mod images;
pub mod openapi;
mod system;
mod volumes;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

pub use error::{ApiError, ApiJson, ApiResult, ErrorBody};

use crate::service::{Service, ServiceError, ServiceResult};

/// Largest JSON request body accepted.
pub const JSON_BODY_LIMIT: usize = 1 << 20;

/// Runs `f` on the blocking pool with the service.
pub(crate) async fn blocking<T, F>(svc: &Arc<Service>, f: F) -> ApiResult<T>
where
    T: Send + 'static,
    F: FnOnce(&Arc<Service>) -> ServiceResult<T> + Send + 'static,
{
    let svc = svc.clone();
    tokio::task::spawn_blocking(move || f(&svc))
        .await
        .map_err(|e| {
            ApiError(ServiceError::internal(format!(
                "A request handler failed: {e}"
            )))
        })?
        .map_err(ApiError)
}

async fn require_token(State(svc): State<Arc<Service>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    let Some(token) = presented else {
        return ApiError(ServiceError::Unauthorized).into_response();
    };
    match blocking(&svc, move |s| s.tokens.verify(&token)).await {
        Ok(_) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError(ServiceError::NotFound("No such API route".into()))
}

/// The router: every API route, authentication, limits.
pub fn router(svc: Arc<Service>) -> Router {
    let protected = Router::new()
        .merge(system::routes())
        .merge(images::routes())
        .merge(volumes::routes())
        .merge(backups::routes())
        .route("/api/openapi.json", get(openapi::serve))
        .route_layer(middleware::from_fn_with_state(svc.clone(), require_token));
    Router::new()
        .route("/api/health", get(system::health))
        .merge(protected)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(JSON_BODY_LIMIT))
        .with_state(svc)
}

/// Serves the API on `addr` until Ctrl-C or SIGTERM.
pub async fn serve(svc: Arc<Service>, addr: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("Cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    tracing::info!(%local, "serving the Strata API");
    println!("Strata API listening on http://{local}/api");
    axum::serve(listener, router(svc))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

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
mod transfer;
mod vms;
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

/// Runs a service call that only reads state the server holds in memory (open volume groups,
/// jobs, tokens) directly on the async worker: a round trip through the blocking pool would
/// cost more than the call (two thread wake-ups per request under load).
pub(crate) fn quick<T>(
    svc: &Arc<Service>,
    f: impl FnOnce(&Arc<Service>) -> ServiceResult<T>,
) -> ApiResult<T> {
    f(svc).map_err(ApiError)
}

/// The token a request came with (absent on the in-process router, whose caller is local).
#[derive(Clone, Debug)]
pub(super) struct Caller(pub crate::service::tokens::TokenInfo);

/// Refuses (403) callers whose token is not an admin token.
pub(super) fn require_admin(caller: Option<&axum::Extension<Caller>>, what: &str) -> ApiResult<()> {
    match caller {
        Some(axum::Extension(Caller(info))) if !info.admin => {
            Err(ApiError(ServiceError::Forbidden(format!(
                "Token {} may not {what}: that needs an admin token (`strata token create --admin`)",
                info.name
            ))))
        }
        _ => Ok(()),
    }
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
    // Verification is a hash, a constant-time scan of the tokens in memory and a stat of the
    // tokens file: cheaper inline than a trip through the blocking pool.
    match svc.tokens.verify(&token) {
        Ok(info) => {
            let mut req = req;
            req.extensions_mut().insert(Caller(info));
            next.run(req).await
        }
        Err(e) => ApiError(e).into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError(ServiceError::NotFound("No such API route".into()))
}

fn resource_routes() -> Router<Arc<Service>> {
    Router::new()
        .merge(system::routes())
        .merge(images::routes())
        .merge(volumes::routes())
        .merge(backups::routes())
        .merge(transfer::routes())
        .merge(vms::routes())
        .route("/api/openapi.json", get(openapi::serve))
}

fn finish(routes: Router<Arc<Service>>, svc: Arc<Service>) -> Router {
    Router::new()
        .route("/api/health", get(system::health))
        .merge(routes)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(JSON_BODY_LIMIT))
        .with_state(svc)
}

/// The router: every API route, authentication, limits.
pub fn router(svc: Arc<Service>) -> Router {
    let protected =
        resource_routes().route_layer(middleware::from_fn_with_state(svc.clone(), require_token));
    finish(protected, svc)
}

/// The same routes without authentication, for the CLI to call in-process on a local data
/// directory (whoever can run it there can read the data directory anyway). Never serve it
/// on a socket.
pub fn in_process_router(svc: Arc<Service>) -> Router {
    finish(resource_routes(), svc)
}

/// Serves the API on `addr` until Ctrl-C or SIGTERM.
pub async fn serve(svc: Arc<Service>, addr: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("Cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    tracing::info!(%local, "serving the Strata API");
    println!("Strata API listening on http://{local}/api");
    axum::serve(listener, router(svc.clone()))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    // Running VMs end with the server: stop them so that their disks are flushed.
    tokio::task::spawn_blocking(move || svc.stop_all_vms()).await?;
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

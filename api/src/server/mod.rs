//! The HTTP API: an axum router over the service layer, token authentication, JSON errors, and
//! an OpenAPI document generated from the handlers.
//!
//! Handlers parse the request, call one service method on a blocking thread (the service does
//! file and block I/O) and render the result. Every route but `/api/health` requires
//! `Authorization: Bearer ID.SECRET`, or the web UI's session cookie (with its CSRF header on
//! state-changing requests, see [`crate::ui::session`]).

mod backups;
mod error;
mod exports;
mod images;
pub mod limits;
pub mod listen;
pub mod metrics;
mod networks;
pub mod openapi;
pub mod schema;
mod schema_ui;
mod system;
mod transfer;
mod usage;
mod users;
mod vms;
mod volumes;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

pub use error::{ApiError, ApiJson, ApiResult, ErrorBody};
pub use limits::HttpLimits;
pub use listen::Transport;

use strata_service::{Service, ServiceError, ServiceResult};

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

/// Who made a request (absent on the in-process router, whose caller is local).
#[derive(Clone, Debug)]
pub(crate) struct Caller {
    /// The token's or the user's name.
    pub name: String,
    /// Admin rights.
    pub admin: bool,
    /// How the caller signed in: checked again by long-lived streams.
    pub credential: Credential,
}

/// What a request was authenticated with.
#[derive(Clone, Debug)]
pub(crate) enum Credential {
    /// A bearer token, by id.
    Token(String),
    /// A web UI session, by its (secret) id.
    Session(String),
}

impl Caller {
    /// Whether the credential still holds (the token exists, the session lives), without
    /// counting as use.
    pub(crate) fn still_valid(&self, svc: &Service) -> bool {
        match &self.credential {
            Credential::Token(id) => svc
                .tokens
                .list()
                .is_ok_and(|l| l.iter().any(|t| &t.id == id)),
            Credential::Session(id) => svc.peek_session(id).is_ok(),
        }
    }
}

/// Refuses (403) callers without admin rights.
pub(super) fn require_admin(caller: Option<&axum::Extension<Caller>>, what: &str) -> ApiResult<()> {
    match caller {
        Some(axum::Extension(c)) if !c.admin => {
            let who = match c.credential {
                Credential::Token(_) => "Token",
                Credential::Session(_) => "Signed in as",
            };
            Err(ApiError(ServiceError::Forbidden(format!(
                "{who} {} may not {what}: that needs an admin token (`strata token create --admin`) or an admin user",
                c.name
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
    let caller = match presented {
        // Verification is a hash, a constant-time scan of the tokens in memory and a stat of
        // the tokens file: cheaper inline than a trip through the blocking pool.
        Some(token) => match svc.tokens.verify(&token) {
            Ok(info) => Caller {
                name: info.name,
                admin: info.admin,
                credential: Credential::Token(info.id),
            },
            Err(e) => return ApiError(e).into_response(),
        },
        // No bearer token: the web UI's session cookie, with its CSRF checks.
        None => match crate::ui::session::caller(&svc, &req) {
            Ok(c) => c,
            Err(e) => return e.into_response(),
        },
    };
    let mut req = req;
    req.extensions_mut().insert(caller);
    next.run(req).await
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError(ServiceError::NotFound(format!(
        "The API route {}",
        uri.path().escape_debug()
    )))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError(ServiceError::MethodNotAllowed(format!(
        "The API route {} does not take {method}",
        uri.path().escape_debug()
    )))
}

/// Gives every error response the JSON error body: the framework's own rejections (a malformed
/// path or query, say) come as plain text.
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let body = ErrorBody {
        status: status.as_u16(),
        kind: status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase()
            .replace(' ', "-"),
        message: if text.is_empty() {
            status.canonical_reason().unwrap_or("Error").to_string()
        } else {
            text
        },
    };
    let mut out = (status, axum::Json(body)).into_response();
    for (k, v) in parts.headers.iter() {
        if k != axum::http::header::CONTENT_TYPE && k != axum::http::header::CONTENT_LENGTH {
            out.headers_mut().insert(k, v.clone());
        }
    }
    out
}

fn resource_routes() -> Router<Arc<Service>> {
    Router::new()
        .merge(system::routes())
        .merge(images::routes())
        .merge(volumes::routes())
        .merge(backups::routes())
        .merge(transfer::routes())
        .merge(vms::routes())
        .merge(networks::routes())
        .merge(exports::routes())
        .merge(users::routes())
        .merge(usage::routes())
        .merge(crate::ui::api_routes())
        .route("/api/openapi.json", get(openapi::serve))
}

fn finish(routes: Router<Arc<Service>>, svc: Arc<Service>, limits: HttpLimits) -> Router {
    Router::new()
        .route("/api/health", get(system::health))
        .merge(routes)
        .merge(crate::ui::page_routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(JSON_BODY_LIMIT))
        .layer(middleware::from_fn_with_state(limits, limits::bounded_body))
        .layer(axum::Extension(limits))
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn(metrics::observe))
        .with_state(svc)
}

/// The router: every API route, authentication, limits.
pub fn router(svc: Arc<Service>, limits: HttpLimits) -> Router {
    let protected =
        resource_routes().route_layer(middleware::from_fn_with_state(svc.clone(), require_token));
    finish(protected, svc, limits)
}

/// The same routes without authentication, for the CLI to call in-process on a local data
/// directory (whoever can run it there can read the data directory anyway). Never serve it
/// on a socket.
pub fn in_process_router(svc: Arc<Service>) -> Router {
    finish(resource_routes(), svc, HttpLimits::default())
}

/// Serves the API on `listener` until Ctrl-C or SIGTERM. Then it stops accepting
/// connections, cancels running jobs (which remove what they half-made) and waits for them and
/// for open requests at most the grace period, removes what a job still running leaves behind,
/// and stops the VMs it runs so that their disks are flushed.
pub async fn serve(
    svc: Arc<Service>,
    listener: tokio::net::TcpListener,
    transport: Transport,
    limits: HttpLimits,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    tracing::info!(%local, scheme = transport.scheme(), "serving the Strata API");
    println!(
        "Strata API listening on {}://{local}/api",
        transport.scheme()
    );
    // Streams (job events, consoles) end when the server stops.
    let streams_end = tokio_util::sync::CancellationToken::new();
    let app = router(svc.clone(), limits).layer(axum::Extension(crate::ui::ServerFacts {
        tls: matches!(transport, Transport::Tls(_)),
        stopping: streams_end.clone(),
    }));
    let jobs = svc.jobs.clone();
    let stopping = async move {
        shutdown_signal().await;
        // Jobs first: they notice at their next chunk and clean up while connections drain.
        jobs.cancel_all();
        streams_end.cancel();
    };
    listen::run(app, listener, transport, limits, stopping).await;
    let svc2 = svc.clone();
    tokio::task::spawn_blocking(move || {
        if !svc2.jobs.wait_idle(limits.shutdown_grace) {
            tracing::warn!("jobs still running at shutdown were abandoned");
        }
        svc2.stop_exports();
        if let Err(e) = svc2.remove_leftovers() {
            tracing::warn!(error = %e, "removing what jobs left behind failed");
        }
        // VMs outlive the server, except those whose disks it serves.
        svc2.release_vms(limits.shutdown_grace);
    })
    .await
    .map_err(std::io::Error::other)
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

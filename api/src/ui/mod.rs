//! The web UI, served by `strata serve` on the API's port.
//!
//! A small single-page application in plain JavaScript (no framework, no build step) over the
//! same JSON API the CLI uses: see docs/architecture.md for why. This module serves its pages
//! and assets and the few endpoints only a browser needs:
//!
//! | path | what |
//! |---|---|
//! | `/`, `/ui`, `/ui/…` | the application's page (a session is needed; else a redirect to `/ui/login`) |
//! | `/ui/login` | the sign-in page |
//! | `/ui/assets/NAME.HASH.EXT` | scripts, styles and vendored libraries, cached for a year ([`assets`]) |
//! | `/ui/session` | sign in (POST), the session and its CSRF token (GET), sign out (DELETE) ([`session`]) |
//! | `/api/events` | server-sent events: job progress ([`events`]) |
//! | `/api/vms/{name}/console/ws` | a VM's serial console over a WebSocket ([`console`]) |
//!
//! Every page response carries a strict Content-Security-Policy: scripts only from this origin
//! (with subresource integrity), no inline script, no framing.

pub mod assets;
pub mod console;
pub mod events;
pub mod pages;
pub mod session;

use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use strata_service::Service;

/// What handlers need to know about the running server.
#[derive(Clone, Debug)]
pub struct ServerFacts {
    /// Served over TLS: session cookies are `Secure` (and `__Host-` prefixed).
    pub tls: bool,
    /// Cancelled when the server begins to stop: long-lived streams end.
    pub stopping: tokio_util::sync::CancellationToken,
}

/// Routes that need a token or a session (merged into the API's protected routes).
pub(crate) fn api_routes() -> Router<Arc<Service>> {
    Router::new()
        .route("/api/events", get(events::stream))
        .route("/api/vms/{name}/console/ws", get(console::stream))
}

/// The pages, assets and session endpoints (they check sessions themselves).
pub(crate) fn page_routes() -> Router<Arc<Service>> {
    Router::new()
        .route("/", get(pages::root))
        .route("/ui", get(pages::app))
        .route("/ui/", get(pages::app))
        .route("/ui/login", get(pages::login))
        .route("/ui/assets/{file}", get(assets::serve))
        .route(
            "/ui/session",
            get(session::current)
                .post(session::sign_in)
                .delete(session::sign_out),
        )
        .route("/ui/{*path}", get(pages::app))
}

//! The HTTP face of a Strata appliance: the axum server over the service layer, its OpenAPI
//! document, the web UI, and the HTTP client the CLI and tests use. The service types stay free of HTTP:
//! `server/schema.rs` maps them to the wire and the schema.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod client;
pub mod server;
pub mod ui;

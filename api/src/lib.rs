//! The HTTP face of a Strata appliance: the axum server over the service layer, its OpenAPI
//! document, the web UI, and the HTTP client the CLI and tests use. The service types stay free of HTTP:
//! `server/schema.rs` maps them to the wire and the schema.

pub mod client;
pub mod server;
pub mod ui;

//! The `strata` command's library: the CLI, the service layer behind both the CLI and the HTTP
//! API, and the HTTP server.

pub mod cli;
pub mod client;
pub mod install;
pub mod server;
pub mod service;

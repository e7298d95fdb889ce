//! Errors of the NBD crate's control plane (configuration, exports, starting the server). Errors
//! of a single connection end that connection and are logged; they never reach the caller.

use std::path::PathBuf;

use strata_storage::StorageError;

/// An NBD server error.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// A setting is unusable.
    #[error("{0}")]
    InvalidConfig(String),
    /// An export of that name exists.
    #[error("An export named '{0}' exists already")]
    ExportExists(String),
    /// No export of that name.
    #[error("No export named '{0}'")]
    NoSuchExport(String),
    /// A TLS file could not be used.
    #[error("TLS file {path}: {reason}")]
    Tls {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A socket could not be set up.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The system's error.
        source: std::io::Error,
    },
    /// Opening the exported device failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl NbdError {
    /// An I/O error with context.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> NbdError {
        NbdError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Result of the NBD crate.
pub type Result<T, E = NbdError> = std::result::Result<T, E>;

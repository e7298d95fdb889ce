//! Errors of the service layer, each with the HTTP status it maps to.

use strata_storage::StorageError;

/// What went wrong in a service call. See [`ServiceError::status`] for the HTTP mapping.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The block layer failed; its kind decides the status.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The request is malformed (400).
    #[error("{0}")]
    BadRequest(String),
    /// No or a wrong API token (401).
    #[error("A valid API token is required (Authorization: Bearer …)")]
    Unauthorized,
    /// Authenticated, but the request reaches outside what the API may touch (403).
    #[error("{0}")]
    Forbidden(String),
    /// Nothing by that name (404).
    #[error("{0} not found")]
    NotFound(String),
    /// The route exists, but not with this method (405).
    #[error("{0}")]
    MethodNotAllowed(String),
    /// It exists already, or is in use (409).
    #[error("{0}")]
    Conflict(String),
    /// The request body is too large (413).
    #[error("Request body is too large (limit {limit} bytes)")]
    TooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The client was too slow: no data for too long, or a request past its deadline (408).
    #[error("{0}")]
    Timeout(String),
    /// An upload without a Content-Length (411).
    #[error("An upload needs a Content-Length header")]
    LengthRequired,
    /// Too many jobs are running (429).
    #[error("{0} jobs are running already; wait for one to end")]
    TooManyJobs(usize),
    /// The job was cancelled.
    #[error("Cancelled")]
    Cancelled,
    /// A bug or an unexpected system failure (500).
    #[error("{0}")]
    Internal(String),
}

impl ServiceError {
    /// An internal error with a message.
    pub fn internal(msg: impl Into<String>) -> ServiceError {
        ServiceError::Internal(msg.into())
    }

    /// The HTTP status code for this error.
    pub fn status(&self) -> u16 {
        match self {
            ServiceError::Storage(e) => match e {
                StorageError::InvalidInput(_) | StorageError::OutOfRange { .. } => 400,
                StorageError::NotFound(_) => 404,
                StorageError::AlreadyExists(_)
                | StorageError::Busy(_)
                | StorageError::ReadOnly(_) => 409,
                StorageError::OutOfSpace(_) => 507,
                StorageError::Unsupported(_) => 501,
                StorageError::Corrupt { .. } => 422,
                StorageError::Io { .. } | StorageError::Unavailable(_) => 500,
                StorageError::Forbidden(_) => 403,
                StorageError::Cancelled => 409,
            },
            ServiceError::BadRequest(_) => 400,
            ServiceError::Unauthorized => 401,
            ServiceError::Forbidden(_) => 403,
            ServiceError::NotFound(_) => 404,
            ServiceError::MethodNotAllowed(_) => 405,
            ServiceError::Conflict(_) => 409,
            ServiceError::LengthRequired => 411,
            ServiceError::TooLarge { .. } => 413,
            ServiceError::Timeout(_) => 408,
            ServiceError::TooManyJobs(_) => 429,
            ServiceError::Cancelled => 409,
            ServiceError::Internal(_) => 500,
        }
    }

    /// A short machine-readable kind, included in JSON error bodies.
    pub fn kind(&self) -> &'static str {
        match self.status() {
            400 => "bad-request",
            401 => "unauthorized",
            403 => "forbidden",
            404 => "not-found",
            405 => "method-not-allowed",
            408 => "timeout",
            409 => "conflict",
            411 => "length-required",
            413 => "too-large",
            422 => "corrupt",
            429 => "too-many-jobs",
            501 => "unsupported",
            507 => "out-of-space",
            _ => "internal",
        }
    }
}

//! Turning service errors and rejected requests into JSON responses with the right status.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Serialize;
use utoipa::ToSchema;

use strata_service::ServiceError;

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// HTTP status code.
    pub status: u16,
    /// Machine-readable kind: bad-request, unauthorized, not-found, conflict, too-large,
    /// corrupt, unsupported, out-of-space, internal.
    pub kind: String,
    /// What went wrong, for people.
    pub message: String,
}

/// A handler's error: a service error rendered as JSON.
#[derive(Debug)]
pub struct ApiError(pub ServiceError);

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        ApiError(e)
    }
}

impl From<strata_storage::StorageError> for ApiError {
    fn from(e: strata_storage::StorageError) -> Self {
        ApiError(ServiceError::Storage(e))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::warn!(error = %self.0, "request failed");
        }
        let body = ErrorBody {
            status: status.as_u16(),
            kind: self.0.kind().to_string(),
            message: self.0.to_string(),
        };
        (status, Json(body)).into_response()
    }
}

/// Result type of handlers.
pub type ApiResult<T> = Result<T, ApiError>;

/// A JSON body whose rejections (malformed JSON, wrong content type, too large) are JSON errors
/// with the right status too.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rej) => Err(ApiError(rejection(rej))),
        }
    }
}

fn rejection(rej: JsonRejection) -> ServiceError {
    if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ServiceError::TooLarge {
            limit: super::JSON_BODY_LIMIT as u64,
        };
    }
    ServiceError::BadRequest(format!("Invalid request body: {}", rej.body_text()))
}

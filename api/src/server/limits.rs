//! Bounds on what a slow or greedy client can hold: time to send headers (enforced by the
//! connection, see [`super::listen`]), time between body bytes, a deadline for a whole upload,
//! the size a request may declare, and connections open at once.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::CONTENT_LENGTH;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use super::ApiError;
use strata_service::ServiceError;

/// The server's limits; every one is configurable on `strata serve`.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// Time a client has to send a request's headers.
    pub header_timeout: Duration,
    /// Longest pause in a request body.
    pub body_idle_timeout: Duration,
    /// Time a whole upload may take.
    pub upload_deadline: Duration,
    /// Largest upload accepted (its declared Content-Length).
    pub max_upload: u64,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Time running jobs get to stop when the server shuts down, and open connections to end.
    pub shutdown_grace: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: Duration::from_secs(30),
            body_idle_timeout: Duration::from_secs(60),
            upload_deadline: Duration::from_secs(24 * 3600),
            max_upload: 4 << 40,
            max_connections: 512,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// The declared body length, if any; a malformed one is a bad request.
pub fn declared_length(req: &axum::http::HeaderMap) -> Result<Option<u64>, ApiError> {
    match req.get(CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| ApiError(ServiceError::BadRequest("Malformed Content-Length".into()))),
    }
}

/// Reads every request body except uploads (which stream under their own deadline) before the
/// handler runs: a declared length over the JSON limit gets 413 at once, a body that pauses
/// longer than the idle timeout gets 408, and one that grows past the limit gets 413.
pub async fn bounded_body(State(limits): State<HttpLimits>, req: Request, next: Next) -> Response {
    if req.uri().path().ends_with("/upload") {
        return next.run(req).await;
    }
    match read_small_body(req, limits).await {
        Ok(req) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

async fn read_small_body(req: Request, limits: HttpLimits) -> Result<Request, ApiError> {
    let limit = super::JSON_BODY_LIMIT as u64;
    let too_large = || ApiError(ServiceError::TooLarge { limit });
    if declared_length(req.headers())?.is_some_and(|n| n > limit) {
        linger(req.into_body());
        return Err(too_large());
    }
    let (parts, mut body) = req.into_parts();
    let mut bytes = Vec::new();
    loop {
        let frame = tokio::time::timeout(limits.body_idle_timeout, body.frame())
            .await
            .map_err(|_| {
                ApiError(ServiceError::Timeout(format!(
                    "The request body paused for more than {} s",
                    limits.body_idle_timeout.as_secs()
                )))
            })?;
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| {
            ApiError(ServiceError::BadRequest(format!(
                "The request body broke off: {e}"
            )))
        })?;
        if let Ok(data) = frame.into_data() {
            if bytes.len() as u64 + data.len() as u64 > limit {
                return Err(too_large());
            }
            bytes.extend_from_slice(&data);
        }
    }
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

/// Most bytes of a refused request's body read and thrown away after the answer.
const LINGER_BYTES: u64 = 16 << 20;
/// Longest time spent doing so.
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads and discards a refused request's body, up to a bound, while its answer goes out: a
/// client still sending would otherwise see its connection reset before it reads the answer
/// (the "lingering close" of other servers). Past the bound the connection is dropped.
pub fn linger(body: Body) {
    tokio::spawn(async move {
        let mut body = body;
        let mut seen = 0u64;
        let until = tokio::time::Instant::now() + LINGER_TIME;
        while seen < LINGER_BYTES {
            match tokio::time::timeout_at(until, body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    seen += frame.data_ref().map_or(0, |d| d.len() as u64);
                }
                _ => break,
            }
        }
    });
}

/// Parses a duration: a number of seconds, or a number with `s`, `m`, `h` or `d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("Invalid duration {text:?}: expected e.g. 30s, 5m, 2h or 1d"))?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86400),
        _ => None,
    }
    .ok_or_else(|| format!("Invalid duration {text:?}: expected e.g. 30s, 5m, 2h or 1d"))?;
    if secs == 0 {
        return Err(format!("Invalid duration {text:?}: it must be above zero"));
    }
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86400));
        for bad in ["", "0", "5x", "-1", "99999999999999999999d", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}

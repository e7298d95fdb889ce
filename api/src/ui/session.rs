//! Signing in to the web UI, the session cookie, and CSRF protection.
//!
//! `POST /ui/session` takes `{"token": "ID.SECRET"}` or `{"user": NAME, "password": …}` and
//! answers with the session (its CSRF token included) and a cookie holding the session id:
//! `HttpOnly`, `SameSite=Strict`, `Path=/`, a `Max-Age` of the session's lifetime, and over TLS
//! `Secure` with the `__Host-` name prefix (so no other site or subdomain can set it). `GET
//! /ui/session` returns the session again (the page reads its CSRF token from there; a
//! cross-origin page cannot read the answer), `DELETE /ui/session` signs out.
//!
//! Requests authenticated by the cookie alone are checked for cross-site forgery:
//! - every method but GET and HEAD must repeat the session's CSRF token in `X-CSRF-Token`
//!   (compared in constant time);
//! - a request the browser marks as coming from another site (`Sec-Fetch-Site: cross-site` or
//!   `same-site`), or whose `Origin` names another host, is refused, GETs included (this
//!   covers WebSocket handshakes, which carry no custom header).
//!
//! Bearer tokens are not cookies: requests with `Authorization` skip these checks, unchanged.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::header::{COOKIE, HOST, ORIGIN, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use strata_service::sessions::{csrf_matches, SessionInfo};
use strata_service::{Service, ServiceError};

use super::ServerFacts;
use crate::server::{blocking, ApiError, ApiJson, ApiResult, Caller, Credential};

/// The cookie's name over TLS.
pub const SECURE_COOKIE: &str = "__Host-strata-session";
/// The cookie's name over plain HTTP (loopback).
pub const PLAIN_COOKIE: &str = "strata-session";
/// The header that carries the CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a failed sign-in waits before answering.
const FAILED_SIGN_IN_DELAY: Duration = Duration::from_millis(700);

/// The session id in the request's cookies, if any.
pub fn session_id(headers: &HeaderMap) -> Option<String> {
    for value in headers.get_all(COOKIE) {
        let Ok(text) = value.to_str() else { continue };
        for pair in text.split(';') {
            let Some((k, v)) = pair.trim().split_once('=') else {
                continue;
            };
            if (k == SECURE_COOKIE || k == PLAIN_COOKIE) && !v.is_empty() && v.len() <= 128 {
                return Some(v.to_string());
            }
        }
    }
    None
}

/// Refuses requests that a browser made for another site.
pub fn same_origin(headers: &HeaderMap) -> Result<(), ApiError> {
    let forbidden = |why: &str| {
        Err(ApiError(ServiceError::Forbidden(format!(
            "Cross-site request refused: {why}"
        ))))
    };
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        if site == "cross-site" || site == "same-site" {
            return forbidden(&format!("Sec-Fetch-Site is {site}"));
        }
    }
    if let Some(origin) = headers.get(ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let host = headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let origin_host = origin
            .strip_prefix("https://")
            .or_else(|| origin.strip_prefix("http://"))
            .unwrap_or("");
        if origin_host.is_empty() || !origin_host.eq_ignore_ascii_case(host) {
            return forbidden("the Origin is another site");
        }
    }
    Ok(())
}

/// Whether a request of this method changes state (and so needs the CSRF token).
fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD)
}

/// Whether requests to this path are long-lived streams, which must not keep a session alive.
fn is_stream(path: &str) -> bool {
    path == "/api/events" || path.ends_with("/console/ws") || path.ends_with("/console/stream")
}

/// The caller of an API request that came without a bearer token: its session cookie,
/// checked for forgery.
pub(crate) fn caller(svc: &Service, req: &Request) -> Result<Caller, ApiError> {
    let headers = req.headers();
    let id = session_id(headers).ok_or(ApiError(ServiceError::Unauthorized))?;
    same_origin(headers)?;
    let info = if is_stream(req.uri().path()) {
        svc.peek_session(&id)?
    } else {
        svc.session(&id)?
    };
    if changes_state(req.method()) {
        let presented = headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !csrf_matches(&info, presented) {
            return Err(ApiError(ServiceError::Forbidden(format!(
                "A {} request with the session cookie needs the session's CSRF token in X-CSRF-Token",
                req.method()
            ))));
        }
    }
    Ok(Caller {
        name: info.name,
        admin: info.admin,
        credential: Credential::Session(id),
    })
}

/// How to sign in.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignIn {
    /// An API token.
    #[serde(default)]
    token: Option<String>,
    /// A local user's name.
    #[serde(default)]
    user: Option<String>,
    /// The user's password.
    #[serde(default)]
    password: Option<String>,
}

fn cookie(facts: Option<&ServerFacts>, value: &str, max_age: u64) -> HeaderValue {
    let tls = facts.is_some_and(|f| f.tls);
    let (name, secure) = if tls {
        (SECURE_COOKIE, "; Secure")
    } else {
        (PLAIN_COOKIE, "")
    };
    let text =
        format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}");
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Signs in with a token or a user's name and password.
pub(crate) async fn sign_in(
    State(svc): State<Arc<Service>>,
    facts: Option<Extension<ServerFacts>>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<SignIn>,
) -> ApiResult<Response> {
    same_origin(&headers)?;
    let outcome = match (req.token, req.user, req.password) {
        (Some(token), None, None) => {
            blocking(&svc, move |s| s.sign_in_with_token(token.trim())).await
        }
        (None, Some(user), Some(password)) => {
            blocking(&svc, move |s| s.sign_in_with_password(&user, &password)).await
        }
        _ => {
            return Err(ApiError(ServiceError::BadRequest(
                "Sign in with {\"token\": …} or with {\"user\": …, \"password\": …}".into(),
            )))
        }
    };
    let (id, info) = match outcome {
        Ok(v) => v,
        Err(ApiError(ServiceError::Unauthorized)) => {
            tokio::time::sleep(FAILED_SIGN_IN_DELAY).await;
            return Err(ApiError(ServiceError::Forbidden(
                "Wrong token, user name or password".into(),
            )));
        }
        Err(e) => return Err(e),
    };
    let lifetime = svc.sessions.settings().lifetime.as_secs();
    let mut resp = Json(info).into_response();
    resp.headers_mut()
        .insert(SET_COOKIE, cookie(facts.as_deref(), &id, lifetime));
    no_store(&mut resp);
    Ok(resp)
}

/// The session of the cookie, with its CSRF token.
pub(crate) async fn current(
    State(svc): State<Arc<Service>>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    same_origin(&headers)?;
    let id = session_id(&headers).ok_or(ApiError(ServiceError::Unauthorized))?;
    let info: SessionInfo = svc.session(&id)?;
    let mut resp = Json(info).into_response();
    no_store(&mut resp);
    Ok(resp)
}

/// Signs out: the session ends and the cookie is cleared.
pub(crate) async fn sign_out(
    State(svc): State<Arc<Service>>,
    facts: Option<Extension<ServerFacts>>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    same_origin(&headers)?;
    let id = session_id(&headers).ok_or(ApiError(ServiceError::Unauthorized))?;
    let info = svc.peek_session(&id)?;
    let presented = headers
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !csrf_matches(&info, presented) {
        return Err(ApiError(ServiceError::Forbidden(
            "Signing out needs the session's CSRF token in X-CSRF-Token".into(),
        )));
    }
    svc.sign_out(&id);
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut()
        .insert(SET_COOKIE, cookie(facts.as_deref(), "", 0));
    no_store(&mut resp);
    Ok(resp)
}

/// Keeps an answer out of every cache.
pub fn no_store(resp: &mut Response) {
    resp.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let h = headers(&[("cookie", "a=b; __Host-strata-session=abc123; c=d")]);
        assert_eq!(session_id(&h).as_deref(), Some("abc123"));
        let h = headers(&[("cookie", "x=1"), ("cookie", "strata-session=zz")]);
        assert_eq!(session_id(&h).as_deref(), Some("zz"));
        assert_eq!(session_id(&headers(&[("cookie", "strata-session=")])), None);
        assert_eq!(session_id(&headers(&[])), None);
    }

    #[test]
    fn other_sites_are_refused() {
        let ok = headers(&[
            ("host", "10.0.0.5:8006"),
            ("origin", "https://10.0.0.5:8006"),
        ]);
        assert!(same_origin(&ok).is_ok());
        assert!(same_origin(&headers(&[("host", "h")])).is_ok());
        for bad in [
            headers(&[
                ("host", "10.0.0.5:8006"),
                ("origin", "https://evil.example"),
            ]),
            headers(&[("host", "10.0.0.5:8006"), ("origin", "null")]),
            headers(&[("host", "h"), ("sec-fetch-site", "cross-site")]),
            headers(&[("host", "h"), ("sec-fetch-site", "same-site")]),
        ] {
            assert_eq!(same_origin(&bad).unwrap_err().0.status(), 403, "{bad:?}");
        }
    }

    #[test]
    fn cookies_are_http_only_strict_and_secure_over_tls() {
        let facts = ServerFacts {
            tls: true,
            stopping: Default::default(),
        };
        let c = cookie(Some(&facts), "abc", 60);
        assert_eq!(
            c.to_str().unwrap(),
            "__Host-strata-session=abc; Path=/; HttpOnly; SameSite=Strict; Max-Age=60; Secure"
        );
        let c = cookie(None, "abc", 60);
        assert_eq!(
            c.to_str().unwrap(),
            "strata-session=abc; Path=/; HttpOnly; SameSite=Strict; Max-Age=60"
        );
    }
}

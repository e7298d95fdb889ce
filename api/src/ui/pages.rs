//! The two HTML pages: the application (for a live session) and the sign-in page. Both are
//! small shells: the application's script builds each view from the JSON API.

use std::sync::Arc;

use axum::extract::{OriginalUri, State};
use axum::http::header::{CONTENT_TYPE, LOCATION};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use strata_service::Service;

use super::assets::{self, Asset};
use super::session::{no_store, session_id};

/// The Content-Security-Policy of every page. Styles allow inline `style` attributes and
/// elements because xterm.js sets them; scripts come from this origin only.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
    img-src 'self' data:; font-src 'self'; connect-src 'self'; base-uri 'none'; \
    form-action 'self'; frame-ancestors 'none'";

const APP_HTML: &str = include_str!("../../ui/app.html");
const LOGIN_HTML: &str = include_str!("../../ui/login.html");

/// Headers every HTML page carries.
fn page(html: String) -> Response {
    let mut resp = (StatusCode::OK, html).into_response();
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        HeaderName::from_static("content-security-policy"),
        HeaderValue::from_static(CSP),
    );
    h.insert(
        HeaderName::from_static("x-frame-options"),
        HeaderValue::from_static("DENY"),
    );
    h.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        HeaderName::from_static("referrer-policy"),
        HeaderValue::from_static("no-referrer"),
    );
    no_store(&mut resp);
    resp
}

/// `<script>`/`<link>` tags with integrity hashes for `names`.
fn tags(names: &[&str]) -> String {
    names
        .iter()
        .filter_map(|n| assets::get(n))
        .map(|a: &Asset| {
            if a.content_type.starts_with("text/css") {
                format!(
                    "<link rel=\"stylesheet\" href=\"{}\" integrity=\"{}\">",
                    a.url, a.integrity
                )
            } else {
                format!(
                    "<script src=\"{}\" integrity=\"{}\" defer></script>",
                    a.url, a.integrity
                )
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Fills a page's placeholders: `{{head}}` (styles and scripts) and `{{assets}}` (the lazily
/// loaded libraries' URLs and hashes, as JSON data).
fn render(template: &str, head: &[&str], lazy: &[&str]) -> String {
    let lazy: serde_json::Map<String, serde_json::Value> = lazy
        .iter()
        .filter_map(|n| assets::get(n))
        .map(|a| {
            (
                a.name.to_string(),
                serde_json::json!({"url": a.url, "integrity": a.integrity}),
            )
        })
        .collect();
    // JSON inside a <script> data block: `<` is escaped so that no `</script>` can appear.
    let lazy = serde_json::Value::Object(lazy)
        .to_string()
        .replace('<', "\\u003c");
    template
        .replace("{{head}}", &tags(head))
        .replace("{{assets}}", &lazy)
        .replace("{{version}}", env!("CARGO_PKG_VERSION"))
        .replace(
            "{{icon}}",
            assets::get("icon.svg").map_or("", |a| a.url.as_str()),
        )
}

fn redirect(to: &str) -> Response {
    let mut resp = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        resp.headers_mut().insert(LOCATION, v);
    }
    no_store(&mut resp);
    resp
}

/// `/`: to the application.
pub(crate) async fn root() -> Response {
    redirect("/ui/")
}

/// The application's page, for a live session; others are sent to sign in (and back here
/// after).
pub(crate) async fn app(
    State(svc): State<Arc<Service>>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> Response {
    let live = session_id(&headers).is_some_and(|id| svc.session(&id).is_ok());
    if !live {
        let next = uri.path();
        // Only paths of the application come back as `next` (no open redirect).
        let next = if next.starts_with("/ui/") && next.bytes().all(|b| b.is_ascii_graphic()) {
            next
        } else {
            "/ui/"
        };
        return redirect(&format!("/ui/login?next={}", percent_encode(next)));
    }
    page(render(
        APP_HTML,
        &["strata.css", "app.js"],
        &["xterm.js", "xterm.css"],
    ))
}

/// The sign-in page.
pub(crate) async fn login() -> Response {
    page(render(LOGIN_HTML, &["strata.css", "login.js"], &[]))
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

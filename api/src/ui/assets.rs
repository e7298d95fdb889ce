//! The UI's static files, compiled into the binary from `api/ui/`.
//!
//! Each is served at `/ui/assets/STEM.HASH.EXT`, where HASH is the start of the SHA-256 of its
//! bytes: the URL changes whenever the file does, so it is cached for a year
//! (`Cache-Control: public, max-age=31536000, immutable`) and pages name it with a subresource
//! integrity hash (SHA-384). The application's script is several files under `api/ui/js/`
//! joined in order at start; vendored libraries (`api/ui/vendor/`, with their licences and
//! versions in `api/ui/vendor/README.md`) are served as they are.

use std::sync::OnceLock;

use axum::body::Bytes;
use axum::extract::Path;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use sha2::{Digest, Sha256, Sha384};

/// The application's script, in load order.
const APP_JS: &[&str] = &[
    include_str!("../../ui/js/core.js"),
    include_str!("../../ui/js/dom.js"),
    include_str!("../../ui/js/events.js"),
    include_str!("../../ui/js/charts.js"),
    include_str!("../../ui/js/dashboard.js"),
    include_str!("../../ui/js/volumes.js"),
    include_str!("../../ui/js/images.js"),
    include_str!("../../ui/js/backups.js"),
    include_str!("../../ui/js/jobs.js"),
    include_str!("../../ui/js/vms.js"),
    include_str!("../../ui/js/console.js"),
    include_str!("../../ui/js/settings.js"),
    include_str!("../../ui/js/main.js"),
];

/// The application's script: the first file (which defines the `Strata` namespace) as it is,
/// each other file in a block of its own so that its top-level names stay its own.
fn app_js() -> String {
    let mut out = String::new();
    for (i, file) in APP_JS.iter().enumerate() {
        if i == 0 {
            out.push_str(file);
        } else {
            out.push_str("{\n");
            out.push_str(file);
            out.push_str("\n}\n");
        }
    }
    out
}

/// Files served as they are: name, content type, bytes.
const FILES: &[(&str, &str, &[u8])] = &[
    (
        "strata.css",
        "text/css; charset=utf-8",
        include_bytes!("../../ui/strata.css"),
    ),
    (
        "login.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/js/login.js"),
    ),
    (
        "xterm.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/vendor/xterm/xterm.js"),
    ),
    (
        "xterm.css",
        "text/css; charset=utf-8",
        include_bytes!("../../ui/vendor/xterm/xterm.css"),
    ),
    (
        "icon.svg",
        "image/svg+xml",
        include_bytes!("../../ui/icon.svg"),
    ),
];

/// One served file.
#[derive(Debug)]
pub struct Asset {
    /// Its name without the hash (`app.js`).
    pub name: &'static str,
    /// Its URL (`/ui/assets/app.0123456789ab.js`).
    pub url: String,
    /// `sha384-…` for the `integrity` attribute.
    pub integrity: String,
    /// The Content-Type.
    pub content_type: &'static str,
    bytes: Bytes,
}

fn make(name: &'static str, content_type: &'static str, bytes: Bytes) -> Asset {
    let hash: String = Sha256::digest(&bytes)
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    let (stem, ext) = name.rsplit_once('.').unwrap_or((name, ""));
    let integrity = format!(
        "sha384-{}",
        base64::engine::general_purpose::STANDARD.encode(Sha384::digest(&bytes))
    );
    Asset {
        name,
        url: format!("/ui/assets/{stem}.{hash}.{ext}"),
        integrity,
        content_type,
        bytes,
    }
}

fn all() -> &'static [Asset] {
    static ALL: OnceLock<Vec<Asset>> = OnceLock::new();
    ALL.get_or_init(|| {
        let mut out = vec![make(
            "app.js",
            "text/javascript; charset=utf-8",
            Bytes::from(app_js()),
        )];
        out.extend(
            FILES
                .iter()
                .map(|(n, t, b)| make(n, t, Bytes::from_static(b))),
        );
        out
    })
}

/// The asset named `name` (without its hash).
pub fn get(name: &str) -> Option<&'static Asset> {
    all().iter().find(|a| a.name == name)
}

/// Serves `/ui/assets/STEM.HASH.EXT`; a stale or unknown hash is 404.
pub(crate) async fn serve(Path(file): Path<String>) -> Response {
    let path = format!("/ui/assets/{file}");
    let Some(a) = all().iter().find(|a| a.url == path) else {
        return (StatusCode::NOT_FOUND, "No such asset").into_response();
    };
    let mut resp = a.bytes.clone().into_response();
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(a.content_type));
    h.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    h.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_has_a_hashed_url_and_an_integrity_hash() {
        for name in [
            "app.js",
            "strata.css",
            "login.js",
            "xterm.js",
            "xterm.css",
            "icon.svg",
        ] {
            let a = get(name).unwrap_or_else(|| panic!("{name} missing"));
            assert!(a.url.starts_with("/ui/assets/"), "{}", a.url);
            assert_eq!(a.url.matches('.').count(), 2, "{}", a.url);
            assert!(a.integrity.starts_with("sha384-") && a.integrity.len() == 7 + 64);
            assert!(!a.bytes.is_empty());
        }
    }
}

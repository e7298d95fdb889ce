//! `GET /api/metrics`: the appliance's metrics in the Prometheus text format (token or session
//! needed), plus the HTTP server's own: requests by route template, method and status, and
//! their latencies.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use strata_service::metrics::histogram::HistogramVec;
use strata_service::metrics::text::{Kind, MetricWriter};
use strata_service::Service;

use super::{blocking, ApiResult};

/// Latency bucket bounds in seconds.
const LATENCY_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static LATENCY: HistogramVec = HistogramVec::new(LATENCY_BOUNDS, &["method", "route"]);
static REQUESTS: Mutex<BTreeMap<(String, String, u16), u64>> = Mutex::new(BTreeMap::new());
/// Distinct (method, route, status) triples counted at most.
const MAX_REQUEST_SERIES: usize = 4096;

/// Counts every request and records its latency (time to the response's head: streamed
/// bodies such as downloads and event streams count until they start).
pub(crate) async fn observe(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let method = req.method().as_str().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    LATENCY.observe(&[&method, &route], start.elapsed().as_secs_f64());
    let mut counts = REQUESTS.lock().unwrap_or_else(|p| p.into_inner());
    let key = (method, route, resp.status().as_u16());
    if counts.contains_key(&key) || counts.len() < MAX_REQUEST_SERIES {
        *counts.entry(key).or_default() += 1;
    }
    resp
}

fn write_http(w: &mut MetricWriter) {
    w.family(
        "strata_http_requests_total",
        Kind::Counter,
        "HTTP requests answered, by method, route template and status code.",
    );
    let counts = REQUESTS.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for ((method, route, code), n) in &counts {
        w.sample(
            "strata_http_requests_total",
            &[
                ("method", method),
                ("route", route),
                ("code", &code.to_string()),
            ],
            *n as f64,
        );
    }
    LATENCY.write(
        w,
        "strata_http_request_duration_seconds",
        "Time from a request's arrival to its response's head, by method and route template.",
    );
}

/// The metrics.
#[utoipa::path(get, path = "/api/metrics", tag = "system",
    responses((status = 200, description = "Metrics in the Prometheus text format (version 0.0.4)", content_type = "text/plain"),
              (status = 401, body = super::ErrorBody)))]
pub(super) async fn serve(State(svc): State<Arc<Service>>) -> ApiResult<Response> {
    let mut text = blocking(&svc, |s| {
        let mut w = MetricWriter::default();
        s.write_metrics(&mut w)?;
        Ok(w.finish())
    })
    .await?;
    let mut w = MetricWriter::default();
    write_http(&mut w);
    text.push_str(&w.finish());
    let mut resp = text.into_response();
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(resp)
}

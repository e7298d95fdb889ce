//! Where the appliance commands send their requests: a running server (`--remote`), or the
//! same router in this process on the local data directory.
//!
//! Both paths go through the HTTP API's router and so through the same service calls,
//! validation and error mapping; the local path only skips the network and the token.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use axum::body::Body;
use http_body_util::BodyExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use tower::ServiceExt;

use strata_api::client::{response_of, Client, Response};
use strata_service::server_paths::ServerPaths;
use strata_service::{DataDir, Service};

/// The API, remote or in-process.
pub enum Api {
    /// A server at a URL.
    Remote(Client),
    /// The router over a service on the local data directory.
    Local {
        /// The unauthenticated in-process router.
        router: axum::Router,
        /// Runs the router's futures.
        rt: tokio::runtime::Runtime,
    },
}

impl Api {
    /// A client for `url` with `token`.
    pub fn remote(
        url: &str,
        token: Option<String>,
        trust: Option<strata_api::client::Trust>,
    ) -> anyhow::Result<Api> {
        if token.is_none() {
            bail!("--remote needs an API token: pass --token or set STRATA_TOKEN");
        }
        Ok(Api::Remote(Client::with_trust(url, token, trust)?))
    }

    /// The service on `data`, in this process. The caller acts with its own file access, so
    /// server paths are not confined to the import folders.
    pub fn local(data: DataDir) -> anyhow::Result<Api> {
        let svc = Arc::new(Service::open(data)?.with_server_paths(ServerPaths::Anywhere));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        Ok(Api::Local {
            router: strata_api::server::in_process_router(svc),
            rt,
        })
    }

    /// `method path` with an optional JSON body.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Response> {
        match self {
            Api::Remote(c) => Ok(c.request(method, path, body)?),
            Api::Local { router, rt } => {
                let mut req = axum::http::Request::builder().method(method).uri(path);
                let payload = match body {
                    Some(v) => {
                        req = req.header("content-type", "application/json");
                        Body::from(serde_json::to_vec(v)?)
                    }
                    None => Body::empty(),
                };
                let req = req.body(payload)?;
                rt.block_on(async {
                    let resp = router.clone().oneshot(req).await?;
                    let status = resp.status().as_u16();
                    Ok(response_of(status, resp.into_body()).await?)
                })
            }
        }
    }

    /// Like [`Api::call`], but an error status becomes an error with the server's message.
    pub fn ok(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let r = self.call(method, path, body)?;
        check(&r)?;
        Ok(r.body)
    }

    /// Imports the local file `file` as the new image `name` (a job): uploaded to a remote
    /// server, converted straight from the file locally.
    pub fn import_file(
        &self,
        file: &Path,
        name: &str,
        format: Option<&str>,
        source_format: &str,
    ) -> anyhow::Result<Value> {
        match self {
            Api::Remote(c) => {
                let mut path = format!(
                    "/api/images/{}/upload?source_format={}",
                    encode(name),
                    encode(source_format)
                );
                if let Some(f) = format {
                    path.push_str(&format!("&format={}", encode(f)));
                }
                let r = c.upload_file(&path, file)?;
                check(&r)?;
                Ok(r.body)
            }
            Api::Local { .. } => {
                let abs =
                    std::path::absolute(file).with_context(|| format!("{}", file.display()))?;
                let mut body = serde_json::json!({
                    "source": abs.display().to_string(),
                    "target": format!("image:{name}"),
                    "source_format": source_format,
                });
                if let Some(f) = format {
                    body["format"] = f.into();
                }
                self.ok("POST", "/api/convert", Some(&body))
            }
        }
    }

    /// `GET path` with a streaming body, handed to `f` piece by piece until it ends or `f`
    /// returns false.
    pub fn stream(
        &self,
        path: &str,
        f: &mut dyn FnMut(&[u8]) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let r = match self {
            Api::Remote(c) => c.stream_get(path, &mut |data| f(data).map_err(Into::into))?,
            Api::Local { router, rt } => {
                let req = axum::http::Request::builder()
                    .uri(path)
                    .body(Body::empty())?;
                rt.block_on(async {
                    let resp = router.clone().oneshot(req).await?;
                    let status = resp.status().as_u16();
                    let mut body = resp.into_body();
                    if status != 200 {
                        return Ok(response_of(status, body).await?);
                    }
                    while let Some(frame) = body.frame().await {
                        if let Ok(data) = frame?.into_data() {
                            if !f(&data)? {
                                break;
                            }
                        }
                    }
                    Ok::<_, anyhow::Error>(Response {
                        status,
                        body: Value::Null,
                        raw: Vec::new(),
                        headers: Vec::new(),
                    })
                })?
            }
        };
        check(&r)
    }

    /// Streams `GET path` into the new file `out`.
    pub fn download(&self, path: &str, out: &Path) -> anyhow::Result<()> {
        let r = match self {
            Api::Remote(c) => c.download_to(path, out)?,
            Api::Local { router, rt } => {
                let req = axum::http::Request::builder()
                    .uri(path)
                    .body(Body::empty())?;
                rt.block_on(async {
                    let resp = router.clone().oneshot(req).await?;
                    let status = resp.status().as_u16();
                    let mut body = resp.into_body();
                    if status != 200 {
                        return Ok(response_of(status, body).await?);
                    }
                    use std::io::Write;
                    let mut f = std::fs::File::create_new(out)
                        .with_context(|| format!("{}", out.display()))?;
                    while let Some(frame) = body.frame().await {
                        if let Ok(data) = frame?.into_data() {
                            f.write_all(&data)?;
                        }
                    }
                    f.sync_all()?;
                    Ok::<_, anyhow::Error>(Response {
                        status,
                        body: Value::Null,
                        raw: Vec::new(),
                        headers: Vec::new(),
                    })
                })?
            }
        };
        check(&r)
    }

    /// Follows the job `id` until it ends, with a progress bar unless `quiet`; fails when the
    /// job did not succeed.
    pub fn wait_job(&self, id: &str, quiet: bool) -> anyhow::Result<Value> {
        let bar = if quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            ProgressBar::hidden()
        } else {
            let b = ProgressBar::new(100);
            b.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:40}] {percent:>3}% {bytes}/{total_bytes}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b
        };
        let path = format!("/api/jobs/{}", encode(id));
        loop {
            let status = self.ok("GET", &path, None)?;
            let total = status["bytes_total"].as_u64().unwrap_or(0);
            if total > 0 {
                bar.set_length(total);
            }
            bar.set_position(status["bytes_done"].as_u64().unwrap_or(0));
            bar.set_message(status["kind"].as_str().unwrap_or("job").to_string());
            match status["state"].as_str() {
                Some("running") => std::thread::sleep(Duration::from_millis(200)),
                Some("succeeded") => {
                    bar.finish_and_clear();
                    return Ok(status);
                }
                Some(other) => {
                    bar.abandon();
                    bail!(
                        "Job {id} {other}: {}",
                        status["error"].as_str().unwrap_or("no error given")
                    );
                }
                None => bail!("Job {id}: the server sent no state: {status}"),
            }
        }
    }
}

/// An error for a response with an error status, carrying the server's message.
fn check(r: &Response) -> anyhow::Result<()> {
    if r.status < 400 {
        return Ok(());
    }
    match r.body["message"].as_str() {
        Some(m) => bail!("{m} (HTTP {})", r.status),
        None => bail!(
            "HTTP {}: {}",
            r.status,
            String::from_utf8_lossy(&r.raw)
                .chars()
                .take(200)
                .collect::<String>()
        ),
    }
}

/// Percent-encodes a path segment or query value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(encode("vm-100.disk_0"), "vm-100.disk_0");
        assert_eq!(encode("../x y"), "..%2Fx%20y");
        assert_eq!(encode("volume/strata/a"), "volume%2Fstrata%2Fa");
    }
}

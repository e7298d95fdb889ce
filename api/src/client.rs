//! A small HTTP/1.1 client for the Strata API, used by the CLI's `--remote` mode and by tests.
//!
//! Written on hyper (already a dependency through axum) rather than a separate HTTP client
//! crate, to keep the dependency tree lean; it needs only plain-HTTP JSON requests on loopback
//! or a LAN.

use std::time::Duration;

use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;

/// A response: status and parsed JSON body (Null when empty or not JSON).
#[derive(Debug)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Parsed JSON body.
    pub body: serde_json::Value,
    /// The raw body.
    pub raw: Vec<u8>,
}

/// A client for one server.
#[derive(Debug)]
pub struct Client {
    host: String,
    port: u16,
    token: Option<String>,
    rt: tokio::runtime::Runtime,
}

impl Client {
    /// A client for `url` (`http://HOST:PORT`, with or without a trailing `/api`).
    pub fn new(url: &str, token: Option<String>) -> anyhow::Result<Client> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow::anyhow!("Remote URL {url:?} must start with http://"))?;
        let authority = rest.split('/').next().unwrap_or("");
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse()
                    .map_err(|_| anyhow::anyhow!("Bad port in {url:?}"))?,
            ),
            None => (authority.to_string(), 80),
        };
        if host.is_empty() {
            anyhow::bail!("Remote URL {url:?} has no host");
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Client {
            host,
            port,
            token,
            rt,
        })
    }

    /// Sends `method path` with an optional JSON body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<Response> {
        let payload = match body {
            Some(v) => serde_json::to_vec(v)?,
            None => Vec::new(),
        };
        self.send(method, path, payload, body.is_some())
    }

    /// Sends raw bytes as the body (for uploads or deliberately malformed requests in tests).
    pub fn send(
        &self,
        method: &str,
        path: &str,
        payload: Vec<u8>,
        json: bool,
    ) -> anyhow::Result<Response> {
        let req = self
            .builder(method, path, json)?
            .body(Full::new(Bytes::from(payload)))?;
        self.rt
            .block_on(async move { read_response(self.exchange(req).await?).await })
    }

    /// Streams the file `file` as the body of `PUT path` (an upload), without reading it into
    /// memory.
    pub fn upload_file(&self, path: &str, file: &std::path::Path) -> anyhow::Result<Response> {
        let len = std::fs::metadata(file)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?
            .len();
        let opened =
            std::fs::File::open(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        self.rt.block_on(async move {
            let stream = tokio_util::io::ReaderStream::with_capacity(
                tokio::fs::File::from_std(opened),
                1 << 20,
            )
            .map(|r| r.map(hyper::body::Frame::data));
            let req = self
                .builder("PUT", path, false)?
                .header("content-length", len.to_string())
                .header("content-type", "application/octet-stream")
                .body(http_body_util::StreamBody::new(stream))?;
            read_response(self.exchange(req).await?).await
        })
    }

    /// `GET path`, streaming a successful body into the new file `out`; on an error status the
    /// body is returned instead and no file is made.
    pub fn download_to(&self, path: &str, out: &std::path::Path) -> anyhow::Result<Response> {
        let req = self
            .builder("GET", path, false)?
            .body(Full::new(Bytes::new()))?;
        self.rt.block_on(async move {
            let resp = self.exchange(req).await?;
            let status = resp.status().as_u16();
            let mut body = resp.into_body();
            if status != 200 {
                return response_of(status, body).await;
            }
            let mut file = tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(out)
                .await
                .map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
            use tokio::io::AsyncWriteExt;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    file.write_all(&data).await?;
                }
            }
            file.sync_all().await?;
            Ok(Response {
                status,
                body: serde_json::Value::Null,
                raw: Vec::new(),
            })
        })
    }

    fn builder(
        &self,
        method: &str,
        path: &str,
        json: bool,
    ) -> anyhow::Result<hyper::http::request::Builder> {
        let method = Method::from_bytes(method.as_bytes())?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", format!("{}:{}", self.host, self.port))
            // One request per connection: the connection task ends with the response.
            .header("connection", "close");
        if json {
            req = req.header("content-type", "application/json");
        }
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        Ok(req)
    }

    /// Connects, sends `req` and returns the response head with its streaming body.
    async fn exchange<B>(
        &self,
        req: Request<B>,
    ) -> anyhow::Result<hyper::Response<hyper::body::Incoming>>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let addr = format!("{}:{}", self.host, self.port);
        let stream = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(&addr),
        )
        .await
        .map_err(|_| anyhow::anyhow!("Connecting to {addr} timed out"))?
        .map_err(|e| anyhow::anyhow!("Cannot connect to {addr}: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        // The task ends once the response is read: every request asks to close.
        tokio::spawn(conn);
        Ok(sender.send_request(req).await?)
    }
}

/// Reads a whole response into a [`Response`].
async fn read_response(resp: hyper::Response<hyper::body::Incoming>) -> anyhow::Result<Response> {
    let status = resp.status().as_u16();
    response_of(status, resp.into_body()).await
}

/// Collects `body` and parses it as JSON (Null when it is not).
pub(crate) async fn response_of<B>(status: u16, body: B) -> anyhow::Result<Response>
where
    B: hyper::body::Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let raw = body.collect().await?.to_bytes().to_vec();
    let body = serde_json::from_slice(&raw).unwrap_or(serde_json::Value::Null);
    Ok(Response { status, body, raw })
}

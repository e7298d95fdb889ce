//! A small HTTP/1.1 client for the Strata API, used by the CLI's `--remote` mode and by tests.
//!
//! Written on hyper (already a dependency through axum) and rustls (the server's TLS) rather
//! than a separate HTTP client crate, to keep the dependency tree lean. An `https://` server is
//! trusted by its certificate's pinned SHA-256 fingerprint (as `proxmox-backup-client` does) or
//! by a CA file; there is no fallback to trusting any certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;

/// What can go wrong talking to a server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL or the trust settings are unusable.
    #[error("{0}")]
    Config(String),
    /// The server could not be reached, or the TLS handshake failed.
    #[error("{0}")]
    Connect(String),
    /// A local file could not be read or written.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The request could not be built.
    #[error("HTTP request: {0}")]
    Request(#[from] hyper::http::Error),
    /// The exchange failed midway.
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    /// A local I/O error (the client's runtime, a body stream).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A JSON body could not be made.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A response body could not be read.
    #[error("Reading the response: {0}")]
    Body(String),
    /// The caller's body consumer failed.
    #[error("{0}")]
    Consumer(ConsumerError),
}

/// An error of a caller's body consumer ([`Client::stream_get`]).
pub type ConsumerError = Box<dyn std::error::Error + Send + Sync>;

/// Results of the client.
pub type ClientResult<T> = Result<T, ClientError>;

fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
    move |source| ClientError::File {
        path: path.to_path_buf(),
        source,
    }
}

/// A response: status and parsed JSON body (Null when empty or not JSON).
#[derive(Debug)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Parsed JSON body.
    pub body: serde_json::Value,
    /// The raw body.
    pub raw: Vec<u8>,
    /// The response headers, names in lower case (filled by [`Client::request_with`]).
    pub headers: Vec<(String, String)>,
}

/// A client for one server.
#[derive(Debug)]
pub struct Client {
    host: String,
    port: u16,
    token: Option<String>,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    rt: tokio::runtime::Runtime,
}

/// How an `https://` server is trusted.
#[derive(Clone, Debug)]
pub enum Trust {
    /// Its certificate has this SHA-256 fingerprint (`AB:CD:…`, as `strata serve` prints it).
    Fingerprint(String),
    /// Its certificate chains to a CA in this PEM file (for the appliance's own:
    /// `DATA/tls/ca.pem`), for the host name in the URL.
    CaFile(PathBuf),
}

impl Client {
    /// A client for `url` (`http://HOST:PORT`, with or without a trailing `/api`). An
    /// `https://` URL needs [`Client::with_trust`].
    pub fn new(url: &str, token: Option<String>) -> ClientResult<Client> {
        Client::with_trust(url, token, None)
    }

    /// A client for `url` (`http://` or `https://HOST:PORT`), trusting an HTTPS server as
    /// `trust` says.
    pub fn with_trust(
        url: &str,
        token: Option<String>,
        trust: Option<Trust>,
    ) -> ClientResult<Client> {
        let (https, rest) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            _ => {
                return Err(ClientError::Config(format!(
                    "Remote URL {url:?} must start with https:// or http://"
                )))
            }
        };
        let authority = rest.split('/').next().unwrap_or("");
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (
                h.trim_start_matches('[').trim_end_matches(']').to_string(),
                p.parse()
                    .map_err(|_| ClientError::Config(format!("Bad port in {url:?}")))?,
            ),
            _ => (authority.to_string(), if https { 443 } else { 80 }),
        };
        if host.is_empty() {
            return Err(ClientError::Config(format!(
                "Remote URL {url:?} has no host"
            )));
        }
        let tls = match (https, trust) {
            (false, _) => None,
            (true, None) => {
                return Err(ClientError::Config(format!(
                    "{url} is HTTPS: pass the server certificate's fingerprint (--fingerprint, \
                     printed by `strata serve`) or a CA file (--ca, e.g. the server's \
                     DATA/tls/ca.pem)"
                )))
            }
            (true, Some(trust)) => {
                let name = ServerName::try_from(host.clone()).map_err(|_| {
                    ClientError::Config(format!("{host:?} is not a valid server name"))
                })?;
                Some((Arc::new(tls_config(&trust)?), name))
            }
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Client {
            host,
            port,
            token,
            tls,
            rt,
        })
    }

    /// Sends `method path` with an optional JSON body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> ClientResult<Response> {
        let payload = match body {
            Some(v) => serde_json::to_vec(v)?,
            None => Vec::new(),
        };
        self.send(method, path, payload, body.is_some())
    }

    /// Like [`Client::request`] with more request headers (a cookie, an origin: tests of the
    /// web UI's session checks), returning the response headers too.
    pub fn request_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&serde_json::Value>,
    ) -> ClientResult<Response> {
        let payload = match body {
            Some(v) => serde_json::to_vec(v)?,
            None => Vec::new(),
        };
        let mut req = self.builder(method, path, body.is_some())?;
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::from(payload)))?;
        self.rt.block_on(async move {
            let resp = self.exchange(req).await?;
            let headers = resp
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
                .collect();
            let mut out = read_response(resp).await?;
            out.headers = headers;
            Ok(out)
        })
    }

    /// Sends raw bytes as the body (for uploads or deliberately malformed requests in tests).
    pub fn send(
        &self,
        method: &str,
        path: &str,
        payload: Vec<u8>,
        json: bool,
    ) -> ClientResult<Response> {
        let req = self
            .builder(method, path, json)?
            .body(Full::new(Bytes::from(payload)))?;
        self.rt
            .block_on(async move { read_response(self.exchange(req).await?).await })
    }

    /// Streams the file `file` as the body of `PUT path` (an upload), without reading it into
    /// memory.
    pub fn upload_file(&self, path: &str, file: &std::path::Path) -> ClientResult<Response> {
        let len = std::fs::metadata(file).map_err(file_error(file))?.len();
        let opened = std::fs::File::open(file).map_err(file_error(file))?;
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
    pub fn download_to(&self, path: &str, out: &std::path::Path) -> ClientResult<Response> {
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
                .map_err(file_error(out))?;
            use tokio::io::AsyncWriteExt;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    file.write_all(&data).await.map_err(file_error(out))?;
                }
            }
            file.sync_all().await.map_err(file_error(out))?;
            Ok(Response {
                status,
                body: serde_json::Value::Null,
                raw: Vec::new(),
                headers: Vec::new(),
            })
        })
    }

    /// `GET path`, handing each piece of a successful streaming body to `f` as it arrives
    /// until the body ends or `f` returns false; on an error status the body is returned.
    pub fn stream_get(
        &self,
        path: &str,
        f: &mut dyn FnMut(&[u8]) -> Result<bool, ConsumerError>,
    ) -> ClientResult<Response> {
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
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    if !f(&data).map_err(ClientError::Consumer)? {
                        break;
                    }
                }
            }
            Ok(Response {
                status,
                body: serde_json::Value::Null,
                raw: Vec::new(),
                headers: Vec::new(),
            })
        })
    }

    fn builder(
        &self,
        method: &str,
        path: &str,
        json: bool,
    ) -> ClientResult<hyper::http::request::Builder> {
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| ClientError::Config(format!("{method:?} is not an HTTP method")))?;
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
    ) -> ClientResult<hyper::Response<hyper::body::Incoming>>
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
        .map_err(|_| ClientError::Connect(format!("Connecting to {addr} timed out")))?
        .map_err(|e| ClientError::Connect(format!("Cannot connect to {addr}: {e}")))?;
        let _ = stream.set_nodelay(true);
        match &self.tls {
            None => send_on(stream, req).await,
            Some((cfg, name)) => {
                let tls = tokio::time::timeout(
                    Duration::from_secs(10),
                    tokio_rustls::TlsConnector::from(cfg.clone()).connect(name.clone(), stream),
                )
                .await
                .map_err(|_| {
                    ClientError::Connect(format!("The TLS handshake with {addr} timed out"))
                })?
                .map_err(|e| ClientError::Connect(format!("TLS with {addr} failed: {e}")))?;
                send_on(tls, req).await
            }
        }
    }
}

/// Sends `req` on the new connection `io` and returns the response head.
async fn send_on<I, B>(
    io: I,
    req: Request<B>,
) -> ClientResult<hyper::Response<hyper::body::Incoming>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    // The task ends once the response is read: every request asks to close.
    tokio::spawn(conn);
    Ok(sender.send_request(req).await?)
}

/// A rustls client configuration that trusts as `trust` says.
fn tls_config(trust: &Trust) -> ClientResult<rustls::ClientConfig> {
    let provider = strata_service::tls::crypto_provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Config(format!("TLS: {e}")))?;
    let mut cfg = match trust {
        Trust::Fingerprint(fp) => {
            let want = strata_service::tls::parse_fingerprint(fp).map_err(ClientError::Config)?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCertificate { want, provider }))
                .with_no_client_auth()
        }
        Trust::CaFile(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for der in strata_service::tls::read_pem_certificates(path)
                .map_err(|e| ClientError::Config(e.to_string()))?
            {
                roots
                    .add(rustls_pki_types::CertificateDer::from(der))
                    .map_err(|e| ClientError::Config(format!("{}: {e}", path.display())))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Accepts exactly the server certificate whose SHA-256 fingerprint was pinned (host names
/// play no part, as with a pinned key), and checks that the server holds its key.
#[derive(Debug)]
struct PinnedCertificate {
    want: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use sha2::Digest;
        let got: [u8; 32] = sha2::Sha256::digest(end_entity.as_ref()).into();
        if subtle::ConstantTimeEq::ct_eq(&got[..], &self.want[..]).into() {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the server's certificate has the fingerprint {}, not the one given",
                strata_service::tls::fingerprint(end_entity.as_ref())
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Reads a whole response into a [`Response`].
async fn read_response(resp: hyper::Response<hyper::body::Incoming>) -> ClientResult<Response> {
    let status = resp.status().as_u16();
    response_of(status, resp.into_body()).await
}

/// Collects `body` and parses it as JSON (Null when it is not).
pub async fn response_of<B>(status: u16, body: B) -> ClientResult<Response>
where
    B: hyper::body::Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let raw = body
        .collect()
        .await
        .map_err(|e| ClientError::Body(e.to_string()))?
        .to_bytes()
        .to_vec();
    let body = serde_json::from_slice(&raw).unwrap_or(serde_json::Value::Null);
    Ok(Response {
        status,
        body,
        raw,
        headers: Vec::new(),
    })
}

//! The accept loop: TLS (rustls) or plain HTTP/1.1 connections served by hyper with the API's
//! router, a header read timeout, a cap on connections served at once, and a graceful end.
//!
//! Written on hyper's connection builder rather than `axum::serve` because that offers neither
//! TLS nor a header read timeout: a client that opens connections and never finishes its
//! headers would otherwise hold them forever.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use super::limits::HttpLimits;

/// How connections are secured.
#[derive(Clone, Debug)]
pub enum Transport {
    /// HTTPS with this configuration.
    Tls(Arc<rustls::ServerConfig>),
    /// Plain HTTP (loopback, or explicitly insecure).
    Plain,
}

impl Transport {
    /// The URL scheme.
    pub fn scheme(&self) -> &'static str {
        match self {
            Transport::Tls(_) => "https",
            Transport::Plain => "http",
        }
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then waits up to the grace period
/// for open connections to finish their requests.
pub async fn run(
    app: Router,
    listener: TcpListener,
    transport: Transport,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    // Connections that may upgrade (WebSockets) are not watched by `graceful` (hyper-util's
    // watcher takes plain connections only): they hold a watcher to be waited for, and end
    // gracefully when this is cancelled.
    let closing = tokio_util::sync::CancellationToken::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let acceptor = match &transport {
        Transport::Tls(cfg) => Some(tokio_rustls::TlsAcceptor::from(cfg.clone())),
        Transport::Plain => None,
    };
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors, say: wait a little instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let watcher = graceful.watcher();
        let closing = closing.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match acceptor {
                Some(a) => {
                    // The handshake is bounded like the headers: a client that opens a
                    // connection and says nothing is dropped.
                    match tokio::time::timeout(limits.header_timeout, a.accept(stream)).await {
                        Ok(Ok(tls)) => serve_connection(tls, app, &limits, watcher, closing).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
                None => serve_connection(stream, app, &limits, watcher, closing).await,
            }
        });
    }
    drop(listener);
    closing.cancel();
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!("connections still open at shutdown were closed");
        }
    }
}

async fn serve_connection<I>(
    io: I,
    app: Router,
    limits: &HttpLimits,
    watcher: Watcher,
    closing: tokio_util::sync::CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(app);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let outcome = tokio::select! {
        r = conn.as_mut() => r,
        _ = closing.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.as_mut().await
        }
    };
    if let Err(e) = outcome {
        tracing::debug!(error = %e, "connection ended with an error");
    }
    // Held until here so that a graceful end waits for this connection.
    drop(watcher);
}

/// Why the server's TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsSetupError(String);

/// A rustls server configuration for the PEM certificate chain and key in `files`.
pub fn server_config(
    files: &strata_service::tls::CertificateFiles,
) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let reading = |what: &std::path::Path| {
        let what = what.display().to_string();
        move |e: rustls_pki_types::pem::Error| TlsSetupError(format!("Reading {what}: {e}"))
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(reading(&files.cert))?
        .collect::<Result<_, _>>()
        .map_err(reading(&files.cert))?;
    if certs.is_empty() {
        return Err(TlsSetupError(format!(
            "{} holds no certificate",
            files.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(reading(&files.key))?;
    let provider = strata_service::tls::crypto_provider();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError(format!("TLS protocol versions: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            TlsSetupError(format!(
                "{} and {} do not make a usable certificate and key: {e}",
                files.cert.display(),
                files.key.display()
            ))
        })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

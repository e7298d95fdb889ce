//! [`Objects`] on any S3-compatible store (AWS, Ceph radosgw, MinIO …) through the `object_store`
//! crate.
//!
//! Why `object_store` (Apache Arrow's) and not `aws-sdk-s3` or `rust-s3`: `aws-sdk-s3` is the
//! complete AWS SDK — hundreds of generated modules, its own HTTP stack and `aws-lc-rs`; it
//! builds for many minutes on 2 cores for the six calls we make. `rust-s3` is small but
//! maintained by one person, with thinner retry and multipart handling. `object_store` is kept by
//! the Arrow project, is used by DataFusion, Delta-rs and others against S3-compatible stores,
//! and has what a backup target needs built in: SigV4, retries with exponential backoff on 5xx,
//! 429 and connection errors (S3's `503 SlowDown` throttling included), ranged GETs, multipart
//! uploads, and conditional puts (`If-None-Match: *`, for create-if-absent manifests). We
//! enable `aws-base` with `ring` for signing and reqwest's TLS without a bundled crypto library:
//! [`S3Objects::new`] installs rustls' ring provider, the one the rest of Strata already links.
//!
//! The crate is async; the datastore is not. Each [`S3Objects`] owns a small tokio runtime (two
//! worker threads) and every call is a task on it whose result comes back over a channel, so it
//! works from any thread, including one inside another runtime.
//!
//! Objects larger than [`MULTIPART_THRESHOLD`] go up as multipart uploads in parts of
//! [`PART_SIZE`]; a failed upload is aborted (S3 keeps the parts of an upload nobody aborts
//! until a bucket lifecycle rule removes them: set `AbortIncompleteMultipartUpload`).
//! `put_new` uses a conditional put (`If-None-Match: *`, honoured by AWS S3, Ceph radosgw and
//! MinIO; the tests check radosgw's). A store that ignored the header would let a second writer
//! of the same snapshot replace its manifest; one writer per bucket (what a datastore's local
//! locks ensure on one appliance) keeps that from happening. Should the client refuse
//! conditional puts (`NotImplemented`), `put_new` looks before it puts.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig,
};
use strata_storage::{Result, StorageError};

use crate::objects::{check_key, Listed, Objects};

/// Objects at least this large are uploaded in parts.
pub const MULTIPART_THRESHOLD: usize = 64 << 20;
/// Part size of a multipart upload.
pub const PART_SIZE: usize = 16 << 20;

/// Where and how to reach a bucket.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct S3Config {
    /// Endpoint URL, `https://s3.example.com` (`http://` only for a store on this machine or a
    /// trusted network: the datastore encrypts, but credentials are signed in the clear).
    pub endpoint: String,
    /// Bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket (`""` for the whole bucket).
    #[serde(default)]
    pub prefix: String,
    /// Region (default `us-east-1`; radosgw ignores it).
    pub region: String,
    /// Path-style requests (`endpoint/bucket/key`) instead of virtual-hosted (`bucket.endpoint`).
    pub path_style: bool,
    /// Access key id.
    pub access_key: String,
    /// Secret access key (never printed).
    #[serde(skip)]
    pub secret_key: String,
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "S3Config({} bucket {} prefix {:?} region {} path-style {} access-key {})",
            self.endpoint, self.bucket, self.prefix, self.region, self.path_style, self.access_key
        )
    }
}

const COND_UNKNOWN: u8 = 0;
const COND_YES: u8 = 1;
const COND_NO: u8 = 2;

/// A bucket (and prefix) as [`Objects`]. See the module documentation.
pub struct S3Objects {
    store: Arc<AmazonS3>,
    /// `None` only while dropping.
    rt: Option<tokio::runtime::Runtime>,
    prefix: String,
    describe: String,
    conditional: AtomicU8,
}

impl fmt::Debug for S3Objects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "S3Objects({})", self.describe)
    }
}

/// reqwest's TLS needs a process-wide rustls provider; ours is ring (rustls marks it deprecated
/// for lacking post-quantum key exchange; its aws-lc-rs provider builds a large C library — see
/// strata-service's tls.rs for the same choice). Installing fails harmlessly when one is
/// installed already.
#[allow(deprecated)]
fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn s3_err(what: &str, e: object_store::Error) -> StorageError {
    match e {
        object_store::Error::NotFound { path, .. } => StorageError::NotFound(path.into()),
        e => StorageError::Unavailable(format!("S3 {what}: {e}")),
    }
}

impl S3Objects {
    /// Connects (lazily: the first request opens the connection).
    pub fn new(cfg: &S3Config) -> Result<S3Objects> {
        install_tls_provider();
        if cfg.bucket.is_empty() {
            return Err(StorageError::InvalidInput(
                "An S3 bucket name is needed".into(),
            ));
        }
        let allow_http = cfg.endpoint.starts_with("http://");
        if !allow_http && !cfg.endpoint.starts_with("https://") {
            return Err(StorageError::InvalidInput(format!(
                "S3 endpoint {:?} must start with https:// (or http://)",
                cfg.endpoint
            )));
        }
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(200),
                max_backoff: Duration::from_secs(10),
                base: 2.0,
            },
            max_retries: 8,
            retry_timeout: Duration::from_secs(120),
        };
        let client = ClientOptions::new()
            .with_allow_http(allow_http)
            .with_connect_timeout(Duration::from_secs(10))
            .with_timeout(Duration::from_secs(120));
        let store = AmazonS3Builder::new()
            .with_endpoint(cfg.endpoint.trim_end_matches('/'))
            .with_bucket_name(&cfg.bucket)
            .with_region(if cfg.region.is_empty() {
                "us-east-1"
            } else {
                &cfg.region
            })
            .with_access_key_id(&cfg.access_key)
            .with_secret_access_key(&cfg.secret_key)
            .with_virtual_hosted_style_request(!cfg.path_style)
            .with_client_options(client)
            .with_retry(retry)
            .build()
            .map_err(|e| StorageError::InvalidInput(format!("S3 configuration: {e}")))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("strata-s3")
            .enable_all()
            .build()
            .map_err(|e| StorageError::io("Starting the S3 client runtime".to_string(), e))?;
        let prefix = cfg.prefix.trim_matches('/').to_string();
        if !prefix.is_empty() {
            check_key(&prefix)?;
        }
        Ok(S3Objects {
            store: Arc::new(store),
            rt: Some(rt),
            describe: format!(
                "s3 {} bucket {}{}",
                cfg.endpoint,
                cfg.bucket,
                if prefix.is_empty() {
                    String::new()
                } else {
                    format!(" prefix {prefix}")
                }
            ),
            prefix,
            conditional: AtomicU8::new(COND_UNKNOWN),
        })
    }

    /// Whether the store honours conditional puts: `None` until a `put_new` found out.
    pub fn conditional_puts(&self) -> Option<bool> {
        match self.conditional.load(Ordering::Relaxed) {
            COND_YES => Some(true),
            COND_NO => Some(false),
            _ => None,
        }
    }

    fn full(&self, key: &str) -> Result<ObjPath> {
        check_key(key)?;
        Ok(if self.prefix.is_empty() {
            ObjPath::from(key)
        } else {
            ObjPath::from(format!("{}/{key}", self.prefix))
        })
    }

    /// Runs `fut` on the client runtime and waits for it from this (any) thread.
    fn run<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let rt = self
            .rt
            .as_ref()
            .ok_or_else(|| StorageError::Unavailable("The S3 client is shut down".into()))?;
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| StorageError::Unavailable("The S3 client task ended early".into()))
    }

    fn put_plain(&self, path: ObjPath, data: Vec<u8>) -> Result<()> {
        let store = self.store.clone();
        if data.len() < MULTIPART_THRESHOLD {
            return self
                .run(async move { store.put(&path, PutPayload::from(data)).await })?
                .map(|_| ())
                .map_err(|e| s3_err("PUT", e));
        }
        self.run(async move {
            let mut upload = store.put_multipart(&path).await?;
            let bytes = bytes::Bytes::from(data);
            let mut off = 0;
            let result = async {
                while off < bytes.len() {
                    let end = (off + PART_SIZE).min(bytes.len());
                    upload
                        .put_part(PutPayload::from(bytes.slice(off..end)))
                        .await?;
                    off = end;
                }
                upload.complete().await
            }
            .await;
            if result.is_err() {
                let _ = upload.abort().await;
            }
            result.map(|_| ())
        })?
        .map_err(|e| s3_err("multipart upload", e))
    }
}

impl Drop for S3Objects {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside an async context; this does not.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Objects for S3Objects {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn put(&self, key: &str, data: Vec<u8>) -> Result<()> {
        let path = self.full(key)?;
        self.put_plain(path, data)
    }

    fn put_new(&self, key: &str, data: Vec<u8>) -> Result<bool> {
        let path = self.full(key)?;
        if self.conditional.load(Ordering::Relaxed) != COND_NO {
            let store = self.store.clone();
            let p = path.clone();
            let payload = PutPayload::from(data.clone());
            let r = self.run(async move {
                store
                    .put_opts(&p, payload, PutOptions::from(PutMode::Create))
                    .await
            })?;
            match r {
                Ok(_) => {
                    self.conditional.store(COND_YES, Ordering::Relaxed);
                    return Ok(true);
                }
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => return Ok(false),
                Err(object_store::Error::NotImplemented { .. }) => {
                    tracing::info!(store = %self.describe, "no conditional puts: checking before writing");
                    self.conditional.store(COND_NO, Ordering::Relaxed);
                }
                Err(e) => return Err(s3_err("conditional PUT", e)),
            }
        }
        let store = self.store.clone();
        let p = path.clone();
        match self.run(async move { store.head(&p).await })? {
            Ok(_) => return Ok(false),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(s3_err("HEAD", e)),
        }
        self.put_plain(path, data)?;
        Ok(true)
    }

    fn get(&self, key: &str, max: u64) -> Result<Option<Vec<u8>>> {
        let path = self.full(key)?;
        let store = self.store.clone();
        let r = self.run(async move {
            let got = store.get(&path).await?;
            if got.meta.size > max {
                return Ok(Err(got.meta.size));
            }
            got.bytes().await.map(Ok)
        })?;
        match r {
            Ok(Ok(b)) => Ok(Some(b.to_vec())),
            Ok(Err(size)) => Err(StorageError::corrupt(
                format!("object {key}"),
                format!("{size} bytes exceeds the limit of {max}"),
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(s3_err("GET", e)),
        }
    }

    fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Vec<u8>> {
        let path = self.full(key)?;
        let store = self.store.clone();
        let end = start
            .checked_add(len)
            .ok_or_else(|| StorageError::InvalidInput(format!("Range {start}+{len}")))?;
        let b = self
            .run(async move { store.get_range(&path, start..end).await })?
            .map_err(|e| s3_err("ranged GET", e))?;
        if b.len() as u64 != len {
            return Err(StorageError::corrupt(
                format!("object {key}"),
                format!("ranged GET {start}+{len} returned {} bytes", b.len()),
            ));
        }
        Ok(b.to_vec())
    }

    fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        let store = self.store.clone();
        let full_prefix = match (self.prefix.is_empty(), prefix.trim_end_matches('/')) {
            (true, "") => None,
            (true, p) => Some(ObjPath::from(p)),
            (false, "") => Some(ObjPath::from(self.prefix.as_str())),
            (false, p) => Some(ObjPath::from(format!("{}/{p}", self.prefix))),
        };
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let metas = self.run(async move {
            let mut s = store.list(full_prefix.as_ref());
            let mut out = Vec::new();
            while let Some(m) = s.next().await {
                out.push(m?);
            }
            Ok::<_, object_store::Error>(out)
        })?;
        let metas = metas.map_err(|e| s3_err("LIST", e))?;
        let mut out: Vec<Listed> = metas
            .into_iter()
            .filter_map(|m| {
                let key = m.location.as_ref().strip_prefix(&strip)?.to_string();
                key.starts_with(prefix)
                    .then_some(Listed { key, size: m.size })
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.full(key)?;
        let store = self.store.clone();
        match self.run(async move { store.delete(&path).await })? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(s3_err("DELETE", e)),
        }
    }
}

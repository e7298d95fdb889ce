//! The appliance's named backup datastores: `local` (DATA/datastore, always there) and those
//! added with `strata backups store add` — a local folder, or an S3 bucket (chunks in packs,
//! client-side encrypted) with its cache folder — recorded in DATA/backup-stores.json. Each added
//! datastore has a folder DATA/backup-stores/NAME/ holding, owner-only, its S3 secret (`secret`)
//! and an unprotected copy of its key (`key`), which the datastore's marker names so that jobs
//! and resumed live restores open it unattended; an S3 datastore's local folder is `cache/`
//! there. Keep the key file you added (or its passphrase-protected original) away from the
//! appliance: without it nothing in the bucket can be restored.
//!
//! Sync copies snapshots between two of them, transferring only missing chunks
//! ([`strata_backup::sync`]).

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use strata_backup::remote::{RemoteSpec, DEFAULT_CACHE_BYTES, DEFAULT_PACK_SIZE};
use strata_backup::store::CreateOptions;
use strata_backup::Datastore;

use super::jobs::Job;
use super::progress::JobProgress;
use super::{write_atomically, Service, ServiceError, ServiceResult};

/// The appliance's own datastore.
pub const DEFAULT_STORE: &str = "local";
const REGISTRY: &str = "backup-stores.json";
const STORES_DIR: &str = "backup-stores";
/// Largest key file accepted in a request.
const MAX_KEY_TEXT: usize = 64 << 10;

/// A request to add a datastore: a local folder (`path`) or an S3 bucket (`s3` and the rest).
#[derive(Debug, Default, Deserialize)]
pub struct AddStore {
    /// Its name (letters, digits, `-_.`).
    pub name: String,
    /// A local folder on the server (a new datastore is made there; an existing one is used).
    pub path: Option<String>,
    /// S3 endpoint URL (`https://…`).
    pub s3: Option<String>,
    /// Bucket.
    pub bucket: Option<String>,
    /// Key prefix in the bucket.
    pub prefix: Option<String>,
    /// Region (default us-east-1).
    pub region: Option<String>,
    /// Path-style requests.
    #[serde(default)]
    pub path_style: bool,
    /// Access key id.
    pub access_key: Option<String>,
    /// Secret access key.
    pub secret_key: Option<String>,
    /// The key file's contents (`strata backups key create`).
    pub key: Option<String>,
    /// The key file's passphrase, if it has one.
    pub passphrase: Option<String>,
    /// Allow an S3 datastore without encryption.
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// Chunk size of a new datastore (default 4M local, 1M S3).
    pub chunk_size: Option<String>,
    /// Pack size target (S3; default 16M).
    pub pack_size: Option<String>,
    /// Bound of the local chunk cache (S3; default 1G).
    pub cache_size: Option<String>,
}

/// A datastore as listed.
#[derive(Debug, Serialize)]
pub struct StoreSummary {
    /// Its name.
    pub name: String,
    /// `local` or `s3`.
    pub kind: String,
    /// Its folder, or its bucket and cache folder.
    pub location: String,
    /// The key fingerprint when encrypted.
    pub encryption: Option<String>,
    /// Snapshots in it.
    pub snapshots: usize,
}

/// A request to copy snapshots between datastores.
#[derive(Debug, Deserialize)]
pub struct SyncBackups {
    /// Source datastore name.
    pub from: String,
    /// Target datastore name.
    pub to: String,
    /// Only these snapshots (`ID/TIME`, a group id, or a group prefix ending in `/`).
    #[serde(default)]
    pub snapshots: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Registry {
    stores: Vec<Entry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    name: String,
    kind: String,
    root: PathBuf,
}

fn size_or(text: &Option<String>, default: u64) -> ServiceResult<u64> {
    match text {
        Some(t) => Ok(strata_storage::util::parse_size(t)?),
        None => Ok(default),
    }
}

impl Service {
    fn registry_path(&self) -> PathBuf {
        self.data().root().join(REGISTRY)
    }

    fn read_registry(&self) -> ServiceResult<Registry> {
        let path = self.registry_path();
        match strata_backup::store::read_bounded(&path, 1 << 20) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| ServiceError::internal(format!("Reading {}: {e}", path.display()))),
            Err(strata_storage::StorageError::NotFound(_)) => Ok(Registry::default()),
            Err(e) => Err(e.into()),
        }
    }

    fn write_registry(&self, r: &Registry) -> ServiceResult<()> {
        let bytes = serde_json::to_vec_pretty(r)
            .map_err(|e| ServiceError::internal(format!("Serialising: {e}")))?;
        write_atomically(&self.registry_path(), &bytes)
    }

    /// The datastore named `name` (`local` or none: the appliance's own).
    pub fn datastore_named(&self, name: Option<&str>) -> ServiceResult<Datastore> {
        match name {
            None | Some(DEFAULT_STORE) => self.datastore(),
            Some(n) => {
                let reg = self.read_registry()?;
                let e = reg
                    .stores
                    .iter()
                    .find(|e| e.name == n)
                    .ok_or_else(|| ServiceError::NotFound(format!("Backup datastore {n}")))?;
                Ok(Datastore::open(&e.root)?)
            }
        }
    }

    /// The datastores, `local` first.
    pub fn list_stores(&self) -> ServiceResult<Vec<StoreSummary>> {
        let mut out = Vec::new();
        let local = self.datastore()?;
        out.push(StoreSummary {
            name: DEFAULT_STORE.into(),
            kind: "local".into(),
            location: local.describe(),
            encryption: local.encryption().map(str::to_string),
            snapshots: local.list()?.len(),
        });
        for e in self.read_registry()?.stores {
            let (location, encryption, snapshots) = match Datastore::open(&e.root) {
                Ok(s) => (
                    s.describe(),
                    s.encryption().map(str::to_string),
                    s.list().map(|l| l.len()).unwrap_or(0),
                ),
                Err(err) => (format!("unavailable: {err}"), None, 0),
            };
            out.push(StoreSummary {
                name: e.name,
                kind: e.kind,
                location,
                encryption,
                snapshots,
            });
        }
        Ok(out)
    }

    /// Adds a datastore (see the module documentation).
    pub fn add_store(&self, req: AddStore) -> ServiceResult<StoreSummary> {
        super::names::validate("backup datastore", &req.name)?;
        if req.name == DEFAULT_STORE {
            return Err(ServiceError::Conflict(format!(
                "Backup datastore {DEFAULT_STORE} exists already"
            )));
        }
        let mut reg = self.read_registry()?;
        if reg.stores.iter().any(|e| e.name == req.name) {
            return Err(ServiceError::Conflict(format!(
                "Backup datastore {} exists already",
                req.name
            )));
        }
        let dir = self.data().root().join(STORES_DIR).join(&req.name);
        if dir.exists() {
            return Err(ServiceError::Conflict(format!(
                "{} exists (a datastore being removed or added?)",
                dir.display()
            )));
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| ServiceError::internal(format!("Creating {}: {e}", dir.display())))?;
        let r = self.add_store_in(&req, &dir);
        match r {
            Ok(entry) => {
                reg.stores.push(entry.clone());
                self.write_registry(&reg)?;
                let s = Datastore::open(&entry.root)?;
                Ok(StoreSummary {
                    name: entry.name,
                    kind: entry.kind,
                    location: s.describe(),
                    encryption: s.encryption().map(str::to_string),
                    snapshots: s.list()?.len(),
                })
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    fn add_store_in(&self, req: &AddStore, dir: &std::path::Path) -> ServiceResult<Entry> {
        let key_file = dir.join("key");
        let key = match &req.key {
            None => None,
            Some(text) if text.len() > MAX_KEY_TEXT => {
                return Err(ServiceError::BadRequest("The key file is too large".into()))
            }
            Some(text) => {
                let copy = strata_backup::crypt::unprotected_copy(
                    text.as_bytes(),
                    req.passphrase.as_deref().map(str::as_bytes),
                    "the key file",
                )
                .map_err(|e| ServiceError::BadRequest(e.to_string()))?;
                write_atomically(&key_file, &copy)?;
                Some(strata_backup::crypt::open_key_file(
                    &copy,
                    None,
                    "the key file",
                )?)
            }
        };
        let recorded = key.as_ref().map(|_| key_file.clone());
        match (&req.path, &req.s3) {
            (Some(path), None) => {
                let root = PathBuf::from(path);
                if !root.is_absolute() {
                    return Err(ServiceError::BadRequest(format!(
                        "{path}: a datastore folder is an absolute path on the server"
                    )));
                }
                if root.join(strata_backup::store::MARKER).exists() {
                    // An existing datastore: it must open (with the key, if encrypted).
                    let s = Datastore::open(&root)?;
                    match key {
                        Some(k) => drop(s.with_key(k)?),
                        None => drop(s.require_key()?),
                    }
                } else {
                    Datastore::create_with(
                        &root,
                        &CreateOptions {
                            chunk_size: size_or(
                                &req.chunk_size,
                                strata_backup::store::DEFAULT_CHUNK_SIZE as u64,
                            )? as u32,
                            key,
                            key_file: recorded,
                        },
                    )?;
                }
                Ok(Entry {
                    name: req.name.clone(),
                    kind: "local".into(),
                    root,
                })
            }
            (None, Some(url)) => {
                let need = |v: &Option<String>, what: &str| {
                    v.clone()
                        .filter(|s| !s.is_empty())
                        .ok_or_else(|| ServiceError::BadRequest(format!("An S3 datastore needs {what}")))
                };
                let secret = need(&req.secret_key, "secret_key")?;
                let secret_file = dir.join("secret");
                write_atomically(&secret_file, secret.as_bytes())?;
                let spec = RemoteSpec {
                    kind: "s3".into(),
                    s3: Some(strata_backup::s3::S3Config {
                        endpoint: url.clone(),
                        bucket: need(&req.bucket, "bucket")?,
                        prefix: req.prefix.clone().unwrap_or_default(),
                        region: req.region.clone().unwrap_or_else(|| "us-east-1".into()),
                        path_style: req.path_style,
                        access_key: need(&req.access_key, "access_key")?,
                        secret_key: String::new(),
                    }),
                    secret_file: Some(secret_file),
                    dir: None,
                    pack_size: size_or(&req.pack_size, DEFAULT_PACK_SIZE)?,
                    cache_bytes: size_or(&req.cache_size, DEFAULT_CACHE_BYTES)?,
                };
                let root = dir.join("cache");
                Datastore::create_remote(
                    &root,
                    spec,
                    &CreateOptions {
                        chunk_size: size_or(
                            &req.chunk_size,
                            strata_backup::remote::DEFAULT_REMOTE_CHUNK_SIZE as u64,
                        )? as u32,
                        key,
                        key_file: recorded,
                    },
                    req.insecure_plaintext,
                )?;
                Ok(Entry {
                    name: req.name.clone(),
                    kind: "s3".into(),
                    root,
                })
            }
            _ => Err(ServiceError::BadRequest(
                "A datastore is either a local folder (path) or an S3 bucket (s3, bucket, access_key, secret_key)".into(),
            )),
        }
    }

    /// Forgets a datastore: its record and the appliance's folder for it (secret, key copy,
    /// cache). Its data stays where it is (the folder, the bucket).
    pub fn remove_store(&self, name: &str) -> ServiceResult<()> {
        let mut reg = self.read_registry()?;
        let before = reg.stores.len();
        reg.stores.retain(|e| e.name != name);
        if reg.stores.len() == before {
            return Err(ServiceError::NotFound(format!("Backup datastore {name}")));
        }
        self.write_registry(&reg)?;
        super::names::validate("backup datastore", name)?;
        let dir = self.data().root().join(STORES_DIR).join(name);
        let _ = std::fs::remove_dir_all(dir);
        Ok(())
    }

    /// Starts a sync job.
    pub fn start_sync(self: &Arc<Self>, req: SyncBackups) -> ServiceResult<Arc<Job>> {
        let from = self.datastore_named(Some(&req.from))?;
        let to = self.datastore_named(Some(&req.to))?;
        if req.from == req.to {
            return Err(ServiceError::BadRequest(
                "Sync needs two different datastores".into(),
            ));
        }
        from.require_key()?;
        to.require_key()?;
        let desc = format!("sync backups from {} to {}", req.from, req.to);
        self.jobs.clone().spawn("sync", desc, move |ctx| {
            let stats =
                strata_backup::sync::sync(&from, &to, &req.snapshots, &JobProgress::new(ctx))?;
            Ok(serde_json::to_value(&stats).unwrap_or_default())
        })
    }
}

//! NBD exports of the appliance: volumes, volume snapshots, images and backup snapshots served
//! to other hosts by the NBD server (`strata-nbd`) that `strata serve` runs.
//!
//! The server starts with the first export, on the addresses `strata serve --nbd-listen` gives
//! (default `127.0.0.1:10809`), with the appliance's TLS certificate: plain NBD only on
//! loopback (the NBD crate refuses otherwise). Exports are recorded in `DATA/exports.json`
//! (0600: a secret export's name is its password) and made again when the server starts.
//!
//! An exported volume is held like one a VM runs on (see [`super::holds`]): it is not resized,
//! removed or written by anything else while exported, and a volume in use is not exported.
//! Appliance images are exported with their recorded format, never probed.
//!
//! # Locking
//! One mutex guards the records and the server handle; the NBD registry has its own, and
//! connections never take this one.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strata_nbd::{Access, ExportConfig, ExportRegistry, Fingerprint, Listen, ServerHandle};
use strata_storage::source::{SourceSpec, LV_PREFIX};

use super::volumes::Resolved;
use super::{write_atomically, Service, ServiceError, ServiceResult};

/// The prefix naming a backup snapshot as an export source.
pub const BACKUP_PREFIX: &str = "backup:";

/// Time a removed export's clients get to finish their requests.
const DRAIN: Duration = Duration::from_secs(10);

/// Who may use an export.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum ExportAccess {
    /// Every client that reaches the server (over TLS unless on loopback).
    #[default]
    Open,
    /// Only clients that know the export's name: a long random one made by the server, shown
    /// once and never listed.
    Secret,
    /// Only TLS clients presenting one of these certificates (SHA-256 fingerprints), which
    /// must chain to the client CA given to `strata serve --nbd-client-ca`.
    Certificates {
        /// Fingerprints, `AB:CD:…` or plain hex.
        fingerprints: Vec<String>,
    },
}

/// A request to export something.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateExport {
    /// `lv:VG/NAME` (a volume or snapshot), `image:NAME`, or `backup:ID/TIME` (`backup:ID` for
    /// the group's latest).
    pub source: String,
    /// The export's name (default: the source's name); none for a secret export.
    #[serde(default)]
    pub name: Option<String>,
    /// Refuse writes (snapshots and backups always do).
    #[serde(default)]
    pub read_only: bool,
    /// Who may connect.
    #[serde(default)]
    pub access: ExportAccess,
}

/// An export as recorded and listed.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ExportRecord {
    id: String,
    name: String,
    source: String,
    read_only: bool,
    access: ExportAccess,
}

/// A connected client.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExportClient {
    /// Its address.
    pub peer: String,
    /// Whether it speaks TLS.
    pub tls: bool,
    /// Its certificate's fingerprint, if it gave one.
    pub certificate: Option<String>,
}

/// An export as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExportSummary {
    /// Identifier for removal: the name, or `secret-…` for a secret export.
    pub id: String,
    /// The name clients ask for; a secret export's only at creation.
    pub name: Option<String>,
    /// What is exported.
    pub source: String,
    /// Whether writes are refused.
    pub read_only: bool,
    /// open, secret or certificates.
    pub access: String,
    /// Size in bytes (0 while it could not be opened).
    pub size: u64,
    /// Dirty bitmaps exposed as `qemu:dirty-bitmap:NAME`.
    pub bitmaps: Vec<String>,
    /// Connected clients.
    pub clients: Vec<ExportClient>,
    /// Where clients connect (`nbd://HOST:PORT/NAME`), once the server runs.
    pub uri: Option<String>,
    /// Why it is not served (it failed to open when the server started).
    pub error: Option<String>,
}

/// Where and how the NBD server listens.
#[derive(Clone, Debug)]
pub struct NbdSettings {
    /// Addresses (TCP, Unix sockets).
    pub listen: Vec<Listen>,
    /// The server's certificate chain and key (the appliance's own by default).
    pub tls: Option<super::tls::CertificateFiles>,
    /// The CA that client certificates must chain to, for certificate exports.
    pub client_ca: Option<PathBuf>,
}

/// The exports of a server; without settings (the CLI in process) there are none.
#[derive(Debug, Default)]
pub struct Exports {
    state: Mutex<Option<State>>,
}

struct State {
    settings: NbdSettings,
    registry: Arc<ExportRegistry>,
    server: Option<ServerHandle>,
    records: BTreeMap<String, ExportRecord>,
    /// Exports whose source failed to open at start, with why.
    failed: BTreeMap<String, String>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("listen", &self.settings.listen)
            .field("exports", &self.records.len())
            .finish()
    }
}

impl Exports {
    fn lock(&self) -> MutexGuard<'_, Option<State>> {
        // The state changes in single steps under the lock: whole even after a panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn not_served() -> ServiceError {
    ServiceError::Conflict(
        "NBD exports are served by `strata serve`; here, use `strata nbd serve` for a one-off \
         export"
            .into(),
    )
}

impl Service {
    fn exports_file(&self) -> PathBuf {
        self.data().root().join("exports.json")
    }

    /// Offers exports with `settings` and makes the recorded ones again (a source that fails
    /// to open is listed with its error). Called once by `strata serve`.
    pub fn enable_exports(&self, settings: NbdSettings) -> ServiceResult<()> {
        let records: Vec<ExportRecord> = match std::fs::read(self.exports_file()) {
            Ok(text) => serde_json::from_slice(&text).map_err(|e| {
                ServiceError::internal(format!("{} is damaged: {e}", self.exports_file().display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(ServiceError::internal(format!(
                    "Reading {}: {e}",
                    self.exports_file().display()
                )))
            }
        };
        let mut guard = self.exports.lock();
        let state = guard.insert(State {
            settings,
            registry: ExportRegistry::new(),
            server: None,
            records: BTreeMap::new(),
            failed: BTreeMap::new(),
        });
        for r in records {
            let id = r.id.clone();
            if let Err(e) = self.serve_record(state, &r) {
                tracing::warn!(export = %id, error = %e, "a recorded NBD export could not be made");
                state.failed.insert(id.clone(), e.to_string());
            }
            state.records.insert(id, r);
        }
        Ok(())
    }

    /// Exports `req.source`; returns the export, with a secret export's name (shown only now).
    pub fn add_export(&self, req: &CreateExport) -> ServiceResult<ExportSummary> {
        let mut guard = self.exports.lock();
        let state = guard.as_mut().ok_or_else(not_served)?;
        let (id, name) = match (&req.access, &req.name) {
            (ExportAccess::Secret, Some(_)) => {
                return Err(ServiceError::BadRequest(
                    "A secret export's name is made by the server; give no name".into(),
                ))
            }
            (ExportAccess::Secret, None) => {
                let secret = random_hex(16);
                (format!("secret-{}", &secret[..8]), secret)
            }
            (_, Some(n)) => (n.clone(), n.clone()),
            (_, None) => {
                let n = default_name(&req.source);
                (n.clone(), n)
            }
        };
        strata_nbd::export::check_export_name(&name)
            .map_err(|e| ServiceError::BadRequest(e.to_string()))?;
        if state.records.contains_key(&id) {
            return Err(ServiceError::Conflict(format!(
                "An export named {id} exists"
            )));
        }
        let record = ExportRecord {
            id: id.clone(),
            name: name.clone(),
            source: req.source.clone(),
            read_only: req.read_only,
            access: req.access.clone(),
        };
        self.serve_record(state, &record)?;
        state.records.insert(id.clone(), record);
        if let Err(e) = self.save_records(state) {
            if let Ok(gone) = state.registry.remove(&name) {
                gone.wait_unused(DRAIN);
            }
            state.records.remove(&id);
            return Err(e);
        }
        let mut summary = summarize(state, &state.records[&id]);
        summary.name = Some(name);
        Ok(summary)
    }

    /// Every export.
    pub fn list_exports(&self) -> ServiceResult<Vec<ExportSummary>> {
        let guard = self.exports.lock();
        let Some(state) = guard.as_ref() else {
            return Ok(Vec::new());
        };
        Ok(state
            .records
            .values()
            .map(|r| summarize(state, r))
            .collect())
    }

    /// One export.
    pub fn export_info(&self, id: &str) -> ServiceResult<ExportSummary> {
        let guard = self.exports.lock();
        let state = guard.as_ref().ok_or_else(not_served)?;
        let r = state
            .records
            .get(id)
            .ok_or_else(|| ServiceError::NotFound(format!("Export {id}")))?;
        Ok(summarize(state, r))
    }

    /// Stops exporting `id`: its clients are disconnected, their requests finish, and what it
    /// held (a volume) is released.
    pub fn remove_export(&self, id: &str) -> ServiceResult<()> {
        let mut guard = self.exports.lock();
        let state = guard.as_mut().ok_or_else(not_served)?;
        let record = state
            .records
            .remove(id)
            .ok_or_else(|| ServiceError::NotFound(format!("Export {id}")))?;
        state.failed.remove(id);
        if let Err(e) = self.save_records(state) {
            state.records.insert(id.to_string(), record);
            return Err(e);
        }
        if let Ok(gone) = state.registry.remove(&record.name) {
            if !gone.wait_unused(DRAIN) {
                tracing::warn!(export = %id, "clients of a removed export did not finish in time");
            }
        }
        Ok(())
    }

    /// Stops the NBD server (at shutdown).
    pub fn stop_exports(&self) {
        if let Some(state) = self.exports.lock().as_mut() {
            if let Some(server) = state.server.take() {
                server.stop(DRAIN);
            }
        }
    }

    fn save_records(&self, state: &State) -> ServiceResult<()> {
        let list: Vec<&ExportRecord> = state.records.values().collect();
        let text = serde_json::to_vec_pretty(&list)
            .map_err(|e| ServiceError::internal(format!("Encoding exports: {e}")))?;
        write_atomically(&self.exports_file(), &text)
    }

    /// Opens a record's source and adds it to the registry, starting the server first if
    /// needed.
    fn serve_record(&self, state: &mut State, r: &ExportRecord) -> ServiceResult<()> {
        let access = match &r.access {
            ExportAccess::Open => Access::Open,
            ExportAccess::Secret => Access::SecretName,
            ExportAccess::Certificates { fingerprints } => {
                if fingerprints.is_empty() {
                    return Err(ServiceError::BadRequest(
                        "A certificate export needs at least one client certificate fingerprint"
                            .into(),
                    ));
                }
                let set = fingerprints
                    .iter()
                    .map(|f| Fingerprint::parse(f))
                    .collect::<Result<_, _>>()
                    .map_err(|e| ServiceError::BadRequest(e.to_string()))?;
                Access::ClientCertificates(set)
            }
        };
        let config = self.open_for_export(r, access)?;
        if state.server.is_none() {
            let tls = match &state.settings.tls {
                Some(files) => Some(
                    strata_nbd::TlsSettings::from_files(
                        &files.cert,
                        &files.key,
                        state.settings.client_ca.as_deref(),
                    )
                    .map_err(nbd_error)?,
                ),
                None => None,
            };
            let server = strata_nbd::start(
                strata_nbd::ServerConfig {
                    listen: state.settings.listen.clone(),
                    tls,
                    limits: strata_nbd::Limits::default(),
                },
                state.registry.clone(),
            )
            .map_err(nbd_error)?;
            if let Some(addr) = server.tcp_addr() {
                println!("NBD exports on nbd://{addr}/");
                tracing::info!(%addr, "NBD server started");
            }
            state.server = Some(server);
        }
        if let Some(server) = &state.server {
            server.check_access(&config.access).map_err(nbd_error)?;
        }
        state.registry.add(config).map_err(nbd_error)?;
        Ok(())
    }

    /// The device an export serves, holding what it needs open.
    fn open_for_export(&self, r: &ExportRecord, access: Access) -> ServiceResult<ExportConfig> {
        if let Some(snapshot) = r.source.strip_prefix(BACKUP_PREFIX) {
            let store = self.datastore()?;
            let name = store.resolve(snapshot)?;
            let device = strata_backup::SnapshotDevice::open(
                &store,
                &name,
                strata_backup::lazy::DEFAULT_CACHE_BYTES,
            )?;
            return Ok(ExportConfig {
                name: r.name.clone(),
                description: format!("{BACKUP_PREFIX}{name}"),
                device: Arc::new(device),
                read_only: true,
                bitmaps: None,
                access,
                keep_alive: None,
            });
        }
        let holder = format!("NBD export {}", r.id);
        let mut read_only = r.read_only;
        if let Ok(SourceSpec::Volume { vg, lv }) = SourceSpec::parse(&r.source) {
            // A snapshot can be exported any number of times. A volume exported for writing
            // must be free; exported read-only, it may be exported read-only elsewhere too,
            // but not while a VM or job has it.
            let snapshot = self.volumes.get(&vg)?.lv_info(&lv)?.read_only;
            let holders: Vec<String> = self
                .holds
                .holders(&format!("{vg}/{lv}"))
                .into_iter()
                .filter(|h| !(r.read_only && h.starts_with("NBD export")))
                .collect();
            read_only |= snapshot;
            if !snapshot && !holders.is_empty() {
                return Err(ServiceError::Conflict(format!(
                    "Cannot export {}: it is in use by {} (export a snapshot of it instead)",
                    r.source,
                    holders.join(", ")
                )));
            }
        }
        let resolved = self.resolve_source(&r.source, read_only, &holder)?;
        let device = resolved.device();
        let read_only = read_only || device.read_only();
        let bitmaps = match &resolved {
            Resolved::Volume { vg, lv, .. } => vg
                .local("export the dirty bitmaps of")
                .and_then(|g| g.bitmaps(lv))
                .ok(),
            Resolved::Image { tracked, .. } => tracked.bitmaps().cloned(),
        };
        let description = match r.source.strip_prefix(LV_PREFIX) {
            Some(v) => format!("{LV_PREFIX}{v}"),
            None => r.source.clone(),
        };
        Ok(ExportConfig {
            name: r.name.clone(),
            description,
            device,
            read_only,
            bitmaps,
            access,
            keep_alive: Some(Box::new(resolved)),
        })
    }
}

fn summarize(state: &State, r: &ExportRecord) -> ExportSummary {
    let secret = r.access == ExportAccess::Secret;
    let info = state.registry.lookup(&r.name).map(|e| e.info());
    let uri = state.server.as_ref().and_then(|s| s.tcp_addr()).map(|a| {
        if secret {
            format!("nbd://{a}/")
        } else {
            format!("nbd://{a}/{}", r.name)
        }
    });
    ExportSummary {
        id: r.id.clone(),
        name: (!secret).then(|| r.name.clone()),
        source: r.source.clone(),
        read_only: info.as_ref().map_or(r.read_only, |i| i.read_only),
        access: match &r.access {
            ExportAccess::Open => "open".into(),
            ExportAccess::Secret => "secret".into(),
            ExportAccess::Certificates { fingerprints } => {
                format!("{} client certificate(s)", fingerprints.len())
            }
        },
        size: info.as_ref().map_or(0, |i| i.size),
        bitmaps: info.as_ref().map_or_else(Vec::new, |i| i.bitmaps.clone()),
        clients: info.as_ref().map_or_else(Vec::new, |i| {
            i.clients
                .iter()
                .map(|c| ExportClient {
                    peer: c.peer.clone(),
                    tls: c.tls,
                    certificate: c.certificate.map(|f| f.to_string()),
                })
                .collect()
        }),
        uri,
        error: state.failed.get(&r.id).cloned(),
    }
}

/// An export name for a source: `lv:strata/vm1` → `strata-vm1`, `image:x.raw` → `x.raw`.
fn default_name(source: &str) -> String {
    let rest = source
        .strip_prefix(LV_PREFIX)
        .or_else(|| source.strip_prefix("image:"))
        .or_else(|| source.strip_prefix(BACKUP_PREFIX))
        .unwrap_or(source);
    rest.replace('/', "-")
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    let _ = getrandom::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn nbd_error(e: strata_nbd::NbdError) -> ServiceError {
    match e {
        strata_nbd::NbdError::Storage(s) => ServiceError::Storage(s),
        strata_nbd::NbdError::ExportExists(n) => {
            ServiceError::Conflict(format!("An export named {n} exists"))
        }
        strata_nbd::NbdError::NoSuchExport(n) => ServiceError::NotFound(format!("Export {n}")),
        strata_nbd::NbdError::InvalidConfig(m) => ServiceError::BadRequest(m),
        other => ServiceError::internal(other.to_string()),
    }
}

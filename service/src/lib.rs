//! The service layer: every operation the CLI and the HTTP API offer, in one place.
//!
//! HTTP handlers and CLI commands only parse input, call a method here and render the result;
//! validation, the data-directory layout, jobs and authentication live here. Long operations
//! run as [`jobs::Job`]s on their own threads so that they survive the client disconnecting.
//!
//! # Data directory
//! ```text
//! DATA/
//!   tokens.json   API tokens (hashed)
//!   images/       image files managed through the API
//!   catalog/images/NAME.json  each image's recorded format (see [`catalog`])
//!   jobs/         results of finished jobs, one JSON file each
//!   vms/NAME/     a VM's definition, last run and console log (see [`vms`])
//!   networks/NAME.json  a network: its bridge, VLAN awareness, uplink (see [`networks`])
//!   restores/VG/NAME.json     a volume being restored, and NAME.restored, a live restore's
//!                 map of restored chunks (see [`restores`])
//!   users.json    local users of the web UI (Argon2id hashes, see [`users`])
//!   usage-history.json  storage usage samples (see [`usage_history`])
//!   backup-state.json   last verification per snapshot, last GC and verify (see [`backup_state`])
//! ```
//!
//! # Locking
//! | state | guarded by |
//! |---|---|
//! | token list | a mutex in [`tokens::TokenStore`]; the file is replaced atomically |
//! | job table | a mutex in [`jobs::JobManager`]; each job's progress is atomic |
//! | images | the file system: creation uses `O_EXCL`, so two creators cannot both win |
//! | VMs | definitions are created with `link`; running VMs in a mutex in [`vms::VmManager`] |
//! | users, backup state | a mutex each ([`watched_json::WatchedJson`]); files replaced atomically |
//! | web UI sessions | a mutex in [`sessions::Sessions`] (memory only) |
//! | usage history | a mutex in [`usage_history::UsageHistory`]; one sampler thread writes |
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod backup_state;
pub mod backup_stores;
pub mod backups;
pub mod bootstrap;
pub mod catalog;
pub mod datastore_usage;
pub mod error;
pub mod exports;
pub mod holds;
pub mod images;
pub mod io_stats;
pub mod job_log;
pub mod jobs;
pub mod metrics;
pub mod names;
pub mod networks;
pub mod progress;
pub mod restores;
pub mod server_paths;
pub mod sessions;
pub mod space;
pub mod tls;
pub mod tokens;
pub mod transfer;
pub mod usage_history;
pub mod users;
pub mod vm_console;
mod vm_disks;
pub mod vm_runner;
pub mod vms;
pub mod volumes;
pub mod watched_json;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use error::ServiceError;

/// Result type of the service layer.
pub type ServiceResult<T> = Result<T, ServiceError>;

/// Where Strata keeps its state: `--data DIR`, else `$STRATA_DATA`, else `/var/lib/strata`.
#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The data directory chosen by the flag, the environment or the default.
    pub fn resolve(flag: Option<&Path>) -> DataDir {
        DataDir {
            root: strata_storage::volume::resolve_data_dir(flag),
        }
    }

    /// A data directory at `root`.
    pub fn at(root: impl Into<PathBuf>) -> DataDir {
        DataDir { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The token file.
    pub fn tokens_file(&self) -> PathBuf {
        self.root.join("tokens.json")
    }

    /// Images managed through the API.
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// The image catalogue: one format record per image (see [`catalog`]).
    pub fn image_records_dir(&self) -> PathBuf {
        self.root.join("catalog").join("images")
    }

    /// Finished jobs' results.
    pub fn jobs_dir(&self) -> PathBuf {
        self.root.join("jobs")
    }

    /// Files the API may import from or boot (see [`server_paths`]).
    pub fn import_dir(&self) -> PathBuf {
        self.root.join("import")
    }

    /// Creates the directory tree if missing.
    pub fn ensure(&self) -> ServiceResult<()> {
        for d in [
            self.root.clone(),
            self.images_dir(),
            self.jobs_dir(),
            self.import_dir(),
            self.image_records_dir(),
        ] {
            std::fs::create_dir_all(&d)
                .map_err(|e| ServiceError::internal(format!("Creating {}: {e}", d.display())))?;
        }
        // Disks, tokens and backups are the server's: no other local user reads them.
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) = std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))
        {
            tracing::warn!(dir = %self.root.display(), error = %e, "cannot make the data directory owner-only");
        }
        Ok(())
    }
}

/// The services, shared by the HTTP server's handlers (behind an `Arc`) or used once by a CLI
/// command.
#[derive(Debug)]
pub struct Service {
    data: DataDir,
    /// API tokens.
    pub tokens: tokens::TokenStore,
    /// Long-running operations.
    pub jobs: Arc<jobs::JobManager>,
    /// Volume groups, opened on first use and kept open.
    pub volumes: volumes::VolumeGroups,
    /// VM definitions and the VMs running in this process.
    pub vms: vms::VmManager,
    /// Which server files requests may name.
    pub server_paths: server_paths::ServerPaths,
    /// Volumes held open by VMs, jobs and downloads.
    pub holds: Arc<holds::Holds>,
    /// Space reserved by running writers.
    pub space: Arc<space::Space>,
    /// NBD exports (served by `strata serve` only).
    pub exports: exports::Exports,
    /// Restores onto volumes: running plain restores, open live restores and their jobs.
    pub restores: restores::Restores,
    /// Local users of the web UI.
    pub users: users::UserStore,
    /// Web UI sessions.
    pub sessions: sessions::Sessions,
    /// Storage usage samples.
    pub usage: usage_history::UsageHistory,
    /// I/O counters of the volumes opened.
    pub io_stats: io_stats::IoStats,
    /// Verification outcomes and the datastore's last upkeep.
    pub backup_state: backup_state::BackupState,
}

impl Service {
    /// Opens the services on a data directory, creating its layout if needed. Server paths in
    /// requests are confined to `DATA/import` (see [`Service::with_server_paths`]).
    pub fn open(data: DataDir) -> ServiceResult<Service> {
        data.ensure()?;
        Ok(Service {
            server_paths: server_paths::ServerPaths::Under(vec![data.import_dir()]),
            tokens: tokens::TokenStore::open(data.tokens_file())?,
            jobs: Arc::new(jobs::JobManager::new(Some(data.jobs_dir()))),
            volumes: volumes::VolumeGroups::new(strata_storage::volume::VolumeStore::new(
                data.root(),
            )),
            vms: vms::VmManager::new(data.root().join("vms"))?,
            holds: Arc::new(holds::Holds::default()),
            space: Arc::new(space::Space::default()),
            exports: exports::Exports::default(),
            restores: restores::Restores::default(),
            users: users::UserStore::open(data.root().join("users.json"))?,
            sessions: sessions::Sessions::new(sessions::SessionSettings::default()),
            usage: usage_history::UsageHistory::open(data.root().join("usage-history.json")),
            io_stats: io_stats::IoStats::default(),
            backup_state: backup_state::BackupState::open(data.root().join("backup-state.json"))?,
            data,
        })
    }

    /// Replaces how long web UI sessions last (dropping any made so far).
    pub fn with_sessions(mut self, settings: sessions::SessionSettings) -> Service {
        self.sessions = sessions::Sessions::new(settings);
        self
    }

    /// Replaces the policy for server paths named in requests.
    pub fn with_server_paths(mut self, paths: server_paths::ServerPaths) -> Service {
        self.server_paths = paths;
        self
    }

    /// The data directory.
    pub fn data(&self) -> &DataDir {
        &self.data
    }
}

/// Replaces `path` with `contents` atomically (temp file, fsync, rename, fsync of the directory:
/// [`strata_storage::durable::write_atomically`]). Owner-only: these are the server's records
/// (token hashes, job results, VM definitions).
pub fn write_atomically(path: &Path, contents: &[u8]) -> ServiceResult<()> {
    use strata_storage::durable::{write_atomically, Create};
    write_atomically(path, contents, 0o600, Create::OrReplace)
        .map_err(|e| ServiceError::internal(format!("Replacing {}: {e}", path.display())))
}

//! Backups of volumes and images into the appliance's datastore (`DATA/datastore`).
//!
//! Creating, restoring, verifying and collecting garbage run as jobs. A volume's backups are
//! incremental through its dirty bitmap (one per datastore and snapshot group); a restore goes
//! to a new image (removed again if the restore fails or is cancelled) or onto an existing
//! volume.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use strata_backup::prune::KeepRules;
use strata_backup::restore::RestoreOptions;
use strata_backup::{snapshot, BackupOptions, Changes, Datastore};
use strata_storage::format::ImageFormat;

use super::catalog::{appliance_open_options, Origin};
use super::jobs::{Job, JobContext};
use super::progress::JobProgress;
use super::volumes::Resolved;
use super::{Service, ServiceError, ServiceResult};

/// A request to back up a source.
#[derive(Debug, Deserialize)]
pub struct CreateBackup {
    /// `lv:VG/NAME`, `image:NAME`, or an absolute path on the server.
    pub source: String,
    /// Snapshot group, e.g. `volume/strata/vm-100-disk-0` (derived from the source if absent).
    pub id: Option<String>,
    /// The datastore (default `local`; see `backups store add`).
    #[serde(default)]
    pub store: Option<String>,
}

/// A request to restore a snapshot.
#[derive(Debug, Deserialize)]
pub struct RestoreBackup {
    /// Snapshot name (`ID/TIME`) or a group id (its latest snapshot).
    pub snapshot: String,
    /// `image:NAME` (a new image) or `lv:VG/NAME` (an existing volume of the same size).
    pub target: String,
    /// Format of a new image (raw, qcow2, vmdk, vhd, vhdx); default raw.
    pub format: Option<String>,
    /// Live restore onto a volume: the volume is usable at once (VMs, NBD exports), chunks
    /// being fetched as they are read and copied in the background.
    #[serde(default)]
    pub live: bool,
    /// With `live`: whether this job runs the background copy to its end (default). `false`
    /// only sets the restore up; the copy then runs wherever the volume is opened, or when the
    /// server starts.
    pub copy: Option<bool>,
    /// Workers fetching, checking and writing chunks (default four per core, at most 256).
    pub workers: Option<usize>,
    /// The datastore (default `local`).
    #[serde(default)]
    pub store: Option<String>,
}

/// What to verify.
#[derive(Debug, Default, Deserialize)]
pub struct VerifyBackups {
    /// One snapshot (name or group id); all snapshots when absent.
    pub snapshot: Option<String>,
    /// The datastore (default `local`).
    #[serde(default)]
    pub store: Option<String>,
}

/// What to collect garbage in.
#[derive(Debug, Default, Deserialize)]
pub struct GcBackups {
    /// The datastore (default `local`).
    #[serde(default)]
    pub store: Option<String>,
}

/// Retention rules.
#[derive(Debug, Default, Deserialize)]
pub struct PruneBackups {
    /// Groups to prune (all when empty).
    #[serde(default)]
    pub ids: Vec<String>,
    /// Newest snapshots to keep.
    #[serde(default)]
    pub keep_last: usize,
    /// Days to keep one snapshot of.
    #[serde(default)]
    pub keep_daily: usize,
    /// ISO weeks to keep one snapshot of.
    #[serde(default)]
    pub keep_weekly: usize,
    /// Months to keep one snapshot of.
    #[serde(default)]
    pub keep_monthly: usize,
    /// Only report what would be removed.
    #[serde(default)]
    pub dry_run: bool,
    /// The datastore (default `local`).
    #[serde(default)]
    pub store: Option<String>,
}

/// A snapshot as listed.
#[derive(Debug, Serialize)]
pub struct BackupSummary {
    /// Snapshot name, `ID/TIME`.
    pub snapshot: String,
    /// Its manifest: source, time, size, format, parent, change tracking, figures; or the error
    /// reading it.
    pub manifest: serde_json::Value,
    /// Its last verification, if it was verified.
    pub verified: Option<super::backup_state::VerifyState>,
}

impl Service {
    fn datastore_path(&self) -> PathBuf {
        self.data().root().join(super::bootstrap::DATASTORE_DIR)
    }

    /// The appliance's datastore, created on first use.
    pub fn datastore(&self) -> ServiceResult<Datastore> {
        Ok(Datastore::open_or_create(&self.datastore_path())?)
    }

    /// Snapshots, oldest first (of one group if given).
    pub fn list_backups(&self, id: Option<&str>) -> ServiceResult<Vec<BackupSummary>> {
        self.list_backups_in(None, id)
    }

    /// Snapshots of datastore `store` (default `local`), oldest first (of one group if given).
    pub fn list_backups_in(
        &self,
        store_name: Option<&str>,
        id: Option<&str>,
    ) -> ServiceResult<Vec<BackupSummary>> {
        let is_local = store_name.is_none_or(|n| n == super::backup_stores::DEFAULT_STORE);
        let store = self.datastore_named(store_name)?;
        let names = match id {
            Some(id) => store.list_group(id)?,
            None => store.list()?,
        };
        // Verification records are the local datastore's.
        let verified = if is_local {
            self.backup_state.all_verified()
        } else {
            Default::default()
        };
        Ok(names
            .into_iter()
            .map(|n| BackupSummary {
                snapshot: n.to_string(),
                manifest: match store.read_manifest(&n) {
                    Ok(m) => serde_json::to_value(&m).unwrap_or_default(),
                    Err(e) => serde_json::json!({ "error": e.to_string() }),
                },
                verified: verified.get(&n.to_string()).cloned(),
            })
            .collect())
    }

    /// Starts a backup job.
    pub fn start_backup(self: &Arc<Self>, req: CreateBackup) -> ServiceResult<Arc<Job>> {
        let store = self.datastore_named(req.store.as_deref())?;
        store.require_key()?;
        let id = req
            .id
            .clone()
            .unwrap_or_else(|| snapshot::default_id(&req.source));
        snapshot::check_id(&id)?;
        let resolved = self.resolve_source(&req.source, true, "a backup job")?;
        let desc = format!("back up {} as {id}", req.source);
        self.jobs.clone().spawn("backup", desc, move |ctx| {
            let progress = JobProgress::new(ctx);
            let opts = BackupOptions {
                id: id.clone(),
                source_label: req.source.clone(),
                source_format: resolved.format_label(),
                changes: Changes::Untracked,
                pipeline: Default::default(),
            };
            let out = match &resolved {
                Resolved::Volume { device, vg, lv, .. } => {
                    let mut tracker = strata_backup::changes::volume_tracker(
                        vg,
                        lv,
                        &store,
                        &id,
                        req.source.clone(),
                    )?;
                    strata_backup::create_tracked(
                        &store,
                        device.clone(),
                        &opts,
                        tracker.as_mut(),
                        &progress,
                    )?
                }
                Resolved::Image { device, .. } => {
                    strata_backup::create(&store, device.clone(), &opts, &progress)?
                }
            };
            Ok(serde_json::json!({
                "snapshot": out.snapshot.to_string(),
                "manifest": out.manifest,
            }))
        })
    }

    /// Starts a restore job.
    pub fn start_restore(self: &Arc<Self>, req: RestoreBackup) -> ServiceResult<Arc<Job>> {
        let store = self.datastore_named(req.store.as_deref())?;
        let name = store.resolve(&req.snapshot)?;
        let (manifest, index) = store.read_snapshot(&name)?;
        // What the restore writes: the chunks that hold data (zero chunks are skipped or
        // written as zeroes).
        let data: u64 = (0..index.entries().len() as u64)
            .filter(|&i| index.entries()[i as usize].digest().is_some())
            .map(|i| index.chunk_range(i).1 as u64)
            .sum();
        let desc = format!("restore {name} to {}", req.target);
        let workers = match req.workers {
            None => strata_backup::restore::default_workers(),
            Some(n) if (1..=strata_backup::restore::MAX_WORKERS).contains(&n) => n,
            Some(n) => {
                return Err(ServiceError::BadRequest(format!(
                    "workers must be 1 to {}, not {n}",
                    strata_backup::restore::MAX_WORKERS
                )))
            }
        };
        if req.copy.is_some() && !req.live {
            return Err(ServiceError::BadRequest(
                "\"copy\" applies to a live restore".into(),
            ));
        }
        if let Some(image) = req.target.strip_prefix("image:") {
            if req.live {
                return Err(ServiceError::BadRequest(
                    "A live restore goes onto a volume (lv:VG/NAME): a new image is published \
                     only when it is whole"
                        .into(),
                ));
            }
            let path = self.image_path(image)?;
            if path.exists() {
                return Err(ServiceError::Conflict(format!(
                    "Image {image} already exists"
                )));
            }
            let fmt: ImageFormat = req.format.as_deref().unwrap_or("raw").parse()?;
            super::images::check_new_image(fmt, manifest.size, &Default::default(), false)?;
            // Restored into a hidden file and moved to its name only when complete (the
            // conversion's staging), so that a failed or cancelled restore never leaves an
            // image that looks whole: dropping the staging removes the hidden file.
            let reservation = self.reserve_space(&path, data)?;
            let staged = strata_storage::convert::Staged::new(&path, fmt)?;
            let svc = self.clone();
            let image = image.to_string();
            return self.jobs.clone().spawn("restore", desc, move |ctx| {
                let v = restore_into_new(&store, &name, staged.build_path(), fmt, workers, ctx)?;
                staged.commit()?;
                svc.record_image(&image, fmt, Origin::Restore)?;
                drop(reservation);
                Ok(v)
            });
        }
        let Some((vg, lv)) = req
            .target
            .strip_prefix("lv:")
            .and_then(|t| t.split_once('/'))
        else {
            return Err(ServiceError::BadRequest(format!(
                "Restore target {:?} must be image:NAME (a new image) or lv:VG/NAME (an existing volume)",
                req.target
            )));
        };
        if req.format.is_some() {
            return Err(ServiceError::BadRequest(
                "A format applies to a new image, not to a volume".into(),
            ));
        }
        super::names::validate("volume group", vg)?;
        super::names::validate("volume", lv)?;
        let restore = super::restores::VolumeRestore {
            vg: vg.to_string(),
            lv: lv.to_string(),
            live: req.live,
            copy: req.copy.unwrap_or(true),
            workers,
        };
        self.start_volume_restore(store, name, data, restore)
    }

    /// Starts a verify job (one snapshot or all).
    pub fn start_verify(self: &Arc<Self>, req: VerifyBackups) -> ServiceResult<Arc<Job>> {
        let store = self.datastore_named(req.store.as_deref())?;
        store.require_key()?;
        let record = req
            .store
            .as_deref()
            .is_none_or(|n| n == super::backup_stores::DEFAULT_STORE);
        let names = match &req.snapshot {
            Some(s) => vec![store.resolve(s)?],
            None => store.list()?,
        };
        let desc = match &req.snapshot {
            Some(s) => format!("verify {s}"),
            None => "verify all snapshots".into(),
        };
        let svc = self.clone();
        self.jobs.clone().spawn("verify", desc, move |ctx| {
            let workers = std::thread::available_parallelism()
                .map(|n| n.get() * 2)
                .unwrap_or(2);
            let report =
                strata_backup::verify::verify(&store, &names, workers, &JobProgress::new(ctx))?;
            let value = serde_json::to_value(&report).unwrap_or_default();
            if record {
                svc.record_verification(&report);
            }
            if report.ok() {
                Ok(value)
            } else {
                Err(ServiceError::Storage(
                    strata_storage::StorageError::corrupt(
                        "datastore",
                        format!("verification found damage: {value}"),
                    ),
                ))
            }
        })
    }

    /// Removes snapshots outside the retention rules.
    pub fn prune_backups(&self, req: &PruneBackups) -> ServiceResult<serde_json::Value> {
        for id in &req.ids {
            snapshot::check_id(id)?;
        }
        let store = self.datastore_named(req.store.as_deref())?;
        let rules = KeepRules {
            last: req.keep_last,
            daily: req.keep_daily,
            weekly: req.keep_weekly,
            monthly: req.keep_monthly,
        };
        let decisions = strata_backup::prune::prune_protecting(
            &store,
            &req.ids,
            rules,
            req.dry_run,
            &self.snapshots_in_restore(),
        )?;
        Ok(serde_json::to_value(&decisions).unwrap_or_default())
    }

    /// Starts garbage collection.
    pub fn start_gc(self: &Arc<Self>) -> ServiceResult<Arc<Job>> {
        self.start_gc_in(GcBackups::default())
    }

    /// Starts garbage collection of one datastore.
    pub fn start_gc_in(self: &Arc<Self>, req: GcBackups) -> ServiceResult<Arc<Job>> {
        let store = self.datastore_named(req.store.as_deref())?;
        let record = req
            .store
            .as_deref()
            .is_none_or(|n| n == super::backup_stores::DEFAULT_STORE);
        let svc = self.clone();
        self.jobs
            .clone()
            .spawn("gc", "collect unreferenced chunks".into(), move |ctx| {
                let outcome = strata_backup::gc::gc(&store, 300, &JobProgress::new(ctx));
                if record {
                    svc.record_gc(&outcome);
                }
                Ok(serde_json::to_value(&outcome?).unwrap_or_default())
            })
    }
}

fn restore_into_new(
    store: &Datastore,
    name: &strata_backup::SnapshotName,
    path: &std::path::Path,
    fmt: ImageFormat,
    workers: usize,
    ctx: &JobContext,
) -> ServiceResult<serde_json::Value> {
    let stats = strata_backup::restore::restore_into_new_image(
        store,
        name,
        path,
        &appliance_open_options(fmt, false),
        RestoreOptions {
            workers,
            ..Default::default()
        },
        &JobProgress::new(ctx),
    )?;
    Ok(serde_json::to_value(&stats).unwrap_or_default())
}

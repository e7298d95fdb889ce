//! Restores onto volumes: the "restoring" mark, and live restores handed out to every user of
//! the volume.
//!
//! A restore onto a volume writes a record `DATA/restores/VG/NAME.json`
//! ([`strata_backup::live::record`]) before it touches the volume and removes it after its
//! final flush. While the record is there the volume is listed with `restore` and:
//! - a plain restore's volume is refused to every other user (409): it is not whole until the
//!   restore ends, and if the restore failed or was interrupted it stays refused until a new
//!   restore replaces it (or the volume is removed);
//! - a live restore's volume is usable at once: [`Service::restoring_device`], called by
//!   [`Service::resolve_source`] for every VM, job and download, hands out the one
//!   [`LiveRestore`] device of this server for it (opening it from its record and map after a
//!   restart), and a job runs its background copy to the end, reporting lost chunks. Stopping
//!   that job (or the server) pauses the copy; it continues when the volume is opened again
//!   or the server starts ([`Service::resume_restores`]).
//!
//! # Locking
//! | state | guarded by |
//! |---|---|
//! | open live devices and their jobs, running plain restores | one mutex, never held during I/O |
//! | a record | the file system (atomic replacement); one process holds a live restore's map |

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
pub use strata_backup::live::RestoreMode;
use strata_backup::live::{LiveOptions, LiveRestore, RestorePaths, RestoreRecord, WeakLiveRestore};
use strata_storage::{BlockDevice, StorageError};

use super::jobs::Job;
use super::progress::JobProgress;
use super::{Service, ServiceError, ServiceResult};

/// How long an opener waits for a live restore closing in this process (its map file is
/// locked until its workers have stopped).
const REOPEN_WAIT: Duration = Duration::from_secs(5);

/// A volume's restore, as listed.
#[derive(Clone, Debug, Serialize)]
pub struct RestoreInfo {
    /// `live` or `full`.
    pub mode: RestoreMode,
    /// The snapshot being restored.
    pub snapshot: String,
    /// Start, seconds since the Unix epoch.
    pub started: u64,
    /// `running` (a job or an open device works on it) or `stopped` (a plain restore that
    /// failed or was interrupted: restore again; a live one continues when the volume is
    /// opened or the server starts).
    pub state: String,
    /// Chunks in the snapshot.
    pub chunks_total: u64,
    /// Chunks on the volume (a live restore open in this server).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunks_done: Option<u64>,
    /// Chunks the datastore could not give (a live restore open in this server).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunks_lost: Option<u64>,
    /// The job working on it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
}

#[derive(Debug, Default)]
struct Entry {
    live: Option<WeakLiveRestore>,
    job: Option<Arc<Job>>,
    full_running: bool,
}

/// The restores of one server. See the module documentation.
#[derive(Debug, Default)]
pub struct Restores {
    table: Mutex<BTreeMap<String, Entry>>,
}

impl Restores {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        // Entries are replaced in single steps: the map is whole even after a panic.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The open live device of volume `key` (`VG/NAME`).
    fn live(&self, key: &str) -> Option<LiveRestore> {
        self.lock()
            .get(key)
            .and_then(|e| e.live.as_ref())
            .and_then(WeakLiveRestore::upgrade)
    }

    /// The running job of volume `key`.
    fn job(&self, key: &str) -> Option<Arc<Job>> {
        self.lock()
            .get(key)
            .and_then(|e| e.job.clone())
            .filter(|j| j.is_running())
    }

    fn set_live(&self, key: &str, live: &LiveRestore) {
        self.lock().entry(key.to_string()).or_default().live = Some(live.downgrade());
    }

    fn set_job(&self, key: &str, job: &Arc<Job>) {
        self.lock().entry(key.to_string()).or_default().job = Some(job.clone());
    }

    fn set_full(&self, key: &str, running: bool) {
        self.lock().entry(key.to_string()).or_default().full_running = running;
    }

    /// Whether anything in this server works on volume `key`'s restore now.
    fn busy(&self, key: &str) -> bool {
        self.lock().get(key).is_some_and(|e| {
            e.full_running
                || e.job.as_ref().is_some_and(|j| j.is_running())
                || e.live.as_ref().is_some_and(|l| l.upgrade().is_some())
        })
    }
}

/// Clears a plain restore's running mark when its job ends, however it ends.
struct FullRunning {
    svc: Arc<Service>,
    key: String,
}

impl Drop for FullRunning {
    fn drop(&mut self) {
        self.svc.restores.set_full(&self.key, false);
    }
}

/// What a restore onto a volume needs from the request.
#[derive(Debug)]
pub(crate) struct VolumeRestore {
    pub vg: String,
    pub lv: String,
    pub live: bool,
    pub copy: bool,
    pub workers: usize,
}

impl Service {
    fn restore_paths(&self, vg: &str, lv: &str) -> RestorePaths {
        RestorePaths::of(self.data().root(), vg, lv)
    }

    /// The restore of volume `VG/NAME`, if one is recorded.
    pub fn restore_info(&self, vg: &str, lv: &str) -> Option<RestoreInfo> {
        let key = format!("{vg}/{lv}");
        let rec = match self.restore_paths(vg, lv).read() {
            Ok(Some(rec)) => rec,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(volume = %key, error = %e, "unreadable restore record");
                return None;
            }
        };
        let live = self.restores.live(&key);
        let status = live.as_ref().map(LiveRestore::status);
        let job = self.restores.job(&key);
        Some(RestoreInfo {
            mode: rec.mode,
            snapshot: rec.snapshot,
            started: rec.started,
            state: if self.restores.busy(&key) {
                "running"
            } else {
                "stopped"
            }
            .into(),
            chunks_total: rec.chunk_count,
            chunks_done: status.as_ref().map(|s| s.chunks_done),
            chunks_lost: status.as_ref().map(|s| s.lost.len() as u64),
            job: job.map(|j| j.id().to_string()),
        })
    }

    /// The device users of volume `VG/NAME` get, given the volume `device` just opened
    /// (`read_only` as asked): the volume itself, the live-restore device when it is under live
    /// restore (opened writable with `reopen_writable` if need be, and its copy continued by a
    /// job), or 409 while it holds a plain restore that has not finished.
    pub fn restoring_device(
        &self,
        vg: &str,
        lv: &str,
        device: Arc<dyn BlockDevice>,
        reopen_writable: impl FnOnce() -> Result<Arc<dyn BlockDevice>, StorageError>,
    ) -> ServiceResult<Arc<dyn BlockDevice>> {
        let key = format!("{vg}/{lv}");
        if let Some(live) = self.restores.live(&key) {
            return Ok(Arc::new(live));
        }
        let paths = self.restore_paths(vg, lv);
        let Some(rec) = paths.read()? else {
            return Ok(device);
        };
        match rec.mode {
            RestoreMode::Full => Err(ServiceError::Conflict(if self.restores.busy(&key) {
                format!(
                    "lv:{key} is being restored from {} and is not usable until that ends",
                    rec.snapshot
                )
            } else {
                format!(
                    "lv:{key} holds an unfinished restore of {}; restore it again (with \
                     \"live\" to use it while it restores) before using it",
                    rec.snapshot
                )
            })),
            RestoreMode::Live => {
                let target = if device.read_only() {
                    drop(device);
                    reopen_writable()?
                } else {
                    device
                };
                let live = self.open_live(&key, &paths, target)?;
                if let Err(e) = self.ensure_live_job(&key, &live) {
                    // The device's workers copy while it is open anyway.
                    tracing::warn!(volume = %key, error = %e, "no job for the resumed live restore");
                }
                Ok(Arc::new(live))
            }
        }
    }

    /// The open live device of `key`, or the one resumed now from its record.
    fn open_live(
        &self,
        key: &str,
        paths: &RestorePaths,
        target: Arc<dyn BlockDevice>,
    ) -> ServiceResult<LiveRestore> {
        let deadline = std::time::Instant::now() + REOPEN_WAIT;
        loop {
            if let Some(live) = self.restores.live(key) {
                return Ok(live);
            }
            match LiveRestore::resume(paths, target.clone(), LiveOptions::default()) {
                Ok(live) => {
                    self.restores.set_live(key, &live);
                    tracing::info!(volume = %key, snapshot = %live.snapshot(), "live restore resumed");
                    return Ok(live);
                }
                // A device of this volume is closing (or another opener just won): look again.
                Err(StorageError::Busy(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The job running `live`'s copy to its end, started now if none runs.
    fn ensure_live_job(&self, key: &str, live: &LiveRestore) -> ServiceResult<Arc<Job>> {
        if let Some(job) = self.restores.job(key) {
            return Ok(job);
        }
        let job = self.live_job(key, live.clone(), Box::new(()))?;
        self.restores.set_job(key, &job);
        Ok(job)
    }

    /// A job running `live`'s copy to its end; `keep` lives as long as the job.
    fn live_job(
        &self,
        key: &str,
        live: LiveRestore,
        keep: Box<dyn std::any::Any + Send>,
    ) -> ServiceResult<Arc<Job>> {
        let hold = self.holds.take(key, "a live restore");
        let desc = format!("live restore {} to lv:{key}", live.snapshot());
        self.jobs.clone().spawn("restore", desc, move |ctx| {
            let _keep = (hold, keep);
            let st = live.copy_to_end(&JobProgress::new(ctx))?;
            Ok(serde_json::to_value(&st).unwrap_or_default())
        })
    }

    /// Starts a restore of snapshot `name` onto a volume (see [`super::backups`]).
    pub(crate) fn start_volume_restore(
        self: &Arc<Self>,
        store: strata_backup::Datastore,
        name: strata_backup::SnapshotName,
        data_bytes: u64,
        req: VolumeRestore,
    ) -> ServiceResult<Arc<Job>> {
        let key = format!("{}/{}", req.vg, req.lv);
        let label = format!("lv:{key}");
        let paths = self.restore_paths(&req.vg, &req.lv);
        if let Some(rec) = paths.read()? {
            if req.live && rec.mode == RestoreMode::Live && rec.snapshot == name.to_string() {
                // The same live restore: continue it (or report the job already on it).
                let _target = self.resolve_source(&label, false, "a live restore")?;
                let live = self.restores.live(&key).ok_or_else(|| {
                    ServiceError::internal(format!("the live restore of {label} did not open"))
                })?;
                return self.ensure_live_job(&key, &live);
            }
            if self.restores.busy(&key) {
                return Err(ServiceError::Conflict(format!(
                    "{label} is being restored from {} by a job or used under live restore; \
                     wait for it to end (or stop its users) first",
                    rec.snapshot
                )));
            }
            tracing::info!(volume = %key, old = %rec.snapshot, new = %name, "a new restore replaces an unfinished one");
            paths.remove()?;
        }
        let target = self.resolve_source(&label, false, "a restore job")?;
        let size = target.device().size();
        let manifest = store.read_manifest(&name)?;
        if size != manifest.size {
            return Err(ServiceError::BadRequest(format!(
                "{label} holds {size} bytes; the snapshot {name} needs a volume of exactly {} bytes",
                manifest.size
            )));
        }
        let reservation = self.reserve_in_volume(&target, data_bytes)?;
        if req.live {
            let opts = LiveOptions {
                workers: req.workers,
                // Set up only: the copy runs where the volume is opened.
                background: req.copy,
            };
            let live = LiveRestore::start(&store, &name, target.device(), &label, &paths, opts)?;
            self.restores.set_live(&key, &live);
            let job = if req.copy {
                self.live_job(&key, live, Box::new((target, reservation)))?
            } else {
                let desc = format!("set up live restore {name} to {label}");
                self.jobs.clone().spawn("restore", desc, move |_| {
                    // The copy continues wherever the volume is opened next.
                    let st = live.status();
                    drop((live, target, reservation));
                    Ok(serde_json::to_value(&st).unwrap_or_default())
                })?
            };
            self.restores.set_job(&key, &job);
            return Ok(job);
        }
        let record = RestoreRecord {
            format: strata_backup::live::record::RECORD_FORMAT.into(),
            version: strata_backup::live::record::RECORD_VERSION,
            mode: RestoreMode::Full,
            restore_id: RestoreRecord::new_id(),
            snapshot: name.to_string(),
            datastore: store.root().to_path_buf(),
            target: label.clone(),
            size,
            chunk_size: manifest.chunk_size,
            chunk_count: manifest.chunk_count,
            started: strata_backup::time::now().max(0) as u64,
        };
        paths.write(&record)?;
        self.restores.set_full(&key, true);
        let running = FullRunning {
            svc: self.clone(),
            key: key.clone(),
        };
        let desc = format!("restore {name} to {label}");
        let job = self.jobs.clone().spawn("restore", desc, move |ctx| {
            let _running = running;
            let _reservation = reservation;
            let opts = strata_backup::restore::RestoreOptions {
                fresh_target: false,
                workers: req.workers,
                ..Default::default()
            };
            let stats = strata_backup::restore::restore(
                &store,
                &name,
                target.device(),
                opts,
                &JobProgress::new(ctx),
            )?;
            // The restore flushed the volume: it is whole, and no longer marked.
            paths.remove()?;
            Ok(serde_json::to_value(&stats).unwrap_or_default())
        });
        if job.is_err() {
            // No job: the volume was not touched.
            let _ = self.restore_paths(&req.vg, &req.lv).remove();
        }
        let job = job?;
        self.restores.set_job(&key, &job);
        Ok(job)
    }

    /// Forgets the restore record of a volume that was removed.
    pub(crate) fn forget_restore(&self, vg: &str, lv: &str) {
        if let Err(e) = self.restore_paths(vg, lv).remove() {
            tracing::warn!(volume = %format!("{vg}/{lv}"), error = %e, "removing the restore record of a removed volume failed");
        }
    }

    /// Snapshots that recorded restores read (prune keeps them).
    pub fn snapshots_in_restore(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (vg, lv) in self.recorded_restores() {
            if let Ok(Some(rec)) = self.restore_paths(&vg, &lv).read() {
                if rec.mode == RestoreMode::Live {
                    out.push(rec.snapshot);
                }
            }
        }
        out
    }

    /// Volumes with a restore record, as `(VG, NAME)`.
    fn recorded_restores(&self) -> Vec<(String, String)> {
        let dir = self
            .data()
            .root()
            .join(strata_backup::live::record::RESTORES_DIR);
        let mut out = Vec::new();
        let Ok(groups) = std::fs::read_dir(&dir) else {
            return out;
        };
        for g in groups.flatten() {
            let vg = g.file_name().to_string_lossy().into_owned();
            let Ok(files) = std::fs::read_dir(g.path()) else {
                continue;
            };
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if let Some(lv) = name.strip_suffix(".json") {
                    if !lv.starts_with('.') {
                        out.push((vg.clone(), lv.to_string()));
                    }
                }
            }
        }
        out
    }

    /// Continues every live restore recorded in the data directory (at server start): each
    /// gets its device opened and a job copying to the end. Returns the volumes resumed.
    pub fn resume_restores(&self) -> Vec<String> {
        let mut resumed = Vec::new();
        for (vg, lv) in self.recorded_restores() {
            let label = format!("lv:{vg}/{lv}");
            match self.restore_paths(&vg, &lv).read() {
                Ok(Some(rec)) if rec.mode == RestoreMode::Live => {
                    match self.resolve_source(&label, false, "a live restore") {
                        Ok(_) => resumed.push(label),
                        Err(e) => {
                            tracing::warn!(volume = %label, error = %e, "cannot resume its live restore")
                        }
                    }
                }
                Ok(Some(rec)) => {
                    tracing::warn!(volume = %label, snapshot = %rec.snapshot, "holds an unfinished restore: restore it again")
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(volume = %label, error = %e, "unreadable restore record"),
            }
        }
        resumed
    }
}

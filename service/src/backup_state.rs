//! What the appliance remembers about its datastore's upkeep: the outcome of the last
//! verification of each snapshot, and when garbage collection and verification last ran
//! (`DATA/backup-state.json`, replaced atomically). The backups list, the dashboard and the
//! metrics show it.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::watched_json::WatchedJson;
use super::ServiceResult;

/// Snapshots whose verification outcome is kept at most (the oldest entries go first).
pub const MAX_VERIFIED: usize = 100_000;

/// The last verification of one snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyState {
    /// When it was verified, seconds since the Unix epoch.
    pub at: u64,
    /// Whether everything it needs was intact.
    pub ok: bool,
}

/// The last run of a datastore-wide task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRun {
    /// When it ended, seconds since the Unix epoch.
    pub at: u64,
    /// Whether it succeeded (a verification: found no damage).
    pub ok: bool,
    /// Its figures or report summary.
    pub summary: serde_json::Value,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    #[serde(default)]
    last_gc: Option<TaskRun>,
    #[serde(default)]
    last_verify: Option<TaskRun>,
    #[serde(default)]
    verified: BTreeMap<String, VerifyState>,
}

/// The datastore's upkeep record.
#[derive(Debug)]
pub struct BackupState {
    file: WatchedJson<StateFile>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl BackupState {
    /// Opens the record at `path`.
    pub fn open(path: std::path::PathBuf) -> ServiceResult<BackupState> {
        Ok(BackupState {
            file: WatchedJson::open(path)?,
        })
    }

    /// Records a verification: each snapshot's outcome, and the run.
    pub fn record_verify(
        &self,
        outcomes: &[(String, bool)],
        summary: serde_json::Value,
    ) -> ServiceResult<()> {
        let at = now();
        let mut file = self.file.lock()?;
        let f = file.get_mut();
        for (snapshot, ok) in outcomes {
            f.verified
                .insert(snapshot.clone(), VerifyState { at, ok: *ok });
        }
        while f.verified.len() > MAX_VERIFIED {
            let oldest = f
                .verified
                .iter()
                .min_by_key(|(_, v)| v.at)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => f.verified.remove(&k),
                None => break,
            };
        }
        f.last_verify = Some(TaskRun {
            at,
            ok: outcomes.iter().all(|(_, ok)| *ok),
            summary,
        });
        file.save()
    }

    /// Records a garbage collection.
    pub fn record_gc(&self, ok: bool, summary: serde_json::Value) -> ServiceResult<()> {
        let mut file = self.file.lock()?;
        file.get_mut().last_gc = Some(TaskRun {
            at: now(),
            ok,
            summary,
        });
        file.save()
    }

    /// The last verification of a snapshot, if any.
    pub fn verified(&self, snapshot: &str) -> Option<VerifyState> {
        self.file.lock().ok()?.get().verified.get(snapshot).cloned()
    }

    /// Every snapshot's last verification.
    pub fn all_verified(&self) -> BTreeMap<String, VerifyState> {
        self.file
            .lock()
            .map(|f| f.get().verified.clone())
            .unwrap_or_default()
    }

    /// The last garbage collection and the last verification.
    pub fn last_runs(&self) -> (Option<TaskRun>, Option<TaskRun>) {
        self.file
            .lock()
            .map(|f| (f.get().last_gc.clone(), f.get().last_verify.clone()))
            .unwrap_or_default()
    }
}

impl super::Service {
    /// Keeps a verification's outcome (a failure to write it is logged: the verification itself
    /// stands).
    pub(crate) fn record_verification(&self, report: &strata_backup::verify::VerifyReport) {
        let outcomes: Vec<(String, bool)> = report
            .snapshots
            .iter()
            .map(|s| (s.snapshot.clone(), s.ok))
            .collect();
        let summary = serde_json::json!({
            "snapshots": report.snapshots.len(),
            "chunks_checked": report.chunks_checked,
            "bytes_checked": report.bytes_checked,
            "bad_chunks": report.bad_chunks.len(),
        });
        if let Err(e) = self.backup_state.record_verify(&outcomes, summary) {
            tracing::warn!(error = %e, "could not record the verification's outcome");
        }
    }

    /// Keeps a garbage collection's outcome (a cancelled one is not a run).
    pub(crate) fn record_gc(&self, outcome: &strata_storage::Result<strata_backup::gc::GcStats>) {
        let (ok, summary) = match outcome {
            Ok(stats) => (true, serde_json::to_value(stats).unwrap_or_default()),
            Err(strata_storage::StorageError::Cancelled) => return,
            Err(e) => (false, serde_json::json!({ "error": e.to_string() })),
        };
        if let Err(e) = self.backup_state.record_gc(ok, summary) {
            tracing::warn!(error = %e, "could not record the garbage collection's outcome");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_and_runs_are_kept_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backup-state.json");
        let st = BackupState::open(path.clone()).unwrap();
        assert!(st.verified("a/2026-01-01T00:00:00Z").is_none());
        st.record_verify(
            &[
                ("a/2026-01-01T00:00:00Z".into(), true),
                ("b/2026-01-01T00:00:00Z".into(), false),
            ],
            serde_json::json!({"chunks": 3}),
        )
        .unwrap();
        st.record_gc(true, serde_json::json!({"removed": 0}))
            .unwrap();
        let again = BackupState::open(path).unwrap();
        assert!(again.verified("a/2026-01-01T00:00:00Z").unwrap().ok);
        assert!(!again.verified("b/2026-01-01T00:00:00Z").unwrap().ok);
        let (gc, verify) = again.last_runs();
        assert!(gc.unwrap().ok);
        assert!(!verify.unwrap().ok, "one snapshot was damaged");
    }
}

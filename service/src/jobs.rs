//! Long-running operations as jobs: an id, a state, progress in bytes, cancellation, and a kept
//! result.
//!
//! A job runs on a thread of its own, so it goes on when the client that started it disconnects.
//! Its record is written to `DATA/jobs/ID.json` when it starts and when it ends; a server that
//! restarts lists finished jobs with their results and reports jobs that were running when it
//! stopped as failed ("interrupted"). The work function polls [`JobContext::check_cancelled`] and
//! must remove whatever it half-made before returning [`ServiceError::Cancelled`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::job_log::{JobLog, LogLine};
use super::metrics::jobs::JobStats;
use super::{write_atomically, ServiceError, ServiceResult};

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Working.
    Running,
    /// Finished with a result.
    Succeeded,
    /// Finished with an error.
    Failed,
    /// Stopped on request; what it had made was removed.
    Cancelled,
}

/// A job as reported to clients.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobStatus {
    /// Job id.
    pub id: String,
    /// What kind of operation (convert, import, backup, restore, verify, gc, ...).
    pub kind: String,
    /// What it works on, for people.
    pub description: String,
    /// Current state.
    pub state: JobState,
    /// Bytes processed so far.
    pub bytes_done: u64,
    /// Bytes to process in all (0 while unknown).
    pub bytes_total: u64,
    /// Progress in percent (0–100).
    pub progress: f64,
    /// Start time, seconds since the Unix epoch.
    pub started: u64,
    /// End time, once finished.
    pub finished: Option<u64>,
    /// The result of a successful job.
    pub result: Option<serde_json::Value>,
    /// The error of a failed job.
    pub error: Option<String>,
}

/// A job. See the module documentation.
#[derive(Debug)]
pub struct Job {
    id: String,
    kind: String,
    description: String,
    started: u64,
    done: AtomicU64,
    total: AtomicU64,
    cancel: AtomicBool,
    end: Mutex<Option<End>>,
    ended: Condvar,
    /// For the duration figures (the start time above has whole seconds).
    started_at: std::time::Instant,
    log: JobLog,
}

#[derive(Clone, Debug)]
struct End {
    state: JobState,
    at: u64,
    result: Option<serde_json::Value>,
    error: Option<String>,
    /// Size of the job's record, for the byte budget of kept jobs.
    bytes: usize,
}

/// Longest description kept; longer ones are cut (they quote names from requests).
pub const MAX_DESCRIPTION_BYTES: usize = 256;

/// Longest error message kept in a job's record.
pub const MAX_ERROR_BYTES: usize = 512;

/// Largest result kept in a job's record (encoded); a larger one is replaced by a note.
pub const MAX_RESULT_BYTES: usize = 32 << 10;

/// Bytes that the records of finished jobs may take together (besides [`MAX_FINISHED_JOBS`]).
pub const MAX_FINISHED_JOB_BYTES: usize = 8 << 20;

/// Largest job record read back from disk.
const MAX_RECORD_FILE_BYTES: u64 = 1 << 20;

/// `text` cut to at most `max` bytes at a character boundary, marked when cut.
pub fn cut_text(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// A result small enough to keep.
fn bounded_result(v: serde_json::Value) -> serde_json::Value {
    let len = serde_json::to_vec(&v).map(|b| b.len()).unwrap_or(0);
    if len <= MAX_RESULT_BYTES {
        v
    } else {
        serde_json::json!({
            "truncated": true,
            "note": format!("The result ({len} bytes) was too large to keep"),
        })
    }
}

/// The bytes a status takes as a record, roughly.
fn record_bytes(s: &JobStatus) -> usize {
    let result = s
        .result
        .as_ref()
        .and_then(|r| serde_json::to_vec(r).ok())
        .map_or(0, |b| b.len());
    256 + s.description.len() + s.error.as_ref().map_or(0, String::len) + result
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Job {
    /// The job's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether it has not ended yet (without building its whole status).
    pub fn is_running(&self) -> bool {
        self.end.lock().unwrap_or_else(|p| p.into_inner()).is_none()
    }

    /// A snapshot of its status.
    pub fn status(&self) -> JobStatus {
        let end = self.end.lock().unwrap_or_else(|p| p.into_inner()).clone();
        self.status_with(end)
    }

    fn status_with(&self, end: Option<End>) -> JobStatus {
        let done = self.done.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        let finished_ok = matches!(end.as_ref().map(|e| e.state), Some(JobState::Succeeded));
        let progress = if finished_ok {
            100.0
        } else if total > 0 {
            (done as f64 * 100.0 / total as f64).min(100.0)
        } else {
            0.0
        };
        JobStatus {
            id: self.id.clone(),
            kind: self.kind.clone(),
            description: self.description.clone(),
            state: end.as_ref().map_or(JobState::Running, |e| e.state),
            bytes_done: done,
            bytes_total: total,
            progress,
            started: self.started,
            finished: end.as_ref().map(|e| e.at),
            result: end.as_ref().and_then(|e| e.result.clone()),
            error: end.and_then(|e| e.error),
        }
    }

    /// Asks the job to stop; it notices at its next check.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Blocks until the job has ended and returns its final status.
    pub fn wait(&self) -> JobStatus {
        let mut end = self.end.lock().unwrap_or_else(|p| p.into_inner());
        while end.is_none() {
            end = self.ended.wait(end).unwrap_or_else(|p| p.into_inner());
        }
        drop(end);
        self.status()
    }

    /// Blocks until the job has ended or `timeout` passed.
    fn wait_for(&self, timeout: std::time::Duration) {
        let end = self.end.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self
            .ended
            .wait_timeout_while(end, timeout, |e| e.is_none())
            .map_err(|p| p.into_inner());
    }

    /// Records the outcome (through `record`, before anyone waiting can see it) and wakes waiters.
    fn finish(&self, outcome: ServiceResult<serde_json::Value>, record: impl FnOnce(&JobStatus)) {
        let mut end = match outcome {
            Ok(v) => End {
                state: JobState::Succeeded,
                at: now(),
                result: Some(bounded_result(v)),
                error: None,
                bytes: 0,
            },
            Err(
                ServiceError::Cancelled
                | ServiceError::Storage(strata_storage::StorageError::Cancelled),
            ) => End {
                state: JobState::Cancelled,
                at: now(),
                result: None,
                error: Some("Cancelled".into()),
                bytes: 0,
            },
            Err(e) => End {
                state: JobState::Failed,
                at: now(),
                result: None,
                error: Some(cut_text(&e.to_string(), MAX_ERROR_BYTES)),
                bytes: 0,
            },
        };
        self.log.push(&match (&end.state, &end.error) {
            (JobState::Succeeded, _) => "Succeeded".to_string(),
            (_, Some(e)) => format!("{:?}: {e}", end.state),
            (state, None) => format!("{state:?}"),
        });
        let status = self.status_with(Some(end.clone()));
        end.bytes = record_bytes(&status);
        record(&status);
        *self.end.lock().unwrap_or_else(|p| p.into_inner()) = Some(end);
        self.ended.notify_all();
    }
}

/// A job's record file: its status and its log.
#[derive(Debug, Serialize, Deserialize)]
struct JobRecord {
    #[serde(flatten)]
    status: JobStatus,
    #[serde(default)]
    log: Vec<LogLine>,
}

/// What a job's work function sees: progress reporting and cancellation.
#[derive(Clone, Debug)]
pub struct JobContext {
    job: Arc<Job>,
}

impl JobContext {
    /// Sets the total number of bytes (for the percentage).
    pub fn set_total(&self, bytes: u64) {
        self.job.total.store(bytes, Ordering::Relaxed);
    }

    /// Sets the bytes processed so far.
    pub fn set_done(&self, bytes: u64) {
        self.job.done.store(bytes, Ordering::Relaxed);
        self.job
            .log
            .progress(bytes, self.job.total.load(Ordering::Relaxed));
    }

    /// Adds to the bytes processed.
    pub fn add_done(&self, bytes: u64) {
        let done = self.job.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.job
            .log
            .progress(done, self.job.total.load(Ordering::Relaxed));
    }

    /// Adds a line to the job's log.
    pub fn log(&self, message: &str) {
        self.job.log.push(message);
    }

    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.job.cancel.load(Ordering::Relaxed)
    }

    /// `Err(Cancelled)` once cancellation was requested.
    pub fn check_cancelled(&self) -> ServiceResult<()> {
        if self.is_cancelled() {
            Err(ServiceError::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// Jobs that may run at once; each is a thread doing I/O, and the machine has few cores.
pub const MAX_RUNNING_JOBS: usize = 16;

/// Finished jobs remembered (in memory and in `DATA/jobs`); older ones are forgotten.
pub const MAX_FINISHED_JOBS: usize = 500;

/// All jobs of a server (or of one CLI command).
#[derive(Debug)]
pub struct JobManager {
    jobs: Mutex<BTreeMap<String, Arc<Job>>>,
    /// Records of jobs from earlier runs, loaded at start.
    past: Mutex<BTreeMap<String, JobStatus>>,
    dir: Option<PathBuf>,
    counter: AtomicU64,
    /// Jobs finished since the start, and how long they took (for metrics).
    pub stats: JobStats,
}

impl JobManager {
    /// A manager that keeps records in `dir` (none: in memory only).
    pub fn new(dir: Option<PathBuf>) -> JobManager {
        let mut past = BTreeMap::new();
        if let Some(d) = &dir {
            for entry in std::fs::read_dir(d).into_iter().flatten().flatten() {
                if entry
                    .metadata()
                    .map_or(true, |m| m.len() > MAX_RECORD_FILE_BYTES)
                {
                    continue;
                }
                let Ok(text) = std::fs::read(entry.path()) else {
                    continue;
                };
                let Ok(mut st) = serde_json::from_slice::<JobStatus>(&text) else {
                    continue;
                };
                if st.state == JobState::Running {
                    st.state = JobState::Failed;
                    st.error = Some("Interrupted: the server stopped while the job ran".into());
                }
                past.insert(st.id.clone(), st);
            }
        }
        // Continue after the highest sequence number kept (older records may be forgotten).
        let counter = past
            .keys()
            .filter_map(|id| id.split('-').nth(1)?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        JobManager {
            jobs: Mutex::new(BTreeMap::new()),
            past: Mutex::new(past),
            dir,
            counter: AtomicU64::new(counter),
            stats: JobStats::default(),
        }
    }

    fn record(&self, status: &JobStatus, log: &JobLog) {
        if let Some(d) = &self.dir {
            let path = d.join(format!("{}.json", status.id));
            let record = JobRecord {
                status: status.clone(),
                log: log.lines(),
            };
            match serde_json::to_vec_pretty(&record) {
                Ok(text) => {
                    if let Err(e) = write_atomically(&path, &text) {
                        tracing::warn!(job = %status.id, error = %e, "could not record job");
                    }
                }
                Err(e) => tracing::warn!(job = %status.id, error = %e, "could not encode job"),
            }
        }
    }

    /// Finished jobs beyond the newest [`MAX_FINISHED_JOBS`], or beyond
    /// [`MAX_FINISHED_JOB_BYTES`] of records, are forgotten, record files too.
    fn forget_old(&self) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let mut past = self.past.lock().unwrap_or_else(|p| p.into_inner());
        // Newest first: by start time, then by the sequence number in the id (`job-N-…`).
        let key = |started: u64, id: &str, bytes: usize| {
            let seq = id
                .split('-')
                .nth(1)
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
            (std::cmp::Reverse((started, seq)), id.to_string(), bytes)
        };
        let mut finished: Vec<_> = past
            .values()
            .map(|s| key(s.started, &s.id, record_bytes(s)))
            .chain(jobs.values().filter_map(|j| {
                let bytes = j
                    .end
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()?
                    .bytes;
                Some(key(j.started, &j.id, bytes))
            }))
            .collect();
        finished.sort();
        let mut total = 0usize;
        for (n, (_, id, bytes)) in finished.into_iter().enumerate() {
            total = total.saturating_add(bytes);
            if n < MAX_FINISHED_JOBS && total <= MAX_FINISHED_JOB_BYTES {
                continue;
            }
            jobs.remove(&id);
            past.remove(&id);
            if let Some(d) = &self.dir {
                let _ = std::fs::remove_file(d.join(format!("{id}.json")));
            }
        }
    }

    /// Starts `work` as a job on its own thread and returns it at once; refused (429) while
    /// [`MAX_RUNNING_JOBS`] jobs run.
    pub fn spawn<F>(
        self: &Arc<Self>,
        kind: &str,
        description: String,
        work: F,
    ) -> ServiceResult<Arc<Job>>
    where
        F: FnOnce(&JobContext) -> ServiceResult<serde_json::Value> + Send + 'static,
    {
        self.forget_old();
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let running = jobs.values().filter(|j| j.is_running()).count();
        if running >= MAX_RUNNING_JOBS {
            return Err(ServiceError::TooManyJobs(MAX_RUNNING_JOBS));
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
        let mut suffix = [0u8; 3];
        let _ = getrandom::fill(&mut suffix);
        let id = format!(
            "job-{n}-{:02x}{:02x}{:02x}",
            suffix[0], suffix[1], suffix[2]
        );
        let job = Arc::new(Job {
            id: id.clone(),
            kind: kind.to_string(),
            description: cut_text(&description, MAX_DESCRIPTION_BYTES),
            started: now(),
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            cancel: AtomicBool::new(false),
            end: Mutex::new(None),
            ended: Condvar::new(),
            started_at: std::time::Instant::now(),
            log: JobLog::default(),
        });
        job.log.push(&format!("Started: {}", job.description));
        jobs.insert(id.clone(), job.clone());
        drop(jobs);
        self.record(&job.status(), &job.log);
        let ctx = JobContext { job: job.clone() };
        let manager = self.clone();
        std::thread::Builder::new()
            .name(format!("strata-{kind}"))
            .spawn(move || {
                let span = tracing::info_span!("job", id = %ctx.job.id, kind = %ctx.job.kind);
                let _enter = span.enter();
                tracing::info!(description = %ctx.job.description, "started");
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&ctx)))
                    .unwrap_or_else(|_| {
                        Err(ServiceError::internal(
                            "The job failed unexpectedly (a bug)",
                        ))
                    });
                if let Err(e) = &outcome {
                    tracing::warn!(error = %e, "ended with an error");
                } else {
                    tracing::info!("succeeded");
                }
                let took = ctx.job.started_at.elapsed();
                ctx.job.finish(outcome, |status| {
                    manager.record(status, &ctx.job.log);
                    manager.stats.observe(&status.kind, status.state, took);
                });
            })
            .map_err(|e| ServiceError::internal(format!("Starting a job thread: {e}")))?;
        Ok(job)
    }

    /// A job by id (running or finished in this run).
    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// A job's status by id, including jobs of earlier runs.
    pub fn status(&self, id: &str) -> ServiceResult<JobStatus> {
        if let Some(j) = self.get(id) {
            return Ok(j.status());
        }
        self.past
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| ServiceError::NotFound(format!("Job {id}")))
    }

    /// A job's log, including jobs of earlier runs.
    pub fn log(&self, id: &str) -> ServiceResult<Vec<LogLine>> {
        if let Some(j) = self.get(id) {
            return Ok(j.log.lines());
        }
        let known = self
            .past
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id);
        let (true, Some(dir)) = (known, &self.dir) else {
            return Err(ServiceError::NotFound(format!("Job {id}")));
        };
        // Only ids of records read at start get here: no path comes from the request.
        let path = dir.join(format!("{id}.json"));
        let text = std::fs::File::open(&path)
            .and_then(|f| {
                use std::io::Read;
                let mut text = Vec::new();
                f.take(MAX_RECORD_FILE_BYTES).read_to_end(&mut text)?;
                Ok(text)
            })
            .map_err(|e| ServiceError::internal(format!("Reading {}: {e}", path.display())))?;
        Ok(serde_json::from_slice::<JobRecord>(&text)
            .map(|r| r.log)
            .unwrap_or_default())
    }

    /// Every job's status, oldest first.
    pub fn list(&self) -> Vec<JobStatus> {
        let mut all: Vec<JobStatus> = self
            .past
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        all.extend(
            self.jobs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .map(|j| j.status()),
        );
        all.sort_by(|a, b| (a.started, &a.id).cmp(&(b.started, &b.id)));
        all
    }

    /// Asks every running job to stop (the server is shutting down).
    pub fn cancel_all(&self) {
        for j in self.jobs.lock().unwrap_or_else(|p| p.into_inner()).values() {
            if j.is_running() {
                j.cancel();
            }
        }
    }

    /// Waits until no job runs, at most `timeout`; whether none runs.
    pub fn wait_idle(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let running: Vec<Arc<Job>> = self
                .jobs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .filter(|j| j.is_running())
                .cloned()
                .collect();
            let Some(job) = running.first() else {
                return true;
            };
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            job.wait_for(deadline - now);
        }
    }

    /// Requests cancellation of a running job.
    pub fn cancel(&self, id: &str) -> ServiceResult<JobStatus> {
        let job = self
            .get(id)
            .ok_or_else(|| ServiceError::NotFound(format!("Running job {id}")))?;
        if !job.is_running() {
            return Err(ServiceError::Conflict(format!(
                "Job {id} has already finished"
            )));
        }
        job.cancel();
        Ok(job.status())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_job_reports_progress_and_keeps_its_result() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(JobManager::new(Some(dir.path().to_path_buf())));
        let job = m
            .spawn("test", "counting".into(), |ctx| {
                ctx.set_total(100);
                ctx.add_done(100);
                Ok(serde_json::json!({"answer": 42}))
            })
            .unwrap();
        let st = job.wait();
        assert_eq!(st.state, JobState::Succeeded);
        assert_eq!(st.result.unwrap()["answer"], 42);
        // A new manager on the same folder still knows it.
        let again = JobManager::new(Some(dir.path().to_path_buf()));
        assert_eq!(again.status(job.id()).unwrap().state, JobState::Succeeded);
    }

    #[test]
    fn running_jobs_are_capped_and_old_finished_ones_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(JobManager::new(Some(dir.path().to_path_buf())));
        let waiting: Vec<Arc<Job>> = (0..MAX_RUNNING_JOBS)
            .map(|_| {
                m.spawn("test", "waiting".into(), |ctx| loop {
                    ctx.check_cancelled()?;
                    std::thread::sleep(Duration::from_millis(2));
                })
                .unwrap()
            })
            .collect();
        let refused = m.spawn("test", "one too many".into(), |_| {
            Ok(serde_json::Value::Null)
        });
        assert_eq!(refused.unwrap_err().status(), 429);
        for j in &waiting {
            m.cancel(j.id()).unwrap();
            j.wait();
        }
        for _ in 0..MAX_FINISHED_JOBS + 20 {
            m.spawn("test", "quick".into(), |_| Ok(serde_json::Value::Null))
                .unwrap()
                .wait();
        }
        m.forget_old();
        assert_eq!(m.list().len(), MAX_FINISHED_JOBS);
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(
            files, MAX_FINISHED_JOBS,
            "records of forgotten jobs are removed"
        );
        assert!(
            m.status(waiting[0].id()).is_err(),
            "the oldest are forgotten first"
        );
    }

    #[test]
    fn records_are_bounded_in_size_and_in_total() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(JobManager::new(Some(dir.path().to_path_buf())));
        let long = "é".repeat(10_000);
        let failing = long.clone();
        let job = m
            .spawn("test", long.clone(), move |_| {
                Err(ServiceError::BadRequest(failing))
            })
            .unwrap();
        let st = job.wait();
        assert!(st.description.len() <= MAX_DESCRIPTION_BYTES);
        assert!(st.error.unwrap().len() <= MAX_ERROR_BYTES);
        let huge = m
            .spawn("test", "huge".into(), |_| {
                Ok(serde_json::json!({"x": "y".repeat(MAX_RESULT_BYTES * 4)}))
            })
            .unwrap()
            .wait();
        assert_eq!(huge.result.unwrap()["truncated"], true);
        // Results just under the limit: the byte budget, not the count, decides what is kept.
        let each = MAX_RESULT_BYTES - 1024;
        let n = MAX_FINISHED_JOB_BYTES / each + 20;
        for _ in 0..n {
            m.spawn("test", "big".into(), move |_| {
                Ok(serde_json::json!({"x": "y".repeat(each)}))
            })
            .unwrap()
            .wait();
        }
        m.forget_old();
        let kept = m.list();
        assert!(
            kept.len() < n && kept.len() < MAX_FINISHED_JOBS,
            "{}",
            kept.len()
        );
        let bytes: usize = kept.iter().map(record_bytes).sum();
        assert!(bytes <= MAX_FINISHED_JOB_BYTES, "{bytes}");
        let on_disk: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(on_disk <= 2 * MAX_FINISHED_JOB_BYTES as u64, "{on_disk}");
    }

    #[test]
    fn cancellation_is_noticed_and_reported() {
        let m = Arc::new(JobManager::new(None));
        let job = m
            .spawn("test", "waiting".into(), |ctx| loop {
                ctx.check_cancelled()?;
                std::thread::sleep(Duration::from_millis(5));
            })
            .unwrap();
        m.cancel(job.id()).unwrap();
        assert_eq!(job.wait().state, JobState::Cancelled);
        assert!(
            m.cancel(job.id()).is_err(),
            "a finished job cannot be cancelled"
        );
    }

    #[test]
    fn a_panicking_job_fails_instead_of_killing_the_server() {
        let m = Arc::new(JobManager::new(None));
        let job = m.spawn("test", "bug".into(), |_| panic!("boom")).unwrap();
        let st = job.wait();
        assert_eq!(st.state, JobState::Failed);
    }
}

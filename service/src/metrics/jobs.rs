//! Figures of the jobs that finished since the server started: how many by kind and outcome,
//! and how long they took. (The kept job records are bounded and forgotten over time, so they
//! cannot serve as counters.)

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use super::histogram::HistogramVec;
use super::text::{Kind, MetricWriter};
use crate::jobs::JobState;

/// Bucket bounds of job durations, in seconds.
const DURATION_BOUNDS: &[f64] = &[
    0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
];

/// Finished jobs by kind and outcome, and their durations by kind.
#[derive(Debug)]
pub struct JobStats {
    finished: Mutex<BTreeMap<(String, &'static str), u64>>,
    durations: HistogramVec,
}

impl Default for JobStats {
    fn default() -> Self {
        JobStats {
            finished: Mutex::new(BTreeMap::new()),
            durations: HistogramVec::new(DURATION_BOUNDS, &["kind"]),
        }
    }
}

fn state_label(state: JobState) -> &'static str {
    match state {
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

impl JobStats {
    /// Counts a job that ended in `state` after `took`.
    pub fn observe(&self, kind: &str, state: JobState, took: Duration) {
        *self
            .finished
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((kind.to_string(), state_label(state)))
            .or_default() += 1;
        self.durations.observe(&[kind], took.as_secs_f64());
    }

    /// Writes `strata_jobs_finished_total` and `strata_job_duration_seconds`.
    pub fn write(&self, w: &mut MetricWriter) {
        w.family(
            "strata_jobs_finished_total",
            Kind::Counter,
            "Jobs that ended since the server started, by kind and outcome.",
        );
        for ((kind, state), n) in self
            .finished
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            w.sample(
                "strata_jobs_finished_total",
                &[("kind", kind), ("state", state)],
                *n as f64,
            );
        }
        self.durations.write(
            w,
            "strata_job_duration_seconds",
            "How long jobs ran, from start to end, by kind.",
        );
    }
}

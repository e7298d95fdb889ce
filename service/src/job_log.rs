//! A job's log: timestamped lines for people (started, progress every 10%, what the work
//! reported, the outcome), bounded in lines and bytes, kept with the job's record.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Lines kept per job; beyond that the middle is dropped (the first and last lines stay).
pub const MAX_LOG_LINES: usize = 200;
/// Longest line kept.
pub const MAX_LINE_BYTES: usize = 512;

/// One line of a job's log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// What happened.
    pub message: String,
}

/// The log of a running job.
#[derive(Debug, Default)]
pub struct JobLog {
    lines: Mutex<Vec<LogLine>>,
    /// Lines dropped to stay within [`MAX_LOG_LINES`].
    dropped: Mutex<usize>,
    /// The last tenth of progress logged.
    decile: AtomicU8,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl JobLog {
    /// Adds a line.
    pub fn push(&self, message: &str) {
        let line = LogLine {
            at_ms: now_ms(),
            message: super::jobs::cut_text(message, MAX_LINE_BYTES),
        };
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        if lines.len() >= MAX_LOG_LINES {
            // Keep the first lines (what started) and make room at the end.
            lines.remove(MAX_LOG_LINES / 4);
            *self.dropped.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        }
        lines.push(line);
    }

    /// Logs progress when it enters a new tenth.
    pub fn progress(&self, done: u64, total: u64) {
        if total == 0 {
            return;
        }
        let decile = ((done.min(total) as u128 * 10) / total as u128) as u8;
        let last = self.decile.load(Ordering::Relaxed);
        if decile > last
            && self
                .decile
                .compare_exchange(last, decile, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.push(&format!(
                "{}% done ({} of {} bytes)",
                u32::from(decile) * 10,
                done.min(total),
                total
            ));
        }
    }

    /// The lines so far, with a note where lines were dropped.
    pub fn lines(&self) -> Vec<LogLine> {
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let dropped = *self.dropped.lock().unwrap_or_else(|p| p.into_inner());
        if dropped > 0 && lines.len() > MAX_LOG_LINES / 4 {
            let at_ms = lines[MAX_LOG_LINES / 4].at_ms;
            lines.insert(
                MAX_LOG_LINES / 4,
                LogLine {
                    at_ms,
                    message: format!("({dropped} lines left out)"),
                },
            );
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_logged_once_per_tenth_and_the_log_is_bounded() {
        let log = JobLog::default();
        log.push("started");
        for done in (0..=1000).step_by(7) {
            log.progress(done, 1000);
        }
        log.progress(1000, 1000);
        let lines = log.lines();
        let progress: Vec<_> = lines
            .iter()
            .filter(|l| l.message.contains("% done"))
            .collect();
        assert_eq!(progress.len(), 10, "{lines:?}");
        assert!(progress[9].message.starts_with("100% done"));
        for i in 0..1000 {
            log.push(&format!("line {i} {}", "x".repeat(2000)));
        }
        let lines = log.lines();
        assert_eq!(lines.len(), MAX_LOG_LINES + 1);
        assert_eq!(lines[0].message, "started");
        assert!(lines.iter().any(|l| l.message.contains("lines left out")));
        assert!(lines.iter().all(|l| l.message.len() <= MAX_LINE_BYTES));
        assert!(lines.last().unwrap().message.starts_with("line 999"));
    }
}

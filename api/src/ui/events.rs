//! `GET /api/events`: server-sent events with job progress, so the browser never polls.
//!
//! The stream opens with a `jobs` event holding the newest [`SNAPSHOT_JOBS`] jobs, then sends a
//! `jobs` event with the jobs whose status changed, at most every [`TICK`] (the server reads its
//! job table, in memory, that often while a client listens). It ends with an `end` event when
//! the session or token that opened it is no longer valid, and without one when the server
//! stops. A comment every 15 s keeps proxies from closing an idle stream.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Extension;
use futures_util::Stream;
use strata_service::jobs::{JobState, JobStatus};
use strata_service::Service;

use super::ServerFacts;
use crate::server::Caller;

/// Jobs in the first event.
pub const SNAPSHOT_JOBS: usize = 100;
/// How often changes are looked for.
pub const TICK: Duration = Duration::from_millis(500);
/// How often the credential is checked again.
const RECHECK: Duration = Duration::from_secs(2);

struct State_ {
    svc: Arc<Service>,
    caller: Option<Caller>,
    stopping: tokio_util::sync::CancellationToken,
    /// Each job's last sent status, as JSON.
    sent: HashMap<String, String>,
    first: bool,
    ended: bool,
    checked: Instant,
}

fn newest(mut jobs: Vec<JobStatus>, n: usize) -> Vec<JobStatus> {
    // Running jobs always; then the newest others.
    jobs.sort_by(|a, b| (b.started, &b.id).cmp(&(a.started, &a.id)));
    let (running, done): (Vec<_>, Vec<_>) =
        jobs.into_iter().partition(|j| j.state == JobState::Running);
    let room = n.saturating_sub(running.len());
    running
        .into_iter()
        .chain(done.into_iter().take(room))
        .collect()
}

impl State_ {
    /// The next event, waiting for a change.
    async fn next(&mut self) -> Option<Event> {
        if self.ended {
            return None;
        }
        loop {
            if !self.first {
                tokio::select! {
                    _ = tokio::time::sleep(TICK) => {}
                    _ = self.stopping.cancelled() => return None,
                }
            }
            if self.checked.elapsed() >= RECHECK {
                self.checked = Instant::now();
                let valid = match &self.caller {
                    Some(c) => c.still_valid(&self.svc),
                    None => true,
                };
                if !valid {
                    self.ended = true;
                    return Some(Event::default().event("end").data("signed-out"));
                }
            }
            let jobs = newest(self.svc.jobs.list(), SNAPSHOT_JOBS);
            let mut changed = Vec::new();
            for j in jobs {
                let text = serde_json::to_string(&j).unwrap_or_default();
                if self.sent.get(&j.id) != Some(&text) {
                    self.sent.insert(j.id.clone(), text.clone());
                    changed.push(text);
                }
            }
            if self.sent.len() > 4 * SNAPSHOT_JOBS {
                // Forget jobs no longer among the newest (they will not change again).
                self.sent.clear();
            }
            if self.first || !changed.is_empty() {
                self.first = false;
                return Some(
                    Event::default()
                        .event("jobs")
                        .data(format!("[{}]", changed.join(","))),
                );
            }
        }
    }
}

/// The event stream.
pub(crate) async fn stream(
    State(svc): State<Arc<Service>>,
    caller: Option<Extension<Caller>>,
    facts: Option<Extension<ServerFacts>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let state = State_ {
        svc,
        caller: caller.map(|Extension(c)| c),
        stopping: facts.map(|Extension(f)| f.stopping).unwrap_or_default(),
        sent: HashMap::new(),
        first: true,
        ended: false,
        checked: Instant::now(),
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        let ev = st.next().await?;
        Some((Ok(ev), st))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

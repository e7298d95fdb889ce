//! Progress and cancellation of the libraries' long operations, fed into a job.

use strata_storage::convert::ConvertProgress;

use super::jobs::JobContext;

/// Reports a library operation's progress to its job and passes cancellation back.
#[derive(Debug)]
pub struct JobProgress<'a> {
    ctx: &'a JobContext,
}

impl<'a> JobProgress<'a> {
    /// Progress of the job `ctx`.
    pub fn new(ctx: &'a JobContext) -> JobProgress<'a> {
        JobProgress { ctx }
    }
}

impl strata_backup::Progress for JobProgress<'_> {
    fn begin(&self, _phase: &str, total: u64) {
        self.ctx.set_total(total);
        self.ctx.set_done(0);
    }

    fn advance(&self, n: u64) {
        self.ctx.add_done(n);
    }

    fn finish(&self) {}

    fn cancelled(&self) -> bool {
        self.ctx.is_cancelled()
    }
}

impl ConvertProgress for JobProgress<'_> {
    fn progress(&self, done: u64, total: u64) {
        self.ctx.set_total(total);
        self.ctx.set_done(done);
    }

    fn cancelled(&self) -> bool {
        self.ctx.is_cancelled()
    }
}

//! Progress reporting: the library counts, the caller draws (the CLI uses progress bars).

/// Receives progress of a long operation. Called from the thread running the operation.
pub trait Progress: Sync {
    /// A phase starts with `total` units (bytes or chunks) to do.
    fn begin(&self, phase: &str, total: u64);
    /// `n` more units are done.
    fn advance(&self, n: u64);
    /// The phase is over.
    fn finish(&self);
    /// Whether the caller wants the operation to stop. Operations poll this between units and
    /// end with [`strata_storage::StorageError::Cancelled`], leaving nothing half-made visible.
    fn cancelled(&self) -> bool {
        false
    }
}

/// Progress that goes nowhere.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn begin(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

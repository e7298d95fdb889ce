//! Early write-out of a new image's dirty pages while a conversion runs.
//!
//! A target written through the page cache (`-t writeback`, the default) is flushed once, at
//! the end. Without help the kernel leaves the new image's pages dirty until that flush (the
//! background threshold is a share of the RAM, gigabytes here), so the final `fdatasync` waits
//! for the whole image to reach the disk after the copy is over. Every [`NUDGE_BYTES`] of
//! progress this asks the kernel to *start* writing out what is dirty
//! (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait for the disk), on a thread of
//! its own so that the copy never waits for it (ext4 allocates the delayed blocks in that call).
//! The disk then writes while the copy goes on and the final flush finds little left to do.
//!
//! Durability does not change: nothing is acknowledged by this, and the conversion still ends
//! with its flush. It only moves disk writes earlier.

use std::cell::Cell;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;

use super::ConvertProgress;

/// Progress between two requests to start write-out.
pub(super) const NUDGE_BYTES: u64 = 32 << 20;

/// Starts write-out of one file's dirty pages on request. See the module documentation.
pub(super) struct EarlyWriteout {
    nudge: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl EarlyWriteout {
    /// Starts the write-out thread for the file at `path`; `None` if the file cannot be opened
    /// or the thread not started (the conversion then runs without it).
    pub(super) fn start(path: &Path) -> Option<EarlyWriteout> {
        let file = File::open(path).ok()?;
        let (tx, rx) = sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("convert-writeout".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    // SAFETY: a plain system call on a descriptor this thread owns; it reads no
                    // user memory.
                    let r = unsafe {
                        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
                    };
                    if r != 0 {
                        // Only a hint: the final flush reports real write errors.
                        tracing::debug!(
                            error = %std::io::Error::last_os_error(),
                            "starting the early write-out failed"
                        );
                        return;
                    }
                }
            })
            .ok()?;
        Some(EarlyWriteout {
            nudge: Some(tx),
            thread: Some(thread),
        })
    }

    /// Asks for a write-out unless one is already asked for.
    fn nudge(&self) {
        if let Some(tx) = &self.nudge {
            // Full: one is asked for already; disconnected: the thread gave up (a hint only).
            let _ = tx.try_send(());
        }
    }
}

impl Drop for EarlyWriteout {
    fn drop(&mut self) {
        self.nudge.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Progress that nudges an [`EarlyWriteout`] every [`NUDGE_BYTES`], then passes on.
pub(super) struct WriteoutProgress<'a> {
    pub(super) inner: &'a dyn ConvertProgress,
    pub(super) writeout: Option<EarlyWriteout>,
    pub(super) last: Cell<u64>,
}

impl ConvertProgress for WriteoutProgress<'_> {
    fn progress(&self, done: u64, total: u64) {
        if let Some(w) = &self.writeout {
            if done >= self.last.get() + NUDGE_BYTES {
                self.last.set(done);
                w.nudge();
            }
        }
        self.inner.progress(done, total);
    }

    fn cancelled(&self) -> bool {
        self.inner.cancelled()
    }
}

//! Ctrl-C (SIGINT) and SIGTERM for the long-running local commands (convert, backup create,
//! restore and verify, OVA import): the first signal asks the operation to stop at its next
//! unit, and the library then ends with `StorageError::Cancelled` after removing what it had
//! staged — no hidden half-made image is left behind. The handler resets itself, so a second
//! Ctrl-C kills the process as usual.
//!
//! Written on libc's `sigaction` (already a dependency): the handler only stores to an atomic,
//! which is async-signal-safe; a signal crate would add a dependency for these few lines.

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// The exit status of a command stopped by a signal (128 + SIGINT, as shells report it).
pub const EXIT_STATUS: u8 = 130;

extern "C" fn on_signal(_signal: libc::c_int) {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Routes the next SIGINT or SIGTERM to [`requested`] instead of ending the process.
pub fn install() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `sigaction` is given a zero-initialised, then filled, `struct sigaction` that
        // lives for the call; the handler is an `extern "C"` function that only stores to a
        // static atomic (async-signal-safe). SA_RESTART keeps blocking calls from failing with
        // EINTR; SA_RESETHAND restores the default action after the first signal.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART | libc::SA_RESETHAND;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
                tracing::warn!(signal, "cannot install the interrupt handler");
            }
        }
    }
}

/// Whether SIGINT or SIGTERM arrived since [`install`].
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Conversion progress without a bar, through which Ctrl-C still stops the conversion.
#[derive(Debug)]
pub struct Quiet;

impl strata_storage::convert::ConvertProgress for Quiet {
    fn progress(&self, _done: u64, _total: u64) {}

    fn cancelled(&self) -> bool {
        requested()
    }
}

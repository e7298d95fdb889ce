//! The device thread: starts devices (opens their I/O queues, spawns their workers) when the
//! guest's driver sets DRIVER_OK, on behalf of the vCPU thread that took the register write.
//! The vCPU waits for the answer, so the guest sees the same register semantics as when the
//! vCPU did it itself; only the device thread's filter has to allow thread creation and
//! io_uring setup.

use std::sync::mpsc::{channel, sync_channel, Sender};
use std::sync::{Mutex, OnceLock};

use super::{enter, Role};

type Job = Box<dyn FnOnce() + Send>;

static DEVICE_THREAD: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();

/// Starts the process's device thread; from then on [`on_device_thread`] runs its jobs there.
pub fn start_device_thread() -> std::io::Result<()> {
    let (tx, rx) = channel::<Job>();
    std::thread::Builder::new()
        .name("devices".into())
        .spawn(move || {
            enter(Role::DeviceManager);
            for job in rx {
                job();
            }
        })?;
    DEVICE_THREAD
        .set(Mutex::new(tx))
        .map_err(|_| std::io::Error::other("the device thread is running already"))
}

/// Runs `f` on the device thread and returns its result, or runs it here when the process has
/// no device thread. Fails only if the device thread is gone.
pub fn on_device_thread<R: Send + 'static>(
    f: impl FnOnce() -> R + Send + 'static,
) -> Result<R, String> {
    let Some(tx) = DEVICE_THREAD.get() else {
        return Ok(f());
    };
    let (rtx, rrx) = sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = rtx.send(f());
    });
    tx.lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(job)
        .map_err(|_| "the device thread has ended".to_string())?;
    rrx.recv()
        .map_err(|_| "the device thread dropped a job".to_string())
}

//! The VMM's worker thread for one virtqueue: waits with epoll on the queue's ioeventfd (the
//! driver's kick, caught by KVM without leaving the kernel), the I/O queue's completion eventfd
//! and a stop eventfd, and runs the [`QueueEngine`].

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use tracing::{error, info_span};
use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::chain::SharedMemory;
use super::engine::{QueueEngine, QueueStats, Signal};

const KICK: u64 = 0;
const COMPLETION: u64 = 1;
const STOP: u64 = 2;

/// A running worker.
#[derive(Debug)]
pub struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<QueueStats>>,
}

impl Worker {
    /// Starts a thread serving `queue` with `engine`.
    pub fn spawn(
        name: String,
        mut engine: QueueEngine,
        mut queue: Queue,
        mem: SharedMemory,
        kick: EventFd,
        signal: Arc<dyn Signal>,
    ) -> std::io::Result<Worker> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stop_theirs = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let _span = info_span!("virtio-blk", queue = %name).entered();
                if let Err(e) = serve(&mut engine, &mut queue, &mem, &kick, &stop_theirs, &*signal)
                {
                    error!("virtqueue worker stopped: {e}");
                }
                // Dropping the engine drains its I/O queue before the memory Arc goes.
                let stats = engine.stats();
                drop(engine);
                stats
            })?;
        Ok(Worker {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the worker (in-flight I/O is drained) and returns its counters.
    pub fn stop(mut self) -> QueueStats {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> QueueStats {
        let _ = self.stop.write(1);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop_inner();
        }
    }
}

fn serve(
    engine: &mut QueueEngine,
    queue: &mut Queue,
    mem: &SharedMemory,
    kick: &EventFd,
    stop: &EventFd,
    signal: &dyn Signal,
) -> std::io::Result<()> {
    let epoll = Epoll::new()?;
    let completion = engine.completion_fd().clone();
    for (fd, token) in [
        (kick.as_raw_fd(), KICK),
        (completion.as_raw_fd(), COMPLETION),
        (stop.as_raw_fd(), STOP),
    ] {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )?;
    }
    // The driver may have queued requests before the device started.
    if engine.process_avail(queue, mem) {
        signal.signal_used();
    }
    let mut events = [EpollEvent::default(); 3];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for ev in &events[..n] {
            let interrupt = match ev.data() {
                KICK => {
                    let _ = kick.read();
                    engine.process_avail(queue, mem)
                }
                COMPLETION => engine.process_completions(queue, mem),
                _ => return Ok(()),
            };
            if interrupt {
                signal.signal_used();
            }
        }
    }
}

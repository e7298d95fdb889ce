//! The thread-pool engine: worker threads doing positional system calls.
//!
//! Each queue owns its workers (as many as its depth, up to 64), a job list and a completion
//! list. Submitted requests are staged and handed to the workers at commit; a worker runs one
//! request with `pread`/`pwrite`/`fdatasync`/`fallocate` and posts its completion, signalling the
//! queue's eventfd. Dropping the queue lets the workers finish what they hold and joins them, so
//! no buffer is freed while a system call may still use it.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::error::{Result, StorageError};
use crate::io::file::FileHandle;
use crate::io::{check_range, notify, Completion, IoQueue, Op, QueueFull, QueueOptions, Request};

/// Times an idle worker yields before sleeping on the job list.
const IDLE_YIELDS: u32 = 20;

/// Most worker threads one queue starts.
pub const MAX_WORKERS: usize = 64;

#[derive(Default)]
struct Jobs {
    queue: VecDeque<Request>,
    /// Workers asleep on `job_ready`: a submission wakes one only when some are (a condvar
    /// notification is a system call even when nobody waits).
    idle: usize,
    shutdown: bool,
}

#[derive(Default)]
struct Done {
    list: Vec<Completion>,
    /// Whether the consumer is asleep in `wait`.
    waiting: bool,
}

struct Shared {
    file: Arc<FileHandle>,
    jobs: Mutex<Jobs>,
    job_ready: Condvar,
    done: Mutex<Done>,
    done_ready: Condvar,
    notifier: Option<Arc<EventFd>>,
    /// Length of the job list, readable without its lock by yielding workers.
    queued: AtomicUsize,
}

use crate::sync::lock;

/// A queue on the thread-pool engine. See the module documentation.
pub struct ThreadQueue {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    staged: Vec<Request>,
    in_flight: usize,
    depth: usize,
    submit_batch: usize,
}

impl fmt::Debug for ThreadQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThreadQueue")
            .field("file", &self.shared.file.name())
            .field("depth", &self.depth)
            .field("workers", &self.workers.len())
            .finish()
    }
}

impl ThreadQueue {
    /// Starts a queue with `min(depth, MAX_WORKERS)` workers on `file`.
    pub fn new(file: Arc<FileHandle>, opts: &QueueOptions) -> Result<ThreadQueue> {
        let depth = opts.depth.max(1);
        let shared = Arc::new(Shared {
            file,
            jobs: Mutex::new(Jobs::default()),
            job_ready: Condvar::new(),
            done: Mutex::new(Done::default()),
            done_ready: Condvar::new(),
            notifier: opts.notifier.clone(),
            queued: AtomicUsize::new(0),
        });
        let mut workers = Vec::new();
        for i in 0..depth.min(MAX_WORKERS) {
            let s = shared.clone();
            let h = std::thread::Builder::new()
                .name(format!("strata-io-{i}"))
                .stack_size(256 * 1024)
                .spawn(move || worker(&s))
                .map_err(|e| StorageError::io("Starting an I/O worker thread", e))?;
            workers.push(h);
        }
        Ok(ThreadQueue {
            shared,
            workers,
            staged: Vec::new(),
            in_flight: 0,
            depth,
            submit_batch: opts.submit_batch.max(1),
        })
    }

    fn post(&self, c: Completion) {
        lock(&self.shared.done).list.push(c);
        notify(self.shared.notifier.as_ref());
    }
}

fn worker(s: &Shared) {
    loop {
        // A finished worker yields a few times before sleeping: the consumer usually submits the
        // next request within microseconds, and taking it without a futex sleep and wake-up
        // measured 10-15% more IOPS on two cores (benches/RESULTS.md).
        for _ in 0..IDLE_YIELDS {
            if s.queued.load(Ordering::Relaxed) > 0 {
                break;
            }
            std::thread::yield_now();
        }
        let mut req = {
            let mut jobs = lock(&s.jobs);
            loop {
                if let Some(r) = jobs.queue.pop_front() {
                    s.queued.fetch_sub(1, Ordering::Relaxed);
                    break r;
                }
                if jobs.shutdown {
                    return;
                }
                jobs.idle += 1;
                jobs = crate::sync::wait(&s.job_ready, jobs);
                jobs.idle -= 1;
            }
        };
        let result = s.file.execute(&mut req.op);
        let wake = {
            let mut done = lock(&s.done);
            done.list.push(Completion::of(req, result));
            done.waiting
        };
        if wake {
            s.done_ready.notify_one();
        }
        notify(s.notifier.as_ref());
    }
}

impl IoQueue for ThreadQueue {
    fn depth(&self) -> usize {
        self.depth
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn submit(&mut self, req: Request) -> std::result::Result<(), QueueFull> {
        if self.in_flight >= self.depth {
            return Err(QueueFull(req));
        }
        self.in_flight += 1;
        let file = &self.shared.file;
        let early = if let Err(e) = check_range(&req.op, file.size()) {
            Some(Err(e))
        } else if !matches!(req.op, Op::Read { .. } | Op::Flush) && file.is_read_only() {
            Some(Err(StorageError::ReadOnly(file.name().to_string())))
        } else if req.op.range().is_some_and(|(_, len)| len == 0) {
            Some(Ok(0))
        } else {
            None
        };
        match early {
            Some(r) => self.post(Completion::of(req, r)),
            None => {
                self.staged.push(req);
                if self.staged.len() >= self.submit_batch {
                    // Committing only hands jobs to the workers; it cannot fail.
                    let _ = self.commit();
                }
            }
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        if self.staged.is_empty() {
            return Ok(());
        }
        let n = self.staged.len();
        let idle = {
            let mut jobs = lock(&self.shared.jobs);
            jobs.queue.extend(self.staged.drain(..));
            self.shared.queued.fetch_add(n, Ordering::Relaxed);
            jobs.idle
        };
        if n == 1 && idle > 0 {
            self.shared.job_ready.notify_one();
        } else if idle > 0 {
            self.shared.job_ready.notify_all();
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        let mut done = lock(&self.shared.done);
        let n = done.list.len();
        out.append(&mut done.list);
        self.in_flight -= n;
        n
    }

    fn wait(&mut self, timeout: Option<Duration>) -> Result<()> {
        self.commit()?;
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut done = lock(&self.shared.done);
        done.waiting = true;
        while done.list.is_empty() && self.in_flight > self.staged.len() {
            match deadline {
                None => done = crate::sync::wait(&self.shared.done_ready, done),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        break;
                    }
                    done = crate::sync::wait_timeout(&self.shared.done_ready, done, d - now);
                }
            }
        }
        done.waiting = false;
        Ok(())
    }

    fn notifier(&self) -> Option<&Arc<EventFd>> {
        self.shared.notifier.as_ref()
    }
}

impl Drop for ThreadQueue {
    fn drop(&mut self) {
        // Workers finish the jobs already handed to them; staged ones never started.
        lock(&self.shared.jobs).shutdown = true;
        self.shared.job_ready.notify_all();
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

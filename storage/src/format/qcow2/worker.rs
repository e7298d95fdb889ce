//! The per-image metadata worker: a thread that does the metadata I/O queues must not do under
//! the metadata lock — write-backs for guest flushes, write-backs that make room in full caches,
//! and growing the file ahead of allocations. It starts with the first job.
//!
//! Queues post jobs ([`Worker::post`]) and park the pieces waiting for them; flush requests get
//! their completion through the queue's [`Mailbox`]. After every batch of jobs the worker bumps
//! the image's generation and signals the queues that registered with the metadata
//! ([`Meta::wait_for`](super::meta::Meta::wait_for)), which then retry their parked work.
//!
//! Write-backs and file growth of one image never overlap: whoever runs them — this worker, a
//! control-plane flush, a control-plane operation that rewrites metadata — holds the image's
//! write-back lock ([`Core::control`]); no data path ever takes it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use crate::device::SharedFile;
use crate::error::{Result, StorageError};
use crate::io::stack::wake::Generation;
use crate::sync::{lock, lock_meta};

use super::meta::Meta;
use super::writeback::writeback_unlocked;

/// Completed flushes for one queue, posted by the worker.
#[derive(Debug)]
pub(crate) struct Mailbox {
    done: Mutex<Vec<(u64, Result<()>)>>,
    /// Flushes posted and not yet taken back.
    pending: AtomicUsize,
    efd: Option<Arc<EventFd>>,
}

impl Mailbox {
    /// A mailbox that signals `efd` on delivery.
    pub(crate) fn new(efd: Option<Arc<EventFd>>) -> Mailbox {
        Mailbox {
            done: Mutex::new(Vec::new()),
            pending: AtomicUsize::new(0),
            efd,
        }
    }

    /// Flushes posted and not yet taken back.
    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Takes the delivered completions: `(tag, result)`.
    pub(crate) fn take(&self) -> Vec<(u64, Result<()>)> {
        let v = std::mem::take(&mut *lock(&self.done));
        self.pending.fetch_sub(v.len(), Ordering::AcqRel);
        v
    }

    fn deliver(&self, tag: u64, r: Result<()>) {
        lock(&self.done).push((tag, r));
        crate::io::notify(self.efd.as_ref());
    }
}

/// A flush to complete through `mailbox`.
#[derive(Debug)]
pub(crate) struct Reply {
    mailbox: Arc<Mailbox>,
    tag: u64,
}

impl Reply {
    /// A flush request `tag` of the queue owning `mailbox`.
    pub(crate) fn new(mailbox: &Arc<Mailbox>, tag: u64) -> Reply {
        mailbox.pending.fetch_add(1, Ordering::AcqRel);
        Reply {
            mailbox: mailbox.clone(),
            tag,
        }
    }
}

/// A job for the worker.
#[derive(Debug)]
pub(crate) enum Post {
    /// Write back everything dirty.
    Writeback,
    /// Write back and sync, then complete this flush.
    Flush(Reply),
    /// Grow the file to at least this length.
    Grow(u64),
}

#[derive(Debug, Default)]
struct Jobs {
    writeback: bool,
    replies: Vec<Reply>,
    grow: u64,
    stop: bool,
}

impl Jobs {
    fn any(&self) -> bool {
        self.writeback || !self.replies.is_empty() || self.grow > 0
    }
}

/// What the worker shares with the image and its queues.
#[derive(Debug)]
pub(crate) struct Core {
    /// The metadata. See `meta.rs`.
    pub meta: Mutex<Meta>,
    /// The image file.
    pub file: SharedFile,
    /// The image's name, for messages.
    pub name: String,
    /// Bumped whenever parked work may proceed (an allocation, a table read or a job ended).
    pub gen: Generation,
    /// Serialises write-backs, file growth and control-plane rewrites of the metadata.
    writeback: Mutex<()>,
    jobs: Mutex<Jobs>,
    job_ready: Condvar,
}

impl Core {
    /// Wraps opened metadata.
    pub(crate) fn new(meta: Meta, file: SharedFile, name: String) -> Core {
        Core {
            meta: Mutex::new(meta),
            file,
            name,
            gen: Generation::default(),
            writeback: Mutex::new(()),
            jobs: Mutex::new(Jobs::default()),
            job_ready: Condvar::new(),
        }
    }

    /// Locks the metadata; a poisoned lock means the image failed.
    pub(crate) fn meta(&self) -> Result<MutexGuard<'_, Meta>> {
        lock_meta(&self.meta, format_args!("qcow2 image {}", self.name))
    }

    /// Takes the write-back lock, then the metadata lock: for control-plane operations.
    pub(crate) fn control(&self) -> Result<(MutexGuard<'_, ()>, MutexGuard<'_, Meta>)> {
        let wb = lock(&self.writeback);
        let m = self.meta()?;
        Ok((wb, m))
    }

    /// Writes everything dirty back and syncs, holding no lock across I/O but the write-back
    /// lock: a flush that does not stop the queues.
    pub(crate) fn flush(&self) -> Result<()> {
        let _wb = lock(&self.writeback);
        writeback_unlocked(&self.meta, self.file.as_ref(), &self.name)?;
        self.file.sync_data()
    }

    /// Grows the file to `len` if it is shorter (write-back lock held by the caller).
    fn grow(&self, len: u64) -> Result<()> {
        let current = self.meta()?.file_len();
        if len <= current {
            return Ok(());
        }
        let r = self.file.set_len(len);
        let mut m = self.meta()?;
        match r {
            Ok(()) => {
                m.refs.set_file_len(len);
                Ok(())
            }
            Err(e) => {
                m.refs.grow_failed();
                Err(e)
            }
        }
    }

    /// Runs one batch of jobs.
    fn run(&self, jobs: Jobs) {
        let mut failure: Option<StorageError> = None;
        let wb = lock(&self.writeback);
        if jobs.grow > 0 {
            if let Err(e) = self.grow(jobs.grow) {
                tracing::warn!(image = %self.name, error = %e, "growing the qcow2 file failed");
                failure = Some(e);
            }
        }
        let mut flushed = Ok(());
        if jobs.writeback || !jobs.replies.is_empty() {
            flushed =
                writeback_unlocked(&self.meta, self.file.as_ref(), &self.name).and_then(|wrote| {
                    if wrote || jobs.replies.is_empty() {
                        // A write-back that ran now, after these flushes came in, synced
                        // everything they cover.
                        Ok(())
                    } else {
                        // Nothing to write: one that ran before covers their metadata, not
                        // necessarily their data.
                        self.file.sync_data()
                    }
                });
            if let Err(e) = &flushed {
                tracing::warn!(image = %self.name, error = %e, "writing qcow2 metadata back failed");
                failure.get_or_insert(e.duplicate());
            }
        }
        drop(wb);
        for r in jobs.replies {
            let result = match &flushed {
                Ok(()) => Ok(()),
                Err(e) => Err(e.duplicate()),
            };
            r.mailbox.deliver(r.tag, result);
        }
        let mut waiters = match self.meta() {
            Ok(mut m) => {
                m.worker_error = failure;
                m.worker_waiters.take()
            }
            Err(_) => Default::default(),
        };
        self.gen.bump();
        waiters.wake(None);
    }
}

/// The worker thread of one image. See the module documentation.
#[derive(Debug)]
pub(crate) struct Worker {
    core: Arc<Core>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Worker {
    /// A worker for `core`, started by its first job.
    pub(crate) fn new(core: Arc<Core>) -> Worker {
        Worker {
            core,
            thread: Mutex::new(None),
        }
    }

    /// Posts a job.
    pub(crate) fn post(&self, job: Post) {
        {
            let mut j = lock(&self.core.jobs);
            match job {
                Post::Writeback => j.writeback = true,
                Post::Flush(r) => j.replies.push(r),
                Post::Grow(len) => j.grow = j.grow.max(len),
            }
        }
        self.start();
        self.core.job_ready.notify_one();
    }

    fn start(&self) {
        let mut t = lock(&self.thread);
        if t.is_some() {
            return;
        }
        let core = self.core.clone();
        match std::thread::Builder::new()
            .name("strata-qcow2-meta".into())
            .spawn(move || worker(&core))
        {
            Ok(h) => *t = Some(h),
            Err(e) => {
                // Run the jobs here instead: slower for this caller, but nothing waits forever.
                tracing::error!(image = %self.core.name, error = %e, "starting the qcow2 metadata worker failed");
                drop(t);
                let jobs = std::mem::take(&mut *lock(&self.core.jobs));
                self.core.run(jobs);
            }
        }
    }

    /// Stops the worker after the job it runs (jobs not started are dropped: their queues are
    /// gone) and waits for it.
    pub(crate) fn stop(&self) {
        lock(&self.core.jobs).stop = true;
        self.core.job_ready.notify_all();
        if let Some(h) = lock(&self.thread).take() {
            if h.join().is_err() {
                tracing::error!(image = %self.core.name, "the qcow2 metadata worker panicked");
            }
        }
    }
}

fn worker(core: &Core) {
    loop {
        let jobs = {
            let mut j = lock(&core.jobs);
            while !j.stop && !j.any() {
                j = crate::sync::wait(&core.job_ready, j);
            }
            if j.stop {
                return;
            }
            std::mem::take(&mut *j)
        };
        core.run(jobs);
    }
}

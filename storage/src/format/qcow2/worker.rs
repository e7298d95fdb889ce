//! The per-image metadata worker: the metadata I/O queues must not do under the metadata lock
//! — write-backs for guest flushes, write-backs that make room in full caches, and growing the
//! file ahead of allocations. It has two threads, each started by its first job: one writes
//! back, the other grows the file, so that allocations never wait for a write-back to end
//! before the file has room for them (with a guest flushing often, a write-back is nearly
//! always running).
//!
//! Queues post jobs ([`Worker::post`]) and park the pieces waiting for them; flush requests get
//! their completion through the queue's [`Mailbox`]. After every batch of jobs a thread bumps
//! the image's generation and signals the queues that registered with the metadata
//! ([`Meta::wait_for`](super::meta::Meta::wait_for)), which then retry their parked work.
//!
//! Write-backs of one image never overlap, nor does file growth with itself: whoever runs them
//! — these threads, a control-plane flush, a control-plane operation that rewrites metadata —
//! holds the image's write-back lock, or its growth lock; a control-plane operation takes both
//! ([`Core::control`]); no data path ever takes either. A write-back and file growth may run
//! at once: growth only lengthens the file past everything allocated, and a write-back only
//! writes inside it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use crate::device::SharedFile;
use crate::error::Result;
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

/// Which of the worker's threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lane {
    /// Write-backs and flushes.
    Writeback = 0,
    /// File growth.
    Growth = 1,
}

#[derive(Debug, Default)]
struct Jobs {
    writeback: bool,
    replies: Vec<Reply>,
    grow: u64,
    stop: bool,
}

impl Jobs {
    fn due(&self, lane: Lane) -> bool {
        match lane {
            Lane::Writeback => self.writeback || !self.replies.is_empty(),
            Lane::Growth => self.grow > 0,
        }
    }

    /// Takes the jobs of `lane`.
    fn take(&mut self, lane: Lane) -> Jobs {
        match lane {
            Lane::Writeback => Jobs {
                writeback: std::mem::take(&mut self.writeback),
                replies: std::mem::take(&mut self.replies),
                ..Jobs::default()
            },
            Lane::Growth => Jobs {
                grow: std::mem::take(&mut self.grow),
                ..Jobs::default()
            },
        }
    }
}

/// The locks a control-plane operation holds besides the metadata (see [`Core::control`]).
#[derive(Debug)]
pub(crate) struct ControlGuard<'a> {
    _writeback: MutexGuard<'a, ()>,
    _growth: MutexGuard<'a, ()>,
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
    /// Serialises write-backs and control-plane rewrites of the metadata.
    writeback: Mutex<()>,
    /// Serialises file growth and control-plane rewrites of the metadata.
    growth: Mutex<()>,
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
            growth: Mutex::new(()),
            jobs: Mutex::new(Jobs::default()),
            job_ready: Condvar::new(),
        }
    }

    /// Locks the metadata; a poisoned lock means the image failed.
    pub(crate) fn meta(&self) -> Result<MutexGuard<'_, Meta>> {
        lock_meta(&self.meta, format_args!("qcow2 image {}", self.name))
    }

    /// Takes the write-back lock, the growth lock, then the metadata lock: for control-plane
    /// operations.
    pub(crate) fn control(&self) -> Result<(ControlGuard<'_>, MutexGuard<'_, Meta>)> {
        let guard = ControlGuard {
            _writeback: lock(&self.writeback),
            _growth: lock(&self.growth),
        };
        let m = self.meta()?;
        Ok((guard, m))
    }

    /// Writes everything dirty back and syncs, holding no lock across I/O but the write-back
    /// lock: a flush that does not stop the queues.
    pub(crate) fn flush(&self) -> Result<()> {
        let _wb = lock(&self.writeback);
        if writeback_unlocked(&self.meta, self.file.as_ref(), &self.name)? {
            // The write-back synced the data file first and the image file last.
            return Ok(());
        }
        self.sync_data_file()?;
        self.file.sync_data()
    }

    /// Syncs the external data file, if the image has one (flushes that had no metadata to
    /// write still make the guest's data durable).
    fn sync_data_file(&self) -> Result<()> {
        let data = self.meta()?.data_file.clone();
        match data {
            Some(d) => d.sync_data(),
            None => Ok(()),
        }
    }

    /// Grows the file to `len` if it is shorter (growth lock held by the caller).
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

    /// Runs one batch of jobs of one lane.
    fn run(&self, jobs: Jobs) {
        if jobs.grow > 0 {
            let failure = {
                let _growth = lock(&self.growth);
                self.grow(jobs.grow).err()
            };
            if let Some(e) = &failure {
                tracing::warn!(image = %self.name, error = %e, "growing the qcow2 file failed");
            }
            // The next piece that needs the growth hears of its failure, once (see
            // `Meta::wait_for`); the one after asks for it again.
            // A later success does not clear it: someone must hear of every failure.
            self.wake(|m| {
                if failure.is_some() {
                    m.grow_error = failure;
                }
            });
        }
        if jobs.writeback || !jobs.replies.is_empty() {
            self.run_writeback(jobs.replies);
        }
    }

    /// Writes everything dirty back, then completes `replies`.
    fn run_writeback(&self, replies: Vec<Reply>) {
        let flushed = {
            let _wb = lock(&self.writeback);
            writeback_unlocked(&self.meta, self.file.as_ref(), &self.name).and_then(|wrote| {
                if wrote || replies.is_empty() {
                    // A write-back that ran now, after these flushes came in, synced
                    // everything they cover.
                    Ok(())
                } else {
                    // Nothing to write: one that ran before covers their metadata, not
                    // necessarily their data.
                    self.sync_data_file()?;
                    self.file.sync_data()
                }
            })
        };
        if let Err(e) = &flushed {
            tracing::warn!(image = %self.name, error = %e, "writing qcow2 metadata back failed");
        }
        let told = !replies.is_empty();
        // A failure of the worker's that nobody has heard of yet (a growth asked ahead of
        // need, a write-back for room) is reported by the next flush, as a failed background
        // write-back is by fsync.
        let pending = match (&flushed, told) {
            (Ok(()), true) => self
                .meta()
                .map(|mut m| m.grow_error.take().or_else(|| m.worker_error.take()))
                .unwrap_or_else(Some),
            _ => None,
        };
        for r in replies {
            let result = match (&flushed, &pending) {
                (Err(e), _) | (Ok(()), Some(e)) => Err(e.duplicate()),
                (Ok(()), None) => Ok(()),
            };
            r.mailbox.deliver(r.tag, result);
        }
        // The flushes got the error. A piece waiting for room hears of it too, once (see
        // `Meta::wait_for`), and so does the next flush or piece if nobody was told. A later
        // success does not clear it: someone must hear of every failure.
        self.wake(|m| {
            if let Some(e) = flushed
                .err()
                .filter(|_| !told || !m.worker_waiters.is_empty())
            {
                m.worker_error = Some(e);
            }
        });
    }

    /// Records a lane's outcome in the metadata and wakes the queues waiting for the worker.
    fn wake(&self, record: impl FnOnce(&mut Meta)) {
        let mut waiters = match self.meta() {
            Ok(mut m) => {
                record(&mut m);
                m.worker_waiters.take()
            }
            Err(_) => Default::default(),
        };
        self.gen.bump();
        waiters.wake(None);
    }
}

/// The worker threads of one image. See the module documentation.
#[derive(Debug)]
pub(crate) struct Worker {
    core: Arc<Core>,
    threads: Mutex<[Option<JoinHandle<()>>; 2]>,
}

impl Worker {
    /// A worker for `core`, started by its first job.
    pub(crate) fn new(core: Arc<Core>) -> Worker {
        Worker {
            core,
            threads: Mutex::new([None, None]),
        }
    }

    /// Posts a job.
    pub(crate) fn post(&self, job: Post) {
        let lane = {
            let mut j = lock(&self.core.jobs);
            match job {
                Post::Writeback => {
                    j.writeback = true;
                    Lane::Writeback
                }
                Post::Flush(r) => {
                    j.replies.push(r);
                    Lane::Writeback
                }
                Post::Grow(len) => {
                    j.grow = j.grow.max(len);
                    Lane::Growth
                }
            }
        };
        self.start(lane);
        self.core.job_ready.notify_all();
    }

    fn start(&self, lane: Lane) {
        let mut threads = lock(&self.threads);
        let slot = &mut threads[lane as usize];
        if slot.is_some() {
            return;
        }
        let core = self.core.clone();
        let name = match lane {
            Lane::Writeback => "strata-qcow2-meta",
            Lane::Growth => "strata-qcow2-grow",
        };
        match std::thread::Builder::new()
            .name(name.into())
            .spawn(move || worker(&core, lane))
        {
            Ok(h) => *slot = Some(h),
            Err(e) => {
                // Run the jobs here instead: slower for this caller, but nothing waits forever.
                tracing::error!(image = %self.core.name, error = %e, "starting a qcow2 metadata worker thread failed");
                drop(threads);
                let jobs = lock(&self.core.jobs).take(lane);
                self.core.run(jobs);
            }
        }
    }

    /// Stops the worker after the job it runs (jobs not started are dropped: their queues are
    /// gone) and waits for it.
    pub(crate) fn stop(&self) {
        lock(&self.core.jobs).stop = true;
        self.core.job_ready.notify_all();
        let handles = std::mem::take(&mut *lock(&self.threads));
        for h in handles.into_iter().flatten() {
            if h.join().is_err() {
                tracing::error!(image = %self.core.name, "a qcow2 metadata worker thread panicked");
            }
        }
    }
}

fn worker(core: &Core, lane: Lane) {
    loop {
        let jobs = {
            let mut j = lock(&core.jobs);
            while !j.stop && !j.due(lane) {
                j = crate::sync::wait(&core.job_ready, j);
            }
            if j.stop {
                return;
            }
            j.take(lane)
        };
        core.run(jobs);
    }
}

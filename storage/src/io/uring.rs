//! The io_uring engine: one ring per queue over a [`FileHandle`].
//!
//! Requests become submission entries in [`IoQueue::submit`] and reach the kernel in one
//! `io_uring_enter` at [`IoQueue::commit`] or [`IoQueue::wait`] (which submits and waits in the
//! same call). Each in-flight request lives in a slot indexed by the entry's `user_data`; the slot
//! owns the request's buffer and, for vectored requests, the iovec array, until the completion is
//! reaped — the kernel never sees memory that Rust could free. Short transfers are resubmitted for
//! the remainder. Dropping the queue waits for every in-flight entry (drain on drop).
//!
//! Flush is `IORING_OP_FSYNC` with `DATASYNC`; discard is a hole punch and write-zeroes a
//! `ZERO_RANGE` fallocate (a hole punch with `unmap`). Requests whose buffer or offset is not
//! aligned for O_DIRECT run synchronously through the file's buffered descriptor.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Result, StorageError};
use crate::io::file::{FileHandle, MAX_IOVECS};
use crate::io::{check_range, notify, Completion, IoQueue, Op, QueueFull, QueueOptions, Request};

/// Whether io_uring works here with every opcode the engine needs: `Err(reason)` if not.
/// Probed once per process. `STRATA_IO_URING=off` in the environment makes it unavailable (to
/// test the fallback).
pub fn availability() -> &'static std::result::Result<(), String> {
    static PROBE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    PROBE.get_or_init(probe)
}

/// Whether io_uring is available (see [`availability`]).
pub fn available() -> bool {
    availability().is_ok()
}

fn probe() -> std::result::Result<(), String> {
    if std::env::var_os("STRATA_IO_URING").is_some_and(|v| v == "off") {
        return Err("disabled by STRATA_IO_URING=off".into());
    }
    let ring = IoUring::new(2).map_err(|e| format!("io_uring_setup failed: {e}"))?;
    let mut p = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut p)
        .map_err(|e| format!("probing opcodes failed: {e}"))?;
    for (code, name) in [
        (opcode::Read::CODE, "READ"),
        (opcode::Write::CODE, "WRITE"),
        (opcode::Readv::CODE, "READV"),
        (opcode::Writev::CODE, "WRITEV"),
        (opcode::Fsync::CODE, "FSYNC"),
        (opcode::Fallocate::CODE, "FALLOCATE"),
    ] {
        if !p.is_supported(code) {
            return Err(format!("the kernel lacks IORING_OP_{name}"));
        }
    }
    Ok(())
}

struct Slot {
    tag: u64,
    op: Op,
    /// Bytes of a read or write already transferred (short transfers are resubmitted).
    done: usize,
    /// iovec array for vectored requests; lives as long as the slot.
    iov: Vec<libc::iovec>,
}

// SAFETY: the iovecs point into the slot's own `op` buffer (an `IoBuf`, which is `Send`); they
// are plain addresses handed to the kernel, never dereferenced by Rust, so moving the slot to
// another thread with its buffer is sound.
unsafe impl Send for Slot {}

/// A queue on the io_uring engine. See the module documentation.
pub struct UringQueue {
    ring: IoUring,
    file: Arc<FileHandle>,
    fixed_file: bool,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    /// Entries pushed to the submission queue and not yet handed to the kernel.
    unsubmitted: usize,
    /// Slots in use (entries in the ring).
    busy: usize,
    /// Completions produced without the ring (errors, unaligned requests, zero-length requests).
    ready: VecDeque<Completion>,
    depth: usize,
    submit_batch: usize,
    notifier: Option<Arc<EventFd>>,
}

impl fmt::Debug for UringQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringQueue")
            .field("file", &self.file.name())
            .field("depth", &self.depth)
            .field("busy", &self.busy)
            .finish()
    }
}

impl UringQueue {
    /// Opens a ring of `opts.depth` entries on `file`.
    pub fn new(file: Arc<FileHandle>, opts: &QueueOptions) -> Result<UringQueue> {
        let depth = opts.depth.clamp(1, 4096);
        let entries = depth.next_power_of_two() as u32;
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .build(entries)
            .or_else(|_| IoUring::new(entries))
            .map_err(|e| StorageError::io("Creating an io_uring", e))?;
        let fixed_file = ring.submitter().register_files(&[file.raw_fd()]).is_ok();
        if let Some(n) = &opts.notifier {
            ring.submitter()
                .register_eventfd(n.as_raw_fd())
                .map_err(|e| StorageError::io("Registering an eventfd with io_uring", e))?;
        }
        Ok(UringQueue {
            ring,
            file,
            fixed_file,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth as u32).rev().collect(),
            unsubmitted: 0,
            busy: 0,
            ready: VecDeque::new(),
            depth,
            submit_batch: opts.submit_batch.max(1),
            notifier: opts.notifier.clone(),
        })
    }

    fn complete_now(&mut self, req: Request, result: Result<u64>) {
        self.ready.push_back(Completion::of(req, result));
        notify(self.notifier.as_ref());
    }

    /// Builds the submission entry for the slot's remaining work (`None` for an empty slot).
    fn entry(&mut self, idx: u32) -> Option<squeue::Entry> {
        let fixed = self.fixed_file;
        let raw = self.file.raw_fd();
        let slot = self.slots.get_mut(idx as usize)?.as_mut()?;
        macro_rules! with_fd {
            ($make:expr) => {
                if fixed {
                    $make(types::Fixed(0))
                } else {
                    $make(types::Fd(raw))
                }
            };
        }
        let e = match &slot.op {
            Op::Read { offset, buf } | Op::Write { offset, buf } => {
                let write = matches!(slot.op, Op::Write { .. });
                let pos = *offset + slot.done as u64;
                let segs = buf.segments();
                if segs.len() == 1 {
                    let ptr = segs[0].ptr().wrapping_add(slot.done);
                    let len = (segs[0].len() - slot.done) as u32;
                    if write {
                        with_fd!(|fd| opcode::Write::new(fd, ptr, len).offset(pos).build())
                    } else {
                        with_fd!(|fd| opcode::Read::new(fd, ptr, len).offset(pos).build())
                    }
                } else {
                    slot.iov.clear();
                    let mut skip = slot.done;
                    for s in segs {
                        if slot.iov.len() == MAX_IOVECS {
                            break;
                        }
                        if skip >= s.len() {
                            skip -= s.len();
                            continue;
                        }
                        slot.iov.push(libc::iovec {
                            iov_base: s.ptr().wrapping_add(skip).cast(),
                            iov_len: s.len() - skip,
                        });
                        skip = 0;
                    }
                    let (p, n) = (slot.iov.as_ptr(), slot.iov.len() as u32);
                    if write {
                        with_fd!(|fd| opcode::Writev::new(fd, p, n).offset(pos).build())
                    } else {
                        with_fd!(|fd| opcode::Readv::new(fd, p, n).offset(pos).build())
                    }
                }
            }
            Op::Flush => with_fd!(|fd| opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()),
            Op::Discard { offset, len }
            | Op::WriteZeroes {
                offset,
                len,
                unmap: true,
            } => with_fd!(|fd| {
                opcode::Fallocate::new(fd, *len)
                    .offset(*offset)
                    .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                    .build()
            }),
            Op::WriteZeroes {
                offset,
                len,
                unmap: false,
            } => with_fd!(|fd| {
                opcode::Fallocate::new(fd, *len)
                    .offset(*offset)
                    .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                    .build()
            }),
        };
        Some(e.user_data(idx as u64))
    }

    /// Pushes the slot's entry, submitting first if the submission ring is full.
    fn push(&mut self, idx: u32) -> Result<()> {
        let Some(entry) = self.entry(idx) else {
            return Err(StorageError::Unavailable(format!(
                "io_uring slot {idx} has no request to submit"
            )));
        };
        loop {
            // SAFETY: the entry points at memory owned by slot `idx` (its buffer and iovec array),
            // which stays in place and alive until the completion for `idx` is reaped or the
            // queue is drained in `drop`.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                self.unsubmitted += 1;
                return Ok(());
            }
            self.submit_pending()?;
        }
    }

    fn submit_pending(&mut self) -> Result<()> {
        if self.unsubmitted == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(_) => {
                    self.unsubmitted = 0;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(StorageError::io("Submitting to io_uring", e)),
            }
        }
    }

    /// Handles one completion entry; returns a finished completion, or None if resubmitted.
    fn finish(&mut self, idx: u32, res: i32) -> Option<Completion> {
        let slot = self.slots[idx as usize].as_mut()?;
        if res == -libc::EINTR || res == -libc::EAGAIN {
            return self.resubmit(idx);
        }
        let outcome: Result<u64> = if res < 0 {
            let what = match slot.op {
                Op::Read { .. } => "Reading",
                Op::Write { .. } => "Writing",
                Op::Flush => "Flushing",
                Op::Discard { .. } => "Discarding",
                Op::WriteZeroes { .. } => "Zeroing",
            };
            if res == -libc::EOPNOTSUPP && matches!(slot.op, Op::WriteZeroes { unmap: false, .. }) {
                // The file system has no ZERO_RANGE: write zeros instead.
                let mut op = std::mem::replace(&mut slot.op, Op::Flush);
                let r = self.file.execute(&mut op);
                self.slots[idx as usize].as_mut()?.op = op;
                r
            } else {
                Err(StorageError::from_errno(
                    format!("{what} {}", self.file.name()),
                    -res,
                ))
            }
        } else {
            match &slot.op {
                Op::Read { buf, .. } | Op::Write { buf, .. } => {
                    slot.done += res as usize;
                    if slot.done < buf.len() {
                        if res == 0 {
                            Err(StorageError::corrupt(
                                self.file.name(),
                                "the file ended before the end of the device (was it truncated?)",
                            ))
                        } else {
                            return self.resubmit(idx);
                        }
                    } else {
                        Ok(buf.len() as u64)
                    }
                }
                _ => Ok(0),
            }
        };
        let slot = self.slots[idx as usize].take()?;
        self.free.push(idx);
        self.busy -= 1;
        let mut op = slot.op;
        Some(Completion {
            tag: slot.tag,
            buf: op.take_buf(),
            result: outcome,
        })
    }

    fn resubmit(&mut self, idx: u32) -> Option<Completion> {
        match self.push(idx) {
            Ok(()) => None,
            Err(e) => {
                let slot = self.slots[idx as usize].take()?;
                self.free.push(idx);
                self.busy -= 1;
                let mut op = slot.op;
                Some(Completion {
                    tag: slot.tag,
                    buf: op.take_buf(),
                    result: Err(e),
                })
            }
        }
    }

    fn reap_ring(&mut self, out: &mut Vec<Completion>) -> usize {
        let mut n = 0;
        loop {
            let cqe = match self.ring.completion().next() {
                Some(c) => c,
                None => break,
            };
            if let Some(c) = self.finish(cqe.user_data() as u32, cqe.result()) {
                out.push(c);
                n += 1;
            }
        }
        n
    }
}

impl IoQueue for UringQueue {
    fn depth(&self) -> usize {
        self.depth
    }

    fn in_flight(&self) -> usize {
        self.busy + self.ready.len()
    }

    fn submit(&mut self, req: Request) -> std::result::Result<(), QueueFull> {
        if self.in_flight() >= self.depth {
            return Err(QueueFull(req));
        }
        if let Err(e) = check_range(&req.op, self.file.size()) {
            self.complete_now(req, Err(e));
            return Ok(());
        }
        let writes = !matches!(req.op, Op::Read { .. } | Op::Flush);
        if writes && self.file.is_read_only() {
            let e = StorageError::ReadOnly(self.file.name().to_string());
            self.complete_now(req, Err(e));
            return Ok(());
        }
        match &req.op {
            Op::Read { offset, buf } | Op::Write { offset, buf } => {
                if buf.is_empty() {
                    self.complete_now(req, Ok(0));
                    return Ok(());
                }
                if !self.file.is_aligned(*offset, buf) {
                    let mut req = req;
                    let r = self.file.execute(&mut req.op);
                    self.complete_now(req, r);
                    return Ok(());
                }
            }
            Op::Discard { len, .. } | Op::WriteZeroes { len, .. } if *len == 0 => {
                self.complete_now(req, Ok(0));
                return Ok(());
            }
            _ => {}
        }
        let Some(idx) = self.free.pop() else {
            return Err(QueueFull(req));
        };
        self.slots[idx as usize] = Some(Slot {
            tag: req.tag,
            op: req.op,
            done: 0,
            iov: Vec::new(),
        });
        self.busy += 1;
        let pushed = self.push(idx).and_then(|()| {
            if self.unsubmitted >= self.submit_batch {
                self.submit_pending()
            } else {
                Ok(())
            }
        });
        if let Err(e) = pushed {
            if let Some(slot) = self.slots[idx as usize].take() {
                self.free.push(idx);
                self.busy -= 1;
                self.complete_now(
                    Request {
                        tag: slot.tag,
                        op: slot.op,
                    },
                    Err(e),
                );
            }
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        self.submit_pending()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        let mut n = self.ready.len();
        out.extend(self.ready.drain(..));
        n += self.reap_ring(out);
        // Resubmitted short transfers must reach the kernel even if the caller only polls.
        if self.unsubmitted > 0 {
            if let Err(e) = self.submit_pending() {
                tracing::warn!(file = self.file.name(), error = %e, "resubmitting a short transfer failed");
            }
        }
        n
    }

    fn wait(&mut self, timeout: Option<Duration>) -> Result<()> {
        if !self.ready.is_empty() || self.busy == 0 {
            return self.submit_pending();
        }
        if !self.ring.completion().is_empty() {
            return self.submit_pending();
        }
        let unsubmitted = self.unsubmitted;
        let r = match timeout {
            None => self.ring.submit_and_wait(1),
            Some(t) => {
                let ts = types::Timespec::new()
                    .sec(t.as_secs())
                    .nsec(t.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
        };
        match r {
            Ok(_) => {
                self.unsubmitted = 0;
                Ok(())
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR)) => {
                // Timed out or interrupted; entries were submitted unless none were pending.
                if unsubmitted > 0 && self.ring.submission().is_empty() {
                    self.unsubmitted = 0;
                }
                Ok(())
            }
            Err(e) => Err(StorageError::io("Waiting on io_uring", e)),
        }
    }

    fn notifier(&self) -> Option<&Arc<EventFd>> {
        self.notifier.as_ref()
    }
}

impl Drop for UringQueue {
    fn drop(&mut self) {
        // Drain: no buffer may be freed while the kernel could still write into it.
        let mut sink = Vec::new();
        while self.busy > 0 {
            let r = self.ring.submit_and_wait(1);
            self.reap_ring(&mut sink);
            sink.clear();
            if let Err(e) = r {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "io_uring failed while draining; leaking in-flight buffers");
                for slot in self.slots.iter_mut() {
                    if let Some(s) = slot.take() {
                        std::mem::forget(s);
                    }
                }
                return;
            }
        }
    }
}

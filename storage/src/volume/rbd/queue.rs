//! The data-plane queue of an RBD device: requests become librbd asynchronous calls
//! (`rbd_aio_readv`/`writev`/`flush`/`write_zeroes`); completions come back through the image's
//! event notification (see `hub.rs`).
//!
//! Each in-flight request lives in a slot that owns its buffer and iovec array until its
//! completion is reaped, so librbd never sees memory Rust could free. A request with more
//! segments than one call takes goes through a bounce buffer. Discard and write-zeroes both zero
//! exactly the range (librbd's plain discard skips partial objects below its discard
//! granularity, which would leave data a later read returns); write-zeroes without `unmap` keeps
//! the range allocated (librbd's thick-provision zeroing). Dropping the queue waits for its
//! requests.

use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::ffi::{self, errno_error, CompletionT};
use super::hub::{Done, Hub, Inbox};
use crate::error::{Result, StorageError};
use crate::io::{
    check_range, notify, Completion, IoBuf, IoQueue, Op, QueueFull, QueueOptions, Request,
};

/// Most iovecs one librbd call gets; more segments go through a bounce buffer.
const MAX_IOVECS: usize = 1024;
/// How long dropping a queue waits for librbd before leaking the in-flight buffers.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);

struct Slot {
    tag: u64,
    op: Op,
    /// The iovec array librbd reads (for reads and writes).
    iov: Vec<libc::iovec>,
    /// A contiguous copy for requests with too many segments.
    bounce: Option<IoBuf>,
}

// SAFETY: the iovecs point into the slot's own buffers (`op` or `bounce`), which move with it.
unsafe impl Send for Slot {}

/// A queue on an RBD image. See the module documentation.
pub struct RbdQueue {
    hub: Arc<Hub>,
    name: Arc<str>,
    read_only: bool,
    id: u32,
    inbox: Arc<Inbox>,
    /// Opened with the consumer's eventfd: completions arrive through the hub's pump thread.
    external: bool,
    notifier: Option<Arc<EventFd>>,
    depth: usize,
    submit_batch: usize,
    staged: Vec<Request>,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    busy: usize,
    ready: VecDeque<Completion>,
    mine: Vec<Done>,
    scratch: Vec<(u32, Done)>,
}

impl std::fmt::Debug for RbdQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdQueue")
            .field("image", &self.name)
            .field("busy", &self.busy)
            .finish()
    }
}

impl RbdQueue {
    pub(super) fn new(
        hub: Arc<Hub>,
        name: Arc<str>,
        read_only: bool,
        opts: &QueueOptions,
    ) -> Result<RbdQueue> {
        let (wake, external) = match &opts.notifier {
            Some(n) => (n.clone(), true),
            None => (
                Arc::new(
                    EventFd::new(EFD_NONBLOCK)
                        .map_err(|e| StorageError::io("Creating an eventfd", e))?,
                ),
                false,
            ),
        };
        if external {
            hub.ensure_pump()?;
        }
        let (id, inbox) = hub.add_queue(wake);
        let depth = opts.depth.max(1);
        Ok(RbdQueue {
            hub,
            name,
            read_only,
            id,
            inbox,
            external,
            notifier: opts.notifier.clone(),
            depth,
            submit_batch: opts.submit_batch.max(1),
            staged: Vec::new(),
            slots: Vec::new(),
            free: Vec::new(),
            busy: 0,
            ready: VecDeque::new(),
            mine: Vec::new(),
            scratch: Vec::new(),
        })
    }

    fn complete_now(&mut self, req: Request, result: Result<u64>) {
        self.ready.push_back(Completion::of(req, result));
        notify(self.notifier.as_ref());
    }

    fn take_slot(&mut self) -> u32 {
        match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        }
    }

    /// Hands one request to librbd (or completes it at once when it needs no I/O or fails).
    fn issue(&mut self, mut req: Request) {
        let api = self.hub.image().api();
        let image = self.hub.image().raw();
        // Requests that need no call.
        match &req.op {
            Op::Read { buf, .. } | Op::Write { buf, .. } if buf.is_empty() => {
                return self.complete_now(req, Ok(0));
            }
            Op::Discard { len: 0, .. } | Op::WriteZeroes { len: 0, .. } => {
                return self.complete_now(req, Ok(0));
            }
            _ => {}
        }
        let idx = self.take_slot();
        let arg = ((self.id as u64) << 32 | idx as u64) as usize as *mut c_void;
        let mut comp: CompletionT = std::ptr::null_mut();
        // SAFETY: valid out-pointer; no callback: completions are collected through the image's
        // event notification.
        let r = unsafe { (api.rbd_aio_create_completion)(arg, None, &mut comp) };
        if r < 0 {
            self.free.push(idx);
            let e = errno_error(-r, format!("Creating a completion for {}", self.name));
            return self.complete_now(req, Err(e));
        }
        let mut slot = Slot {
            tag: req.tag,
            op: std::mem::replace(&mut req.op, Op::Flush),
            iov: Vec::new(),
            bounce: None,
        };
        let write = matches!(slot.op, Op::Write { .. });
        let r = match &mut slot.op {
            Op::Read { offset, buf } | Op::Write { offset, buf } => {
                let offset = *offset;
                let target: &IoBuf = if buf.segments().len() > MAX_IOVECS {
                    let mut b = IoBuf::new(buf.len());
                    if write {
                        let mut bytes = vec![0u8; buf.len()];
                        buf.copy_to_slice(0, &mut bytes);
                        b.copy_from_slice(0, &bytes);
                    }
                    slot.bounce.insert(b)
                } else {
                    buf
                };
                slot.iov = target.segments().iter().map(|s| s.as_iovec()).collect();
                let call = if write {
                    api.rbd_aio_writev
                } else {
                    api.rbd_aio_readv
                };
                // SAFETY: the iovecs point into buffers the slot owns until the completion is
                // reaped (the slot is stored below before librbd can complete); at most
                // MAX_IOVECS of them.
                unsafe {
                    call(
                        image,
                        slot.iov.as_ptr(),
                        slot.iov.len() as i32,
                        offset,
                        comp,
                    )
                }
            }
            // SAFETY: valid image and completion.
            Op::Flush => unsafe { (api.rbd_aio_flush)(image, comp) },
            Op::Discard { offset, len }
            | Op::WriteZeroes {
                offset,
                len,
                unmap: true,
            } => {
                // SAFETY: valid image and completion; the range was checked.
                unsafe { (api.rbd_aio_write_zeroes)(image, *offset, *len as usize, comp, 0, 0) }
            }
            Op::WriteZeroes {
                offset,
                len,
                unmap: false,
            } => {
                // SAFETY: valid image and completion; the range was checked.
                unsafe {
                    (api.rbd_aio_write_zeroes)(
                        image,
                        *offset,
                        *len as usize,
                        comp,
                        ffi::WRITE_ZEROES_FLAG_THICK_PROVISION,
                        0,
                    )
                }
            }
        };
        if r < 0 {
            // SAFETY: librbd refused the request, so the completion is ours to release.
            unsafe { (api.rbd_aio_release)(comp) };
            self.free.push(idx);
            let e = self.error(&slot.op, -r as i32);
            req.op = slot.op;
            return self.complete_now(req, Err(e));
        }
        self.slots[idx as usize] = Some(slot);
        self.busy += 1;
    }

    fn error(&self, op: &Op, errno: i32) -> StorageError {
        let what = match op.range() {
            Some((off, len)) => format!("{} of {len} bytes at {off} on {}", op.name(), self.name),
            None => format!("{} of {}", op.name(), self.name),
        };
        errno_error(errno, what)
    }

    /// Turns finished librbd operations into completions.
    fn finish(&mut self, done: &[Done], out: &mut Vec<Completion>) -> usize {
        let mut n = 0;
        for d in done {
            let Some(mut slot) = self.slots.get_mut(d.slot as usize).and_then(Option::take) else {
                tracing::error!(slot = d.slot, image = %self.name, "an RBD completion for an empty slot");
                continue;
            };
            self.free.push(d.slot);
            self.busy -= 1;
            let result = if d.ret < 0 {
                Err(self.error(&slot.op, -d.ret as i32))
            } else {
                match &mut slot.op {
                    Op::Read { buf, .. } => {
                        if let Some(b) = &slot.bounce {
                            let mut bytes = vec![0u8; b.len()];
                            b.copy_to_slice(0, &mut bytes);
                            buf.copy_from_slice(0, &bytes);
                        }
                        Ok(buf.len() as u64)
                    }
                    Op::Write { buf, .. } => Ok(buf.len() as u64),
                    _ => Ok(0),
                }
            };
            out.push(Completion::of(
                Request {
                    tag: slot.tag,
                    op: slot.op,
                },
                result,
            ));
            n += 1;
        }
        n
    }

    /// Moves what the hub routed to us, and (without a pump thread for us) what librbd has
    /// finished, into `out`.
    fn collect(&mut self, out: &mut Vec<Completion>) -> usize {
        let mut mine = std::mem::take(&mut self.mine);
        {
            let mut inbox = crate::sync::lock(&self.inbox.done);
            mine.append(&mut inbox);
        }
        if !self.external && self.busy > mine.len() {
            self.hub.pump(Some(self.id), &mut mine, &mut self.scratch);
        }
        let n = self.finish(&mine, out);
        mine.clear();
        self.mine = mine;
        n
    }

    fn poll_wait(&self, timeout: Option<Duration>) -> Result<()> {
        let mut fds = [
            libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(self.inbox.wake.as_ref()),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.hub.event_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let n = if self.external { 1 } else { 2 };
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        // SAFETY: `n` valid pollfd entries.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), n, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(StorageError::io("Waiting for RBD completions", e));
            }
        }
        if fds[0].revents != 0 {
            // Reset the wake eventfd (a consumer calling `wait` on a queue opened with its own
            // eventfd is the one waiting on it); anything routed after this signals it again.
            let _ = self.inbox.wake.read();
        }
        Ok(())
    }
}

impl IoQueue for RbdQueue {
    fn depth(&self) -> usize {
        self.depth
    }

    fn in_flight(&self) -> usize {
        self.staged.len() + self.busy + self.ready.len()
    }

    fn submit(&mut self, req: Request) -> std::result::Result<(), QueueFull> {
        if self.in_flight() >= self.depth {
            return Err(QueueFull(req));
        }
        if let Err(e) = check_range(&req.op, self.hub.size()) {
            self.complete_now(req, Err(e));
            return Ok(());
        }
        let writes = !matches!(req.op, Op::Read { .. } | Op::Flush);
        if writes && self.read_only {
            let e = StorageError::ReadOnly(self.name.to_string());
            self.complete_now(req, Err(e));
            return Ok(());
        }
        self.staged.push(req);
        if self.staged.len() >= self.submit_batch {
            let _ = self.commit();
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        for req in std::mem::take(&mut self.staged) {
            self.issue(req);
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        let mut n = self.ready.len();
        out.extend(self.ready.drain(..));
        if self.busy > 0 {
            n += self.collect(out);
        }
        n
    }

    fn wait(&mut self, timeout: Option<Duration>) -> Result<()> {
        self.commit()?;
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if !self.ready.is_empty() || self.busy == 0 {
                return Ok(());
            }
            let mut got = Vec::new();
            if self.collect(&mut got) > 0 {
                self.ready.extend(got);
                return Ok(());
            }
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(l) => Some(l),
                    None => return Ok(()),
                },
                None => None,
            };
            self.poll_wait(left)?;
        }
    }

    fn notifier(&self) -> Option<&Arc<EventFd>> {
        self.notifier.as_ref()
    }
}

impl Drop for RbdQueue {
    fn drop(&mut self) {
        // Drain: librbd may write into a read's buffer until its completion arrives.
        self.staged.clear();
        let started = Instant::now();
        while self.busy > 0 {
            if started.elapsed() > DRAIN_LIMIT {
                tracing::error!(image = %self.name, in_flight = self.busy, "librbd did not finish; leaking the in-flight buffers");
                for s in self.slots.iter_mut() {
                    if let Some(s) = s.take() {
                        std::mem::forget(s);
                    }
                }
                // The hub must not route late completions to a reused queue number either:
                // keep the inbox registered (it only holds numbers).
                return;
            }
            let mut sink = Vec::new();
            if self.wait(Some(Duration::from_secs(1))).is_err() {
                // Not a poll for completions (those wake `wait` through the hub's eventfd):
                // `poll` itself failed, so back off briefly instead of spinning on the error
                // while the bounded drain gives librbd time to finish.
                std::thread::sleep(Duration::from_millis(10));
            }
            self.reap(&mut sink);
        }
        self.hub.remove_queue(self.id);
    }
}

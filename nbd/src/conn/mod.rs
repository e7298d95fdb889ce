//! Transmission: one connection's requests, served through one I/O queue of the export's device.
//!
//! The connection's thread owns the socket, the queue and everything in flight, and sleeps in
//! `poll(2)` on two descriptors: the socket (readable when requests may be taken, writable when
//! replies wait) and the queue's completion eventfd. Each pass reads as many requests as the
//! limits allow (submitting each at once), reaps completions into replies, and writes replies
//! with `writev`. Nothing is shared with other connections but the device itself.
//!
//! Memory is bounded per connection: at most [`Limits::max_requests`] requests in flight and,
//! once [`Limits::max_buffered`] bytes of payload are held by requests and unsent replies, no
//! new request is read until some are sent (back-pressure through TCP). A request the stream
//! cannot be followed past (bad magic, a write payload over the advertised maximum) closes the
//! connection after its requests in flight complete; other requests with bad values get an
//! error reply.

pub mod reply;
pub mod request;
pub mod status;

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use strata_storage::io::{Completion, IoBuf, IoQueue, QueueFull, QueueOptions, Request};
use strata_storage::StorageError;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::export::Export;
use crate::handshake::Negotiated;
use crate::options::MetaContext;
use crate::proto::{errno, RequestHeader, REQUEST_LEN};
use crate::server::Limits;
use crate::transport::Transport;

use reply::{BufPool, Reply};
use request::{decide, Decision, View};

/// Most slices one `writev` carries.
const MAX_IOVECS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read { df: bool },
    Write,
    Trim,
    WriteZeroes,
    Flush,
    Cache,
}

#[derive(Debug)]
struct Slot {
    handle: u64,
    kind: Kind,
    offset: u64,
    fua: bool,
    /// The FUA flush after a write was submitted.
    flushing: bool,
}

#[derive(Debug)]
enum Input {
    Header {
        buf: [u8; REQUEST_LEN],
        have: usize,
    },
    Payload {
        head: RequestHeader,
        decision: Decision,
        buf: IoBuf,
        have: usize,
    },
}

/// Why a connection stopped reading requests.
#[derive(Debug)]
enum Stop {
    /// The client disconnected (DISC or end of stream).
    Client,
    /// The client broke the protocol.
    Protocol(&'static str),
    /// The stream failed.
    Io(io::Error),
}

/// One connection in transmission. See the module documentation.
pub(crate) struct Connection {
    transport: Transport,
    export: Arc<Export>,
    structured: bool,
    contexts: Vec<MetaContext>,
    view: View,
    limits: Limits,
    queue: Box<dyn IoQueue>,
    notifier: Arc<EventFd>,
    input: Input,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    in_flight: usize,
    retry: VecDeque<Request>,
    out: VecDeque<Reply>,
    pool: BufPool,
    stop: Option<Stop>,
    /// The last read found nothing: wait for the socket before reading again.
    read_blocked: bool,
    /// Writing failed: the client is gone, replies are dropped.
    write_failed: bool,
    done: Vec<Completion>,
    errors_logged: u64,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("export", &self.export.name())
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

fn errno_of(e: &StorageError) -> u32 {
    match e {
        StorageError::ReadOnly(_) => errno::EPERM,
        StorageError::OutOfSpace(_) => errno::ENOSPC,
        StorageError::OutOfRange { .. }
        | StorageError::InvalidInput(_)
        | StorageError::Unsupported(_) => errno::EINVAL,
        _ => errno::EIO,
    }
}

impl Connection {
    /// Prepares transmission for a negotiated session: opens the device's queue.
    pub(crate) fn new(
        transport: Transport,
        neg: Negotiated,
        limits: Limits,
    ) -> Result<Connection, StorageError> {
        let notifier = Arc::new(
            EventFd::new(EFD_NONBLOCK).map_err(|e| StorageError::io("Creating an eventfd", e))?,
        );
        let queue = neg
            .export
            .device()
            .open_queue(&QueueOptions::with_depth(limits.max_requests).notify(notifier.clone()))?;
        let view = View {
            size: neg.export.device().size(),
            flags: neg.flags,
            structured: neg.structured,
            contexts: neg.contexts.len(),
            max_payload: limits.max_payload,
        };
        Ok(Connection {
            transport,
            export: neg.export,
            structured: neg.structured,
            contexts: neg.contexts,
            view,
            limits,
            queue,
            notifier,
            input: Input::Header {
                buf: [0; REQUEST_LEN],
                have: 0,
            },
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            retry: VecDeque::new(),
            out: VecDeque::new(),
            pool: BufPool::default(),
            stop: None,
            read_blocked: false,
            write_failed: false,
            done: Vec::new(),
            errors_logged: 0,
        })
    }

    /// Serves requests until the client disconnects or the connection fails; in-flight I/O
    /// always completes before this returns.
    pub(crate) fn run(mut self) -> Transport {
        if let Err(e) = self.transport.stream().set_nonblocking(true) {
            self.stop = Some(Stop::Io(e));
        }
        loop {
            if self.stop.is_none() {
                if let Err(stop) = self.read_requests() {
                    self.stop = Some(stop);
                }
            }
            self.reap();
            if !self.write_failed {
                if let Err(e) = self.write_out() {
                    self.write_failed = true;
                    self.stop.get_or_insert(Stop::Io(e));
                    self.out.clear();
                }
            }
            if self.stop.is_some()
                && self.in_flight == 0
                && (self.write_failed || (self.out.is_empty() && !self.transport.wants_write()))
            {
                break;
            }
            if let Err(e) = self.wait() {
                self.stop.get_or_insert(Stop::Io(e));
                self.write_failed = true;
            }
        }
        match self.stop.take() {
            Some(Stop::Protocol(why)) => {
                tracing::warn!(export = self.export.name(), "closing the connection: {why}")
            }
            Some(Stop::Io(e)) => {
                tracing::debug!(export = self.export.name(), "connection ended: {e}")
            }
            _ => {}
        }
        self.transport
    }

    fn can_take(&self) -> bool {
        self.in_flight < self.limits.max_requests
            && self.pool.held() < self.limits.max_buffered
            && self.retry.is_empty()
    }

    fn read_requests(&mut self) -> Result<(), Stop> {
        loop {
            let may_take = self.can_take();
            let n = match &mut self.input {
                Input::Header { buf, have } => {
                    if *have == 0 && !may_take {
                        return Ok(());
                    }
                    self.transport.read(&mut buf[*have..])
                }
                Input::Payload { buf, have, .. } => match buf.as_mut_slice() {
                    Some(s) => self.transport.read(&mut s[*have..]),
                    None => return Err(Stop::Protocol("payload buffer unusable")),
                },
            };
            let n = match n {
                Ok(0) => {
                    return match &self.input {
                        Input::Header { have: 0, .. } => Err(Stop::Client),
                        _ => Err(Stop::Protocol("the stream ended inside a request")),
                    }
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.read_blocked = true;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Stop::Io(e)),
            };
            self.read_blocked = false;
            match &mut self.input {
                Input::Header { buf, have } => {
                    *have += n;
                    if *have == REQUEST_LEN {
                        let head =
                            RequestHeader::parse(buf).ok_or(Stop::Protocol("bad request magic"))?;
                        *have = 0;
                        self.dispatch(head)?;
                    }
                }
                Input::Payload { buf, have, .. } => {
                    *have += n;
                    if *have == buf.len() {
                        self.payload_done();
                    }
                }
            }
        }
    }

    fn dispatch(&mut self, head: RequestHeader) -> Result<(), Stop> {
        let d = decide(&head, &self.view);
        let h = head.handle;
        match d {
            Decision::Read { offset, len, df } => {
                if len == 0 {
                    let r = if self.structured {
                        Reply::done(h)
                    } else {
                        Reply::simple(h, 0)
                    };
                    self.out.push_back(r);
                } else {
                    let buf = self.pool.get(len as usize);
                    let tag = self.slot(h, Kind::Read { df }, offset, false);
                    self.submit(Request::read(tag, offset, buf));
                }
            }
            Decision::Write { len, .. } | Decision::SkipPayload { len, .. } => {
                let buf = self.pool.get(len as usize);
                self.input = Input::Payload {
                    head,
                    decision: d,
                    buf,
                    have: 0,
                };
                if len == 0 {
                    self.payload_done();
                }
            }
            Decision::Flush => {
                let tag = self.slot(h, Kind::Flush, 0, false);
                self.submit(Request::flush(tag));
            }
            Decision::Trim { offset, len, fua } => {
                let tag = self.slot(h, Kind::Trim, offset, fua);
                self.submit(Request::discard(tag, offset, u64::from(len)));
            }
            Decision::WriteZeroes {
                offset,
                len,
                fua,
                unmap,
            } => {
                let tag = self.slot(h, Kind::WriteZeroes, offset, fua);
                self.submit(Request::write_zeroes(tag, offset, u64::from(len), unmap));
            }
            Decision::Cache { offset, len } => {
                let buf = self.pool.get(len as usize);
                let tag = self.slot(h, Kind::Cache, offset, false);
                self.submit(Request::read(tag, offset, buf));
            }
            Decision::BlockStatus {
                offset,
                len,
                req_one,
            } => self.block_status(h, offset, len, req_one),
            Decision::Disconnect => return Err(Stop::Client),
            Decision::Fail { error, why } => self.reply_error(h, error, why),
            Decision::HangUp(why) => return Err(Stop::Protocol(why)),
        }
        Ok(())
    }

    fn payload_done(&mut self) {
        let input = std::mem::replace(
            &mut self.input,
            Input::Header {
                buf: [0; REQUEST_LEN],
                have: 0,
            },
        );
        let Input::Payload {
            head,
            decision,
            buf,
            ..
        } = input
        else {
            return;
        };
        match decision {
            Decision::Write { offset, len, fua } if len > 0 => {
                let tag = self.slot(head.handle, Kind::Write, offset, fua);
                self.submit(Request::write(tag, offset, buf));
            }
            Decision::SkipPayload { error, why, .. } => {
                self.pool.put(buf);
                self.reply_error(head.handle, error, why);
            }
            _ => {
                self.pool.put(buf);
                self.reply_error(head.handle, 0, "");
            }
        }
    }

    fn reply_error(&mut self, handle: u64, error: u32, why: &str) {
        self.out
            .push_back(Reply::status(self.structured, handle, error, why));
    }

    fn slot(&mut self, handle: u64, kind: Kind, offset: u64, fua: bool) -> u64 {
        let s = Slot {
            handle,
            kind,
            offset,
            fua,
            flushing: false,
        };
        self.in_flight += 1;
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(s);
                i as u64
            }
            None => {
                self.slots.push(Some(s));
                (self.slots.len() - 1) as u64
            }
        }
    }

    fn submit(&mut self, req: Request) {
        if !self.retry.is_empty() {
            self.retry.push_back(req);
            return;
        }
        if let Err(QueueFull(req)) = self.queue.submit(req) {
            self.retry.push_back(req);
        }
    }

    fn reap(&mut self) {
        // The eventfd only wakes us; its count does not matter.
        let _ = self.notifier.read();
        loop {
            let mut done = std::mem::take(&mut self.done);
            done.clear();
            if self.queue.reap(&mut done) == 0 {
                self.done = done;
                break;
            }
            for c in done.drain(..) {
                self.complete(c);
            }
            self.done = done;
        }
        while let Some(req) = self.retry.pop_front() {
            if let Err(QueueFull(req)) = self.queue.submit(req) {
                self.retry.push_front(req);
                break;
            }
        }
    }

    fn log_error(&mut self, e: &StorageError) {
        self.errors_logged += 1;
        if self.errors_logged <= 10 || self.errors_logged % 1000 == 0 {
            tracing::warn!(
                export = self.export.name(),
                errors = self.errors_logged,
                "request failed: {e}"
            );
        }
    }

    fn complete(&mut self, c: Completion) {
        let Some(slot) = self.slots.get_mut(c.tag as usize).and_then(Option::take) else {
            return;
        };
        let fua_pending = slot.fua && !slot.flushing && c.result.is_ok();
        if fua_pending {
            if let Some(b) = c.buf {
                self.pool.put(b);
            }
            let tag = c.tag;
            self.slots[tag as usize] = Some(Slot {
                flushing: true,
                ..slot
            });
            self.submit(Request::flush(tag));
            return;
        }
        self.in_flight -= 1;
        self.free.push(c.tag as usize);
        let h = slot.handle;
        match (&c.result, slot.kind, c.buf) {
            (Ok(_), Kind::Read { df }, Some(buf)) => {
                let r = if self.structured {
                    Reply::structured_read(h, slot.offset, buf, df)
                } else {
                    Reply::simple_read(h, buf)
                };
                self.out.push_back(r);
            }
            (result, _, buf) => {
                if let Some(b) = buf {
                    self.pool.put(b);
                }
                match result {
                    Ok(_) => self.reply_error(h, 0, ""),
                    Err(e) => {
                        let code = errno_of(e);
                        let what = e.to_string();
                        self.log_error(e);
                        let msg = match code {
                            errno::EIO => "I/O error on the server",
                            errno::ENOSPC => "no space left on the server",
                            errno::EPERM => "the export is read-only",
                            _ => proto_msg(&what),
                        };
                        self.reply_error(h, code, msg);
                    }
                }
            }
        }
    }

    fn block_status(&mut self, handle: u64, offset: u64, len: u32, req_one: bool) {
        let mut chunks = Vec::with_capacity(self.contexts.len());
        for (i, ctx) in self.contexts.iter().enumerate() {
            let id = i as u32 + 1;
            let extents = match ctx {
                MetaContext::Allocation => {
                    status::allocation(self.export.device().as_ref(), offset, len, req_one)
                }
                MetaContext::DirtyBitmap(name) => match self.export.bitmaps() {
                    Some(b) => status::dirty(b, name, offset, len, req_one),
                    None => Err(StorageError::NotFound(format!("bitmap {name}").into())),
                },
            };
            match extents {
                Ok(v) => chunks.push((id, v)),
                Err(e) => {
                    self.log_error(&e);
                    return self.reply_error(handle, errno::EIO, "block status failed");
                }
            }
        }
        self.out.push_back(Reply::block_status(handle, &chunks));
    }

    fn write_out(&mut self) -> io::Result<()> {
        while !self.out.is_empty() {
            let written = {
                let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(MAX_IOVECS);
                for r in &self.out {
                    r.slices(&mut iov, MAX_IOVECS);
                    if iov.len() >= MAX_IOVECS {
                        break;
                    }
                }
                match self.transport.write_vectored(&iov) {
                    Ok(0) if !iov.is_empty() => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            };
            let mut left = written;
            while let Some(front) = self.out.front_mut() {
                left -= front.advance(left);
                if !front.is_sent() {
                    break;
                }
                if let Some(mut r) = self.out.pop_front() {
                    if let Some(b) = r.take_buf() {
                        self.pool.put(b);
                    }
                }
                if left == 0 {
                    break;
                }
            }
        }
        match self.transport.flush() {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(()),
        }
    }

    fn wait(&mut self) -> io::Result<()> {
        let want_read = self.stop.is_none() && self.read_blocked && self.can_take_more_input();
        let want_write =
            !self.write_failed && (!self.out.is_empty() || self.transport.wants_write());
        // Work that needs no waiting: input we may read without the socket telling us.
        if self.stop.is_none() && !self.read_blocked && self.can_take_more_input() {
            return Ok(());
        }
        let mut events = 0;
        if want_read {
            events |= libc::POLLIN;
        }
        if want_write {
            events |= libc::POLLOUT;
        }
        let mut fds = [
            libc::pollfd {
                // A socket we wait on for nothing would report a hang-up over and over.
                fd: if events != 0 {
                    self.transport.stream().as_raw_fd()
                } else {
                    -1
                },
                events,
                revents: 0,
            },
            libc::pollfd {
                fd: self.notifier.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        if self.in_flight == 0 && events == 0 {
            // Nothing can wake us: only reachable once stopped with nothing left to do.
            return Ok(());
        }
        // SAFETY: `fds` is a valid array of two pollfd structures for the call's duration.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        if fds[0].revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            // Let the next read or write report what happened.
            self.read_blocked = false;
        }
        Ok(())
    }

    fn can_take_more_input(&self) -> bool {
        matches!(self.input, Input::Payload { .. }) || self.can_take()
    }
}

/// A short client-facing message for an error that is the client's own doing.
fn proto_msg(_detail: &str) -> &'static str {
    "invalid request"
}

//! Plumbing for stacked queues: a volume's queue splits each request into pieces on its PVs'
//! own queues and completes the request when every piece has completed.
//!
//! - [`Lowers`] holds one queue per PV, opened on first use with the consumer's eventfd (or one
//!   of our own) so that every completion below wakes the one descriptor the consumer waits on.
//!   A lower queue that is full keeps the piece in a backlog, retried at the next commit or reap.
//! - [`Parents`] tracks requests in flight: their tag, how many pieces are outstanding, the first
//!   error, and their buffer — moved whole into the single piece when there is one (no extra
//!   cost on the common path), or shared through `IoBuf::view`s when a request spans extents.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::SharedFile;
use crate::error::{Result, StorageError};
use crate::io::{Completion, IoBuf, IoQueue, QueueOptions, Request};

/// The PV files of a volume group, shared with every device and queue on it so that PVs added
/// later are reachable by queues opened before.
pub type PvSet = Arc<RwLock<Vec<SharedFile>>>;

/// The largest alignment any PV of the set asks for.
pub(crate) fn pv_alignment(pvs: &PvSet) -> usize {
    pvs.read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|f| f.alignment())
        .max()
        .unwrap_or(1)
}

/// Longest a wait on several lower queues sleeps before polling each of them again.
const MULTI_WAIT_SLICE: Duration = Duration::from_millis(1);

/// The lower queues of a stacked queue. See the module documentation.
pub(crate) struct Lowers {
    pvs: PvSet,
    queues: Vec<Option<Box<dyn IoQueue>>>,
    opts: QueueOptions,
    efd: Arc<EventFd>,
    backlog: VecDeque<(usize, Request)>,
    /// Completions made here: pieces whose lower queue could not be opened.
    failed: Vec<Completion>,
}

impl std::fmt::Debug for Lowers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lowers")
            .field("open", &self.queues.iter().filter(|q| q.is_some()).count())
            .field("backlog", &self.backlog.len())
            .finish()
    }
}

impl Lowers {
    /// Lower queues for a consumer that opened its queue with `opts`.
    pub(crate) fn new(pvs: PvSet, opts: &QueueOptions) -> Result<Lowers> {
        let efd = match &opts.notifier {
            Some(n) => n.clone(),
            None => Arc::new(
                EventFd::new(EFD_NONBLOCK)
                    .map_err(|e| StorageError::io("Creating an eventfd", e))?,
            ),
        };
        let lower_opts = QueueOptions::with_depth(opts.depth)
            .batch(opts.submit_batch)
            .notify(efd.clone());
        Ok(Lowers {
            pvs,
            queues: Vec::new(),
            opts: lower_opts,
            efd,
            backlog: VecDeque::new(),
            failed: Vec::new(),
        })
    }

    /// The eventfd every lower queue signals.
    pub(crate) fn efd(&self) -> &Arc<EventFd> {
        &self.efd
    }

    fn queue(&mut self, pv: usize) -> Result<&mut Box<dyn IoQueue>> {
        if self.queues.len() <= pv {
            self.queues.resize_with(pv + 1, || None);
        }
        if self.queues[pv].is_none() {
            let file = self
                .pvs
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(pv)
                .cloned()
                .ok_or_else(|| StorageError::Unavailable(format!("PV #{pv} is not open")))?;
            self.queues[pv] = Some(file.open_queue(&self.opts)?);
        }
        self.queues[pv]
            .as_mut()
            .ok_or_else(|| StorageError::Unavailable(format!("PV #{pv} is not open")))
    }

    /// Sends `req` to PV `pv`'s queue (or the backlog if that queue is full). Never fails: a
    /// queue that cannot be opened completes the request with the error.
    pub(crate) fn submit(&mut self, pv: usize, req: Request) {
        if !self.backlog.is_empty() {
            self.backlog.push_back((pv, req));
            return;
        }
        self.push(pv, req);
    }

    fn push(&mut self, pv: usize, req: Request) -> bool {
        match self.queue(pv) {
            Ok(q) => match q.submit(req) {
                Ok(()) => true,
                Err(full) => {
                    self.backlog.push_back((pv, full.0));
                    false
                }
            },
            Err(e) => {
                self.failed.push(Completion::of(req, Err(e)));
                crate::io::notify(Some(&self.efd));
                true
            }
        }
    }

    fn drain_backlog(&mut self) {
        let n = self.backlog.len();
        for _ in 0..n {
            let Some((pv, req)) = self.backlog.pop_front() else {
                break;
            };
            if !self.push(pv, req) {
                // `push` re-queued it at the back; stop at the first full queue to keep order.
                if let Some(last) = self.backlog.pop_back() {
                    self.backlog.push_front(last);
                }
                break;
            }
        }
    }

    /// Hands everything queued to the engines.
    pub(crate) fn commit(&mut self) -> Result<()> {
        self.drain_backlog();
        for q in self.queues.iter_mut().flatten() {
            q.commit()?;
        }
        Ok(())
    }

    /// Moves finished lower completions to `out`.
    pub(crate) fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        let before = out.len();
        out.append(&mut self.failed);
        for q in self.queues.iter_mut().flatten() {
            q.reap(out);
        }
        if !self.backlog.is_empty() {
            self.drain_backlog();
        }
        out.len() - before
    }

    /// Pieces not yet completed below (including the backlog).
    pub(crate) fn in_flight(&self) -> usize {
        self.backlog.len()
            + self.failed.len()
            + self
                .queues
                .iter()
                .flatten()
                .map(|q| q.in_flight())
                .sum::<usize>()
    }

    /// Commits, then blocks until some lower queue has a completion or `timeout` passes.
    pub(crate) fn wait(&mut self, timeout: Option<Duration>) -> Result<()> {
        self.commit()?;
        if !self.failed.is_empty() {
            return Ok(());
        }
        let busy: Vec<usize> = self
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.as_ref().is_some_and(|q| q.in_flight() > 0))
            .map(|(i, _)| i)
            .collect();
        match busy.as_slice() {
            [] => Ok(()),
            [one] => match self.queues[*one].as_mut() {
                Some(q) => q.wait(timeout),
                None => Ok(()),
            },
            several => {
                // Sleep on the shared eventfd for a short slice, then let each queue run its
                // completion work (io_uring posts some completions only when its owner enters
                // the kernel).
                let slice = timeout.map_or(MULTI_WAIT_SLICE, |t| t.min(MULTI_WAIT_SLICE));
                poll_eventfd(&self.efd, slice);
                for &i in several {
                    if let Some(q) = self.queues[i].as_mut() {
                        q.wait(Some(Duration::ZERO))?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// Sleeps until `efd` is readable or `timeout` passes, and resets it.
pub(crate) fn poll_eventfd(efd: &EventFd, timeout: Duration) {
    let mut fds = [libc::pollfd {
        fd: efd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `fds` is a valid array of one pollfd for the duration of the call.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), 1, ms.max(i32::from(!timeout.is_zero()))) };
    if r > 0 {
        let _ = efd.read();
    }
}

/// A request in flight in a stacked queue.
#[derive(Debug)]
struct Parent {
    tag: u64,
    remaining: u32,
    result: Result<u64>,
    whole: Option<IoBuf>,
    shared: Option<Arc<IoBuf>>,
    /// End of the last view handed out: views go out in order and never overlap.
    handed: usize,
}

/// Requests in flight in a stacked queue. See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct Parents {
    slots: Vec<Option<Parent>>,
    free: Vec<usize>,
    count: usize,
}

impl Parents {
    /// Registers a request of `pieces` pieces that succeeds with `len`; returns its id.
    pub(crate) fn start(&mut self, tag: u64, buf: Option<IoBuf>, len: u64, pieces: u32) -> usize {
        let (whole, shared) = match buf {
            Some(b) if pieces > 1 => (None, Some(Arc::new(b))),
            other => (other, None),
        };
        let p = Parent {
            tag,
            remaining: pieces,
            result: Ok(len),
            whole,
            shared,
            handed: 0,
        };
        self.count += 1;
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(p);
                i
            }
            None => {
                self.slots.push(Some(p));
                self.slots.len() - 1
            }
        }
    }

    /// Requests in flight.
    pub(crate) fn len(&self) -> usize {
        self.count
    }

    /// The buffer for the piece at `offset..offset+len` of request `id`: the whole buffer when
    /// the request has one piece, else a view. Pieces are asked for in order; a range that
    /// overlaps one handed out before gets an empty buffer (a bug of the caller, which the
    /// piece then reports as a short transfer) rather than an aliasing view.
    pub(crate) fn piece_buf(&mut self, id: usize, offset: usize, len: usize) -> IoBuf {
        let Some(Some(p)) = self.slots.get_mut(id) else {
            return IoBuf::empty();
        };
        if let Some(b) = p.whole.take() {
            return b;
        }
        match &p.shared {
            Some(s) if offset >= p.handed => {
                p.handed = offset.saturating_add(len);
                // SAFETY: views of one request go out in increasing, non-overlapping order
                // (checked just above), and the shared buffer is only unwrapped in `piece_done`
                // after the last piece came back.
                unsafe { IoBuf::view(s, offset, len) }
            }
            _ => {
                debug_assert!(false, "piece {offset}+{len} overlaps an earlier one");
                IoBuf::empty()
            }
        }
    }

    /// Records that one piece of request `id` finished; returns the request's completion once
    /// every piece has. `buf` is the piece's buffer handed back by the lower queue.
    pub(crate) fn piece_done(
        &mut self,
        id: usize,
        result: Result<()>,
        buf: Option<IoBuf>,
    ) -> Option<Completion> {
        let p = self.slots.get_mut(id)?.as_mut()?;
        if p.shared.is_none() && p.whole.is_none() {
            p.whole = buf;
        } else {
            drop(buf);
        }
        if let Err(e) = result {
            if p.result.is_ok() {
                p.result = Err(e);
            }
        }
        p.remaining = p.remaining.saturating_sub(1);
        if p.remaining > 0 {
            return None;
        }
        let p = self.slots[id].take()?;
        self.free.push(id);
        self.count -= 1;
        let buf = match (p.whole, p.shared) {
            (Some(b), _) => Some(b),
            (None, Some(s)) => match Arc::try_unwrap(s) {
                Ok(b) => Some(b),
                Err(_) => {
                    return Some(Completion {
                        tag: p.tag,
                        result: Err(StorageError::Unavailable(
                            "a piece of the request still holds its buffer".into(),
                        )),
                        buf: None,
                    })
                }
            },
            (None, None) => None,
        };
        Some(Completion {
            tag: p.tag,
            result: p.result,
            buf,
        })
    }
}

/// A deadline helper for `wait` loops.
pub(crate) fn remaining(deadline: Option<Instant>) -> Option<Option<Duration>> {
    match deadline {
        None => Some(None),
        Some(d) => {
            let now = Instant::now();
            if now >= d {
                None
            } else {
                Some(Some(d - now))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_request_gets_its_whole_buffer_back() {
        let mut p = Parents::default();
        let mut b = IoBuf::new(8);
        b.copy_from_slice(0, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let id = p.start(9, Some(b), 8, 2);
        let mut a = p.piece_buf(id, 0, 4);
        let c = p.piece_buf(id, 4, 4);
        a.fill_zero(0, 2);
        assert!(p.piece_done(id, Ok(()), Some(a)).is_none());
        let done = p.piece_done(id, Ok(()), Some(c)).unwrap();
        assert_eq!(done.tag, 9);
        assert_eq!(done.result.unwrap(), 8);
        assert_eq!(done.buf.unwrap().to_vec(), vec![0, 0, 3, 4, 5, 6, 7, 8]);
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn the_first_error_wins() {
        let mut p = Parents::default();
        let id = p.start(1, None, 0, 2);
        p.piece_done(id, Err(StorageError::Busy("x".into())), None);
        let c = p.piece_done(id, Ok(()), None).unwrap();
        assert!(matches!(c.result, Err(StorageError::Busy(_))));
    }
}

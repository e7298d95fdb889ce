//! Stacked queues: the one mechanism by which every format and volume serves its queue on the
//! queues of the devices below it (host files, PVs, backing images, the device a bitmap tracks).
//! It is public so that devices built above this crate do the same (the backup crate's live
//! restore serves its queues on the target volume's).
//!
//! A [`StackedQueue`] is a [`Layer`] — the format's or volume's own logic: how a request maps onto
//! the devices below — over a [`Stack`], which does the rest:
//! - **sub-requests**: the layer sends operations to lower queues ([`Stack::send`]) with a value of
//!   its own, handed back with the lower completion ([`Layer::finished`]);
//! - **a backlog** per lower queue that is full, refilled as completions are reaped (`lowers.rs`);
//! - **fan-in**: a request split into pieces completes when its last piece does, with the first
//!   error, and its buffer goes down whole when it is one piece, else as views (`fanin.rs`);
//! - **waiting**: every lower queue signals one eventfd (the consumer's, or the stack's own), and
//!   so does whatever wakes work the layer parked (another queue's allocation, a metadata worker:
//!   `wake.rs`). [`IoQueue::wait`] blocks on that eventfd — or, with one lower queue busy and
//!   nothing parked, in that queue itself (one system call per wake-up) — and never sleep-polls;
//! - **committing**: what the layer sends on while the queue reaps (parked work a wake-up
//!   released, follow-up pieces, backlog refills) is committed before the reap returns — a
//!   consumer that only reaps after a wake-up commits again only for requests of its own;
//! - **drain on drop**: dropping the queue waits for every sub-request in flight (for at most a
//!   minute) before the layer settles what is left ([`Layer::close`]) — no buffer is freed and no
//!   allocation left half-done while a lower queue still works on it.
//!
//! | file | job |
//! |---|---|
//! | `mod.rs` | [`Layer`], [`Stack`] and the [`IoQueue`] implementation of [`StackedQueue`] |
//! | `lowers.rs` | the lower queues and their backlogs |
//! | `fanin.rs` | requests in flight and their buffers |
//! | `slab.rs` | numbered slots, whose numbers travel as lower tags |
//! | `wake.rs` | eventfd wake-up lists, generations and parked work |

mod fanin;
mod lowers;
mod slab;
pub(crate) mod wake;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

pub use fanin::ReqId;
pub use lowers::Opener;
pub(crate) use slab::Slab;

use crate::error::Result;
use crate::io::{notify, Completion, IoBuf, IoQueue, Op, QueueFull, QueueOptions, Request};

use fanin::Fanin;
use lowers::{Busy, Lowers};
use wake::{new_eventfd, wait_eventfd};

/// Longest a dropped queue waits for its sub-requests.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

/// What a format or volume does with requests. See the module documentation.
pub trait Layer: Send + fmt::Debug + 'static {
    /// What the layer keeps per sub-request, handed back with its completion.
    type Sub: Send;

    /// Starts a request the queue accepted: complete it ([`Stack::complete`]), split it into
    /// sub-requests, or park it.
    fn start(&mut self, st: &mut Stack<Self::Sub>, req: Request);

    /// A sub-request finished.
    fn finished(&mut self, st: &mut Stack<Self::Sub>, sub: Self::Sub, c: Completion);

    /// Retries work parked on events outside the lower queues; returns whether work is still
    /// parked (then `wait` blocks on the eventfd, which the event signals). Called whenever
    /// the queue reaps, so it must be cheap when nothing changed.
    fn advance(&mut self, _st: &mut Stack<Self::Sub>) -> bool {
        false
    }

    /// `n` completions were handed to the consumer.
    fn reaped(&mut self, _n: usize) {}

    /// The queue is being dropped and nothing is in flight below any more: settle what is left.
    fn close(&mut self, _st: &mut Stack<Self::Sub>) {}
}

/// Everything of a stacked queue but its layer. See the module documentation.
pub struct Stack<S> {
    lowers: Lowers,
    subs: Slab<S>,
    reqs: Fanin,
    ready: VecDeque<Completion>,
    /// Signalled by the lower queues and by wakers of parked work.
    efd: Option<Arc<EventFd>>,
    /// The consumer's eventfd.
    external: Option<Arc<EventFd>>,
    /// Inside `reap`/`wait`: completions go straight to the caller, no signal needed.
    reaping: bool,
    scratch: Vec<Completion>,
}

impl<S> fmt::Debug for Stack<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stack")
            .field("lowers", &self.lowers)
            .field("requests", &self.reqs.len())
            .field("ready", &self.ready.len())
            .finish()
    }
}

impl<S> Stack<S> {
    /// The eventfd that wakes this queue, to register with whatever parked work waits for.
    pub fn waker(&self) -> Option<&Arc<EventFd>> {
        self.efd.as_ref()
    }

    /// Sends `op` to lower queue `lower`; `sub` comes back with its completion.
    pub fn send(&mut self, lower: usize, sub: S, op: Op) {
        let tag = self.subs.insert(sub) as u64;
        self.lowers.submit(lower, Request { tag, op });
    }

    /// Hands a completion to the consumer.
    pub fn complete(&mut self, c: Completion) {
        self.ready.push_back(c);
        if !self.reaping {
            notify(self.external.as_ref());
        }
    }

    /// Completes `tag` at once.
    pub fn complete_now(&mut self, tag: u64, buf: Option<IoBuf>, result: Result<u64>) {
        self.complete(Completion { tag, result, buf });
    }

    /// Opens a request for fan-in (see `fanin.rs`): it completes with `len` once every hold is
    /// released, the opening hold by [`Stack::close`].
    pub fn open(&mut self, tag: u64, buf: Option<IoBuf>, len: u64) -> ReqId {
        self.reqs.open(tag, buf, len)
    }

    /// One more piece of request `id` is outstanding.
    pub fn hold(&mut self, id: ReqId) {
        self.reqs.hold(id)
    }

    /// The buffer for one piece of request `id`: its whole buffer when the piece is the only
    /// one (`whole`), else a view of `len` bytes at `offset`; `None`, with the request failed,
    /// when neither can be had (see [`Fanin::piece`]).
    ///
    /// # Safety
    /// As for [`Fanin::view`]: no live view of request `id` that can be written overlaps another.
    pub(crate) unsafe fn piece(
        &mut self,
        id: ReqId,
        whole: bool,
        offset: u64,
        len: u64,
    ) -> Option<IoBuf> {
        // SAFETY: this function's contract is the same as `Fanin::piece`'s.
        unsafe { self.reqs.piece(id, whole, offset, len) }
    }

    /// Records an error for request `id`.
    pub fn fail(&mut self, id: ReqId, e: crate::StorageError) {
        self.reqs.fail(id, e)
    }

    /// A piece of request `id` finished (see [`Fanin::release`]).
    pub fn release(&mut self, id: ReqId, result: Result<()>, buf: Option<IoBuf>) {
        if let Some(c) = self.reqs.release(id, result, buf) {
            self.complete(c);
        }
    }

    /// A piece of request `id` finished with completion `c`. A read piece (`read`) that ended
    /// early, at the end of a host file, reads zeros beyond.
    pub fn release_piece(&mut self, id: ReqId, read: bool, c: Completion) {
        let mut buf = c.buf;
        let result = c.result.map(|n| {
            if read {
                zero_past_short_read(buf.as_mut(), n);
            }
        });
        self.release(id, result, buf)
    }

    /// Completes request `tag`, which went down as one read carrying its whole buffer (no
    /// fan-in): zeros past a read that ended early at the end of a host file, as
    /// [`Stack::release_piece`] does, and an error if the buffer did not come back.
    pub fn complete_whole_read(&mut self, tag: u64, c: Completion) {
        let Completion {
            result, mut buf, ..
        } = c;
        let result = match (result, buf.as_mut()) {
            (Ok(n), Some(b)) => {
                let len = b.len() as u64;
                zero_past_short_read(Some(b), n);
                Ok(len)
            }
            (Ok(_), None) => Err(crate::StorageError::Unavailable(
                "the read did not give its buffer back".into(),
            )),
            (Err(e), _) => Err(e),
        };
        self.complete(Completion { tag, result, buf });
    }

    /// Request `id` is fully split: drops its opening hold.
    pub fn close(&mut self, id: ReqId) {
        self.release(id, Ok(()), None)
    }
}

/// Fills `buf` with zeros from byte `n` on: a read that ended early, at the end of a host file.
fn zero_past_short_read(buf: Option<&mut IoBuf>, n: u64) {
    if let Some(b) = buf {
        let l = b.len();
        if (n as usize) < l {
            b.fill_zero(n as usize, l - n as usize);
        }
    }
}

/// A queue made of a [`Layer`] over a [`Stack`]. See the module documentation.
pub struct StackedQueue<L: Layer> {
    layer: L,
    st: Stack<L::Sub>,
    depth: usize,
    accepted: usize,
    parked: bool,
}

impl<L: Layer> fmt::Debug for StackedQueue<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StackedQueue")
            .field("layer", &self.layer)
            .field("depth", &self.depth)
            .field("in_flight", &self.accepted)
            .field("stack", &self.st)
            .finish()
    }
}

/// How a stacked queue opens its lower queues.
pub struct Lower {
    /// Opens lower queue `index`.
    pub opener: Opener,
    /// Depth of each lower queue.
    pub depth: usize,
    /// Whether the stack needs an eventfd of its own when the consumer brings none: for layers
    /// with several lower queues or parked work. A layer over one lower queue that never parks
    /// waits in that queue.
    pub own_eventfd: bool,
}

impl fmt::Debug for Lower {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lower")
            .field("depth", &self.depth)
            .field("own_eventfd", &self.own_eventfd)
            .finish_non_exhaustive()
    }
}

impl<L: Layer> StackedQueue<L> {
    /// A queue of `opts.depth` running `layer` over lower queues opened as `lower` says.
    pub fn new(layer: L, opts: &QueueOptions, lower: Lower) -> Result<StackedQueue<L>> {
        let efd = match &opts.notifier {
            Some(n) => Some(n.clone()),
            None if lower.own_eventfd => Some(new_eventfd()?),
            None => None,
        };
        let mut lower_opts = QueueOptions::with_depth(lower.depth).batch(opts.submit_batch);
        if let Some(e) = &efd {
            lower_opts = lower_opts.notify(e.clone());
        }
        Ok(StackedQueue {
            layer,
            st: Stack {
                lowers: Lowers::new(lower.opener, lower_opts),
                subs: Slab::default(),
                reqs: Fanin::default(),
                ready: VecDeque::new(),
                efd,
                external: opts.notifier.clone(),
                reaping: false,
                scratch: Vec::new(),
            },
            depth: opts.depth.max(1),
            accepted: 0,
            parked: false,
        })
    }

    /// The layer, to finish setting it up.
    pub fn layer_mut(&mut self) -> &mut L {
        &mut self.layer
    }

    /// The eventfd that wakes this queue (see [`Stack::waker`]).
    pub fn waker(&self) -> Option<&Arc<EventFd>> {
        self.st.waker()
    }

    /// Opens lower queue `i` now (so that the stacked queue's open fails if it cannot).
    pub fn open_lower(&mut self, i: usize) -> Result<()> {
        self.st.lowers.open(i)
    }

    /// Reaps the lower queues and lets the layer advance until nothing more happens.
    fn pump(&mut self) {
        loop {
            let mut done = std::mem::take(&mut self.st.scratch);
            let got = self.st.lowers.reap(&mut done);
            for c in done.drain(..) {
                match self.st.subs.remove(c.tag as usize) {
                    Some(sub) => self.layer.finished(&mut self.st, sub, c),
                    None => tracing::error!(tag = c.tag, "completion of an unknown sub-request"),
                }
            }
            self.st.scratch = done;
            self.parked = self.layer.advance(&mut self.st);
            if got == 0 {
                break;
            }
        }
        // What the layer sent on (follow-up pieces, parked work that could go, backlogs) goes
        // to the engines now: the consumer may not commit again before it has heard of the
        // request, and a woken parked request has no completion to come back for it.
        if let Err(e) = self.st.lowers.commit_sent() {
            tracing::warn!(error = %e, "handing sub-requests to a lower queue failed");
        }
    }

    fn pump_reaping(&mut self) {
        self.st.reaping = true;
        self.pump();
        self.st.reaping = false;
    }

    /// Blocks until a lower queue or a waker signals, or `timeout` passes.
    fn block(&mut self, timeout: Option<Duration>) -> Result<()> {
        match (self.parked, self.st.lowers.busy(), &self.st.efd) {
            (false, Busy::One(i), _) => self.st.lowers.wait_on(i, timeout),
            (_, _, Some(efd)) => wait_eventfd(efd, timeout),
            (_, Busy::One(i), None) => self.st.lowers.wait_on(i, timeout),
            (_, _, None) => {
                tracing::error!("a stacked queue without an eventfd has nothing to wait on");
                Ok(())
            }
        }
    }
}

impl<L: Layer> IoQueue for StackedQueue<L> {
    fn depth(&self) -> usize {
        self.depth
    }

    fn in_flight(&self) -> usize {
        self.accepted
    }

    fn submit(&mut self, req: Request) -> std::result::Result<(), QueueFull> {
        if self.accepted >= self.depth {
            return Err(QueueFull(req));
        }
        self.accepted += 1;
        self.layer.start(&mut self.st, req);
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        self.st.lowers.commit()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        self.pump_reaping();
        let n = self.st.ready.len();
        out.extend(self.st.ready.drain(..));
        self.accepted = self.accepted.saturating_sub(n);
        self.layer.reaped(n);
        n
    }

    fn wait(&mut self, timeout: Option<Duration>) -> Result<()> {
        self.st.lowers.commit()?;
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            self.pump_reaping();
            if !self.st.ready.is_empty() || self.accepted == 0 {
                return Ok(());
            }
            let left = match deadline {
                None => None,
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Ok(());
                    }
                    Some(d - now)
                }
            };
            self.block(left)?;
        }
    }

    fn notifier(&self) -> Option<&Arc<EventFd>> {
        self.st.external.as_ref()
    }
}

impl<L: Layer> Drop for StackedQueue<L> {
    fn drop(&mut self) {
        let give_up = Instant::now() + DRAIN_LIMIT;
        let _ = self.st.lowers.commit();
        self.pump_reaping();
        while self.st.lowers.in_flight() > 0 {
            let now = Instant::now();
            if now >= give_up {
                tracing::error!(
                    in_flight = self.st.lowers.in_flight(),
                    "a stacked queue was dropped with sub-requests that did not finish in time"
                );
                break;
            }
            let parked = std::mem::replace(&mut self.parked, false);
            if self
                .block(Some((give_up - now).min(Duration::from_millis(100))))
                .is_err()
            {
                break;
            }
            self.parked = parked;
            let _ = self.st.lowers.commit();
            self.pump_reaping();
        }
        self.layer.close(&mut self.st);
    }
}

//! One thread per queue pair: epoll on the receive and transmit kicks, the tap (edge-triggered:
//! readable for receive, writable again for a blocked transmit), a timer for the rate limit, a
//! wake eventfd (the number of queue pairs changed) and a stop eventfd; pair 0's thread also
//! serves the control queue.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{error, info_span, warn};
use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::ctrl::{self, CtrlState, Effect};
use super::rx::{self, RxEngine};
use super::tap::TapIo;
use super::tx::{self, TxEngine};
use crate::blk::chain::SharedMemory;
use crate::transport::Signal;

const RX_KICK: u64 = 0;
const TX_KICK: u64 = 1;
const CTRL_KICK: u64 = 2;
const TAP: u64 = 3;
const TIMER: u64 = 4;
const WAKE: u64 = 5;
const STOP: u64 = 6;

/// A queue with its kick eventfd.
pub type KickedQueue = (Queue, EventFd);

/// What one pair's thread serves.
#[derive(Debug)]
pub struct PairJob {
    /// The pair's index (its tap queue is attached while `index < active_pairs`).
    pub index: u16,
    /// The receive queue, if the driver made it ready.
    pub rx: Option<KickedQueue>,
    /// The transmit queue, if the driver made it ready.
    pub tx: Option<KickedQueue>,
    /// The control queue (pair 0 only).
    pub ctrl: Option<KickedQueue>,
    /// The pair's tap queue.
    pub tap: Arc<dyn TapIo>,
    /// Negotiated features.
    pub features: u64,
    /// Rate limit, bytes per second each way.
    pub rate: Option<u64>,
    /// State the control queue changes.
    pub state: Arc<CtrlState>,
    /// Wakes this thread when the number of pairs changes.
    pub wake: EventFd,
    /// The other pairs' wake eventfds (pair 0 only, which serves the control queue).
    pub wake_others: Vec<EventFd>,
    /// Counters.
    pub counters: Arc<super::config::NetCounters>,
}

/// A running pair thread.
#[derive(Debug)]
pub struct PairWorker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl PairWorker {
    /// Starts a thread named `name` for `job`.
    pub fn spawn(
        name: String,
        job: PairJob,
        mem: SharedMemory,
        signal: Arc<dyn Signal>,
    ) -> std::io::Result<PairWorker> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stop_theirs = stop.try_clone()?;
        let timer = TimerFd::new()?;
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                // The filter goes on before the thread reads anything the guest wrote.
                crate::sandbox::enter(crate::sandbox::Role::DeviceWorker);
                let _span = info_span!("virtio-net", pair = %name).entered();
                let mut job = job;
                if let Err(e) = serve(&mut job, &mem, &stop_theirs, timer, &*signal) {
                    error!("virtio-net worker stopped: {e}");
                }
            })?;
        Ok(PairWorker {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for PairWorker {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// Attaches or detaches the pair's tap queue as the active pair count says.
fn apply_pairs(job: &PairJob) {
    let active = job.index < job.state.active_pairs.load(Ordering::SeqCst);
    if let Err(e) = job.tap.set_enabled(active) {
        warn!(
            "cannot {} tap queue {}: {e}",
            if active { "attach" } else { "detach" },
            job.index
        );
    }
}

fn serve(
    job: &mut PairJob,
    mem: &SharedMemory,
    stop: &EventFd,
    mut timer: TimerFd,
    signal: &dyn Signal,
) -> std::io::Result<()> {
    let epoll = Epoll::new()?;
    let add = |fd: i32, events: EventSet, token: u64| {
        epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    };
    if let Some((_, k)) = &job.rx {
        add(k.as_raw_fd(), EventSet::IN, RX_KICK)?;
    }
    if let Some((_, k)) = &job.tx {
        add(k.as_raw_fd(), EventSet::IN, TX_KICK)?;
    }
    if let Some((_, k)) = &job.ctrl {
        add(k.as_raw_fd(), EventSet::IN, CTRL_KICK)?;
    }
    add(
        job.tap.as_raw_fd(),
        EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
        TAP,
    )?;
    add(timer.as_raw_fd(), EventSet::IN, TIMER)?;
    add(job.wake.as_raw_fd(), EventSet::IN, WAKE)?;
    add(stop.as_raw_fd(), EventSet::IN, STOP)?;
    apply_pairs(job);

    let mut rx_engine = RxEngine::new(job.features, job.rate, job.counters.clone());
    let mut tx_engine = TxEngine::new(job.features, job.rate, job.counters.clone());
    // What to run next round: the driver may have queued work before the device started.
    let (mut rx_due, mut tx_due, mut ctrl_due) = (true, true, true);
    let mut tx_blocked = false;
    let mut timer_armed = false;
    let mut events = [EpollEvent::default(); 8];
    loop {
        let busy = rx_due || (tx_due && !tx_blocked) || ctrl_due;
        let n = match epoll.wait(if busy { 0 } else { -1 }, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for ev in &events[..n] {
            match ev.data() {
                RX_KICK => {
                    if let Some((_, k)) = &job.rx {
                        let _ = k.read();
                    }
                    rx_due = true;
                }
                TX_KICK => {
                    if let Some((_, k)) = &job.tx {
                        let _ = k.read();
                    }
                    tx_due = true;
                }
                CTRL_KICK => {
                    if let Some((_, k)) = &job.ctrl {
                        let _ = k.read();
                    }
                    ctrl_due = true;
                }
                TAP => {
                    let set = ev.event_set();
                    if set.contains(EventSet::IN) {
                        rx_due = true;
                    }
                    if set.contains(EventSet::OUT) && tx_blocked {
                        tx_blocked = false;
                        tx_due = true;
                    }
                }
                TIMER => {
                    let _ = timer.wait();
                    timer_armed = false;
                    rx_due = true;
                    tx_due = true;
                }
                WAKE => {
                    let _ = job.wake.read();
                    apply_pairs(job);
                    rx_due = true;
                }
                _ => return Ok(()),
            }
        }
        let mut interrupt = false;
        let mut throttle: Option<Duration> = None;
        if ctrl_due {
            ctrl_due = false;
            interrupt |= serve_ctrl(job, mem);
        }
        if tx_due && !tx_blocked {
            tx_due = false;
            if let Some((q, _)) = job.tx.as_mut() {
                let (i, out) = tx_engine.process(q, mem, &*job.tap);
                interrupt |= i;
                match out {
                    tx::Outcome::Idle => {}
                    tx::Outcome::Blocked => tx_blocked = true,
                    tx::Outcome::Throttled(d) => throttle = Some(d),
                    tx::Outcome::More => tx_due = true,
                }
            }
        }
        if rx_due {
            rx_due = false;
            if let Some((q, _)) = job.rx.as_mut() {
                let (i, out) = rx_engine.process(q, mem, &*job.tap, &job.state.filter);
                interrupt |= i;
                match out {
                    rx::Outcome::Idle | rx::Outcome::NoBuffers => {}
                    rx::Outcome::Throttled(d) => {
                        throttle = Some(throttle.map_or(d, |t| t.min(d)));
                    }
                    rx::Outcome::More => rx_due = true,
                }
            }
        }
        if let Some(d) = throttle {
            if !timer_armed {
                timer.reset(d.max(Duration::from_micros(50)), None)?;
                timer_armed = true;
            }
        }
        if interrupt {
            signal.signal_used();
        }
    }
}

/// Serves the control queue; returns whether to interrupt the driver.
fn serve_ctrl(job: &mut PairJob, mem: &SharedMemory) -> bool {
    use virtio_queue::QueueT;
    let Some((q, _)) = job.ctrl.as_mut() else {
        return false;
    };
    let mut used = false;
    let mut changed = false;
    // Bounded: each round takes a chain the driver put in the ring.
    for _ in 0..usize::from(q.size()) {
        let Some(chain) = q.pop_descriptor_chain(mem.as_ref()) else {
            break;
        };
        let head = chain.head_index();
        let (len, effect) = ctrl::handle(chain, mem, &job.state, job.features);
        changed |= effect == Effect::PairsChanged;
        let _ = q.add_used(mem.as_ref(), head, len);
        used = true;
    }
    let interrupt = used && q.needs_notification(mem.as_ref()).unwrap_or(true);
    if changed {
        apply_pairs(job);
        for w in &job.wake_others {
            let _ = w.write(1);
        }
    }
    interrupt
}

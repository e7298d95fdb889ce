//! virtio-net behind a transport: on activation, the tap's offloads follow the negotiated
//! features and a thread per queue pair starts ([`super::worker`]); on reset the threads stop.
//!
//! Queue layout (virtio 1.2, 5.1.2): receiveq1, transmitq1, ..., receiveqN, transmitqN, then the
//! control queue — at index 2N when the driver negotiated MQ, at index 2 when it did not (it then
//! uses one pair).

use std::sync::atomic::AtomicU16;
use std::sync::{Arc, Once};

use tracing::info;
use vmm_sys_util::eventfd::EventFd;

use super::config::NetConfig;
use super::ctrl::CtrlState;
use super::filter::SharedFilter;
use super::tap::{offload, TapIo};
use super::worker::{PairJob, PairWorker};
use super::{features, DEVICE_ID_NET};
use crate::transport::{Activation, VirtioDevice};

static VHOST_NOTICE: Once = Once::new();

/// Says once per process that the user-space data path serves every NIC (vhost-net is not
/// implemented), and whether the host has `/dev/vhost-net` at all. A sandboxed VMM calls it
/// before its sandbox closes (it looks at a file).
pub fn vhost_net_notice() {
    VHOST_NOTICE.call_once(|| {
        let present = std::path::Path::new("/dev/vhost-net").exists();
        info!(
            "virtio-net: user-space data path (vhost-net is not implemented; the host {} /dev/vhost-net)",
            if present { "has" } else { "has no" }
        );
    });
}

/// A virtio-net device on a tap.
#[derive(Debug)]
pub struct NetDevice {
    name: String,
    cfg: Arc<NetConfig>,
    taps: Vec<Arc<dyn TapIo>>,
    workers: Vec<PairWorker>,
    state: Option<Arc<CtrlState>>,
}

impl NetDevice {
    /// A device named `name` for `cfg` on `taps`, one tap queue per queue pair.
    pub fn new(
        name: String,
        cfg: Arc<NetConfig>,
        taps: Vec<Arc<dyn TapIo>>,
    ) -> Result<NetDevice, String> {
        if taps.len() != usize::from(cfg.queue_pairs()) {
            return Err(format!(
                "{} queue pairs need as many tap queues, not {}",
                cfg.queue_pairs(),
                taps.len()
            ));
        }
        vhost_net_notice();
        Ok(NetDevice {
            name,
            cfg,
            taps,
            workers: Vec::new(),
            state: None,
        })
    }

    /// The NIC's configuration.
    pub fn config(&self) -> &Arc<NetConfig> {
        &self.cfg
    }

    /// The control queue's state while the device runs (filter, active pairs).
    pub fn ctrl_state(&self) -> Option<&Arc<CtrlState>> {
        self.state.as_ref()
    }

    /// Pair threads running now.
    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }
}

/// The tap offloads for the negotiated guest features.
pub fn tap_offloads(driver_features: u64) -> u32 {
    let mut o = 0;
    if driver_features & features::GUEST_CSUM != 0 {
        o |= offload::CSUM;
        if driver_features & features::GUEST_TSO4 != 0 {
            o |= offload::TSO4;
        }
        if driver_features & features::GUEST_TSO6 != 0 {
            o |= offload::TSO6;
        }
        if driver_features & features::GUEST_ECN != 0 {
            o |= offload::TSO_ECN;
        }
        if driver_features & features::GUEST_UFO != 0 {
            o |= offload::UFO;
        }
    }
    o
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        DEVICE_ID_NET
    }

    fn features(&self) -> u64 {
        self.cfg.features()
    }

    fn num_queues(&self) -> usize {
        self.cfg.num_queues()
    }

    fn queue_max_size(&self) -> u16 {
        self.cfg.queue_size()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.cfg.read_config(offset, data)
    }

    fn activate(&mut self, act: Activation) -> Result<(), String> {
        if !self.workers.is_empty() {
            return Err("the device is running already".into());
        }
        let feats = act.driver_features;
        let pairs = if feats & features::MQ != 0 {
            self.cfg.queue_pairs()
        } else {
            1
        };
        let ctrl_index = if feats & features::CTRL_VQ != 0 {
            Some(2 * usize::from(pairs))
        } else {
            None
        };
        let mut slots: Vec<Option<(virtio_queue::Queue, EventFd)>> =
            (0..self.cfg.num_queues()).map(|_| None).collect();
        for (i, q, kick) in act.queues {
            if let Some(s) = slots.get_mut(i) {
                *s = Some((q, kick));
            }
        }
        let state = Arc::new(CtrlState {
            filter: SharedFilter::new(self.cfg.mac()),
            active_pairs: AtomicU16::new(1),
            max_pairs: pairs,
        });
        let mut jobs = Vec::new();
        for p in 0..pairs {
            let i = usize::from(p);
            let ctrl = if p == 0 {
                ctrl_index.and_then(|c| slots.get_mut(c).and_then(Option::take))
            } else {
                None
            };
            jobs.push((p, slots[2 * i].take(), slots[2 * i + 1].take(), ctrl));
        }
        let (name, mem, interrupt) = (self.name.clone(), act.mem, act.interrupt);
        let (taps, rate, counters) = (
            self.taps.clone(),
            self.cfg.rate(),
            self.cfg.counters().clone(),
        );
        let shared = state.clone();
        // Tap set-up, eventfds, timers and threads happen on the device thread (when the
        // process has one), so that a vCPU's seccomp filter needs none of them.
        let start = move || -> Result<Vec<PairWorker>, String> {
            taps[0]
                .set_offload(tap_offloads(feats))
                .map_err(|e| format!("setting the tap's offloads: {e}"))?;
            // Queues of pairs the driver cannot use (no MQ) are detached for good.
            for t in &taps[usize::from(pairs)..] {
                t.set_enabled(false)
                    .map_err(|e| format!("detaching a tap queue: {e}"))?;
            }
            let ev = || EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("an eventfd: {e}"));
            let mut wakes = Vec::new();
            for _ in 0..pairs {
                wakes.push(ev()?);
            }
            let clone = |e: &EventFd| {
                e.try_clone()
                    .map_err(|e| format!("cloning an eventfd: {e}"))
            };
            let mut workers = Vec::new();
            for (p, rx, tx, ctrl) in jobs {
                let i = usize::from(p);
                let wake_others = if p == 0 {
                    wakes[1..]
                        .iter()
                        .map(clone)
                        .collect::<Result<Vec<_>, _>>()?
                } else {
                    Vec::new()
                };
                let job = PairJob {
                    index: p,
                    rx,
                    tx,
                    ctrl,
                    tap: taps[i].clone(),
                    features: feats,
                    rate,
                    state: shared.clone(),
                    wake: clone(&wakes[i])?,
                    wake_others,
                    counters: counters.clone(),
                };
                let thread = format!("{name}-p{p}");
                workers.push(
                    PairWorker::spawn(thread, job, mem.clone(), interrupt.clone())
                        .map_err(|e| format!("starting a worker: {e}"))?,
                );
            }
            Ok(workers)
        };
        self.workers = crate::sandbox::on_device_thread(start)??;
        self.state = Some(state);
        Ok(())
    }

    fn reset(&mut self) {
        for w in self.workers.drain(..) {
            w.stop();
        }
        self.state = None;
    }
}

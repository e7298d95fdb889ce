//! virtio-blk behind a transport: on activation, a worker thread with its own [`QueueEngine`]
//! per ready queue; on reset, the workers stop (draining their I/O) and their counters are kept.

use std::sync::{Arc, Mutex};

use super::config::BlkConfig;
use super::engine::{QueueEngine, QueueStats};
use super::worker::Worker;
use crate::transport::{Activation, VirtioDevice};

/// The virtio device ID of a block device.
pub const DEVICE_ID_BLOCK: u32 = 2;

/// A virtio-blk device for one disk.
#[derive(Debug)]
pub struct BlkDevice {
    name: String,
    cfg: Arc<BlkConfig>,
    workers: Vec<Worker>,
    stats: Arc<Mutex<Vec<QueueStats>>>,
}

impl BlkDevice {
    /// A device named `name` (for logs and thread names) serving `cfg`.
    pub fn new(name: String, cfg: Arc<BlkConfig>) -> BlkDevice {
        BlkDevice {
            name,
            cfg,
            workers: Vec::new(),
            stats: Arc::default(),
        }
    }

    /// Counters of every queue that has stopped so far (reset, or the VM's end).
    pub fn stats(&self) -> Arc<Mutex<Vec<QueueStats>>> {
        self.stats.clone()
    }

    /// Workers running now.
    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Flushes the disk (at the VM's end: the guest should have, a clean stop makes sure).
    pub fn flush_disk(&self) -> strata_storage::Result<()> {
        if self.cfg.read_only() {
            return Ok(());
        }
        self.cfg.disk().flush()
    }
}

impl VirtioDevice for BlkDevice {
    fn device_type(&self) -> u32 {
        DEVICE_ID_BLOCK
    }

    fn features(&self) -> u64 {
        self.cfg.features()
    }

    fn num_queues(&self) -> usize {
        usize::from(self.cfg.num_queues())
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
        let jobs: Vec<_> = act
            .queues
            .into_iter()
            .map(|(i, queue, kick)| (format!("{}-q{i}", self.name), queue, kick))
            .collect();
        let (cfg, mem, interrupt) = (self.cfg.clone(), act.mem, act.interrupt);
        // Opening I/O queues and starting threads happen on the device thread (when the
        // process has one), so that a vCPU's seccomp filter needs neither.
        let start = move || -> Result<Vec<Worker>, String> {
            let mut workers = Vec::new();
            for (name, queue, kick) in jobs {
                let engine = QueueEngine::new(name.clone(), cfg.clone())
                    .map_err(|e| format!("opening an I/O queue: {e}"))?;
                let worker =
                    Worker::spawn(name, engine, queue, mem.clone(), kick, interrupt.clone())
                        .map_err(|e| format!("starting a worker: {e}"))?;
                workers.push(worker);
            }
            Ok(workers)
        };
        self.workers = crate::sandbox::on_device_thread(start)??;
        Ok(())
    }

    fn reset(&mut self) {
        let stats: Vec<QueueStats> = self.workers.drain(..).map(Worker::stop).collect();
        if !stats.is_empty() {
            self.stats
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(stats);
        }
    }
}

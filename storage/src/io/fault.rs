//! The fault-injecting engine (feature `test-utils`): an in-memory device that fails chosen
//! operations and simulates power loss.
//!
//! It keeps two images: `current`, which every read sees, and `durable`, which holds only what a
//! completed flush covered. Writes, discards and length changes since the last completed flush
//! are kept in order in an unflushed log. On power loss the device stops (every later operation
//! fails) and what survives is `durable` plus, depending on [`LossMode`], nothing of the log or a
//! random subset of its entries, some of them torn at 512-byte sector granularity — the
//! reordering and tearing a real disk with a volatile cache may do.
//!
//! Crash tests run a workload on a [`FaultDevice`], make it lose power (at the Nth flush, say),
//! then open a new device on [`FaultController::durable_image`] and check the format or volume on
//! it against a model of what was durable.
//!
//! The faults a test can ask for:
//! - power loss at the Nth flush ([`FaultController::crash_at_flush`]) or at the Nth operation of
//!   any kind ([`FaultController::crash_at_op`]), or now ([`FaultController::power_loss`]);
//! - what survives it ([`LossMode`]): nothing unflushed, or a random subset of the unflushed log,
//!   torn at sector granularity and replayed in any order (an older write may land over a newer
//!   one: a disk's volatile cache keeps no order between flushes);
//! - one failed operation: the Nth of any kind ([`FaultController::fail_nth_op`], EIO) or the Nth
//!   of one kind with EIO, ENOSPC or a short transfer ([`FaultController::fail_nth`]);
//! - completions that come late and out of order ([`FaultController::async_completions`]): queues
//!   opened afterwards keep submitted requests in flight and run them — taking effect on the
//!   device only then — in a seeded random order as the queue is reaped or waited on
//!   (`fault_queue.rs`). Power lost meanwhile loses the requests still in flight;
//! - small files beside the device ([`FaultController::files`], `fault_fs.rs`): a
//!   [`crate::durable::FileSystem`] whose operations count as operations of this device (kind
//!   [`OpKind::File`]) and lose power with it, so that a test cuts between a device's writes and
//!   a sidecar file's. A [`DurableImage`] holds both what survived on the device and the files.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::device::{BlockDevice, Capabilities, Extent, HostFile};
use crate::error::{Result, StorageError};
pub use crate::io::fault_fs::FaultFs;
use crate::io::fault_fs::Files;
use crate::io::memory::{apply, sparse_status};
use crate::io::sparse::SparseMem;
use crate::io::sync_queue::{SyncExecutor, SyncQueue};
use crate::io::{IoQueue, Op, QueueOptions};

/// A failure [`FaultController::fail_nth`] injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The operation fails with EIO and does nothing.
    Eio,
    /// The operation fails with ENOSPC and does nothing.
    NoSpace,
    /// A read or write transfers only its first half (whole sectors; nothing if shorter than
    /// two), and the rest goes as a further operation of the same kind — as an engine
    /// resubmits a short transfer or a pread/pwrite loop goes on — which may itself fail or lose
    /// power, leaving the write landed in part. Other kinds of operations ignore it.
    Short,
    /// A short transfer whose rest never comes: the power is lost at it (the part that landed
    /// is unflushed, as any other write). Other kinds of operations ignore it.
    ShortThenPowerLoss,
    /// The power is lost at the operation, which does not run (any kind).
    PowerLoss,
}

/// What happens to unflushed writes at power loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossMode {
    /// Every write not covered by a completed flush is lost.
    DropUnflushed,
    /// Each unflushed write independently survives or not, the survivors land in a random order
    /// (an older one over a newer one where they overlap; length changes keep their place), and
    /// a surviving write may be torn: only some of its 512-byte sectors land. Seeded for replay.
    TearAndReorder {
        /// Seed for the random choices.
        seed: u64,
    },
}

/// The kind of an operation the device saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// A read.
    Read,
    /// A write.
    Write,
    /// A flush (sync).
    Flush,
    /// A discard (hole punch).
    Discard,
    /// A write of zeroes.
    WriteZeroes,
    /// A change of length.
    SetLen,
    /// An operation on a small file beside the device ([`FaultController::files`]).
    File,
}

impl OpKind {
    fn of(op: &Op) -> OpKind {
        match op {
            Op::Read { .. } => OpKind::Read,
            Op::Write { .. } => OpKind::Write,
            Op::Flush => OpKind::Flush,
            Op::Discard { .. } => OpKind::Discard,
            Op::WriteZeroes { .. } => OpKind::WriteZeroes,
        }
    }
}

#[derive(Clone, Debug)]
enum Unflushed {
    Write { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64 },
    SetLen(u64),
}

#[derive(Debug)]
pub(super) struct State {
    durable: SparseMem,
    log: Vec<Unflushed>,
    ops: u64,
    flushes: u64,
    fail_op_at: Option<u64>,
    /// What the injected failure hit, once it has.
    injected: Option<OpKind>,
    /// Operations seen so far, by kind.
    kind_ops: [u64; 7],
    /// The Nth operation of a kind fails with this fault.
    fail_kind: Option<(OpKind, u64, Fault)>,
    crash_at_flush: Option<u64>,
    crash_at_op: Option<u64>,
    /// Seed of the completion order of queues opened from now on (None: synchronous).
    async_seed: Option<u64>,
    /// Queues opened in the asynchronous mode so far (each gets its own stream of choices).
    async_queues: u64,
    loss: LossMode,
    /// The small files beside the device.
    pub(super) files: Files,
    /// Set once power is lost: what survived.
    crashed: Option<DurableImage>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    current: RwLock<SparseMem>,
    state: Mutex<State>,
}

impl Shared {
    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        crate::sync::lock(&self.state)
    }

    /// Counts an operation and decides whether it fails (`Ok(true)`: it transfers only part of
    /// its data, see [`Fault::Short`]). Flushes, or any operation, may trigger power loss.
    pub(super) fn begin(&self, state: &mut State, kind: OpKind) -> Result<bool> {
        if state.crashed.is_some() {
            return Err(StorageError::Unavailable("power was lost".into()));
        }
        state.ops += 1;
        if state.crash_at_op == Some(state.ops) {
            Self::lose_power(state);
            return Err(StorageError::Unavailable("power was lost".into()));
        }
        if state.fail_op_at == Some(state.ops) {
            state.fail_op_at = None;
            state.injected = Some(kind);
            return Err(StorageError::from_errno("Injected fault", libc::EIO));
        }
        let k = kind as usize;
        state.kind_ops[k] += 1;
        if let Some((fk, n, fault)) = state.fail_kind {
            if fk == kind && state.kind_ops[k] == n {
                state.fail_kind = None;
                state.injected = Some(kind);
                match fault {
                    Fault::Eio => {
                        return Err(StorageError::from_errno("Injected fault", libc::EIO))
                    }
                    Fault::NoSpace => {
                        return Err(StorageError::from_errno("Injected fault", libc::ENOSPC))
                    }
                    Fault::PowerLoss => {
                        Self::lose_power(state);
                        return Err(StorageError::Unavailable("power was lost".into()));
                    }
                    Fault::Short | Fault::ShortThenPowerLoss
                        if matches!(kind, OpKind::Read | OpKind::Write) =>
                    {
                        if fault == Fault::ShortThenPowerLoss {
                            state.crash_at_op = Some(state.ops + 1);
                        }
                        return Ok(true);
                    }
                    Fault::Short | Fault::ShortThenPowerLoss => {}
                }
            }
        }
        if kind == OpKind::Flush {
            state.flushes += 1;
            if state.crash_at_flush == Some(state.flushes) {
                Self::lose_power(state);
                return Err(StorageError::Unavailable(
                    "power was lost during a flush".into(),
                ));
            }
        }
        Ok(false)
    }

    fn lose_power(state: &mut State) {
        let mut image = state.durable.clone();
        let files = state.files.after_power_loss(state.loss, state.ops);
        if let LossMode::TearAndReorder { seed } = state.loss {
            let mut rng = fastrand::Rng::with_seed(seed ^ state.flushes.wrapping_mul(0x9e37_79b9));
            // Any order between length changes: shuffle each run of writes and zeroes.
            let mut order: Vec<&Unflushed> = state.log.iter().collect();
            for run in order.split_mut(|e| matches!(e, Unflushed::SetLen(_))) {
                rng.shuffle(run);
            }
            for entry in order {
                if !rng.bool() {
                    continue;
                }
                match entry {
                    Unflushed::Write { offset, data } if rng.u8(..4) == 0 => {
                        for (i, sector) in data.chunks(512).enumerate() {
                            if rng.bool() {
                                image.write(offset + (i * 512) as u64, sector);
                            }
                        }
                    }
                    other => replay(&mut image, other),
                }
            }
        }
        state.log.clear();
        state.crashed = Some(DurableImage { disk: image, files });
    }
}

fn replay(image: &mut SparseMem, entry: &Unflushed) {
    match entry {
        Unflushed::Write { offset, data } => image.write(*offset, data),
        Unflushed::Zero { offset, len } => image.zero(*offset, *len),
        Unflushed::SetLen(len) => image.set_len(*len),
    }
}

/// The seeds a crash test runs its randomized fault modes with: `fixed` (the list CI runs), or
/// with `STRATA_FAULT_SEEDS=N` that list and random seeds up to N in all (printed, so a failure
/// can be replayed), or with `STRATA_FAULT_SEED=S` only the seed S.
pub fn fault_seeds(fixed: &[u64]) -> Vec<u64> {
    if let Some(one) = std::env::var("STRATA_FAULT_SEED")
        .ok()
        .and_then(|v| v.trim().parse().ok())
    {
        return vec![one];
    }
    let n = std::env::var("STRATA_FAULT_SEEDS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut seeds = fixed.to_vec();
    let mut rng = fastrand::Rng::new();
    while seeds.len() < n {
        seeds.push(rng.u64(..));
    }
    if n > fixed.len() {
        eprintln!("fault seeds (replay one with STRATA_FAULT_SEED=S): {seeds:?}");
    }
    seeds
}

/// A fault-injecting device. See the module documentation.
#[derive(Debug)]
pub struct FaultDevice {
    shared: Arc<Shared>,
}

/// Controls a [`FaultDevice`] from the test: inject failures, cut the power, take what survived.
#[derive(Clone, Debug)]
pub struct FaultController {
    shared: Arc<Shared>,
}

/// The bytes that survived a power loss, from which a new device can be opened: the device's,
/// and the small files beside it ([`FaultController::files`]).
#[derive(Clone, Debug, Default)]
pub struct DurableImage {
    disk: SparseMem,
    files: Files,
}

impl DurableImage {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.disk.len()
    }

    /// Whether the image is empty.
    pub fn is_empty(&self) -> bool {
        self.disk.len() == 0
    }

    /// Reads `len` bytes at `offset` (zeros past the end).
    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.disk.read(offset, &mut v);
        v
    }

    /// The contents of the small file at `path`, if it survived.
    pub fn file(&self, path: &Path) -> Option<Vec<u8>> {
        self.files.contents(path)
    }

    /// The paths of the small files that survived.
    pub fn file_names(&self) -> Vec<PathBuf> {
        self.files.names()
    }
}

impl FaultDevice {
    /// A zero-filled device of `size` bytes, everything durable.
    pub fn new(size: u64) -> (Arc<FaultDevice>, FaultController) {
        Self::from_mem(SparseMem::with_len(size), Files::default())
    }

    /// A device whose current and durable contents are `image`, with its small files (a
    /// power-cycled machine).
    pub fn from_durable(image: &DurableImage) -> (Arc<FaultDevice>, FaultController) {
        Self::from_mem(image.disk.clone(), image.files.clone())
    }

    fn from_mem(mem: SparseMem, files: Files) -> (Arc<FaultDevice>, FaultController) {
        let shared = Arc::new(Shared {
            current: RwLock::new(mem.clone()),
            state: Mutex::new(State {
                durable: mem,
                log: Vec::new(),
                ops: 0,
                flushes: 0,
                fail_op_at: None,
                injected: None,
                kind_ops: [0; 7],
                fail_kind: None,
                crash_at_flush: None,
                crash_at_op: None,
                async_seed: None,
                async_queues: 0,
                loss: LossMode::DropUnflushed,
                files,
                crashed: None,
            }),
        });
        (
            Arc::new(FaultDevice {
                shared: shared.clone(),
            }),
            FaultController { shared },
        )
    }
}

impl FaultController {
    /// Makes the `n`th operation from now (1 = the next) fail with EIO; later ones succeed.
    pub fn fail_nth_op(&self, n: u64) {
        let mut s = self.shared.state();
        s.fail_op_at = Some(s.ops + n.max(1));
    }

    /// Makes the `n`th operation of kind `kind` from now (1 = the next) fail with `fault`; later
    /// ones succeed.
    pub fn fail_nth(&self, kind: OpKind, n: u64, fault: Fault) {
        let mut s = self.shared.state();
        let k = kind as usize;
        s.fail_kind = Some((kind, s.kind_ops[k] + n.max(1), fault));
    }

    /// Operations of kind `kind` seen so far.
    pub fn ops_of(&self, kind: OpKind) -> u64 {
        self.shared.state().kind_ops[kind as usize]
    }

    /// Makes the `n`th operation of any kind from now (1 = the next) lose power instead of
    /// running.
    pub fn crash_at_op(&self, n: u64) {
        let mut s = self.shared.state();
        s.crash_at_op = Some(s.ops + n.max(1));
    }

    /// Queues opened from now on complete late and out of order, in an order chosen from
    /// `seed` (see the module documentation).
    pub fn async_completions(&self, seed: u64) {
        self.shared.state().async_seed = Some(seed);
    }

    /// The kind of operation the failure [`FaultController::fail_nth_op`] asked for hit, once it
    /// has.
    pub fn injected(&self) -> Option<OpKind> {
        self.shared.state().injected
    }

    /// Makes the `n`th flush from now (1 = the next) lose power instead of completing.
    pub fn crash_at_flush(&self, n: u64) {
        let mut s = self.shared.state();
        s.crash_at_flush = Some(s.flushes + n.max(1));
    }

    /// Chooses what happens to unflushed writes at power loss (default: all are dropped).
    pub fn set_loss_mode(&self, mode: LossMode) {
        self.shared.state().loss = mode;
    }

    /// Cuts the power now and returns what survived. The device fails every operation afterwards.
    pub fn power_loss(&self) -> DurableImage {
        let mut s = self.shared.state();
        if s.crashed.is_none() {
            Shared::lose_power(&mut s);
        }
        s.crashed.clone().unwrap_or_default()
    }

    /// What survived, if power was lost.
    pub fn durable_image(&self) -> Option<DurableImage> {
        self.shared.state().crashed.clone()
    }

    /// The small files beside the device: a file system whose operations count as operations
    /// of the device (kind [`OpKind::File`]) and lose power with it (see `fault_fs.rs`).
    pub fn files(&self) -> Arc<FaultFs> {
        Arc::new(FaultFs::new(self.shared.clone()))
    }

    /// Whether power was lost.
    pub fn crashed(&self) -> bool {
        self.shared.state().crashed.is_some()
    }

    /// Operations seen so far (reads, writes, flushes, discards, resizes).
    pub fn ops(&self) -> u64 {
        self.shared.state().ops
    }

    /// Flushes seen so far (including one that lost power).
    pub fn flushes(&self) -> u64 {
        self.shared.state().flushes
    }
}

impl Shared {
    pub(crate) fn run(&self, op: &mut Op) -> Result<u64> {
        match op {
            Op::Read { .. } | Op::Write { .. } => return self.transfer(op),
            _ => {}
        }
        let mut state = self.state();
        self.begin(&mut state, OpKind::of(op))?;
        match op {
            Op::Flush => {
                let log = std::mem::take(&mut state.log);
                for entry in &log {
                    replay(&mut state.durable, entry);
                }
                Ok(0)
            }
            Op::Discard { offset, len } | Op::WriteZeroes { offset, len, .. } => {
                state.log.push(Unflushed::Zero {
                    offset: *offset,
                    len: *len,
                });
                apply(&self.current, op)
            }
            Op::Read { .. } | Op::Write { .. } => unreachable!("transfers are handled above"),
        }
    }

    /// Runs a read or write as the device would see it: one operation, or — after a short
    /// transfer ([`Fault::Short`]) — the first part and then the rest as a further operation,
    /// as an engine resubmits the remainder (io_uring) or a pread/pwrite loop goes on. Each part
    /// is counted and may fail or lose power on its own, so a failed write may have landed in
    /// part. Returns the bytes of the whole request.
    fn transfer(&self, op: &mut Op) -> Result<u64> {
        let kind = OpKind::of(op);
        let (offset, len) = op.range().unwrap_or((0, 0));
        let mut done = 0u64;
        loop {
            let mut state = self.state();
            let short = self.begin(&mut state, kind)?;
            let rest = len - done;
            let n = if short { (rest / 2) / 512 * 512 } else { rest };
            let at = offset + done;
            match op {
                Op::Write { buf, .. } => {
                    let mut data = vec![0u8; n as usize];
                    buf.copy_to_slice(done as usize, &mut data);
                    crate::sync::write(&self.current).write(at, &data);
                    state.log.push(Unflushed::Write { offset: at, data });
                }
                Op::Read { buf, .. } => {
                    let mut tmp = vec![0u8; n as usize];
                    crate::sync::read(&self.current).read(at, &mut tmp);
                    buf.copy_from_slice(done as usize, &tmp);
                }
                _ => {}
            }
            done += n;
            if done >= len {
                return Ok(len);
            }
        }
    }

    /// Opens a queue in the mode the controller set.
    fn queue(self: &Arc<Self>, opts: &QueueOptions) -> Box<dyn IoQueue> {
        let seed = {
            let mut st = self.state();
            st.async_seed.map(|s| {
                st.async_queues += 1;
                s ^ st.async_queues.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            })
        };
        match seed {
            None => Box::new(SyncQueue::new(self.clone(), opts)),
            Some(seed) => Box::new(super::fault_queue::AsyncQueue::new(
                self.clone(),
                opts,
                seed,
            )),
        }
    }

    fn len(&self) -> u64 {
        crate::sync::read(&self.current).len()
    }

    fn set_len(&self, len: u64) -> Result<()> {
        let mut state = self.state();
        let _ = self.begin(&mut state, OpKind::SetLen)?;
        state.log.push(Unflushed::SetLen(len));
        crate::sync::write(&self.current).set_len(len);
        Ok(())
    }
}

impl SyncExecutor for Shared {
    fn size(&self) -> u64 {
        self.len()
    }

    fn execute(&self, op: &mut Op) -> Result<u64> {
        self.run(op)
    }
}

impl BlockDevice for FaultDevice {
    fn size(&self) -> u64 {
        self.shared.len()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::WRITE
            | Capabilities::FLUSH
            | Capabilities::DISCARD
            | Capabilities::WRITE_ZEROES
            | Capabilities::WRITE_ZEROES_UNMAP
            | Capabilities::RESIZE
            | Capabilities::BLOCK_STATUS
    }

    fn alignment(&self) -> usize {
        1
    }

    fn open_queue(&self, opts: &QueueOptions) -> Result<Box<dyn IoQueue>> {
        Ok(self.shared.queue(opts))
    }

    fn flush(&self) -> Result<()> {
        self.shared.run(&mut Op::Flush).map(|_| ())
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.shared.set_len(new_size)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        sparse_status(&crate::sync::read(&self.shared.current), offset, len)
    }
}

impl HostFile for FaultDevice {
    fn name(&self) -> &str {
        "fault-injecting device"
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > self.shared.len())
        {
            return Err(StorageError::corrupt(
                self.name(),
                format!("read at {offset} reaches past the end"),
            ));
        }
        let mut op = Op::Read {
            offset,
            buf: crate::io::IoBuf::new(buf.len()),
        };
        self.shared.run(&mut op)?;
        if let Op::Read { buf: data, .. } = &op {
            data.copy_to_slice(0, buf);
        }
        Ok(())
    }

    fn write_all_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        crate::io::memory::check_end(offset, buf.len())?;
        self.shared
            .run(&mut Op::Write {
                offset,
                buf: crate::io::IoBuf::from_slice(buf),
            })
            .map(|_| ())
    }

    fn sync_data(&self) -> Result<()> {
        self.flush()
    }

    fn len(&self) -> u64 {
        self.shared.len()
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.shared.set_len(len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        self.shared
            .run(&mut Op::Discard { offset, len })
            .map(|_| ())
    }

    fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        self.shared
            .run(&mut Op::WriteZeroes {
                offset,
                len,
                unmap: false,
            })
            .map(|_| ())
    }

    fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset + len;
        if end > self.shared.len() {
            self.shared.set_len(end)?;
        }
        Ok(())
    }

    fn allocated_bytes(&self) -> Result<u64> {
        Ok(crate::sync::read(&self.shared.current).allocated_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::blocking::BlockingQueue;
    use crate::io::Completion;

    #[test]
    fn unflushed_writes_are_lost_and_flushed_ones_survive() {
        let (dev, ctl) = FaultDevice::new(1 << 20);
        let mut q = BlockingQueue::open(dev.as_ref(), 8).unwrap();
        q.write_at(0, &[1u8; 4096]).unwrap();
        q.flush().unwrap();
        q.write_at(4096, &[2u8; 4096]).unwrap();
        // Reads see the unflushed write before the power loss...
        assert_eq!(q.read_at(4096, 4096).unwrap(), vec![2u8; 4096]);
        let image = ctl.power_loss();
        // ...which is gone afterwards, while the flushed one stayed.
        assert_eq!(image.read(0, 4096), vec![1u8; 4096]);
        assert_eq!(image.read(4096, 4096), vec![0u8; 4096]);
        assert!(q.read_at(0, 512).is_err(), "a dead device must fail I/O");
    }

    #[test]
    fn crash_at_flush_fails_that_flush_and_keeps_the_previous_state() {
        let (dev, ctl) = FaultDevice::new(1 << 16);
        ctl.crash_at_flush(2);
        dev.write_all_at(0, b"first").unwrap();
        dev.sync_data().unwrap();
        dev.write_all_at(0, b"second").unwrap();
        assert!(dev.sync_data().is_err());
        let image = ctl.durable_image().unwrap();
        assert_eq!(image.read(0, 6), b"first\0");
        let (reopened, _) = FaultDevice::from_durable(&image);
        let mut out = [0u8; 5];
        reopened.read_exact_at(0, &mut out).unwrap();
        assert_eq!(&out, b"first");
    }

    #[test]
    fn nth_operation_fails_once() {
        let (dev, ctl) = FaultDevice::new(1 << 16);
        ctl.fail_nth_op(2);
        dev.write_all_at(0, b"a").unwrap();
        assert!(dev.write_all_at(0, b"b").is_err());
        dev.write_all_at(0, b"c").unwrap();
    }

    #[test]
    fn torn_mode_keeps_only_whole_sectors_of_written_data() {
        let (dev, ctl) = FaultDevice::new(1 << 20);
        ctl.set_loss_mode(LossMode::TearAndReorder { seed: 7 });
        for i in 0..64u64 {
            dev.write_all_at(i * 4096, &vec![(i + 1) as u8; 4096])
                .unwrap();
        }
        let image = ctl.power_loss();
        let mut survivors = 0;
        for i in 0..64u64 {
            for s in 0..8u64 {
                let sector = image.read(i * 4096 + s * 512, 512);
                assert!(sector.iter().all(|&b| b == sector[0]), "a sector was split");
                assert!(sector[0] == 0 || sector[0] == (i + 1) as u8);
                survivors += usize::from(sector[0] != 0);
            }
        }
        assert!(
            survivors > 0 && survivors < 64 * 8,
            "{survivors} sectors survived"
        );
    }

    #[test]
    fn power_loss_at_any_operation_loses_what_no_flush_covered() {
        let (dev, ctl) = FaultDevice::new(1 << 16);
        dev.write_all_at(0, b"kept").unwrap();
        dev.sync_data().unwrap();
        ctl.crash_at_op(2);
        dev.write_all_at(0, b"gone").unwrap();
        assert!(dev.write_all_at(512, b"never").is_err());
        assert!(ctl.crashed());
        let image = ctl.durable_image().unwrap();
        assert_eq!(image.read(0, 4), b"kept");
        assert_eq!(image.read(512, 5), [0u8; 5]);
    }

    #[test]
    fn reordered_replay_can_land_an_older_write_over_a_newer_one() {
        // An older one-sector write under a newer two-sector one. Sector 0 holding the older
        // data while sector 1 holds the newer means both landed, the older last: in submission
        // order that takes a torn newer write (about 1 run in 64); replayed in any order, about
        // 1 in 9.
        let mut older_over_newer = 0;
        for seed in 0..400 {
            let (dev, ctl) = FaultDevice::new(1 << 16);
            ctl.set_loss_mode(LossMode::TearAndReorder { seed });
            dev.write_all_at(0, &[1u8; 512]).unwrap();
            dev.write_all_at(0, &[2u8; 1024]).unwrap();
            let image = ctl.power_loss();
            if (image.read(0, 1)[0], image.read(512, 1)[0]) == (1, 2) {
                older_over_newer += 1;
            }
        }
        assert!(older_over_newer > 20, "{older_over_newer} of 400 runs");
    }

    #[test]
    fn the_nth_operation_of_a_kind_fails_as_asked() {
        let (dev, ctl) = FaultDevice::new(1 << 16);
        ctl.fail_nth(OpKind::Write, 2, Fault::NoSpace);
        dev.sync_data().unwrap();
        dev.write_all_at(0, b"a").unwrap();
        let e = dev.write_all_at(0, b"b").unwrap_err();
        assert!(matches!(e, StorageError::OutOfSpace(_)), "{e}");
        assert_eq!(ctl.injected(), Some(OpKind::Write));
        // A short write goes on with the rest as a second write.
        let mut q = BlockingQueue::open(dev.as_ref(), 4).unwrap();
        ctl.fail_nth(OpKind::Write, 1, Fault::Short);
        let writes = ctl.ops_of(OpKind::Write);
        let c = q.run(Op::Write {
            offset: 0,
            buf: crate::io::IoBuf::from_slice(&[7u8; 4096]),
        });
        assert_eq!(c.result.unwrap(), 4096);
        assert_eq!(ctl.ops_of(OpKind::Write), writes + 2);
        assert_eq!(q.read_at(0, 4096).unwrap(), vec![7u8; 4096]);
        ctl.fail_nth(OpKind::Read, 1, Fault::Short);
        assert_eq!(q.read_at(0, 4096).unwrap(), vec![7u8; 4096]);
        // An error on the rest leaves the write landed in part.
        ctl.fail_nth(OpKind::Write, 1, Fault::Short);
        ctl.fail_nth_op(2);
        assert!(dev.write_all_at(8192, &[9u8; 4096]).is_err());
        let mut got = [0u8; 4096];
        dev.read_exact_at(8192, &mut got).unwrap();
        assert_eq!((got[2047], got[2048]), (9, 0));
    }

    #[test]
    fn asynchronous_queues_complete_out_of_order_and_act_only_then() {
        let mut out_of_order = 0;
        for seed in 0..16 {
            let (dev, ctl) = FaultDevice::new(1 << 20);
            ctl.async_completions(seed);
            let mut q = dev.open_queue(&QueueOptions::with_depth(16)).unwrap();
            for t in 0..8u64 {
                q.submit(crate::io::Request::write(
                    t,
                    t * 4096,
                    crate::io::IoBuf::from_slice(&[t as u8 + 1; 4096]),
                ))
                .unwrap();
            }
            q.commit().unwrap();
            let mut done = Vec::new();
            while done.len() < 8 {
                // Until its completion, a write is not on the device.
                let mut on_disk = [0u8; 1];
                for t in 0..8u64 {
                    dev.read_exact_at(t * 4096, &mut on_disk).unwrap();
                    let completed = done.iter().any(|c: &Completion| c.tag == t);
                    assert!(!completed || on_disk[0] == t as u8 + 1);
                }
                q.wait(None).unwrap();
                q.reap(&mut done);
            }
            let tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
            if tags.windows(2).any(|w| w[0] > w[1]) {
                out_of_order += 1;
            }
            // Power lost with requests in flight (the next one to complete) loses them.
            ctl.crash_at_op(1);
            q.submit(crate::io::Request::write(
                9,
                0,
                crate::io::IoBuf::from_slice(&[0xee; 512]),
            ))
            .unwrap();
            drop(q);
            assert_eq!(ctl.durable_image().unwrap().read(0, 1), [0]);
        }
        assert!(
            out_of_order > 8,
            "{out_of_order} of 16 runs completed out of order"
        );
    }
}

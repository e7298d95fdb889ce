//! A thin pool: data blocks handed out on first write to thin devices whose mappings live in
//! copy-on-write B-trees (`btree.rs`) on the pool's metadata volume.
//!
//! # Design: a copy-on-write tree, reference counts derived at open
//! We chose dm-thin's shape — one CoW B-tree per device, nodes shared by reference count — over
//! a journal, because a snapshot then costs O(1) (share the root) and a read costs the same at
//! any snapshot depth (each device has a full tree of its own). Transactions commit atomically
//! by writing new nodes to blocks the previous transaction does not use and then one of two
//! superblock slots: every state on disk is a complete tree.
//!
//! Unlike dm-thin we do not store the reference counts. They are derived by walking the trees
//! when the pool opens and kept in memory (with every node). That removes a second CoW structure
//! and a class of bugs: after a crash, space is exactly what the committed trees reach, so no
//! block can leak. The superblock records how many blocks were in use, and opening checks that
//! the walk agrees. The price is an open that reads all metadata (16 to 32 MiB per 64 GiB of
//! data mapped with 64 KiB blocks) and memory of the same size. Details: docs/format-thin.md.
//!
//! # Commit order
//! New data is written before the mapping that points at it exists. A commit then (1) writes
//! every node and device table chunk made since the last one, (2) syncs every PV — data and new
//! metadata are durable, (3) writes the superblock slot `seq % 2`, (4) syncs the metadata PVs.
//! A write to an unprovisioned block is acknowledged when its data is written and its mapping is
//! in memory; like any write it is durable after the next completed flush (= commit). Writes to
//! provisioned, unshared blocks change no metadata at all; flush then only syncs the PVs.
//!
//! # Locking
//! | what | lock |
//! |---|---|
//! | trees, counts, device table, in-flight provisioning | `state` (short: lookups, inserts) |
//! | commits | `commit_lock`, then `state` briefly to collect the transaction |
//! | a device's in-place writes during a snapshot | the device's `frozen` flag under `state` |

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Result, StorageError};
use crate::io::stack::wake::{new_eventfd, wait_eventfd, Events};
use crate::volume::extents::{ExtentMap, Mapped};
use crate::volume::name::{check_name, now_secs, NameKind};
use crate::volume::pvs::PvSet;
use crate::volume::region::Region;
use crate::volume::thin::btree::Forest;
use crate::volume::thin::format::{
    encode_table, DevEntry, Superblock, BLOCK_BITS, FLAG_READ_ONLY, MAX_TABLE_CHUNKS, META_BLOCK,
    TABLE_ENTRIES,
};
use crate::volume::thin::space::{AllocPolicy, Epochs};

/// How long a snapshot waits for in-place writes already in flight on its origin.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most thin devices in a pool.
pub const MAX_DEVICES: usize = TABLE_ENTRIES * MAX_TABLE_CHUNKS;

/// Metadata blocks the device table of `devices` devices takes.
pub(crate) fn table_reserve(devices: usize) -> u64 {
    devices.div_ceil(TABLE_ENTRIES).max(1) as u64
}

/// A thin device's state in memory.
#[derive(Debug)]
pub(crate) struct Dev {
    pub(crate) entry: DevEntry,
    /// New in-place writes wait while a snapshot of this device is being taken.
    pub(crate) frozen: bool,
    pub(crate) writes_in_flight: u64,
    pub(crate) open: u32,
}

/// Everything the pool guards with its state lock.
#[derive(Debug)]
pub(crate) struct PoolState {
    pub(crate) forest: Forest,
    pub(crate) devices: BTreeMap<u32, Dev>,
    pub(crate) seq: u64,
    pub(crate) next_id: u32,
    pub(crate) dirty: bool,
    pub(crate) failed: Option<String>,
    /// `(device, virtual block)` pairs whose first write or copy is in flight, and the data
    /// block each is written to.
    pub(crate) provisioning: HashMap<(u32, u64), u64>,
    pub(crate) epochs: Epochs,
    pub(crate) table_blocks: Vec<u64>,
    /// Data blocks from here on are zeros on disk, in memory (may be ahead of the disk).
    pub(crate) zero_from: u64,
    /// The same, as last committed: a block at or past it may be written only after a commit.
    pub(crate) zero_from_durable: u64,
    /// Data blocks known to hold zeros (never written): a partial first write to one need not
    /// write the rest of the block.
    pub(crate) known_zero: crate::volume::thin::space::BitSet,
    /// Fired when a provisioning ends, writes in flight end, or a device thaws: what deferred
    /// pieces of the queues and a snapshot waiting for in-place writes wait for.
    pub(crate) events: Events,
}

/// Space use of a pool.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct PoolUsage {
    /// Bytes per data block.
    pub block_size: u64,
    /// Data blocks in the pool.
    pub data_blocks: u64,
    /// Data blocks mapped by some device.
    pub used_blocks: u64,
    /// Data blocks freed and not yet reusable (waiting for a commit or for I/O to drain).
    pub held_blocks: u64,
    /// Metadata blocks (4 KiB) in the metadata volume.
    pub metadata_blocks: u64,
    /// Metadata blocks in use.
    pub used_metadata_blocks: u64,
    /// Sum of the virtual sizes of the pool's devices.
    pub virtual_bytes: u64,
    /// Pool data size in bytes.
    pub pool_bytes: u64,
    /// Bytes of data in use.
    pub used_bytes: u64,
    /// Virtual bytes over pool bytes (1.0 = fully provisioned; above 1 is overcommitted).
    pub overcommit: f64,
    /// Thin devices.
    pub devices: usize,
}

/// Facts about one thin device.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct ThinInfo {
    /// Device identifier in the pool.
    pub id: u32,
    /// Name.
    pub name: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// Bytes mapped.
    pub mapped_bytes: u64,
    /// A read-only snapshot.
    pub read_only: bool,
    /// Marked as a template.
    pub template: bool,
    /// The device it came from.
    pub origin: Option<String>,
    /// Creation time.
    pub created: u64,
    /// Open handles.
    pub open: u32,
}

/// A thin pool. See the module documentation.
pub struct ThinPool {
    pub(crate) name: String,
    pub(crate) uuid: String,
    pub(crate) block_size: u64,
    pub(crate) meta: Region,
    pub(crate) data_map: Arc<RwLock<ExtentMap>>,
    pub(crate) pvs: PvSet,
    pub(crate) read_only: bool,
    pub(crate) state: Mutex<PoolState>,
    commit_lock: Mutex<()>,
}

impl std::fmt::Debug for ThinPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThinPool")
            .field("name", &self.name)
            .field("block_size", &self.block_size)
            .finish()
    }
}

/// Lets writes to device `id` proceed again after a snapshot of it.
fn thaw(st: &mut PoolState, id: u32) {
    if let Ok(d) = st.dev_mut(id) {
        d.frozen = false;
    }
    st.events.fire();
}

fn failed_error(name: &str, why: &str) -> StorageError {
    StorageError::Unavailable(format!(
        "thin pool {name} stopped after a failed metadata commit ({why}); reopen it"
    ))
}

impl Drop for ThinPool {
    /// A clean close commits what is in memory, as a flush would.
    fn drop(&mut self) {
        if self.read_only || self.lock_state().failed.is_some() {
            return;
        }
        if let Err(e) = self.commit() {
            tracing::error!(pool = %self.name, error = %e, "committing the thin pool on close failed");
        }
    }
}

/// What a commit writes, collected under the state lock.
struct Transaction {
    blocks: Vec<(u64, Vec<u8>)>,
    sb: Superblock,
}

impl ThinPool {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_parts(
        name: String,
        uuid: String,
        block_size: u64,
        meta: Region,
        data_map: Arc<RwLock<ExtentMap>>,
        pvs: PvSet,
        read_only: bool,
        state: PoolState,
    ) -> ThinPool {
        ThinPool {
            name,
            uuid,
            block_size,
            meta,
            data_map,
            pvs,
            read_only,
            state: Mutex::new(state),
            commit_lock: Mutex::new(()),
        }
    }

    /// `VG/POOL`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes per data block.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Locks the pool's state. A poisoned lock (a thread panicked while changing it) marks the
    /// pool failed: it refuses I/O until it is reopened (see `crate::sync`).
    pub(crate) fn lock_state(&self) -> MutexGuard<'_, PoolState> {
        crate::sync::lock_or_mark(&self.state, |st| {
            st.failed
                .get_or_insert_with(|| crate::sync::failed("its metadata").to_string());
        })
    }

    /// Where data block `block` lives.
    pub(crate) fn data_location(&self, block: u64) -> Result<Mapped> {
        crate::sync::read(&self.data_map)
            .map(block * self.block_size)
            .ok_or_else(|| {
                StorageError::corrupt(
                    &self.name,
                    format!("data block {block} is beyond the data volume"),
                )
            })
    }

    fn check_writable(&self, st: &PoolState) -> Result<()> {
        if self.read_only {
            return Err(StorageError::ReadOnly(format!("thin pool {}", self.name)));
        }
        if let Some(f) = &st.failed {
            return Err(failed_error(&self.name, f));
        }
        Ok(())
    }

    fn round_size(&self, size: u64) -> Result<u64> {
        let max = (1u64 << BLOCK_BITS) * self.block_size;
        if size == 0 || size > max {
            return Err(StorageError::InvalidInput(format!(
                "thin volume size {size} must be between 1 byte and {max}"
            )));
        }
        Ok(size.div_ceil(self.block_size) * self.block_size)
    }

    /// Thin devices, in identifier order.
    pub fn devices(&self) -> Vec<ThinInfo> {
        let st = self.lock_state();
        let names: BTreeMap<u32, String> = st
            .devices
            .iter()
            .map(|(i, d)| (*i, d.entry.name.clone()))
            .collect();
        st.devices
            .values()
            .map(|d| ThinInfo {
                id: d.entry.id,
                name: d.entry.name.clone(),
                size: d.entry.size,
                mapped_bytes: d.entry.mapped * self.block_size,
                read_only: d.entry.flags & FLAG_READ_ONLY != 0,
                template: d.entry.flags & crate::volume::thin::format::FLAG_TEMPLATE != 0,
                origin: d.entry.origin.map(|o| {
                    names
                        .get(&o)
                        .cloned()
                        .unwrap_or_else(|| format!("#{o} (removed)"))
                }),
                created: d.entry.created,
                open: d.open,
            })
            .collect()
    }

    /// The identifier of the device named `name`.
    pub fn find(&self, name: &str) -> Option<u32> {
        self.lock_state()
            .devices
            .values()
            .find(|d| d.entry.name == name)
            .map(|d| d.entry.id)
    }

    /// Space use and overcommit.
    pub fn usage(&self) -> PoolUsage {
        let st = self.lock_state();
        let data_blocks = st.forest.data.len();
        let virtual_bytes: u64 = st.devices.values().map(|d| d.entry.size).sum();
        let pool_bytes = data_blocks * self.block_size;
        PoolUsage {
            block_size: self.block_size,
            data_blocks,
            used_blocks: st.forest.data.used(),
            held_blocks: st.forest.data.held(),
            metadata_blocks: st.forest.meta.len(),
            used_metadata_blocks: st.forest.meta.used(),
            virtual_bytes,
            pool_bytes,
            used_bytes: st.forest.data.used() * self.block_size,
            overcommit: if pool_bytes == 0 {
                0.0
            } else {
                virtual_bytes as f64 / pool_bytes as f64
            },
            devices: st.devices.len(),
        }
    }

    /// Creates an empty thin device; returns its identifier.
    pub fn create_device(&self, name: &str, size: u64) -> Result<u32> {
        check_name(name, NameKind::LogicalVolume)?;
        let size = self.round_size(size)?;
        let id = {
            let mut st = self.lock_state();
            self.check_writable(&st)?;
            self.add_device(&mut st, name, size, 0, 0, None, 0)?
        };
        self.commit()?;
        Ok(id)
    }

    #[allow(clippy::too_many_arguments)]
    fn add_device(
        &self,
        st: &mut PoolState,
        name: &str,
        size: u64,
        root: u64,
        mapped: u64,
        origin: Option<u32>,
        flags: u32,
    ) -> Result<u32> {
        if st.devices.values().any(|d| d.entry.name == name) {
            return Err(StorageError::AlreadyExists(format!(
                "{}/{name}",
                self.vg_name()
            )));
        }
        if st.devices.len() >= MAX_DEVICES {
            return Err(StorageError::OutOfSpace(format!(
                "thin pool {} holds the most devices it can ({MAX_DEVICES})",
                self.name
            )));
        }
        let reserve = table_reserve(st.devices.len() + 1);
        if st.forest.meta.free() < reserve {
            return Err(StorageError::OutOfSpace(format!(
                "the metadata volume of thin pool {} is full",
                self.name
            )));
        }
        let id = st.next_id;
        st.next_id = st.next_id.checked_add(1).ok_or_else(|| {
            StorageError::OutOfSpace("thin device identifiers are exhausted".into())
        })?;
        st.forest.share(root);
        st.forest.reserve = reserve;
        st.devices.insert(
            id,
            Dev {
                entry: DevEntry {
                    id,
                    flags,
                    size,
                    root,
                    mapped,
                    created: now_secs(),
                    origin,
                    name: name.to_string(),
                },
                frozen: false,
                writes_in_flight: 0,
                open: 0,
            },
        );
        st.dirty = true;
        Ok(id)
    }

    fn vg_name(&self) -> &str {
        self.name.split('/').next().unwrap_or(&self.name)
    }

    /// Makes `name` share every block of device `origin` at this instant (a snapshot, or with
    /// `flags` 0 a writable clone); O(1) whatever the sizes. In-place writes to the origin that
    /// are in flight finish first, and new ones wait, so the copy is exact.
    pub fn snapshot(&self, origin: u32, name: &str, flags: u32) -> Result<u32> {
        check_name(name, NameKind::LogicalVolume)?;
        {
            let mut st = self.lock_state();
            self.check_writable(&st)?;
            if st.devices.values().any(|d| d.entry.name == name) {
                return Err(StorageError::AlreadyExists(format!(
                    "{}/{name}",
                    self.vg_name()
                )));
            }
            st.dev_mut(origin)?.frozen = true;
        }
        let deadline = Instant::now() + FREEZE_TIMEOUT;
        let efd = new_eventfd()?;
        let id = loop {
            let mut st = self.lock_state();
            let busy = st
                .dev(origin)
                .map(|d| d.writes_in_flight > 0)
                .unwrap_or(false);
            if !busy {
                let result = st
                    .dev(origin)
                    .map(|d| (d.entry.size, d.entry.root, d.entry.mapped))
                    .and_then(|(size, root, mapped)| {
                        self.add_device(&mut st, name, size, root, mapped, Some(origin), flags)
                    });
                thaw(&mut st, origin);
                break result?;
            }
            let now = Instant::now();
            if now > deadline {
                thaw(&mut st, origin);
                return Err(StorageError::Busy(format!(
                    "the origin (its writes in flight did not finish within {} s)",
                    FREEZE_TIMEOUT.as_secs()
                )));
            }
            // The end of in-place writes fires the pool's events.
            st.events.wait(&efd);
            drop(st);
            wait_eventfd(&efd, Some(deadline - now))?;
        };
        self.commit()?;
        Ok(id)
    }

    /// Removes a device; its blocks return to the pool unless other devices share them.
    pub fn delete_device(&self, id: u32) -> Result<()> {
        {
            let mut st = self.lock_state();
            self.check_writable(&st)?;
            let d = st.dev(id)?;
            if d.open > 0 {
                return Err(StorageError::Busy(format!(
                    "{}/{} (it is open)",
                    self.vg_name(),
                    d.entry.name
                )));
            }
            let root = d.entry.root;
            let tag = st.epochs.retire();
            st.forest.drop_ref(root, tag)?;
            st.devices.remove(&id);
            st.forest.reserve = table_reserve(st.devices.len());
            st.dirty = true;
        }
        self.commit()
    }

    /// Renames a device.
    pub fn rename_device(&self, id: u32, name: &str) -> Result<()> {
        check_name(name, NameKind::LogicalVolume)?;
        {
            let mut st = self.lock_state();
            self.check_writable(&st)?;
            if st
                .devices
                .values()
                .any(|d| d.entry.name == name && d.entry.id != id)
            {
                return Err(StorageError::AlreadyExists(format!(
                    "{}/{name}",
                    self.vg_name()
                )));
            }
            st.dev_mut(id)?.entry.name = name.to_string();
            st.dirty = true;
        }
        self.commit()
    }

    /// Sets a device's flags.
    pub fn set_flags(&self, id: u32, flags: u32) -> Result<()> {
        {
            let mut st = self.lock_state();
            self.check_writable(&st)?;
            st.dev_mut(id)?.entry.flags = flags;
            st.dirty = true;
        }
        self.commit()
    }

    /// A device's flags.
    pub fn flags(&self, id: u32) -> Result<u32> {
        Ok(self.lock_state().dev(id)?.entry.flags)
    }

    /// A device's virtual size.
    pub fn device_size(&self, id: u32) -> u64 {
        self.lock_state().dev(id).map(|d| d.entry.size).unwrap_or(0)
    }

    /// Changes a device's virtual size (rounded up to the block size). Shrinking unmaps what is
    /// cut off.
    pub fn resize_device(&self, id: u32, size: u64) -> Result<()> {
        let size = self.round_size(size)?;
        {
            let mut st = self.lock_state();
            self.check_writable(&st)?;
            let d = st.dev(id)?;
            if d.entry.flags & FLAG_READ_ONLY != 0 {
                return Err(StorageError::ReadOnly(format!(
                    "{}/{} (a snapshot or template keeps its size)",
                    self.vg_name(),
                    d.entry.name
                )));
            }
            let old = d.entry.size;
            if size < old {
                let from = size / self.block_size;
                if st.unmap(id, from, u64::MAX)?.is_none() {
                    return Err(StorageError::Busy(
                        "the volume (writes to the cut-off range are in flight)".into(),
                    ));
                }
            }
            st.dev_mut(id)?.entry.size = size;
            st.dirty = true;
        }
        self.commit()
    }

    /// Chooses where new data and metadata blocks are taken from (see [`AllocPolicy`]).
    pub fn set_allocation_policy(&self, policy: AllocPolicy) {
        let mut st = self.lock_state();
        st.forest.data.policy = policy;
        st.forest.meta.policy = policy;
    }

    /// Grows the pool to `blocks` data blocks (its data volume has grown); `zeroed` says the
    /// new part reads as zeros.
    pub fn extend_data(&self, blocks: u64, zeroed: bool) -> Result<()> {
        {
            let mut st = self.lock_state();
            self.check_writable(&st)?;
            if blocks < st.forest.data.len() {
                return Err(StorageError::Unsupported("shrinking a thin pool".into()));
            }
            if blocks >= 1 << BLOCK_BITS {
                return Err(StorageError::InvalidInput(format!(
                    "{blocks} data blocks is too many"
                )));
            }
            let old = st.forest.data.len();
            st.forest.data.grow(blocks);
            st.known_zero.grow(blocks);
            if zeroed {
                for b in old..blocks {
                    st.known_zero.set(b, true);
                }
            } else {
                // Unknown contents at the end: nothing past the frontier is known to be zero.
                st.zero_from = blocks;
            }
            st.dirty = true;
        }
        self.commit()
    }

    /// Grows the metadata space to `blocks` metadata blocks (its volume has grown).
    pub fn extend_metadata(&self, blocks: u64) -> Result<()> {
        {
            let mut st = self.lock_state();
            self.check_writable(&st)?;
            if blocks > st.forest.meta.len() {
                st.forest.grow_meta(blocks);
                st.dirty = true;
            }
        }
        self.commit()
    }

    /// Marks a device open; `writable` refuses read-only snapshots.
    pub(crate) fn open_device(&self, id: u32, writable: bool) -> Result<()> {
        let mut st = self.lock_state();
        let vg = self.vg_name().to_string();
        let d = st.dev_mut(id)?;
        if writable && d.entry.flags & FLAG_READ_ONLY != 0 {
            return Err(StorageError::ReadOnly(format!(
                "{vg}/{} is a snapshot",
                d.entry.name
            )));
        }
        d.open += 1;
        Ok(())
    }

    /// Marks a device closed.
    pub(crate) fn close_device(&self, id: u32) {
        if let Ok(d) = self.lock_state().dev_mut(id) {
            d.open = d.open.saturating_sub(1);
        }
    }

    fn sync_pvs(&self) -> Result<()> {
        let mut pvs = crate::sync::read(&self.data_map).pvs();
        pvs.extend(self.meta.pv_indexes());
        pvs.sort_unstable();
        pvs.dedup();
        let files = crate::sync::read(&self.pvs).clone();
        for i in pvs {
            if let Some(f) = files.get(i) {
                f.sync_data()?;
            }
        }
        Ok(())
    }

    /// Makes every completed write to every device of the pool durable, and commits the
    /// metadata if it changed (see the module documentation for the order).
    pub fn commit(&self) -> Result<()> {
        let _serial = crate::sync::lock(&self.commit_lock);
        let txn = {
            let mut st = self.lock_state();
            if let Some(f) = &st.failed {
                return Err(failed_error(&self.name, f));
            }
            if !st.dirty || self.read_only {
                None
            } else {
                Some(self.collect(&mut st)?)
            }
        };
        let Some(txn) = txn else {
            return self.sync_pvs();
        };
        let written = (|| {
            for (b, bytes) in &txn.blocks {
                self.meta.write(b * META_BLOCK as u64, bytes)?;
            }
            self.sync_pvs()?;
            self.meta
                .write((txn.sb.seq % 2) * META_BLOCK as u64, &txn.sb.encode())?;
            self.meta.sync()
        })();
        let mut st = self.lock_state();
        let ok = written.is_ok();
        st.forest.meta.end_commit(ok);
        st.forest.data.end_commit(ok);
        match written {
            Ok(()) => {
                st.seq = txn.sb.seq;
                st.zero_from_durable = st.zero_from_durable.max(txn.sb.zero_from);
                let PoolState { forest, epochs, .. } = &mut *st;
                forest.data.release(epochs);
                Ok(())
            }
            Err(e) => {
                tracing::error!(pool = %self.name, error = %e, "thin pool metadata commit failed");
                st.failed = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// Collects a transaction: encodes new nodes and the device table, builds the superblock.
    fn collect(&self, st: &mut PoolState) -> Result<Transaction> {
        let seq = st.seq + 1;
        let entries: Vec<DevEntry> = st.devices.values().map(|d| d.entry.clone()).collect();
        let nchunks = entries.len().div_ceil(TABLE_ENTRIES);
        if st.forest.meta.free() < nchunks as u64 {
            return Err(StorageError::OutOfSpace(format!(
                "the metadata volume of thin pool {} is full",
                self.name
            )));
        }
        let tag = st.epochs.retire();
        for b in std::mem::take(&mut st.table_blocks) {
            st.forest.meta.dec(b, tag);
        }
        let mut chunk_blocks = Vec::with_capacity(nchunks);
        for _ in 0..nchunks {
            let b = st.forest.meta.alloc().ok_or_else(|| {
                StorageError::OutOfSpace(format!(
                    "the metadata volume of thin pool {} is full",
                    self.name
                ))
            })?;
            chunk_blocks.push(b);
        }
        let mut blocks = Vec::new();
        for b in st.forest.meta.fresh_blocks() {
            if st.forest.has_node(b) {
                blocks.push((b, st.forest.node(b)?.encode(b, seq)));
            }
        }
        for (chunk, &b) in entries.chunks(TABLE_ENTRIES).zip(&chunk_blocks) {
            blocks.push((b, encode_table(chunk, b, seq)));
        }
        st.table_blocks = chunk_blocks.clone();
        let sb = Superblock {
            seq,
            pool_uuid: self.uuid.clone(),
            block_size: self.block_size as u32,
            data_blocks: st.forest.data.len(),
            meta_blocks: st.forest.meta.len(),
            used_data: st.forest.data.used() - st.provisioning.len() as u64,
            used_meta: st.forest.meta.used(),
            device_count: entries.len() as u32,
            next_id: st.next_id,
            zero_from: st.zero_from,
            chunks: chunk_blocks,
        };
        st.forest.meta.begin_commit();
        st.forest.data.begin_commit();
        st.dirty = false;
        Ok(Transaction { blocks, sb })
    }
}

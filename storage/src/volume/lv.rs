//! Logical volume operations on a volume group: linear volumes (allocated and changed here),
//! thin pools (two hidden linear volumes plus a pool record), and thin volumes, snapshots and
//! clones (records in their pool's metadata, changed through [`ThinPool`]).
//!
//! Names are unique across the group, whichever kind holds them.

use std::any::Any;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::device::BlockDevice;
use crate::error::{Result, StorageError};
use crate::volume::alloc::{allocate, append_merged, truncate};
use crate::volume::extents::ExtentMap;
use crate::volume::linear::LinearDevice;
use crate::volume::meta::{check_block_size, LvKind, LvMeta, Segment};
use crate::volume::name::{
    check_name, new_uuid, now_secs, NameKind, POOL_DATA_SUFFIX, POOL_META_SUFFIX,
};
use crate::volume::region::Region;
use crate::volume::thin::device::OpenThin;
use crate::volume::thin::format::{FLAG_READ_ONLY, FLAG_TEMPLATE, META_BLOCK};
use crate::volume::thin::{self, PoolUsage, ThinDevice, ThinPool};
use crate::volume::vg::{Vg, VgState};

/// Default thin pool data block size.
pub const DEFAULT_BLOCK_SIZE: u64 = 64 << 10;
/// Metadata bytes reserved per data block when the size is not given.
const META_PER_BLOCK: u64 = 48;
/// Smallest default metadata volume.
const MIN_META: u64 = 4 << 20;
/// Largest default metadata volume.
const MAX_META: u64 = 16 << 30;

/// What a logical volume is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LvType {
    /// Thick: extents allocated at creation.
    Linear,
    /// A thin pool.
    ThinPool,
    /// A thin volume (possibly a writable clone).
    Thin,
    /// A read-only thin snapshot.
    Snapshot,
}

/// Facts about a logical volume, for listings.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LvInfo {
    /// Name.
    pub name: String,
    /// Volume group.
    pub vg: String,
    /// Kind.
    #[serde(rename = "type")]
    pub kind: LvType,
    /// Virtual size in bytes (for a pool: its data size).
    pub size: u64,
    /// The pool of a thin volume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// What a snapshot or clone was made from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// Marked as a template (clones may be made from it).
    pub template: bool,
    /// Writes are refused.
    pub read_only: bool,
    /// Bytes allocated in the pool (thin volumes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mapped_bytes: Option<u64>,
    /// Space use (pools).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<PoolUsage>,
    /// Extent runs (linear volumes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segments: Option<usize>,
    /// Open in this process.
    pub open: bool,
}

/// Where a name lives.
pub(crate) enum Located {
    Linear(LvMeta),
    Pool(LvMeta),
    Thin { pool: Arc<ThinPool>, id: u32 },
}

/// Marks a linear volume open while a device or queue on it exists.
struct OpenLinear {
    vg: Vg,
    uuid: String,
}

impl Drop for OpenLinear {
    fn drop(&mut self) {
        let mut st = self.vg.state();
        if let Some(n) = st.open_linear.get_mut(&self.uuid) {
            *n -= 1;
            if *n == 0 {
                st.open_linear.remove(&self.uuid);
            }
        }
    }
}

fn not_found(vg: &str, name: &str) -> StorageError {
    StorageError::NotFound(PathBuf::from(format!("logical volume {vg}/{name}")))
}

impl Vg {
    fn extents_for(&self, st: &VgState, size: u64) -> Result<u64> {
        if size == 0 {
            return Err(StorageError::InvalidInput(
                "Volume size must be greater than zero".into(),
            ));
        }
        Ok(size.div_ceil(st.meta.extent_size))
    }

    /// Opens pool `lv` if it is not open yet.
    pub(crate) fn load_pool(&self, st: &mut VgState, lv: &LvMeta) -> Result<Arc<ThinPool>> {
        if let Some(p) = st.pools.get(&lv.uuid) {
            return Ok(p.clone());
        }
        let LvKind::ThinPool {
            data,
            metadata,
            block_size,
        } = &lv.kind
        else {
            return Err(StorageError::InvalidInput(format!(
                "{} is not a thin pool",
                lv.name
            )));
        };
        let vg = st.meta.name.clone();
        let part = |n: &str| -> Result<Arc<std::sync::RwLock<ExtentMap>>> {
            st.meta
                .lv(n)
                .and_then(|l| st.maps.get(&l.uuid))
                .cloned()
                .ok_or_else(|| {
                    StorageError::corrupt(
                        format!("volume group {vg}"),
                        format!("pool {} lacks {n}", lv.name),
                    )
                })
        };
        let (data_map, meta_map) = (part(data)?, part(metadata)?);
        let region = Region::new(meta_map, self.inner.pvs.clone(), format!("{vg}/{metadata}"));
        let (pool, report) = thin::load::open(
            &format!("{vg}/{}", lv.name),
            &lv.uuid,
            *block_size,
            region,
            data_map,
            self.inner.pvs.clone(),
            self.inner.opts.read_only,
        )?;
        for w in report.warnings {
            tracing::warn!(pool = %lv.name, "{w}");
        }
        let pool = Arc::new(pool);
        st.pools.insert(lv.uuid.clone(), pool.clone());
        Ok(pool)
    }

    /// Every pool of the group, opened.
    pub(crate) fn all_pools(&self, st: &mut VgState) -> Result<Vec<(String, Arc<ThinPool>)>> {
        let pools: Vec<LvMeta> = st
            .meta
            .lvs
            .iter()
            .filter(|l| matches!(l.kind, LvKind::ThinPool { .. }))
            .cloned()
            .collect();
        pools
            .into_iter()
            .map(|l| Ok((l.name.clone(), self.load_pool(st, &l)?)))
            .collect()
    }

    pub(crate) fn locate(&self, st: &mut VgState, name: &str) -> Result<Located> {
        if let Some(lv) = st.meta.lv(name).filter(|l| !l.hidden) {
            return Ok(match lv.kind {
                LvKind::Linear { .. } => Located::Linear(lv.clone()),
                LvKind::ThinPool { .. } => Located::Pool(lv.clone()),
            });
        }
        for (_, pool) in self.all_pools(st)? {
            if let Some(id) = pool.find(name) {
                return Ok(Located::Thin { pool, id });
            }
        }
        Err(not_found(&st.meta.name, name))
    }

    fn check_free_name(&self, st: &mut VgState, name: &str) -> Result<()> {
        check_name(name, NameKind::LogicalVolume)?;
        match self.locate(st, name) {
            Ok(_) => Err(StorageError::AlreadyExists(format!(
                "{}/{name}",
                st.meta.name
            ))),
            Err(StorageError::NotFound(_)) if st.meta.lv(name).is_none() => Ok(()),
            Err(StorageError::NotFound(_)) => Err(StorageError::AlreadyExists(format!(
                "{}/{name}",
                st.meta.name
            ))),
            Err(e) => Err(e),
        }
    }

    /// Zeroes new extents so that a new or grown volume never shows an old one's data, and
    /// makes that durable before the metadata that hands them out.
    ///
    /// A hole punch is tried first (cheap on files, a zeroing discard on devices that have
    /// one); unless `cheap_only`, zeros are written where it is not supported.
    fn zero_segments(&self, st: &VgState, segments: &[Segment], cheap_only: bool) -> Result<()> {
        let files = self.files();
        let es = st.meta.extent_size;
        for s in segments {
            let f = &files[s.pv];
            let (at, len) = (st.labels[s.pv].pe_start + s.pe * es, s.count * es);
            match f.punch_hole(at, len) {
                Ok(()) => {}
                Err(e) if cheap_only => return Err(e),
                Err(e) => {
                    tracing::info!(pv = f.name(), error = %e, "no zeroing discard; writing zeros");
                    f.zero_range(at, len)?;
                }
            }
        }
        for s in segments {
            files[s.pv].sync_data()?;
        }
        Ok(())
    }

    /// Creates a linear volume of at least `size` bytes (whole extents), optionally only on the
    /// PVs at `on_pvs` (indexes in the group).
    pub fn create_linear(&self, name: &str, size: u64, on_pvs: &[usize]) -> Result<()> {
        let mut st = self.state();
        self.check_free_name(&mut st, name)?;
        let count = self.extents_for(&st, size)?;
        let segments = allocate(&st.meta, count, 0, on_pvs, None)?;
        self.zero_segments(&st, &segments, false)?;
        let mut meta = st.meta.clone();
        meta.lvs.push(LvMeta {
            name: name.to_string(),
            uuid: new_uuid(),
            created: now_secs(),
            hidden: false,
            kind: LvKind::Linear { segments },
        });
        self.commit(&mut st, meta)
    }

    /// Creates a thin pool with `size` bytes of data in blocks of `block_size` (0: 64 KiB) and
    /// a metadata volume of `metadata_size` bytes (0: sized from the data).
    pub fn create_pool(
        &self,
        name: &str,
        size: u64,
        block_size: u64,
        metadata_size: u64,
    ) -> Result<()> {
        let mut st = self.state();
        self.check_free_name(&mut st, name)?;
        let es = st.meta.extent_size;
        let block_size = if block_size == 0 {
            DEFAULT_BLOCK_SIZE.min(es)
        } else {
            block_size
        };
        check_block_size(block_size, es)?;
        let data_extents = self.extents_for(&st, size)?;
        let data_blocks = data_extents * es / block_size;
        let meta_bytes = if metadata_size == 0 {
            (data_blocks * META_PER_BLOCK).clamp(MIN_META, MAX_META)
        } else {
            metadata_size
        };
        let meta_extents = self.extents_for(&st, meta_bytes)?;
        let mut meta = st.meta.clone();
        let tmeta = allocate(&meta, meta_extents, 0, &[], None)?;
        let meta_name = format!("{name}{POOL_META_SUFFIX}");
        let data_name = format!("{name}{POOL_DATA_SUFFIX}");
        meta.lvs.push(LvMeta {
            name: meta_name.clone(),
            uuid: new_uuid(),
            created: now_secs(),
            hidden: true,
            kind: LvKind::Linear {
                segments: tmeta.clone(),
            },
        });
        let tdata = allocate(&meta, data_extents, 0, &[], None)?;
        meta.lvs.push(LvMeta {
            name: data_name.clone(),
            uuid: new_uuid(),
            created: now_secs(),
            hidden: true,
            kind: LvKind::Linear { segments: tdata },
        });
        let pool_uuid = new_uuid();
        meta.lvs.push(LvMeta {
            name: name.to_string(),
            uuid: pool_uuid.clone(),
            created: now_secs(),
            hidden: false,
            kind: LvKind::ThinPool {
                data: data_name,
                metadata: meta_name.clone(),
                block_size,
            },
        });
        meta.validate()?;
        // Format the pool's metadata before the group hands out the extents: a crash in between
        // leaves only unallocated extents behind.
        let pe_starts: Vec<u64> = st.labels.iter().map(|l| l.pe_start).collect();
        let map = ExtentMap::new(&tmeta, es, &pe_starts);
        let region = Region::new(
            Arc::new(std::sync::RwLock::new(map)),
            self.inner.pvs.clone(),
            format!("{}/{meta_name}", meta.name),
        );
        // Zeroing the data volume (a hole punch; cheap on files) lets first writes skip
        // writing zeros around them; where the PVs cannot, every first write zero-fills.
        let tdata_segments = meta
            .lv(&format!("{name}{POOL_DATA_SUFFIX}"))
            .map(|l| l.segments().to_vec())
            .unwrap_or_default();
        let zeroed = match self.zero_segments(&st, &tdata_segments, true) {
            Ok(()) => true,
            Err(e) => {
                tracing::info!(pool = name, error = %e, "the pool's data volume could not be zeroed cheaply");
                false
            }
        };
        thin::load::format(&region, &pool_uuid, block_size, data_blocks, zeroed)?;
        self.commit(&mut st, meta)
    }

    /// The pool named `name`, opened.
    pub fn pool(&self, name: &str) -> Result<Arc<ThinPool>> {
        let mut st = self.state();
        match self.locate(&mut st, name)? {
            Located::Pool(lv) => self.load_pool(&mut st, &lv),
            _ => Err(StorageError::InvalidInput(format!(
                "{}/{name} is not a thin pool",
                st.meta.name
            ))),
        }
    }

    /// Creates a thin volume of `size` bytes (rounded up to the pool's block size) in `pool`.
    pub fn create_thin(&self, pool: &str, name: &str, size: u64) -> Result<()> {
        let mut st = self.state();
        self.check_free_name(&mut st, name)?;
        let p = match self.locate(&mut st, pool)? {
            Located::Pool(lv) => self.load_pool(&mut st, &lv)?,
            _ => {
                return Err(StorageError::InvalidInput(format!(
                    "{}/{pool} is not a thin pool",
                    st.meta.name
                )))
            }
        };
        p.create_device(name, size).map(|_| ())
    }

    fn thin_of(&self, st: &mut VgState, name: &str, what: &str) -> Result<(Arc<ThinPool>, u32)> {
        match self.locate(st, name)? {
            Located::Thin { pool, id, .. } => Ok((pool, id)),
            _ => Err(StorageError::Unsupported(format!(
                "{what} of {}/{name}: only thin volumes have them (it is not thin)",
                st.meta.name
            ))),
        }
    }

    /// Takes a read-only snapshot `snap` of thin volume `origin`, in O(1).
    pub fn snapshot(&self, origin: &str, snap: &str) -> Result<()> {
        let mut st = self.state();
        self.check_free_name(&mut st, snap)?;
        let (pool, id) = self.thin_of(&mut st, origin, "snapshots")?;
        pool.snapshot(id, snap, FLAG_READ_ONLY).map(|_| ())
    }

    /// Makes a writable linked clone `new` of a snapshot or template `source`, in O(1).
    pub fn clone_lv(&self, source: &str, new: &str) -> Result<()> {
        let mut st = self.state();
        self.check_free_name(&mut st, new)?;
        let (pool, id) = self.thin_of(&mut st, source, "clones")?;
        if pool.flags(id)? & (FLAG_READ_ONLY | FLAG_TEMPLATE) == 0 {
            return Err(StorageError::InvalidInput(format!(
                "{}/{source} is writable: clone a snapshot of it, or mark it as a template first",
                st.meta.name
            )));
        }
        pool.snapshot(id, new, 0).map(|_| ())
    }

    /// Marks a thin volume as a template (read-only, clones may be made from it) or unmarks a
    /// template (writable again; its clones keep their own blocks).
    pub fn set_template(&self, name: &str, template: bool) -> Result<()> {
        let mut st = self.state();
        let (pool, id) = self.thin_of(&mut st, name, "templates")?;
        let flags = pool.flags(id)?;
        if !template && flags & FLAG_TEMPLATE == 0 {
            return Err(StorageError::InvalidInput(format!(
                "{}/{name} is not a template",
                st.meta.name
            )));
        }
        let new = if template {
            flags | FLAG_TEMPLATE | FLAG_READ_ONLY
        } else {
            flags & !(FLAG_TEMPLATE | FLAG_READ_ONLY)
        };
        if template && pool.devices().iter().any(|d| d.id == id && d.open > 0) {
            return Err(StorageError::Busy(format!(
                "{}/{name} (it is open)",
                st.meta.name
            )));
        }
        pool.set_flags(id, new)
    }

    /// Removes a volume. Thin volumes' snapshots and clones stay intact; a pool must be empty.
    pub fn remove_lv(&self, name: &str) -> Result<()> {
        let mut st = self.state();
        let bitmaps = self.bitmap_file_of(&mut st, name);
        self.remove_located(&mut st, name)?;
        if let Some(p) = bitmaps {
            crate::bitmap::BitmapSet::delete_file(self.bitmap_fs().as_ref(), &p)?;
        }
        Ok(())
    }

    fn remove_located(&self, st: &mut VgState, name: &str) -> Result<()> {
        match self.locate(st, name)? {
            Located::Thin { pool, id, .. } => pool.delete_device(id),
            Located::Linear(lv) => {
                if st.open_linear.contains_key(&lv.uuid) {
                    return Err(StorageError::Busy(format!(
                        "{}/{name} (it is open)",
                        st.meta.name
                    )));
                }
                let mut meta = st.meta.clone();
                meta.lvs.retain(|l| l.uuid != lv.uuid);
                self.commit(st, meta)
            }
            Located::Pool(lv) => {
                let pool = self.load_pool(st, &lv)?;
                let n = pool.devices().len();
                if n > 0 {
                    return Err(StorageError::Busy(format!(
                        "thin pool {}/{name} ({n} volumes remain in it; remove them first)",
                        st.meta.name
                    )));
                }
                let LvKind::ThinPool { data, metadata, .. } = &lv.kind else {
                    unreachable_pool()?
                };
                let mut meta = st.meta.clone();
                meta.lvs
                    .retain(|l| l.uuid != lv.uuid && l.name != *data && l.name != *metadata);
                self.commit(st, meta)?;
                st.pools.remove(&lv.uuid);
                Ok(())
            }
        }
    }

    /// Renames a volume.
    pub fn rename_lv(&self, old: &str, new: &str) -> Result<()> {
        let mut st = self.state();
        self.check_free_name(&mut st, new)?;
        match self.locate(&mut st, old)? {
            Located::Thin { pool, id, .. } => pool.rename_device(id, new),
            Located::Linear(lv) => {
                let mut meta = st.meta.clone();
                if let Some(l) = meta.lv_mut(&lv.name) {
                    l.name = new.to_string();
                }
                self.commit(&mut st, meta)
            }
            Located::Pool(lv) => {
                let mut meta = st.meta.clone();
                let (nd, nm) = (
                    format!("{new}{POOL_DATA_SUFFIX}"),
                    format!("{new}{POOL_META_SUFFIX}"),
                );
                for l in &mut meta.lvs {
                    if l.name == format!("{old}{POOL_DATA_SUFFIX}") {
                        l.name = nd.clone();
                    } else if l.name == format!("{old}{POOL_META_SUFFIX}") {
                        l.name = nm.clone();
                    } else if l.uuid == lv.uuid {
                        l.name = new.to_string();
                        l.kind = LvKind::ThinPool {
                            data: nd.clone(),
                            metadata: nm.clone(),
                            block_size: match lv.kind {
                                LvKind::ThinPool { block_size, .. } => block_size,
                                _ => DEFAULT_BLOCK_SIZE,
                            },
                        };
                    }
                }
                self.commit(&mut st, meta)
            }
        }
    }

    /// Resizes a volume. Linear volumes grow and shrink by whole extents; pools only grow;
    /// thin volumes change their virtual size (shrinking frees what is cut off).
    pub fn resize_lv(&self, name: &str, size: u64) -> Result<()> {
        let mut st = self.state();
        match self.locate(&mut st, name)? {
            Located::Thin { pool, id, .. } => {
                pool.resize_device(id, size)?;
                self.resize_bitmaps(&mut st, name, pool.device_size(id))
            }
            Located::Linear(lv) => {
                self.resize_linear(&mut st, &lv.name, size)?;
                let bytes = st.meta.lv(name).map_or(0, |l| l.extents()) * st.meta.extent_size;
                self.resize_bitmaps(&mut st, name, bytes)
            }
            Located::Pool(lv) => {
                let LvKind::ThinPool {
                    data, block_size, ..
                } = lv.kind.clone()
                else {
                    unreachable_pool()?
                };
                let pool = self.load_pool(&mut st, &lv)?;
                let current = pool.usage().data_blocks * block_size;
                if size < current {
                    return Err(StorageError::Unsupported("shrinking a thin pool".into()));
                }
                self.resize_linear(&mut st, &data, size)?;
                let data_bytes = st.meta.lv(&data).map_or(0, |l| l.extents()) * st.meta.extent_size;
                pool.extend_data(data_bytes / block_size, true)
            }
        }
    }

    fn resize_linear(&self, st: &mut VgState, name: &str, size: u64) -> Result<()> {
        let count = self.extents_for(st, size)?;
        let lv = st
            .meta
            .lv(name)
            .cloned()
            .ok_or_else(|| not_found(&st.meta.name, name))?;
        let mut segments = lv.segments().to_vec();
        let have = lv.extents();
        if count == have {
            return Ok(());
        }
        if count > have {
            let last = segments.last().map(|s| (s.pv, s.pe + s.count));
            let new = allocate(&st.meta, count - have, have, &[], last)?;
            self.zero_segments(st, &new, false)?;
            append_merged(&mut segments, new);
        } else {
            truncate(&mut segments, count);
        }
        let mut meta = st.meta.clone();
        if let Some(l) = meta.lv_mut(name) {
            l.kind = LvKind::Linear { segments };
        }
        self.commit(st, meta)
    }

    /// Grows a pool's metadata volume to `size` bytes.
    pub fn resize_pool_metadata(&self, pool: &str, size: u64) -> Result<()> {
        let mut st = self.state();
        let Located::Pool(lv) = self.locate(&mut st, pool)? else {
            return Err(StorageError::InvalidInput(format!(
                "{}/{pool} is not a thin pool",
                st.meta.name
            )));
        };
        let LvKind::ThinPool { metadata, .. } = lv.kind.clone() else {
            unreachable_pool()?
        };
        let p = self.load_pool(&mut st, &lv)?;
        let have = st.meta.lv(&metadata).map_or(0, |l| l.extents()) * st.meta.extent_size;
        if size < have {
            return Err(StorageError::Unsupported(
                "shrinking a thin pool's metadata".into(),
            ));
        }
        self.resize_linear(&mut st, &metadata, size)?;
        let bytes = st.meta.lv(&metadata).map_or(0, |l| l.extents()) * st.meta.extent_size;
        p.extend_metadata(bytes / META_BLOCK as u64)
    }

    /// Every visible volume.
    pub fn list_lvs(&self) -> Result<Vec<LvInfo>> {
        let mut st = self.state();
        let vg = st.meta.name.clone();
        let mut out = Vec::new();
        let lvs: Vec<LvMeta> = st.meta.lvs.iter().filter(|l| !l.hidden).cloned().collect();
        for lv in lvs {
            match &lv.kind {
                LvKind::Linear { segments } => out.push(LvInfo {
                    name: lv.name.clone(),
                    vg: vg.clone(),
                    kind: LvType::Linear,
                    size: lv.extents() * st.meta.extent_size,
                    pool: None,
                    origin: None,
                    template: false,
                    read_only: false,
                    mapped_bytes: None,
                    usage: None,
                    segments: Some(segments.len()),
                    open: st.open_linear.contains_key(&lv.uuid),
                }),
                LvKind::ThinPool { .. } => {
                    let pool = self.load_pool(&mut st, &lv)?;
                    let usage = pool.usage();
                    out.push(LvInfo {
                        name: lv.name.clone(),
                        vg: vg.clone(),
                        kind: LvType::ThinPool,
                        size: usage.pool_bytes,
                        pool: None,
                        origin: None,
                        template: false,
                        read_only: false,
                        mapped_bytes: None,
                        usage: Some(usage),
                        segments: None,
                        open: false,
                    });
                    for d in pool.devices() {
                        out.push(LvInfo {
                            name: d.name.clone(),
                            vg: vg.clone(),
                            kind: if d.read_only && !d.template {
                                LvType::Snapshot
                            } else {
                                LvType::Thin
                            },
                            size: d.size,
                            pool: Some(lv.name.clone()),
                            origin: d.origin.clone(),
                            template: d.template,
                            read_only: d.read_only,
                            mapped_bytes: Some(d.mapped_bytes),
                            usage: None,
                            segments: None,
                            open: d.open > 0,
                        });
                    }
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Facts about one volume.
    pub fn lv_info(&self, name: &str) -> Result<LvInfo> {
        self.list_lvs()?
            .into_iter()
            .find(|l| l.name == name)
            .ok_or_else(|| not_found(&self.name(), name))
    }

    /// Opens a volume as a block device (read-only if asked or if it is a snapshot).
    pub fn open_lv(&self, name: &str, read_only: bool) -> Result<Arc<dyn BlockDevice>> {
        let mut st = self.state();
        let dev = self.open_plain(&mut st, name, read_only)?;
        let tracked = self.tracked(&mut st, name, dev.clone());
        // On failure `dev` closes here, after the group's lock is released (closing takes it).
        drop(st);
        tracked
    }

    fn open_plain(
        &self,
        st: &mut VgState,
        name: &str,
        read_only: bool,
    ) -> Result<Arc<dyn BlockDevice>> {
        let read_only = read_only || self.inner.opts.read_only;
        let full = format!("{}/{name}", st.meta.name);
        match self.locate(st, name)? {
            Located::Pool(_) => Err(StorageError::InvalidInput(format!(
                "{full} is a thin pool; open its thin volumes instead"
            ))),
            Located::Thin { pool, id, .. } => {
                let snapshot = pool.flags(id)? & FLAG_READ_ONLY != 0;
                let owner: Arc<dyn Any + Send + Sync> = Arc::new(self.clone());
                let open = OpenThin::new(pool, id, !read_only && !snapshot, owner)?;
                Ok(Arc::new(ThinDevice::new(full, read_only || snapshot, open)))
            }
            Located::Linear(lv) => {
                let map = st
                    .maps
                    .get(&lv.uuid)
                    .cloned()
                    .ok_or_else(|| not_found(&st.meta.name, name))?;
                *st.open_linear.entry(lv.uuid.clone()).or_insert(0) += 1;
                let guard: Arc<dyn Any + Send + Sync> = Arc::new(OpenLinear {
                    vg: self.clone(),
                    uuid: lv.uuid.clone(),
                });
                let vg = self.clone();
                let uuid = lv.uuid.clone();
                let resizer = Arc::new(move |size: u64| {
                    let mut st = vg.state();
                    let name = st
                        .meta
                        .lvs
                        .iter()
                        .find(|l| l.uuid == uuid)
                        .map(|l| l.name.clone())
                        .ok_or_else(|| {
                            StorageError::Unavailable("the volume was removed".into())
                        })?;
                    vg.resize_linear(&mut st, &name, size)
                });
                Ok(Arc::new(LinearDevice::new(
                    full,
                    map,
                    self.inner.pvs.clone(),
                    read_only,
                    resizer,
                    guard,
                )))
            }
        }
    }
}

fn unreachable_pool<T>() -> Result<T> {
    Err(StorageError::Unavailable(
        "a pool record changed kind".into(),
    ))
}

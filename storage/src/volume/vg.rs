//! A volume group: its PVs, its metadata and the commits that change it. Logical volume
//! operations are in `lv.rs`, checking in `vgcheck.rs`.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use serde::Serialize;

use crate::device::SharedFile;
use crate::durable::FileSystem;
use crate::error::{Result, StorageError};
use crate::volume::extents::ExtentMap;
use crate::volume::label::{read_label, Label};
use crate::volume::lock::FileLock;
use crate::volume::mda::{self, Slot};
use crate::volume::meta::{LvKind, PvMeta, VgMeta, DEFAULT_EXTENT_SIZE, MAX_PVS, META_FORMAT};
use crate::volume::name::{check_name, new_uuid, now_secs, NameKind};
use crate::volume::pvs::PvSet;
use crate::volume::thin::ThinPool;

/// A device offered to a volume group: an open file, where it came from, and its lock.
pub struct PvHandle {
    /// The open file or block device.
    pub file: SharedFile,
    /// Its path, when it is one.
    pub path: Option<PathBuf>,
    /// The lock held on it while the group is open.
    pub lock: Option<FileLock>,
}

impl fmt::Debug for PvHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PvHandle")
            .field("name", &self.file.name())
            .finish()
    }
}

impl PvHandle {
    /// A device without a path (tests use in-memory devices).
    pub fn new(file: SharedFile) -> PvHandle {
        PvHandle {
            file,
            path: None,
            lock: None,
        }
    }

    fn display(&self) -> String {
        self.path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| self.file.name().to_string())
    }
}

/// How to open a volume group.
#[derive(Clone, Debug, Default)]
pub struct VgOptions {
    /// Refuse every change; volumes open read-only.
    pub read_only: bool,
    /// Where dirty bitmaps of the group's volumes are kept (`DATA/bitmaps`); none disables them.
    pub bitmap_dir: Option<PathBuf>,
    /// The file system the bitmap files are written through (none: the host's; a crash test
    /// gives the fault-injecting engine's, see `crate::durable`).
    pub bitmap_fs: Option<Arc<dyn FileSystem>>,
}

/// One member PV, for listings.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PvInfo {
    /// Identifier.
    pub uuid: String,
    /// Path or device name.
    pub path: String,
    /// Extents.
    pub pe_count: u64,
    /// Extents in use.
    pub pe_used: u64,
    /// Problems found with its label or metadata copies.
    pub problems: Vec<String>,
}

/// A volume group, for listings.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VgInfo {
    /// Name.
    pub name: String,
    /// Identifier.
    pub uuid: String,
    /// Metadata sequence number.
    pub seqno: u64,
    /// Bytes per extent.
    pub extent_size: u64,
    /// Bytes in all PVs' extents.
    pub size: u64,
    /// Bytes not allocated to any volume.
    pub free: u64,
    /// Volumes (linear, pools and thin), not counting a pool's hidden parts.
    pub lv_count: usize,
    /// Member PVs.
    pub pvs: Vec<PvInfo>,
}

pub(crate) struct VgState {
    pub(crate) meta: VgMeta,
    pub(crate) labels: Vec<Label>,
    pub(crate) names: Vec<String>,
    pub(crate) problems: Vec<Vec<String>>,
    pub(crate) locks: Vec<Option<FileLock>>,
    /// Extent maps of linear volumes by identifier, shared with open devices.
    pub(crate) maps: HashMap<String, Arc<RwLock<ExtentMap>>>,
    /// Open pools by identifier.
    pub(crate) pools: HashMap<String, Arc<ThinPool>>,
    /// Open linear volumes by identifier: handles.
    pub(crate) open_linear: HashMap<String, u32>,
    /// Live bitmap sets by volume key (see `lvbitmap.rs`).
    pub(crate) tracked: HashMap<String, std::sync::Weak<crate::bitmap::BitmapSet>>,
    pub(crate) failed: Option<String>,
}

pub(crate) struct VgInner {
    pub(crate) pvs: PvSet,
    pub(crate) state: Mutex<VgState>,
    pub(crate) opts: VgOptions,
}

/// An open volume group. Cloning gives another handle to the same group.
#[derive(Clone)]
pub struct Vg {
    pub(crate) inner: Arc<VgInner>,
}

impl fmt::Debug for Vg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vg").field("name", &self.name()).finish()
    }
}

struct Found {
    handle: PvHandle,
    label: Label,
    label_damaged: Vec<u8>,
    slots: [Slot; 2],
}

/// Reads what each device holds; devices without a readable label are reported in `skipped`.
fn survey(candidates: Vec<PvHandle>, skipped: &mut Vec<String>) -> Vec<Found> {
    let mut out = Vec::new();
    for handle in candidates {
        let who = handle.display();
        let found = read_label(handle.file.as_ref())
            .and_then(|l| Ok((mda::read_area(handle.file.as_ref(), &l.label)?, l)));
        match found {
            Ok((slots, l)) => out.push(Found {
                handle,
                label: l.label,
                label_damaged: l.damaged,
                slots,
            }),
            Err(e) => skipped.push(format!("{who}: {e}")),
        }
    }
    out
}

/// Locks the group's state. A poisoned lock (a thread panicked while changing it) marks the
/// group failed: it refuses further commits until it is reopened (see `crate::sync`).
pub(crate) fn lock_state(inner: &VgInner) -> MutexGuard<'_, VgState> {
    crate::sync::lock_or_mark(&inner.state, |st| {
        st.failed
            .get_or_insert_with(|| crate::sync::failed("its metadata").to_string());
    })
}

impl Vg {
    /// Creates volume group `name` on labelled, unused PVs, with extents of `extent_size` bytes
    /// (0: 4 MiB).
    pub fn create(name: &str, pvs: Vec<PvHandle>, extent_size: u64, opts: VgOptions) -> Result<Vg> {
        check_name(name, NameKind::VolumeGroup)?;
        let extent_size = if extent_size == 0 {
            DEFAULT_EXTENT_SIZE
        } else {
            extent_size
        };
        if pvs.is_empty() || pvs.len() > MAX_PVS {
            return Err(StorageError::InvalidInput(format!(
                "A volume group needs 1 to {MAX_PVS} PVs"
            )));
        }
        let mut skipped = Vec::new();
        let n = pvs.len();
        let found = survey(pvs, &mut skipped);
        if found.len() != n {
            return Err(StorageError::InvalidInput(skipped.join("; ")));
        }
        let mut meta = VgMeta {
            format: META_FORMAT,
            name: name.to_string(),
            uuid: new_uuid(),
            seqno: 0,
            extent_size,
            created: now_secs(),
            pvs: Vec::new(),
            lvs: Vec::new(),
        };
        for f in &found {
            check_unused(f)?;
            meta.pvs.push(pv_meta(f, extent_size)?);
        }
        meta.validate()?;
        let vg = Vg::assemble(meta, found, opts)?;
        {
            let mut st = lock_state(&vg.inner);
            let new = st.meta.clone();
            vg.commit(&mut st, new)?;
        }
        Ok(vg)
    }

    /// Opens volume group `name` among `candidates` (devices that may hold its PVs; others are
    /// ignored). Every PV of the group must be present.
    pub fn open(candidates: Vec<PvHandle>, name: &str, opts: VgOptions) -> Result<Vg> {
        check_name(name, NameKind::VolumeGroup)?;
        let mut skipped = Vec::new();
        let found = survey(candidates, &mut skipped);
        let mut best: HashMap<String, (u64, VgMeta)> = HashMap::new();
        for f in &found {
            let Some((seq, uuid, payload)) = mda::newest(&f.slots) else {
                continue;
            };
            match VgMeta::decode(payload, &f.handle.display()) {
                Ok(m) if m.uuid == uuid => {
                    if best.get(uuid).is_none_or(|(s, _)| *s < seq) {
                        best.insert(uuid.to_string(), (seq, m));
                    }
                }
                Ok(_) => skipped.push(format!(
                    "{}: metadata names another group",
                    f.handle.display()
                )),
                Err(e) => skipped.push(format!("{}: {e}", f.handle.display())),
            }
        }
        let mut matching: Vec<VgMeta> = best
            .into_values()
            .map(|(_, m)| m)
            .filter(|m| m.name == name)
            .collect();
        let meta = match matching.len() {
            0 => {
                let mut msg = format!("volume group {name}");
                if !skipped.is_empty() {
                    msg.push_str(&format!(
                        " (devices that could not be read: {})",
                        skipped.join("; ")
                    ));
                }
                return Err(StorageError::NotFound(PathBuf::from(msg)));
            }
            1 => matching.remove(0),
            _ => {
                return Err(StorageError::InvalidInput(format!(
                    "Two volume groups are named {name}; rename one with its identifier"
                )))
            }
        };
        // Order the devices as the metadata lists the PVs; all must be there.
        let mut by_uuid: HashMap<String, Found> = HashMap::new();
        for f in found {
            by_uuid.insert(f.label.uuid.clone(), f);
        }
        let mut ordered = Vec::new();
        let mut missing = Vec::new();
        for p in &meta.pvs {
            match by_uuid.remove(&p.uuid) {
                Some(f) => ordered.push(f),
                None => missing.push(format!(
                    "{} (last seen at {})",
                    p.uuid,
                    if p.path_hint.is_empty() {
                        "an unknown place"
                    } else {
                        &p.path_hint
                    }
                )),
            }
        }
        if !missing.is_empty() {
            return Err(StorageError::Unavailable(format!(
                "volume group {name} is missing PV {}; nothing was changed",
                missing.join(", ")
            )));
        }
        for (f, p) in ordered.iter().zip(&meta.pvs) {
            let need = f.label.pe_start + p.pe_count * meta.extent_size;
            if f.handle.file.len() < need {
                return Err(StorageError::corrupt(
                    format!("PV {}", f.handle.display()),
                    format!(
                        "the device has {} bytes but its extents need {need}",
                        f.handle.file.len()
                    ),
                ));
            }
        }
        let vg = Vg::assemble(meta, ordered, opts)?;
        if !vg.inner.opts.read_only {
            vg.repair()?;
        }
        Ok(vg)
    }

    fn assemble(meta: VgMeta, found: Vec<Found>, opts: VgOptions) -> Result<Vg> {
        let mut files = Vec::new();
        let mut labels = Vec::new();
        let mut names = Vec::new();
        let mut problems = Vec::new();
        let mut locks = Vec::new();
        for f in found {
            let mut p = Vec::new();
            for c in &f.label_damaged {
                p.push(format!("label copy {c} is damaged"));
            }
            for (i, s) in f.slots.iter().enumerate() {
                match s {
                    Slot::Damaged(why) => p.push(format!("metadata copy {i} is damaged: {why}")),
                    Slot::Valid { seq, .. } if *seq != meta.seqno => p.push(format!(
                        "metadata copy {i} is stale (sequence {seq} of {})",
                        meta.seqno
                    )),
                    _ => {}
                }
            }
            problems.push(p);
            names.push(f.handle.display());
            files.push(f.handle.file.clone());
            labels.push(f.label.clone());
            locks.push(f.handle.lock);
        }
        let vg = Vg {
            inner: Arc::new(VgInner {
                pvs: Arc::new(RwLock::new(files)),
                state: Mutex::new(VgState {
                    meta,
                    labels,
                    names,
                    problems,
                    locks,
                    maps: HashMap::new(),
                    pools: HashMap::new(),
                    open_linear: HashMap::new(),
                    tracked: HashMap::new(),
                    failed: None,
                }),
                opts,
            }),
        };
        {
            let mut st = lock_state(&vg.inner);
            refresh_maps(&mut st);
        }
        Ok(vg)
    }

    /// Rewrites damaged label copies and stale or damaged metadata copies.
    fn repair(&self) -> Result<()> {
        let mut st = lock_state(&self.inner);
        if st.problems.iter().all(|p| p.is_empty()) {
            return Ok(());
        }
        let files = self.files();
        for (i, p) in st.problems.iter().enumerate() {
            if p.iter().any(|x| x.starts_with("label copy")) {
                for copy in 0..2u8 {
                    if p.iter()
                        .any(|x| x.starts_with(&format!("label copy {copy}")))
                    {
                        tracing::warn!(pv = %st.names[i], copy, "rewriting a damaged PV label copy");
                        st.labels[i].rewrite_copy(files[i].as_ref(), copy)?;
                    }
                }
            }
        }
        tracing::warn!(vg = %st.meta.name, problems = ?st.problems, "rewriting volume group metadata");
        let meta = st.meta.clone();
        self.commit(&mut st, meta)?;
        st.problems.iter_mut().for_each(Vec::clear);
        Ok(())
    }

    pub(crate) fn files(&self) -> Vec<SharedFile> {
        crate::sync::read(&self.inner.pvs).clone()
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, VgState> {
        lock_state(&self.inner)
    }

    /// The group's name.
    pub fn name(&self) -> String {
        self.state().meta.name.clone()
    }

    /// The group's identifier.
    pub fn uuid(&self) -> String {
        self.state().meta.uuid.clone()
    }

    /// A copy of the group's metadata.
    pub fn metadata(&self) -> VgMeta {
        self.state().meta.clone()
    }

    /// Whether the group was opened read-only.
    pub fn read_only(&self) -> bool {
        self.inner.opts.read_only
    }

    /// Where bitmaps of this group's volumes live, if anywhere.
    pub fn bitmap_dir(&self) -> Option<PathBuf> {
        let uuid = self.uuid();
        self.inner.opts.bitmap_dir.as_ref().map(|d| d.join(uuid))
    }

    /// Facts for listings.
    pub fn info(&self) -> VgInfo {
        let lvs = self.list_lvs().map(|l| l.len()).unwrap_or(0);
        let st = self.state();
        let m = &st.meta;
        let used = m.used_extents();
        VgInfo {
            name: m.name.clone(),
            uuid: m.uuid.clone(),
            seqno: m.seqno,
            extent_size: m.extent_size,
            size: m.pvs.iter().map(|p| p.pe_count).sum::<u64>() * m.extent_size,
            free: m.free_extents() * m.extent_size,
            lv_count: lvs,
            pvs: m
                .pvs
                .iter()
                .enumerate()
                .map(|(i, p)| PvInfo {
                    uuid: p.uuid.clone(),
                    path: st.names.get(i).cloned().unwrap_or_default(),
                    pe_count: p.pe_count,
                    pe_used: used.get(i).map_or(0, |u| u.iter().map(|r| r.1).sum()),
                    problems: st.problems.get(i).cloned().unwrap_or_default(),
                })
                .collect(),
        }
    }

    /// Writes `new` as the next metadata sequence to every PV. On failure the group refuses
    /// further changes (what is on disk is either the old or the new metadata).
    pub(crate) fn commit(&self, st: &mut VgState, mut new: VgMeta) -> Result<()> {
        if self.inner.opts.read_only {
            return Err(StorageError::ReadOnly(format!(
                "volume group {} (opened read-only)",
                st.meta.name
            )));
        }
        if let Some(f) = &st.failed {
            return Err(StorageError::Unavailable(format!(
                "volume group {} stopped after a failed metadata commit ({f}); reopen it",
                st.meta.name
            )));
        }
        new.seqno = st.meta.seqno + 1;
        new.validate()?;
        let payload = new.encode();
        let files = self.files();
        let pairs: Vec<(&dyn crate::HostFile, &Label)> = files
            .iter()
            .map(|f| f.as_ref() as &dyn crate::HostFile)
            .zip(st.labels.iter())
            .collect();
        if let Err(e) = mda::commit(&pairs, new.seqno, &new.uuid, &payload) {
            if !matches!(e, StorageError::OutOfSpace(_)) {
                st.failed = Some(e.to_string());
            }
            return Err(e);
        }
        st.meta = new;
        refresh_maps(st);
        Ok(())
    }

    /// Adds labelled, unused PVs to the group.
    pub fn extend(&self, pvs: Vec<PvHandle>) -> Result<()> {
        let mut skipped = Vec::new();
        let n = pvs.len();
        let found = survey(pvs, &mut skipped);
        if found.len() != n {
            return Err(StorageError::InvalidInput(skipped.join("; ")));
        }
        let mut st = self.state();
        let mut meta = st.meta.clone();
        for f in &found {
            check_unused(f)?;
            if meta.pv_index(&f.label.uuid).is_some() {
                return Err(StorageError::AlreadyExists(format!(
                    "PV {} in {}",
                    f.handle.display(),
                    meta.name
                )));
            }
            meta.pvs.push(pv_meta(f, meta.extent_size)?);
        }
        // The new PVs join the set first so that the commit writes to them too.
        let old_len = st.labels.len();
        {
            let mut files = crate::sync::write(&self.inner.pvs);
            for f in &found {
                files.push(f.handle.file.clone());
            }
        }
        for f in found {
            st.labels.push(f.label.clone());
            st.names.push(f.handle.display());
            st.problems.push(Vec::new());
            st.locks.push(f.handle.lock);
        }
        if let Err(e) = self.commit(&mut st, meta) {
            crate::sync::write(&self.inner.pvs).truncate(old_len);
            st.labels.truncate(old_len);
            st.names.truncate(old_len);
            st.problems.truncate(old_len);
            st.locks.truncate(old_len);
            return Err(e);
        }
        Ok(())
    }

    /// Removes an empty PV (by identifier or path) from the group and empties its metadata area.
    pub fn reduce(&self, pv: &str) -> Result<()> {
        let mut st = self.state();
        let idx = st
            .meta
            .pvs
            .iter()
            .position(|p| p.uuid == pv)
            .or_else(|| st.names.iter().position(|n| n == pv))
            .ok_or_else(|| {
                StorageError::NotFound(PathBuf::from(format!(
                    "PV {pv} in volume group {}",
                    st.meta.name
                )))
            })?;
        if st.meta.pvs.len() == 1 {
            return Err(StorageError::InvalidInput(
                "Cannot remove the last PV of a volume group (remove the group instead)".into(),
            ));
        }
        let used: u64 = st.meta.used_extents()[idx].iter().map(|r| r.1).sum();
        if used > 0 {
            return Err(StorageError::Busy(format!(
                "PV {} ({used} extents are in use)",
                st.names[idx]
            )));
        }
        if !st.open_linear.is_empty()
            || st
                .pools
                .values()
                .any(|p| p.devices().iter().any(|d| d.open > 0))
        {
            return Err(StorageError::Busy(format!(
                "volume group {} (volumes are open)",
                st.meta.name
            )));
        }
        let mut meta = st.meta.clone();
        meta.pvs.remove(idx);
        for lv in &mut meta.lvs {
            if let LvKind::Linear { segments } = &mut lv.kind {
                for s in segments.iter_mut().filter(|s| s.pv > idx) {
                    s.pv -= 1;
                }
            }
        }
        let file = crate::sync::write(&self.inner.pvs).remove(idx);
        let label = st.labels.remove(idx);
        let name = st.names.remove(idx);
        let problems = st.problems.remove(idx);
        let lock = st.locks.remove(idx);
        if let Err(e) = self.commit(&mut st, meta) {
            crate::sync::write(&self.inner.pvs).insert(idx, file);
            st.labels.insert(idx, label);
            st.names.insert(idx, name);
            st.problems.insert(idx, problems);
            st.locks.insert(idx, lock);
            return Err(e);
        }
        // Pools cache maps by index: drop them so they reopen on the new numbering.
        st.pools.clear();
        mda::wipe(file.as_ref(), &label)?;
        drop(lock);
        Ok(())
    }

    /// Removes the group, which must hold no volumes; its PVs stay labelled and become free.
    pub fn remove(self) -> Result<()> {
        let st = self.state();
        if self.inner.opts.read_only {
            return Err(StorageError::ReadOnly(format!(
                "volume group {}",
                st.meta.name
            )));
        }
        let visible = st.meta.lvs.iter().filter(|l| !l.hidden).count();
        if visible > 0 {
            return Err(StorageError::Busy(format!(
                "volume group {} ({visible} volumes remain; remove them first)",
                st.meta.name
            )));
        }
        let files = self.files();
        for (f, l) in files.iter().zip(&st.labels) {
            mda::wipe(f.as_ref(), l)?;
        }
        Ok(())
    }
}

/// Makes `file` a PV: writes a new label and empty metadata slots. Refuses a device that
/// already carries a label (valid or damaged).
pub fn format_pv(file: &dyn crate::HostFile) -> Result<Label> {
    match read_label(file) {
        Ok(l) => {
            return Err(StorageError::AlreadyExists(format!(
                "Strata PV label on {} (identifier {})",
                file.name(),
                l.label.uuid
            )))
        }
        Err(StorageError::Corrupt { .. }) => {
            return Err(StorageError::InvalidInput(format!(
                "{} carries a damaged Strata PV label; refusing to overwrite it",
                file.name()
            )))
        }
        Err(_) => {}
    }
    if file.len() < crate::volume::label::MIN_PV_SIZE {
        return Err(StorageError::InvalidInput(format!(
            "{} has {} bytes; a PV needs at least {}",
            file.name(),
            file.len(),
            crate::volume::label::MIN_PV_SIZE
        )));
    }
    let label = Label::new(file.len());
    mda::wipe(file, &label)?;
    label.write(file)?;
    Ok(label)
}

fn check_unused(f: &Found) -> Result<()> {
    if let Some((_, uuid, payload)) = mda::newest(&f.slots) {
        let group = VgMeta::decode(payload, &f.handle.display())
            .map(|m| m.name)
            .unwrap_or_else(|_| uuid.to_string());
        return Err(StorageError::InvalidInput(format!(
            "{} already belongs to volume group {group}",
            f.handle.display()
        )));
    }
    if f.slots.iter().any(|s| matches!(s, Slot::Damaged(_))) {
        return Err(StorageError::corrupt(
            format!("PV {}", f.handle.display()),
            "its metadata area is damaged but holds no valid copy; recreate it with pv create",
        ));
    }
    Ok(())
}

fn pv_meta(f: &Found, extent_size: u64) -> Result<PvMeta> {
    let pe_count = f.handle.file.len().saturating_sub(f.label.pe_start) / extent_size;
    if pe_count == 0 {
        return Err(StorageError::InvalidInput(format!(
            "{} is too small for one extent of {extent_size} bytes",
            f.handle.display()
        )));
    }
    Ok(PvMeta {
        uuid: f.label.uuid.clone(),
        pe_count,
        path_hint: f.handle.display(),
    })
}

/// Rebuilds the extent maps of linear volumes after the metadata changed, in place so that
/// open devices see the change.
pub(crate) fn refresh_maps(st: &mut VgState) {
    let pe_starts: Vec<u64> = st.labels.iter().map(|l| l.pe_start).collect();
    let extent_size = st.meta.extent_size;
    let mut keep = std::collections::HashSet::new();
    for lv in &st.meta.lvs {
        if let LvKind::Linear { segments } = &lv.kind {
            let m = ExtentMap::new(segments, extent_size, &pe_starts);
            keep.insert(lv.uuid.clone());
            match st.maps.get(&lv.uuid) {
                Some(existing) => *crate::sync::write(existing) = m,
                None => {
                    st.maps.insert(lv.uuid.clone(), Arc::new(RwLock::new(m)));
                }
            }
        }
    }
    st.maps.retain(|k, _| keep.contains(k));
}

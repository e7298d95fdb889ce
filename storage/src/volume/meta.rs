//! The volume group metadata: which PVs make the group, which extents each logical volume
//! occupies, and which volumes form thin pools. Stored as JSON in every PV's metadata area
//! (`mda.rs`) and checked thoroughly when read, since it comes from disk.
//!
//! Thin volumes, snapshots and clones are not listed here: they live in their pool's own
//! metadata (see `thin/`), so that creating one is a single atomic pool commit.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::error::{Result, StorageError};
use crate::volume::name::{check_name, is_uuid, NameKind, POOL_DATA_SUFFIX, POOL_META_SUFFIX};

/// Metadata format version.
pub const META_FORMAT: u32 = 1;
/// Default extent size.
pub const DEFAULT_EXTENT_SIZE: u64 = 4 << 20;
/// Most logical volumes (linear and pools) in one group.
pub const MAX_LVS: usize = 10_000;
/// Most PVs in one group.
pub const MAX_PVS: usize = 256;
/// Most segments of one linear volume.
pub const MAX_SEGMENTS: usize = 4096;

/// Volume group metadata.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VgMeta {
    /// Format version ([`META_FORMAT`]).
    pub format: u32,
    /// The group's name.
    pub name: String,
    /// The group's identifier.
    pub uuid: String,
    /// Commit sequence number (also in each slot header).
    pub seqno: u64,
    /// Bytes per extent.
    pub extent_size: u64,
    /// Creation time, seconds since the epoch.
    pub created: u64,
    /// Member PVs, in order; segments refer to them by identifier.
    pub pvs: Vec<PvMeta>,
    /// Logical volumes: linear ones (including a pool's hidden parts) and pools.
    pub lvs: Vec<LvMeta>,
}

/// A member PV.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PvMeta {
    /// The PV's identifier (as in its label).
    pub uuid: String,
    /// Extents it holds.
    pub pe_count: u64,
    /// Where it was last seen, for messages about a missing PV.
    #[serde(default)]
    pub path_hint: String,
}

/// A logical volume.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LvMeta {
    /// Its name.
    pub name: String,
    /// Its identifier.
    pub uuid: String,
    /// Creation time.
    pub created: u64,
    /// Internal (a pool's data or metadata volume): not listed, not opened by name.
    #[serde(default)]
    pub hidden: bool,
    /// Layout.
    pub kind: LvKind,
}

/// How a logical volume is laid out.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum LvKind {
    /// Extents on PVs, in logical order.
    Linear {
        /// Runs of extents.
        segments: Vec<Segment>,
    },
    /// A thin pool made of two hidden linear volumes.
    ThinPool {
        /// The data volume's name (`POOL_tdata`).
        data: String,
        /// The metadata volume's name (`POOL_tmeta`).
        metadata: String,
        /// Bytes per data block.
        block_size: u64,
    },
}

/// A run of extents of a linear volume.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Segment {
    /// First logical extent.
    pub le: u64,
    /// Extents in the run.
    pub count: u64,
    /// Index of the PV in [`VgMeta::pvs`].
    pub pv: usize,
    /// First physical extent on that PV.
    pub pe: u64,
}

impl LvMeta {
    /// Extents of a linear volume (0 for a pool).
    pub fn extents(&self) -> u64 {
        match &self.kind {
            LvKind::Linear { segments } => segments.iter().map(|s| s.count).sum(),
            LvKind::ThinPool { .. } => 0,
        }
    }

    /// The segments of a linear volume.
    pub fn segments(&self) -> &[Segment] {
        match &self.kind {
            LvKind::Linear { segments } => segments,
            LvKind::ThinPool { .. } => &[],
        }
    }
}

impl VgMeta {
    /// Parses and checks metadata read from `source`.
    pub fn decode(payload: &[u8], source: &str) -> Result<VgMeta> {
        let m: VgMeta = serde_json::from_slice(payload).map_err(|e| {
            StorageError::corrupt(
                format!("volume group metadata on {source}"),
                format!("not valid metadata JSON: {e}"),
            )
        })?;
        m.validate().map_err(|e| match e {
            StorageError::InvalidInput(d) => {
                StorageError::corrupt(format!("volume group metadata on {source}"), d)
            }
            other => other,
        })?;
        Ok(m)
    }

    /// The metadata as JSON.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Finds a volume by name.
    pub fn lv(&self, name: &str) -> Option<&LvMeta> {
        self.lvs.iter().find(|l| l.name == name)
    }

    /// Finds a volume by name, mutably.
    pub fn lv_mut(&mut self, name: &str) -> Option<&mut LvMeta> {
        self.lvs.iter_mut().find(|l| l.name == name)
    }

    /// Index of a PV by identifier.
    pub fn pv_index(&self, uuid: &str) -> Option<usize> {
        self.pvs.iter().position(|p| p.uuid == uuid)
    }

    /// Extents in use on each PV, as sorted `(pe, count)` runs.
    pub fn used_extents(&self) -> Vec<Vec<(u64, u64)>> {
        let mut used: Vec<Vec<(u64, u64)>> = vec![Vec::new(); self.pvs.len()];
        for lv in &self.lvs {
            for s in lv.segments() {
                if let Some(u) = used.get_mut(s.pv) {
                    u.push((s.pe, s.count));
                }
            }
        }
        for u in &mut used {
            u.sort_unstable();
        }
        used
    }

    /// Free extents in the whole group.
    pub fn free_extents(&self) -> u64 {
        let total: u64 = self.pvs.iter().map(|p| p.pe_count).sum();
        let used: u64 = self.lvs.iter().map(|l| l.extents()).sum();
        total.saturating_sub(used)
    }

    /// Checks every invariant; the error names the first violation.
    pub fn validate(&self) -> Result<()> {
        let bad = |d: String| Err(StorageError::InvalidInput(d));
        if self.format != META_FORMAT {
            return Err(StorageError::Unsupported(format!(
                "volume group metadata format {} (this build reads {META_FORMAT})",
                self.format
            )));
        }
        check_name(&self.name, NameKind::VolumeGroup)?;
        if !is_uuid(&self.uuid) {
            return bad(format!(
                "malformed group identifier '{}'",
                self.uuid.escape_debug()
            ));
        }
        if !self.extent_size.is_power_of_two() || !(64 << 10..=1 << 30).contains(&self.extent_size)
        {
            return bad(format!(
                "extent size {} is not a power of two from 64 KiB to 1 GiB",
                self.extent_size
            ));
        }
        if self.pvs.is_empty() || self.pvs.len() > MAX_PVS {
            return bad(format!("{} PVs (1 to {MAX_PVS} allowed)", self.pvs.len()));
        }
        let mut seen = HashSet::new();
        for p in &self.pvs {
            if !is_uuid(&p.uuid) || !seen.insert(p.uuid.as_str()) {
                return bad(format!(
                    "PV identifier '{}' is malformed or repeated",
                    p.uuid.escape_debug()
                ));
            }
            // Bounded in bytes, not only in extents: pe_count × extent_size (and the group's
            // sum over MAX_PVS PVs) must stay far inside u64 or extent offsets would wrap.
            if p.pe_count > 1 << 40
                || p.pe_count
                    .checked_mul(self.extent_size)
                    .is_none_or(|bytes| bytes > 1 << 60)
            {
                return bad(format!("PV {} claims {} extents", p.uuid, p.pe_count));
            }
        }
        if self.lvs.len() > MAX_LVS {
            return bad(format!("{} volumes (at most {MAX_LVS})", self.lvs.len()));
        }
        let mut names = HashSet::new();
        let mut uuids = HashSet::new();
        for lv in &self.lvs {
            self.check_lv_name(lv)?;
            if !names.insert(lv.name.as_str()) {
                return bad(format!("volume name '{}' is repeated", lv.name));
            }
            if !is_uuid(&lv.uuid) || !uuids.insert(lv.uuid.as_str()) {
                return bad(format!(
                    "volume {} has a malformed or repeated identifier",
                    lv.name
                ));
            }
            match &lv.kind {
                LvKind::Linear { segments } => self.check_segments(&lv.name, segments)?,
                LvKind::ThinPool {
                    data,
                    metadata,
                    block_size,
                } => {
                    if *data != format!("{}{POOL_DATA_SUFFIX}", lv.name)
                        || *metadata != format!("{}{POOL_META_SUFFIX}", lv.name)
                    {
                        return bad(format!(
                            "pool {} names the wrong data or metadata volume",
                            lv.name
                        ));
                    }
                    for part in [data, metadata] {
                        match self.lv(part) {
                            Some(p) if p.hidden && matches!(p.kind, LvKind::Linear { .. }) => {}
                            _ => return bad(format!("pool {} lacks its volume {part}", lv.name)),
                        }
                    }
                    check_block_size(*block_size, self.extent_size)?;
                }
            }
        }
        // No extent belongs to two segments.
        for (i, runs) in self.used_extents().iter().enumerate() {
            for w in runs.windows(2) {
                if w[0].0 + w[0].1 > w[1].0 {
                    return bad(format!(
                        "extent {} of PV {} is used twice",
                        w[1].0, self.pvs[i].uuid
                    ));
                }
            }
        }
        Ok(())
    }

    fn check_lv_name(&self, lv: &LvMeta) -> Result<()> {
        if lv.hidden {
            let base = lv
                .name
                .strip_suffix(POOL_DATA_SUFFIX)
                .or_else(|| lv.name.strip_suffix(POOL_META_SUFFIX))
                .ok_or_else(|| {
                    StorageError::InvalidInput(format!(
                        "hidden volume {} is not a pool part",
                        lv.name
                    ))
                })?;
            check_name(base, NameKind::LogicalVolume)
        } else {
            check_name(&lv.name, NameKind::LogicalVolume)
        }
    }

    fn check_segments(&self, name: &str, segments: &[Segment]) -> Result<()> {
        let bad = |d: String| Err(StorageError::InvalidInput(d));
        if segments.is_empty() || segments.len() > MAX_SEGMENTS {
            return bad(format!("volume {name} has {} segments", segments.len()));
        }
        let mut le = 0u64;
        for s in segments {
            let Some(pv) = self.pvs.get(s.pv) else {
                return bad(format!("volume {name} refers to PV #{}", s.pv));
            };
            if s.le != le
                || s.count == 0
                || s.pe.checked_add(s.count).is_none_or(|e| e > pv.pe_count)
            {
                return bad(format!(
                    "volume {name} has a bad segment (le {} count {} pe {} on a PV of {} extents)",
                    s.le, s.count, s.pe, pv.pe_count
                ));
            }
            le += s.count;
        }
        Ok(())
    }

    /// Volumes by name, for listing.
    pub fn by_name(&self) -> BTreeMap<&str, &LvMeta> {
        self.lvs.iter().map(|l| (l.name.as_str(), l)).collect()
    }
}

/// Checks a thin pool's data block size against the group's extent size.
pub fn check_block_size(block_size: u64, extent_size: u64) -> Result<()> {
    if !block_size.is_power_of_two()
        || !(4096..=64 << 20).contains(&block_size)
        || block_size > extent_size
    {
        return Err(StorageError::InvalidInput(format!(
            "thin pool block size {block_size} must be a power of two from 4 KiB to 64 MiB and at most the extent size ({extent_size})"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::name::new_uuid;

    fn sample() -> VgMeta {
        VgMeta {
            format: META_FORMAT,
            name: "vg0".into(),
            uuid: new_uuid(),
            seqno: 1,
            extent_size: DEFAULT_EXTENT_SIZE,
            created: 0,
            pvs: vec![PvMeta {
                uuid: new_uuid(),
                pe_count: 10,
                path_hint: "/dev/x".into(),
            }],
            lvs: vec![LvMeta {
                name: "a".into(),
                uuid: new_uuid(),
                created: 0,
                hidden: false,
                kind: LvKind::Linear {
                    segments: vec![Segment {
                        le: 0,
                        count: 4,
                        pv: 0,
                        pe: 0,
                    }],
                },
            }],
        }
    }

    #[test]
    fn metadata_round_trips() {
        let m = sample();
        assert_eq!(VgMeta::decode(&m.encode(), "test").unwrap(), m);
    }

    #[test]
    fn overlapping_or_out_of_range_extents_are_corrupt() {
        let mut m = sample();
        m.lvs.push(LvMeta {
            name: "b".into(),
            uuid: new_uuid(),
            created: 0,
            hidden: false,
            kind: LvKind::Linear {
                segments: vec![Segment {
                    le: 0,
                    count: 2,
                    pv: 0,
                    pe: 3,
                }],
            },
        });
        let e = VgMeta::decode(&m.encode(), "t").unwrap_err().to_string();
        assert!(e.contains("used twice"), "{e}");
        let mut m = sample();
        m.lvs[0].kind = LvKind::Linear {
            segments: vec![Segment {
                le: 0,
                count: 11,
                pv: 0,
                pe: 0,
            }],
        };
        assert!(VgMeta::decode(&m.encode(), "t").is_err());
        assert!(VgMeta::decode(b"{not json", "t").is_err());
    }
}

//! Checking a thin pool: re-derive every reference count from the trees and compare with the
//! counts the pool maintains (a block counted but unreachable is leaked; a block reachable more
//! often than counted could be handed out twice), check the structure of every tree, that all
//! references to one data block agree on when it was allocated (two unrelated references would
//! be a block owned twice), and that the committed metadata on disk loads and matches.

use std::collections::HashMap;

use serde::Serialize;

use crate::volume::thin::format::{birth_of, block_of};
use crate::volume::thin::load;
use crate::volume::thin::pool::{PoolState, ThinPool};

/// Most problems listed (the count is still exact).
const MAX_LISTED: usize = 50;

/// The result of checking a pool.
#[derive(Clone, Debug, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub struct PoolCheck {
    /// `VG/POOL`.
    pub pool: String,
    /// Problems found (at most 50 listed).
    pub errors: Vec<String>,
    /// Problems found in total.
    pub error_count: usize,
    /// Thin devices.
    pub devices: usize,
    /// Mappings over all devices.
    pub mapped_blocks: u64,
    /// Data blocks in use.
    pub used_blocks: u64,
    /// Data blocks referenced by more than one device.
    pub shared_blocks: u64,
    /// Metadata blocks in use.
    pub used_metadata_blocks: u64,
}

impl PoolCheck {
    fn error(&mut self, e: String) {
        self.error_count += 1;
        if self.errors.len() < MAX_LISTED {
            self.errors.push(e);
        }
    }

    /// Whether nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.error_count == 0
    }
}

struct Derived {
    meta: Vec<u32>,
    data: Vec<u32>,
    births: Vec<u32>,
    keys: HashMap<u64, u64>,
}

fn visit(
    st: &PoolState,
    d: &mut Derived,
    out: &mut PoolCheck,
    b: u64,
    level: Option<u8>,
    lo: u64,
    hi: u64,
) -> u64 {
    let Some(slot) = d.meta.get_mut(b as usize) else {
        out.error(format!("node reference {b} is out of range"));
        return 0;
    };
    *slot += 1;
    if *slot > 1 {
        return d.keys.get(&b).copied().unwrap_or(0);
    }
    let n = match st.forest.node(b) {
        Ok(n) => n,
        Err(e) => {
            out.error(e.to_string());
            return 0;
        }
    };
    if level.is_some_and(|l| l != n.level) {
        out.error(format!(
            "node {b} has level {} where {:?} was expected",
            n.level, level
        ));
    }
    if n.keys.is_empty() {
        out.error(format!("node {b} is empty"));
    }
    if n.keys.windows(2).any(|w| w[0] >= w[1]) {
        out.error(format!("node {b} has keys out of order"));
    }
    if n.keys.first().is_some_and(|&k| k < lo) || n.keys.last().is_some_and(|&k| k >= hi) {
        out.error(format!("node {b} holds keys outside its parent's range"));
    }
    let count = if n.level == 0 {
        for &v in &n.vals {
            let blk = block_of(v);
            match d.data.get_mut(blk as usize) {
                None => out.error(format!("node {b} maps data block {blk} beyond the pool")),
                Some(r) => {
                    *r += 1;
                    let birth = birth_of(v) as u32;
                    let seen = &mut d.births[blk as usize];
                    if *seen == u32::MAX {
                        *seen = birth;
                    } else if *seen != birth {
                        out.error(format!(
                            "data block {blk} is mapped by unrelated leaves (allocated in transactions {} and {birth}): owned twice",
                            *seen
                        ));
                    }
                }
            }
        }
        n.keys.len() as u64
    } else {
        let mut sum = 0;
        for i in 0..n.keys.len() {
            let end = n.keys.get(i + 1).copied().unwrap_or(hi);
            sum += visit(
                st,
                d,
                out,
                n.vals[i],
                n.level.checked_sub(1),
                n.keys[i],
                end,
            );
        }
        sum
    };
    d.keys.insert(b, count);
    count
}

impl ThinPool {
    /// Checks the pool as it is in memory and as committed on disk. See the module
    /// documentation.
    pub fn check(&self) -> PoolCheck {
        let mut out = PoolCheck {
            pool: self.name.clone(),
            ..PoolCheck::default()
        };
        let (dirty, live_devices) = {
            let st = self.lock_state();
            self.check_state(&st, &mut out);
            (
                st.dirty,
                st.devices
                    .values()
                    .map(|d| d.entry.clone())
                    .collect::<Vec<_>>(),
            )
        };
        // The committed state must load and, when nothing is uncommitted, match memory.
        match load::open(
            &self.name,
            &self.uuid,
            self.block_size,
            self.meta.clone(),
            self.data_map.clone(),
            self.pvs.clone(),
            true,
        ) {
            Err(e) => out.error(format!("the committed metadata does not load: {e}")),
            Ok((disk, _)) => {
                if !dirty {
                    let st = disk.lock_state();
                    let on_disk: Vec<_> = st.devices.values().map(|d| d.entry.clone()).collect();
                    let strip = |v: &[crate::volume::thin::format::DevEntry]| {
                        v.iter()
                            .map(|e| (e.id, e.name.clone(), e.size, e.mapped, e.flags))
                            .collect::<Vec<_>>()
                    };
                    if strip(&on_disk) != strip(&live_devices) {
                        out.error(
                            "the committed device table differs from the one in memory".into(),
                        );
                    }
                }
            }
        }
        out
    }

    fn check_state(&self, st: &PoolState, out: &mut PoolCheck) {
        let meta_len = st.forest.meta.len();
        let data_len = st.forest.data.len();
        let mut d = Derived {
            meta: vec![0; meta_len as usize],
            data: vec![0; data_len as usize],
            births: vec![u32::MAX; data_len as usize],
            keys: HashMap::new(),
        };
        d.meta[0] = 1;
        d.meta[1] = 1;
        for &b in &st.table_blocks {
            if let Some(r) = d.meta.get_mut(b as usize) {
                *r += 1;
            }
        }
        out.devices = st.devices.len();
        for dev in st.devices.values() {
            let e = &dev.entry;
            let keys = if e.root == 0 {
                0
            } else {
                visit(st, &mut d, out, e.root, None, 0, u64::MAX)
            };
            if keys != e.mapped {
                out.error(format!(
                    "device {} maps {keys} blocks but records {}",
                    e.name, e.mapped
                ));
            }
            out.mapped_blocks += keys;
            if let Ok(Some(k)) = st.forest.next_mapped(e.root, e.size / self.block_size) {
                out.error(format!("device {} maps block {k} beyond its size", e.name));
            }
        }
        for b in 0..meta_len {
            let (want, have) = (d.meta[b as usize], st.forest.meta.refs(b));
            if want != have {
                out.error(format!(
                    "metadata block {b}: counted {have}, referenced {want} times{}",
                    if want == 0 { " (leaked)" } else { "" }
                ));
            }
            if want > 0 && st.forest.meta.is_held(b) {
                out.error(format!(
                    "metadata block {b} is in use and also waiting to be freed"
                ));
            }
        }
        let provisioning: std::collections::HashSet<u64> =
            st.provisioning.values().copied().collect();
        for b in 0..data_len {
            let want = d.data[b as usize] + u32::from(provisioning.contains(&b));
            let have = st.forest.data.refs(b);
            if want != have {
                out.error(format!(
                    "data block {b}: counted {have}, referenced {want} times{}",
                    if want == 0 { " (leaked)" } else { "" }
                ));
            }
            if want > 0 && st.forest.data.is_held(b) {
                out.error(format!(
                    "data block {b} is in use and also waiting to be freed"
                ));
            }
            if d.data[b as usize] > 1 {
                out.shared_blocks += 1;
            }
        }
        out.used_blocks = st.forest.data.used();
        out.used_metadata_blocks = st.forest.meta.used();
    }
}

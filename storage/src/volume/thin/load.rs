//! Formatting a new pool's metadata, and opening a pool: read the newest valid superblock, the
//! device table, and every node reachable from a device root, deriving the reference counts
//! (see `pool.rs`) and checking the result against the superblock.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};

use crate::error::{Result, StorageError};
use crate::volume::extents::ExtentMap;
use crate::volume::name::{check_name, NameKind};
use crate::volume::pvs::PvSet;
use crate::volume::region::Region;
use crate::volume::thin::btree::Forest;
use crate::volume::thin::format::{block_of, decode_table, Node, Superblock, META_BLOCK};
use crate::volume::thin::pool::{Dev, PoolState, ThinPool};
use crate::volume::thin::space::{BitSet, Epochs, Space};

/// Metadata read in chunks of this size while loading (nodes written together sit together).
const READ_CHUNK: u64 = 1 << 20;

/// Writes the metadata of an empty pool: transaction 1 in superblock slot 1, slot 0 zeroed.
/// `data_zeroed` says the data volume reads as zeros throughout.
pub fn format(
    meta: &Region,
    uuid: &str,
    block_size: u64,
    data_blocks: u64,
    data_zeroed: bool,
) -> Result<()> {
    let meta_blocks = meta.size() / META_BLOCK as u64;
    if meta_blocks < 16 {
        return Err(StorageError::InvalidInput(
            "a thin pool's metadata volume needs at least 64 KiB".into(),
        ));
    }
    let sb = Superblock {
        seq: 1,
        pool_uuid: uuid.to_string(),
        block_size: block_size as u32,
        data_blocks,
        meta_blocks,
        used_data: 0,
        used_meta: 2,
        device_count: 0,
        next_id: 1,
        zero_from: if data_zeroed { 0 } else { data_blocks },
        chunks: Vec::new(),
    };
    meta.write(0, &[0u8; META_BLOCK])?;
    meta.write(META_BLOCK as u64, &sb.encode())?;
    meta.sync()
}

/// Reads metadata blocks through a small cache of 1 MiB chunks.
struct Reader<'a> {
    meta: &'a Region,
    cache: HashMap<u64, Vec<u8>>,
    order: Vec<u64>,
}

impl Reader<'_> {
    fn block(&mut self, b: u64) -> Result<&[u8]> {
        let offset = b * META_BLOCK as u64;
        let chunk = offset / READ_CHUNK;
        if !self.cache.contains_key(&chunk) {
            let start = chunk * READ_CHUNK;
            let len = READ_CHUNK.min(self.meta.size().saturating_sub(start)) as usize;
            let mut buf = vec![0u8; len];
            self.meta.read(start, &mut buf)?;
            if self.order.len() >= 16 {
                let old = self.order.remove(0);
                self.cache.remove(&old);
            }
            self.order.push(chunk);
            self.cache.insert(chunk, buf);
        }
        let within = (offset % READ_CHUNK) as usize;
        self.cache
            .get(&chunk)
            .and_then(|c| c.get(within..within + META_BLOCK))
            .ok_or_else(|| {
                StorageError::corrupt(
                    self.meta.name(),
                    format!("metadata block {b} is beyond the volume"),
                )
            })
    }
}

/// What opening a pool found worth reporting.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Problems that did not stop the open (a damaged older superblock).
    pub warnings: Vec<String>,
}

struct Walker<'a, 'b> {
    reader: &'a mut Reader<'b>,
    forest: &'a mut Forest,
    sb: &'a Superblock,
    keys_below: HashMap<u64, u64>,
    what: String,
}

impl Walker<'_, '_> {
    /// Visits node `b` expected at `level` with keys in `lo..hi`; returns its key count.
    fn visit(&mut self, b: u64, level: Option<u8>, lo: u64, hi: u64) -> Result<u64> {
        let bad = |d: String| StorageError::corrupt(self.what.clone(), d);
        if b < 2 || b >= self.sb.meta_blocks {
            return Err(bad(format!("node reference {b} is out of range")));
        }
        let seen = self.forest.meta.refs(b) > 0;
        self.forest.meta.load_ref(b);
        if seen {
            let n = self
                .forest
                .node(b)
                .map_err(|_| bad(format!("block {b} is both a node and a table chunk")))?;
            if level.is_some_and(|l| l != n.level) {
                return Err(bad(format!("node {b} is reached at two different levels")));
            }
            if n.keys.first().is_some_and(|&k| k < lo) || n.keys.last().is_some_and(|&k| k >= hi) {
                return Err(bad(format!(
                    "shared node {b} holds keys outside its parent's range"
                )));
            }
            return Ok(self.keys_below.get(&b).copied().unwrap_or(0));
        }
        let node = Node::decode(self.reader.block(b)?, b, self.sb.seq, &self.what)?;
        if level.is_some_and(|l| l != node.level) {
            return Err(bad(format!(
                "node {b} has level {} where {} was expected",
                node.level,
                level.unwrap_or(0)
            )));
        }
        if node.keys.first().is_some_and(|&k| k < lo) || node.keys.last().is_some_and(|&k| k >= hi)
        {
            return Err(bad(format!(
                "node {b} holds keys outside its parent's range"
            )));
        }
        let count = if node.level == 0 {
            for &v in &node.vals {
                let d = block_of(v);
                if d >= self.sb.data_blocks {
                    return Err(bad(format!(
                        "node {b} maps data block {d} of {}",
                        self.sb.data_blocks
                    )));
                }
                self.forest.data.load_ref(d);
            }
            node.keys.len() as u64
        } else {
            let mut sum = 0;
            for i in 0..node.keys.len() {
                let end = node.keys.get(i + 1).copied().unwrap_or(hi);
                sum += self.visit(node.vals[i], Some(node.level - 1), node.keys[i], end)?;
            }
            sum
        };
        self.keys_below.insert(b, count);
        self.forest.put_loaded(b, node);
        Ok(count)
    }
}

/// Reads the newest valid superblock of the pool `uuid`.
pub fn read_superblock(meta: &Region, uuid: &str, what: &str) -> Result<(Superblock, Vec<String>)> {
    let mut found = Vec::new();
    let mut problems = Vec::new();
    for slot in 0..2u64 {
        let mut b = vec![0u8; META_BLOCK];
        meta.read(slot * META_BLOCK as u64, &mut b)?;
        match Superblock::decode(&b, slot, what) {
            Ok(Some(sb)) if sb.pool_uuid == uuid => found.push(sb),
            Ok(Some(_)) => problems.push(format!("superblock {slot} belongs to another pool")),
            Ok(None) => {}
            Err(StorageError::Corrupt { detail, .. }) => problems.push(detail),
            Err(e) => return Err(e),
        }
    }
    found.sort_by_key(|sb| sb.seq);
    match found.pop() {
        Some(sb) => {
            if !problems.is_empty() {
                tracing::warn!(
                    pool = what,
                    ?problems,
                    "using the newest valid thin pool superblock"
                );
            }
            Ok((sb, problems))
        }
        None => Err(StorageError::corrupt(
            what,
            format!(
                "no valid superblock ({})",
                if problems.is_empty() {
                    "both slots are empty".to_string()
                } else {
                    problems.join("; ")
                }
            ),
        )),
    }
}

/// Opens the pool `name` (`VG/POOL`) with identifier `uuid`.
#[allow(clippy::too_many_arguments)]
pub fn open(
    name: &str,
    uuid: &str,
    block_size: u64,
    meta: Region,
    data_map: Arc<RwLock<ExtentMap>>,
    pvs: PvSet,
    read_only: bool,
) -> Result<(ThinPool, LoadReport)> {
    let what = format!("thin pool {name} metadata");
    let (sb, warnings) = read_superblock(&meta, uuid, &what)?;
    let bad = |d: String| StorageError::corrupt(what.clone(), d);
    if u64::from(sb.block_size) != block_size {
        return Err(bad(format!(
            "block size {} where the volume group says {block_size}",
            sb.block_size
        )));
    }
    let region_blocks = meta.size() / META_BLOCK as u64;
    if sb.meta_blocks > region_blocks {
        return Err(bad(format!(
            "{} metadata blocks on a volume of {region_blocks}",
            sb.meta_blocks
        )));
    }
    let data_lv_blocks = crate::sync::read(&data_map).size() / block_size;
    if sb.data_blocks > data_lv_blocks {
        return Err(bad(format!(
            "{} data blocks on a data volume of {data_lv_blocks}",
            sb.data_blocks
        )));
    }
    let mut meta_space = Space::new(sb.meta_blocks, false);
    meta_space.reserve(0);
    meta_space.reserve(1);
    let mut forest = Forest::new(meta_space, Space::new(sb.data_blocks, true));
    let mut reader = Reader {
        meta: &meta,
        cache: HashMap::new(),
        order: Vec::new(),
    };
    let mut entries = Vec::new();
    for &c in &sb.chunks {
        if forest.meta.refs(c) > 0 {
            return Err(bad(format!("device table block {c} is listed twice")));
        }
        forest.meta.load_ref(c);
        entries.extend(decode_table(reader.block(c)?, c, sb.seq, &what)?);
    }
    if entries.len() != sb.device_count as usize {
        return Err(bad(format!(
            "{} devices where the superblock says {}",
            entries.len(),
            sb.device_count
        )));
    }
    let mut devices = BTreeMap::new();
    let mut names = HashSet::new();
    let mut walker = Walker {
        reader: &mut reader,
        forest: &mut forest,
        sb: &sb,
        keys_below: HashMap::new(),
        what: what.clone(),
    };
    for e in entries {
        check_name(&e.name, NameKind::LogicalVolume)
            .map_err(|err| bad(format!("device #{}: {err}", e.id)))?;
        if e.id >= sb.next_id || devices.contains_key(&e.id) || !names.insert(e.name.clone()) {
            return Err(bad(format!(
                "device #{} ({}) has a repeated or impossible identifier or name",
                e.id, e.name
            )));
        }
        if e.size == 0 || e.size % block_size != 0 {
            return Err(bad(format!("device {} has size {}", e.name, e.size)));
        }
        let blocks = e.size / block_size;
        let keys = if e.root == 0 {
            0
        } else {
            walker.visit(e.root, None, 0, u64::MAX)?
        };
        if keys != e.mapped {
            return Err(bad(format!(
                "device {} maps {keys} blocks where its entry says {}",
                e.name, e.mapped
            )));
        }
        let last = walker.forest.next_mapped(e.root, blocks)?;
        if let Some(k) = last {
            return Err(bad(format!(
                "device {} maps block {k} beyond its size",
                e.name
            )));
        }
        devices.insert(
            e.id,
            Dev {
                entry: e,
                frozen: false,
                writes_in_flight: 0,
                open: 0,
            },
        );
    }
    if forest.meta.used() != sb.used_meta || forest.data.used() != sb.used_data {
        return Err(bad(format!(
            "space accounting disagrees with the trees: metadata {} used of {} recorded, data {} of {}",
            forest.meta.used(),
            sb.used_meta,
            forest.data.used(),
            sb.used_data
        )));
    }
    let mut dirty = false;
    if !read_only {
        if region_blocks > sb.meta_blocks {
            forest.grow_meta(region_blocks);
            dirty = true;
        }
        if data_lv_blocks > sb.data_blocks {
            // The data volume grew but the crash came before the pool recorded it; whether
            // the new part was zeroed is not known.
            forest.data.grow(data_lv_blocks);
            dirty = true;
        }
    }
    forest.reserve = crate::volume::thin::pool::table_reserve(devices.len());
    let mut known_zero = BitSet::new(forest.data.len());
    for b in sb.zero_from..sb.data_blocks {
        known_zero.set(b, true);
    }
    let zero_from = if forest.data.len() > sb.data_blocks {
        forest.data.len()
    } else {
        sb.zero_from
    };
    let state = PoolState {
        forest,
        devices,
        seq: sb.seq,
        next_id: sb.next_id,
        dirty,
        failed: None,
        provisioning: HashMap::new(),
        epochs: Epochs::default(),
        table_blocks: sb.chunks.clone(),
        zero_from,
        zero_from_durable: sb.zero_from,
        known_zero,
        events: Default::default(),
    };
    let pool = ThinPool::from_parts(
        name.to_string(),
        uuid.to_string(),
        block_size,
        meta,
        data_map,
        pvs,
        read_only,
        state,
    );
    if dirty {
        pool.commit()?;
    }
    Ok((pool, LoadReport { warnings }))
}

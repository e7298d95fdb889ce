//! Copy-on-write B+trees that map a thin device's virtual blocks to data blocks, all sharing one
//! store of nodes, like dm-thin's: a snapshot shares its origin's root, so taking one costs O(1)
//! whatever the size, and each device keeps a full tree of its own, so reads never walk a chain
//! of snapshots.
//!
//! Each node has a reference count (parents or device roots pointing at it), each data block one
//! (leaves pointing at it). A node may be changed in place only if it was created in the current
//! transaction and nobody else refers to it; otherwise it is *shadowed*: copied to a new block,
//! the copy taking one more reference on each child. A write may go to a data block in place
//! only if every node on the path to it and the block itself have one reference (`exclusive`).
//!
//! Nodes are never merged: a node that loses all its entries is freed. Every operation checks
//! for the metadata blocks it may need before changing anything, so running out of metadata
//! space fails cleanly.

use crate::error::{Result, StorageError};
use crate::volume::thin::format::{block_of, Node};
use crate::volume::thin::space::Space;

/// The nodes and the space maps. See the module documentation.
#[derive(Debug)]
pub(crate) struct Forest {
    /// Nodes by metadata block.
    nodes: Vec<Option<Box<Node>>>,
    /// Metadata block counts.
    pub(crate) meta: Space,
    /// Data block counts.
    pub(crate) data: Space,
    /// Metadata blocks tree changes must leave free: the next commit writes the device table
    /// there.
    pub(crate) reserve: u64,
}

fn no_node(b: u64) -> StorageError {
    StorageError::corrupt(
        "thin pool metadata",
        format!("node {b} is referenced but not loaded"),
    )
}

fn metadata_full() -> StorageError {
    StorageError::OutOfSpace("the thin pool's metadata volume is full".into())
}

/// Index of the child of an interior node whose subtree holds `key` (keys are lower bounds).
fn child_index(keys: &[u64], key: u64) -> usize {
    keys.partition_point(|&k| k <= key).saturating_sub(1)
}

impl Forest {
    pub(crate) fn new(meta: Space, data: Space) -> Forest {
        Forest {
            nodes: (0..meta.len()).map(|_| None).collect(),
            meta,
            data,
            reserve: 1,
        }
    }

    /// Adds metadata blocks (a grown metadata volume).
    pub(crate) fn grow_meta(&mut self, n: u64) {
        self.meta.grow(n);
        self.nodes.resize_with(n as usize, || None);
    }

    pub(crate) fn node(&self, b: u64) -> Result<&Node> {
        self.nodes
            .get(b as usize)
            .and_then(|n| n.as_deref())
            .ok_or_else(|| no_node(b))
    }

    fn node_mut(&mut self, b: u64) -> Result<&mut Node> {
        self.nodes
            .get_mut(b as usize)
            .and_then(|n| n.as_deref_mut())
            .ok_or_else(|| no_node(b))
    }

    /// Places a node loaded from disk.
    pub(crate) fn put_loaded(&mut self, b: u64, node: Node) {
        if let Some(slot) = self.nodes.get_mut(b as usize) {
            *slot = Some(Box::new(node));
        }
    }

    /// Whether a node is loaded at `b`.
    pub(crate) fn has_node(&self, b: u64) -> bool {
        self.nodes.get(b as usize).is_some_and(|n| n.is_some())
    }

    fn new_node(&mut self, node: Node) -> Result<u64> {
        let b = self.meta.alloc().ok_or_else(metadata_full)?;
        self.nodes[b as usize] = Some(Box::new(node));
        Ok(b)
    }

    /// Height of the tree at `root` (0 for an empty tree).
    pub(crate) fn height(&self, root: u64) -> Result<u64> {
        if root == 0 {
            return Ok(0);
        }
        Ok(u64::from(self.node(root)?.level) + 1)
    }

    fn ensure_meta(&self, root: u64) -> Result<()> {
        let need = 2 * self.height(root)? + 3 + self.reserve;
        if self.meta.free() < need {
            return Err(metadata_full());
        }
        Ok(())
    }

    /// The value mapped at `key`, and whether the path to it and its data block are exclusive.
    pub(crate) fn lookup(&self, root: u64, key: u64) -> Result<Option<(u64, bool)>> {
        if root == 0 {
            return Ok(None);
        }
        let mut b = root;
        let mut exclusive = true;
        loop {
            exclusive &= self.meta.refs(b) == 1;
            let n = self.node(b)?;
            if n.level == 0 {
                return Ok(match n.keys.binary_search(&key) {
                    Ok(i) => {
                        let v = n.vals[i];
                        Some((v, exclusive && self.data.refs(block_of(v)) == 1))
                    }
                    Err(_) => None,
                });
            }
            if key < n.keys[0] {
                return Ok(None);
            }
            b = n.vals[child_index(&n.keys, key)];
        }
    }

    /// The first mapped key at or after `key`.
    pub(crate) fn next_mapped(&self, root: u64, key: u64) -> Result<Option<u64>> {
        if root == 0 {
            return Ok(None);
        }
        let n = self.node(root)?;
        if n.level == 0 {
            let i = n.keys.partition_point(|&k| k < key);
            return Ok(n.keys.get(i).copied());
        }
        let start = if key < n.keys[0] {
            0
        } else {
            child_index(&n.keys, key)
        };
        for &child in &n.vals[start..] {
            if let Some(k) = self.next_mapped(child, key)? {
                return Ok(Some(k));
            }
        }
        Ok(None)
    }

    /// Makes `b` changeable in place: itself if fresh and unshared, else a copy.
    fn shadow(&mut self, b: u64, tag: u64) -> Result<u64> {
        if self.meta.refs(b) == 1 && self.meta.is_fresh(b) {
            return Ok(b);
        }
        let node = self.node(b)?.clone();
        let nb = self.meta.alloc().ok_or_else(metadata_full)?;
        if self.meta.refs(b) == 1 {
            // The only owner of a committed node: move it; its children keep their counts.
            self.meta.dec(b, tag);
            self.nodes[b as usize] = None;
        } else {
            for &v in &node.vals {
                if node.level == 0 {
                    self.data.inc(block_of(v));
                } else {
                    self.meta.inc(v);
                }
            }
            self.meta.dec(b, tag);
        }
        self.nodes[nb as usize] = Some(Box::new(node));
        Ok(nb)
    }

    /// Moves the upper half of full node `b` (fresh, unshared) to a new node.
    fn split(&mut self, b: u64) -> Result<(u64, u64)> {
        let nb = self.meta.alloc().ok_or_else(metadata_full)?;
        let n = self.node_mut(b)?;
        let mid = n.keys.len() / 2;
        let mut right = Node::new(n.level);
        right.keys = n.keys.split_off(mid);
        right.vals = n.vals.split_off(mid);
        let sep = right.keys[0];
        self.nodes[nb as usize] = Some(Box::new(right));
        Ok((sep, nb))
    }

    /// Maps `key` to `value` in the tree at `root`; returns the new root and the value it
    /// replaced (whose data reference the caller drops).
    pub(crate) fn insert(
        &mut self,
        root: u64,
        key: u64,
        value: u64,
        tag: u64,
    ) -> Result<(u64, Option<u64>)> {
        self.ensure_meta(root)?;
        if root == 0 {
            let mut n = Node::new(0);
            n.keys.push(key);
            n.vals.push(value);
            return Ok((self.new_node(n)?, None));
        }
        let mut r = self.shadow(root, tag)?;
        if self.node(r)?.is_full() {
            let level = self.node(r)?.level;
            let first = self.node(r)?.keys[0];
            let (sep, right) = self.split(r)?;
            let mut top = Node::new(level + 1);
            top.keys = vec![first, sep];
            top.vals = vec![r, right];
            r = self.new_node(top)?;
        }
        let mut b = r;
        loop {
            let n = self.node_mut(b)?;
            if n.level == 0 {
                let old = match n.keys.binary_search(&key) {
                    Ok(i) => Some(std::mem::replace(&mut n.vals[i], value)),
                    Err(i) => {
                        n.keys.insert(i, key);
                        n.vals.insert(i, value);
                        None
                    }
                };
                return Ok((r, old));
            }
            if key < n.keys[0] {
                n.keys[0] = key;
            }
            let i = child_index(&n.keys, key);
            let child = n.vals[i];
            let c = self.shadow(child, tag)?;
            if c != child {
                self.node_mut(b)?.vals[i] = c;
            }
            let mut next = c;
            if self.node(c)?.is_full() {
                // `b` is not full (it was split before we descended into it), so it takes the
                // new sibling.
                let (sep, right) = self.split(c)?;
                let n = self.node_mut(b)?;
                n.keys.insert(i + 1, sep);
                n.vals.insert(i + 1, right);
                if key >= sep {
                    next = right;
                }
            }
            b = next;
        }
    }

    /// Adds a reference to the tree at `root` (a snapshot sharing it).
    pub(crate) fn share(&mut self, root: u64) {
        if root != 0 {
            self.meta.inc(root);
        }
    }

    /// Drops one reference to node `b`, freeing it and what only it referenced.
    pub(crate) fn drop_ref(&mut self, b: u64, tag: u64) -> Result<()> {
        if b == 0 {
            return Ok(());
        }
        let mut stack = vec![b];
        while let Some(b) = stack.pop() {
            if !self.meta.dec(b, tag) {
                continue;
            }
            let node = self.nodes[b as usize].take().ok_or_else(|| no_node(b))?;
            for v in node.vals {
                if node.level == 0 {
                    self.data.dec(block_of(v), tag);
                } else {
                    stack.push(v);
                }
            }
        }
        Ok(())
    }

    /// Keys in the subtree at `b`.
    pub(crate) fn count_keys(&self, b: u64) -> Result<u64> {
        if b == 0 {
            return Ok(0);
        }
        let n = self.node(b)?;
        if n.level == 0 {
            return Ok(n.keys.len() as u64);
        }
        n.vals
            .iter()
            .try_fold(0, |acc, &c| Ok(acc + self.count_keys(c)?))
    }

    fn any_in_range(&self, b: u64, lo: u64, hi: u64) -> Result<bool> {
        Ok(self.next_mapped(b, lo)?.is_some_and(|k| k < hi))
    }

    /// Removes every key in `lo..hi`; returns the new root and how many keys went.
    pub(crate) fn remove_range(
        &mut self,
        root: u64,
        lo: u64,
        hi: u64,
        tag: u64,
    ) -> Result<(u64, u64)> {
        if root == 0 || lo >= hi || !self.any_in_range(root, lo, hi)? {
            return Ok((root, 0));
        }
        self.ensure_meta(root)?;
        let r = self.shadow(root, tag)?;
        let removed = self.remove_in(r, lo, hi, tag)?;
        let mut r = r;
        loop {
            let n = self.node(r)?;
            if n.keys.is_empty() {
                self.meta.dec(r, tag);
                self.nodes[r as usize] = None;
                return Ok((0, removed));
            }
            if n.level > 0 && n.keys.len() == 1 {
                // A root with one child: the child becomes the root, keeping the reference.
                let child = n.vals[0];
                self.meta.dec(r, tag);
                self.nodes[r as usize] = None;
                r = child;
                continue;
            }
            return Ok((r, removed));
        }
    }

    /// Removes keys in `lo..hi` below `b`, which is fresh and unshared.
    fn remove_in(&mut self, b: u64, lo: u64, hi: u64, tag: u64) -> Result<u64> {
        let n = self.node_mut(b)?;
        if n.level == 0 {
            let i0 = n.keys.partition_point(|&k| k < lo);
            let i1 = n.keys.partition_point(|&k| k < hi);
            n.keys.drain(i0..i1);
            let gone: Vec<u64> = n.vals.drain(i0..i1).collect();
            for v in &gone {
                self.data.dec(block_of(*v), tag);
            }
            return Ok(gone.len() as u64);
        }
        let keys = std::mem::take(&mut n.keys);
        let vals = std::mem::take(&mut n.vals);
        let mut kept_keys = Vec::with_capacity(keys.len());
        let mut kept_vals = Vec::with_capacity(keys.len());
        let mut removed = 0;
        let mut failure = None;
        for i in 0..keys.len() {
            let (start, child) = (keys[i], vals[i]);
            let end = keys.get(i + 1).copied().unwrap_or(u64::MAX);
            let keep = |kk: &mut Vec<u64>, kv: &mut Vec<u64>, c: u64| {
                kk.push(start);
                kv.push(c);
            };
            if failure.is_some() || end <= lo || start >= hi {
                keep(&mut kept_keys, &mut kept_vals, child);
                continue;
            }
            let step = (|| -> Result<Option<u64>> {
                if start >= lo && end <= hi {
                    removed += self.count_keys(child)?;
                    self.drop_ref(child, tag)?;
                    return Ok(None);
                }
                if !self.any_in_range(child, lo, hi)? {
                    return Ok(Some(child));
                }
                let c = self.shadow(child, tag)?;
                removed += self.remove_in(c, lo, hi, tag)?;
                if self.node(c)?.keys.is_empty() {
                    self.meta.dec(c, tag);
                    self.nodes[c as usize] = None;
                    return Ok(None);
                }
                Ok(Some(c))
            })();
            match step {
                Ok(Some(c)) => keep(&mut kept_keys, &mut kept_vals, c),
                Ok(None) => {}
                Err(e) => {
                    failure = Some(e);
                    keep(&mut kept_keys, &mut kept_vals, child);
                }
            }
        }
        let n = self.node_mut(b)?;
        n.keys = kept_keys;
        n.vals = kept_vals;
        match failure {
            Some(e) => Err(e),
            None => Ok(removed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::thin::format::pack;

    fn forest() -> Forest {
        let mut meta = Space::new(4096, false);
        meta.reserve(0);
        meta.reserve(1);
        Forest::new(meta, Space::new(1 << 20, true))
    }

    fn map_many(f: &mut Forest, root: u64, keys: impl Iterator<Item = u64>) -> u64 {
        let mut r = root;
        for k in keys {
            let d = f.data.alloc().unwrap();
            let (nr, old) = f.insert(r, k, pack(d, 1), 0).unwrap();
            assert!(old.is_none());
            r = nr;
        }
        r
    }

    #[test]
    fn inserts_split_and_look_up() {
        let mut f = forest();
        let keys: Vec<u64> = (0..3000).map(|i| (i * 7919) % 100_003).collect();
        let r = map_many(&mut f, 0, keys.iter().copied());
        assert!(f.height(r).unwrap() >= 2);
        for &k in &keys {
            let (v, excl) = f.lookup(r, k).unwrap().unwrap();
            assert!(excl);
            assert!(block_of(v) < 3000);
        }
        assert!(f.lookup(r, 100_004).unwrap().is_none());
        assert_eq!(f.count_keys(r).unwrap(), 3000);
        assert_eq!(f.next_mapped(r, 0).unwrap(), Some(0));
    }

    #[test]
    fn shared_trees_copy_on_write_and_free_exactly() {
        let mut f = forest();
        let a = map_many(&mut f, 0, 0..1000);
        f.meta.begin_commit();
        f.meta.end_commit(true);
        f.data.begin_commit();
        f.data.end_commit(true);
        // Snapshot: share the root.
        f.share(a);
        let snap = a;
        assert!(
            !f.lookup(a, 5).unwrap().unwrap().1,
            "shared after a snapshot"
        );
        let d = f.data.alloc().unwrap();
        let (a2, old) = f.insert(a, 5, pack(d, 2), 0).unwrap();
        let old = old.unwrap();
        f.data.dec(block_of(old), 0);
        assert_ne!(a2, snap);
        assert_eq!(block_of(f.lookup(a2, 5).unwrap().unwrap().0), d);
        assert_eq!(
            block_of(f.lookup(snap, 5).unwrap().unwrap().0),
            block_of(old)
        );
        assert!(
            f.lookup(a2, 5).unwrap().unwrap().1,
            "the new block is exclusive"
        );
        assert!(
            f.lookup(snap, 5).unwrap().unwrap().1,
            "the old one is the snapshot's alone"
        );
        // Discarding a range in one keeps the other intact.
        let (a3, n) = f.remove_range(a2, 100, 900, 0).unwrap();
        assert_eq!(n, 800);
        assert_eq!(f.count_keys(a3).unwrap(), 200);
        assert_eq!(f.count_keys(snap).unwrap(), 1000);
        // Dropping both frees every data block.
        f.drop_ref(a3, 0).unwrap();
        f.drop_ref(snap, 0).unwrap();
        assert_eq!(f.data.used(), 0);
        assert_eq!(f.meta.used(), 2, "only the superblocks remain");
    }

    #[test]
    fn removing_everything_empties_the_tree() {
        let mut f = forest();
        let r = map_many(&mut f, 0, 0..2000);
        let (r, n) = f.remove_range(r, 0, u64::MAX, 0).unwrap();
        assert_eq!((r, n), (0, 2000));
        assert_eq!(f.data.used(), 0);
    }
}

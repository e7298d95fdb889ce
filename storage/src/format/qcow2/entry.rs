//! L1 and L2 table entries and the image geometry that decodes them (docs/interop/qcow2.rst,
//! "Cluster mapping", "Extended L2 Entries").

use crate::error::{Result, StorageError};

use super::header::Header;

/// Bit 63 of L1 and L2 entries: the refcount is exactly one.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: a compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard cluster descriptor (version 3, no extended L2): reads as zeros.
pub const ZERO: u64 = 1;
/// Bits 9-55: a cluster-aligned host offset in L1 and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry.
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry (the zero bit excluded).
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// Sizes derived from the header that every table lookup needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Entries in one L2 table.
    pub l2_entries: u64,
    /// 128-bit L2 entries with subcluster bitmaps.
    pub extended: bool,
    /// log2 of the refcount width.
    pub refcount_order: u32,
    /// Refcounts in one refcount block.
    pub rb_entries: u64,
    /// Version 3 (zero clusters exist).
    pub v3: bool,
    /// Guest data lives in an external data file: host offsets are data file offsets equal to
    /// the guest offset, offset 0 with the copied flag is guest cluster 0, and compressed
    /// clusters are not allowed.
    pub external: bool,
}

impl Geometry {
    /// The geometry of `h`.
    pub fn of(h: &Header) -> Geometry {
        let cluster_size = h.cluster_size();
        let entry = if h.extended_l2() { 16 } else { 8 };
        Geometry {
            cluster_bits: h.cluster_bits,
            cluster_size,
            l2_entries: cluster_size / entry,
            extended: h.extended_l2(),
            refcount_order: h.refcount_order,
            rb_entries: (cluster_size * 8) >> h.refcount_order,
            v3: h.version >= 3,
            external: h.has_data_file(),
        }
    }

    /// Bytes of guest space one L2 table maps.
    pub fn l2_span(&self) -> u64 {
        self.cluster_size * self.l2_entries
    }

    /// L1 and L2 index of guest offset `g`.
    pub fn indices(&self, g: u64) -> (usize, usize) {
        let cluster = g >> self.cluster_bits;
        (
            (cluster / self.l2_entries) as usize,
            (cluster % self.l2_entries) as usize,
        )
    }

    /// Subcluster size (the cluster size without extended L2 entries).
    pub fn subcluster_size(&self) -> u64 {
        if self.extended {
            self.cluster_size / u64::from(SUBCLUSTERS)
        } else {
            self.cluster_size
        }
    }

    /// Width of the offset field of a compressed descriptor.
    pub fn csize_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }

    /// Mask of the sector count of a compressed descriptor.
    pub fn csize_mask(&self) -> u64 {
        (1u64 << (self.cluster_bits - 8)) - 1
    }

    /// Byte offset of an L2 entry in its table.
    pub fn l2_entry_offset(&self, index: usize) -> usize {
        index * if self.extended { 16 } else { 8 }
    }

    /// Largest refcount value.
    pub fn max_refcount(&self) -> u64 {
        if self.refcount_order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.refcount_order)) - 1
        }
    }

    /// Decodes the L2 entry `raw` (with bitmap `bitmap` when extended) at guest cluster start.
    pub fn decode(&self, raw: u64, bitmap: u64) -> Result<L2Entry> {
        if raw & COMPRESSED != 0 {
            if self.external {
                return Err(StorageError::corrupt(
                    "qcow2 L2 table",
                    "a compressed cluster in an image with an external data file",
                ));
            }
            let shift = self.csize_shift();
            let offset = raw & ((1u64 << shift) - 1);
            let sectors = ((raw >> shift) & self.csize_mask()) + 1;
            let len = sectors * 512 - (offset & 511);
            return Ok(L2Entry::Compressed { offset, len });
        }
        let host = raw & OFFSET_MASK;
        if host % self.cluster_size != 0 {
            return Err(StorageError::corrupt(
                "qcow2 L2 table",
                format!("cluster offset {host:#x} is not aligned to a cluster"),
            ));
        }
        let copied = raw & COPIED != 0;
        // In a data file offset 0 is guest cluster 0; data file clusters always have the copied
        // flag, which tells them from unallocated entries (the spec's "Cluster mapping").
        let present = host != 0 || (self.external && copied);
        if self.extended {
            let alloc = bitmap as u32;
            let zero = (bitmap >> 32) as u32;
            if alloc & zero != 0 {
                return Err(StorageError::corrupt(
                    "qcow2 L2 table",
                    format!(
                        "subclusters {:#x} are both allocated and zero",
                        alloc & zero
                    ),
                ));
            }
            if alloc != 0 && !present {
                return Err(StorageError::corrupt(
                    "qcow2 L2 table",
                    "allocated subclusters without a host cluster",
                ));
            }
            return Ok(L2Entry::Extended {
                host: present.then_some(host),
                copied,
                alloc,
                zero,
            });
        }
        if self.v3 && raw & ZERO != 0 {
            return Ok(L2Entry::Zero {
                host: present.then_some(host),
                copied,
            });
        }
        if !present {
            return Ok(L2Entry::Unallocated);
        }
        Ok(L2Entry::Normal { host, copied })
    }

    /// Encodes a standard descriptor for `host` with the copied flag.
    pub fn normal(&self, host: u64, copied: bool) -> u64 {
        host | if copied { COPIED } else { 0 }
    }
}

/// A decoded L2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Entry {
    /// Not allocated: reads fall through to the backing file (or zeros).
    Unallocated,
    /// Reads as zeros; a host cluster may be preallocated.
    Zero {
        /// Preallocated host cluster.
        host: Option<u64>,
        /// Refcount exactly one.
        copied: bool,
    },
    /// Data at a host cluster.
    Normal {
        /// Host offset.
        host: u64,
        /// Refcount exactly one.
        copied: bool,
    },
    /// Compressed data at a byte offset.
    Compressed {
        /// Host byte offset of the compressed data.
        offset: u64,
        /// Bytes to read (up to the end of the last sector).
        len: u64,
    },
    /// An extended entry: per-subcluster state.
    Extended {
        /// Host cluster, if any.
        host: Option<u64>,
        /// Refcount exactly one.
        copied: bool,
        /// Allocated subclusters.
        alloc: u32,
        /// Zero subclusters.
        zero: u32,
    },
}

impl L2Entry {
    /// The host cluster the entry holds a reference to, if any (not for compressed entries).
    pub fn host_cluster(&self) -> Option<u64> {
        match *self {
            L2Entry::Normal { host, .. } => Some(host),
            L2Entry::Zero { host, .. } | L2Entry::Extended { host, .. } => host,
            _ => None,
        }
    }

    /// Whether the copied flag is set.
    pub fn copied(&self) -> bool {
        match *self {
            L2Entry::Normal { copied, .. }
            | L2Entry::Zero { copied, .. }
            | L2Entry::Extended { copied, .. } => copied,
            _ => false,
        }
    }
}

/// How one run of guest bytes is stored, as a lookup returns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Reads as zeros.
    Zero,
    /// Data at this host offset (the run is contiguous on the host).
    Allocated(u64),
    /// Inside a compressed cluster: host byte range of the compressed data, and the run's offset
    /// inside the decompressed cluster.
    Compressed {
        /// Host byte offset of the compressed data.
        offset: u64,
        /// Length of the compressed data.
        len: u64,
        /// Offset of the run inside the cluster.
        within: u64,
    },
    /// Not allocated here: the backing file (or zeros without one).
    Unallocated,
}

/// State of the subcluster of `entry` at index `sc`, as a mapping of its first byte.
pub fn subcluster_mapping(entry: &L2Entry, sc: u32, geo: &Geometry) -> Mapping {
    match *entry {
        L2Entry::Unallocated => Mapping::Unallocated,
        L2Entry::Zero { .. } => Mapping::Zero,
        L2Entry::Normal { host, .. } => {
            Mapping::Allocated(host + u64::from(sc) * geo.subcluster_size())
        }
        L2Entry::Compressed { offset, len } => Mapping::Compressed {
            offset,
            len,
            within: u64::from(sc) * geo.subcluster_size(),
        },
        L2Entry::Extended {
            host, alloc, zero, ..
        } => {
            if alloc & (1 << sc) != 0 {
                Mapping::Allocated(host.unwrap_or(0) + u64::from(sc) * geo.subcluster_size())
            } else if zero & (1 << sc) != 0 {
                Mapping::Zero
            } else {
                Mapping::Unallocated
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(bits: u32, extended: bool) -> Geometry {
        let cs = 1u64 << bits;
        Geometry {
            cluster_bits: bits,
            cluster_size: cs,
            l2_entries: cs / if extended { 16 } else { 8 },
            extended,
            refcount_order: 4,
            rb_entries: cs * 8 / 16,
            v3: true,
            external: false,
        }
    }

    #[test]
    fn decodes_standard_entries() {
        let g = geo(16, false);
        assert_eq!(g.decode(0, 0).unwrap(), L2Entry::Unallocated);
        assert_eq!(
            g.decode(COPIED | 0x50000, 0).unwrap(),
            L2Entry::Normal {
                host: 0x50000,
                copied: true
            }
        );
        assert_eq!(
            g.decode(ZERO, 0).unwrap(),
            L2Entry::Zero {
                host: None,
                copied: false
            }
        );
        assert!(
            g.decode(0x50200, 0).is_err(),
            "unaligned host offsets are corrupt"
        );
    }

    #[test]
    fn decodes_compressed_descriptors() {
        let g = geo(16, false);
        // 64 KiB clusters: x = 62 - 8 = 54; offset 0x12345, 3 additional sectors.
        let raw = COMPRESSED | (3u64 << 54) | 0x12345;
        assert_eq!(
            g.decode(raw, 0).unwrap(),
            L2Entry::Compressed {
                offset: 0x12345,
                len: 4 * 512 - 0x145
            }
        );
    }

    #[test]
    fn extended_entries_map_subclusters() {
        let g = geo(16, true);
        let e = g.decode(0x70000 | COPIED, 0b10 | (0b100u64 << 32)).unwrap();
        assert_eq!(subcluster_mapping(&e, 0, &g), Mapping::Unallocated);
        assert_eq!(
            subcluster_mapping(&e, 1, &g),
            Mapping::Allocated(0x70000 + 2048)
        );
        assert_eq!(subcluster_mapping(&e, 2, &g), Mapping::Zero);
        assert!(g.decode(0x70000, 1 | (1 << 32)).is_err());
    }
}

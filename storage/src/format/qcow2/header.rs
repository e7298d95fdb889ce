//! The qcow2 header, its additional fields and header extensions (docs/interop/qcow2.rst,
//! "Header", "Additional fields", "Header extensions", "Feature name table").
//!
//! [`Header::parse`] validates everything the rest of the engine relies on and refuses what we do
//! not implement with an error naming the feature; [`Header::serialize`] writes the header back
//! with every extension we do not interpret kept byte for byte.

use crate::bytes::{be32, be64};
use crate::error::{Result, StorageError};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Length of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Length of a version 3 header without optional fields.
pub const V3_BASE_HEADER_LEN: u32 = 104;
/// Smallest and largest cluster sizes (QEMU refuses clusters above 2 MiB).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Longest backing file name.
pub const MAX_BACKING_NAME: u32 = 1023;
/// QEMU's limit on the L1 table: 32 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table: 8 MiB.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;

/// Incompatible feature bits.
pub mod incompat {
    /// Refcounts may be inconsistent.
    pub const DIRTY: u64 = 1 << 0;
    /// Metadata may be corrupt; the image must not be written.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// A non-default compression type is used.
    pub const COMPRESSION: u64 = 1 << 3;
    /// L2 entries are 128 bits wide with subcluster bitmaps.
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Every bit this implementation understands.
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTENDED_L2;
}

/// Compatible feature bits.
pub mod compat {
    /// Refcount updates may be postponed while the dirty bit is set.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Auto-clear feature bits.
pub mod autoclear {
    /// The bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is a consistent raw image.
    pub const RAW_DATA: u64 = 1 << 1;
    /// Bits a writer must clear because this implementation does not maintain what they
    /// vouch for: all of them.
    pub const NOT_MAINTAINED: u64 = u64::MAX;
}

/// Header extension types.
pub mod ext {
    /// End of the extension area.
    pub const END: u32 = 0;
    /// Backing file format name.
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Feature name table.
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    /// Bitmaps.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption header pointer.
    pub const CRYPTO: u32 = 0x0537_be77;
    /// External data file name.
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// Compression used for compressed clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (QEMU calls it zlib).
    Deflate,
    /// Zstandard.
    Zstd,
}

impl CompressionType {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Deflate => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// One header extension, kept as raw bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extension {
    /// Extension type.
    pub kind: u32,
    /// Extension data (without padding).
    pub data: Vec<u8>,
}

/// The parsed header. See the module documentation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters the refcount table occupies.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Auto-clear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length (72 for version 2).
    pub header_length: u32,
    /// Bytes from offset 104 to `header_length` (compression type and unknown fields), kept.
    pub additional: Vec<u8>,
    /// Header extensions in file order, the end marker excluded.
    pub extensions: Vec<Extension>,
    /// Backing file name.
    pub backing_file: Option<String>,
}

fn corrupt(detail: impl Into<String>) -> StorageError {
    StorageError::corrupt("qcow2 header", detail)
}

impl Header {
    /// Parses and validates the header at the start of `bytes` (the image's first cluster, or as
    /// much of it as the file holds).
    pub fn parse(bytes: &[u8]) -> Result<Header> {
        if bytes.len() < V2_HEADER_LEN as usize {
            return Err(corrupt(format!(
                "the file holds {} bytes, less than a qcow2 header (72)",
                bytes.len()
            )));
        }
        if be32(bytes, 0) != MAGIC {
            return Err(corrupt("bad magic (not a qcow2 image)"));
        }
        let version = be32(bytes, 4);
        if version != 2 && version != 3 {
            return Err(StorageError::Unsupported(format!(
                "qcow2 version {version} (only versions 2 and 3 exist)"
            )));
        }
        let backing_file_offset = be64(bytes, 8);
        let backing_file_size = be32(bytes, 16);
        let cluster_bits = be32(bytes, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(StorageError::Unsupported(format!(
                "qcow2 cluster_bits {cluster_bits} (cluster sizes from 512 B to 2 MiB are supported)"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let size = be64(bytes, 24);
        let crypt_method = be32(bytes, 32);
        match crypt_method {
            0 => {}
            1 => return Err(StorageError::Unsupported("qcow2 encryption (AES)".into())),
            2 => return Err(StorageError::Unsupported("qcow2 encryption (LUKS)".into())),
            n => {
                return Err(StorageError::Unsupported(format!(
                    "qcow2 encryption method {n}"
                )))
            }
        }
        let mut h = Header {
            version,
            cluster_bits,
            size,
            l1_size: be32(bytes, 36),
            l1_table_offset: be64(bytes, 40),
            refcount_table_offset: be64(bytes, 48),
            refcount_table_clusters: be32(bytes, 56),
            nb_snapshots: be32(bytes, 60),
            snapshots_offset: be64(bytes, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            additional: Vec::new(),
            extensions: Vec::new(),
            backing_file: None,
        };
        if version == 3 {
            if bytes.len() < V3_BASE_HEADER_LEN as usize {
                return Err(corrupt("truncated version 3 header"));
            }
            h.incompatible_features = be64(bytes, 72);
            h.compatible_features = be64(bytes, 80);
            h.autoclear_features = be64(bytes, 88);
            h.refcount_order = be32(bytes, 96);
            h.header_length = be32(bytes, 100);
            if h.header_length < V3_BASE_HEADER_LEN
                || h.header_length % 8 != 0
                || u64::from(h.header_length) > cluster_size
                || h.header_length as usize > bytes.len()
            {
                return Err(corrupt(format!(
                    "invalid header_length {}",
                    h.header_length
                )));
            }
            h.additional = bytes[V3_BASE_HEADER_LEN as usize..h.header_length as usize].to_vec();
        }
        // Extensions come first because the feature table names unknown features.
        let ext_end = if backing_file_offset != 0 {
            backing_file_offset.min(cluster_size)
        } else {
            cluster_size
        }
        .min(bytes.len() as u64) as usize;
        h.extensions = parse_extensions(bytes, h.header_length as usize, ext_end)?;
        h.check_features()?;
        if h.refcount_order > 6 {
            return Err(corrupt(format!(
                "refcount_order {} (at most 6)",
                h.refcount_order
            )));
        }
        if h.extended_l2() && cluster_bits < 14 {
            return Err(corrupt(
                "extended L2 entries need clusters of at least 16 KiB",
            ));
        }
        if backing_file_offset != 0 {
            if backing_file_size > MAX_BACKING_NAME {
                return Err(corrupt(format!(
                    "backing file name of {backing_file_size} bytes (at most 1023)"
                )));
            }
            let end = backing_file_offset
                .checked_add(u64::from(backing_file_size))
                .filter(|&e| e <= cluster_size && e <= bytes.len() as u64)
                .ok_or_else(|| corrupt("the backing file name lies outside the first cluster"))?;
            let name = &bytes[backing_file_offset as usize..end as usize];
            let name = String::from_utf8(name.to_vec())
                .map_err(|_| corrupt("the backing file name is not UTF-8"))?;
            if name.is_empty() {
                return Err(corrupt("empty backing file name"));
            }
            h.backing_file = Some(name);
        }
        h.check_geometry()?;
        Ok(h)
    }

    fn check_features(&self) -> Result<()> {
        let unknown = self.incompatible_features & !incompat::KNOWN;
        if unknown != 0 {
            let bit = unknown.trailing_zeros();
            let name = self
                .feature_name(0, bit)
                .map(|n| format!(" ({n})"))
                .unwrap_or_default();
            return Err(StorageError::Unsupported(format!(
                "qcow2 incompatible feature bit {bit}{name}"
            )));
        }
        if self.incompatible_features & incompat::DATA_FILE != 0
            || self.extension(ext::DATA_FILE).is_some()
        {
            return Err(StorageError::Unsupported("qcow2 external data file".into()));
        }
        if self.extension(ext::CRYPTO).is_some() {
            return Err(StorageError::Unsupported(
                "qcow2 encryption (full disk encryption header)".into(),
            ));
        }
        let ct = self.additional.first().copied().unwrap_or(0);
        let flagged = self.incompatible_features & incompat::COMPRESSION != 0;
        match (flagged, ct) {
            (false, 0) | (true, 1) => {}
            (true, 0) => {
                return Err(corrupt(
                    "the compression type bit is set but compression_type is 0",
                ))
            }
            (false, n) => {
                return Err(corrupt(format!(
                    "compression_type {n} without the compression type bit"
                )))
            }
            (true, n) => {
                return Err(StorageError::Unsupported(format!(
                    "qcow2 compression type {n}"
                )))
            }
        }
        Ok(())
    }

    fn check_geometry(&self) -> Result<()> {
        let cs = self.cluster_size();
        let aligned = |o: u64| o % cs == 0;
        if !aligned(self.l1_table_offset) {
            return Err(corrupt("the L1 table offset is not cluster aligned"));
        }
        if self.refcount_table_offset == 0 {
            return Err(corrupt(
                "the refcount table is at offset 0 (over the header)",
            ));
        }
        if !aligned(self.refcount_table_offset) {
            return Err(corrupt("the refcount table offset is not cluster aligned"));
        }
        if self.refcount_table_clusters == 0 {
            return Err(corrupt("the refcount table is empty"));
        }
        if u64::from(self.refcount_table_clusters) * cs > MAX_REFTABLE_BYTES {
            return Err(corrupt(format!(
                "refcount table of {} clusters is larger than 8 MiB",
                self.refcount_table_clusters
            )));
        }
        if u64::from(self.l1_size) * 8 > MAX_L1_BYTES {
            return Err(corrupt(format!(
                "L1 table of {} entries is larger than 32 MiB",
                self.l1_size
            )));
        }
        let needed = l1_entries_for(self.size, self.cluster_bits, self.extended_l2())
            .ok_or_else(|| corrupt(format!("virtual size {} is too large", self.size)))?;
        if needed > u64::from(self.l1_size) {
            return Err(corrupt(format!(
                "the L1 table ({} entries) is too small for the virtual size {} ({needed} needed)",
                self.l1_size, self.size
            )));
        }
        if self.l1_size > 0 && self.l1_table_offset == 0 {
            return Err(corrupt("the L1 table is at offset 0 (over the header)"));
        }
        if self.nb_snapshots > 0 && (self.snapshots_offset == 0 || !aligned(self.snapshots_offset))
        {
            return Err(corrupt("invalid snapshot table offset"));
        }
        if self.nb_snapshots > 65536 {
            return Err(corrupt(format!(
                "{} snapshots (at most 65536)",
                self.nb_snapshots
            )));
        }
        Ok(())
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether L2 entries are extended (subclusters).
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTENDED_L2 != 0
    }

    /// Whether lazy refcounts are enabled.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & compat::LAZY_REFCOUNTS != 0
    }

    /// Whether the dirty bit is set.
    pub fn dirty(&self) -> bool {
        self.incompatible_features & incompat::DIRTY != 0
    }

    /// Whether the corrupt bit is set.
    pub fn corrupt(&self) -> bool {
        self.incompatible_features & incompat::CORRUPT != 0
    }

    /// The compression type.
    pub fn compression_type(&self) -> CompressionType {
        match self.additional.first() {
            Some(1) => CompressionType::Zstd,
            _ => CompressionType::Deflate,
        }
    }

    /// The data of the extension of `kind`, if present.
    pub fn extension(&self, kind: u32) -> Option<&[u8]> {
        self.extensions
            .iter()
            .find(|e| e.kind == kind)
            .map(|e| e.data.as_slice())
    }

    /// Replaces (or with `None` removes) the extension of `kind`, keeping the others in order.
    pub fn set_extension(&mut self, kind: u32, data: Option<Vec<u8>>) {
        match (self.extensions.iter().position(|e| e.kind == kind), data) {
            (Some(i), Some(d)) => self.extensions[i].data = d,
            (Some(i), None) => {
                self.extensions.remove(i);
            }
            (None, Some(d)) => self.extensions.push(Extension { kind, data: d }),
            (None, None) => {}
        }
    }

    /// The backing file format from its extension.
    pub fn backing_format(&self) -> Option<String> {
        self.extension(ext::BACKING_FORMAT)
            .map(|d| String::from_utf8_lossy(d).into_owned())
    }

    /// The name of feature `bit` of bitmap `kind` (0 incompatible, 1 compatible, 2 auto-clear)
    /// from the feature name table.
    pub fn feature_name(&self, kind: u8, bit: u32) -> Option<String> {
        let table = self.extension(ext::FEATURE_TABLE)?;
        table
            .chunks_exact(48)
            .find(|e| e[0] == kind && u32::from(e[1]) == bit)
            .map(|e| {
                let name = &e[2..48];
                let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                String::from_utf8_lossy(&name[..end]).into_owned()
            })
    }

    /// Serializes the header, its extensions (an end marker added) and the backing file name.
    /// The result is what belongs at the start of the first cluster; the caller pads it.
    pub fn serialize(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(&MAGIC.to_be_bytes());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&0u64.to_be_bytes()); // backing offset, patched below
        out.extend_from_slice(&0u32.to_be_bytes()); // backing size, patched below
        out.extend_from_slice(&self.cluster_bits.to_be_bytes());
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes()); // crypt_method
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        out.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        out.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        out.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            out.extend_from_slice(&self.incompatible_features.to_be_bytes());
            out.extend_from_slice(&self.compatible_features.to_be_bytes());
            out.extend_from_slice(&self.autoclear_features.to_be_bytes());
            out.extend_from_slice(&self.refcount_order.to_be_bytes());
            out.extend_from_slice(&self.header_length.to_be_bytes());
            out.extend_from_slice(&self.additional);
            debug_assert_eq!(out.len(), self.header_length as usize);
        }
        for e in &self.extensions {
            out.extend_from_slice(&e.kind.to_be_bytes());
            out.extend_from_slice(&(e.data.len() as u32).to_be_bytes());
            out.extend_from_slice(&e.data);
            out.resize(out.len().next_multiple_of(8), 0);
        }
        out.extend_from_slice(&[0u8; 8]); // end of extensions
        if let Some(name) = &self.backing_file {
            if name.is_empty() || name.len() > MAX_BACKING_NAME as usize {
                return Err(StorageError::InvalidInput(format!(
                    "Backing file name must be 1 to 1023 bytes long ({} given)",
                    name.len()
                )));
            }
            let at = out.len() as u64;
            out[8..16].copy_from_slice(&at.to_be_bytes());
            out[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        if out.len() as u64 > self.cluster_size() {
            return Err(StorageError::InvalidInput(format!(
                "The qcow2 header and its extensions ({} bytes) do not fit in one cluster",
                out.len()
            )));
        }
        Ok(out)
    }
}

fn parse_extensions(bytes: &[u8], start: usize, end: usize) -> Result<Vec<Extension>> {
    let mut exts: Vec<Extension> = Vec::new();
    let mut at = start;
    while at + 8 <= end {
        let kind = be32(bytes, at);
        let len = be32(bytes, at + 4) as usize;
        if kind == ext::END {
            break;
        }
        let data_end = at
            .checked_add(8)
            .and_then(|a| a.checked_add(len))
            .filter(|&e| e <= end)
            .ok_or_else(|| {
                corrupt(format!(
                    "header extension {kind:#x} of {len} bytes runs past the extension area"
                ))
            })?;
        if exts.iter().any(|e| e.kind == kind) {
            return Err(corrupt(format!("header extension {kind:#x} appears twice")));
        }
        exts.push(Extension {
            kind,
            data: bytes[at + 8..data_end].to_vec(),
        });
        at = (data_end).next_multiple_of(8);
    }
    Ok(exts)
}

/// L1 entries needed to map `size` bytes, or `None` on overflow.
pub fn l1_entries_for(size: u64, cluster_bits: u32, extended: bool) -> Option<u64> {
    let entry_bits = if extended { 4 } else { 3 };
    let l2_bits = cluster_bits - entry_bits;
    let shift = cluster_bits + l2_bits;
    let per_l1 = 1u128 << shift;
    let n = (u128::from(size)).div_ceil(per_l1);
    u64::try_from(n).ok()
}

/// The feature name table QEMU writes into new images.
pub fn default_feature_table() -> Vec<u8> {
    let names: [(u8, u8, &str); 8] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut out = Vec::with_capacity(names.len() * 48);
    for (kind, bit, name) in names {
        let mut e = [0u8; 48];
        e[0] = kind;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        out.extend_from_slice(&e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(version: u32) -> Header {
        Header {
            version,
            cluster_bits: 16,
            size: 1 << 30,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: if version == 3 { 112 } else { 72 },
            additional: if version == 3 { vec![0; 8] } else { vec![] },
            extensions: vec![Extension {
                kind: ext::FEATURE_TABLE,
                data: default_feature_table(),
            }],
            backing_file: Some("base.qcow2".into()),
        }
    }

    fn padded(h: &Header) -> Vec<u8> {
        let mut b = h.serialize().unwrap();
        b.resize(4096, 0);
        b
    }

    #[test]
    fn round_trips_both_versions() {
        for v in [2, 3] {
            let h = sample(v);
            let back = Header::parse(&padded(&h)).unwrap();
            assert_eq!(back, h);
        }
    }

    #[test]
    fn refuses_unknown_and_unsupported_features_by_name() {
        let mut h = sample(3);
        h.incompatible_features = 1 << 9;
        let e = Header::parse(&padded(&h)).unwrap_err().to_string();
        assert!(e.contains("incompatible feature bit 9"), "{e}");
        h.incompatible_features = incompat::DATA_FILE;
        let e = Header::parse(&padded(&h)).unwrap_err().to_string();
        assert!(e.contains("external data file"), "{e}");
        let mut b = padded(&sample(3));
        b[35] = 2;
        let e = Header::parse(&b).unwrap_err().to_string();
        assert!(e.contains("LUKS"), "{e}");
        let mut b = padded(&sample(3));
        b[7] = 4;
        let e = Header::parse(&b).unwrap_err().to_string();
        assert!(e.contains("version 4"), "{e}");
    }

    #[test]
    fn refuses_bad_geometry() {
        let mut h = sample(3);
        h.refcount_table_offset = 0;
        assert!(Header::parse(&padded(&h)).is_err());
        let mut h = sample(3);
        h.l1_size = 0;
        assert!(Header::parse(&padded(&h)).is_err());
        let mut h = sample(3);
        h.size = u64::MAX;
        assert!(Header::parse(&padded(&h)).is_err());
        let mut b = padded(&sample(3));
        b[23] = 40; // cluster_bits
        assert!(Header::parse(&b).is_err());
        assert!(Header::parse(&b[..50]).is_err());
    }

    #[test]
    fn names_features_from_the_table() {
        let h = sample(3);
        assert_eq!(h.feature_name(1, 0).as_deref(), Some("lazy refcounts"));
        assert_eq!(h.feature_name(0, 4).as_deref(), Some("extended L2 entries"));
    }
}

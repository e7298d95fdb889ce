//! Creating qcow2 images with qemu-img's options: `cluster_size`, `compat`, `lazy_refcounts`,
//! `extended_l2`, `refcount_bits`, `preallocation=off|metadata|falloc|full`,
//! `compression_type`, `backing_file`, `backing_fmt`, `data_file`, `data_file_raw`.
//!
//! With `data_file`, guest data goes to that file (created here, at the virtual size; an existing
//! file is refused rather than truncated as qemu-img does) and the qcow2 file holds only
//! metadata. With `data_file_raw` every cluster is mapped at creation (as qemu-img does), so that
//! the data file is a raw image of the disk from the start; preallocation `falloc`/`full` then
//! reserve or zero the data file.
//!
//! The whole layout is computed up front — header, refcount table, refcount blocks, L1 table,
//! and with preallocation the L2 tables and data clusters — and written in one pass to a new file,
//! which is synced (and its folder) before returning.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Result, StorageError};
use crate::format::raw::sync_parent_dir;
use crate::format::{ImageFormat, OpenOptions as ImageOpenOptions};
use crate::util::parse_size;

use super::entry::COPIED;
use super::header::{
    compat, default_feature_table, ext, incompat, l1_entries_for, CompressionType, Extension,
    Header, MAX_L1_BYTES,
};
use super::refcount;

/// Space reservation at creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing beyond the metadata every image has.
    #[default]
    Off,
    /// L2 tables and data clusters allocated, the file sparse.
    Metadata,
    /// As metadata, with the file's space reserved by fallocate.
    Falloc,
    /// As metadata, with zeros written.
    Full,
}

/// Parsed creation options. See the module documentation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateOptions {
    /// Cluster size in bytes (512 B to 2 MiB, a power of two).
    pub cluster_size: u64,
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    /// Lazy refcounts (version 3).
    pub lazy_refcounts: bool,
    /// Extended L2 entries (version 3, clusters of 16 KiB or more).
    pub extended_l2: bool,
    /// Refcount width in bits (a power of two up to 64; 16 for version 2).
    pub refcount_bits: u32,
    /// Space reservation.
    pub preallocation: Preallocation,
    /// Compression type (zstd needs version 3).
    pub compression: CompressionType,
    /// Backing file name as stored in the header.
    pub backing_file: Option<String>,
    /// Backing file format (probed when not given).
    pub backing_format: Option<ImageFormat>,
    /// External data file name as stored in the header (relative to the image's folder).
    pub data_file: Option<String>,
    /// The data file is kept a consistent raw image.
    pub data_file_raw: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            cluster_size: 65536,
            version: 3,
            lazy_refcounts: false,
            extended_l2: false,
            refcount_bits: 16,
            preallocation: Preallocation::Off,
            compression: CompressionType::Deflate,
            backing_file: None,
            backing_format: None,
            data_file: None,
            data_file_raw: false,
        }
    }
}

fn invalid(msg: impl Into<String>) -> StorageError {
    StorageError::InvalidInput(msg.into())
}

fn on_off(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(invalid(format!(
            "Invalid value '{v}' for {key} (expected on or off)"
        ))),
    }
}

impl CreateOptions {
    /// Reads `-o` options; unknown keys are refused with their name.
    pub fn from_map(map: &BTreeMap<String, String>) -> Result<CreateOptions> {
        let mut o = CreateOptions::default();
        for (k, v) in map {
            match k.as_str() {
                "cluster_size" => o.cluster_size = parse_size(v)?,
                "compat" => {
                    o.version = match v.as_str() {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        _ => return Err(invalid(format!("Invalid compat '{v}' (expected 0.10 or 1.1)"))),
                    }
                }
                "lazy_refcounts" => o.lazy_refcounts = on_off(k, v)?,
                "extended_l2" => o.extended_l2 = on_off(k, v)?,
                "refcount_bits" => {
                    o.refcount_bits = v
                        .parse()
                        .map_err(|_| invalid(format!("Invalid refcount_bits '{v}'")))?
                }
                "preallocation" => {
                    o.preallocation = match v.as_str() {
                        "off" => Preallocation::Off,
                        "metadata" => Preallocation::Metadata,
                        "falloc" => Preallocation::Falloc,
                        "full" => Preallocation::Full,
                        _ => {
                            return Err(invalid(format!(
                                "Invalid preallocation mode '{v}' (expected off, metadata, falloc or full)"
                            )))
                        }
                    }
                }
                "compression_type" => {
                    o.compression = match v.as_str() {
                        "zlib" => CompressionType::Deflate,
                        "zstd" => CompressionType::Zstd,
                        _ => return Err(invalid(format!("Invalid compression_type '{v}' (expected zlib or zstd)"))),
                    }
                }
                "backing_file" => o.backing_file = Some(v.clone()),
                "backing_fmt" => o.backing_format = Some(v.parse()?),
                "data_file" => o.data_file = Some(v.clone()),
                "data_file_raw" => o.data_file_raw = on_off(k, v)?,
                other => {
                    return Err(invalid(format!(
                        "Unknown option '{other}' for qcow2 images (supported: cluster_size, compat, \
                         lazy_refcounts, extended_l2, refcount_bits, preallocation, compression_type, \
                         backing_file, backing_fmt, data_file, data_file_raw)"
                    )))
                }
            }
        }
        o.validate()?;
        Ok(o)
    }

    /// Checks the combination.
    pub fn validate(&self) -> Result<()> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return Err(invalid(format!(
                "Cluster size must be a power of two between 512 and 2097152 bytes ({cs} given)"
            )));
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(invalid(format!(
                "Refcount width must be a power of two up to 64 bits ({} given)",
                self.refcount_bits
            )));
        }
        if self.version == 2 {
            let v3_only = [
                (self.lazy_refcounts, "lazy_refcounts"),
                (self.extended_l2, "extended_l2"),
                (self.refcount_bits != 16, "refcount_bits other than 16"),
                (
                    self.compression == CompressionType::Zstd,
                    "compression_type=zstd",
                ),
            ];
            if let Some((_, what)) = v3_only.iter().find(|(on, _)| *on) {
                return Err(invalid(format!("{what} needs compat=1.1")));
            }
        }
        if self.extended_l2 && cs < 16384 {
            return Err(invalid("extended_l2 needs clusters of at least 16 KiB"));
        }
        if self.backing_file.is_some() && self.preallocation != Preallocation::Off {
            return Err(invalid("Preallocation is not possible with a backing file"));
        }
        if let Some(d) = &self.data_file {
            if self.version < 3 {
                return Err(invalid("data_file needs compat=1.1"));
            }
            super::header::check_data_file_name(d.as_bytes())
                .map_err(|_| invalid("data_file must be a UTF-8 name of 1 to 1023 bytes"))?;
            if self.data_file_raw && self.backing_file.is_some() {
                return Err(invalid(
                    "data_file_raw cannot be used with a backing file (the data file must be \
                     the whole disk)",
                ));
            }
        } else if self.data_file_raw {
            return Err(invalid("data_file_raw needs data_file"));
        }
        Ok(())
    }
}

/// Creates the image; refuses to overwrite. `size` 0 with a backing file takes the backing
/// file's size.
/// Checks that an image of `size` bytes (no backing file) can be made with `opts`, without
/// making anything.
pub fn check(size: u64, opts: &CreateOptions) -> Result<()> {
    opts.validate()?;
    if size == 0 && opts.backing_file.is_none() {
        return Err(invalid("Image size must be greater than zero"));
    }
    let size = size
        .checked_next_multiple_of(512)
        .ok_or_else(|| invalid(format!("Size {size} is too large")))?;
    Layout::compute(size.max(512), opts).map(|_| ())
}

pub fn create(path: &Path, size: u64, opts: &CreateOptions) -> Result<()> {
    create_cancellable(path, size, opts, &|| false)
}

/// [`create`], stopping with [`StorageError::Cancelled`] (and no file left) once `cancelled`
/// says so: preallocating a large image writes for a long time.
pub fn create_cancellable(
    path: &Path,
    size: u64,
    opts: &CreateOptions,
    cancelled: &dyn Fn() -> bool,
) -> Result<()> {
    opts.validate()?;
    let mut size = size;
    let mut backing_format = opts.backing_format;
    if let Some(b) = &opts.backing_file {
        let name = path.display().to_string();
        let bpath = super::backing::resolve(&name, b)?;
        let bimg = crate::format::open_image(
            &bpath,
            &ImageOpenOptions {
                format: opts.backing_format,
                read_only: true,
                ..ImageOpenOptions::default()
            },
        )
        .map_err(|e| match e {
            StorageError::NotFound(p) => {
                invalid(format!("Backing file {} does not exist", p.display()))
            }
            other => other,
        })?;
        backing_format.get_or_insert(bimg.format());
        if size == 0 {
            size = bimg.size();
        }
    }
    if size == 0 {
        return Err(invalid("Image size must be greater than zero"));
    }
    // Like qemu-img, whole sectors.
    let size = size
        .checked_next_multiple_of(512)
        .ok_or_else(|| invalid(format!("Size {size} is too large")))?;
    let layout = Layout::compute(size, opts)?;
    let mut header = layout.header(size, opts);
    if let Some(f) = backing_format {
        header.extensions.insert(
            0,
            Extension {
                kind: ext::BACKING_FORMAT,
                data: f.name().as_bytes().to_vec(),
            },
        );
    }
    let name = path.display().to_string();
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => StorageError::AlreadyExists(name.clone()),
            io::ErrorKind::NotFound => {
                StorageError::NotFound(path.parent().unwrap_or(path).to_path_buf())
            }
            _ => StorageError::io(format!("Creating {name}"), e),
        })?;
    let data_path = match &opts.data_file {
        Some(d) => Some(super::backing::resolve(&name, d)?),
        None => None,
    };
    let mut data_made = false;
    let r = (|| {
        if let Some(dp) = &data_path {
            create_data_file(dp, size, opts.preallocation, cancelled)?;
            data_made = true;
        }
        layout.write(&file, &header, opts.preallocation, &name, cancelled)?;
        file.sync_all()
            .map_err(|e| StorageError::io(format!("Syncing {name}"), e))?;
        sync_parent_dir(path)
    })();
    r.inspect_err(|_| {
        let _ = std::fs::remove_file(path);
        if let (Some(dp), true) = (&data_path, data_made) {
            let _ = std::fs::remove_file(dp);
        }
    })
}

/// Creates the external data file at `path`: a raw file of the virtual size, with the space
/// reservation asked for the image (a file that exists is refused, never truncated).
fn create_data_file(
    path: &Path,
    size: u64,
    prealloc: Preallocation,
    cancelled: &dyn Fn() -> bool,
) -> Result<()> {
    use crate::format::raw::{self, RawCreateOptions};
    let preallocation = match prealloc {
        Preallocation::Off | Preallocation::Metadata => raw::Preallocation::Off,
        Preallocation::Falloc => raw::Preallocation::Falloc,
        Preallocation::Full => raw::Preallocation::Full,
    };
    raw::create_cancellable(path, size, &RawCreateOptions { preallocation }, cancelled).map_err(
        |e| match e {
            StorageError::AlreadyExists(_) => invalid(format!(
                "The data file {} exists already; Strata does not truncate it (remove it first)",
                path.display()
            )),
            other => other,
        },
    )
}

/// Where everything goes, in clusters.
struct Layout {
    cs: u64,
    cluster_bits: u32,
    refcount_order: u32,
    extended: bool,
    l1_entries: u64,
    reftable_at: u64,
    reftable_clusters: u64,
    refblocks_at: u64,
    refblocks: u64,
    l1_at: u64,
    l1_clusters: u64,
    l2_at: u64,
    l2_tables: u64,
    data_at: u64,
    data_clusters: u64,
    /// Data clusters live in an external data file, at their guest offsets.
    external: bool,
}

impl Layout {
    fn compute(size: u64, o: &CreateOptions) -> Result<Layout> {
        let cs = o.cluster_size;
        let cluster_bits = cs.trailing_zeros();
        let l1_entries = l1_entries_for(size, cluster_bits, o.extended_l2)
            .filter(|&n| n * 8 <= MAX_L1_BYTES)
            .ok_or_else(|| invalid(format!("Size {size} is too large for {cs}-byte clusters")))?;
        let l1_clusters = (l1_entries * 8).div_ceil(cs).max(1);
        let external = o.data_file.is_some();
        let mapped = o.preallocation != Preallocation::Off || o.data_file_raw;
        let (l2_tables, data_clusters) = if !mapped {
            (0, 0)
        } else {
            let per_l2 = cs / if o.extended_l2 { 16 } else { 8 };
            let data = size.div_ceil(cs);
            (data.div_ceil(per_l2), data)
        };
        let refcount_order = o.refcount_bits.trailing_zeros();
        let rb_entries = (cs * 8) >> refcount_order;
        let in_file = if external { 0 } else { data_clusters };
        let fixed = 1 + l1_clusters + l2_tables + in_file;
        let (mut rt, mut rb) = (1u64, 1u64);
        loop {
            let total = fixed + rt + rb;
            let rb2 = total.div_ceil(rb_entries);
            let rt2 = (rb2 * 8).div_ceil(cs).max(1);
            if rb2 == rb && rt2 == rt {
                break;
            }
            rb = rb2;
            rt = rt2;
        }
        if rt * cs > super::header::MAX_REFTABLE_BYTES {
            return Err(invalid(format!(
                "Size {size} needs a refcount table beyond 8 MiB with these options"
            )));
        }
        let reftable_at = 1;
        let refblocks_at = reftable_at + rt;
        let l1_at = refblocks_at + rb;
        let l2_at = l1_at + l1_clusters;
        let data_at = l2_at + l2_tables;
        Ok(Layout {
            cs,
            cluster_bits,
            refcount_order,
            extended: o.extended_l2,
            l1_entries,
            reftable_at,
            reftable_clusters: rt,
            refblocks_at,
            refblocks: rb,
            l1_at,
            l1_clusters,
            l2_at,
            l2_tables,
            data_at,
            data_clusters,
            external,
        })
    }

    fn total_clusters(&self) -> u64 {
        self.data_at + if self.external { 0 } else { self.data_clusters }
    }

    fn header(&self, size: u64, o: &CreateOptions) -> Header {
        let mut incompatible = 0;
        if o.extended_l2 {
            incompatible |= incompat::EXTENDED_L2;
        }
        if o.compression == CompressionType::Zstd {
            incompatible |= incompat::COMPRESSION;
        }
        let mut extensions = Vec::new();
        let mut autoclear_features = 0;
        if let Some(d) = &o.data_file {
            incompatible |= incompat::DATA_FILE;
            extensions.push(Extension {
                kind: ext::DATA_FILE,
                data: d.as_bytes().to_vec(),
            });
            if o.data_file_raw {
                autoclear_features |= super::header::autoclear::RAW_DATA;
            }
        }
        let v3 = o.version >= 3;
        let mut additional = Vec::new();
        if v3 {
            additional = vec![0u8; 8];
            additional[0] = u8::from(o.compression == CompressionType::Zstd);
        }
        Header {
            version: o.version,
            cluster_bits: self.cluster_bits,
            size,
            l1_size: self.l1_entries as u32,
            l1_table_offset: self.l1_at * self.cs,
            refcount_table_offset: self.reftable_at * self.cs,
            refcount_table_clusters: self.reftable_clusters as u32,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: incompatible,
            compatible_features: if o.lazy_refcounts {
                compat::LAZY_REFCOUNTS
            } else {
                0
            },
            autoclear_features,
            refcount_order: self.refcount_order,
            header_length: if v3 { 112 } else { 72 },
            additional,
            extensions: if v3 {
                extensions.push(Extension {
                    kind: ext::FEATURE_TABLE,
                    data: default_feature_table(),
                });
                extensions
            } else {
                Vec::new()
            },
            backing_file: o.backing_file.clone(),
        }
    }

    fn write(
        &self,
        file: &File,
        header: &Header,
        prealloc: Preallocation,
        name: &str,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<()> {
        let ctx = |e: io::Error| StorageError::io(format!("Writing {name}"), e);
        let check = || {
            if cancelled() {
                Err(StorageError::Cancelled)
            } else {
                Ok(())
            }
        };
        let cs = self.cs;
        let total = self.total_clusters();
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let mut head = header.serialize()?;
        head.resize(cs as usize, 0);
        w.write_all(&head).map_err(ctx)?;
        // Refcount table.
        let mut table = vec![0u8; (self.reftable_clusters * cs) as usize];
        for i in 0..self.refblocks {
            let off = (self.refblocks_at + i) * cs;
            table[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
        }
        w.write_all(&table).map_err(ctx)?;
        // Refcount blocks: every cluster of the layout has refcount 1.
        let rb_entries = (cs * 8) >> self.refcount_order;
        let mut block = vec![0u8; cs as usize];
        for b in 0..self.refblocks {
            block.fill(0);
            for i in 0..rb_entries {
                if b * rb_entries + i < total {
                    refcount::set(&mut block, self.refcount_order, i as usize, 1);
                }
            }
            w.write_all(&block).map_err(ctx)?;
        }
        // L1 table.
        let mut l1 = vec![0u8; (self.l1_clusters * cs) as usize];
        for i in 0..self.l2_tables {
            let off = ((self.l2_at + i) * cs) | COPIED;
            l1[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
        }
        w.write_all(&l1).map_err(ctx)?;
        // L2 tables.
        let entry = if self.extended { 16 } else { 8 };
        let per_l2 = cs / entry;
        for t in 0..self.l2_tables {
            if t % 256 == 0 {
                check()?;
            }
            block.fill(0);
            for i in 0..per_l2 {
                let data = t * per_l2 + i;
                if data >= self.data_clusters {
                    break;
                }
                let at = (i * entry) as usize;
                let host = if self.external {
                    data
                } else {
                    self.data_at + data
                };
                let off = (host * cs) | COPIED;
                block[at..at + 8].copy_from_slice(&off.to_be_bytes());
                if self.extended {
                    block[at + 8..at + 16].copy_from_slice(&u64::from(u32::MAX).to_be_bytes());
                }
            }
            w.write_all(&block).map_err(ctx)?;
        }
        w.flush().map_err(ctx)?;
        drop(w);
        if self.external {
            return file
                .set_len(total * cs)
                .map_err(|e| StorageError::io(format!("Sizing {name}"), e));
        }
        let data_start = self.data_at * cs;
        let data_len = self.data_clusters * cs;
        match prealloc {
            Preallocation::Off | Preallocation::Metadata => {}
            Preallocation::Falloc => {
                crate::format::raw::fallocate_range(file, data_start, data_len, name, cancelled)?;
            }
            Preallocation::Full => {
                let mut f = file;
                f.seek(SeekFrom::Start(data_start)).map_err(ctx)?;
                let zeros = vec![0u8; 1 << 20];
                let mut left = data_len;
                while left > 0 {
                    check()?;
                    let n = left.min(zeros.len() as u64) as usize;
                    f.write_all(&zeros[..n]).map_err(ctx)?;
                    left -= n as u64;
                }
            }
        }
        file.set_len(total * cs)
            .map_err(|e| StorageError::io(format!("Sizing {name}"), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> Result<CreateOptions> {
        let map = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CreateOptions::from_map(&map)
    }

    #[test]
    fn options_are_validated_like_qemu_img() {
        assert!(opts(&[("compat", "0.10"), ("lazy_refcounts", "on")]).is_err());
        assert!(opts(&[("extended_l2", "on"), ("cluster_size", "4k")]).is_err());
        assert!(opts(&[("cluster_size", "3000")]).is_err());
        assert!(opts(&[("refcount_bits", "3")]).is_err());
        assert!(opts(&[("frobnicate", "1")]).is_err());
        let o = opts(&[
            ("cluster_size", "2M"),
            ("refcount_bits", "64"),
            ("compression_type", "zstd"),
        ])
        .unwrap();
        assert_eq!(o.cluster_size, 2 << 20);
    }

    #[test]
    fn layouts_count_their_own_refcount_blocks() {
        let o = CreateOptions {
            cluster_size: 512,
            refcount_bits: 64,
            preallocation: Preallocation::Metadata,
            ..CreateOptions::default()
        };
        let l = Layout::compute(64 << 20, &o).unwrap();
        let rb_entries = 512 * 8 / 64;
        assert!(l.refblocks * rb_entries >= l.total_clusters());
        assert!(l.reftable_clusters * 512 / 8 >= l.refblocks);
    }
}

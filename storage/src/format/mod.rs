//! Image formats: probing, opening and creating images.
//!
//! A format turns a [`HostFile`] into a [`BlockDevice`] with the guest-visible contents. Raw is
//! the host file itself; qcow2 and vmdk (later) map guest offsets to host extents under a short
//! lock and run data I/O on the host file's queues. [`open_image`] probes the format from the
//! file's first bytes unless the caller names it; a format we recognise but do not implement is
//! refused with an error naming it.

pub mod check;
pub mod compare;
#[cfg(feature = "test-utils")]
pub mod fuzzing;
mod mapped;
pub mod qcow2;
pub mod raw;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use serde::Serialize;

use crate::device::{BlockDevice, HostFile, SharedFile};
use crate::error::{Result, StorageError};
use crate::io::engine::{EngineChoice, FileDevice};
use crate::io::file::{CacheMode, FileOptions};

/// An image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// A plain byte-for-byte image.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// VMware virtual disk.
    Vmdk,
    /// Microsoft Virtual Hard Disk (qemu's "vpc").
    Vhd,
    /// Microsoft Hyper-V virtual hard disk v2.
    Vhdx,
}

impl ImageFormat {
    /// The format's name as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vmdk => "vmdk",
            ImageFormat::Vhd => "vhd",
            ImageFormat::Vhdx => "vhdx",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ImageFormat {
    type Err = StorageError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            "vmdk" => Ok(ImageFormat::Vmdk),
            "vhd" | "vpc" => Ok(ImageFormat::Vhd),
            "vhdx" => Ok(ImageFormat::Vhdx),
            other => Err(StorageError::InvalidInput(format!(
                "Unknown image format '{other}' (expected raw, qcow2, vmdk, vhd or vhdx)"
            ))),
        }
    }
}

/// What probing a file's first bytes found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probed {
    /// A format this crate knows.
    Known(ImageFormat),
    /// A format we recognise but do not support.
    Foreign(&'static str),
}

/// Recognises a format from a file's first bytes; anything unrecognised is raw.
pub fn probe(file: &dyn HostFile) -> Result<Probed> {
    let mut head = [0u8; 512];
    let n = (file.len().min(512)) as usize;
    file.read_exact_at(0, &mut head[..n])?;
    let head = &head[..n];
    let starts = |magic: &[u8]| head.starts_with(magic);
    Ok(if starts(b"QFI\xfb") {
        Probed::Known(ImageFormat::Qcow2)
    } else if starts(b"KDMV") || is_vmdk_descriptor(head) {
        Probed::Known(ImageFormat::Vmdk)
    } else if starts(b"COWD") {
        Probed::Foreign("VMware 3 (COWD) vmdk")
    } else if starts(b"QFI") {
        Probed::Foreign("qcow version 1")
    } else if starts(b"conectix") {
        Probed::Known(ImageFormat::Vhd)
    } else if starts(b"vhdxfile") {
        Probed::Known(ImageFormat::Vhdx)
    } else if head.len() >= 68 && head[64..68] == [0x7f, 0x10, 0xda, 0xbe] {
        Probed::Foreign("vdi")
    } else {
        Probed::Known(ImageFormat::Raw)
    })
}

fn is_vmdk_descriptor(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(head);
    let trimmed = text.trim_start();
    trimmed.starts_with("# Disk DescriptorFile") || trimmed.starts_with("#Disk DescriptorFile")
}

/// Whether an image may make the block layer open other files: a backing file, a parent
/// disk, extent files named by a vmdk descriptor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum References {
    /// Open what the image names, as `qemu-img` does for files its caller names (the local
    /// tools).
    #[default]
    Follow,
    /// Refuse an image that names another file, before opening anything but the image itself.
    /// Appliance images are opened this way: their bytes may have been written by an
    /// untrusted party (an uploader, a guest), and must not make the server read other files.
    Refuse,
}

/// How to open an image.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions {
    /// The format; probed when `None`.
    pub format: Option<ImageFormat>,
    /// Whether other files the image names are opened or the image is refused.
    pub references: References,
    /// Open read-only.
    pub read_only: bool,
    /// Page cache use for the image file.
    pub cache: CacheMode,
    /// Engine for data I/O.
    pub engine: EngineChoice,
}

/// Facts about an open image, as `strata image info` shows them.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// The image file.
    pub filename: String,
    /// Its format.
    pub format: ImageFormat,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Bytes allocated on the host.
    pub actual_size: u64,
    /// Format-specific facts (cluster size, backing chain, ...), by name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub format_specific: BTreeMap<String, serde_json::Value>,
}

/// An open image: a block device that knows its format.
pub trait Image: BlockDevice {
    /// The image's format.
    fn format(&self) -> ImageFormat;

    /// Facts for `strata image info`.
    fn info(&self) -> Result<ImageInfo>;
}

/// Opens a host file at `path` with the options' cache mode and engine.
pub fn open_host_file(path: &Path, opts: &OpenOptions) -> Result<Arc<FileDevice>> {
    FileDevice::open(
        path,
        FileOptions {
            read_only: opts.read_only,
            cache: opts.cache,
        },
        opts.engine,
    )
}

/// What the opened image `info` (of the file `path`) reads from outside its own file — a
/// backing file, a parent disk, extents named by a vmdk descriptor — described for an error,
/// or `None` for a self-contained image. Callers that accept images from untrusted sources
/// (uploads, OVA archives) refuse those, since the references are resolved on this machine.
pub fn outside_references(path: &Path, info: &ImageInfo) -> Result<Option<String>> {
    let fs = &info.format_specific;
    if let Some(b) = fs.get("backing-filename") {
        return Ok(Some(format!("the backing file {b}")));
    }
    if let Some(p) = fs.get("parent") {
        return Ok(Some(format!("the parent disk {p}")));
    }
    if info.format == ImageFormat::Vmdk {
        // A hosted sparse file (monolithicSparse, streamOptimized) embeds its descriptor and is
        // its own only extent, whatever name the descriptor gives it; a text descriptor names
        // extent files.
        use std::io::Read;
        let mut magic = [0u8; 4];
        std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .map_err(|e| StorageError::io(format!("Reading {}", path.display()), e))?;
        if &magic != b"KDMV" {
            return Ok(Some("extent files named by its descriptor".into()));
        }
    }
    Ok(None)
}

/// Resolves a file name an image gives (a vmdk extent, a VHD parent locator) against the image's
/// folder `dir`, refusing absolute names, `..` components and (for existing files) symbolic links
/// that lead out of the folder, so an image cannot make us read arbitrary host files. `what`
/// names the reference in the error.
pub fn resolve_in_folder(dir: &Path, name: &str, what: &str) -> Result<PathBuf> {
    let refuse = || {
        StorageError::InvalidInput(format!(
            "{what} '{}' leaves the image's folder {}",
            name.escape_debug(),
            dir.display()
        ))
    };
    if name.is_empty() || name.contains('\0') {
        return Err(StorageError::InvalidInput(format!(
            "{what} is empty or contains NUL"
        )));
    }
    let rel = Path::new(name);
    if !rel
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(refuse());
    }
    // `./` components add nothing but noise to the names shown to users.
    let rel: PathBuf = rel
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    if rel.as_os_str().is_empty() {
        return Err(refuse());
    }
    let joined = if dir == Path::new(".") {
        rel
    } else {
        dir.join(rel)
    };
    if let (Ok(real), Ok(real_dir)) = (joined.canonicalize(), dir.canonicalize()) {
        if !real.starts_with(&real_dir) {
            return Err(refuse());
        }
    }
    Ok(joined)
}

/// Where a differencing disk `name` (at `path`, `depth` parents below the image opened) looks
/// for its parent: its folder. Refuses an image opened without a path and chains deeper than
/// `max_depth` (which also stops loops). `what` names the format.
pub(crate) fn parent_folder(
    name: &str,
    path: Option<&Path>,
    depth: u32,
    max_depth: u32,
    what: &str,
) -> Result<PathBuf> {
    let Some(path) = path else {
        return Err(StorageError::Unsupported(format!(
            "opening the differencing {what} {name} without its path (its parent is a separate file)"
        )));
    };
    if depth + 1 >= max_depth {
        return Err(StorageError::Unsupported(format!(
            "{what} differencing chains deeper than {max_depth} ({name}; a loop?)"
        )));
    }
    Ok(folder_of(path))
}

/// Parses `subformat=dynamic|fixed` for `what` (VHD, VHDX): whether the disk is fixed.
pub(crate) fn fixed_subformat(value: &str, what: &str) -> Result<bool> {
    match value {
        "dynamic" => Ok(false),
        "fixed" => Ok(true),
        other => Err(StorageError::InvalidInput(format!(
            "Invalid {what} subformat '{other}' (expected dynamic or fixed)"
        ))),
    }
}

/// The folder holding `path` (`.` for a bare file name).
pub(crate) fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Opens the image at `path`. Formats made of several files (vmdk descriptors with extent
/// files, delta disks) find their other files relative to `path`, opened with the same options.
pub fn open_image(path: &Path, opts: &OpenOptions) -> Result<Arc<dyn Image>> {
    let file: SharedFile = open_host_file(path, opts)?;
    open_image_with(file, Some(path), opts)
}

/// Opens an image stored in `file`, probing the format unless `format` is given. Without a
/// path, images that refer to other files (split or flat vmdks, delta disks) are refused.
pub fn open_image_on(file: SharedFile, format: Option<ImageFormat>) -> Result<Arc<dyn Image>> {
    let opts = OpenOptions {
        format,
        read_only: file.read_only(),
        ..OpenOptions::default()
    };
    open_image_with(file, None, &opts)
}

fn open_image_with(
    file: SharedFile,
    path: Option<&Path>,
    opts: &OpenOptions,
) -> Result<Arc<dyn Image>> {
    let format = match opts.format {
        Some(f) => f,
        None => match probe(file.as_ref())? {
            Probed::Known(f) => f,
            Probed::Foreign(name) => {
                return Err(StorageError::Unsupported(format!(
                    "{name} images ({})",
                    file.name()
                )))
            }
        },
    };
    match format {
        ImageFormat::Raw => Ok(Arc::new(raw::RawImage::new(file))),
        ImageFormat::Vmdk => Ok(vmdk::open(file, path, opts)?),
        ImageFormat::Vhd => Ok(vhd::open(file, path, opts)?),
        ImageFormat::Vhdx => Ok(vhdx::open(file, path, opts)?),
        ImageFormat::Qcow2 => {
            let q = qcow2::Qcow2Options {
                engine: opts.engine,
                cache: opts.cache,
                refuse_references: opts.references == References::Refuse,
                ..qcow2::Qcow2Options::default()
            };
            Ok(qcow2::open(file, &q)?)
        }
    }
}

/// [`create_image`], stopping with [`StorageError::Cancelled`] (and no file left) once
/// `cancelled` says so; preallocation (`full`, `falloc`, qcow2 `metadata`) of a large image
/// writes for a long time.
pub fn create_image_cancellable(
    path: &Path,
    format: ImageFormat,
    size: u64,
    options: &BTreeMap<String, String>,
    cancelled: &dyn Fn() -> bool,
) -> Result<()> {
    match format {
        ImageFormat::Raw => raw::create_cancellable(
            path,
            size,
            &raw::RawCreateOptions::from_map(options)?,
            cancelled,
        ),
        ImageFormat::Qcow2 => qcow2::create::create_cancellable(
            path,
            size,
            &qcow2::create::CreateOptions::from_map(options)?,
            cancelled,
        ),
        ImageFormat::Vmdk | ImageFormat::Vhd | ImageFormat::Vhdx => {
            create_image(path, format, size, options)
        }
    }
}

/// Checks that a new `format` image of `size` bytes can be made with `options`, without
/// making anything: what [`create_image`] would refuse as bad input is refused here, so that a
/// server can answer a bad request before it starts a job.
pub fn check_create_options(
    format: ImageFormat,
    size: u64,
    options: &BTreeMap<String, String>,
) -> Result<()> {
    match format {
        ImageFormat::Raw => {
            raw::RawCreateOptions::from_map(options)?;
            raw::RawCreateOptions::check_size(size)
        }
        ImageFormat::Vmdk => {
            vmdk::create::check(size, &vmdk::create::VmdkCreateOptions::from_map(options)?)
        }
        ImageFormat::Qcow2 => {
            qcow2::create::check(size, &qcow2::create::CreateOptions::from_map(options)?)
        }
        ImageFormat::Vhd => {
            vhd::create::check(size, &vhd::create::VhdCreateOptions::from_map(options)?)
        }
        ImageFormat::Vhdx => {
            vhdx::create::VhdxCreateOptions::from_map(options)?;
            vhdx::create::check(size)
        }
    }
}

/// A sequential writer of compressed units (qcow2 clusters, streamOptimized vmdk grains), used by
/// `convert -c` and for formats that can only be written as a stream.
///
/// The caller creates the image with [`create_compressed`], then calls [`write_unit`] with
/// strictly increasing, unit-aligned offsets for every unit that holds data (units not written
/// read as zeros), and finally [`finish`], which writes the remaining metadata and makes the
/// image durable. Dropping a writer without `finish` leaves an image that the format reports as
/// incomplete or that reads as zeros past the last unit written — never a silently wrong one.
///
/// [`write_unit`]: CompressedWriter::write_unit
/// [`finish`]: CompressedWriter::finish
pub trait CompressedWriter: Send {
    /// The unit of compression in bytes (cluster or grain size).
    fn unit(&self) -> u64;

    /// Writes one unit at `offset` (a multiple of [`CompressedWriter::unit`]). `data` is one unit
    /// long, or shorter for the last unit of the image.
    fn write_unit(&mut self, offset: u64, data: &[u8]) -> Result<()>;

    /// Writes the remaining metadata and syncs the image.
    fn finish(self: Box<Self>) -> Result<()>;
}

/// Creates an image written as a stream of compressed units (see [`CompressedWriter`]).
pub fn create_compressed(
    path: &Path,
    format: ImageFormat,
    size: u64,
    options: &BTreeMap<String, String>,
) -> Result<Box<dyn CompressedWriter>> {
    match format {
        ImageFormat::Vmdk => {
            let mut opts = options.clone();
            let sub = opts
                .entry("subformat".into())
                .or_insert_with(|| "streamOptimized".into());
            if !sub.eq_ignore_ascii_case("streamOptimized") {
                return Err(StorageError::InvalidInput(format!(
                    "Compressed vmdk images are streamOptimized, not {sub}"
                )));
            }
            let opts = vmdk::create::VmdkCreateOptions::from_map(&opts)?;
            Ok(Box::new(vmdk::stream::StreamWriter::create(
                path, size, &opts,
            )?))
        }
        ImageFormat::Qcow2 => qcow2::compress::create_compressed(path, size, options),
        _ => Err(StorageError::Unsupported(format!(
            "compressed {format} images (the format has no compression; convert without -c)"
        ))),
    }
}

/// Parses `-o key=value,key=value` into a map; an empty string gives an empty map.
pub fn parse_options(text: &str) -> Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            StorageError::InvalidInput(format!("Invalid option '{part}': expected key=value"))
        })?;
        if map
            .insert(k.trim().to_string(), v.trim().to_string())
            .is_some()
        {
            return Err(StorageError::InvalidInput(format!(
                "Option '{k}' is given twice"
            )));
        }
    }
    Ok(map)
}

/// Creates an image at `path` of `format` and `size` with format `options` (`-o` pairs).
/// Fails without touching anything if `path` already exists.
pub fn create_image(
    path: &Path,
    format: ImageFormat,
    size: u64,
    options: &BTreeMap<String, String>,
) -> Result<()> {
    match format {
        ImageFormat::Raw => raw::create(path, size, &raw::RawCreateOptions::from_map(options)?),
        ImageFormat::Vmdk => vmdk::create::create(
            path,
            size,
            &vmdk::create::VmdkCreateOptions::from_map(options)?,
        ),
        ImageFormat::Qcow2 => qcow2::create::create(
            path,
            size,
            &qcow2::create::CreateOptions::from_map(options)?,
        ),
        ImageFormat::Vhd => vhd::create::create(
            path,
            size,
            &vhd::create::VhdCreateOptions::from_map(options)?,
        ),
        ImageFormat::Vhdx => vhdx::create::create(
            path,
            size,
            &vhdx::create::VhdxCreateOptions::from_map(options)?,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::memory::MemoryDevice;

    #[test]
    fn probing_recognises_magics() {
        let cases: [(&[u8], Probed); 5] = [
            (b"QFI\xfb\0\0\0\x03", Probed::Known(ImageFormat::Qcow2)),
            (b"KDMV\x01\0\0\0", Probed::Known(ImageFormat::Vmdk)),
            (
                b"# Disk DescriptorFile\nversion=1\n",
                Probed::Known(ImageFormat::Vmdk),
            ),
            (b"vhdxfile", Probed::Known(ImageFormat::Vhdx)),
            (b"\xeb\x63\x90 boot sector", Probed::Known(ImageFormat::Raw)),
        ];
        for (head, want) in cases {
            let dev = MemoryDevice::read_only_with(head);
            assert_eq!(probe(dev.as_ref()).unwrap(), want);
        }
    }

    #[test]
    fn refusing_references_opens_nothing_but_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        create_image(&base, ImageFormat::Raw, 1 << 20, &BTreeMap::new()).unwrap();
        let overlay = dir.path().join("overlay.qcow2");
        let opts = parse_options("backing_file=base.raw,backing_fmt=raw").unwrap();
        create_image(&overlay, ImageFormat::Qcow2, 1 << 20, &opts).unwrap();
        let split = dir.path().join("split.vmdk");
        let opts = parse_options("subformat=twoGbMaxExtentSparse").unwrap();
        create_image(&split, ImageFormat::Vmdk, 1 << 20, &opts).unwrap();
        let vhd_base = dir.path().join("base.vhd");
        create_image(&vhd_base, ImageFormat::Vhd, 1 << 20, &BTreeMap::new()).unwrap();
        let vhd_child = dir.path().join("child.vhd");
        let opts = parse_options("backing_file=base.vhd").unwrap();
        create_image(&vhd_child, ImageFormat::Vhd, 0, &opts).unwrap();
        for (path, fmt) in [
            (&overlay, ImageFormat::Qcow2),
            (&split, ImageFormat::Vmdk),
            (&vhd_child, ImageFormat::Vhd),
        ] {
            let follow = OpenOptions {
                format: Some(fmt),
                read_only: true,
                ..OpenOptions::default()
            };
            open_image(path, &follow).unwrap();
            let refuse = OpenOptions {
                references: References::Refuse,
                ..follow
            };
            match open_image(path, &refuse) {
                Err(StorageError::Forbidden(m)) => assert!(m.contains("self-contained"), "{m}"),
                other => panic!("{}: {other:?}", path.display()),
            }
        }
        // A self-contained image opens either way.
        let plain = dir.path().join("plain.qcow2");
        create_image(&plain, ImageFormat::Qcow2, 1 << 20, &BTreeMap::new()).unwrap();
        let refuse = OpenOptions {
            format: Some(ImageFormat::Qcow2),
            references: References::Refuse,
            ..OpenOptions::default()
        };
        open_image(&plain, &refuse).unwrap();
    }

    #[test]
    fn options_parse_and_refuse_duplicates() {
        let m = parse_options("preallocation=full,cluster_size=65536").unwrap();
        assert_eq!(m["preallocation"], "full");
        assert!(parse_options("a=1,a=2").is_err());
        assert!(parse_options("novalue").is_err());
        assert!(parse_options("").unwrap().is_empty());
    }
}

//! The conversion `strata image convert` runs: images and volumes in, images and volumes out.
//!
//! A source is an image file or, when the request names a data directory, a logical volume
//! `lv:VG/NAME` (see [`crate::source`]). A target is a new image (staged under a temporary name
//! and moved into place only after its final flush: see `staging.rs`), or with `-n` an existing
//! image or volume, written in place; an error there is reported and the target is left as the
//! failure left it. A volume holds raw guest data, so it pairs with the raw format only.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::Path;

use super::snapshot::{open_snapshot, SnapshotSel};
use super::staging::Staged;
use super::writeout::{EarlyWriteout, WriteoutProgress};
use super::{convert, ConvertOptions, ConvertProgress, ConvertReport, ConvertTarget};
use crate::device::BlockDevice;
use crate::error::{Result, StorageError};
use crate::format::{self, ImageFormat, OpenOptions};
use crate::io::file::CacheMode;
use crate::source::{open_source, Source, SourceSpec, LV_PREFIX};
use crate::volume::VolumeStore;

/// A conversion between images and volumes (`strata image convert`).
#[derive(Clone, Debug)]
pub struct ConvertRequest<'a> {
    /// The source image, or `lv:VG/NAME` when `volumes` is set.
    pub source: &'a Path,
    /// Its format; probed when `None`.
    pub source_format: Option<ImageFormat>,
    /// The target image, or `lv:VG/NAME` (with `-n`) when `volumes` is set.
    pub target: &'a Path,
    /// The target's format.
    pub target_format: ImageFormat,
    /// Format options for a new target (`-o`).
    pub target_options: BTreeMap<String, String>,
    /// Write a compressed target (`-c`).
    pub compress: bool,
    /// Cache mode and engine for both sides (the target's cache mode, and the source's unless
    /// `source_cache` is given).
    pub open: OpenOptions,
    /// The source's cache mode (`-T`), when it differs from the target's.
    pub source_cache: Option<CacheMode>,
    /// The conversion itself.
    pub convert: ConvertOptions,
    /// The data directory whose volumes `lv:VG/NAME` names; `None`: every name is a file.
    pub volumes: Option<&'a Path>,
    /// Read this internal snapshot of a qcow2 source instead of its active state (`-l`).
    pub source_snapshot: Option<SnapshotSel>,
}

/// One side of a conversion.
#[derive(Debug, PartialEq, Eq)]
enum Side<'a> {
    File(&'a Path),
    Volume { vg: String, lv: String },
}

impl<'a> Side<'a> {
    fn parse(path: &'a Path, volumes: Option<&Path>) -> Result<Side<'a>> {
        let Some(text) = path.to_str().filter(|_| volumes.is_some()) else {
            return Ok(Side::File(path));
        };
        match SourceSpec::parse(text)? {
            SourceSpec::Volume { vg, lv } => Ok(Side::Volume { vg, lv }),
            SourceSpec::Path(_) => Ok(Side::File(path)),
        }
    }

    fn is_volume(&self) -> bool {
        matches!(self, Side::Volume { .. })
    }
}

/// Refuses a format other than raw for a volume.
fn raw_only(format: Option<ImageFormat>, what: &str) -> Result<()> {
    match format {
        None | Some(ImageFormat::Raw) => Ok(()),
        Some(f) => Err(StorageError::InvalidInput(format!(
            "A volume holds raw data: {what} {f} does not apply to a volume (use raw)"
        ))),
    }
}

/// Opens the source and, for `-n`, the target; both volumes of one group share one opening
/// of the group (it is locked while open).
fn open_sides(
    req: &ConvertRequest<'_>,
    src: &Side<'_>,
    dst: &Side<'_>,
) -> Result<(Source, Option<Source>)> {
    let data_dir = req.volumes.unwrap_or(Path::new("."));
    let src_opts = OpenOptions {
        format: req.source_format,
        read_only: true,
        cache: req.source_cache.unwrap_or(req.open.cache),
        ..req.open
    };
    let dst_opts = OpenOptions {
        format: Some(req.target_format),
        read_only: false,
        ..req.open
    };
    if let (Side::Volume { vg, lv }, Side::Volume { vg: dvg, lv: dlv }) = (src, dst) {
        if vg == dvg {
            let store = VolumeStore::new(data_dir).with_io(req.open.engine, req.open.cache);
            let group = store.open_group(vg, false)?;
            let s = Source::Volume {
                device: group.open_lv(lv, true)?,
                vg: group.clone(),
                name: format!("{vg}/{lv}"),
            };
            let d = Source::Volume {
                device: group.open_lv(dlv, false)?,
                vg: group,
                name: format!("{vg}/{dlv}"),
            };
            return Ok((s, Some(d)));
        }
    }
    let open = |side: &Side<'_>, opts: &OpenOptions| -> Result<Source> {
        match side {
            Side::File(p) => Ok(Source::image(format::open_image(p, opts)?)),
            Side::Volume { vg, lv } => {
                open_source(&format!("{LV_PREFIX}{vg}/{lv}"), opts, data_dir)
            }
        }
    };
    let source = match (&req.source_snapshot, src) {
        (Some(sel), Side::File(p)) => {
            if req.source_format.is_some_and(|f| f != ImageFormat::Qcow2) {
                return Err(StorageError::InvalidInput(
                    "-l reads internal snapshots of qcow2 images only".into(),
                ));
            }
            let host: crate::device::SharedFile = format::open_host_file(p, &src_opts)?;
            if format::probe(host.as_ref())? != format::Probed::Known(ImageFormat::Qcow2) {
                return Err(StorageError::InvalidInput(format!(
                    "-l reads internal snapshots of qcow2 images, and {} is not one",
                    p.display()
                )));
            }
            Source::image(open_snapshot(host, sel, src_opts.references)?)
        }
        (Some(_), Side::Volume { .. }) => {
            return Err(StorageError::InvalidInput(
                "-l applies to qcow2 images, not volumes (take a volume snapshot with `strata lv snapshot`)".into(),
            ))
        }
        (None, _) => open(src, &src_opts)?,
    };
    let target = if req.convert.existing_target {
        Some(open(dst, &dst_opts)?)
    } else {
        None
    };
    Ok((source, target))
}

/// Opens the source, creates or opens the target, converts. See the module documentation.
pub fn convert_files(
    req: &ConvertRequest<'_>,
    progress: &dyn ConvertProgress,
) -> Result<ConvertReport> {
    let src = Side::parse(req.source, req.volumes)?;
    let dst = Side::parse(req.target, req.volumes)?;
    let same = match (&src, &dst) {
        (Side::File(a), Side::File(b)) => matches!(
            (a.canonicalize(), b.canonicalize()),
            (Ok(x), Ok(y)) if x == y
        ),
        (a, b) => a == b,
    };
    if same {
        return Err(StorageError::InvalidInput(
            "the source and the target are the same".into(),
        ));
    }
    if src.is_volume() {
        raw_only(req.source_format, "-f")?;
    }
    if req.convert.existing_target {
        if req.compress {
            return Err(StorageError::InvalidInput(
                "-c writes a new compressed image; it cannot be combined with -n".into(),
            ));
        }
        if !req.target_options.is_empty() {
            return Err(StorageError::InvalidInput(
                "-o applies to new targets, not with -n".into(),
            ));
        }
    }
    if dst.is_volume() {
        if !req.convert.existing_target {
            return Err(StorageError::InvalidInput(
                "A volume target must exist: create it with `strata lv create` and convert into it with -n".into(),
            ));
        }
        raw_only(Some(req.target_format), "-O")?;
    }
    let (source, target) = open_sides(req, &src, &dst)?;
    let device = source.device();
    if let Some(t) = target {
        return convert(
            device.as_ref(),
            ConvertTarget::Device(t.device().as_ref()),
            &req.convert,
            progress,
        );
    }
    let Side::File(path) = dst else {
        return Err(StorageError::InvalidInput(
            "a volume target needs -n".into(),
        ));
    };
    let new = NewImage {
        path,
        format: req.target_format,
        options: &req.target_options,
        compress: req.compress,
        open: req.open,
    };
    convert_to_new_image(device.as_ref(), &new, &req.convert, progress)
}

/// A new image to convert into.
#[derive(Clone, Copy, Debug)]
pub struct NewImage<'a> {
    /// Its final path; must not exist.
    pub path: &'a Path,
    /// Its format.
    pub format: ImageFormat,
    /// Format options (`-o`).
    pub options: &'a BTreeMap<String, String>,
    /// Write it compressed (`-c`).
    pub compress: bool,
    /// Cache mode and engine to write it with.
    pub open: OpenOptions,
}

/// Converts `src` into a new image, built under a temporary name and moved to `new.path` only
/// once it is complete and flushed; on an error nothing is left behind.
pub fn convert_to_new_image(
    src: &dyn BlockDevice,
    new: &NewImage<'_>,
    opts: &ConvertOptions,
    progress: &dyn ConvertProgress,
) -> Result<ConvertReport> {
    // Where nothing is written, a backed image reads its backing file, not zeros: the source's
    // zero ranges must be written as zeros there (qcow2 zero clusters), as on an existing target.
    let backed = ConvertOptions {
        existing_target: true,
        ..opts.clone()
    };
    let opts = if new.options.contains_key("backing_file") {
        &backed
    } else {
        opts
    };
    let staged = Staged::new(new.path, new.format)?;
    // A qcow2 data file is created under its own name (the image names it); a failed conversion
    // removes it with the staged image.
    let data_file = match new.options.get("data_file") {
        Some(d) if new.format == ImageFormat::Qcow2 => Some(format::qcow2::backing::resolve(
            &new.path.display().to_string(),
            d,
        )?),
        _ => None,
    }
    // One that exists already is refused by the creation, and must stay.
    .filter(|d| !d.exists());
    build_new_image(src, new, opts, progress, &staged)
        .inspect_err(|_| {
            if let Some(d) = &data_file {
                let _ = std::fs::remove_file(d);
            }
        })
        .map_err(|e| staged.scrub(e))
        .and_then(|report| {
            staged.commit()?;
            Ok(report)
        })
}

/// Whether the new image can only be written as a compressed stream: `-c`, or a vmdk with
/// `subformat=streamOptimized` (which qemu-img writes without `-c` too).
fn streamed(new: &NewImage<'_>) -> bool {
    new.compress
        || (new.format == ImageFormat::Vmdk
            && new
                .options
                .get("subformat")
                .is_some_and(|s| s.eq_ignore_ascii_case("streamOptimized")))
}

fn build_new_image(
    src: &dyn BlockDevice,
    new: &NewImage<'_>,
    opts: &ConvertOptions,
    progress: &dyn ConvertProgress,
    staged: &Staged,
) -> Result<ConvertReport> {
    let size = src.size();
    let build = staged.build_path();
    let report = if streamed(new) {
        let w = format::create_compressed(build, new.format, size, new.options)?;
        convert(src, ConvertTarget::Compressed(w), opts, progress)?
    } else {
        format::create_image(build, new.format, size, new.options)?;
        let dst_opts = OpenOptions {
            format: Some(new.format),
            read_only: false,
            ..new.open
        };
        let dst = format::open_image(build, &dst_opts)?;
        let progress = WriteoutProgress {
            inner: progress,
            writeout: EarlyWriteout::start(build),
            last: Cell::new(0),
        };
        let report = convert(src, ConvertTarget::Device(dst.as_ref()), opts, &progress)?;
        // Close every file of the image before it moves.
        drop(dst);
        report
    };
    Ok(report)
}

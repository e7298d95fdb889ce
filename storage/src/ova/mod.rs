//! OVA import: an OVA is a tar archive holding an OVF descriptor and the disk files it
//! references (usually streamOptimized vmdks). [`import_ova`] reads the tar, parses the OVF's
//! disk references and capacities, and converts each disk into an image in a folder.
//!
//! Crates: `tar` (the Rust ecosystem's tar reader, maintained under the rust-lang umbrella's
//! long-time authors, no unsafe parsing of our own) with its default `xattr` feature off, and
//! `roxmltree` (a small, dependency-free, read-only XML parser; OVF descriptors are small, so a
//! document tree is simplest). Nothing here trusts the archive: every entry name is checked
//! before anything is written, only regular files are extracted, and every disk the OVF names
//! must be in the archive.
//!
//! Disks are extracted to temporary files in the target folder (a stream-optimized vmdk needs
//! its footer, at the end, before its grains can be found), converted with
//! [`crate::convert::convert_files`], and the temporary files removed.

pub mod ovf;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use crate::convert::{
    convert_files, ConvertOptions, ConvertProgress, ConvertReport, ConvertRequest,
};
use crate::error::{Result, StorageError};
use crate::format::{self, ImageFormat, OpenOptions};

/// One imported disk.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ImportedDisk {
    /// The OVF's disk id.
    pub disk_id: String,
    /// The image written.
    pub path: PathBuf,
    /// Capacity the OVF gives.
    pub capacity: u64,
    /// What the conversion did (`None` for a blank disk).
    pub report: Option<ConvertReport>,
}

/// How to import.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// Format of the images written.
    pub format: ImageFormat,
    /// Format options for them (`-o`).
    pub options: BTreeMap<String, String>,
    /// Cache mode and engine.
    pub open: OpenOptions,
}

/// A checked entry name: relative, no `..`, nothing but normal components.
fn safe_name(raw: &Path, dir: &Path) -> Result<PathBuf> {
    let ok = !raw.as_os_str().is_empty()
        && raw
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !ok {
        return Err(StorageError::InvalidInput(format!(
            "OVA entry '{}' would be written outside {}",
            raw.display(),
            dir.display()
        )));
    }
    Ok(raw
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect())
}

struct Listing {
    ovf: String,
    /// Regular files by checked name, with their sizes.
    files: BTreeMap<PathBuf, u64>,
}

fn io_err(what: &Path) -> impl Fn(io::Error) -> StorageError + '_ {
    move |e| StorageError::io(format!("Reading {}", what.display()), e)
}

/// First pass: check every entry's name and read the OVF descriptor.
fn list(ova: &Path, dir: &Path) -> Result<Listing> {
    let file = File::open(ova).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => StorageError::NotFound(ova.to_path_buf()),
        _ => StorageError::io(format!("Opening {}", ova.display()), e),
    })?;
    let mut archive = tar::Archive::new(file);
    let mut ovf = None;
    let mut files = BTreeMap::new();
    for entry in archive.entries_with_seek().map_err(io_err(ova))? {
        let mut entry = entry.map_err(|e| {
            StorageError::corrupt(ova.display().to_string(), format!("not a tar archive: {e}"))
        })?;
        let raw = entry.path().map_err(io_err(ova))?.into_owned();
        let name = safe_name(&raw, dir)?;
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            continue;
        }
        if !kind.is_file() {
            return Err(StorageError::InvalidInput(format!(
                "OVA entry '{}' is a link or special file; only regular files are imported",
                raw.display()
            )));
        }
        let size = entry.size();
        if name
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("ovf"))
        {
            if ovf.is_some() {
                return Err(StorageError::InvalidInput(
                    "the OVA holds more than one .ovf descriptor".into(),
                ));
            }
            if size > ovf::MAX_OVF_BYTES {
                return Err(StorageError::corrupt(
                    ova.display().to_string(),
                    "the OVF descriptor is larger than 8 MiB",
                ));
            }
            let mut text = String::new();
            entry
                .by_ref()
                .take(ovf::MAX_OVF_BYTES)
                .read_to_string(&mut text)
                .map_err(|e| {
                    StorageError::corrupt(
                        ova.display().to_string(),
                        format!("the OVF descriptor is not UTF-8 text: {e}"),
                    )
                })?;
            ovf = Some(text);
        }
        files.insert(name, size);
    }
    let ovf = ovf.ok_or_else(|| {
        StorageError::corrupt(
            ova.display().to_string(),
            "no .ovf descriptor in the archive",
        )
    })?;
    Ok(Listing { ovf, files })
}

/// Second pass: copy the entries named in `wanted` to their temporary paths.
fn extract(ova: &Path, dir: &Path, wanted: &BTreeMap<PathBuf, PathBuf>) -> Result<()> {
    let file =
        File::open(ova).map_err(|e| StorageError::io(format!("Opening {}", ova.display()), e))?;
    let mut archive = tar::Archive::new(file);
    for entry in archive.entries_with_seek().map_err(io_err(ova))? {
        let mut entry = entry.map_err(io_err(ova))?;
        let name = safe_name(&entry.path().map_err(io_err(ova))?, dir)?;
        if let Some(tmp) = wanted.get(&name) {
            let mut out = crate::format::vmdk::create::create_new(tmp)?;
            io::copy(&mut entry, &mut out)
                .map_err(|e| StorageError::io(format!("Extracting {}", name.display()), e))?;
        }
    }
    Ok(())
}

/// Removes temporary files however the import ends.
struct Temps(Vec<PathBuf>);

impl Drop for Temps {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Imports every disk of `ova` into `dir` (created if missing). See the module documentation.
pub fn import_ova(
    ova: &Path,
    dir: &Path,
    opts: &ImportOptions,
    progress: &dyn ConvertProgress,
) -> Result<Vec<ImportedDisk>> {
    let listing = list(ova, dir)?;
    let ovf = ovf::parse(&listing.ovf)?;
    // Every referenced disk file must be in the archive, under a safe name.
    let mut plan = Vec::new();
    for disk in &ovf.disks {
        let src = match &disk.file {
            None => None,
            Some(f) => {
                let name = safe_name(Path::new(&f.href), dir)?;
                let size = listing.files.get(&name).ok_or_else(|| {
                    StorageError::InvalidInput(format!(
                        "The OVF's disk {} refers to '{}', which is not in {}",
                        disk.disk_id,
                        f.href,
                        ova.display()
                    ))
                })?;
                if f.size.is_some_and(|s| s != *size) {
                    return Err(StorageError::corrupt(
                        ova.display().to_string(),
                        format!(
                            "'{}' is {size} bytes but the OVF says {}",
                            f.href,
                            f.size.unwrap_or(0)
                        ),
                    ));
                }
                Some(name)
            }
        };
        let stem = match &src {
            Some(n) => n
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            None => disk.disk_id.clone(),
        };
        let out = dir.join(safe_name(
            Path::new(&format!("{stem}.{}", opts.format)),
            dir,
        )?);
        if plan
            .iter()
            .any(|(_, o, _): &(&ovf::OvfDisk, PathBuf, Option<PathBuf>)| *o == out)
        {
            return Err(StorageError::InvalidInput(format!(
                "two disks would both be written to {}",
                out.display()
            )));
        }
        if out.exists() {
            return Err(StorageError::AlreadyExists(out.display().to_string()));
        }
        plan.push((disk, out, src));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| StorageError::io(format!("Creating {}", dir.display()), e))?;
    let mut temps = Temps(Vec::new());
    let mut wanted = BTreeMap::new();
    for (i, (_, _, src)) in plan.iter().enumerate() {
        if let Some(n) = src {
            let tmp = dir.join(format!(".import-{i}-{}.tmp", std::process::id()));
            temps.0.push(tmp.clone());
            wanted.insert(n.clone(), tmp);
        }
    }
    extract(ova, dir, &wanted)?;
    let mut done = Vec::new();
    for (disk, out, src) in plan {
        let report = match src {
            None => {
                format::create_image(&out, opts.format, disk.capacity, &opts.options)?;
                None
            }
            Some(n) => {
                let tmp = &wanted[&n];
                let req = ConvertRequest {
                    source: tmp,
                    source_format: None,
                    target: &out,
                    target_format: opts.format,
                    target_options: opts.options.clone(),
                    compress: false,
                    open: opts.open,
                    convert: ConvertOptions::default(),
                    volumes: None,
                    source_snapshot: None,
                    source_cache: None,
                };
                let src = format::open_image(
                    tmp,
                    &OpenOptions {
                        read_only: true,
                        ..opts.open
                    },
                )?;
                // The archive is untrusted: a disk that reads other files (a descriptor naming
                // extents, a parent, a backing file) would copy files of the target folder.
                if let Some(what) = format::outside_references(tmp, &src.info()?)? {
                    return Err(StorageError::Unsupported(format!(
                        "OVA disk {} refers to {what}; only self-contained disks are imported",
                        disk.disk_id
                    )));
                }
                let src_size = src.size();
                drop(src);
                if src_size > disk.capacity {
                    return Err(StorageError::corrupt(
                        ova.display().to_string(),
                        format!(
                            "disk {} holds {src_size} bytes, more than its OVF capacity {}",
                            disk.disk_id, disk.capacity
                        ),
                    ));
                }
                Some(convert_files(&req, progress)?)
            }
        };
        done.push(ImportedDisk {
            disk_id: disk.disk_id.clone(),
            path: out,
            capacity: disk.capacity,
            report,
        });
    }
    Ok(done)
}

//! The raw format: the guest sees the host file byte for byte.
//!
//! A raw image adds nothing to the data path: its queues are the host file's own, so raw I/O
//! costs exactly what the engine costs.

use std::collections::BTreeMap;
use std::fs::OpenOptions as FsOpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::device::{BlockDevice, Capabilities, Extent, SharedFile};
use crate::error::{Result, StorageError};
use crate::format::{Image, ImageFormat, ImageInfo};
use crate::io::{IoQueue, QueueOptions};

/// How space is reserved when a raw image is created (qemu-img's `preallocation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Sparse: nothing is allocated until written.
    #[default]
    Off,
    /// Space reserved with fallocate; reads as zeros.
    Falloc,
    /// Zeros written over the whole image.
    Full,
}

impl Preallocation {
    /// Parses qemu-img's names.
    pub fn parse(s: &str) -> Result<Preallocation> {
        match s {
            "off" => Ok(Preallocation::Off),
            "falloc" => Ok(Preallocation::Falloc),
            "full" => Ok(Preallocation::Full),
            "metadata" => Err(StorageError::InvalidInput(
                "preallocation=metadata applies to qcow2, not raw (use off, falloc or full)".into(),
            )),
            other => Err(StorageError::InvalidInput(format!(
                "Invalid preallocation mode '{other}' (expected off, falloc or full)"
            ))),
        }
    }
}

/// Options for creating a raw image.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawCreateOptions {
    /// Space reservation.
    pub preallocation: Preallocation,
}

impl RawCreateOptions {
    /// Reads `-o` options; unknown keys are refused with their name.
    /// Checks that a raw image of `size` bytes can be made: above zero, and a file length the
    /// kernel takes (at most `i64::MAX`).
    pub fn check_size(size: u64) -> Result<()> {
        if size == 0 {
            return Err(StorageError::InvalidInput(
                "Image size must be greater than zero".into(),
            ));
        }
        if i64::try_from(size).is_err() {
            return Err(StorageError::InvalidInput(format!(
                "Size {size} is too large for a raw image"
            )));
        }
        Ok(())
    }

    pub fn from_map(map: &BTreeMap<String, String>) -> Result<RawCreateOptions> {
        let mut opts = RawCreateOptions::default();
        for (k, v) in map {
            match k.as_str() {
                "preallocation" => opts.preallocation = Preallocation::parse(v)?,
                other => {
                    return Err(StorageError::InvalidInput(format!(
                        "Unknown option '{other}' for raw images (supported: preallocation)"
                    )))
                }
            }
        }
        Ok(opts)
    }
}

/// Creates a raw image of `size` bytes at `path`; refuses to overwrite an existing file. On any
/// failure the partly created file is removed.
pub fn create(path: &Path, size: u64, opts: &RawCreateOptions) -> Result<()> {
    create_cancellable(path, size, opts, &|| false)
}

/// [`create`], stopping with [`StorageError::Cancelled`] (and no file left) once `cancelled`
/// says so: preallocating a large image writes for a long time.
pub fn create_cancellable(
    path: &Path,
    size: u64,
    opts: &RawCreateOptions,
    cancelled: &dyn Fn() -> bool,
) -> Result<()> {
    RawCreateOptions::check_size(size)?;
    let name = path.display().to_string();
    let file = FsOpenOptions::new()
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
    let fill = || -> Result<()> {
        file.set_len(size).map_err(|e| match e.raw_os_error() {
            Some(libc::EFBIG) | Some(libc::EINVAL) => StorageError::InvalidInput(format!(
                "Size {size} is too large for the file system holding {name}"
            )),
            _ => StorageError::io(format!("Sizing {name}"), e),
        })?;
        match opts.preallocation {
            Preallocation::Off => {}
            Preallocation::Falloc => fallocate_range(&file, 0, size, &name, cancelled)?,
            Preallocation::Full => write_zeros(&file, size, &name, cancelled)?,
        }
        file.sync_all()
            .map_err(|e| StorageError::io(format!("Syncing {name}"), e))?;
        sync_parent_dir(path)
    };
    fill().inspect_err(|_| {
        let _ = std::fs::remove_file(path);
    })
}

/// Bytes fallocated per step of [`fallocate_range`], between checks for cancellation.
const FALLOC_STEP: u64 = 1 << 30;

/// Allocates `len` bytes at `offset` of `file` in steps, stopping when `cancelled` says so.
pub(crate) fn fallocate_range(
    file: &std::fs::File,
    offset: u64,
    len: u64,
    name: &str,
    cancelled: &dyn Fn() -> bool,
) -> Result<()> {
    let mut at = 0u64;
    while at < len {
        if cancelled() {
            return Err(StorageError::Cancelled);
        }
        let n = (len - at).min(FALLOC_STEP);
        let start = i64::try_from(offset + at)
            .map_err(|_| StorageError::InvalidInput(format!("{name} is too large")))?;
        // SAFETY: fallocate on a descriptor the caller owns; no memory is passed.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, start, n as libc::off_t) };
        if r < 0 {
            return Err(StorageError::io(
                format!("Preallocating {name}"),
                io::Error::last_os_error(),
            ));
        }
        at += n;
    }
    Ok(())
}

fn write_zeros(
    file: &std::fs::File,
    size: u64,
    name: &str,
    cancelled: &dyn Fn() -> bool,
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < size {
        if cancelled() {
            return Err(StorageError::Cancelled);
        }
        let n = (size - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at)
            .map_err(|e| StorageError::io(format!("Writing zeros to {name}"), e))?;
        at += n as u64;
    }
    Ok(())
}

pub use crate::durable::sync_parent_dir;

/// An open raw image. See the module documentation.
#[derive(Debug)]
pub struct RawImage {
    file: SharedFile,
}

impl RawImage {
    /// A raw image over `file`.
    pub fn new(file: SharedFile) -> RawImage {
        RawImage { file }
    }

    /// The host file.
    pub fn file(&self) -> &SharedFile {
        &self.file
    }
}

impl BlockDevice for RawImage {
    fn size(&self) -> u64 {
        self.file.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.file.capabilities()
    }

    fn alignment(&self) -> usize {
        self.file.alignment()
    }

    fn open_queue(&self, opts: &QueueOptions) -> Result<Box<dyn IoQueue>> {
        self.file.open_queue(opts)
    }

    fn flush(&self) -> Result<()> {
        self.file.flush()
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        if new_size == 0 {
            return Err(StorageError::InvalidInput(
                "Image size must be greater than zero".into(),
            ));
        }
        self.file.resize(new_size)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.file.block_status(offset, len)
    }
}

impl Image for RawImage {
    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }

    fn info(&self) -> Result<ImageInfo> {
        Ok(ImageInfo {
            filename: self.file.name().to_string(),
            format: ImageFormat::Raw,
            virtual_size: self.file.size(),
            actual_size: self.file.allocated_bytes()?,
            format_specific: BTreeMap::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{open_image, OpenOptions};

    fn opts(p: &str) -> RawCreateOptions {
        RawCreateOptions {
            preallocation: Preallocation::parse(p).unwrap(),
        }
    }

    #[test]
    fn preallocation_modes_allocate_as_named() {
        let dir = tempfile::tempdir().unwrap();
        for (mode, allocated) in [("off", false), ("falloc", true), ("full", true)] {
            let p = dir.path().join(format!("{mode}.img"));
            create(&p, 8 << 20, &opts(mode)).unwrap();
            let img = open_image(&p, &OpenOptions::default()).unwrap();
            let info = img.info().unwrap();
            assert_eq!(info.virtual_size, 8 << 20);
            assert_eq!(info.actual_size >= 8 << 20, allocated, "{mode}: {info:?}");
        }
    }

    #[test]
    fn create_refuses_existing_files_and_zero_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.img");
        create(&p, 1 << 20, &RawCreateOptions::default()).unwrap();
        assert!(matches!(
            create(&p, 1 << 20, &RawCreateOptions::default()),
            Err(StorageError::AlreadyExists(_))
        ));
        let q = dir.path().join("b.img");
        assert!(create(&q, 0, &RawCreateOptions::default()).is_err());
        assert!(!q.exists());
        assert!(Preallocation::parse("metadata").is_err());
    }

    #[test]
    fn resize_grows_and_shrinks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.img");
        create(&p, 1 << 20, &RawCreateOptions::default()).unwrap();
        let img = open_image(&p, &OpenOptions::default()).unwrap();
        img.resize(3 << 20).unwrap();
        assert_eq!(img.size(), 3 << 20);
        img.resize(1 << 19).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 19);
    }
}

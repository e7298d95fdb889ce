//! An open host file or block device, shared by the engines.
//!
//! A [`FileHandle`] holds two descriptors when O_DIRECT is in use: the direct one, through which
//! every aligned request goes, and a buffered one for the rare unaligned request (a byte-granular
//! metadata update, a request from a tool). The kernel keeps the page cache coherent with direct
//! I/O for requests that do not race on the same page; formats write their metadata in aligned
//! units so that the buffered descriptor is used only by callers that ask for unaligned bytes.
//!
//! The synchronous positional I/O here serves the thread-pool engine, the io_uring engine's
//! unaligned fallback and the [`crate::HostFile`] metadata path.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::device::{Extent, ExtentKind};
use crate::error::{Result, StorageError};
use crate::io::buf::Segment;
use crate::io::{IoBuf, Op};

/// Most iovecs one vectored system call takes (Linux `UIO_MAXIOV`).
pub const MAX_IOVECS: usize = 1024;

/// `_IOR(0x12, 114, size_t)`: size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Whether the page cache is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// O_DIRECT where the file system allows it (qemu's `cache=none`).
    #[default]
    None,
    /// Buffered I/O through the page cache (qemu's `cache=writeback`).
    Writeback,
}

/// How to open a host file.
#[derive(Clone, Copy, Debug, Default)]
pub struct FileOptions {
    /// Open for reading only.
    pub read_only: bool,
    /// Page cache use.
    pub cache: CacheMode,
}

/// An open file or block device. See the module documentation.
#[derive(Debug)]
pub struct FileHandle {
    /// The descriptor aligned I/O uses: O_DIRECT when `direct` is true.
    main: File,
    /// A buffered descriptor for unaligned requests, when `main` is O_DIRECT.
    buffered: Option<File>,
    name: String,
    path: PathBuf,
    direct: bool,
    /// Address, length and offset alignment that `main` needs (1 when buffered).
    align: usize,
    block_device: bool,
    read_only: bool,
    size: AtomicU64,
}

impl FileHandle {
    /// Opens `path` as a file or block device.
    pub fn open(path: &Path, opts: FileOptions) -> Result<FileHandle> {
        let name = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StorageError::NotFound(path.to_path_buf()),
            _ => StorageError::io(format!("Opening {name}"), e),
        })?;
        let ft = meta.file_type();
        if ft.is_dir() {
            return Err(StorageError::InvalidInput(format!(
                "{name} is a directory, not an image file"
            )));
        }
        let block_device = ft.is_block_device();
        if !ft.is_file() && !block_device {
            return Err(StorageError::InvalidInput(format!(
                "{name} is neither a regular file nor a block device"
            )));
        }
        let open = |flags: i32| {
            OpenOptions::new()
                .read(true)
                .write(!opts.read_only)
                .custom_flags(flags | libc::O_CLOEXEC)
                .open(path)
        };
        let open_err = |e: io::Error| match e.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) if !opts.read_only => {
                tracing::debug!(file = %name, error = %e, "opening for writing failed");
                StorageError::ReadOnly(name.clone())
            }
            _ => StorageError::io(format!("Opening {name}"), e),
        };
        let (main, direct) = match opts.cache {
            CacheMode::Writeback => (open(0).map_err(open_err)?, false),
            CacheMode::None => match open(libc::O_DIRECT) {
                Ok(f) => (f, true),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::info!(file = %name, "O_DIRECT is not supported by this file system; using buffered I/O");
                    (open(0).map_err(open_err)?, false)
                }
                Err(e) => return Err(open_err(e)),
            },
        };
        let buffered = if direct {
            Some(open(0).map_err(open_err)?)
        } else {
            None
        };
        let align = if direct {
            direct_io_alignment(&main, block_device)
        } else {
            1
        };
        let size = if block_device {
            block_device_size(&main).map_err(|e| StorageError::io(format!("Sizing {name}"), e))?
        } else {
            meta.len()
        };
        tracing::debug!(file = %name, direct, align, size, "opened");
        Ok(FileHandle {
            main,
            buffered,
            name,
            path: path.to_path_buf(),
            direct,
            align,
            block_device,
            read_only: opts.read_only,
            size: AtomicU64::new(size),
        })
    }

    /// The name used in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The path the file was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The descriptor for aligned I/O.
    pub fn raw_fd(&self) -> RawFd {
        self.main.as_raw_fd()
    }

    /// Whether aligned I/O bypasses the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Alignment aligned I/O needs.
    pub fn alignment(&self) -> usize {
        self.align
    }

    /// Whether this is a block device rather than a regular file.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// Whether the file was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Current size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Whether a request at `offset` with buffer `buf` can go through the direct descriptor.
    pub fn is_aligned(&self, offset: u64, buf: &IoBuf) -> bool {
        offset % self.align as u64 == 0 && buf.is_aligned(self.align)
    }

    /// The descriptor to use for a request with these alignment properties.
    fn fd_for(&self, aligned: bool) -> RawFd {
        match (&self.buffered, aligned) {
            (Some(b), false) => b.as_raw_fd(),
            _ => self.main.as_raw_fd(),
        }
    }

    /// Runs one operation synchronously; the result is bytes transferred (0 for others).
    pub fn execute(&self, op: &mut Op) -> Result<u64> {
        match op {
            Op::Read { offset, buf } => {
                let fd = self.fd_for(self.is_aligned(*offset, buf));
                transfer(fd, *offset, buf.segments(), false)
                    .map_err(|e| StorageError::io(format!("Reading {}", self.name), e))
            }
            Op::Write { offset, buf } => {
                self.check_writable()?;
                let fd = self.fd_for(self.is_aligned(*offset, buf));
                transfer(fd, *offset, buf.segments(), true)
                    .map_err(|e| StorageError::io(format!("Writing {}", self.name), e))
            }
            Op::Flush => self.sync_data().map(|_| 0),
            Op::Discard { offset, len } => self.punch_hole(*offset, *len).map(|_| 0),
            Op::WriteZeroes { offset, len, unmap } => {
                if *unmap {
                    self.punch_hole(*offset, *len).map(|_| 0)
                } else {
                    self.zero_range(*offset, *len).map(|_| 0)
                }
            }
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            Err(StorageError::ReadOnly(self.name.clone()))
        } else {
            Ok(())
        }
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let aligned = offset % self.align as u64 == 0
            && buf.len() % self.align == 0
            && (buf.as_ptr() as usize) % self.align == 0;
        let seg = [slice_segment(buf.as_mut_ptr(), buf.len())];
        let n = transfer(self.fd_for(aligned), offset, &seg, false)
            .map_err(|e| StorageError::io(format!("Reading {}", self.name), e))?;
        if (n as usize) < buf.len() {
            return Err(StorageError::corrupt(
                &self.name,
                format!(
                    "read of {} bytes at offset {offset} reaches past the end of the file",
                    buf.len()
                ),
            ));
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset`, extending the file if needed.
    pub fn write_all_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.check_writable()?;
        let aligned = offset % self.align as u64 == 0
            && buf.len() % self.align == 0
            && (buf.as_ptr() as usize) % self.align == 0;
        // The kernel only reads from this segment for a write.
        let seg = [slice_segment(buf.as_ptr().cast_mut(), buf.len())];
        transfer(self.fd_for(aligned), offset, &seg, true)
            .map_err(|e| StorageError::io(format!("Writing {}", self.name), e))?;
        let end = offset + buf.len() as u64;
        self.size.fetch_max(end, Ordering::AcqRel);
        Ok(())
    }

    /// fdatasync.
    pub fn sync_data(&self) -> Result<()> {
        self.main
            .sync_data()
            .map_err(|e| StorageError::io(format!("Flushing {}", self.name), e))
    }

    /// Sets the length (regular files only).
    pub fn set_len(&self, len: u64) -> Result<()> {
        self.check_writable()?;
        if self.block_device {
            return Err(StorageError::Unsupported(format!(
                "resizing the block device {}",
                self.name
            )));
        }
        self.main
            .set_len(len)
            .map_err(|e| StorageError::io(format!("Resizing {}", self.name), e))?;
        self.size.store(len, Ordering::Release);
        Ok(())
    }

    /// Deallocates a range (PUNCH_HOLE; on a block device, a zeroing discard).
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
            "Discarding",
        )
    }

    /// Zeroes a range, keeping it allocated (ZERO_RANGE, or written zeros where unsupported).
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
            "Zeroing",
        ) {
            Err(StorageError::Io { source, .. })
                if source.raw_os_error() == Some(libc::EOPNOTSUPP) =>
            {
                self.write_zero_buffers(offset, len)
            }
            other => other,
        }
    }

    /// Preallocates a range of a regular file; block devices are fully allocated already.
    pub fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        if self.block_device {
            return Ok(());
        }
        self.fallocate(0, offset, len, "Allocating")?;
        self.size.fetch_max(offset + len, Ordering::AcqRel);
        Ok(())
    }

    /// Bytes allocated on the host (the whole size for a block device).
    pub fn allocated_bytes(&self) -> Result<u64> {
        if self.block_device {
            return Ok(self.size());
        }
        use std::os::unix::fs::MetadataExt;
        let meta = self
            .main
            .metadata()
            .map_err(|e| StorageError::io(format!("Inspecting {}", self.name), e))?;
        Ok(meta.blocks() * 512)
    }

    /// Allocation status at `offset` from SEEK_DATA/SEEK_HOLE: holes in a raw file read as zeros.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let size = self.size();
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Err(StorageError::OutOfRange { offset, len, size });
        }
        if self.block_device {
            return Ok(Extent {
                offset,
                len: end - offset,
                kind: ExtentKind::Data,
            });
        }
        let fd = self.main.as_raw_fd();
        let seek = |whence: i32| seek_data_or_hole(fd, offset, whence);
        let ctx = |e| StorageError::io(format!("Mapping {}", self.name), e);
        match seek(libc::SEEK_DATA).map_err(ctx)? {
            Some(data) if data == offset => {
                let hole = seek(libc::SEEK_HOLE).map_err(ctx)?.unwrap_or(end).min(end);
                Ok(Extent {
                    offset,
                    len: hole.max(offset + 1) - offset,
                    kind: ExtentKind::Data,
                })
            }
            Some(data) => Ok(Extent {
                offset,
                len: data.min(end) - offset,
                kind: ExtentKind::Zero,
            }),
            None => Ok(Extent {
                offset,
                len: end - offset,
                kind: ExtentKind::Zero,
            }),
        }
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64, what: &str) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: fallocate on a descriptor we own; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                self.main.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r < 0 {
            return Err(StorageError::io(
                format!("{what} {}", self.name),
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    fn write_zero_buffers(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = IoBuf::new(CHUNK.min(len) as usize);
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done) as usize;
            let seg = [slice_segment(zeros.segments()[0].ptr(), n)];
            let aligned = (offset + done) % self.align as u64 == 0 && n % self.align == 0;
            transfer(self.fd_for(aligned), offset + done, &seg, true)
                .map_err(|e| StorageError::io(format!("Zeroing {}", self.name), e))?;
            done += n as u64;
        }
        Ok(())
    }
}

fn slice_segment(ptr: *mut u8, len: usize) -> Segment {
    Segment::from_raw(ptr, len)
}

/// Reads or writes `segs` at `offset` with preadv/pwritev, looping over short transfers and the
/// iovec limit. Returns the bytes transferred: less than requested only at end of file (reads).
///
/// The caller keeps the segments' memory valid (and, for reads, unaliased) across the call.
fn transfer(fd: RawFd, offset: u64, segs: &[Segment], write: bool) -> io::Result<u64> {
    let total: usize = segs.iter().map(|s| s.len()).sum();
    let mut done = 0usize;
    if let [seg] = segs {
        // One segment: plain pread/pwrite, no iovec array.
        while done < total {
            let pos = (offset + done as u64) as libc::off_t;
            let p = seg.ptr().wrapping_add(done);
            // SAFETY: `p..p+(total-done)` lies inside the segment, which the caller keeps valid
            // (and unaliased for reads) across the call.
            let r = unsafe {
                if write {
                    libc::pwrite(fd, p.cast(), total - done, pos)
                } else {
                    libc::pread(fd, p.cast(), total - done, pos)
                }
            };
            match r {
                r if r < 0 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                0 if write => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "write returned 0 bytes",
                    ))
                }
                0 => break,
                r => done += r as usize,
            }
        }
        return Ok(done as u64);
    }
    let mut iov: Vec<libc::iovec> = Vec::new();
    while done < total {
        iov.clear();
        let mut skip = done;
        for s in segs {
            if iov.len() == MAX_IOVECS {
                break;
            }
            if skip >= s.len() {
                skip -= s.len();
                continue;
            }
            iov.push(libc::iovec {
                iov_base: s.ptr().wrapping_add(skip).cast(),
                iov_len: s.len() - skip,
            });
            skip = 0;
        }
        let pos = (offset + done as u64) as libc::off_t;
        // SAFETY: every iovec points into memory the caller keeps valid for the call (an IoBuf it
        // holds or a slice it borrows); for reads the memory is writable and not aliased by any
        // live Rust reference.
        let r = unsafe {
            if write {
                libc::pwritev(fd, iov.as_ptr(), iov.len() as i32, pos)
            } else {
                libc::preadv(fd, iov.as_ptr(), iov.len() as i32, pos)
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            if write {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "write returned 0 bytes",
                ));
            }
            break;
        }
        done += r as usize;
    }
    Ok(done as u64)
}

/// Alignment O_DIRECT needs on this file: statx's DIOALIGN where the kernel reports it, else the
/// device's logical block size, else 4096.
fn direct_io_alignment(file: &File, block_device: bool) -> usize {
    let fd = file.as_raw_fd();
    if block_device {
        let mut ssz: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int into `ssz`, which lives across the call.
        let r = unsafe { libc::ioctl(fd, libc::BLKSSZGET, &mut ssz) };
        if r == 0 && ssz > 0 {
            return ssz as usize;
        }
        return 4096;
    }
    // SAFETY: statx is plain data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx on a descriptor we own with AT_EMPTY_PATH and an empty C string; it writes
    // into `stx`, which lives across the call.
    let r = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align > 0 {
        let a = stx.stx_dio_offset_align.max(stx.stx_dio_mem_align) as usize;
        if a.is_power_of_two() {
            return a;
        }
    }
    4096
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 into `size`, which lives across the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// `lseek(fd, offset, whence)` for `SEEK_DATA`/`SEEK_HOLE`: the offset found, or `None` where
/// there is none past `offset` (ENXIO).
pub(crate) fn seek_data_or_hole(fd: i32, offset: u64, whence: i32) -> io::Result<Option<u64>> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: lseek on a descriptor the caller owns; no memory is passed.
    let r = unsafe { libc::lseek(fd, offset, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(r as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(len: u64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.img");
        let f = File::create(&path).unwrap();
        f.set_len(len).unwrap();
        (dir, path)
    }

    #[test]
    fn unaligned_sync_io_round_trips_on_a_direct_file() {
        let (_d, path) = temp_file(1 << 20);
        let h = FileHandle::open(&path, FileOptions::default()).unwrap();
        h.write_all_at(1001, b"hello").unwrap();
        let mut out = [0u8; 7];
        h.read_exact_at(1000, &mut out).unwrap();
        assert_eq!(&out, b"\0hello\0");
    }

    #[test]
    fn reading_past_the_end_is_an_error() {
        let (_d, path) = temp_file(4096);
        let h = FileHandle::open(&path, FileOptions::default()).unwrap();
        let mut out = [0u8; 16];
        assert!(h.read_exact_at(4090, &mut out).is_err());
    }

    #[test]
    fn holes_are_reported_as_zero() {
        let (_d, path) = temp_file(1 << 20);
        let h = FileHandle::open(&path, FileOptions::default()).unwrap();
        h.write_all_at(512 * 1024, &vec![7u8; 4096]).unwrap();
        let e = h.block_status(0, 1 << 20).unwrap();
        assert_eq!(e.kind, ExtentKind::Zero);
        assert_eq!(e.len, 512 * 1024);
        let e = h.block_status(512 * 1024, 1 << 20).unwrap();
        assert_eq!(e.kind, ExtentKind::Data);
    }

    #[test]
    fn directories_and_missing_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = FileHandle::open(dir.path(), FileOptions::default()).unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
        let e = FileHandle::open(&dir.path().join("nope"), FileOptions::default()).unwrap_err();
        assert!(matches!(e, StorageError::NotFound(_)));
    }
}

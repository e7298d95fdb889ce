//! The source cache mode `strata image convert` picks by default (`-T auto`): the page cache
//! when most of the source file's data is in it already, else O_DIRECT.
//!
//! Reading a cached file through the page cache is a memory copy; reading it with O_DIRECT goes
//! to the disk again (measured with a warm cache on a 1 GiB qcow2 holding 450 MB: 0.7–1.0 s
//! with O_DIRECT against 0.4 s through the cache). Cold, O_DIRECT reads large requests straight
//! into our buffers and keeps the page cache for others. So the data extents of the host file
//! (`SEEK_DATA`/`SEEK_HOLE`) are looked up with `mincore` on a read-only shared mapping, which
//! asks the page cache without reading anything; at most [`SCAN_LIMIT`] bytes of data and
//! [`MAX_EXTENTS`] extents are looked at, so the look-up is bounded whatever the file is.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::io::file::CacheMode;

/// Data bytes looked up at most.
const SCAN_LIMIT: u64 = 8 << 30;
/// Data extents looked up at most.
const MAX_EXTENTS: usize = 65536;
/// Bytes mapped at once.
const WINDOW: u64 = 1 << 30;
/// Files smaller than this (a vmdk descriptor naming its extents) keep O_DIRECT.
const MIN_FILE: u64 = 1 << 20;

/// The cache mode to read `path` with: [`CacheMode::Writeback`] when at least half of the data
/// looked at is in the page cache, else [`CacheMode::None`] (also when anything fails, or
/// `path` is not a regular file).
pub fn auto_source_cache(path: &Path) -> CacheMode {
    match cached_share(path) {
        Some(share) if share >= 0.5 => CacheMode::Writeback,
        _ => CacheMode::None,
    }
}

/// The share of the data looked at that is in the page cache.
fn cached_share(path: &Path) -> Option<f64> {
    let file = File::open(path).ok()?;
    let meta = file.metadata().ok()?;
    if !meta.file_type().is_file() || meta.len() < MIN_FILE {
        return None;
    }
    let size = meta.len();
    let fd = file.as_raw_fd();
    let page = page_size();
    let mut vec = Vec::new();
    let (mut seen, mut cached) = (0u64, 0u64);
    let mut at = 0u64;
    let mut extents = 0;
    while at < size && seen < SCAN_LIMIT && extents < MAX_EXTENTS {
        let Some(start) = seek(fd, at, libc::SEEK_DATA) else {
            break;
        };
        let end = seek(fd, start, libc::SEEK_HOLE).unwrap_or(size).min(size);
        extents += 1;
        let mut w = start / page * page;
        while w < end && seen < SCAN_LIMIT {
            let len = WINDOW.min(end - w);
            let (s, c) = resident(fd, w, len, page, &mut vec)?;
            seen += s;
            cached += c;
            w += len;
        }
        at = end.max(start + 1);
    }
    (seen > 0).then(|| cached as f64 / seen as f64)
}

fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

fn seek(fd: i32, offset: u64, whence: i32) -> Option<u64> {
    crate::io::file::seek_data_or_hole(fd, offset, whence)
        .ok()
        .flatten()
}

/// Bytes looked at and bytes resident in `[offset, offset+len)` (offset page-aligned).
fn resident(fd: i32, offset: u64, len: u64, page: u64, vec: &mut Vec<u8>) -> Option<(u64, u64)> {
    let pages = len.div_ceil(page) as usize;
    vec.clear();
    vec.resize(pages, 0);
    let off = libc::off_t::try_from(offset).ok()?;
    // SAFETY: a fresh read-only shared mapping of the file that nothing else refers to; it is
    // never read (mincore asks the page cache without touching the pages) and unmapped below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            off,
        )
    };
    if addr == libc::MAP_FAILED {
        return None;
    }
    // SAFETY: `addr` maps `len` bytes (page-aligned by mmap) and `vec` holds one byte per page.
    let r = unsafe { libc::mincore(addr, len as usize, vec.as_mut_ptr()) };
    // SAFETY: unmaps exactly the mapping made above.
    unsafe { libc::munmap(addr, len as usize) };
    if r != 0 {
        return None;
    }
    let hits = vec.iter().filter(|&&v| v & 1 == 1).count() as u64;
    Some((pages as u64 * page, hits * page))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn small_missing_and_cached_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            auto_source_cache(&dir.path().join("missing")),
            CacheMode::None
        );
        let small = dir.path().join("small");
        std::fs::write(&small, [1u8; 4096]).unwrap();
        assert_eq!(auto_source_cache(&small), CacheMode::None);
        // A file just written is in the page cache.
        let big = dir.path().join("big");
        let mut f = File::create(&big).unwrap();
        f.write_all(&vec![7u8; 4 << 20]).unwrap();
        drop(f);
        assert!(cached_share(&big).unwrap() > 0.9);
        assert_eq!(auto_source_cache(&big), CacheMode::Writeback);
        // Written out and dropped from the page cache: O_DIRECT.
        let f = File::open(&big).unwrap();
        f.sync_all().unwrap();
        // SAFETY: an advice call on an open descriptor; no memory is passed.
        let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(r, 0);
        assert!(cached_share(&big).unwrap() < 0.5);
        assert_eq!(auto_source_cache(&big), CacheMode::None);
        // A sparse file without data has nothing to look at.
        let sparse = dir.path().join("sparse");
        File::create(&sparse).unwrap().set_len(64 << 20).unwrap();
        assert_eq!(cached_share(&sparse), None);
    }
}

//! `rebase` and `commit`: moving data between an image and its backing file.

use std::path::Path;
use std::sync::Arc;

use crate::device::BlockDevice;
use crate::error::{Result, StorageError};
use crate::format::{open_host_file, open_image, Image, ImageFormat, OpenOptions};
use crate::io::blocking::BlockingQueue;

use super::entry::Mapping;
use super::{Qcow2Image, Qcow2Options};

/// Bytes copied per step.
const CHUNK: u64 = 1 << 20;

fn open_rw(path: &Path) -> Result<Arc<Qcow2Image>> {
    let file = open_host_file(path, &OpenOptions::default())?;
    super::open(file, &Qcow2Options::default())
}

/// Points `path` at a new backing file (`None`: no backing file). Unless `unsafe_`, every range
/// this image does not hold itself and whose contents differ between the old and the new
/// backing file is first copied into the image, so its contents do not change.
pub fn rebase(
    path: &Path,
    new_backing: Option<&str>,
    format: Option<ImageFormat>,
    unsafe_: bool,
) -> Result<()> {
    let img = open_rw(path)?;
    let name = img.file().name().to_string();
    let mut fmt_name = format.map(|f| f.name().to_string());
    if !unsafe_ {
        let new: Option<Arc<dyn Image>> = match new_backing {
            Some(b) => {
                let bpath = super::backing::resolve(&name, b)?;
                let bimg = open_image(
                    &bpath,
                    &OpenOptions {
                        format,
                        read_only: true,
                        ..OpenOptions::default()
                    },
                )?;
                fmt_name.get_or_insert(bimg.format().name().to_string());
                Some(bimg)
            }
            None => None,
        };
        copy_differences(&img, new.as_deref())?;
    }
    let (_wb, mut m) = img.control()?;
    m.set_backing(new_backing.map(str::to_string), fmt_name)
}

fn copy_differences(img: &Arc<Qcow2Image>, new: Option<&dyn Image>) -> Result<()> {
    let size = img.size();
    let mut q = BlockingQueue::open(img.as_ref(), 8)?;
    let mut nq = match new {
        Some(n) => Some(BlockingQueue::open(n, 8)?),
        None => None,
    };
    let new_size = new.map_or(0, |n| n.size());
    let mut at = 0;
    while at < size {
        let (m, run) = img.mapping(at, size - at)?;
        if m != Mapping::Unallocated {
            at += run;
            continue;
        }
        let mut p = at;
        while p < at + run {
            let n = CHUNK.min(at + run - p);
            let old = q.read_at(p, n as usize)?;
            let mut fresh = vec![0u8; n as usize];
            if let Some(nq) = nq.as_mut() {
                if p < new_size {
                    let inside = n.min(new_size - p) as usize;
                    fresh[..inside].copy_from_slice(&nq.read_at(p, inside)?);
                }
            }
            if old != fresh {
                q.write_at(p, &old)?;
            }
            p += n;
        }
        at += run;
    }
    q.flush()
}

/// Writes the data this image holds into its backing file, then (unless `keep`) empties the
/// image so that it reads through to the backing file again.
pub fn commit(path: &Path, keep: bool) -> Result<()> {
    let img = open_rw(path)?;
    let Some(b) = img.backing().cloned() else {
        return Err(StorageError::InvalidInput(format!(
            "{} has no backing file to commit into",
            path.display()
        )));
    };
    let target = open_image(
        &b.path,
        &OpenOptions {
            format: Some(b.format),
            read_only: false,
            ..OpenOptions::default()
        },
    )?;
    let size = img.size();
    if size > target.size() {
        target.resize(size)?;
    }
    let mut q = BlockingQueue::open(img.as_ref(), 8)?;
    let mut tq = BlockingQueue::open(target.as_ref(), 8)?;
    let mut at = 0;
    while at < size {
        let (m, run) = img.mapping(at, size - at)?;
        match m {
            Mapping::Unallocated => {}
            Mapping::Zero => tq.write_zeroes(at, run, false)?,
            Mapping::Allocated(_) | Mapping::Compressed { .. } => {
                let mut p = at;
                while p < at + run {
                    let n = CHUNK.min(at + run - p) as usize;
                    let data = q.read_at(p, n)?;
                    tq.write_at(p, &data)?;
                    p += n as u64;
                }
            }
        }
        at += run;
    }
    tq.flush()?;
    drop(tq);
    drop(q);
    if !keep {
        img.exclusive(|m| {
            let cs = m.geo.cluster_size;
            let mut g = 0;
            while g < m.size() {
                m.unallocate_cluster(g)?;
                g += cs;
            }
            m.write_everything()
        })?;
    }
    Ok(())
}

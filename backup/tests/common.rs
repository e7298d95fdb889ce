//! Helpers shared by the backup integration tests: test images of mixed content, opening them,
//! backing up and restoring through the library.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use strata_backup::pipeline::PipelineOptions;
use strata_backup::restore::RestoreOptions;
use strata_backup::{BackupOptions, BackupOutcome, Changes, Datastore, NoProgress, SnapshotName};
use strata_storage::format::{self, ImageFormat, OpenOptions};
use strata_storage::io::engine::EngineChoice;
use strata_storage::io::file::CacheMode;
use strata_storage::BlockDevice;

/// Mixed content: random, zero, repetitive text and duplicated regions, in `chunk`-sized pieces.
pub fn mixed_data(len: usize, chunk: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut data = vec![0u8; len];
    let text = b"The quick brown fox backs up the lazy dog. ";
    let mut off = 0;
    while off < len {
        let end = (off + chunk).min(len);
        match rng.u8(..4) {
            0 => rng.fill(&mut data[off..end]),
            1 => {}
            2 => {
                for (i, b) in data[off..end].iter_mut().enumerate() {
                    *b = text[i % text.len()];
                }
            }
            _ => {
                // A piece that starts like random data, then has a zero tail.
                let half = off + (end - off) / 2;
                rng.fill(&mut data[off..half]);
            }
        }
        off = end;
    }
    data
}

/// Writes `data` to a new raw image at `path`.
pub fn write_raw(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}

/// Opens an image read-only (probing its format).
pub fn open_ro(path: &Path) -> strata_storage::Result<Arc<dyn BlockDevice>> {
    let img = format::open_image(
        path,
        &OpenOptions {
            format: None,
            read_only: true,
            cache: CacheMode::Writeback,
            engine: EngineChoice::Auto,
            references: Default::default(),
        },
    )?;
    Ok(img)
}

/// Opens an image read-write.
pub fn open_rw(
    path: &Path,
    fmt: Option<ImageFormat>,
) -> strata_storage::Result<Arc<dyn BlockDevice>> {
    let img = format::open_image(
        path,
        &OpenOptions {
            format: fmt,
            read_only: false,
            cache: CacheMode::Writeback,
            engine: EngineChoice::Auto,
            references: Default::default(),
        },
    )?;
    Ok(img)
}

/// Reads a whole device through its queue.
pub fn read_all(dev: &Arc<dyn BlockDevice>) -> Vec<u8> {
    use strata_storage::io::{IoBuf, QueueOptions, Request};
    let mut q = dev.open_queue(&QueueOptions::with_depth(1)).unwrap();
    let size = dev.size() as usize;
    let mut out = vec![0u8; size];
    let step = 1 << 20;
    let mut done = Vec::new();
    for off in (0..size).step_by(step) {
        let len = step.min(size - off);
        q.submit(Request::read(0, off as u64, IoBuf::new(len)))
            .unwrap();
        q.wait(None).unwrap();
        done.clear();
        q.reap(&mut done);
        let c = done.pop().unwrap();
        c.result.unwrap();
        c.buf.unwrap().copy_to_slice(0, &mut out[off..off + len]);
    }
    out
}

/// Backs up `dev` into group `id`.
pub fn backup(
    store: &Datastore,
    dev: Arc<dyn BlockDevice>,
    id: &str,
    changes: Changes,
) -> strata_storage::Result<BackupOutcome> {
    let opts = BackupOptions {
        id: id.into(),
        source_label: "test".into(),
        source_format: "raw".into(),
        changes,
        pipeline: PipelineOptions {
            workers: 2,
            read_depth: 4,
            compress_level: 1,
        },
    };
    strata_backup::create(store, dev, &opts, &NoProgress)
}

/// Restores `name` into a new raw image at `path` and returns its contents.
pub fn restore_raw(
    store: &Datastore,
    name: &SnapshotName,
    path: &Path,
) -> strata_storage::Result<Vec<u8>> {
    let m = store.read_manifest(name)?;
    format::create_image(path, ImageFormat::Raw, m.size, &Default::default())?;
    let dev = open_rw(path, Some(ImageFormat::Raw))?;
    strata_backup::restore::restore(store, name, dev, RestoreOptions::default(), &NoProgress)?;
    Ok(std::fs::read(path).unwrap())
}

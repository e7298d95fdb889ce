//! Storing the chunks of one backup (or sync): [`ChunkWriter`] puts each new chunk where the
//! datastore keeps chunks — a blob file of its own in a local datastore, a pack in a pack
//! datastore — and makes them durable in [`ChunkWriter::finish`], before anything refers to
//! them.

use std::collections::BTreeSet;
use std::sync::Mutex;

use strata_storage::{Result, StorageError};

use crate::blob;
use crate::digest::Digest;
use crate::pack_writer::PackWriter;
use crate::store::{Datastore, Stored};

/// Stores chunks for one run. See the module documentation.
#[derive(Debug)]
pub struct ChunkWriter {
    store: Datastore,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    /// Fan-out folders that gained a chunk (fsync'd at the end).
    Local(Mutex<BTreeSet<u8>>),
    Packs(PackWriter),
}

impl ChunkWriter {
    /// A writer into `store`; an encrypted datastore must have its key.
    pub fn new(store: &Datastore) -> Result<ChunkWriter> {
        store.require_key()?;
        let kind = match store.remote() {
            Some(r) => Kind::Packs(r.writer()),
            None => Kind::Local(Mutex::new(BTreeSet::new())),
        };
        Ok(ChunkWriter {
            store: store.clone(),
            kind,
        })
    }

    /// Stores chunk `d` with bytes `data` unless the datastore has it.
    pub fn insert(&self, d: &Digest, data: &[u8], level: i32) -> Result<Stored> {
        match &self.kind {
            Kind::Local(dirs) => {
                let stored = self.store.insert_chunk(d, data, level)?;
                if matches!(stored, Stored::New(_)) {
                    dirs.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(d.0[0]);
                }
                Ok(stored)
            }
            Kind::Packs(w) => {
                if let Some(n) = w.known(d) {
                    return Ok(Stored::Existing(n));
                }
                let encoded = blob::encode_for(data, level, self.store.require_key()?, d)?;
                w.insert_blob(d, &encoded, data.len() as u32)
            }
        }
    }

    /// Whether the datastore already holds chunk `d` (payload length if so).
    pub fn known(&self, d: &Digest) -> Result<Option<u32>> {
        match &self.kind {
            Kind::Local(_) => {
                if !self.store.touch_chunk(d)? {
                    return Ok(None);
                }
                let path = self.store.chunk_path(d);
                let len = std::fs::metadata(&path)
                    .map_err(|e| crate::fsutil::io_err("Inspecting", &path, e))?
                    .len();
                Ok(Some(len.saturating_sub(blob::BLOB_HEADER_LEN as u64) as u32))
            }
            Kind::Packs(w) => Ok(w.known(d)),
        }
    }

    /// Stores an already encoded blob of chunk `d` (copied from another datastore with the same
    /// keying) unless the datastore has it. The blob is checked (framing, crc) first.
    pub fn insert_blob(&self, d: &Digest, encoded: &[u8]) -> Result<Stored> {
        let what = format!("chunk {d}");
        let header = blob::check(encoded, &what)?;
        crate::store::check_sealed_as_store(encoded, self.store.encryption().is_some(), &what)?;
        match &self.kind {
            Kind::Local(dirs) => {
                if let Some(n) = self.known(d)? {
                    return Ok(Stored::Existing(n));
                }
                let dir = self.store.chunk_dir(d);
                let name = d.to_hex();
                let sfs = self.store.fs();
                let tmp = crate::fsutil::write_temp(sfs, &dir, &name, encoded)?;
                let target = dir.join(&name);
                if let Err(e) = sfs.rename(&tmp, &target) {
                    let _ = sfs.remove_file(&tmp);
                    return Err(crate::fsutil::io_err("Renaming into", &target, e));
                }
                dirs.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(d.0[0]);
                Ok(Stored::New(header.payload_len as u32))
            }
            Kind::Packs(w) => w.insert_blob(d, encoded, header.raw_len as u32),
        }
    }

    /// Makes every chunk stored so far durable (fsyncs fan-out folders; uploads the last
    /// pack and waits for all uploads).
    pub fn finish(self) -> Result<()> {
        match self.kind {
            Kind::Local(dirs) => {
                let dirs = dirs.into_inner().unwrap_or_else(|p| p.into_inner());
                self.store.sync_chunk_dirs(dirs)
            }
            Kind::Packs(w) => w.finish().map_err(|e| match e {
                StorageError::Cancelled => e,
                e => StorageError::Unavailable(format!(
                    "Storing chunks in {}: {e}",
                    self.store.describe()
                )),
            }),
        }
    }
}

//! Filling packs during a backup, sync or repack: [`PackWriter`] appends each new chunk's blob
//! to an open pack; a full pack goes to one of [`UPLOADERS`] threads that PUT it (one request
//! per pack), save a local copy of its index and add its chunks to the catalog. The first
//! failure stops the uploads and is returned by the next insert or by
//! [`PackWriter::finish`]; an abandoned writer uploads nothing more.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use strata_storage::{Result, StorageError};

use crate::blob::BLOB_HEADER_LEN;
use crate::digest::Digest;
use crate::pack::{self, PackBuilder};
use crate::remote::{new_pack_id, pack_key, Remote, UPLOADERS};
use crate::store::Stored;

/// Puts chunks into packs and uploads them. See the module documentation.
#[derive(Debug)]
pub struct PackWriter {
    remote: Arc<Remote>,
    open: Mutex<PackBuilder>,
    /// Chunks in this writer's packs not yet uploaded: payload lengths.
    pending: Mutex<HashMap<Digest, u32>>,
    tx: Option<crossbeam_channel::Sender<PackBuilder>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    failed: Arc<AtomicBool>,
    first_err: Arc<Mutex<Option<StorageError>>>,
}

impl PackWriter {
    pub(crate) fn new(remote: Arc<Remote>) -> PackWriter {
        let (tx, rx) = crossbeam_channel::bounded::<PackBuilder>(2);
        let failed = Arc::new(AtomicBool::new(false));
        let first_err = Arc::new(Mutex::new(None));
        let threads = (0..UPLOADERS)
            .map(|_| {
                let (rx, remote, failed, first_err) = (
                    rx.clone(),
                    remote.clone(),
                    failed.clone(),
                    first_err.clone(),
                );
                std::thread::spawn(move || {
                    for builder in rx.iter() {
                        if failed.load(Ordering::Relaxed) {
                            continue;
                        }
                        if let Err(e) = upload_pack(&remote, builder) {
                            failed.store(true, Ordering::Relaxed);
                            first_err
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e);
                        }
                    }
                })
            })
            .collect();
        PackWriter {
            remote,
            open: Mutex::new(PackBuilder::new()),
            pending: Mutex::new(HashMap::new()),
            tx: Some(tx),
            threads,
            failed,
            first_err,
        }
    }

    fn check_failed(&self) -> Result<()> {
        if self.failed.load(Ordering::Relaxed) {
            let e = self
                .first_err
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|e| e.to_string())
                .unwrap_or_default();
            return Err(StorageError::Unavailable(format!(
                "Uploading a pack failed: {e}"
            )));
        }
        Ok(())
    }

    /// What is known of chunk `d` without storing it: `Some(payload length)` if the bucket or
    /// this writer holds it.
    pub fn known(&self, d: &Digest) -> Option<u32> {
        if let Some(n) = self.remote.payload_len(d) {
            return Some(n);
        }
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(d)
            .copied()
    }

    /// Adds an encoded blob for chunk `d` of `raw_len` bytes unless it is stored already.
    pub fn insert_blob(&self, d: &Digest, blob: &[u8], raw_len: u32) -> Result<Stored> {
        self.check_failed()?;
        if let Some(n) = self.known(d) {
            return Ok(Stored::Existing(n));
        }
        let payload = (blob.len() - BLOB_HEADER_LEN) as u32;
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(*d, payload);
        let full = {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            open.push(*d, blob, raw_len);
            (open.len() as u64 >= self.remote.pack_size()
                || open.count() >= pack::MAX_ENTRIES as usize)
                .then(|| std::mem::take(&mut *open))
        };
        if let Some(b) = full {
            self.send(b)?;
        }
        Ok(Stored::New(payload))
    }

    fn send(&self, b: PackBuilder) -> Result<()> {
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| StorageError::Unavailable("pack writer closed".into()))?;
        tx.send(b)
            .map_err(|_| StorageError::Unavailable("pack uploaders ended".into()))
    }

    /// Uploads the last pack and waits for every upload; the first failure is returned.
    pub fn finish(mut self) -> Result<()> {
        let last = std::mem::take(&mut *self.open.lock().unwrap_or_else(|p| p.into_inner()));
        let sent = if last.is_empty() {
            Ok(())
        } else {
            self.send(last)
        };
        self.close();
        sent?;
        if let Some(e) = self
            .first_err
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Err(e);
        }
        Ok(())
    }

    fn close(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        // An abandoned writer uploads nothing more: its packs would be garbage.
        self.failed.store(true, Ordering::Relaxed);
        self.close();
    }
}

fn upload_pack(remote: &Remote, builder: PackBuilder) -> Result<()> {
    let id = new_pack_id()?;
    let (bytes, entries) = builder.finish();
    let size = bytes.len() as u64;
    let tail = bytes[bytes.len() - pack::tail_len(entries.len() as u32) as usize..].to_vec();
    remote.put(&pack_key(&id), bytes)?;
    remote.save_idx(&id, size, &tail)?;
    remote.add_to_catalog(&id, &entries);
    Ok(())
}

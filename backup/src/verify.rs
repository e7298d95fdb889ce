//! `backup verify`: checks snapshots' manifests and indexes, then every chunk they reference
//! (blob crc, length, digest), each distinct chunk once, on all cores. The report names every
//! damaged chunk and every snapshot it affects. In a pack datastore (S3) every chunk is read
//! from the bucket with a ranged GET, not from the local cache.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Serialize;
use strata_storage::Result;

use crate::digest::Digest;
use crate::index::Entry;
use crate::lock::lock_snapshot_shared;
use crate::progress::Progress;
use crate::snapshot::SnapshotName;
use crate::store::Datastore;

/// The state of one snapshot after verification.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotCheck {
    /// The snapshot.
    pub snapshot: String,
    /// Whether everything it needs is intact.
    pub ok: bool,
    /// Problems with its manifest or index.
    pub errors: Vec<String>,
    /// Damaged or missing chunks it references.
    pub bad_chunks: Vec<String>,
}

/// A damaged or missing chunk.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BadChunk {
    /// Its digest.
    pub digest: String,
    /// What is wrong.
    pub error: String,
    /// Snapshots that reference it.
    pub snapshots: Vec<String>,
}

/// The result of a verification.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VerifyReport {
    /// Per snapshot.
    pub snapshots: Vec<SnapshotCheck>,
    /// Distinct chunks checked.
    pub chunks_checked: u64,
    /// Bytes of chunk data checked (uncompressed).
    pub bytes_checked: u64,
    /// Damaged or missing chunks.
    pub bad_chunks: Vec<BadChunk>,
}

impl VerifyReport {
    /// Whether every snapshot verified clean.
    pub fn ok(&self) -> bool {
        self.snapshots.iter().all(|s| s.ok)
    }
}

/// Snapshots held (one open lock each) and verified together.
const BATCH: usize = 256;

/// Verifies `names` with `workers` threads, in batches of [`BATCH`] snapshots so that the locks
/// held stay bounded; a chunk is checked once however many snapshots use it.
pub fn verify(
    store: &Datastore,
    names: &[SnapshotName],
    workers: usize,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let mut report = VerifyReport {
        snapshots: Vec::new(),
        chunks_checked: 0,
        bytes_checked: 0,
        bad_chunks: Vec::new(),
    };
    // Chunks checked in earlier batches: `Some(error)` when damaged.
    let mut checked: HashMap<Digest, Option<String>> = HashMap::new();
    for batch in names.chunks(BATCH) {
        let r = verify_batch(store, batch, workers, progress, &mut checked)?;
        report.snapshots.extend(r.snapshots);
        report.chunks_checked += r.chunks_checked;
        report.bytes_checked += r.bytes_checked;
        for bad in r.bad_chunks {
            match report
                .bad_chunks
                .iter_mut()
                .find(|b| b.digest == bad.digest)
            {
                Some(b) => b.snapshots.extend(bad.snapshots),
                None => report.bad_chunks.push(bad),
            }
        }
    }
    Ok(report)
}

fn verify_batch(
    store: &Datastore,
    names: &[SnapshotName],
    workers: usize,
    progress: &dyn Progress,
    checked: &mut HashMap<Digest, Option<String>>,
) -> Result<VerifyReport> {
    let mut checks = Vec::new();
    // digest -> (length, snapshots using it)
    let mut chunks: BTreeMap<Digest, (usize, BTreeSet<usize>)> = BTreeMap::new();
    let mut holds = Vec::new();
    for (si, name) in names.iter().enumerate() {
        let mut check = SnapshotCheck {
            snapshot: name.to_string(),
            ok: true,
            errors: Vec::new(),
            bad_chunks: Vec::new(),
        };
        match lock_snapshot_shared(store, name).and_then(|h| {
            holds.push(h);
            store.read_snapshot_from_source(name)
        }) {
            Ok((_, index)) => {
                for (i, e) in index.entries().iter().enumerate() {
                    if let Entry::Stored { digest, .. } = e {
                        let len = index.chunk_range(i as u64).1;
                        let slot = chunks.entry(*digest).or_insert((len, BTreeSet::new()));
                        if slot.0 != len {
                            check.errors.push(format!(
                                "chunk {digest} is used with lengths {} and {len}",
                                slot.0
                            ));
                        }
                        slot.1.insert(si);
                    }
                }
            }
            Err(e) => check.errors.push(e.to_string()),
        }
        check.ok = check.errors.is_empty();
        checks.push(check);
    }
    let list: Vec<(&Digest, &(usize, BTreeSet<usize>))> = chunks
        .iter()
        .filter(|(d, _)| !checked.contains_key(*d))
        .collect();
    let total: u64 = list.iter().map(|(_, (l, _))| *l as u64).sum();
    progress.begin("verify", total);
    let next = AtomicUsize::new(0);
    let bad: Mutex<Vec<(usize, String)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            s.spawn(|| {
                let mut buf = Vec::new();
                loop {
                    if progress.cancelled() {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((digest, (len, _))) = list.get(i) else {
                        break;
                    };
                    if let Err(e) = store.load_chunk_from_source(digest, *len, &mut buf) {
                        bad.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((i, e.to_string()));
                    }
                    progress.advance(*len as u64);
                }
            });
        }
    });
    progress.finish();
    if progress.cancelled() {
        return Err(strata_storage::StorageError::Cancelled);
    }
    let bad = bad.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut errors: HashMap<usize, String> = bad.into_iter().collect();
    for (i, (digest, _)) in list.iter().enumerate() {
        checked.insert(**digest, errors.remove(&i));
    }
    let mut bad_chunks = Vec::new();
    // Every damaged chunk this batch uses, checked now or in an earlier batch.
    for (digest, (_, users)) in &chunks {
        let Some(Some(error)) = checked.get(digest) else {
            continue;
        };
        let error = error.clone();
        for &si in users {
            checks[si].ok = false;
            checks[si].bad_chunks.push(digest.to_hex());
        }
        bad_chunks.push(BadChunk {
            digest: digest.to_hex(),
            error,
            snapshots: users.iter().map(|&si| names[si].to_string()).collect(),
        });
    }
    Ok(VerifyReport {
        snapshots: checks,
        chunks_checked: list.len() as u64,
        bytes_checked: total,
        bad_chunks,
    })
}

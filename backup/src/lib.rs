//! Strata's backup datastore: content-addressed chunks, indexes and manifests, with full and
//! incremental backups of any block device, restore, verify, prune and garbage collection.
//!
//! # Design
//! A datastore is a folder (layout byte by byte in docs/format-datastore.md):
//! - `chunks/00..ff/DIGEST`: every distinct 4 MiB chunk of every backup, once, named by the
//!   BLAKE3 digest of its bytes ([`digest`] says why BLAKE3), stored as a [`blob`] (header with
//!   crc32 checksums, zstd-compressed when that saves at least an eighth). Zero chunks are never
//!   stored.
//! - `snapshots/ID/TIME/{index,manifest}`: a snapshot, e.g.
//!   `snapshots/volume/vg0/vm-100-disk-0/2026-11-27T05:00:00Z/`. The [`index`] lists the digest of
//!   each chunk of the source in order; the [`manifest`] says what, when, from where, relative to
//!   which parent and with which change tracking.
//! - Every file is written atomically (temp file, fsync, rename, fsync folder); a snapshot
//!   becomes visible only when its complete folder is renamed into place ([`backup`]).
//!
//! A backup ([`backup::create`]) reads the source through its I/O queues with several requests
//! in flight and hashes/compresses/stores on all cores ([`pipeline`]). With change tracking
//! ([`changes`]) relative to the group's latest snapshot it reads only the dirty chunks and takes
//! the rest from the parent's index, after checking that index and that its chunks exist;
//! otherwise it reads everything and records why. [`backup::create_tracked`] drives this from a
//! [`changes::ChangeTracker`] (a persistent dirty bitmap): it takes the bitmap (restarting it, so
//! writes during the backup land in the next one), gives the take back if the backup fails, and
//! trusts it only if the group's latest snapshot was made at the previous take.
//! [`lazy::SnapshotDevice`] serves a snapshot as a read-only block device without restoring it:
//! each read loads only the chunks it touches, through a bounded cache (NBD exports of backups).
//! Restores ([`restore`]) fetch chunks through [`fetch::ChunkFetcher`], decoding each straight
//! into the buffer they write, with a bounded pool of workers; [`live::LiveRestore`] is a
//! volume usable at once while it is restored, copied on read and in the background, resumable
//! after a crash from its map of restored chunks.
//!
//! Any datastore may be encrypted ([`crypt`]: AES-256-GCM blobs, keyed chunk ids, signed
//! manifests, key files). A *pack datastore* keeps its chunks in packs on an object store — an
//! S3 bucket ([`s3`]) or a folder ([`objects`]) — with the folder above as its local cache and
//! snapshot mirror ([`remote`], [`pack_writer`], [`chunk_cache`], [`mirror`], [`pack_gc`]);
//! backups and syncs store chunks through [`writer::ChunkWriter`] either way, and [`sync`]
//! copies snapshots between any two datastores.
//!
//! # Locking: who may run with whom
//! | operation | holds | runs concurrently with |
//! |---|---|---|
//! | backup create, sync into a datastore | writer registration (exclusive, own file); group lock (exclusive); in a pack datastore `.gc.lock` shared | everything except another create of the same group (that one gets `Busy`); in a pack datastore not gc (it waits for a running one) |
//! | restore, verify | shared lock on each snapshot's manifest | everything; prune skips the snapshots they hold |
//! | prune | exclusive lock on a snapshot's manifest, without waiting, while removing it | everything; skips snapshots being read |
//! | gc | `.gc.lock` (exclusive, no waiting) | everything except another gc; safe with running backups through mtimes, see [`gc`]; in a pack datastore not with backups (the lock excludes them) |
//! | lazy snapshot device | shared lock on the snapshot's manifest while it lives | everything; prune skips it |
//! | live restore | shared lock on the snapshot's manifest, exclusive `flock` on its map file, while open | everything; a second opener of the same restore gets `Busy` |
//! | list, show | nothing | everything |

// No unwrap or expect outside tests: every failure is an error the caller sees.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod backup;
pub mod bitmap_tracker;
pub mod blob;
pub mod changes;
pub mod chunk_cache;
pub mod crypt;
pub mod digest;
#[cfg(feature = "test-utils")]
pub mod faultfs;
pub mod fetch;
pub mod fsutil;
pub mod gc;
pub mod index;
pub mod lazy;
pub mod live;
pub mod lock;
pub mod manifest;
pub mod mirror;
pub mod objects;
pub mod pack;
pub mod pack_gc;
pub mod pack_writer;
pub mod pipeline;
pub mod progress;
pub mod prune;
#[cfg(feature = "rbd")]
pub mod rbd_tracker;
pub mod remote;
pub mod restore;
pub mod s3;
pub mod snapshot;
pub mod store;
pub mod storefs;
pub mod sync;
pub mod time;
pub mod verify;
pub mod writer;

pub use backup::{create, create_tracked, BackupOptions, BackupOutcome};
pub use changes::{ChangeTracker, Changes, TakenChanges};
pub use digest::Digest;
pub use fetch::ChunkFetcher;
pub use lazy::SnapshotDevice;
pub use progress::{NoProgress, Progress};
pub use snapshot::SnapshotName;
pub use store::Datastore;

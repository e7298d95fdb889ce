//! Strata's block layer: the centre of the appliance.
//!
//! Two planes:
//! - the **control plane** is [`BlockDevice`] (size, [`Capabilities`], durable flush, resize,
//!   allocation status, opening queues), implemented by every image format and volume, and
//!   [`HostFile`], the byte container formats sit on;
//! - the **data plane** is [`io::IoQueue`]: submit [`io::Request`]s in batches, reap
//!   [`io::Completion`]s, wake on an eventfd. One queue per thread; each request owns its
//!   [`io::IoBuf`] until its completion hands it back.
//!
//! Engines ([`io::uring`], [`io::threads`], and for tests `io::memory` and `io::fault`) run I/O on
//! host files; formats ([`format`]) and volumes ([`volume`]) map guest offsets onto host files
//! and serve their queues through one stacked-queue mechanism (`io::stack`: lower queues with
//! backlogs, fan-in of split requests, eventfd wake-ups, drain on drop). See
//! `docs/architecture.md`.
//!
//! # Locking
//! | object | shared by | guarded by |
//! |---|---|---|
//! | [`io::file::FileHandle`] | every queue of a file | nothing mutable but its size (atomic) |
//! | an [`io::IoQueue`] (stacked or engine) | one thread at a time (`Send`, not `Sync`) | `&mut self` |
//! | thread-pool job and completion lists | a queue and its workers | one mutex each |
//! | a qcow2 image's metadata | the image, its queues, its metadata worker | one mutex held for lookups in memory, planning and copying dirty state — no data path makes a system call under it; write-backs and file growth run on the worker's two threads, each serialised with control-plane rewrites by a lock of its own that no data path takes |
//! | a vmdk extent's grain tables | the image and its queues | one mutex per extent |
//! | a volume group's state | the group's handles and devices | one mutex, control operations only |
//! | a thin pool's state | the pool, its devices and queues | one mutex held for lookups and provisioning decisions; parked pieces wake on the pool's events |
//! | a linear volume's extent map | the group and its queues | a read-write lock, replaced whole on resize |
//! | dirty bitmaps | a tracked device's queues and its owner | atomic words; a lock guards resizing only |
//! | in-memory test devices | all their queues | a read-write lock on the bytes |
//!
//! A poisoned lock over metadata fails its image, group or pool instead of carrying on with
//! half-updated state (`sync.rs`).

// No unwrap or expect outside tests: every failure is an error the caller sees (test helpers
// that panic by design say so where they allow it).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod bitmap;
pub mod bytes;
pub mod convert;
pub mod device;
pub mod durable;
pub mod error;
pub mod format;
pub mod io;
pub mod ova;
pub mod source;
pub(crate) mod sync;
pub mod util;
pub mod volume;

#[cfg(feature = "test-utils")]
pub mod conformance;

pub use device::{BlockDevice, Capabilities, Extent, ExtentKind, HostFile, SharedFile};
pub use error::{Result, StorageError};

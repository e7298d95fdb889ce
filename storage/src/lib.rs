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
//! host files; formats ([`format`]) map guest offsets onto host files. See `docs/architecture.md`.
//!
//! # Locking
//! | object | shared by | guarded by |
//! |---|---|---|
//! | [`io::file::FileHandle`] | every queue of a file | nothing mutable but its size (atomic) |
//! | an [`io::IoQueue`] | one thread at a time (`Send`, not `Sync`) | `&mut self` |
//! | thread-pool job and completion lists | a queue and its workers | one mutex each |
//! | in-memory test devices | all their queues | a read-write lock on the bytes |

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

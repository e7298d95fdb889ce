//! Strata's NBD server: volumes, volume snapshots, image files and backup snapshots served to
//! other hosts over the Network Block Device protocol (the NBD project's doc/proto.md, with
//! the `qemu:dirty-bitmap:` contexts of QEMU's docs/interop/nbd.rst).
//!
//! # What is served
//! - Fixed newstyle handshake with `NBD_OPT_GO`/`INFO`/`LIST`/`ABORT`/`EXPORT_NAME`,
//!   `STARTTLS`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT`/`SET_META_CONTEXT`, and block size
//!   constraints (any alignment, 4 KiB or the device's alignment preferred, 32 MiB payloads).
//! - READ (sparse structured reads: aligned zero blocks go as `NBD_REPLY_TYPE_OFFSET_HOLE`),
//!   WRITE with FUA, FLUSH, TRIM, WRITE_ZEROES with NO_HOLE and FAST_ZERO, CACHE (a read whose
//!   data is dropped: it warms format metadata, page cache and a backup's chunk cache), and
//!   BLOCK_STATUS for `base:allocation` and `qemu:dirty-bitmap:NAME`.
//! - `NBD_FLAG_CAN_MULTI_CONN` on every export: a block-layer device flushes as a whole whichever
//!   queue asks, and all its queues see one device, so flush and FUA on one connection cover
//!   writes completed on every other.
//! - Extended headers (64-bit lengths), RESIZE and `qemu:allocation-depth` are not offered
//!   (`NBD_REP_ERR_UNSUP` / not listed), which the protocol allows.
//!
//! # Concurrency model: a thread per connection, one storage queue each
//! Each connection gets its own thread, which owns its socket and one [`IoQueue`] of the
//! export's device opened with an eventfd, and sleeps in `poll(2)` on the two (`conn/mod.rs`).
//! Chosen over tokio because:
//! - the block layer's data plane is synchronous queues woken by an eventfd, one per consumer
//!   thread (the VMM's virtio queues work the same way); a runtime would put a task handoff or
//!   a blocking-pool hop between the socket and the queue on every request;
//! - a connection's requests are pipelined anyway (up to [`Limits::max_requests`] in flight on
//!   its queue), so a thread is busy only while it moves bytes; NBD clients open few
//!   connections (qemu one per disk, nbdcopy four), and [`Limits::max_connections`] bounds them;
//! - nothing is shared between connections but the device, so there is no lock on the data
//!   path; rustls runs sans-I/O on the same non-blocking socket.
//!
//! Payloads are not copied: a write's payload is read from the socket into the `IoBuf` that
//! the queue writes from, and a read reply is written with `writev` from the `IoBuf` the queue
//! read into (per-connection buffers are pooled and reused). Under TLS rustls encrypts into its
//! own record buffers, which the protocol needs.
//!
//! # Security
//! Clients are untrusted. Plain NBD is accepted only on loopback addresses and Unix sockets;
//! anything else needs TLS ([`tls`]), which is then forced on non-local clients. Each export
//! has an [`Access`] rule: open, an allow-list of client certificates (SHA-256, chained to the
//! server's client CA), or a secret name that is never listed. Unknown and forbidden exports
//! get the same answer. Every length, offset and count from the wire is checked before use
//! (`options.rs`, `conn/request.rs`), option payloads and in-flight bytes are bounded, the
//! handshake has a deadline, and a connection that breaks the protocol is closed after its
//! requests in flight finish, without touching other connections. `fuzz/fuzz_targets/nbd_*`
//! drive the handshake and request decoding.
//!
//! # Embedding
//! [`server::start`] serves the exports of an [`ExportRegistry`] on the configured addresses
//! and returns a [`ServerHandle`]. Exports can be added and removed while it runs
//! ([`ExportRegistry::add`], [`ExportRegistry::remove`] disconnects the export's clients,
//! [`Export::wait_unused`] waits for their requests to finish), and
//! [`ExportRegistry::list`]/[`ExportRegistry::holders_of`] say who is connected to what.
//! [`open::open_export`] opens the sources the CLI names.
//!
//! # Locking
//! | what | shared by | guarded by |
//! |---|---|---|
//! | the export map and default name | server threads, the managing caller | read-write locks, held only for lookups and edits |
//! | an export's client list | its connections, listings, removal | a mutex, held without I/O |
//! | the server's connection table | accept threads, connection threads, stop | a mutex, held without I/O |
//! | a connection's queue, buffers, replies | its own thread only | nothing (owned) |
//!
//! [`IoQueue`]: strata_storage::io::IoQueue
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod conn;
pub mod error;
pub mod export;
pub mod handshake;
pub mod open;
pub mod options;
pub mod proto;
pub mod server;
pub mod tls;
mod transport;

#[doc(hidden)]
pub mod fuzz;

pub use error::{NbdError, Result};
pub use export::{Access, ClientInfo, Export, ExportConfig, ExportInfo, ExportRegistry};
pub use server::{start, Limits, Listen, ServerConfig, ServerHandle};
pub use tls::{Fingerprint, TlsSettings};

//! Changed-block tracking: dirty bitmaps.
//!
//! - `bits.rs`: one bit per `granularity` bytes (default 64 KiB), set atomically by writers;
//! - `store.rs`: the named bitmaps of one device, persisted in a sidecar file across clean
//!   shutdowns and marked invalid after an unclean one; read, clear, merge, delete, and *take*
//!   (read and restart atomically) for incremental backups;
//! - `track.rs`: [`TrackedDevice`], a wrapper whose queues mark completed writes, discards and
//!   write-zeroes — the same for volumes (bitmaps under `DATA/bitmaps/VG-UUID/`) and image
//!   files (`IMAGE.bitmaps` beside them, or inside a qcow2 v3 image's bitmaps extension);
//! - `persistent.rs`: the interface to bitmaps an image keeps itself (qcow2).
//!
//! # Locking
//! | what | guarded by |
//! |---|---|
//! | marking bits | atomic `fetch_or` on words under a read lock (many queues at once) |
//! | take | atomic `swap` per word: a concurrent mark lands in the taken bits or the live ones |
//! | resize, adding or removing bitmaps | write locks |
//! | the sidecar file | one save at a time; the device's owner (one process: the volume group's lock, or for an image an exclusive `flock` on the image file, see [`ImageBitmaps`]) |

pub mod attach;
pub mod bits;
pub mod persistent;
pub mod store;
pub mod track;

pub use attach::{attach_image_bitmaps, WithBitmaps};
pub use bits::DEFAULT_GRANULARITY;
pub use persistent::{BitmapBits, PersistentBitmaps, StoredBitmap};
pub use store::{BitmapInfo, BitmapSet, TakenBitmap};
pub use track::{sidecar_path, ImageBitmaps, TrackedDevice};

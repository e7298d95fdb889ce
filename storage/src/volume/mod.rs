//! LVM-like volumes in user space: physical volumes, volume groups, linear volumes, thin pools
//! with snapshots and linked clones.
//!
//! # Layers
//! - A **PV** is a [`crate::HostFile`] (a file, a block device, or a test device) with a label
//!   (`label.rs`) and a metadata area of two checksummed, sequence-numbered slots (`mda.rs`).
//! - A **volume group** (`vg.rs`) spans PVs in fixed extents; its metadata (`meta.rs`, JSON)
//!   lists PVs and volumes and is committed to every PV at once. Groups are found through the
//!   devices file of the data directory (`devices.rs`, `store.rs`).
//! - A **linear volume** (`linear.rs`) is a run of extents, possibly on several PVs; its queue
//!   maps and forwards to the PVs' own queues through the stacked-queue mechanism of
//!   `crate::io` (`extents.rs`, `pvs.rs`).
//! - A **thin pool** (`thin/`) is two hidden linear volumes (data and metadata) plus a record;
//!   thin volumes, snapshots and clones live in its copy-on-write metadata.
//!
//! Every volume is a [`crate::BlockDevice`]; `lv.rs` opens them by name, and
//! [`crate::source`] resolves `lv:VG/NAME`.
//!
//! # Locking
//! | who | may run with | guarded by |
//! |---|---|---|
//! | two processes on one group | no (a second gets "busy") | `flock` on every PV (`lock.rs`); read-only opens share |
//! | control operations on a group | one at a time | the group's state mutex |
//! | data path of any volume | control operations and other queues | nothing of the group; a pool's short state lock (thin) or a read lock on the extent map (linear) |
//! | a snapshot and writes to its origin | yes: in-place writes in flight finish first, new ones wait | the origin's frozen flag in its pool |
//! | removing or shrinking a volume and using it | removal of an open volume is refused | open counts |
//!
//! On-disk formats: docs/format-volume.md (labels, metadata areas) and docs/format-thin.md.

pub mod alloc;
pub(crate) mod codec;
pub mod devices;
pub mod extents;
pub mod group;
pub mod label;
pub mod linear;
mod listfile;
pub mod lock;
pub mod lv;
mod lvbitmap;
pub mod mda;
pub mod meta;
pub mod name;
pub(crate) mod pvs;
#[cfg(feature = "rbd")]
pub mod rbd;
pub mod rbd_groups;
pub mod region;
pub mod store;
pub mod thin;
pub mod vg;
pub mod vgcheck;

pub use group::{Group, GroupInfo};
pub use linear::LinearDevice;
pub use lv::{LvInfo, LvType, DEFAULT_BLOCK_SIZE};
pub use store::{resolve_data_dir, PvSummary, VgSummary, VolumeStore};
pub use thin::{PoolCheck, PoolUsage, ThinDevice, ThinInfo, ThinPool};
pub use vg::{PvHandle, PvInfo, Vg, VgInfo, VgOptions};
pub use vgcheck::VgCheck;

//! Thin provisioning: pools, thin volumes, snapshots and clones.
//!
//! - `format.rs`: the on-disk metadata blocks (byte layout in docs/format-thin.md);
//! - `space.rs`: reference counts and when freed blocks may be reused;
//! - `btree.rs`: copy-on-write B-trees mapping virtual blocks to data blocks;
//! - `pool.rs`: the pool — device table, provisioning, commits (design notes there);
//! - `load.rs`: formatting and opening a pool;
//! - `check.rs`: consistency checking;
//! - `device.rs`, `queue.rs`: a thin device as a block device, and its data path.

pub(crate) mod btree;
pub mod check;
pub mod device;
pub mod format;
pub mod load;
pub mod pool;
pub(crate) mod queue;
pub mod space;

pub use check::PoolCheck;
pub use device::ThinDevice;
pub use pool::{PoolUsage, ThinInfo, ThinPool};
pub use space::AllocPolicy;

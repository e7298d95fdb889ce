//! Volume groups on Ceph RBD (feature `rbd`): a group is a pool of a Ceph cluster, its volumes
//! are RBD images, and every volume is a [`crate::BlockDevice`] over librbd's asynchronous API.
//!
//! | file | job |
//! |---|---|
//! | `ffi.rs` | the librados/librbd C functions we call, loaded at run time (and why) |
//! | `cluster.rs` | connections (shared per configuration, user and keyring) and pool handles |
//! | `image.rs` | creating, cloning, listing, removing images; an open image's snapshots, parent, children and changed extents |
//! | `hub.rs` | librbd's per-image completion eventfd, fanned out to the image's queues |
//! | `queue.rs` | the data-plane queue: requests as `rbd_aio_*` calls, each buffer owned by its slot |
//! | `device.rs` | the [`crate::BlockDevice`] |
//! | `group.rs` | a volume group on a pool: volumes are images marked with the group's name |
//! | `cbt.rs` | changed-block tracking for incremental backups from RBD snapshots and fast-diff |
//!
//! # Locking
//! | who | may run with | guarded by |
//! |---|---|---|
//! | two processes writing one image | yes, correctly but slowly | librbd's exclusive-lock feature hands the lock over on request |
//! | queues of one device | each other | librbd (thread-safe); the hub's inbox map and each inbox have a short mutex, no system call under them |
//! | pumping completions | several pumpers at once | librbd gives each completion to one poller |
//! | removing an image and using it | no: librbd refuses while it has watchers (open handles) | Ceph |

pub mod cbt;
pub mod cluster;
pub mod device;
pub mod ffi;
pub mod group;
mod hub;
pub mod image;
mod queue;

pub use cluster::{Cluster, ClusterSpec, Pool};
pub use device::RbdDevice;
pub use group::{RbdGroup, RbdGroupInfo};
pub use image::{Image, Snapshot};
pub use queue::RbdQueue;

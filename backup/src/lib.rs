//! Strata's backup datastore: content-addressed chunks, indexes and manifests, with full and
//! incremental backups of any block device, restore, verify, prune and garbage collection.
//!
//! Nothing is implemented yet; this crate exists so that the workspace has its final shape.

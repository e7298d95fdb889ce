//! Helpers for tests (feature `test-utils`): damaging images on purpose.

use std::path::Path;

use crate::format::{open_host_file, OpenOptions};

use super::meta::{Meta, MetaOptions};

/// Adds `delta` to the refcount of host cluster `cluster` of the image at `path`, writing it
/// back — a leak (positive) or a corruption (negative) for check tests.
///
/// # Panics
/// On any error: it is a test helper.
pub fn bump_refcount(path: &Path, cluster: u64, delta: i64) {
    let file = open_host_file(path, &OpenOptions::default()).expect("open the image file");
    let mut m = Meta::open(
        file,
        MetaOptions {
            writable: true,
            ..MetaOptions::default()
        },
    )
    .expect("open the metadata");
    m.update_refcount(cluster, delta)
        .expect("change the refcount");
    m.close().expect("write the refcount back");
}

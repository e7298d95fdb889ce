//! The default storage of a new appliance: the volume group on the PV partition, its thin pool
//! and the backup datastore.
//!
//! PENDING (issue 9 depends on issues 4 and 6): the `strata pv|vg|lv` commands (branch
//! `volume`) and the datastore initialisation (branch `backup`) are not in this build yet.
//! [`create_default_storage`] is the one place that will call them; until they land it creates
//! nothing and says so, and the PV partition is left zeroed at its start (no stale label).

use std::path::Path;

use super::error::InstallResult;

/// Names of the default storage objects, shown in the plan.
pub const DEFAULT_VG: &str = "strata";
/// The default thin pool's name.
pub const DEFAULT_POOL: &str = "data";
/// The default backup datastore's name.
pub const DEFAULT_DATASTORE: &str = "backup";

/// What the storage step did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageOutcome {
    /// Created the volume group, pool and datastore.
    Created,
    /// Not available in this build; nothing created.
    Pending(&'static str),
}

/// Creates the default volume group `strata` on `pv`, a thin pool `data` filling it and the
/// backup datastore `backup`, in the installed system's data directory `data_dir`.
pub fn create_default_storage(pv: &Path, data_dir: &Path) -> InstallResult<StorageOutcome> {
    let _ = (pv, data_dir);
    Ok(StorageOutcome::Pending(
        "volume groups, thin pools and the backup datastore are not in this build of strata \
         (issues 4 and 6); the physical-volume partition is left empty",
    ))
}

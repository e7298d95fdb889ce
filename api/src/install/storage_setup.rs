//! The default storage of a new appliance: the volume group `strata` on the disk's PV
//! partition with the thin pool `strata/data`, made by the same code `strata serve` and
//! `strata init` use for the embedded default ([`crate::service::bootstrap`]), here with the
//! partition as the physical volume instead of a sparse file.
//!
//! PENDING: the backup datastore. The bootstrap creates it once the backup crate provides one
//! (issue 6); until then [`StorageSetup::pending`] says so and the installer reports it.

use std::path::Path;

use super::error::{InstallError, InstallResult};
use crate::service::bootstrap::{self, BootstrapOptions};
use crate::service::DataDir;

/// What the storage step made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageSetup {
    /// One line: group, pool, physical volume (and datastore).
    pub summary: String,
    /// Parts not available in this build.
    pub pending: Option<&'static str>,
}

/// Creates the default volume group and thin pool on `pv` for the installed system's data
/// directory `data_dir` (and the backup datastore, when this build has one).
pub fn create_default_storage(pv: &Path, data_dir: &Path) -> InstallResult<StorageSetup> {
    let opts = BootstrapOptions {
        pv: Some(pv.to_path_buf()),
        ..BootstrapOptions::default()
    };
    let (cfg, _) = bootstrap::ensure_default(&DataDir::at(data_dir), &opts)
        .map_err(|e| InstallError::Storage(e.to_string()))?;
    let (Some(vg), Some(pool)) = (cfg.volume_group, cfg.thin_pool) else {
        return Err(InstallError::Storage(format!(
            "{} already held volume groups; the default one was not created",
            data_dir.display()
        )));
    };
    let mut summary = format!(
        "volume group {vg} on {}, thin pool {vg}/{pool}",
        cfg.physical_volume.as_deref().unwrap_or("?")
    );
    let pending = match cfg.datastore {
        Some(ds) => {
            summary.push_str(&format!(", backup datastore {ds}"));
            None
        }
        None => Some("the backup datastore is not in this build of strata (issue 6)"),
    };
    Ok(StorageSetup { summary, pending })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_group_and_pool_go_on_the_given_device() {
        let dir = tempfile::tempdir().unwrap();
        let pv = dir.path().join("vda4");
        std::fs::File::create(&pv)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        let data = dir.path().join("var/lib/strata");
        let setup = create_default_storage(&pv, &data).unwrap();
        assert!(
            setup.summary.starts_with("volume group strata on ")
                && setup.summary.contains("vda4, thin pool strata/data"),
            "{}",
            setup.summary
        );
        let store = strata_storage::volume::VolumeStore::new(&data);
        assert_eq!(store.vg_list().unwrap()[0].name, "strata");
        // No sparse file PV in the data directory: the partition is the PV.
        assert!(!data.join("pv/default.pv").exists());
        // The installed system's `strata serve` finds it set up and creates nothing.
        let (_, created) =
            bootstrap::ensure_default(&DataDir::at(&data), &BootstrapOptions::default()).unwrap();
        assert!(!created);
    }
}

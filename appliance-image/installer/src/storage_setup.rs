//! The default storage of a new appliance, in the installed system's data directory:
//!
//! - the volume group `strata` on the disk's PV partition with the thin pool `strata/data`,
//!   made by the same code `strata serve` and `strata init` use for the embedded default
//!   ([`strata_service::bootstrap`]), here with the partition as the physical volume instead
//!   of a sparse file;
//! - the backup datastore `DATA/datastore` (what `strata backup init --store` makes, with the
//!   default chunk size; the bootstrap makes it too), recorded in `DATA/appliance.json` next to
//!   the group and pool by its path on the installed system — the bootstrap records the path
//!   it sees, which while installing is under the target's mount point.

use std::path::Path;

use strata_backup::Datastore;

use super::error::{InstallError, InstallResult};
use strata_service::bootstrap::{self, ApplianceConfig, BootstrapOptions, DATASTORE_DIR};
use strata_service::{write_atomically, DataDir};

/// What the storage step made, in one line: group, pool, physical volume and datastore.
pub type StorageSummary = String;

/// Creates the default volume group and thin pool on `pv` and the backup datastore, for the
/// installed system's data directory: `data_dir` while installing, `installed_data_dir` (for
/// the paths recorded) once the system runs.
pub fn create_default_storage(
    pv: &Path,
    data_dir: &Path,
    installed_data_dir: &Path,
) -> InstallResult<StorageSummary> {
    let err = |e: &dyn std::fmt::Display| InstallError::Storage(e.to_string());
    let data = DataDir::at(data_dir);
    let opts = BootstrapOptions {
        pv: Some(pv.to_path_buf()),
        ..BootstrapOptions::default()
    };
    let (mut cfg, _) = bootstrap::ensure_default(&data, &opts).map_err(|e| err(&e))?;
    let (Some(vg), Some(pool)) = (cfg.volume_group.clone(), cfg.thin_pool.clone()) else {
        return Err(InstallError::Storage(format!(
            "{} already held volume groups; the default one was not created",
            data_dir.display()
        )));
    };
    Datastore::open_or_create(&data_dir.join(DATASTORE_DIR)).map_err(|e| err(&e))?;
    let installed = installed_data_dir.join(DATASTORE_DIR).display().to_string();
    if cfg.datastore.as_deref() != Some(installed.as_str()) {
        cfg.datastore = Some(installed);
        record(&data, &cfg)?;
    }
    Ok(format!(
        "volume group {vg} on {}, thin pool {vg}/{pool}, backup datastore {}",
        cfg.physical_volume.as_deref().unwrap_or("?"),
        cfg.datastore.as_deref().unwrap_or("?")
    ))
}

/// Rewrites `appliance.json` with the datastore added (atomically, as the bootstrap writes it).
fn record(data: &DataDir, cfg: &ApplianceConfig) -> InstallResult<()> {
    let text = serde_json::to_vec_pretty(cfg).map_err(|e| InstallError::Storage(e.to_string()))?;
    write_atomically(&data.appliance_file(), &text)
        .map_err(|e| InstallError::Storage(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_pool_and_datastore_go_on_the_given_device_and_folder() {
        let dir = tempfile::tempdir().unwrap();
        let pv = dir.path().join("vda4");
        std::fs::File::create(&pv)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        let data = dir.path().join("mnt/target/var/lib/strata");
        let summary = create_default_storage(&pv, &data, Path::new("/var/lib/strata")).unwrap();
        assert!(
            summary.starts_with("volume group strata on ")
                && summary.contains(
                    "vda4, thin pool strata/data, backup datastore /var/lib/strata/datastore"
                ),
            "{summary}"
        );
        let store = strata_storage::volume::VolumeStore::new(&data);
        assert_eq!(store.vg_list().unwrap()[0].name, "strata");
        // No sparse file PV in the data directory: the partition is the PV.
        assert!(!data.join("pv/default.pv").exists());
        // The datastore opens, and the configuration records it by its installed path.
        Datastore::open(&data.join(DATASTORE_DIR)).unwrap();
        let cfg = bootstrap::load_config(&DataDir::at(&data))
            .unwrap()
            .unwrap();
        assert_eq!(cfg.datastore.as_deref(), Some("/var/lib/strata/datastore"));
        // The installed system's `strata serve` finds it set up and creates nothing.
        let (_, created) =
            bootstrap::ensure_default(&DataDir::at(&data), &BootstrapOptions::default()).unwrap();
        assert!(!created);
    }
}

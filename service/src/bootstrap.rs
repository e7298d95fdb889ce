//! The embedded default: what `strata serve` (or `strata init`) sets up on an empty data
//! directory, so that a new user has a working appliance with one command.
//!
//! - a physical volume: a sparse file `DATA/pv/default.pv` of the chosen size, or a given block
//!   device or partition (the installer passes the disk's Strata partition);
//! - a volume group `strata` on it, 4 MiB extents;
//! - a thin pool `strata/data` over most of the group;
//! - a backup datastore in `DATA/datastore`;
//! - `DATA/appliance.json`, written last, recording the choices.
//!
//! Every step checks whether it was already done, so a run interrupted by a crash finishes on
//! the next start instead of failing or duplicating anything.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use strata_storage::volume::VolumeStore;
use strata_storage::StorageError;

use super::{write_atomically, DataDir, ServiceError, ServiceResult};

/// Name of the default volume group.
pub const DEFAULT_VG: &str = "strata";
/// Name of the default thin pool.
pub const DEFAULT_POOL: &str = "data";
/// Extent size of the default group.
pub const DEFAULT_EXTENT: u64 = 4 << 20;
/// Folder of the backup datastore in the data directory.
pub const DATASTORE_DIR: &str = "datastore";

/// What the data directory was set up with (`DATA/appliance.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApplianceConfig {
    /// The default volume group (none when the data directory held other groups already).
    pub volume_group: Option<String>,
    /// The default thin pool in it.
    pub thin_pool: Option<String>,
    /// The physical volume it was created on.
    pub physical_volume: Option<String>,
    /// The backup datastore folder, if set up.
    pub datastore: Option<String>,
}

/// Choices for the embedded default.
#[derive(Clone, Debug)]
pub struct BootstrapOptions {
    /// A device or partition to use as the PV; `None`: a sparse file in the data directory.
    pub pv: Option<PathBuf>,
    /// Size of the sparse PV file.
    pub pv_file_size: u64,
}

impl Default for BootstrapOptions {
    fn default() -> Self {
        BootstrapOptions {
            pv: None,
            pv_file_size: 32 << 30,
        }
    }
}

impl DataDir {
    /// The appliance configuration file.
    pub fn appliance_file(&self) -> PathBuf {
        self.root().join("appliance.json")
    }

    /// Folder of file-backed PVs.
    pub fn pv_dir(&self) -> PathBuf {
        self.root().join("pv")
    }
}

/// The configuration, if the data directory was set up.
pub fn load_config(data: &DataDir) -> ServiceResult<Option<ApplianceConfig>> {
    match std::fs::read(data.appliance_file()) {
        Ok(text) => serde_json::from_slice(&text).map(Some).map_err(|e| {
            ServiceError::internal(format!(
                "{} is damaged: {e}",
                data.appliance_file().display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ServiceError::internal(format!(
            "Reading {}: {e}",
            data.appliance_file().display()
        ))),
    }
}

/// Sets up the embedded default unless the data directory already has it. Returns the
/// configuration and whether anything was created now.
pub fn ensure_default(
    data: &DataDir,
    opts: &BootstrapOptions,
) -> ServiceResult<(ApplianceConfig, bool)> {
    data.ensure()?;
    if let Some(cfg) = load_config(data)? {
        return Ok((cfg, false));
    }
    let store = VolumeStore::new(data.root());
    let pv_path = match &opts.pv {
        Some(p) => p.clone(),
        None => data.pv_dir().join("default.pv"),
    };
    let groups = store.vg_list()?;
    let cfg = if !groups.is_empty() && !groups.iter().any(|g| g.name == DEFAULT_VG) {
        // Volumes were set up by hand: leave them be.
        tracing::info!("volume groups exist already; not creating the default one");
        ApplianceConfig {
            volume_group: None,
            thin_pool: None,
            physical_volume: None,
            datastore: None,
        }
    } else {
        if groups.is_empty() {
            ensure_pv(&store, &pv_path, opts)?;
            store.vg_create(DEFAULT_VG, std::slice::from_ref(&pv_path), DEFAULT_EXTENT)?;
            tracing::info!(pv = %pv_path.display(), "created volume group {DEFAULT_VG}");
        }
        let vg = store.open_vg(DEFAULT_VG, false)?;
        if vg.lv_info(DEFAULT_POOL).is_err() {
            let info = vg.info();
            let pool_size = pool_data_size(info.free, info.extent_size);
            vg.create_pool(DEFAULT_POOL, pool_size, 0, 0)?;
            tracing::info!(
                size = pool_size,
                "created thin pool {DEFAULT_VG}/{DEFAULT_POOL}"
            );
        }
        ApplianceConfig {
            volume_group: Some(DEFAULT_VG.into()),
            thin_pool: Some(DEFAULT_POOL.into()),
            physical_volume: Some(pv_path.display().to_string()),
            datastore: None,
        }
    };
    let store_dir = data.root().join(DATASTORE_DIR);
    strata_backup::Datastore::open_or_create(&store_dir)
        .map_err(|e| ServiceError::internal(format!("Creating the backup datastore: {e}")))?;
    tracing::info!(path = %store_dir.display(), "backup datastore ready");
    let cfg = ApplianceConfig {
        datastore: Some(store_dir.display().to_string()),
        ..cfg
    };
    let text =
        serde_json::to_vec_pretty(&cfg).map_err(|e| ServiceError::internal(e.to_string()))?;
    write_atomically(&data.appliance_file(), &text)?;
    Ok((cfg, true))
}

fn ensure_pv(store: &VolumeStore, path: &Path, opts: &BootstrapOptions) -> ServiceResult<()> {
    let registered = store.pv_list()?;
    let canonical = path.canonicalize().ok();
    let known = registered
        .iter()
        .any(|p| Some(PathBuf::from(&p.path)) == canonical && p.vg.is_none());
    if known {
        return Ok(());
    }
    if opts.pv.is_none() {
        std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))
            .map_err(|e| ServiceError::internal(format!("Creating {}: {e}", path.display())))?;
    }
    let size = if opts.pv.is_none() {
        Some(opts.pv_file_size)
    } else {
        None
    };
    match store.pv_create(path, size) {
        Ok(_) => Ok(()),
        Err(StorageError::AlreadyExists(what)) => Err(ServiceError::Conflict(format!(
            "{what}: {} already belongs to Strata; refusing to overwrite it",
            path.display()
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Data size for a pool over `free` bytes: 1/64 of it (at least 4 extents) is kept back for the
/// pool's metadata and slack.
fn pool_data_size(free: u64, extent: u64) -> u64 {
    let reserve = (free / 64).max(4 * extent);
    (free.saturating_sub(reserve) / extent) * extent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_created_once_and_finished_after_an_interruption() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::at(dir.path());
        let opts = BootstrapOptions {
            pv: None,
            pv_file_size: 1 << 30,
        };
        let (cfg, created) = ensure_default(&data, &opts).unwrap();
        assert!(created);
        assert_eq!(cfg.volume_group.as_deref(), Some(DEFAULT_VG));
        let (_, again) = ensure_default(&data, &opts).unwrap();
        assert!(!again, "a second run must not create anything");

        // An interrupted setup (no appliance.json yet) is finished, not duplicated.
        std::fs::remove_file(data.appliance_file()).unwrap();
        let (_, created) = ensure_default(&data, &opts).unwrap();
        assert!(created);
        let store = VolumeStore::new(data.root());
        assert_eq!(store.vg_list().unwrap().len(), 1);
        let vg = store.open_vg(DEFAULT_VG, true).unwrap();
        assert!(vg.lv_info(DEFAULT_POOL).is_ok());
    }

    #[test]
    fn pool_size_leaves_room() {
        assert_eq!(pool_data_size(1 << 30, 4 << 20), (1 << 30) - (16 << 20));
        assert!(pool_data_size(64 << 30, 4 << 20) < 64 << 30);
    }
}

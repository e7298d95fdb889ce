//! The devices file: which files and block devices are Strata PVs on this machine, like LVM's
//! `system.devices`. Volume groups are found by reading the labels and metadata of the devices
//! listed here, never by scanning every disk.
//!
//! `DATA/devices.json` holds `{"format": 1, "devices": [{"path": ..., "pv": ...}]}`, a list file
//! (`listfile.rs`): replaced atomically under an exclusive lock on `DATA/devices.lock`, so
//! concurrent `pv create`s don't lose each other's entries.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::volume::listfile::ListFile;

const FILE_NAME: &str = "devices.json";
/// Most entries accepted in a devices file.
pub const MAX_DEVICES: usize = 4096;

/// One registered PV.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceEntry {
    /// Absolute path of the file or block device.
    pub path: PathBuf,
    /// The PV identifier found in its label when it was registered.
    pub pv: String,
}

/// The devices file of a data directory. See the module documentation.
#[derive(Clone, Debug)]
pub struct DevicesFile {
    file: ListFile,
}

impl DevicesFile {
    /// The devices file in `data_dir`.
    pub fn new(data_dir: &Path) -> DevicesFile {
        DevicesFile {
            file: ListFile {
                dir: data_dir.to_path_buf(),
                name: FILE_NAME,
                key: "devices",
                what: "devices file",
                max: MAX_DEVICES,
            },
        }
    }

    /// Path of the file.
    pub fn path(&self) -> PathBuf {
        self.file.path()
    }

    /// The registered devices (none if the file does not exist yet).
    pub fn load(&self) -> Result<Vec<DeviceEntry>> {
        self.file.load()
    }

    /// Loads, changes and atomically saves the list under the devices lock.
    pub fn update<T>(&self, change: impl FnOnce(&mut Vec<DeviceEntry>) -> Result<T>) -> Result<T> {
        self.file.update(change)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::StorageError;

    #[test]
    fn entries_persist_and_bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = DevicesFile::new(&dir.path().join("data"));
        assert!(d.load().unwrap().is_empty());
        d.update(|l| {
            l.push(DeviceEntry {
                path: "/x".into(),
                pv: "a".repeat(32),
            });
            Ok(())
        })
        .unwrap();
        assert_eq!(d.load().unwrap().len(), 1);
        std::fs::write(d.path(), b"[1,2").unwrap();
        assert!(matches!(d.load(), Err(StorageError::Corrupt { .. })));
    }
}

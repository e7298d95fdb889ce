//! The devices file: which files and block devices are Strata PVs on this machine, like LVM's
//! `system.devices`. Volume groups are found by reading the labels and metadata of the devices
//! listed here, never by scanning every disk.
//!
//! `DATA/devices.json` holds `{"format": 1, "devices": [{"path": ..., "pv": ...}]}`. It is
//! replaced atomically (write a temporary file, fsync, rename, fsync the directory) under an
//! exclusive lock on `DATA/devices.lock`, so concurrent `pv create`s don't lose each other's
//! entries.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::durable::{write_atomically, Create};
use crate::error::{Result, StorageError};
use crate::volume::lock::lock_exclusive_wait;

const FILE_NAME: &str = "devices.json";
const LOCK_NAME: &str = "devices.lock";
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

#[derive(Debug, Serialize, Deserialize)]
struct Contents {
    format: u32,
    devices: Vec<DeviceEntry>,
}

/// The devices file of a data directory. See the module documentation.
#[derive(Clone, Debug)]
pub struct DevicesFile {
    dir: PathBuf,
}

impl DevicesFile {
    /// The devices file in `data_dir`.
    pub fn new(data_dir: &Path) -> DevicesFile {
        DevicesFile {
            dir: data_dir.to_path_buf(),
        }
    }

    /// Path of the file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// The registered devices (none if the file does not exist yet).
    pub fn load(&self) -> Result<Vec<DeviceEntry>> {
        let path = self.path();
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StorageError::io(format!("Reading {}", path.display()), e)),
        };
        let c: Contents = serde_json::from_slice(&text).map_err(|e| {
            StorageError::corrupt(
                path.display().to_string(),
                format!("not a devices file: {e}"),
            )
        })?;
        if c.format != 1 {
            return Err(StorageError::Unsupported(format!(
                "devices file format {} in {}",
                c.format,
                path.display()
            )));
        }
        if c.devices.len() > MAX_DEVICES {
            return Err(StorageError::corrupt(
                path.display().to_string(),
                format!("{} entries (at most {MAX_DEVICES})", c.devices.len()),
            ));
        }
        Ok(c.devices)
    }

    /// Loads, changes and atomically saves the list under the devices lock.
    pub fn update<T>(&self, change: impl FnOnce(&mut Vec<DeviceEntry>) -> Result<T>) -> Result<T> {
        std::fs::create_dir_all(&self.dir).map_err(|e| {
            StorageError::io(format!("Creating data directory {}", self.dir.display()), e)
        })?;
        let _lock = lock_exclusive_wait(&self.dir.join(LOCK_NAME))?;
        let mut list = self.load()?;
        let out = change(&mut list)?;
        let text = serde_json::to_vec_pretty(&Contents {
            format: 1,
            devices: list,
        })
        .map_err(|e| StorageError::InvalidInput(format!("Encoding the devices file: {e}")))?;
        write_atomically(&self.path(), &text, 0o644, Create::OrReplace)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

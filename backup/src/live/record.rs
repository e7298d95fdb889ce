//! The record that marks a volume as being restored: `DATA/restores/VG/NAME.json`, with the
//! map of restored chunks of a live restore beside it (`NAME.restored`, see [`super::map`]).
//!
//! The record is written atomically before the restore touches the volume and removed only
//! after the restore's final flush, so a volume whose restore has not finished always carries
//! it: the service lists it (`restoring`), refuses uses that would take a partial restore for a
//! whole volume, and hands out the live-restore device for a live one. Layout byte by byte:
//! docs/format-datastore.md ("Restore records").

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use strata_storage::{Result, StorageError};

use crate::fsutil::{self, io_err};
use crate::manifest::{frame_json, unframe_json};
use crate::storefs::RealFs;

/// The record's `format` field.
pub const RECORD_FORMAT: &str = "strata-restore-record";
/// The record's version.
pub const RECORD_VERSION: u32 = 1;
/// The folder of the data directory holding restore records.
pub const RESTORES_DIR: &str = "restores";
/// Largest record file read.
const MAX_RECORD_LEN: u64 = 64 << 10;

/// How the volume is being restored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestoreMode {
    /// A plain restore: the volume is not usable until it ends.
    Full,
    /// A live restore: the volume is usable through the live-restore device meanwhile.
    Live,
}

/// What a restore record holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RestoreRecord {
    /// [`RECORD_FORMAT`].
    pub format: String,
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// Live or full.
    pub mode: RestoreMode,
    /// 32 hex digits naming this restore; the map of restored chunks carries the same bytes.
    pub restore_id: String,
    /// The snapshot restored, `ID/TIME`.
    pub snapshot: String,
    /// The datastore folder it comes from.
    pub datastore: PathBuf,
    /// The volume restored onto, `lv:VG/NAME`.
    pub target: String,
    /// Bytes.
    pub size: u64,
    /// The snapshot's chunk size.
    pub chunk_size: u32,
    /// Chunks in the snapshot.
    pub chunk_count: u64,
    /// Start, seconds since the Unix epoch.
    pub started: u64,
}

impl RestoreRecord {
    /// The restore id as 16 bytes.
    pub fn id_bytes(&self) -> Result<[u8; 16]> {
        let bad = || StorageError::corrupt("restore record", "restore-id is not 32 hex digits");
        if self.restore_id.len() != 32 {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(self.restore_id.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(out)
    }

    /// A fresh restore id.
    pub fn new_id() -> String {
        format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
    }
}

/// Where the record and map of one volume live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestorePaths {
    dir: PathBuf,
    name: String,
}

impl RestorePaths {
    /// The paths for volume `VG/NAME` under data directory `data_dir`.
    pub fn of(data_dir: &Path, vg: &str, lv: &str) -> RestorePaths {
        RestorePaths {
            dir: data_dir.join(RESTORES_DIR).join(vg),
            name: lv.to_string(),
        }
    }

    /// The record file.
    pub fn record(&self) -> PathBuf {
        self.dir.join(format!("{}.json", self.name))
    }

    /// The map of restored chunks.
    pub fn map(&self) -> PathBuf {
        self.dir.join(format!("{}.restored", self.name))
    }

    /// The folder of both.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads the record; `None` when the volume is not being restored.
    pub fn read(&self) -> Result<Option<RestoreRecord>> {
        let path = self.record();
        let bytes = match crate::store::read_bounded(&path, MAX_RECORD_LEN) {
            Ok(b) => b,
            Err(StorageError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let rec: RestoreRecord = unframe_json(&bytes, &path.display().to_string())?;
        if rec.format != RECORD_FORMAT || rec.version != RECORD_VERSION {
            return Err(StorageError::Unsupported(format!(
                "restore record {} of format {} version {}",
                path.display(),
                rec.format,
                rec.version
            )));
        }
        Ok(Some(rec))
    }

    /// Writes the record atomically (its folder made if missing).
    pub fn write(&self, rec: &RestoreRecord) -> Result<()> {
        fs::create_dir_all(&self.dir).map_err(|e| io_err("Creating", &self.dir, e))?;
        if let Some(parent) = self.dir.parent() {
            fsutil::fsync_dir(&RealFs, parent)?;
        }
        let name = format!("{}.json", self.name);
        fsutil::atomic_write(&RealFs, &self.dir, &name, &frame_json(rec)?)
    }

    /// Removes the record, then the map: the volume is an ordinary volume again.
    pub fn remove(&self) -> Result<()> {
        for path in [self.record(), self.map()] {
            match fs::remove_file(&path) {
                Ok(()) => fsutil::fsync_dir(&RealFs, &self.dir)?,
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("Removing", &path, e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let p = RestorePaths::of(d.path(), "vg0", "disk");
        assert_eq!(p.read().unwrap(), None);
        let rec = RestoreRecord {
            format: RECORD_FORMAT.into(),
            version: RECORD_VERSION,
            mode: RestoreMode::Live,
            restore_id: RestoreRecord::new_id(),
            snapshot: "volume/x/2026-12-01T00:00:00Z".into(),
            datastore: "/ds".into(),
            target: "lv:vg0/disk".into(),
            size: 1 << 20,
            chunk_size: 65536,
            chunk_count: 16,
            started: 5,
        };
        p.write(&rec).unwrap();
        assert_eq!(p.read().unwrap(), Some(rec.clone()));
        assert_eq!(rec.id_bytes().unwrap().len(), 16);
        std::fs::write(p.record(), b"{}").unwrap();
        assert!(p.read().is_err());
        p.remove().unwrap();
        assert_eq!(p.read().unwrap(), None);
        p.remove().unwrap();
    }
}

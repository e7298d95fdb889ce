//! The RBD groups file: volume groups on Ceph RBD this data directory knows, with how to reach
//! their cluster. Compiled with or without the `rbd` feature, so that a build without RBD still
//! recognises an RBD group's name and says why it cannot open it.
//!
//! `DATA/rbd-groups.json` holds `{"format": 1, "groups": [{"name", "conf", "user", "keyring",
//! "pool"}]}`, replaced atomically under `DATA/devices.lock` like the devices file. The volumes
//! themselves are recorded in Ceph, on each image (see `rbd/group.rs`), not here.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::volume::listfile::ListFile;

const FILE_NAME: &str = "rbd-groups.json";
/// Most groups a file may hold.
const MAX_GROUPS: usize = 1024;

/// An RBD volume group as recorded.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RbdGroupRecord {
    /// Group name (unique among all groups of the data directory).
    pub name: String,
    /// The Ceph configuration file.
    pub conf: PathBuf,
    /// The Ceph user, without `client.`.
    pub user: String,
    /// A keyring file, when the configuration does not name one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyring: Option<PathBuf>,
    /// The RBD pool.
    pub pool: String,
}

/// The RBD groups file of a data directory. See the module documentation.
#[derive(Clone, Debug)]
pub struct RbdGroupsFile {
    file: ListFile,
}

impl RbdGroupsFile {
    /// The file in `data_dir`.
    pub fn new(data_dir: &Path) -> RbdGroupsFile {
        RbdGroupsFile {
            file: ListFile {
                dir: data_dir.to_path_buf(),
                name: FILE_NAME,
                key: "groups",
                what: "RBD groups file",
                max: MAX_GROUPS,
            },
        }
    }

    /// The recorded groups (none if the file does not exist).
    pub fn load(&self) -> Result<Vec<RbdGroupRecord>> {
        self.file.load()
    }

    /// The group named `name`, if recorded.
    pub fn get(&self, name: &str) -> Result<Option<RbdGroupRecord>> {
        Ok(self.load()?.into_iter().find(|g| g.name == name))
    }

    /// Loads, changes and atomically saves the list under the data directory's lock.
    pub fn update<T>(
        &self,
        change: impl FnOnce(&mut Vec<RbdGroupRecord>) -> Result<T>,
    ) -> Result<T> {
        self.file.update(change)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_persist_and_bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = RbdGroupsFile::new(dir.path());
        assert!(f.load().unwrap().is_empty());
        let rec = RbdGroupRecord {
            name: "ceph".into(),
            conf: "/etc/x.conf".into(),
            user: "admin".into(),
            keyring: None,
            pool: "rbd".into(),
        };
        f.update(|l| {
            l.push(rec.clone());
            Ok(())
        })
        .unwrap();
        assert_eq!(f.get("ceph").unwrap(), Some(rec));
        std::fs::write(dir.path().join(FILE_NAME), b"{").unwrap();
        assert!(matches!(f.load(), Err(crate::StorageError::Corrupt { .. })));
    }
}

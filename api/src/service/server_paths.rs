//! Which files on the server an API caller may name: import sources (`POST /api/convert`,
//! backups and volume creation from a path) and VM kernels and initrds.
//!
//! A token is not a login on the server, so a served API confines such paths to its import
//! folders — `DATA/import` and any given to `strata serve --import-dir` — as Proxmox confines
//! API users to storages. A path is resolved (symlinks included) before the check, so a link in
//! an import folder cannot point out of it. Images named this way must be self-contained (no
//! backing file, parent or extent elsewhere), and new images made through the API may not be
//! given a backing or data file, since either would make the server read a file the caller
//! could not name. Commands run in-process on the local machine (`strata images …` without
//! `--remote`) act with the caller's own file access and are not confined.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use strata_storage::format::References;

use super::{ServiceError, ServiceResult};

/// Format options that make an image read another file.
const FILE_OPTIONS: [&str; 3] = ["backing_file", "backing_fmt", "data_file"];

/// The policy for server paths named in requests.
#[derive(Clone, Debug)]
pub enum ServerPaths {
    /// Any absolute path (in-process use by the machine's own user).
    Anywhere,
    /// Only paths under these folders (a served API).
    Under(Vec<PathBuf>),
}

impl ServerPaths {
    /// Checks that `raw` names an existing file the caller may use as `what`; returns the
    /// resolved path to open (so a link swapped later is not followed).
    pub fn file(&self, what: &str, raw: &str) -> ServiceResult<PathBuf> {
        if raw.is_empty() || raw.len() > 4096 || raw.chars().any(char::is_control) {
            return Err(bad(format!("The {what} path {raw:?} is not a valid path")));
        }
        let path = Path::new(raw);
        if !path.is_absolute() {
            return Err(bad(format!(
                "The {what} {raw:?} must be an absolute path on the server"
            )));
        }
        let resolved = path
            .canonicalize()
            .map_err(|_| ServiceError::NotFound(format!("The {what} {raw}")))?;
        if !resolved.is_file() {
            return Err(ServiceError::NotFound(format!("The {what} {raw}")));
        }
        if let ServerPaths::Under(roots) = self {
            let inside = roots
                .iter()
                .filter_map(|r| r.canonicalize().ok())
                .any(|r| resolved.starts_with(&r));
            if !inside {
                let list: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
                return Err(ServiceError::Forbidden(format!(
                    "The {what} {raw} is outside the server's import folders ({}); copy it \
                     there, or start the server with --import-dir",
                    list.join(", ")
                )));
            }
        }
        Ok(resolved)
    }

    /// How images named by a server path are opened: a confined caller may not reach other
    /// files through them, so references (backing files, parents, extent files) are refused
    /// before anything is opened.
    pub fn references(&self) -> References {
        match self {
            ServerPaths::Anywhere => References::Follow,
            ServerPaths::Under(_) => References::Refuse,
        }
    }

    /// Checks the format options of a new image made through the API.
    pub fn new_image_options(&self, options: &BTreeMap<String, String>) -> ServiceResult<()> {
        if let ServerPaths::Anywhere = self {
            return Ok(());
        }
        match FILE_OPTIONS.iter().find(|k| options.contains_key(**k)) {
            Some(k) => Err(ServiceError::Forbidden(format!(
                "The option {k} makes an image read another file on the server and is not \
                 accepted through the API; use volume snapshots and clones for linked copies"
            ))),
            None => Ok(()),
        }
    }
}

fn bad(msg: String) -> ServiceError {
    ServiceError::BadRequest(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confined_paths_must_resolve_inside_an_import_folder() {
        let dir = tempfile::tempdir().unwrap();
        let import = dir.path().join("import");
        std::fs::create_dir(&import).unwrap();
        let inside = import.join("disk.raw");
        std::fs::write(&inside, b"x").unwrap();
        let outside = dir.path().join("secret");
        std::fs::write(&outside, b"y").unwrap();
        let link = import.join("link");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        let p = ServerPaths::Under(vec![import.clone()]);
        let s = |p: &Path| p.to_str().unwrap().to_string();
        assert_eq!(
            p.file("source", &s(&inside)).unwrap(),
            inside.canonicalize().unwrap()
        );
        for refused in [
            s(&outside),
            s(&link),
            format!("{}/../secret", import.display()),
        ] {
            assert!(
                matches!(p.file("source", &refused), Err(ServiceError::Forbidden(_))),
                "{refused} was accepted"
            );
        }
        assert!(matches!(
            p.file("source", "disk.raw"),
            Err(ServiceError::BadRequest(_))
        ));
        assert!(matches!(
            p.file("source", &s(&import.join("missing"))),
            Err(ServiceError::NotFound(_))
        ));
        // The directory itself is not a file.
        assert!(p.file("source", &s(&import)).is_err());
        assert_eq!(
            ServerPaths::Anywhere.file("source", &s(&outside)).unwrap(),
            outside.canonicalize().unwrap()
        );
    }

    #[test]
    fn confined_new_images_take_no_file_options() {
        let p = ServerPaths::Under(vec![]);
        for k in FILE_OPTIONS {
            let opts = BTreeMap::from([(k.to_string(), "/etc/hostname".to_string())]);
            assert!(matches!(
                p.new_image_options(&opts),
                Err(ServiceError::Forbidden(_))
            ));
            assert!(ServerPaths::Anywhere.new_image_options(&opts).is_ok());
        }
        let opts = BTreeMap::from([("cluster_size".to_string(), "65536".to_string())]);
        assert!(p.new_image_options(&opts).is_ok());
    }
}

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

use std::path::{Path, PathBuf};

use strata_storage::format::References;

use super::{ServiceError, ServiceResult};

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
        // Confinement is decided before existence: a path outside the import folders gets the
        // same 403 whether or not it exists, so the answer says nothing about other files.
        let resolved = path.canonicalize();
        if let ServerPaths::Under(roots) = self {
            let roots: Vec<PathBuf> = roots.iter().filter_map(|r| r.canonicalize().ok()).collect();
            let inside = match &resolved {
                Ok(r) => roots.iter().any(|root| r.starts_with(root)),
                // Missing: judged by the path as written, `..` folded.
                Err(_) => roots.iter().any(|root| lexical(path).starts_with(root)),
            };
            if !inside {
                let list: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
                return Err(ServiceError::Forbidden(format!(
                    "The {what} {raw} is outside the server's import folders ({}); copy it \
                     there, or start the server with --import-dir",
                    list.join(", ")
                )));
            }
        }
        let resolved = resolved.map_err(|_| ServiceError::NotFound(format!("The {what} {raw}")))?;
        if !resolved.is_file() {
            return Err(ServiceError::NotFound(format!("The {what} {raw}")));
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
}

/// `path` with `.` and `..` folded away, without looking at the file system.
fn lexical(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
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
        // Outside, existing or not, the answer is the same.
        for outside in [
            s(&outside),
            s(&dir.path().join("missing")),
            "/etc/shadow".into(),
        ] {
            assert!(
                matches!(p.file("source", &outside), Err(ServiceError::Forbidden(_))),
                "{outside}"
            );
        }
        assert!(matches!(
            p.file("source", &format!("{}/../missing", import.display())),
            Err(ServiceError::Forbidden(_))
        ));
        // The directory itself is not a file.
        assert!(p.file("source", &s(&import)).is_err());
        assert_eq!(
            ServerPaths::Anywhere.file("source", &s(&outside)).unwrap(),
            outside.canonicalize().unwrap()
        );
    }
}

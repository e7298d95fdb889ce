//! Staged creation of a conversion's new target: the image is built under a temporary name in
//! the target's own folder and moved to its final name only after the conversion's final flush,
//! so a failed or interrupted conversion never leaves a half-written image under the name the
//! user asked for.
//!
//! Formats whose files do not name themselves (raw, qcow2) are built as one hidden file
//! `.NAME.convert-TAG` next to the target. A vmdk names its files (a descriptor names its
//! extents, a sparse extent's embedded descriptor names itself), so it is built under its final
//! file names inside a hidden work folder `.NAME.convert-TAG/` next to the target; committing
//! moves the extent files first and the descriptor (the file that makes the image visible)
//! last. Moving never replaces an existing file (a hard link that fails on an existing name,
//! then the temporary name is removed). Afterwards the folder is synced so the new names are
//! durable.
//!
//! On an error the temporary file or folder is removed when the [`Staged`] is dropped. A
//! process killed outright (kill -9, power loss) leaves only the hidden temporary name behind.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Result, StorageError};
use crate::format::ImageFormat;

/// Distinguishes the stagings of one process.
static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// A new image under construction (see the module documentation).
#[derive(Debug)]
pub struct Staged {
    /// The image's final path.
    target: PathBuf,
    /// Where the image is built.
    build: PathBuf,
    /// The work folder, for formats built in one.
    work_dir: Option<PathBuf>,
    committed: bool,
}

fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> StorageError {
    move |e| StorageError::io(what, e)
}

impl Staged {
    /// Prepares to build an image of `format` that will be named `target`. Fails if `target`
    /// exists.
    pub fn new(target: &Path, format: ImageFormat) -> Result<Staged> {
        let name = target
            .file_name()
            .ok_or_else(|| {
                StorageError::InvalidInput(format!(
                    "The target {} does not name a file",
                    target.display()
                ))
            })?
            .to_string_lossy()
            .into_owned();
        if target.symlink_metadata().is_ok() {
            return Err(StorageError::AlreadyExists(target.display().to_string()));
        }
        let folder = folder_of(target);
        if !folder.is_dir() {
            return Err(StorageError::NotFound(folder));
        }
        let tag = format!(
            "{}-{}",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        );
        let temp = folder.join(format!(".{name}.convert-{tag}"));
        let mut staged = Staged {
            target: target.to_path_buf(),
            build: temp.clone(),
            work_dir: None,
            committed: false,
        };
        if format == ImageFormat::Vmdk {
            std::fs::create_dir(&temp).map_err(io_err(format!(
                "Creating the work folder {}",
                temp.display()
            )))?;
            staged.build = temp.join(&name);
            staged.work_dir = Some(temp);
        } else if temp.symlink_metadata().is_ok() {
            // A leftover of a killed process that had the same id: not ours to reuse.
            return Err(StorageError::AlreadyExists(temp.display().to_string()));
        }
        Ok(staged)
    }

    /// Where to create the image.
    pub fn build_path(&self) -> &Path {
        &self.build
    }

    /// Rewrites an error that names the temporary build path (or work folder) to name the
    /// target instead: the hidden staging names are an implementation detail the user never
    /// asked for.
    pub fn scrub(&self, e: StorageError) -> StorageError {
        let mut swaps = vec![(
            self.build.display().to_string(),
            self.target.display().to_string(),
        )];
        if let Some(w) = &self.work_dir {
            swaps.push((
                w.display().to_string(),
                folder_of(&self.target).display().to_string(),
            ));
        }
        let fix = |s: String| {
            swaps
                .iter()
                .fold(s, |acc, (from, to)| acc.replace(from.as_str(), to))
        };
        match e {
            StorageError::Io { context, source } => StorageError::Io {
                context: fix(context),
                source,
            },
            StorageError::InvalidInput(m) => StorageError::InvalidInput(fix(m)),
            StorageError::ReadOnly(m) => StorageError::ReadOnly(fix(m)),
            StorageError::Unsupported(m) => StorageError::Unsupported(fix(m)),
            StorageError::Corrupt { what, detail } => StorageError::Corrupt {
                what: fix(what),
                detail: fix(detail),
            },
            StorageError::OutOfSpace(m) => StorageError::OutOfSpace(fix(m)),
            StorageError::NotFound(p) => {
                StorageError::NotFound(PathBuf::from(fix(p.display().to_string())))
            }
            StorageError::AlreadyExists(m) => StorageError::AlreadyExists(fix(m)),
            StorageError::Busy(m) => StorageError::Busy(fix(m)),
            StorageError::Unavailable(m) => StorageError::Unavailable(fix(m)),
            other => other,
        }
    }

    /// Moves the finished (flushed and closed) image to its final name(s).
    pub fn commit(mut self) -> Result<()> {
        let folder = folder_of(&self.target);
        let Some(work) = self.work_dir.clone() else {
            place(&self.build, &self.target)?;
            self.committed = true;
            return sync_folder(&folder);
        };
        let main = self.build.file_name().map(|n| n.to_os_string());
        let mut others = Vec::new();
        let entries =
            std::fs::read_dir(&work).map_err(io_err(format!("Listing {}", work.display())))?;
        for entry in entries {
            let entry = entry.map_err(io_err(format!("Listing {}", work.display())))?;
            if Some(entry.file_name()) != main {
                others.push(entry.file_name());
            }
        }
        others.sort();
        let mut placed: Vec<PathBuf> = Vec::new();
        let result = (|| {
            for n in &others {
                let to = folder.join(n);
                place(&work.join(n), &to)?;
                placed.push(to);
            }
            place(&self.build, &self.target)
        })();
        if let Err(e) = result {
            // Put nothing half-made in the target folder: take back what was moved.
            for p in placed {
                let _ = std::fs::remove_file(p);
            }
            return Err(e);
        }
        self.committed = true;
        let _ = std::fs::remove_dir(&work);
        sync_folder(&folder)
    }
}

/// Gives `from` the name `to` without replacing an existing `to`.
fn place(from: &Path, to: &Path) -> Result<()> {
    match std::fs::hard_link(from, to) {
        Ok(()) => std::fs::remove_file(from)
            .map_err(io_err(format!("Removing the temporary {}", from.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(StorageError::AlreadyExists(to.display().to_string()))
        }
        // File systems without hard links: check, then rename (not atomic against a racing
        // creator of the same name, which is the best such a file system offers).
        Err(_) if to.symlink_metadata().is_ok() => {
            Err(StorageError::AlreadyExists(to.display().to_string()))
        }
        Err(_) => std::fs::rename(from, to).map_err(io_err(format!(
            "Renaming {} to {}",
            from.display(),
            to.display()
        ))),
    }
}

fn sync_folder(folder: &Path) -> Result<()> {
    std::fs::File::open(folder)
        .and_then(|f| f.sync_all())
        .map_err(io_err(format!("Syncing the folder {}", folder.display())))
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        match &self.work_dir {
            Some(d) => {
                let _ = std::fs::remove_dir_all(d);
            }
            None => {
                let _ = std::fs::remove_file(&self.build);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn single_files_appear_only_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a.qcow2");
        let s = Staged::new(&target, ImageFormat::Qcow2).unwrap();
        std::fs::write(s.build_path(), b"data").unwrap();
        assert!(!target.exists());
        s.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"data");
        assert_eq!(names(dir.path()), ["a.qcow2"]);
        // The name is taken now.
        let e = Staged::new(&target, ImageFormat::Raw).unwrap_err();
        assert!(matches!(e, StorageError::AlreadyExists(_)), "{e}");
    }

    #[test]
    fn errors_name_the_target_not_the_staging_path() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t.vmdk");
        let s = Staged::new(&target, ImageFormat::Vmdk).unwrap();
        let e = StorageError::corrupt(
            s.build_path().display().to_string(),
            format!(
                "extent {} is short",
                s.build_path()
                    .parent()
                    .unwrap()
                    .join("t-flat.vmdk")
                    .display()
            ),
        );
        let msg = s.scrub(e).to_string();
        assert!(!msg.contains(".convert-"), "{msg}");
        assert!(msg.contains(&target.display().to_string()), "{msg}");
    }

    #[test]
    fn dropped_stagings_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        for fmt in [ImageFormat::Raw, ImageFormat::Vmdk] {
            let s = Staged::new(&dir.path().join("b.img"), fmt).unwrap();
            std::fs::write(s.build_path(), b"half").unwrap();
            drop(s);
            assert!(names(dir.path()).is_empty(), "{fmt}");
        }
    }

    #[test]
    fn folders_move_extents_then_the_descriptor_and_never_replace() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("d.vmdk");
        let s = Staged::new(&target, ImageFormat::Vmdk).unwrap();
        let work = s.build_path().parent().unwrap().to_path_buf();
        assert_eq!(s.build_path().file_name().unwrap(), "d.vmdk");
        std::fs::write(s.build_path(), b"descriptor").unwrap();
        std::fs::write(work.join("d-flat.vmdk"), b"extent").unwrap();
        s.commit().unwrap();
        assert_eq!(names(dir.path()), ["d-flat.vmdk", "d.vmdk"]);

        // An extent name that is taken: refused, nothing of the new image stays.
        let target = dir.path().join("e.vmdk");
        std::fs::write(dir.path().join("e-s002.vmdk"), b"someone else's").unwrap();
        let s = Staged::new(&target, ImageFormat::Vmdk).unwrap();
        let work = s.build_path().parent().unwrap().to_path_buf();
        std::fs::write(s.build_path(), b"descriptor").unwrap();
        std::fs::write(work.join("e-s001.vmdk"), b"1").unwrap();
        std::fs::write(work.join("e-s002.vmdk"), b"2").unwrap();
        let e = s.commit().unwrap_err();
        assert!(matches!(e, StorageError::AlreadyExists(_)), "{e}");
        assert_eq!(
            names(dir.path()),
            ["d-flat.vmdk", "d.vmdk", "e-s002.vmdk"],
            "the failed image left files"
        );
        assert_eq!(
            std::fs::read(dir.path().join("e-s002.vmdk")).unwrap(),
            b"someone else's"
        );
    }
}

//! A [`StoreFs`] that cuts power, kills the process or fails one operation, for crash tests of
//! the datastore (feature `test-utils`).
//!
//! It works on a real folder. Every operation is counted (a durable file write counts twice:
//! the write, then its `fdatasync`); [`FaultFs::cut_at`] makes the Nth operation and every
//! later one fail with EIO, as if the machine had stopped there. Until then the folder is
//! exactly what the running process sees, and the fault layer keeps an undo record of every
//! effect that is not durable yet by POSIX rules:
//!
//! - a new file, folder, rename or removal is durable once its parent folder has been fsync'd
//!   (a rename needs both parents);
//! - file data is durable once the file has been fsync'd (`write_new_synced` does it before
//!   returning; a cut between its write and its sync leaves data that a power cut empties);
//! - a modification time set by `touch` is never made durable by the datastore (nothing fsyncs
//!   a chunk after touching it), so a power cut puts the old one back.
//!
//! `remove_dir_all` removes one entry at a time, each an operation of its own, the way
//! `std::fs::remove_dir_all` does: a cut can leave a folder half removed.
//!
//! [`FaultFs::crash`] then leaves the folder as the disk would hold it after that event:
//! [`Crash::Kill`] (`kill -9`: everything done stays), [`Crash::PowerLoss`] (everything not
//! durable is undone, newest first) or [`Crash::PowerLossSome`] (each non-durable effect is lost
//! or kept at random, the way a file system may write back some of its dirty state and not the
//! rest — an effect on a path that a lost effect made or moved is lost with it).
//!
//! Removed files and folders are moved into a stash folder (on the same file system, outside
//! the datastore) until their removal is durable, so that undoing it is a rename back.
//! [`FaultFs::fail_at`] instead fails one operation with a given error and keeps going.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use crate::storefs::{RealFs, StoreFs};

/// What a cut leaves on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crash {
    /// The process was killed: every completed operation stays.
    Kill,
    /// Power was lost: every effect not made durable is undone.
    PowerLoss,
    /// Power was lost and the file system had written back some of its dirty state: each
    /// non-durable effect is lost or kept at random (seeded).
    PowerLossSome {
        /// Seed of the choice.
        seed: u64,
    },
}

/// An effect that is not durable yet, and how to undo it.
#[derive(Clone, Debug)]
enum Effect {
    /// A file or folder was created at `path`.
    Made { path: PathBuf, dir: bool },
    /// `from` was renamed to `to`; a file it replaced waits in the stash.
    Renamed {
        from: PathBuf,
        to: PathBuf,
        replaced: Option<PathBuf>,
        from_synced: bool,
        to_synced: bool,
    },
    /// `path` was removed; it waits in the stash at `stash`.
    Removed { path: PathBuf, stash: PathBuf },
    /// The data of the file at `path` was written and not yet fsync'd.
    Data { path: PathBuf },
    /// The modification time of `path` was set; it was `old` before.
    Touched { path: PathBuf, old: SystemTime },
}

impl Effect {
    /// Paths whose state this effect depends on or changes.
    fn paths(&self) -> Vec<&Path> {
        match self {
            Effect::Renamed { from, to, .. } => vec![from, to],
            Effect::Made { path, .. }
            | Effect::Removed { path, .. }
            | Effect::Data { path }
            | Effect::Touched { path, .. } => vec![path],
        }
    }

    fn rewrite(&mut self, old: &Path, new: &Path) {
        let fix = |p: &mut PathBuf| {
            if let Ok(rest) = p.strip_prefix(old) {
                *p = if rest.as_os_str().is_empty() {
                    new.to_path_buf()
                } else {
                    new.join(rest)
                };
            }
        };
        match self {
            Effect::Made { path, .. }
            | Effect::Removed { path, .. }
            | Effect::Data { path }
            | Effect::Touched { path, .. } => fix(path),
            Effect::Renamed { from, to, .. } => {
                fix(from);
                fix(to);
            }
        }
    }
}

fn related(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// Deletes a stashed copy nothing can bring back any more (best effort: it lies outside the
/// datastore).
fn discard(stash: &Path) {
    let _ = match std::fs::symlink_metadata(stash) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(stash),
        _ => std::fs::remove_file(stash),
    };
}

fn parent(p: &Path) -> &Path {
    p.parent().unwrap_or(Path::new("/"))
}

#[derive(Debug, Default)]
struct State {
    ops: u64,
    cut_at: Option<u64>,
    fail_at: Option<(u64, i32)>,
    /// The operation [`FaultFs::fail_at`] failed, once it has: its name and path.
    injected: Option<(&'static str, PathBuf)>,
    pending: Vec<Effect>,
    stashed: u64,
}

/// The fault-injecting seam; see the module documentation.
#[derive(Debug)]
pub struct FaultFs {
    real: RealFs,
    stash: PathBuf,
    state: Mutex<State>,
}

impl FaultFs {
    /// A seam whose removals wait in `stash` (a folder on the same file system as the
    /// datastore, outside it; made if missing).
    pub fn new(stash: &Path) -> io::Result<FaultFs> {
        std::fs::create_dir_all(stash)?;
        Ok(FaultFs {
            real: RealFs,
            stash: stash.to_path_buf(),
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Operations counted so far.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Makes operation `n` (counted from the next one, 1-based) and every later one fail with
    /// EIO: the machine stops there.
    pub fn cut_at(&self, n: u64) {
        let mut s = self.lock();
        s.cut_at = Some(s.ops + n);
    }

    /// Makes operation `n` (counted from the next one, 1-based) fail with `errno`; the
    /// operations after it run normally.
    pub fn fail_at(&self, n: u64, errno: i32) {
        let mut s = self.lock();
        s.fail_at = Some((s.ops + n, errno));
    }

    /// The operation the failure [`FaultFs::fail_at`] asked for hit, once it has: `create_dir`,
    /// `write`, `sync_data`, `rename`, `remove`, `sync_dir` or `touch`, and its path (`from`
    /// for a rename).
    pub fn injected(&self) -> Option<(&'static str, PathBuf)> {
        self.lock().injected.clone()
    }

    /// Whether the cut has been reached.
    pub fn is_cut(&self) -> bool {
        let s = self.lock();
        s.cut_at.is_some_and(|c| s.ops >= c)
    }

    /// Leaves the folder as the disk would hold it after `how`; then the seam works again with
    /// nothing pending (a machine after reboot).
    pub fn crash(&self, how: Crash) -> io::Result<()> {
        let mut s = self.lock();
        let pending = std::mem::take(&mut s.pending);
        let lost: Vec<bool> = match how {
            Crash::Kill => vec![false; pending.len()],
            Crash::PowerLoss => vec![true; pending.len()],
            Crash::PowerLossSome { seed } => {
                let mut rng = fastrand::Rng::with_seed(seed);
                let mut lost: Vec<bool> = pending.iter().map(|_| rng.bool()).collect();
                // An effect on a path a lost effect made, moved or removed is lost with it.
                for i in 0..pending.len() {
                    if !lost[i] {
                        continue;
                    }
                    for j in i + 1..pending.len() {
                        if !lost[j]
                            && pending[j]
                                .paths()
                                .iter()
                                .any(|pj| pending[i].paths().iter().any(|pi| related(pi, pj)))
                        {
                            lost[j] = true;
                        }
                    }
                }
                lost
            }
        };
        let mut rng = fastrand::Rng::with_seed(match how {
            Crash::PowerLossSome { seed } => seed ^ 0x5eed,
            _ => 0,
        });
        let mut pending = pending;
        for i in (0..pending.len()).rev() {
            if !lost[i] {
                continue;
            }
            let e = pending[i].clone();
            match &e {
                Effect::Made { path, dir } => {
                    if *dir {
                        std::fs::remove_dir_all(path)?;
                    } else {
                        std::fs::remove_file(path)?;
                    }
                }
                Effect::Renamed {
                    from, to, replaced, ..
                } => {
                    std::fs::rename(to, from)?;
                    if let Some(r) = replaced {
                        std::fs::rename(r, to)?;
                    }
                    for earlier in &mut pending[..i] {
                        earlier.rewrite(to, from);
                    }
                }
                Effect::Removed { path, stash } => std::fs::rename(stash, path)?,
                Effect::Data { path } => {
                    // Unsynced data of a file whose name survived: some prefix of it, perhaps
                    // none, reached the disk.
                    let f = std::fs::OpenOptions::new().write(true).open(path)?;
                    let len = f.metadata()?.len();
                    f.set_len(if how == Crash::PowerLoss {
                        0
                    } else {
                        rng.u64(..=len)
                    })?;
                }
                Effect::Touched { path, old } => match std::fs::File::open(path) {
                    Ok(f) => f.set_modified(*old)?,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                },
            }
        }
        s.cut_at = None;
        s.fail_at = None;
        Ok(())
    }

    /// Counts one operation (`what` on `path`); the error it must fail with, if any.
    fn count(s: &mut State, what: &'static str, path: &Path) -> io::Result<()> {
        s.ops += 1;
        if s.cut_at.is_some_and(|c| s.ops >= c) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        if let Some((n, errno)) = s.fail_at {
            if s.ops == n {
                s.injected = Some((what, path.to_path_buf()));
                return Err(io::Error::from_raw_os_error(errno));
            }
        }
        Ok(())
    }

    fn stash_path(&self, s: &mut State) -> PathBuf {
        s.stashed += 1;
        self.stash.join(format!("{}", s.stashed))
    }

    /// Moves `path` into the stash (a removal that can be undone).
    fn remove(&self, s: &mut State, path: &Path) -> io::Result<()> {
        std::fs::symlink_metadata(path)?;
        let stash = self.stash_path(s);
        std::fs::rename(path, &stash)?;
        s.pending.push(Effect::Removed {
            path: path.to_path_buf(),
            stash,
        });
        Ok(())
    }

    /// Removes `path` and everything under it, one counted operation per entry, deepest first.
    fn remove_tree(&self, s: &mut State, path: &Path) -> io::Result<()> {
        if std::fs::symlink_metadata(path)?.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?
                .map(|e| e.map(|e| e.path()))
                .collect::<io::Result<_>>()?;
            entries.sort();
            for e in entries {
                self.remove_tree(s, &e)?;
            }
        }
        Self::count(s, "remove", path)?;
        self.remove(s, path)
    }
}

impl StoreFs for FaultFs {
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        Self::count(&mut s, "create_dir", path)?;
        self.real.create_dir(path)?;
        s.pending.push(Effect::Made {
            path: path.to_path_buf(),
            dir: true,
        });
        Ok(())
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut missing = Vec::new();
        let mut p = path;
        while !p.exists() {
            missing.push(p.to_path_buf());
            match p.parent() {
                Some(up) => p = up,
                None => break,
            }
        }
        for m in missing.iter().rev() {
            self.create_dir(m)?;
        }
        Ok(())
    }

    fn write_new_synced(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let mut s = self.lock();
        Self::count(&mut s, "write", path)?;
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)?;
            s.pending.push(Effect::Made {
                path: path.to_path_buf(),
                dir: false,
            });
            s.pending.push(Effect::Data {
                path: path.to_path_buf(),
            });
            f.write_all(data)?;
        }
        // The data's fdatasync: a second operation, so a cut can fall between the two.
        Self::count(&mut s, "sync_data", path)?;
        std::fs::File::open(path)?.sync_data()?;
        s.pending
            .retain(|e| !matches!(e, Effect::Data { path: p } if p == path));
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.lock();
        Self::count(&mut s, "rename", from)?;
        std::fs::symlink_metadata(from)?;
        let replaced = if std::fs::symlink_metadata(to).is_ok_and(|m| m.is_file()) {
            let stash = self.stash_path(&mut s);
            std::fs::hard_link(to, &stash)?;
            Some(stash)
        } else {
            None
        };
        self.real.rename(from, to)?;
        for earlier in &mut s.pending {
            earlier.rewrite(from, to);
        }
        s.pending.push(Effect::Renamed {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            replaced,
            from_synced: false,
            to_synced: false,
        });
        Ok(())
    }

    fn rename_noreplace(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.lock();
        Self::count(&mut s, "rename", from)?;
        self.real.rename_noreplace(from, to)?;
        for earlier in &mut s.pending {
            earlier.rewrite(from, to);
        }
        s.pending.push(Effect::Renamed {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            replaced: None,
            from_synced: false,
            to_synced: false,
        });
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        Self::count(&mut s, "remove", path)?;
        if std::fs::symlink_metadata(path)?.is_dir() {
            return Err(io::Error::from_raw_os_error(libc::EISDIR));
        }
        self.remove(&mut s, path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        self.remove_tree(&mut s, path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        Self::count(&mut s, "sync_dir", path)?;
        self.real.sync_dir(path)?;
        let mut durable = vec![false; s.pending.len()];
        for (i, e) in s.pending.iter_mut().enumerate() {
            durable[i] = match e {
                Effect::Made { path: p, .. } | Effect::Removed { path: p, .. } => parent(p) == path,
                // File data and times are not made durable by syncing the folder.
                Effect::Data { .. } | Effect::Touched { .. } => false,
                Effect::Renamed {
                    from,
                    to,
                    from_synced,
                    to_synced,
                    ..
                } => {
                    *from_synced |= parent(from) == path;
                    *to_synced |= parent(to) == path;
                    *from_synced && *to_synced
                }
            };
        }
        // What happened earlier inside a folder whose removal is now durable can never come
        // back: the folder's entries went with it.
        for i in 0..s.pending.len() {
            if let (true, Effect::Removed { path: gone, .. }) = (durable[i], &s.pending[i]) {
                let gone = gone.clone();
                for (d, e) in durable.iter_mut().zip(&s.pending).take(i) {
                    if e.paths().iter().any(|q| q.starts_with(&gone) && *q != gone) {
                        *d = true;
                    }
                }
            }
        }
        let mut i = 0;
        s.pending.retain(|e| {
            let keep = !durable[i];
            i += 1;
            if !keep {
                // Stashed copies are only needed to undo what is not durable.
                match e {
                    Effect::Removed { stash, .. } => discard(stash),
                    Effect::Renamed {
                        replaced: Some(r), ..
                    } => discard(r),
                    _ => {}
                }
            }
            keep
        });
        Ok(())
    }

    fn touch(&self, path: &Path) -> io::Result<bool> {
        let mut s = self.lock();
        Self::count(&mut s, "touch", path)?;
        let old = match std::fs::symlink_metadata(path) {
            Ok(m) => m.modified()?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let touched = self.real.touch(path)?;
        if touched {
            s.pending.push(Effect::Touched {
                path: path.to_path_buf(),
                old,
            });
        }
        Ok(touched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, FaultFs, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let f = FaultFs::new(&t.path().join("stash")).unwrap();
        (t, f, root)
    }

    #[test]
    fn power_loss_keeps_only_what_was_made_durable() {
        let (_t, f, root) = setup();
        let d = root.join("d");
        f.create_dir(&d).unwrap();
        f.sync_dir(&root).unwrap();
        f.write_new_synced(&d.join("a"), b"a").unwrap();
        f.sync_dir(&d).unwrap();
        f.write_new_synced(&d.join("b"), b"b").unwrap();
        f.rename(&d.join("a"), &d.join("c")).unwrap();
        std::fs::write(root.join("outside-the-seam"), b"x").unwrap();
        f.crash(Crash::PowerLoss).unwrap();
        assert_eq!(std::fs::read(d.join("a")).unwrap(), b"a");
        assert!(!d.join("b").exists() && !d.join("c").exists());
    }

    #[test]
    fn undone_folder_renames_and_removals_come_back_whole() {
        let (_t, f, root) = setup();
        let (s, g) = (root.join("staging"), root.join("group"));
        f.create_dir(&s).unwrap();
        f.create_dir(&g).unwrap();
        f.write_new_synced(&s.join("index"), b"i").unwrap();
        f.sync_dir(&s).unwrap();
        f.sync_dir(&root).unwrap();
        f.rename_noreplace(&s, &g.join("snap")).unwrap();
        f.write_new_synced(&root.join("x"), b"x").unwrap();
        f.sync_dir(&root).unwrap();
        f.remove_file(&root.join("x")).unwrap();
        f.crash(Crash::PowerLoss).unwrap();
        // The rename was never made durable (the group folder was not synced).
        assert_eq!(std::fs::read(s.join("index")).unwrap(), b"i");
        assert!(!g.join("snap").exists());
        assert_eq!(std::fs::read(root.join("x")).unwrap(), b"x");
    }

    #[test]
    fn a_cut_stops_everything_after_it_and_kill_keeps_what_was_done() {
        let (_t, f, root) = setup();
        f.cut_at(2);
        f.write_new_synced(&root.join("a"), b"a").unwrap_err(); // write ok, sync cut
        assert!(f.is_cut());
        f.create_dir(&root.join("d")).unwrap_err();
        f.crash(Crash::Kill).unwrap();
        assert_eq!(std::fs::read(root.join("a")).unwrap(), b"a");
        assert!(!root.join("d").exists());
        f.create_dir(&root.join("d")).unwrap();
    }

    #[test]
    fn some_lost_effects_take_their_dependents_with_them() {
        for seed in 0..64 {
            let (_t, f, root) = setup();
            f.create_dir(&root.join("d")).unwrap();
            f.write_new_synced(&root.join("d/a"), b"a").unwrap();
            f.rename(&root.join("d/a"), &root.join("d/b")).unwrap();
            f.write_new_synced(&root.join("e"), b"e").unwrap();
            f.crash(Crash::PowerLossSome { seed }).unwrap();
            // Whatever was kept, no effect survives without what it stands on.
            if root.join("d/b").exists() {
                assert!(root.join("d").is_dir());
            }
            assert!(!(root.join("d/a").exists() && root.join("d/b").exists()));
        }
    }

    #[test]
    fn a_failed_operation_fails_once() {
        let (_t, f, root) = setup();
        f.fail_at(1, libc::ENOSPC);
        let e = f.write_new_synced(&root.join("a"), b"a").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        f.write_new_synced(&root.join("b"), b"b").unwrap();
    }

    #[test]
    fn a_cut_can_leave_a_folder_half_removed() {
        let (_t, f, root) = setup();
        let d = root.join("d");
        std::fs::create_dir(&d).unwrap();
        for n in ["a", "b", "c"] {
            std::fs::write(d.join(n), n).unwrap();
        }
        f.cut_at(3); // a and b go, c stays
        f.remove_dir_all(&d).unwrap_err();
        f.crash(Crash::Kill).unwrap();
        let left: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["c"]);
        f.remove_dir_all(&d).unwrap();
        f.crash(Crash::PowerLoss).unwrap();
        assert_eq!(std::fs::read(d.join("c")).unwrap(), b"c");
    }

    #[test]
    fn a_power_cut_forgets_touches_and_empties_unsynced_data() {
        let (_t, f, root) = setup();
        let p = root.join("chunk");
        std::fs::write(&p, b"x").unwrap();
        let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1000);
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert!(f.touch(&p).unwrap());
        assert!(!f.touch(&root.join("missing")).unwrap());
        assert!(std::fs::metadata(&p).unwrap().modified().unwrap() > old);
        // The sync of the data fails; the folder sync after it makes the name durable.
        f.fail_at(2, libc::EIO);
        f.write_new_synced(&root.join("t"), b"data").unwrap_err();
        f.sync_dir(&root).unwrap();
        f.crash(Crash::PowerLoss).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().modified().unwrap(), old);
        assert_eq!(std::fs::read(root.join("t")).unwrap(), b"");
        // A killed process loses neither.
        assert!(f.touch(&p).unwrap());
        f.cut_at(2);
        f.write_new_synced(&root.join("u"), b"data").unwrap_err();
        f.crash(Crash::Kill).unwrap();
        assert_eq!(std::fs::read(root.join("u")).unwrap(), b"data");
        assert!(std::fs::metadata(&p).unwrap().modified().unwrap() > old);
    }
}

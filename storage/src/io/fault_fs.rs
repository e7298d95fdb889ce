//! The fault-injecting engine's small files (feature `test-utils`): an in-memory
//! [`FileSystem`] beside a [`super::fault::FaultDevice`], for the files a device keeps next to
//! it (the sidecar of its dirty bitmaps, `crate::bitmap::store`). It exists because those files
//! are ordered against the device's writes — "the file says *in use* before the first write is
//! accepted" — and only a power cut that hits both can test that order.
//!
//! Every call is one operation of the device (kind [`OpKind::File`]; `write_new_synced` is two:
//! the write, then its fsync), counted with the device's reads, writes and flushes, so that
//! `crash_at_op`, `fail_nth(OpKind::File, ..)` and `fail_nth_op` reach them too. What a power cut
//! keeps follows POSIX, with a journaling file system's order:
//!
//! - a file's data is durable once it has been fsync'd; data written since is lost
//!   ([`LossMode::DropUnflushed`]), or kept whole, not at all or torn at 512-byte sectors
//!   ([`LossMode::TearAndReorder`]);
//! - a new name, a rename or a removal is durable once its directory has been fsync'd, which
//!   also makes every earlier such change durable (a journal commits in order); otherwise it is
//!   lost ([`LossMode::DropUnflushed`]), or the changes up to a random point survive
//!   ([`LossMode::TearAndReorder`]) — a rename without the directory's fsync may leave the old
//!   file in place.
//!
//! Directories are not modelled: every directory exists (`create_dir_all` only counts).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::durable::{parent_dir, FileSystem};
use crate::error::StorageError;
use crate::io::fault::{LossMode, OpKind, Shared};

/// A file's contents and what of them is durable.
#[derive(Clone, Debug)]
struct Inode {
    data: Vec<u8>,
    synced: Vec<u8>,
}

/// One change to the names: each path now names this inode, or nothing.
type NameChange = Vec<(PathBuf, Option<usize>)>;

/// The files: what reads see, and what a power cut would keep.
#[derive(Clone, Debug, Default)]
pub(crate) struct Files {
    inodes: Vec<Inode>,
    names: BTreeMap<PathBuf, usize>,
    durable: BTreeMap<PathBuf, usize>,
    /// Changes to the names since they were last made durable, oldest first.
    pending: Vec<NameChange>,
}

fn apply(names: &mut BTreeMap<PathBuf, usize>, change: &NameChange) {
    for (path, inode) in change {
        match inode {
            Some(i) => names.insert(path.clone(), *i),
            None => names.remove(path),
        };
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} does not exist", path.display()),
    )
}

impl Files {
    /// The contents of `path`, if it exists.
    pub(crate) fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        self.names.get(path).map(|&i| self.inodes[i].data.clone())
    }

    /// Every path, in order.
    pub(crate) fn names(&self) -> Vec<PathBuf> {
        self.names.keys().cloned().collect()
    }

    fn change(&mut self, change: NameChange) {
        apply(&mut self.names, &change);
        self.pending.push(change);
    }

    fn inode_of(&self, path: &Path) -> io::Result<usize> {
        self.names.get(path).copied().ok_or_else(|| not_found(path))
    }

    fn rename(&mut self, from: &Path, to: &Path, replace: bool) -> io::Result<()> {
        let i = self.inode_of(from)?;
        if !replace && self.names.contains_key(to) {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        if from != to {
            self.change(vec![
                (from.to_path_buf(), None),
                (to.to_path_buf(), Some(i)),
            ]);
        }
        Ok(())
    }

    /// Makes durable every pending change up to the last one in `dir`.
    fn sync_dir(&mut self, dir: &Path) {
        let last = self
            .pending
            .iter()
            .rposition(|c| c.iter().any(|(p, _)| parent_dir(p) == dir));
        if let Some(last) = last {
            for change in self.pending.drain(..=last) {
                apply(&mut self.durable, &change);
            }
        }
    }

    /// What a power cut at operation `ops` leaves (see the module documentation): the new
    /// machine's files, all durable.
    pub(crate) fn after_power_loss(&self, loss: LossMode, ops: u64) -> Files {
        let mut rng = match loss {
            LossMode::DropUnflushed => None,
            LossMode::TearAndReorder { seed } => Some(fastrand::Rng::with_seed(
                seed ^ ops.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0xf11e,
            )),
        };
        let mut names = self.durable.clone();
        let kept = rng.as_mut().map_or(0, |r| r.usize(..=self.pending.len()));
        for change in &self.pending[..kept] {
            apply(&mut names, change);
        }
        let mut out = Files::default();
        for (path, i) in names {
            let inode = &self.inodes[i];
            let data = match rng.as_mut() {
                _ if inode.data == inode.synced => inode.synced.clone(),
                None => inode.synced.clone(),
                Some(r) => match r.u8(..3) {
                    0 => inode.synced.clone(),
                    1 => inode.data.clone(),
                    _ => torn(&inode.synced, &inode.data, r),
                },
            };
            out.durable.insert(path.clone(), out.inodes.len());
            out.names.insert(path, out.inodes.len());
            out.inodes.push(Inode {
                synced: data.clone(),
                data,
            });
        }
        out
    }
}

/// `new` written over `old` with only some of its 512-byte sectors landed.
fn torn(old: &[u8], new: &[u8], rng: &mut fastrand::Rng) -> Vec<u8> {
    let mut out = old.to_vec();
    out.resize(new.len(), 0);
    for (i, sector) in new.chunks(512).enumerate() {
        if rng.bool() {
            out[i * 512..][..sector.len()].copy_from_slice(sector);
        }
    }
    out
}

/// The fault-injecting file system; see the module documentation. Made by
/// [`super::fault::FaultController::files`].
#[derive(Debug)]
pub struct FaultFs {
    shared: Arc<Shared>,
}

impl FaultFs {
    pub(crate) fn new(shared: Arc<Shared>) -> FaultFs {
        FaultFs { shared }
    }

    /// Counts one operation (which may fail or lose power) and runs `f` on the files.
    fn op<T>(&self, f: impl FnOnce(&mut Files) -> io::Result<T>) -> io::Result<T> {
        let mut st = self.shared.state();
        self.shared
            .begin(&mut st, OpKind::File)
            .map_err(|e| match e {
                StorageError::Unavailable(m) => io::Error::other(m),
                other => io::Error::from_raw_os_error(other.errno()),
            })?;
        f(&mut st.files)
    }
}

impl FileSystem for FaultFs {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.op(|fs| fs.contents(path).ok_or_else(|| not_found(path)))
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        self.op(|fs| Ok(fs.names.contains_key(path)))
    }

    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        self.op(|_| Ok(()))
    }

    fn write_new_synced(&self, path: &Path, data: &[u8], _mode: u32) -> io::Result<()> {
        let i = self.op(|fs| {
            if fs.names.contains_key(path) {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
            fs.inodes.push(Inode {
                data: data.to_vec(),
                synced: Vec::new(),
            });
            let i = fs.inodes.len() - 1;
            fs.change(vec![(path.to_path_buf(), Some(i))]);
            Ok(i)
        })?;
        self.op(|fs| {
            let inode = &mut fs.inodes[i];
            inode.synced = inode.data.clone();
            Ok(())
        })
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.op(|fs| fs.rename(from, to, true))
    }

    fn rename_noreplace(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.op(|fs| fs.rename(from, to, false))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.op(|fs| {
            fs.inode_of(path)?;
            fs.change(vec![(path.to_path_buf(), None)]);
            Ok(())
        })
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.op(|fs| {
            fs.sync_dir(dir);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::HostFile;
    use crate::durable::{write_atomically_on, Create};
    use crate::io::fault::{Fault, FaultDevice};

    #[test]
    fn a_replaced_file_is_old_or_new_at_every_cut_and_new_once_replaced() {
        let p = Path::new("/d/f");
        for loss in [
            LossMode::DropUnflushed,
            LossMode::TearAndReorder { seed: 3 },
        ] {
            let (_, ctl) = FaultDevice::new(0);
            write_atomically_on(ctl.files().as_ref(), p, b"old", 0o644, Create::New).unwrap();
            let base = ctl.power_loss();
            // write, fsync, rename, fsync of the directory
            for n in 1..=5 {
                let (_, ctl) = FaultDevice::from_durable(&base);
                ctl.set_loss_mode(loss);
                ctl.crash_at_op(n);
                let r = write_atomically_on(
                    ctl.files().as_ref(),
                    p,
                    &[7u8; 5000],
                    0o644,
                    Create::OrReplace,
                );
                let got = ctl.power_loss().file(p).unwrap();
                if r.is_ok() {
                    assert_eq!(got, vec![7u8; 5000], "{loss:?}, cut at {n}");
                } else {
                    assert!(
                        got == b"old" || got == vec![7u8; 5000],
                        "{loss:?}, cut at {n}"
                    );
                }
            }
        }
    }

    #[test]
    fn what_is_not_synced_is_lost_or_torn() {
        let (_, ctl) = FaultDevice::new(0);
        let fs = ctl.files();
        fs.write_new_synced(Path::new("/d/a"), b"a", 0o644).unwrap();
        fs.sync_dir(Path::new("/d")).unwrap();
        // A rename without the directory's fsync is lost.
        fs.write_new_synced(Path::new("/d/b"), b"b", 0o644).unwrap();
        fs.rename(Path::new("/d/b"), Path::new("/d/a")).unwrap();
        assert_eq!(fs.read(Path::new("/d/a")).unwrap(), b"b");
        let image = ctl.power_loss();
        assert_eq!(image.file(Path::new("/d/a")).unwrap(), b"a");
        assert_eq!(image.file_names(), vec![PathBuf::from("/d/a")]);
        assert!(fs.read(Path::new("/d/a")).is_err(), "a dead machine reads");
        // A new file cut at its fsync: in the torn mode its name may survive, with its data
        // empty, whole or torn; all four are seen.
        let (mut gone, mut empty, mut whole, mut torn) = (0, 0, 0, 0);
        for seed in 0..80 {
            let (_, ctl) = FaultDevice::from_durable(&image);
            ctl.set_loss_mode(LossMode::TearAndReorder { seed });
            ctl.fail_nth(OpKind::File, 2, Fault::PowerLoss);
            let c = Path::new("/d/c");
            assert!(ctl
                .files()
                .write_new_synced(c, &[9u8; 4096], 0o644)
                .is_err());
            match ctl.durable_image().unwrap().file(c) {
                None => gone += 1,
                Some(d) if d.is_empty() => empty += 1,
                Some(d) if d == [9u8; 4096] => whole += 1,
                Some(d) => {
                    assert!(d.chunks(512).all(|s| s == [0u8; 512] || s == [9u8; 512]));
                    torn += 1;
                }
            }
        }
        assert!(
            gone > 0 && empty > 0 && whole > 0 && torn > 0,
            "{gone} {empty} {whole} {torn}"
        );
    }

    #[test]
    fn file_operations_count_with_the_device_and_fail_as_asked() {
        let (dev, ctl) = FaultDevice::new(1 << 16);
        let fs = ctl.files();
        ctl.fail_nth(OpKind::File, 2, Fault::Eio);
        dev.write_all_at(0, b"x").unwrap();
        let e = fs
            .write_new_synced(Path::new("/f"), b"f", 0o644)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "the fsync fails");
        assert_eq!((ctl.ops(), ctl.ops_of(OpKind::File)), (3, 2));
        ctl.fail_nth(OpKind::File, 1, Fault::PowerLoss);
        assert!(fs.remove_file(Path::new("/f")).is_err());
        assert!(ctl.crashed());
        assert!(dev.write_all_at(0, b"y").is_err());
    }
}

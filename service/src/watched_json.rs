//! A small JSON record file that the server keeps in memory and rereads when another process
//! (a CLI command next to a running server) replaced it: local users, for example.
//!
//! The file is replaced atomically ([`super::write_atomically`], owner-only) and a change is
//! noticed by its modification time and length.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{write_atomically, ServiceError, ServiceResult};

/// Largest record file read back (a damaged or hostile file is refused, not loaded).
const MAX_FILE_BYTES: u64 = 16 << 20;

#[derive(Debug, Default)]
struct Loaded<T> {
    value: T,
    /// Modification time and length when read.
    stamp: Option<(SystemTime, u64)>,
}

/// A JSON file of type `T` (its `Default` when the file does not exist).
#[derive(Debug)]
pub struct WatchedJson<T> {
    path: PathBuf,
    state: Mutex<Loaded<T>>,
}

/// The file's contents, locked; [`Guard::save`] writes changes back.
#[derive(Debug)]
pub struct Guard<'a, T: Serialize> {
    file: &'a WatchedJson<T>,
    loaded: MutexGuard<'a, Loaded<T>>,
}

fn stamp_of(path: &Path) -> ServiceResult<Option<(SystemTime, u64)>> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(Some((m.modified().unwrap_or(UNIX_EPOCH), m.len()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ServiceError::internal(format!(
            "Reading {}: {e}",
            path.display()
        ))),
    }
}

impl<T: Default + Serialize + DeserializeOwned> WatchedJson<T> {
    /// Opens the file at `path` (it need not exist yet) and reads it.
    pub fn open(path: PathBuf) -> ServiceResult<WatchedJson<T>> {
        let file = WatchedJson {
            path,
            state: Mutex::new(Loaded {
                value: T::default(),
                stamp: None,
            }),
        };
        file.lock()?;
        Ok(file)
    }

    /// The contents, reread first if the file changed since it was last read.
    pub fn lock(&self) -> ServiceResult<Guard<'_, T>> {
        let stamp = stamp_of(&self.path)?;
        let mut loaded = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if loaded.stamp != stamp || stamp.is_none() {
            loaded.value = match stamp {
                None => T::default(),
                Some((_, len)) if len > MAX_FILE_BYTES => {
                    return Err(ServiceError::internal(format!(
                        "{} is larger than {MAX_FILE_BYTES} bytes",
                        self.path.display()
                    )))
                }
                Some(_) => {
                    let text = std::fs::read(&self.path).map_err(|e| {
                        ServiceError::internal(format!("Reading {}: {e}", self.path.display()))
                    })?;
                    serde_json::from_slice(&text).map_err(|e| {
                        ServiceError::internal(format!("{} is damaged: {e}", self.path.display()))
                    })?
                }
            };
            loaded.stamp = stamp;
        }
        Ok(Guard { file: self, loaded })
    }
}

impl<T: Serialize> Guard<'_, T> {
    /// The contents.
    pub fn get(&self) -> &T {
        &self.loaded.value
    }

    /// The contents, to change and then [`Guard::save`].
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.loaded.value
    }

    /// Writes the contents back atomically.
    pub fn save(&mut self) -> ServiceResult<()> {
        let text = serde_json::to_vec_pretty(&self.loaded.value)
            .map_err(|e| ServiceError::internal(e.to_string()))?;
        write_atomically(&self.file.path, &text)?;
        self.loaded.stamp = stamp_of(&self.file.path)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_by_another_handle_are_seen_and_damage_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("list.json");
        let a: WatchedJson<Vec<String>> = WatchedJson::open(path.clone()).unwrap();
        let b: WatchedJson<Vec<String>> = WatchedJson::open(path.clone()).unwrap();
        assert!(a.lock().unwrap().get().is_empty());
        {
            let mut g = a.lock().unwrap();
            g.get_mut().push("one".into());
            g.save().unwrap();
        }
        assert_eq!(b.lock().unwrap().get(), &vec!["one".to_string()]);
        std::fs::write(&path, b"{not json").unwrap();
        let e = b.lock().unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
    }
}

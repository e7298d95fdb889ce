//! A small JSON list file of a data directory, `{"format": 1, "KEY": [ ... ]}`, replaced
//! atomically (temporary file, fsync, rename, fsync of the directory) under an exclusive lock on
//! `DATA/devices.lock`, so that concurrent commands don't lose each other's entries. The devices
//! file and the RBD groups file are two of them.

use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::durable::{write_atomically, Create};
use crate::error::{Result, StorageError};
use crate::volume::lock::lock_exclusive_wait;

const LOCK_NAME: &str = "devices.lock";
const FORMAT: u64 = 1;

/// One list file. See the module documentation.
#[derive(Clone, Debug)]
pub(crate) struct ListFile {
    pub dir: PathBuf,
    /// File name in the data directory.
    pub name: &'static str,
    /// The key of the list.
    pub key: &'static str,
    /// What the file is, for messages ("devices file").
    pub what: &'static str,
    /// Most entries accepted.
    pub max: usize,
}

impl ListFile {
    pub fn path(&self) -> PathBuf {
        self.dir.join(self.name)
    }

    /// The entries (none if the file does not exist yet).
    pub fn load<T: DeserializeOwned>(&self) -> Result<Vec<T>> {
        let path = self.path();
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StorageError::io(format!("Reading {}", path.display()), e)),
        };
        let corrupt = |why: String| StorageError::corrupt(path.display().to_string(), why);
        let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&text)
            .map_err(|e| corrupt(format!("not a {}: {e}", self.what)))?;
        let format = v.get("format").and_then(|f| f.as_u64());
        if format != Some(FORMAT) {
            return Err(StorageError::Unsupported(format!(
                "{} format {format:?} in {}",
                self.what,
                path.display()
            )));
        }
        let list = v
            .remove(self.key)
            .unwrap_or_else(|| serde_json::Value::Array(Vec::new()));
        if list.as_array().is_some_and(|a| a.len() > self.max) {
            return Err(corrupt(format!("more than {} entries", self.max)));
        }
        serde_json::from_value(list).map_err(|e| corrupt(format!("not a {}: {e}", self.what)))
    }

    /// Loads, changes and atomically saves the list under the data directory's lock.
    pub fn update<T: Serialize + DeserializeOwned, R>(
        &self,
        change: impl FnOnce(&mut Vec<T>) -> Result<R>,
    ) -> Result<R> {
        std::fs::create_dir_all(&self.dir).map_err(|e| {
            StorageError::io(format!("Creating data directory {}", self.dir.display()), e)
        })?;
        let _lock = lock_exclusive_wait(&self.dir.join(LOCK_NAME))?;
        let mut list = self.load()?;
        let out = change(&mut list)?;
        let mut doc = serde_json::Map::new();
        doc.insert("format".into(), FORMAT.into());
        doc.insert(
            self.key.into(),
            serde_json::to_value(&list).map_err(|e| {
                StorageError::InvalidInput(format!("Encoding the {}: {e}", self.what))
            })?,
        );
        let text = serde_json::to_vec_pretty(&doc)
            .map_err(|e| StorageError::InvalidInput(format!("Encoding the {}: {e}", self.what)))?;
        write_atomically(&self.path(), &text, 0o644, Create::OrReplace)?;
        Ok(out)
    }
}

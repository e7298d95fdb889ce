//! VHDX (placeholder while it is written).
pub mod create;
use crate::device::SharedFile;
use crate::error::{Result, StorageError};
use crate::format::{Image, OpenOptions};
use std::path::Path;
use std::sync::Arc;
/// Opens a VHDX.
pub fn open(
    _file: SharedFile,
    _path: Option<&Path>,
    _opts: &OpenOptions,
) -> Result<Arc<dyn Image>> {
    Err(StorageError::Unsupported("vhdx".into()))
}

//! placeholder
use crate::error::{Result, StorageError};
use std::collections::BTreeMap;
use std::path::Path;
/// Options.
#[derive(Debug)]
pub struct VhdxCreateOptions;
impl VhdxCreateOptions {
    /// Parses.
    pub fn from_map(_m: &BTreeMap<String, String>) -> Result<Self> {
        Ok(VhdxCreateOptions)
    }
}
/// Creates.
pub fn create(_p: &Path, _s: u64, _o: &VhdxCreateOptions) -> Result<()> {
    Err(StorageError::Unsupported("vhdx".into()))
}

//! Opening what an export serves, by the names the CLI uses: a volume or volume snapshot
//! `lv:VG/NAME`, a backup snapshot `backup:ID/TIME` (or `backup:ID` for the group's latest), or
//! an image file. Volumes and images come with their dirty bitmaps; a backup is read lazily
//! through [`strata_backup::SnapshotDevice`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use strata_backup::{Datastore, SnapshotDevice};
use strata_storage::bitmap::attach_image_bitmaps;
use strata_storage::format::{open_image, ImageFormat, OpenOptions};
use strata_storage::source::{open_source, Source, LV_PREFIX};

use crate::error::{NbdError, Result};
use crate::export::{Access, ExportConfig};

/// The prefix naming a backup snapshot.
pub const BACKUP_PREFIX: &str = "backup:";

/// How to open an export's source.
#[derive(Clone, Debug)]
pub struct OpenSettings {
    /// Open read-only (snapshots and backups always are).
    pub read_only: bool,
    /// The data directory (volume groups, bitmaps).
    pub data_dir: PathBuf,
    /// An image's format; probed from its first bytes when `None` (only for images an
    /// administrator names: appliance images pass their recorded format).
    pub format: Option<ImageFormat>,
    /// The datastore for `backup:` sources (default `DATA/datastore`).
    pub datastore: Option<PathBuf>,
    /// Bytes of decoded chunks a backup export keeps in memory.
    pub backup_cache_bytes: u64,
}

impl OpenSettings {
    /// Settings for sources under `data_dir`.
    pub fn new(data_dir: &Path) -> OpenSettings {
        OpenSettings {
            read_only: false,
            data_dir: data_dir.to_path_buf(),
            format: None,
            datastore: None,
            backup_cache_bytes: strata_backup::lazy::DEFAULT_CACHE_BYTES,
        }
    }
}

/// Opens `spec` as an export named `name` with access rule `access`.
pub fn open_export(
    name: &str,
    spec: &str,
    settings: &OpenSettings,
    access: Access,
) -> Result<ExportConfig> {
    if let Some(snapshot) = spec.strip_prefix(BACKUP_PREFIX) {
        let root = settings
            .datastore
            .clone()
            .unwrap_or_else(|| settings.data_dir.join("datastore"));
        let store = Datastore::open(&root)?;
        let snap = store.resolve(snapshot)?;
        let device = SnapshotDevice::open(&store, &snap, settings.backup_cache_bytes)?;
        return Ok(ExportConfig {
            name: name.to_string(),
            description: format!("{BACKUP_PREFIX}{snap}"),
            device: Arc::new(device),
            read_only: true,
            bitmaps: None,
            access,
            keep_alive: None,
        });
    }
    let opts = OpenOptions {
        format: settings.format,
        read_only: settings.read_only,
        ..OpenOptions::default()
    };
    if spec.starts_with(LV_PREFIX) {
        let source = open_source(spec, &opts, &settings.data_dir)?;
        let Source::Volume {
            vg, name: lv_name, ..
        } = &source
        else {
            return Err(NbdError::InvalidConfig(format!("{spec} is not a volume")));
        };
        let lv = lv_name.split_once('/').map_or(lv_name.as_str(), |(_, l)| l);
        // A volume under live restore is served through the live-restore device (its workers
        // continue the copy while the export is open).
        let device = strata_backup::live::wrap_source(
            &source,
            &settings.data_dir,
            strata_backup::live::LiveOptions::default(),
        )?
        .device();
        // Groups opened without a data directory, and RBD groups, have no bitmaps: none then.
        let bitmaps = vg
            .local("export dirty bitmaps of")
            .and_then(|g| g.bitmaps(lv))
            .ok();
        return Ok(ExportConfig {
            name: name.to_string(),
            description: source.describe(),
            device,
            read_only: settings.read_only,
            bitmaps,
            access,
            keep_alive: Some(Box::new(source)),
        });
    }
    let path = PathBuf::from(spec);
    let image = open_image(&path, &opts)?;
    let description = std::fs::canonicalize(&path)
        .unwrap_or(path.clone())
        .display()
        .to_string();
    let tracked = attach_image_bitmaps(image, &path)?;
    let device = tracked.device().clone();
    let bitmaps = tracked.bitmaps().cloned();
    let keep_alive: Option<Box<dyn std::any::Any + Send + Sync>> = Some(Box::new(tracked));
    Ok(ExportConfig {
        name: name.to_string(),
        description,
        device,
        read_only: settings.read_only,
        bitmaps,
        access,
        keep_alive,
    })
}

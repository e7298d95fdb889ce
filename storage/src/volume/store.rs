//! Volume groups on this machine, found through the devices file of a data directory: creating
//! PVs, listing and opening groups by name, with the locking that keeps two processes from using
//! one group at once (exclusive `flock` on every PV of the group; read-only opens take a shared
//! one).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::device::{HostFile, SharedFile};
use crate::error::{Result, StorageError};
use crate::io::engine::{EngineChoice, FileDevice};
use crate::io::file::{CacheMode, FileOptions};
use crate::volume::devices::{DeviceEntry, DevicesFile};
use crate::volume::label::{read_label, Label, MIN_PV_SIZE};
use crate::volume::lock::try_lock;
use crate::volume::mda;
use crate::volume::meta::VgMeta;
use crate::volume::vg::{PvHandle, Vg, VgOptions};

/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/strata";

/// The data directory: `explicit`, else `$STRATA_DATA`, else [`DEFAULT_DATA_DIR`].
pub fn resolve_data_dir(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    match std::env::var_os("STRATA_DATA") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from(DEFAULT_DATA_DIR),
    }
}

/// A registered PV, for listings.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PvSummary {
    /// Path.
    pub path: String,
    /// Identifier from its label (empty if unreadable).
    pub uuid: String,
    /// Device size.
    pub size: u64,
    /// The group it belongs to, if any.
    pub vg: Option<String>,
    /// What is wrong with it, if anything.
    pub problem: Option<String>,
}

/// A volume group, as listed without opening it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VgSummary {
    /// Name.
    pub name: String,
    /// Identifier.
    pub uuid: String,
    /// Metadata sequence number.
    pub seqno: u64,
    /// PVs in its metadata.
    pub pv_count: usize,
    /// Identifiers of PVs not found among the registered devices.
    pub missing_pvs: Vec<String>,
    /// Bytes of extents.
    pub size: u64,
    /// Bytes free.
    pub free: u64,
    /// Linear volumes and pools (thin volumes live in the pools).
    pub lv_count: usize,
}

struct Surveyed {
    path: PathBuf,
    file: Option<Arc<FileDevice>>,
    label: Option<Label>,
    meta: Option<(u64, VgMeta)>,
    problem: Option<String>,
}

/// The volume groups of a data directory. See the module documentation.
#[derive(Clone, Debug)]
pub struct VolumeStore {
    data_dir: PathBuf,
    engine: EngineChoice,
    cache: CacheMode,
}

fn open_file(path: &Path, read_only: bool) -> Result<Arc<FileDevice>> {
    let opts = FileOptions {
        read_only,
        cache: if read_only {
            CacheMode::Writeback
        } else {
            CacheMode::None
        },
    };
    FileDevice::open(path, opts, EngineChoice::Auto)
}

impl VolumeStore {
    /// The store in `data_dir`.
    pub fn new(data_dir: &Path) -> VolumeStore {
        VolumeStore {
            data_dir: data_dir.to_path_buf(),
            engine: EngineChoice::Auto,
            cache: CacheMode::None,
        }
    }

    /// Uses `engine` and `cache` for the PVs of groups this store opens (default: automatic
    /// engine, O_DIRECT).
    pub fn with_io(mut self, engine: EngineChoice, cache: CacheMode) -> VolumeStore {
        self.engine = engine;
        self.cache = cache;
        self
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The devices file.
    pub fn devices(&self) -> DevicesFile {
        DevicesFile::new(&self.data_dir)
    }

    fn options(&self, read_only: bool) -> VgOptions {
        VgOptions {
            read_only,
            bitmap_dir: Some(self.data_dir.join("bitmaps")),
            bitmap_fs: None,
        }
    }

    /// Labels `path` as a PV and registers it. A missing file is created with `size` bytes when
    /// given; a device that already carries a label is refused.
    pub fn pv_create(&self, path: &Path, size: Option<u64>) -> Result<PvSummary> {
        if !path.exists() {
            let Some(size) = size else {
                return Err(StorageError::NotFound(path.to_path_buf()));
            };
            if size < MIN_PV_SIZE {
                return Err(StorageError::InvalidInput(format!(
                    "A PV needs at least {MIN_PV_SIZE} bytes"
                )));
            }
            crate::format::raw::create(path, size, &Default::default())?;
        }
        let path = path
            .canonicalize()
            .map_err(|e| StorageError::io(format!("Resolving {}", path.display()), e))?;
        let _lock = try_lock(&path, &format!("PV {}", path.display()), true)?;
        let file = open_file(&path, false)?;
        let label = crate::volume::vg::format_pv(file.as_ref())?;
        let uuid = label.uuid.clone();
        self.devices().update(|list| {
            list.retain(|e| e.path != path);
            list.push(DeviceEntry {
                path: path.clone(),
                pv: uuid.clone(),
            });
            Ok(())
        })?;
        Ok(PvSummary {
            path: path.display().to_string(),
            uuid,
            size: file.len(),
            vg: None,
            problem: None,
        })
    }

    /// Removes the label of a PV that belongs to no group and unregisters it.
    pub fn pv_remove(&self, path: &Path) -> Result<()> {
        let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        if path.exists() {
            let _lock = try_lock(&path, &format!("PV {}", path.display()), true)?;
            let file = open_file(&path, false)?;
            let l = read_label(file.as_ref())?;
            let slots = mda::read_area(file.as_ref(), &l.label)?;
            if let Some((_, uuid, payload)) = mda::newest(&slots) {
                let group = VgMeta::decode(payload, &path.display().to_string())
                    .map_or_else(|_| uuid.to_string(), |m| m.name);
                return Err(StorageError::InvalidInput(format!(
                    "{} belongs to volume group {group}; reduce or remove the group first",
                    path.display()
                )));
            }
            file.write_all_at(0, &[0u8; 8192])?;
            file.sync_data()?;
        }
        self.devices().update(|list| {
            let before = list.len();
            list.retain(|e| e.path != path);
            if list.len() == before {
                return Err(StorageError::NotFound(path.clone()));
            }
            Ok(())
        })
    }

    fn survey(&self) -> Result<Vec<Surveyed>> {
        let mut out = Vec::new();
        for e in self.devices().load()? {
            let mut s = Surveyed {
                path: e.path.clone(),
                file: None,
                label: None,
                meta: None,
                problem: None,
            };
            match open_file(&e.path, true) {
                Err(err) => s.problem = Some(err.to_string()),
                Ok(f) => {
                    match read_label(f.as_ref()) {
                        Err(err) => s.problem = Some(err.to_string()),
                        Ok(l) => {
                            match mda::read_area(f.as_ref(), &l.label) {
                                Err(err) => s.problem = Some(err.to_string()),
                                Ok(slots) => {
                                    if let Some((seq, _, payload)) = mda::newest(&slots) {
                                        match VgMeta::decode(payload, &e.path.display().to_string())
                                        {
                                            Ok(m) => s.meta = Some((seq, m)),
                                            Err(err) => s.problem = Some(err.to_string()),
                                        }
                                    }
                                }
                            }
                            s.label = Some(l.label);
                        }
                    }
                    s.file = Some(f);
                }
            }
            out.push(s);
        }
        Ok(out)
    }

    /// Registered PVs.
    pub fn pv_list(&self) -> Result<Vec<PvSummary>> {
        Ok(self
            .survey()?
            .into_iter()
            .map(|s| PvSummary {
                path: s.path.display().to_string(),
                uuid: s.label.as_ref().map(|l| l.uuid.clone()).unwrap_or_default(),
                size: s.file.as_ref().map_or(0, |f| f.len()),
                vg: s.meta.as_ref().map(|(_, m)| m.name.clone()),
                problem: s.problem,
            })
            .collect())
    }

    /// The newest metadata of every group the registered devices hold.
    fn groups(surveyed: &[Surveyed]) -> HashMap<String, VgMeta> {
        let mut best: HashMap<String, (u64, VgMeta)> = HashMap::new();
        for s in surveyed {
            if let Some((seq, m)) = &s.meta {
                if best.get(&m.uuid).is_none_or(|(b, _)| b < seq) {
                    best.insert(m.uuid.clone(), (*seq, m.clone()));
                }
            }
        }
        best.into_iter().map(|(k, (_, m))| (k, m)).collect()
    }

    /// Every group, read without opening or locking it.
    pub fn vg_list(&self) -> Result<Vec<VgSummary>> {
        let surveyed = self.survey()?;
        let present: Vec<String> = surveyed
            .iter()
            .filter_map(|s| s.label.as_ref().map(|l| l.uuid.clone()))
            .collect();
        let mut out: Vec<VgSummary> = Self::groups(&surveyed)
            .into_values()
            .map(|m| VgSummary {
                name: m.name.clone(),
                uuid: m.uuid.clone(),
                seqno: m.seqno,
                pv_count: m.pvs.len(),
                missing_pvs: m
                    .pvs
                    .iter()
                    .filter(|p| !present.contains(&p.uuid))
                    .map(|p| p.uuid.clone())
                    .collect(),
                size: m.pvs.iter().map(|p| p.pe_count).sum::<u64>() * m.extent_size,
                free: m.free_extents() * m.extent_size,
                lv_count: m.lvs.iter().filter(|l| !l.hidden).count(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn handles(&self, paths: &[PathBuf], what: &str, read_only: bool) -> Result<Vec<PvHandle>> {
        let mut out = Vec::new();
        for p in paths {
            let lock = try_lock(p, what, !read_only)?;
            let opts = FileOptions {
                read_only,
                cache: self.cache,
            };
            let file: SharedFile = FileDevice::open(p, opts, self.engine)?;
            out.push(PvHandle {
                file,
                path: Some(p.clone()),
                lock: Some(lock),
            });
        }
        Ok(out)
    }

    /// Resolves `paths` to registered PVs, each once.
    fn registered(surveyed: &[Surveyed], paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
        let mut resolved = Vec::new();
        for p in paths {
            let c = p
                .canonicalize()
                .map_err(|_| StorageError::NotFound(p.clone()))?;
            if !surveyed.iter().any(|s| s.path == c) {
                return Err(StorageError::InvalidInput(format!(
                    "{} is not a registered PV (run `strata pv create` on it first)",
                    p.display()
                )));
            }
            if resolved.contains(&c) {
                return Err(StorageError::InvalidInput(format!(
                    "{} is given twice",
                    p.display()
                )));
            }
            resolved.push(c);
        }
        Ok(resolved)
    }

    /// Creates group `name` on registered PVs at `paths`.
    pub fn vg_create(&self, name: &str, paths: &[PathBuf], extent_size: u64) -> Result<Vg> {
        crate::volume::name::check_name(name, crate::volume::name::NameKind::VolumeGroup)?;
        let surveyed = self.survey()?;
        if Self::groups(&surveyed).values().any(|m| m.name == name) {
            return Err(StorageError::AlreadyExists(format!("volume group {name}")));
        }
        let resolved = Self::registered(&surveyed, paths)?;
        let handles = self.handles(&resolved, &format!("PV for volume group {name}"), false)?;
        Vg::create(name, handles, extent_size, self.options(false))
    }

    /// Opens group `name`: exclusively, or shared and read-only.
    pub fn open_vg(&self, name: &str, read_only: bool) -> Result<Vg> {
        crate::volume::name::check_name(name, crate::volume::name::NameKind::VolumeGroup)?;
        let surveyed = self.survey()?;
        let groups = Self::groups(&surveyed);
        let mut named: Vec<&VgMeta> = groups.values().filter(|m| m.name == name).collect();
        let meta = match named.len() {
            0 => {
                let problems: Vec<String> = surveyed
                    .iter()
                    .filter_map(|s| {
                        s.problem
                            .as_ref()
                            .map(|p| format!("{}: {p}", s.path.display()))
                    })
                    .collect();
                let mut what = format!("volume group {name}");
                if !problems.is_empty() {
                    what.push_str(&format!(
                        " (devices that could not be read: {})",
                        problems.join("; ")
                    ));
                }
                return Err(StorageError::NotFound(PathBuf::from(what)));
            }
            1 => named.remove(0),
            _ => {
                return Err(StorageError::InvalidInput(format!(
                    "Two volume groups are named {name}"
                )))
            }
        };
        let members: Vec<PathBuf> = surveyed
            .iter()
            .filter(|s| {
                s.label
                    .as_ref()
                    .is_some_and(|l| meta.pv_index(&l.uuid).is_some())
            })
            .map(|s| s.path.clone())
            .collect();
        drop(surveyed);
        let handles = self.handles(&members, &format!("volume group {name}"), read_only)?;
        Vg::open(handles, name, self.options(read_only))
    }

    /// Extends group `vg` with registered PVs at `paths`.
    pub fn vg_extend(&self, vg: &Vg, paths: &[PathBuf]) -> Result<()> {
        let surveyed = self.survey()?;
        let resolved = Self::registered(&surveyed, paths)?;
        drop(surveyed);
        let handles = self.handles(
            &resolved,
            &format!("PV for volume group {}", vg.name()),
            false,
        )?;
        vg.extend(handles)
    }
}

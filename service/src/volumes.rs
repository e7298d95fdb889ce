//! Volume groups and logical volumes, as the API offers them: Strata's own groups on local PVs
//! and groups on Ceph RBD pools, through the storage layer's [`Group`].
//!
//! The server keeps each volume group it touches open (and so locked against other processes,
//! like LVM) for its lifetime: volumes in use by VMs and jobs stay valid, and the `strata lv`
//! CLI pointed at the same data directory gets a clear "busy" error and should use `--remote`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use strata_storage::format::ImageFormat;
use strata_storage::source::{SourceSpec, LV_PREFIX};
use strata_storage::util::parse_size;
use strata_storage::volume::{Group, GroupInfo, LvType, VolumeStore};
use strata_storage::BlockDevice;

use super::{Service, ServiceError, ServiceResult};

/// Open volume groups of the server.
#[derive(Debug)]
pub struct VolumeGroups {
    store: VolumeStore,
    open: Mutex<BTreeMap<String, Arc<Group>>>,
    /// Group names from the last survey of the PVs, and when it was made.
    names: Mutex<Option<(std::time::Instant, Vec<String>)>>,
}

/// How long a survey of the PVs for group names is reused. Groups made by other processes
/// (the `strata vg` tools) appear within this time; the volumes of known groups are always
/// current, because the server holds those groups open.
const NAMES_TTL: std::time::Duration = std::time::Duration::from_secs(2);

impl VolumeGroups {
    /// Volume groups of the data directory `store` works on.
    pub fn new(store: VolumeStore) -> VolumeGroups {
        VolumeGroups {
            store,
            open: Mutex::new(BTreeMap::new()),
            names: Mutex::new(None),
        }
    }

    /// The group `name`, local or on RBD, opened (a local one exclusively) on first use.
    pub fn get(&self, name: &str) -> ServiceResult<Arc<Group>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(vg) = open.get(name) {
            return Ok(vg.clone());
        }
        let vg = Arc::new(self.store.open_group(name, false)?);
        open.insert(name.to_string(), vg.clone());
        Ok(vg)
    }

    /// Forgets an open group (it was removed).
    pub fn forget(&self, name: &str) {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        *self.names.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The volume store.
    pub fn store(&self) -> &VolumeStore {
        &self.store
    }

    /// Names of all groups in the data directory.
    pub fn names(&self) -> ServiceResult<Vec<String>> {
        let mut cached = self.names.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, names)) = cached.as_ref() {
            if at.elapsed() < NAMES_TTL {
                return Ok(names.clone());
            }
        }
        let mut names: Vec<String> = self.store.vg_list()?.into_iter().map(|g| g.name).collect();
        names.extend(self.store.rbd_groups().load()?.into_iter().map(|g| g.name));
        names.sort();
        names.dedup();
        *cached = Some((std::time::Instant::now(), names.clone()));
        Ok(names)
    }
}

/// A volume group with its pools' usage, for `GET /api/storage`.
#[derive(Debug, Serialize)]
pub struct StorageGroup {
    /// Group facts: name, size, free bytes, extent size, PVs.
    pub group: GroupInfo,
    /// Thin pools: virtual total vs pool size vs used (overcommit).
    pub pools: Vec<strata_storage::volume::LvInfo>,
}

/// The result of checking a group.
#[derive(Debug, Serialize)]
pub struct GroupCheck {
    /// No errors found.
    pub clean: bool,
    /// Errors, warnings and per-pool findings.
    pub check: strata_storage::volume::VgCheck,
}

/// A request to create a volume.
#[derive(Debug, Deserialize)]
pub struct CreateVolume {
    /// Volume group.
    pub vg: String,
    /// Name of the new volume.
    pub name: String,
    /// Virtual size ("10G").
    pub size: String,
    /// A thin pool in the same group for a thin volume; none: a linear (thick) volume.
    pub pool: Option<String>,
}

/// A request to add a volume group on a Ceph RBD pool (its volumes are RBD images).
#[derive(Debug, Serialize, Deserialize)]
pub struct CreateRbdGroup {
    /// Name of the new group.
    pub name: String,
    /// The Ceph configuration file, a server path in an import folder.
    pub conf: String,
    /// The Ceph user, without `client.`.
    #[serde(default = "default_ceph_user")]
    pub user: String,
    /// A keyring file (a server path in an import folder), when the configuration names none.
    #[serde(default)]
    pub keyring: Option<String>,
    /// The RBD pool.
    pub pool: String,
}

fn default_ceph_user() -> String {
    "admin".into()
}

/// An image made outside Strata, to take in as a volume.
#[derive(Debug, Serialize, Deserialize)]
pub struct AdoptVolume {
    /// The image's name in the group's pool.
    pub image: String,
}

/// A new size.
#[derive(Debug, Deserialize)]
pub struct ResizeVolume {
    /// New virtual size ("20G").
    pub size: String,
    /// Allow a smaller size: the data past the new end is lost (as `qemu-img resize --shrink`).
    #[serde(default)]
    pub shrink: bool,
}

/// Whether a volume is a template.
#[derive(Debug, Deserialize)]
pub struct SetTemplate {
    /// Template (true) or not (false).
    pub template: bool,
}

/// A name for a snapshot or clone.
#[derive(Debug, Deserialize)]
pub struct NewName {
    /// Name of the new volume.
    pub name: String,
}

/// A volume as listed.
#[derive(Debug, Serialize)]
pub struct VolumeSummary {
    /// Facts: name, group, type, size, pool, origin, template, mapped bytes.
    #[serde(flatten)]
    pub info: strata_storage::volume::LvInfo,
    /// The source name other operations take: `lv:VG/NAME`.
    pub source: String,
    /// What has it open now (VMs, jobs, downloads): it cannot be resized or removed meanwhile.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub held_by: Vec<String>,
    /// A restore that has not finished (see [`super::restores`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore: Option<super::restores::RestoreInfo>,
}

impl Service {
    fn summary(&self, info: strata_storage::volume::LvInfo) -> VolumeSummary {
        let source = format!("{LV_PREFIX}{}/{}", info.vg, info.name);
        let held_by = self.holds.holders(&format!("{}/{}", info.vg, info.name));
        let restore = self.restore_info(&info.vg, &info.name);
        VolumeSummary {
            info,
            source,
            held_by,
            restore,
        }
    }

    /// Groups and pools.
    pub fn storage_overview(&self) -> ServiceResult<Vec<StorageGroup>> {
        let mut out = Vec::new();
        for name in self.volumes.names()? {
            let g = self.volumes.get(&name)?;
            // Thin pools exist in local groups only.
            let pools = match g.as_ref() {
                Group::Local(vg) => vg
                    .list_lvs()?
                    .into_iter()
                    .filter(|l| l.kind == LvType::ThinPool)
                    .collect(),
                #[allow(unreachable_patterns)]
                _ => Vec::new(),
            };
            out.push(StorageGroup {
                group: g.info()?,
                pools,
            });
        }
        Ok(out)
    }

    /// Checks a local group's metadata and its pools (leaked or doubly owned blocks).
    pub fn check_group(&self, vg: &str) -> ServiceResult<GroupCheck> {
        let g = self.volumes.get(vg)?;
        let check = g.local("check")?.check()?;
        Ok(GroupCheck {
            clean: check.is_clean(),
            check,
        })
    }

    /// Adds a volume group on a Ceph RBD pool after checking that the cluster and pool answer.
    /// The configuration and keyring must be files in an import folder: librados reads them.
    pub fn create_rbd_group(&self, req: &CreateRbdGroup) -> ServiceResult<StorageGroup> {
        let conf = self.server_paths.file("Ceph configuration", &req.conf)?;
        let keyring = match &req.keyring {
            Some(k) => Some(self.server_paths.file("keyring", k)?),
            None => None,
        };
        let record = strata_storage::volume::rbd_groups::RbdGroupRecord {
            name: req.name.clone(),
            conf,
            user: req.user.clone(),
            keyring,
            pool: req.pool.clone(),
        };
        let group = self.volumes.store().rbd_group_create(&record)?;
        self.volumes.forget(&req.name);
        Ok(StorageGroup {
            group: group.info()?,
            pools: Vec::new(),
        })
    }

    /// Removes a volume group on RBD once it holds no volumes (its pool stays as it is). Local
    /// groups are removed with `strata vg remove` on the appliance.
    pub fn remove_group(&self, name: &str) -> ServiceResult<()> {
        let g = self.volumes.get(name)?;
        if g.local("remove").is_ok() {
            return Err(ServiceError::Storage(strata_storage::StorageError::Unsupported(
                format!("removing the local volume group {name} through the API (use `strata vg remove` on the appliance)"),
            )));
        }
        drop(g);
        self.volumes.store().rbd_group_remove(name)?;
        self.volumes.forget(name);
        Ok(())
    }

    /// Takes in an image made outside Strata (an RBD group's pool) as volume `image`.
    pub fn adopt_volume(&self, vg: &str, req: &AdoptVolume) -> ServiceResult<VolumeSummary> {
        let g = self.volumes.get(vg)?;
        g.adopt(&req.image)?;
        self.volume_info(vg, &req.image)
    }

    /// Every volume in every group.
    pub fn list_volumes(&self) -> ServiceResult<Vec<VolumeSummary>> {
        let mut out = Vec::new();
        for name in self.volumes.names()? {
            let vg = self.volumes.get(&name)?;
            out.extend(
                vg.list_lvs()?
                    .into_iter()
                    .filter(|l| l.kind != LvType::ThinPool)
                    .map(|l| self.summary(l)),
            );
        }
        Ok(out)
    }

    /// One volume.
    pub fn volume_info(&self, vg: &str, name: &str) -> ServiceResult<VolumeSummary> {
        let g = self.volumes.get(vg)?;
        Ok(self.summary(g.lv_info(name)?))
    }

    /// Creates a linear or thin volume.
    pub fn create_volume(&self, req: &CreateVolume) -> ServiceResult<VolumeSummary> {
        let size = parse_size(&req.size)?;
        let g = self.volumes.get(&req.vg)?;
        g.create(&req.name, size, req.pool.as_deref())?;
        // A record left by a volume of that name removed behind the server's back is stale.
        self.forget_restore(&req.vg, &req.name);
        match self.volume_info(&req.vg, &req.name) {
            // Another client removed it again already: report what was created.
            Err(e) if e.status() == 404 => Ok(self.summary(strata_storage::volume::LvInfo {
                name: req.name.clone(),
                vg: req.vg.clone(),
                kind: if req.pool.is_some() {
                    LvType::Thin
                } else {
                    LvType::Linear
                },
                size,
                pool: req.pool.clone(),
                origin: None,
                template: false,
                read_only: false,
                mapped_bytes: req.pool.as_ref().map(|_| 0),
                usage: None,
                segments: None,
                open: false,
            })),
            other => other,
        }
    }

    /// Changes a volume's size. Shrinking needs `shrink`; a volume held by a VM, a job or a
    /// download is not resized (409).
    pub fn resize_volume(
        &self,
        vg: &str,
        name: &str,
        req: &ResizeVolume,
    ) -> ServiceResult<VolumeSummary> {
        let size = parse_size(&req.size)?;
        let g = self.volumes.get(vg)?;
        self.holds
            .unless_held(&format!("{vg}/{name}"), "resize", || {
                let info = g.lv_info(name)?;
                let current = info.size;
                if size < current && !req.shrink {
                    return Err(ServiceError::BadRequest(format!(
                        "Shrinking {vg}/{name} from {current} to {size} bytes loses the data past \
                     the new end; ask for it explicitly (\"shrink\": true, or --shrink)"
                    )));
                }
                Ok(g.resize_lv(name, size)?)
            })?;
        self.volume_info(vg, name)
    }

    /// Takes a read-only snapshot of a thin volume.
    pub fn snapshot_volume(
        &self,
        vg: &str,
        name: &str,
        req: &NewName,
    ) -> ServiceResult<VolumeSummary> {
        let g = self.volumes.get(vg)?;
        g.snapshot(name, &req.name)?;
        self.volume_info(vg, &req.name)
    }

    /// Makes a writable linked clone of a snapshot or template.
    pub fn clone_volume(
        &self,
        vg: &str,
        name: &str,
        req: &NewName,
    ) -> ServiceResult<VolumeSummary> {
        let g = self.volumes.get(vg)?;
        g.clone_lv(name, &req.name)?;
        self.volume_info(vg, &req.name)
    }

    /// Removes a volume (its snapshots and clones stay); 409 while a running VM uses it.
    pub fn remove_volume(&self, vg: &str, name: &str) -> ServiceResult<()> {
        let g = self.volumes.get(vg)?;
        self.vms
            .unless_in_use(&format!("{LV_PREFIX}{vg}/{name}"), || {
                self.holds
                    .unless_held(&format!("{vg}/{name}"), "remove", || Ok(g.remove_lv(name)?))
            })?;
        self.forget_restore(vg, name);
        self.io_stats.forget(&format!("{vg}/{name}"));
        Ok(())
    }

    /// Marks a snapshot as a template (clones are made from templates) or unmarks it.
    pub fn set_volume_template(
        &self,
        vg: &str,
        name: &str,
        req: &SetTemplate,
    ) -> ServiceResult<VolumeSummary> {
        let g = self.volumes.get(vg)?;
        self.vms
            .unless_in_use(&format!("{LV_PREFIX}{vg}/{name}"), || {
                self.holds.unless_held(
                    &format!("{vg}/{name}"),
                    "change the template mark of",
                    || Ok(g.set_template(name, req.template)?),
                )
            })?;
        self.volume_info(vg, name)
    }

    /// Opens a source by name: `lv:VG/NAME` through the server's open groups, `image:NAME` in
    /// the image folder, or an absolute path on the server.
    pub fn open_source(&self, spec: &str, read_only: bool) -> ServiceResult<Arc<dyn BlockDevice>> {
        Ok(self
            .resolve_source(spec, read_only, "an operation")?
            .device())
    }

    /// Like [`Service::open_source`], keeping what kind of source it is. Appliance images
    /// open with their recorded format and volumes as raw devices: neither is ever probed.
    /// A server path (an import file) is probed unless `source_format` names its format; either
    /// way it opens without following references to other files.
    /// A volume stays held by `holder` (see [`super::holds`]) while the result lives.
    pub fn resolve_source(
        &self,
        spec: &str,
        read_only: bool,
        holder: &str,
    ) -> ServiceResult<Resolved> {
        self.resolve_source_as(spec, read_only, None, holder)
    }

    /// [`Service::resolve_source`] with the format of a server-path source stated.
    pub fn resolve_source_as(
        &self,
        spec: &str,
        read_only: bool,
        source_format: Option<ImageFormat>,
        holder: &str,
    ) -> ServiceResult<Resolved> {
        if let Some(name) = spec.strip_prefix("image:") {
            if source_format.is_some() {
                return Err(ServiceError::BadRequest(format!(
                    "The format of {spec} is recorded; a source format applies to import files only"
                )));
            }
            let (device, fmt) = self.open_appliance_image(name, read_only)?;
            // Writes are tracked in the image's sidecar dirty bitmaps when it has them.
            let tracked = strata_storage::bitmap::attach_image_bitmaps(
                device.clone(),
                &self.image_path(name)?,
            )?;
            return Ok(Resolved::Image {
                device,
                tracked: Arc::new(tracked),
                format: fmt.to_string(),
            });
        }
        match SourceSpec::parse(spec)? {
            SourceSpec::Volume { vg, lv } => {
                if source_format.is_some() {
                    return Err(ServiceError::BadRequest(format!(
                        "{spec} is a volume, always raw; a source format applies to import files only"
                    )));
                }
                let g = self.volumes.get(&vg)?;
                let key = format!("{vg}/{lv}");
                if !read_only {
                    // An exported volume is written by its NBD clients alone.
                    let exported: Vec<String> = self
                        .holds
                        .holders(&key)
                        .into_iter()
                        .filter(|h| h.starts_with("NBD export"))
                        .collect();
                    if !exported.is_empty() {
                        return Err(ServiceError::Conflict(format!(
                            "Cannot open {spec} for writing: it is exported ({}); remove the \
                             export first",
                            exported.join(", ")
                        )));
                    }
                }
                let hold = self.holds.take(&key, holder);
                let device = g.open_lv(&lv, read_only)?;
                // A volume under restore: refused, or its live-restore device.
                let device = self.restoring_device(&vg, &lv, device, || g.open_lv(&lv, false))?;
                let device = self.io_stats.wrap(&key, device);
                Ok(Resolved::Volume {
                    device,
                    vg: g,
                    lv,
                    _hold: hold,
                })
            }
            SourceSpec::Path(p) if p.is_absolute() => {
                let path = self.server_paths.file("source", &p.to_string_lossy())?;
                let opts = strata_storage::format::OpenOptions {
                    format: source_format,
                    references: self.server_paths.references(),
                    read_only,
                    ..Default::default()
                };
                let img = strata_storage::format::open_image(&path, &opts)?;
                let format = img.format().to_string();
                Ok(Resolved::image_untracked(img, format))
            }
            SourceSpec::Path(p) => Err(ServiceError::BadRequest(format!(
                "Source {:?} must be lv:VG/NAME, image:NAME or an absolute path on the server",
                p.display()
            ))),
        }
    }
}

/// An opened source or target.
#[derive(Debug)]
pub enum Resolved {
    /// An image file.
    Image {
        /// The image.
        device: Arc<dyn strata_storage::format::Image>,
        /// The image with its sidecar dirty bitmaps attached, when it has them: the device
        /// to write through, so that writes are tracked.
        tracked: Arc<strata_storage::bitmap::WithBitmaps>,
        /// Its format's name.
        format: String,
    },
    /// A logical volume of one of the server's groups.
    Volume {
        /// The volume.
        device: Arc<dyn BlockDevice>,
        /// Its group.
        vg: Arc<Group>,
        /// Its name in the group.
        lv: String,
        /// Keeps it from being resized or removed meanwhile.
        _hold: super::holds::Hold,
    },
}

impl Resolved {
    /// An image file whose writes are not tracked (a file outside the appliance's images).
    pub fn image_untracked(device: Arc<dyn strata_storage::format::Image>, format: String) -> Self {
        let tracked = strata_storage::bitmap::WithBitmaps::none(device.clone());
        Resolved::Image {
            device,
            tracked: Arc::new(tracked),
            format,
        }
    }

    /// The block device (an image's writes tracked in its dirty bitmaps).
    pub fn device(&self) -> Arc<dyn BlockDevice> {
        match self {
            Resolved::Image { tracked, .. } => tracked.device().clone(),
            Resolved::Volume { device, .. } => device.clone(),
        }
    }

    /// What to record as the source's format.
    pub fn format_label(&self) -> String {
        match self {
            Resolved::Image { format, .. } => format.clone(),
            Resolved::Volume { .. } => "volume".into(),
        }
    }
}

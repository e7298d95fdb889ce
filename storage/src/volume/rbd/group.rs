//! A volume group on Ceph RBD: the volumes of group `NAME` are the images of its pool that carry
//! the image metadata `strata.volume-group = NAME` (set when Strata creates or clones an image,
//! or when `strata lv adopt` takes in one made with `rbd create`); other images of the pool are
//! left alone. The record lives with the image, so every host that defines the group on the same
//! pool sees the same volumes, and a crash between creating an image and marking it leaves an
//! image `rbd ls` shows and `lv adopt` can take in, never a volume without an image.
//!
//! Volume verbs map onto RBD as Proxmox VE maps them:
//! - a volume is an image (format 2; layering, exclusive-lock, object-map, fast-diff);
//! - a snapshot `VG/SNAP` of `VG/DISK` is the RBD snapshot `DISK@SNAP` (names are unique across
//!   images and snapshots of the group);
//! - a clone is an RBD clone (format 2) of a snapshot; a template is a protected snapshot;
//! - removing a volume with snapshots, or a snapshot with clones, is refused.
//!
//! Snapshots whose name starts with [`INTERNAL_PREFIX`] are Strata's own (changed-block tracking
//! for backups, `cbt.rs`): not volumes, never listed, removed with their image.

use std::sync::Arc;

use super::cluster::{Cluster, ClusterSpec, Pool};
use super::device::RbdDevice;
use super::image::{self, Image};
use crate::device::BlockDevice;
use crate::error::{Result, StorageError};
use crate::volume::lv::{LvInfo, LvType};
use crate::volume::name::{check_name, NameKind};
use crate::volume::rbd_groups::RbdGroupRecord;

/// The image metadata key naming the group an image belongs to.
pub const GROUP_KEY: &str = "strata.volume-group";
/// Prefix of snapshots Strata keeps for itself; not a volume name.
pub const INTERNAL_PREFIX: &str = ".strata-";

/// Where a volume name points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Located {
    /// An image.
    Image(String),
    /// A snapshot of an image.
    Snapshot {
        /// The image.
        image: String,
        /// The snapshot's name (the volume's name).
        snap: String,
    },
}

/// Facts about an RBD group, for `vg show` and listings.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RbdGroupInfo {
    /// Group name.
    pub name: String,
    /// Always `rbd`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The Ceph pool.
    pub pool: String,
    /// The Ceph configuration file.
    pub conf: String,
    /// The Ceph user.
    pub user: String,
    /// Images of the group.
    pub volumes: usize,
    /// The pool's quota in bytes (0: none).
    pub quota_bytes: u64,
    /// Bytes stored in the pool (all of its images).
    pub used_bytes: u64,
}

/// An open RBD volume group. See the module documentation.
#[derive(Clone, Debug)]
pub struct RbdGroup {
    record: RbdGroupRecord,
    pool: Arc<Pool>,
    read_only: bool,
}

fn not_found(vg: &str, name: &str) -> StorageError {
    StorageError::NotFound(format!("logical volume {vg}/{name}").into())
}

fn is_internal(snap: &str) -> bool {
    snap.starts_with(INTERNAL_PREFIX)
}

impl RbdGroup {
    /// How to reach a group's cluster.
    pub fn spec(record: &RbdGroupRecord) -> ClusterSpec {
        ClusterSpec {
            conf: record.conf.clone(),
            user: record.user.clone(),
            keyring: record.keyring.clone(),
        }
    }

    /// Connects to the group's cluster and pool.
    pub fn open(record: &RbdGroupRecord, read_only: bool) -> Result<RbdGroup> {
        let cluster = Cluster::connect(&Self::spec(record))?;
        let pool = Arc::new(cluster.pool(&record.pool)?);
        Ok(RbdGroup {
            record: record.clone(),
            pool,
            read_only,
        })
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.record.name
    }

    /// Its record.
    pub fn record(&self) -> &RbdGroupRecord {
        &self.record
    }

    /// The pool handle.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(StorageError::ReadOnly(format!(
                "volume group {} (opened read-only)",
                self.name()
            )));
        }
        Ok(())
    }

    /// Whether image `name` is a volume of this group.
    fn is_member(&self, name: &str) -> Result<bool> {
        match Image::open(&self.pool, name, None, true) {
            Ok(img) => Ok(img.metadata(GROUP_KEY)?.as_deref() == Some(self.name())),
            Err(StorageError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The group's images, sorted.
    pub fn images(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for name in image::list(&self.pool)? {
            // An image removed since the listing is simply not a member.
            if self.is_member(&name)? {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Opens member image `name` (writable unless the group is read-only).
    fn member(&self, name: &str) -> Result<Image> {
        let img = match Image::open(&self.pool, name, None, self.read_only) {
            Ok(i) => i,
            Err(StorageError::NotFound(_)) => return Err(not_found(self.name(), name)),
            Err(e) => return Err(e),
        };
        if img.metadata(GROUP_KEY)?.as_deref() != Some(self.name()) {
            return Err(StorageError::NotFound(
                format!(
                    "logical volume {}/{name} (pool {} has an image of that name, but it is not a \
                     volume of this group: `strata lv adopt` takes it in)",
                    self.name(),
                    self.pool.name()
                )
                .into(),
            ));
        }
        Ok(img)
    }

    /// Where volume `name` is.
    pub fn locate(&self, name: &str) -> Result<Located> {
        if is_internal(name) {
            return Err(not_found(self.name(), name));
        }
        let images = self.images()?;
        if images.iter().any(|i| i == name) {
            return Ok(Located::Image(name.to_string()));
        }
        for i in images {
            let img = Image::open(&self.pool, &i, None, true)?;
            if img.snapshots()?.iter().any(|s| s.name == name) {
                return Ok(Located::Snapshot {
                    image: i,
                    snap: name.to_string(),
                });
            }
        }
        Err(not_found(self.name(), name))
    }

    fn check_free(&self, name: &str) -> Result<()> {
        check_name(name, NameKind::LogicalVolume)?;
        if is_internal(name) {
            return Err(StorageError::InvalidInput(format!(
                "Names starting with {INTERNAL_PREFIX} are reserved for Strata's own snapshots"
            )));
        }
        match self.locate(name) {
            Ok(_) => Err(StorageError::AlreadyExists(format!(
                "{}/{name}",
                self.name()
            ))),
            Err(StorageError::NotFound(_)) => {
                // An image of the pool outside the group holds the name too.
                match Image::open(&self.pool, name, None, true) {
                    Ok(_) => Err(StorageError::AlreadyExists(format!(
                        "image {}/{name} (in pool {}, not a volume of this group)",
                        self.pool.name(),
                        name
                    ))),
                    Err(StorageError::NotFound(_)) => Ok(()),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Marks a new image as a volume; removes it if that fails.
    fn mark_new(&self, name: &str) -> Result<()> {
        let r = Image::open(&self.pool, name, None, false)
            .and_then(|img| img.set_metadata(GROUP_KEY, self.name()));
        if let Err(e) = r {
            if let Err(e2) = image::remove(&self.pool, name) {
                tracing::error!(image = name, error = %e2, "removing a half-made image failed");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Creates volume `name` of `size` bytes.
    pub fn create(&self, name: &str, size: u64) -> Result<()> {
        self.writable()?;
        if size == 0 {
            return Err(StorageError::InvalidInput(
                "Volume size must be greater than zero".into(),
            ));
        }
        self.check_free(name)?;
        image::create(&self.pool, name, size)?;
        self.mark_new(name)
    }

    /// Takes in image `name`, made outside Strata (`rbd create`), as a volume of the group.
    pub fn adopt(&self, name: &str) -> Result<()> {
        self.writable()?;
        check_name(name, NameKind::LogicalVolume)?;
        let img = match Image::open(&self.pool, name, None, false) {
            Ok(i) => i,
            Err(StorageError::NotFound(_)) => {
                return Err(StorageError::NotFound(
                    format!("RBD image {}/{name}", self.pool.name()).into(),
                ))
            }
            Err(e) => return Err(e),
        };
        match img.metadata(GROUP_KEY)? {
            Some(g) if g == self.name() => {
                return Err(StorageError::AlreadyExists(format!(
                    "{}/{name} (it is already a volume of this group)",
                    self.name()
                )))
            }
            Some(g) => {
                return Err(StorageError::Busy(format!(
                    "RBD image {}/{name} (it belongs to volume group {g})",
                    self.pool.name()
                )))
            }
            None => {}
        }
        // Its snapshots become volumes too: their names must be free.
        for s in img.snapshots()?.iter().filter(|s| !is_internal(&s.name)) {
            if self.locate(&s.name).is_ok() {
                return Err(StorageError::AlreadyExists(format!(
                    "{}/{} (a snapshot of {name} has the name of a volume of the group)",
                    self.name(),
                    s.name
                )));
            }
        }
        if self.locate(name).is_ok() {
            return Err(StorageError::AlreadyExists(format!(
                "{}/{name}",
                self.name()
            )));
        }
        let features = img.features()?;
        if features & image::FEATURES != image::FEATURES {
            tracing::warn!(
                image = name,
                features,
                "the adopted image lacks some of layering, exclusive-lock, object-map, fast-diff; \
                 incremental backups read more without fast-diff"
            );
        }
        img.set_metadata(GROUP_KEY, self.name())
    }

    /// Takes snapshot `snap` of volume `origin`.
    pub fn snapshot(&self, origin: &str, snap: &str) -> Result<()> {
        self.writable()?;
        self.check_free(snap)?;
        match self.locate(origin)? {
            Located::Image(i) => self.member(&i)?.snap_create(snap),
            Located::Snapshot { .. } => Err(StorageError::Unsupported(format!(
                "a snapshot of snapshot {}/{origin}: RBD snapshots belong to images (clone it \
                 first)",
                self.name()
            ))),
        }
    }

    /// Makes writable volume `new`, an RBD clone of snapshot or template `source`.
    pub fn clone_lv(&self, source: &str, new: &str) -> Result<()> {
        self.writable()?;
        self.check_free(new)?;
        match self.locate(source)? {
            Located::Snapshot {
                image: parent,
                snap,
            } => {
                image::clone(&self.pool, &parent, &snap, new)?;
                self.mark_new(new)
            }
            Located::Image(_) => Err(StorageError::InvalidInput(format!(
                "{}/{source} is writable: clone a snapshot of it, or a template",
                self.name()
            ))),
        }
    }

    /// Marks a snapshot as a template (protected) or lifts that.
    pub fn set_template(&self, name: &str, template: bool) -> Result<()> {
        self.writable()?;
        let (image, snap) = match self.locate(name)? {
            Located::Snapshot { image, snap } => (image, snap),
            Located::Image(_) => {
                return Err(StorageError::Unsupported(format!(
                    "{}/{name} is an RBD image: a template of an RBD group is a protected \
                     snapshot (take a snapshot and mark that)",
                    self.name()
                )))
            }
        };
        let img = self.member(&image)?;
        let protected = img.snap_is_protected(&snap)?;
        match (template, protected) {
            (true, false) => img.snap_protect(&snap),
            (false, true) => img.snap_unprotect(&snap),
            (true, true) => Ok(()),
            (false, false) => Err(StorageError::InvalidInput(format!(
                "{}/{name} is not a template",
                self.name()
            ))),
        }
    }

    /// Clones of snapshot `snap` of `img` (which is left on its head).
    fn clones_of(img: &Image, snap: &str) -> Result<Vec<String>> {
        img.set_snap(Some(snap))?;
        let r = img.children();
        img.set_snap(None)?;
        r
    }

    /// Removes a volume: an image without snapshots (its internal ones go with it), or a
    /// snapshot without clones.
    pub fn remove_lv(&self, name: &str) -> Result<()> {
        self.writable()?;
        match self.locate(name)? {
            Located::Snapshot { image, snap } => {
                let img = self.member(&image)?;
                let clones = Self::clones_of(&img, &snap)?;
                if !clones.is_empty() {
                    return Err(StorageError::Busy(format!(
                        "{}/{name} (clones exist: {}; remove them first)",
                        self.name(),
                        clones.join(", ")
                    )));
                }
                if img.snap_is_protected(&snap)? {
                    img.snap_unprotect(&snap)?;
                }
                img.snap_remove(&snap)
            }
            Located::Image(image) => {
                let img = self.member(&image)?;
                let snaps = img.snapshots()?;
                let user: Vec<&str> = snaps
                    .iter()
                    .filter(|s| !is_internal(&s.name))
                    .map(|s| s.name.as_str())
                    .collect();
                if !user.is_empty() {
                    let mut clones = Vec::new();
                    for s in &user {
                        clones.extend(Self::clones_of(&img, s)?);
                    }
                    let also = if clones.is_empty() {
                        String::new()
                    } else {
                        format!(", with clones {}", clones.join(", "))
                    };
                    return Err(StorageError::Busy(format!(
                        "{}/{name} (it has snapshots {}{also}; remove them first)",
                        self.name(),
                        user.join(", ")
                    )));
                }
                for s in snaps.iter().filter(|s| is_internal(&s.name)) {
                    if !Self::clones_of(&img, &s.name)?.is_empty() {
                        return Err(StorageError::Busy(format!(
                            "{}/{name} (its internal snapshot {} has clones)",
                            self.name(),
                            s.name
                        )));
                    }
                    img.snap_remove(&s.name)?;
                }
                drop(img);
                image::remove(&self.pool, &image).map_err(|e| match e {
                    StorageError::Busy(_) => StorageError::Busy(format!(
                        "{}/{name} (it is open: the image has watchers)",
                        self.name()
                    )),
                    e => e,
                })
            }
        }
    }

    /// Renames a volume (image or snapshot).
    pub fn rename_lv(&self, old: &str, new: &str) -> Result<()> {
        self.writable()?;
        self.check_free(new)?;
        match self.locate(old)? {
            Located::Image(i) => image::rename(&self.pool, &i, new),
            Located::Snapshot { image, snap } => self.member(&image)?.snap_rename(&snap, new),
        }
    }

    /// Changes an image's size (shrinking discards what is cut off).
    pub fn resize_lv(&self, name: &str, size: u64) -> Result<()> {
        self.writable()?;
        if size == 0 {
            return Err(StorageError::InvalidInput(
                "Volume size must be greater than zero".into(),
            ));
        }
        match self.locate(name)? {
            Located::Image(i) => self.member(&i)?.resize(size),
            Located::Snapshot { .. } => Err(StorageError::ReadOnly(format!(
                "{}/{name} (a snapshot)",
                self.name()
            ))),
        }
    }

    fn image_info(&self, img: &Image) -> Result<LvInfo> {
        let size = img.size()?;
        let origin = match img.parent()? {
            Some((pool, _, snap)) if pool == self.pool.name() => Some(snap),
            Some((pool, image, snap)) => Some(format!("{pool}/{image}@{snap}")),
            None => None,
        };
        let mut mapped = 0u64;
        img.diff(None, 0, size, false, true, &mut |_, len, exists| {
            if exists {
                mapped += len;
            }
            true
        })?;
        Ok(LvInfo {
            name: img.name().to_string(),
            vg: self.name().to_string(),
            kind: LvType::Thin,
            size,
            pool: None,
            origin,
            template: false,
            read_only: false,
            mapped_bytes: Some(mapped),
            usage: None,
            segments: None,
            open: false,
        })
    }

    /// Every volume: images and their snapshots, sorted by name.
    pub fn list_lvs(&self) -> Result<Vec<LvInfo>> {
        let mut out = Vec::new();
        for name in self.images()? {
            let img = match Image::open(&self.pool, &name, None, true) {
                Ok(i) => i,
                Err(StorageError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            out.push(self.image_info(&img)?);
            for s in img
                .snapshots()?
                .into_iter()
                .filter(|s| !is_internal(&s.name))
            {
                out.push(LvInfo {
                    template: img.snap_is_protected(&s.name)?,
                    name: s.name,
                    vg: self.name().to_string(),
                    kind: LvType::Snapshot,
                    size: s.size,
                    pool: None,
                    origin: Some(name.clone()),
                    read_only: true,
                    mapped_bytes: None,
                    usage: None,
                    segments: None,
                    open: false,
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Facts about one volume.
    pub fn lv_info(&self, name: &str) -> Result<LvInfo> {
        self.list_lvs()?
            .into_iter()
            .find(|l| l.name == name)
            .ok_or_else(|| not_found(self.name(), name))
    }

    /// Opens a volume as a block device (a snapshot read-only).
    pub fn open_lv(&self, name: &str, read_only: bool) -> Result<Arc<dyn BlockDevice>> {
        let read_only = read_only || self.read_only;
        let full = format!("{}/{name}", self.name());
        let (img, ro) = match self.locate(name)? {
            Located::Image(i) => {
                // Check membership on a read-only handle, then open for real.
                self.member_read_only(&i)?;
                (Image::open(&self.pool, &i, None, read_only)?, read_only)
            }
            Located::Snapshot { image, snap } => {
                (Image::open(&self.pool, &image, Some(&snap), true)?, true)
            }
        };
        Ok(Arc::new(RbdDevice::new(&full, img, ro, None)?))
    }

    fn member_read_only(&self, name: &str) -> Result<()> {
        if self.is_member(name)? {
            Ok(())
        } else {
            Err(not_found(self.name(), name))
        }
    }

    /// Opens image `name` of the group for changed-block tracking (see `cbt.rs`): writable,
    /// for taking snapshots, even in a group opened read-only (a snapshot leaves the volume's
    /// data as it is).
    pub fn open_image(&self, name: &str) -> Result<Image> {
        match self.locate(name)? {
            Located::Image(i) => {
                self.member_read_only(&i)?;
                Image::open(&self.pool, &i, None, false)
            }
            Located::Snapshot { .. } => Err(StorageError::Unsupported(format!(
                "changed-block tracking of snapshot {}/{name} (back up its image)",
                self.name()
            ))),
        }
    }

    /// Facts about the group.
    pub fn info(&self) -> Result<RbdGroupInfo> {
        let (quota_bytes, used_bytes) = self.pool.quota()?;
        Ok(RbdGroupInfo {
            name: self.name().to_string(),
            kind: "rbd",
            pool: self.pool.name().to_string(),
            conf: self.record.conf.display().to_string(),
            user: self.record.user.clone(),
            volumes: self.images()?.len(),
            quota_bytes,
            used_bytes,
        })
    }
}

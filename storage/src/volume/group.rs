//! A volume group of either kind — local PVs ([`Vg`]) or a Ceph RBD pool (`rbd::RbdGroup`,
//! feature `rbd`) — behind the verbs every group has: create, snapshot, clone, template,
//! resize, rename, remove, list and open volumes. Commands, convert, backup and the VMM name a
//! volume `lv:VG/NAME` and get a [`crate::BlockDevice`] without knowing the kind.
//!
//! Verbs that exist for one kind only (thin pools, PVs, dirty bitmaps for local groups;
//! adopting images for RBD) are reached through [`Group::local`] or `Group::rbd`, or return
//! `Unsupported` naming the verb.

use std::sync::Arc;

use crate::device::BlockDevice;
use crate::error::{Result, StorageError};
use crate::volume::lv::LvInfo;
use crate::volume::rbd_groups::RbdGroupRecord;
use crate::volume::store::VolumeStore;
use crate::volume::vg::Vg;

/// An open volume group. See the module documentation.
#[derive(Clone, Debug)]
pub enum Group {
    /// Strata's own LVM-like group on local PVs.
    Local(Vg),
    /// A group on Ceph RBD.
    #[cfg(feature = "rbd")]
    Rbd(crate::volume::rbd::group::RbdGroup),
}

/// Facts about a group of either kind, for listings.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(untagged)]
pub enum GroupInfo {
    /// A local group: name, size, free bytes, extent size, PVs.
    Local(crate::volume::vg::VgInfo),
    /// An RBD group: name, pool, configuration, user, volumes, quota and use.
    #[cfg(feature = "rbd")]
    Rbd(crate::volume::rbd::group::RbdGroupInfo),
}

impl Group {
    /// Facts about the group.
    pub fn info(&self) -> Result<GroupInfo> {
        match self {
            Group::Local(vg) => Ok(GroupInfo::Local(vg.info())),
            #[cfg(feature = "rbd")]
            Group::Rbd(g) => Ok(GroupInfo::Rbd(g.info()?)),
        }
    }

    /// Takes in image `name`, made outside Strata in the group's RBD pool, as a volume. Local
    /// groups have nothing to adopt.
    pub fn adopt(&self, name: &str) -> Result<()> {
        match self {
            Group::Local(vg) => Err(StorageError::Unsupported(format!(
                "adopting {name} into volume group {}: only RBD groups adopt images",
                vg.name()
            ))),
            #[cfg(feature = "rbd")]
            Group::Rbd(g) => g.adopt(name),
        }
    }

    /// The group's name.
    pub fn name(&self) -> String {
        match self {
            Group::Local(vg) => vg.name(),
            #[cfg(feature = "rbd")]
            Group::Rbd(g) => g.name().to_string(),
        }
    }

    /// The local group, or an error naming `verb` for an RBD group.
    pub fn local(&self, verb: &str) -> Result<&Vg> {
        let _ = verb;
        match self {
            Group::Local(vg) => Ok(vg),
            #[cfg(feature = "rbd")]
            Group::Rbd(g) => Err(StorageError::Unsupported(format!(
                "{verb} in volume group {} (it is on Ceph RBD)",
                g.name()
            ))),
        }
    }

    /// Creates volume `name` of `size` bytes: thin in `pool` if given, else linear (local
    /// groups); an image (RBD groups, which have no pools).
    pub fn create(&self, name: &str, size: u64, pool: Option<&str>) -> Result<()> {
        match self {
            Group::Local(vg) => match pool {
                Some(p) => vg.create_thin(p, name, size),
                None => vg.create_linear(name, size, &[]),
            },
            #[cfg(feature = "rbd")]
            Group::Rbd(g) => {
                if pool.is_some() {
                    return Err(StorageError::InvalidInput(format!(
                        "volume group {} is on Ceph RBD: its volumes are thin images, without a \
                         thin pool (leave out --thin)",
                        g.name()
                    )));
                }
                g.create(name, size)
            }
        }
    }

    /// Takes a read-only snapshot `snap` of `origin`.
    pub fn snapshot(&self, origin: &str, snap: &str) -> Result<()> {
        match self {
            Group::Local(vg) => vg.snapshot(origin, snap),
            #[cfg(feature = "rbd")]
            Group::Rbd(g) => g.snapshot(origin, snap),
        }
    }

    /// Makes a writable clone `new` of a snapshot or template `source`.
    pub fn clone_lv(&self, source: &str, new: &str) -> Result<()> {
        match self {
            Group::Local(vg) => vg.clone_lv(source, new),
            #[cfg(feature = "rbd")]
            Group::Rbd(g) => g.clone_lv(source, new),
        }
    }

    /// Marks `name` as a template, or unmarks it.
    pub fn set_template(&self, name: &str, template: bool) -> Result<()> {
        match self {
            Group::Local(vg) => vg.set_template(name, template),
            #[cfg(feature = "rbd")]
            Group::Rbd(g) => g.set_template(name, template),
        }
    }

    /// Removes a volume.
    pub fn remove_lv(&self, name: &str) -> Result<()> {
        match self {
            Group::Local(vg) => vg.remove_lv(name),
            #[cfg(feature = "rbd")]
            Group::Rbd(g) => g.remove_lv(name),
        }
    }

    /// Renames a volume.
    pub fn rename_lv(&self, old: &str, new: &str) -> Result<()> {
        match self {
            Group::Local(vg) => vg.rename_lv(old, new),
            #[cfg(feature = "rbd")]
            Group::Rbd(g) => g.rename_lv(old, new),
        }
    }

    /// Changes a volume's size.
    pub fn resize_lv(&self, name: &str, size: u64) -> Result<()> {
        match self {
            Group::Local(vg) => vg.resize_lv(name, size),
            #[cfg(feature = "rbd")]
            Group::Rbd(g) => g.resize_lv(name, size),
        }
    }

    /// Every visible volume.
    pub fn list_lvs(&self) -> Result<Vec<LvInfo>> {
        match self {
            Group::Local(vg) => vg.list_lvs(),
            #[cfg(feature = "rbd")]
            Group::Rbd(g) => g.list_lvs(),
        }
    }

    /// Facts about one volume.
    pub fn lv_info(&self, name: &str) -> Result<LvInfo> {
        match self {
            Group::Local(vg) => vg.lv_info(name),
            #[cfg(feature = "rbd")]
            Group::Rbd(g) => g.lv_info(name),
        }
    }

    /// Opens a volume as a block device.
    pub fn open_lv(&self, name: &str, read_only: bool) -> Result<Arc<dyn BlockDevice>> {
        match self {
            Group::Local(vg) => vg.open_lv(name, read_only),
            #[cfg(feature = "rbd")]
            Group::Rbd(g) => g.open_lv(name, read_only),
        }
    }
}

impl VolumeStore {
    /// Opens group `name`, local or on RBD (see [`VolumeStore::open_vg`] for local groups).
    pub fn open_group(&self, name: &str, read_only: bool) -> Result<Group> {
        crate::volume::name::check_name(name, crate::volume::name::NameKind::VolumeGroup)?;
        match self.rbd_groups().get(name)? {
            Some(record) => open_rbd(&record, read_only),
            None => Ok(Group::Local(self.open_vg(name, read_only)?)),
        }
    }
}

#[cfg(feature = "rbd")]
fn open_rbd(record: &RbdGroupRecord, read_only: bool) -> Result<Group> {
    Ok(Group::Rbd(crate::volume::rbd::group::RbdGroup::open(
        record, read_only,
    )?))
}

#[cfg(not(feature = "rbd"))]
fn open_rbd(record: &RbdGroupRecord, _read_only: bool) -> Result<Group> {
    Err(StorageError::Unsupported(format!(
        "volume group {} is on Ceph RBD, and this strata was built without RBD support (the \
         `rbd` feature)",
        record.name
    )))
}

impl VolumeStore {
    /// The RBD groups file of the data directory.
    pub fn rbd_groups(&self) -> crate::volume::rbd_groups::RbdGroupsFile {
        crate::volume::rbd_groups::RbdGroupsFile::new(self.data_dir())
    }

    /// Records RBD group `record` after checking that its name is free and that its cluster
    /// and pool answer.
    #[cfg(feature = "rbd")]
    pub fn rbd_group_create(&self, record: &RbdGroupRecord) -> Result<Group> {
        use crate::volume::name::{check_name, NameKind};
        check_name(&record.name, NameKind::VolumeGroup)?;
        check_name(&record.user, NameKind::VolumeGroup).map_err(|_| {
            StorageError::InvalidInput(format!("Invalid Ceph user {:?}", record.user))
        })?;
        if record.pool.is_empty() || record.pool.contains('/') || record.pool.contains('\0') {
            return Err(StorageError::InvalidInput(format!(
                "Invalid pool name {:?}",
                record.pool
            )));
        }
        if self.vg_list()?.iter().any(|v| v.name == record.name) {
            return Err(StorageError::AlreadyExists(format!(
                "volume group {}",
                record.name
            )));
        }
        crate::volume::rbd::cluster::check_file(&record.conf, "Ceph configuration file")?;
        if let Some(k) = &record.keyring {
            crate::volume::rbd::cluster::check_file(k, "keyring")?;
        }
        let group = crate::volume::rbd::group::RbdGroup::open(record, false)?;
        self.rbd_groups().update(|list| {
            if list.iter().any(|g| g.name == record.name) {
                return Err(StorageError::AlreadyExists(format!(
                    "volume group {}",
                    record.name
                )));
            }
            list.push(record.clone());
            Ok(())
        })?;
        Ok(Group::Rbd(group))
    }

    /// Forgets RBD group `name` once it holds no volumes (its pool and cluster stay as they
    /// are).
    #[cfg(feature = "rbd")]
    pub fn rbd_group_remove(&self, name: &str) -> Result<()> {
        let Some(record) = self.rbd_groups().get(name)? else {
            return Err(StorageError::NotFound(
                format!("volume group {name}").into(),
            ));
        };
        let g = crate::volume::rbd::group::RbdGroup::open(&record, true)?;
        let n = g.images()?.len();
        if n > 0 {
            return Err(StorageError::Busy(format!(
                "volume group {name} ({n} volumes remain in it; remove them first)"
            )));
        }
        self.rbd_groups().update(|list| {
            list.retain(|g| g.name != name);
            Ok(())
        })
    }
}

#[cfg(not(feature = "rbd"))]
impl VolumeStore {
    /// RBD groups need the `rbd` feature: refused by name without it.
    pub fn rbd_group_create(&self, record: &RbdGroupRecord) -> Result<Group> {
        Err(StorageError::Unsupported(format!(
            "volume group {} on Ceph RBD: this strata was built without RBD support (the `rbd` \
             feature)",
            record.name
        )))
    }

    /// RBD groups need the `rbd` feature: refused by name without it.
    pub fn rbd_group_remove(&self, name: &str) -> Result<()> {
        Err(StorageError::Unsupported(format!(
            "removing volume group {name} on Ceph RBD: this strata was built without RBD \
             support (the `rbd` feature)"
        )))
    }
}

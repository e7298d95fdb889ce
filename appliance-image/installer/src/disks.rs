//! Finding the disks of the machine and choosing the target, from sysfs and the mount table
//! (the appliance has no udev). Everything is read through a [`SysView`], so tests run on a
//! fake `/sys/block`, `/dev` and mount table.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use strata_storage::util::format_size;

use super::answers::DiskChoice;
use super::error::{InstallError, InstallResult};

/// Magic at the start of a Strata physical volume label (copies at bytes 0 and 4096); see
/// docs/format-volume.md.
pub const PV_LABEL_MAGIC: &[u8; 8] = b"STRATAPV";
/// GPT partition names the installer gives; finding them means an earlier installation.
pub const PART_NAMES: [&str; 4] = ["strata-bios", "strata-boot", "strata-root", "strata-pv"];

/// Where the system's block-device facts are read from.
#[derive(Clone, Debug)]
pub struct SysView {
    /// `/sys/block`.
    pub sys_block: PathBuf,
    /// `/dev`.
    pub dev: PathBuf,
    /// `/proc/self/mountinfo`.
    pub mountinfo: PathBuf,
}

impl Default for SysView {
    fn default() -> SysView {
        SysView {
            sys_block: "/sys/block".into(),
            dev: "/dev".into(),
            mountinfo: "/proc/self/mountinfo".into(),
        }
    }
}

/// A partition of a disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// Kernel name, e.g. `vda3`.
    pub name: String,
    /// `major:minor`.
    pub devno: String,
    /// GPT partition name, if any.
    pub label: Option<String>,
}

/// A whole disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    /// Kernel name, e.g. `vda`.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// `major:minor`.
    pub devno: String,
    /// Model, if the driver reports one.
    pub model: String,
    /// Read-only.
    pub read_only: bool,
    /// Partitions.
    pub partitions: Vec<Partition>,
}

impl Disk {
    /// `/dev/NAME` under the view's `/dev`.
    pub fn path(&self, view: &SysView) -> PathBuf {
        view.dev.join(&self.name)
    }

    /// One line for lists: name, size, model.
    pub fn describe(&self) -> String {
        let model = if self.model.is_empty() {
            String::new()
        } else {
            format!(" {}", self.model)
        };
        format!("{} ({}{model})", self.name, format_size(self.size))
    }
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Kernel names that are never installation targets: loop, RAM and compressed-RAM disks,
/// CD-ROMs, floppies, device-mapper and MD devices, network block devices.
fn never_a_target(name: &str) -> bool {
    ["loop", "ram", "zram", "sr", "fd", "dm-", "md", "nbd"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// The machine's disks (sorted by name), skipping devices that are never targets and empty
/// devices (a card reader without a card).
pub fn list_disks(view: &SysView) -> InstallResult<Vec<Disk>> {
    let entries = std::fs::read_dir(&view.sys_block)
        .map_err(|e| InstallError::io("Listing", &view.sys_block, e))?;
    let mut disks = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if never_a_target(&name) {
            continue;
        }
        let dir = entry.path();
        let sectors: u64 = read_trimmed(&dir.join("size"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if sectors == 0 {
            continue;
        }
        let mut partitions = Vec::new();
        for part in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let pdir = part.path();
            if !pdir.join("partition").exists() {
                continue;
            }
            let label = read_trimmed(&pdir.join("uevent")).and_then(|u| {
                u.lines()
                    .find_map(|l| l.strip_prefix("PARTNAME=").map(str::to_string))
            });
            partitions.push(Partition {
                name: part.file_name().to_string_lossy().into_owned(),
                devno: read_trimmed(&pdir.join("dev")).unwrap_or_default(),
                label,
            });
        }
        partitions.sort_by(|a, b| a.name.cmp(&b.name));
        disks.push(Disk {
            size: sectors.saturating_mul(512),
            devno: read_trimmed(&dir.join("dev")).unwrap_or_default(),
            model: read_trimmed(&dir.join("device/model")).unwrap_or_default(),
            read_only: read_trimmed(&dir.join("ro")).as_deref() == Some("1"),
            partitions,
            name,
        });
    }
    disks.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(disks)
}

/// Mounted devices: `major:minor` to mount point.
pub fn mounts(view: &SysView) -> InstallResult<HashMap<String, String>> {
    let text = std::fs::read_to_string(&view.mountinfo)
        .map_err(|e| InstallError::io("Reading", &view.mountinfo, e))?;
    Ok(parse_mountinfo(&text))
}

fn parse_mountinfo(text: &str) -> HashMap<String, String> {
    let mut map = HashMap::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.len() > 4 {
            // Mount points escape spaces as \040; that is fine for messages.
            map.entry(fields[2].to_string())
                .or_insert_with(|| fields[4].to_string());
        }
    }
    map
}

/// The `major:minor` of the file system mounted at `mountpoint`, if any.
pub fn devno_mounted_at(view: &SysView, mountpoint: &Path) -> InstallResult<Option<String>> {
    let text = std::fs::read_to_string(&view.mountinfo)
        .map_err(|e| InstallError::io("Reading", &view.mountinfo, e))?;
    let want = mountpoint.to_string_lossy();
    Ok(text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(' ').collect();
        (f.len() > 4 && f[4] == want).then(|| f[2].to_string())
    }))
}

/// The disk that is, or holds the partition with, this kernel name or `major:minor`.
pub fn disk_holding<'a>(disks: &'a [Disk], name_or_devno: &str) -> Option<&'a Disk> {
    let n = name_or_devno.strip_prefix("/dev/").unwrap_or(name_or_devno);
    disks.iter().find(|d| {
        d.name == n || d.devno == n || d.partitions.iter().any(|p| p.name == n || p.devno == n)
    })
}

/// What Strata left on a disk: a PV label on the disk or one of its partitions, or partitions
/// named by an earlier installation. `None` for a disk without either.
pub fn strata_signature(view: &SysView, disk: &Disk) -> Option<String> {
    let names =
        std::iter::once(disk.name.as_str()).chain(disk.partitions.iter().map(|p| p.name.as_str()));
    for name in names {
        if has_pv_label(&view.dev.join(name)) {
            return Some(format!(
                "a Strata volume group (physical volume label on {name})"
            ));
        }
    }
    disk.partitions
        .iter()
        .find(|p| p.label.as_deref().is_some_and(|l| PART_NAMES.contains(&l)))
        .map(|p| {
            format!(
                "an earlier Strata installation (partition {} named {})",
                p.name,
                p.label.as_deref().unwrap_or_default()
            )
        })
}

fn has_pv_label(dev: &Path) -> bool {
    let Ok(f) = File::open(dev) else {
        return false;
    };
    [0u64, 4096].iter().any(|&off| {
        let mut magic = [0u8; 8];
        f.read_exact_at(&mut magic, off).is_ok() && &magic == PV_LABEL_MAGIC
    })
}

/// Disks the installer must not touch, with the reason (the installation medium, the token
/// medium).
pub type Exclusions = Vec<(String, String)>;

/// Chooses the target disk. `Auto` takes the only disk that is not excluded, not read-only and
/// at least `min_size` large.
pub fn choose<'a>(
    disks: &'a [Disk],
    choice: &DiskChoice,
    excluded: &Exclusions,
    min_size: u64,
) -> InstallResult<&'a Disk> {
    let excluded_why = |d: &Disk| {
        excluded
            .iter()
            .find(|(n, _)| *n == d.name)
            .map(|(_, w)| w.clone())
    };
    let listing = || {
        if disks.is_empty() {
            return "the machine reports no disks".to_string();
        }
        let all: Vec<String> = disks
            .iter()
            .map(|d| match excluded_why(d) {
                Some(why) => format!("{}: {why}", d.describe()),
                None if d.read_only => format!("{}: read-only", d.describe()),
                None => d.describe(),
            })
            .collect();
        format!("found {}", all.join(", "))
    };
    match choice {
        DiskChoice::Named(name) => {
            let disk = disks
                .iter()
                .find(|d| d.name == *name)
                .ok_or_else(|| InstallError::UnknownDisk(format!("/dev/{name}"), listing()))?;
            if let Some(why) = excluded_why(disk) {
                return Err(InstallError::InstallerDisk {
                    disk: format!("/dev/{name}"),
                    why,
                });
            }
            Ok(disk)
        }
        DiskChoice::Auto => {
            let usable: Vec<&Disk> = disks
                .iter()
                .filter(|d| excluded_why(d).is_none() && !d.read_only)
                .collect();
            let big: Vec<&Disk> = usable
                .iter()
                .copied()
                .filter(|d| d.size >= min_size)
                .collect();
            match (big.as_slice(), usable.as_slice()) {
                ([one], _) => Ok(one),
                ([], []) => Err(InstallError::NoDisk(listing())),
                // All too small: report on the largest.
                ([], some) => Ok(some
                    .iter()
                    .max_by_key(|d| d.size)
                    .copied()
                    .unwrap_or(some[0])),
                (several, _) => Err(InstallError::SeveralDisks(
                    several
                        .iter()
                        .map(|d| d.describe())
                        .collect::<Vec<_>>()
                        .join(", "),
                )),
            }
        }
    }
}

/// Refuses a target that is read-only, too small, mounted, or holds Strata data (unless
/// `wipe`).
pub fn check_target(
    view: &SysView,
    disk: &Disk,
    mounts: &HashMap<String, String>,
    wipe: bool,
    min_size: u64,
) -> InstallResult<()> {
    let path = format!("/dev/{}", disk.name);
    if disk.read_only {
        return Err(InstallError::ReadOnlyDisk(path));
    }
    if disk.size < min_size {
        return Err(InstallError::DiskTooSmall {
            disk: path,
            size: format_size(disk.size),
            min: format_size(min_size),
        });
    }
    let devs = std::iter::once((&disk.name, &disk.devno))
        .chain(disk.partitions.iter().map(|p| (&p.name, &p.devno)));
    for (name, devno) in devs {
        if let Some(mp) = mounts.get(devno.as_str()) {
            return Err(InstallError::DiskInUse {
                disk: path,
                what: format!("/dev/{name}"),
                mountpoint: mp.clone(),
            });
        }
    }
    if !wipe {
        if let Some(what) = strata_signature(view, disk) {
            return Err(InstallError::ExistingStrata { disk: path, what });
        }
    }
    Ok(())
}

/// The device name of partition `n` of a disk: `vda` → `vda3`, `nvme0n1` → `nvme0n1p3`.
pub fn partition_name(disk: &str, n: u32) -> String {
    if disk.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{disk}p{n}")
    } else {
        format!("{disk}{n}")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// A fake machine: sysfs entries, device files and a mount table in a temporary folder.
    pub(crate) struct Fake {
        _dir: tempfile::TempDir,
        pub(crate) view: SysView,
    }

    impl Fake {
        pub(crate) fn new() -> Fake {
            let dir = tempfile::tempdir().unwrap();
            let view = SysView {
                sys_block: dir.path().join("sys/block"),
                dev: dir.path().join("dev"),
                mountinfo: dir.path().join("mountinfo"),
            };
            std::fs::create_dir_all(&view.sys_block).unwrap();
            std::fs::create_dir_all(&view.dev).unwrap();
            std::fs::write(&view.mountinfo, "").unwrap();
            Fake { _dir: dir, view }
        }

        pub(crate) fn disk(&self, name: &str, devno: &str, size: u64) {
            let d = self.view.sys_block.join(name);
            std::fs::create_dir_all(d.join("device")).unwrap();
            std::fs::write(d.join("size"), format!("{}\n", size / 512)).unwrap();
            std::fs::write(d.join("dev"), format!("{devno}\n")).unwrap();
            std::fs::write(d.join("ro"), "0\n").unwrap();
            std::fs::write(d.join("device/model"), "QEMU HARDDISK   \n").unwrap();
            std::fs::write(self.view.dev.join(name), vec![0u8; 8192]).unwrap();
        }

        pub(crate) fn part(&self, disk: &str, name: &str, devno: &str, label: Option<&str>) {
            let d = self.view.sys_block.join(disk).join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("partition"), "1\n").unwrap();
            std::fs::write(d.join("dev"), format!("{devno}\n")).unwrap();
            let uevent = match label {
                Some(l) => format!("MAJOR=1\nPARTNAME={l}\n"),
                None => "MAJOR=1\n".into(),
            };
            std::fs::write(d.join("uevent"), uevent).unwrap();
            std::fs::write(self.view.dev.join(name), vec![0u8; 8192]).unwrap();
        }

        pub(crate) fn mount(&self, devno: &str, at: &str) {
            let mut t = std::fs::read_to_string(&self.view.mountinfo).unwrap();
            t.push_str(&format!(
                "30 1 {devno} / {at} ro,relatime - iso9660 /dev/x ro\n"
            ));
            std::fs::write(&self.view.mountinfo, t).unwrap();
        }
    }

    #[test]
    fn lists_disks_and_skips_non_targets() {
        let f = Fake::new();
        f.disk("vda", "253:0", 8 * GIB);
        f.part("vda", "vda1", "253:1", Some("EFI"));
        f.disk("sr0", "11:0", GIB);
        f.disk("loop0", "7:0", GIB);
        f.disk("sdz", "8:0", 0); // empty card reader
        let disks = list_disks(&f.view).unwrap();
        assert_eq!(disks.len(), 1);
        let d = &disks[0];
        assert_eq!(
            (d.name.as_str(), d.size, d.model.as_str()),
            ("vda", 8 * GIB, "QEMU HARDDISK")
        );
        assert_eq!(d.partitions[0].label.as_deref(), Some("EFI"));
        assert!(d.describe().contains("8 GiB"));
    }

    #[test]
    fn auto_choice_needs_exactly_one_eligible_disk() {
        let f = Fake::new();
        let min = 8 * GIB;
        // No disk at all.
        let e = choose(&[], &DiskChoice::Auto, &vec![], min).unwrap_err();
        assert!(matches!(e, InstallError::NoDisk(_)), "{e}");
        assert!(e.to_string().contains("No disk found"));

        f.disk("vda", "253:0", 10 * GIB);
        f.disk("vdb", "253:16", 4 << 20);
        let disks = list_disks(&f.view).unwrap();
        // Only the installer's own disk: no disk, and the message says why.
        let only_vdb = vec![disks[1].clone()];
        let excl = vec![("vdb".to_string(), "the token medium".to_string())];
        let e = choose(&only_vdb, &DiskChoice::Auto, &excl, min).unwrap_err();
        assert!(
            e.to_string()
                .contains("vdb (4 MiB QEMU HARDDISK): the token medium"),
            "{e}"
        );
        // The small stick is passed over for the large disk.
        assert_eq!(
            choose(&disks, &DiskChoice::Auto, &vec![], min)
                .unwrap()
                .name,
            "vda"
        );
        // Two large disks: the operator must name one.
        f.disk("vdc", "253:32", 20 * GIB);
        let disks = list_disks(&f.view).unwrap();
        let e = choose(&disks, &DiskChoice::Auto, &vec![], min).unwrap_err();
        assert!(matches!(e, InstallError::SeveralDisks(_)), "{e}");
        // Only small disks: the largest is chosen, so that check_target says it is too small.
        let small = vec![disks[1].clone()];
        assert_eq!(
            choose(&small, &DiskChoice::Auto, &vec![], min)
                .unwrap()
                .name,
            "vdb"
        );
    }

    #[test]
    fn named_choice_refuses_unknown_and_installer_disks() {
        let f = Fake::new();
        f.disk("sda", "8:0", 10 * GIB);
        f.disk("sdb", "8:16", 10 * GIB);
        let disks = list_disks(&f.view).unwrap();
        let excl = vec![("sdb".to_string(), "the installation medium".to_string())];
        let named = |n: &str| DiskChoice::Named(n.into());
        assert_eq!(choose(&disks, &named("sda"), &excl, 0).unwrap().name, "sda");
        let e = choose(&disks, &named("sdb"), &excl, 0).unwrap_err();
        assert!(matches!(e, InstallError::InstallerDisk { .. }), "{e}");
        assert!(e.to_string().contains("holds the installer itself"), "{e}");
        let e = choose(&disks, &named("nvme0n1"), &excl, 0).unwrap_err();
        assert!(e.to_string().contains("/dev/nvme0n1 not found"), "{e}");
    }

    #[test]
    fn target_checks_size_mounts_and_strata_data() {
        let f = Fake::new();
        f.disk("vda", "253:0", 2 * GIB);
        f.disk("vdb", "253:16", 10 * GIB);
        f.part("vdb", "vdb1", "253:17", None);
        f.disk("vdc", "253:32", 10 * GIB);
        f.part("vdc", "vdc4", "253:36", None);
        f.disk("vdd", "253:48", 10 * GIB);
        f.part("vdd", "vdd3", "253:51", Some("strata-root"));
        // A PV label on vdc4 (second copy only, the first damaged).
        let mut pv = vec![0u8; 8192];
        pv[4096..4104].copy_from_slice(PV_LABEL_MAGIC);
        std::fs::write(f.view.dev.join("vdc4"), pv).unwrap();
        f.mount("253:17", "/run/strata/media");
        let disks = list_disks(&f.view).unwrap();
        let m = mounts(&f.view).unwrap();
        let min = 8 * GIB;

        let e = check_target(&f.view, &disks[0], &m, false, min).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Disk /dev/vda is too small: 2 GiB; Strata needs at least 8 GiB"
        );
        let e = check_target(&f.view, &disks[1], &m, true, min).unwrap_err();
        assert!(
            e.to_string()
                .contains("/dev/vdb1 is mounted at /run/strata/media"),
            "{e}"
        );
        let e = check_target(&f.view, &disks[2], &m, false, min).unwrap_err();
        assert!(
            e.to_string()
                .contains("a Strata volume group (physical volume label on vdc4)"),
            "{e}"
        );
        assert!(e.to_string().contains("wipe=yes"), "{e}");
        check_target(&f.view, &disks[2], &m, true, min).unwrap();
        let e = check_target(&f.view, &disks[3], &m, false, min).unwrap_err();
        assert!(e.to_string().contains("earlier Strata installation"), "{e}");

        assert_eq!(disk_holding(&disks, "253:17").unwrap().name, "vdb");
        assert_eq!(disk_holding(&disks, "/dev/vdc4").unwrap().name, "vdc");
        assert!(disk_holding(&disks, "sr0").is_none());
        assert_eq!(
            devno_mounted_at(&f.view, Path::new("/run/strata/media"))
                .unwrap()
                .as_deref(),
            Some("253:17")
        );
    }

    #[test]
    fn partition_names_follow_the_kernel() {
        assert_eq!(partition_name("vda", 3), "vda3");
        assert_eq!(partition_name("sdb", 1), "sdb1");
        assert_eq!(partition_name("nvme0n1", 2), "nvme0n1p2");
        assert_eq!(partition_name("mmcblk0", 4), "mmcblk0p4");
    }
}

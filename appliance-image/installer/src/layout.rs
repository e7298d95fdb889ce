//! The target disk's partition layout (GPT), computed from the disk size alone:
//!
//! | # | name | type | size | use |
//! |---|---|---|---|---|
//! | 1 | strata-bios | BIOS boot (EF02) | 1 MiB | GRUB's core image when booting by BIOS |
//! | 2 | strata-boot | EFI system (EF00) | 256 MiB | FAT32: kernel, initramfs, GRUB for BIOS and UEFI |
//! | 3 | strata-root | Linux x86-64 root (8304) | ¼ of the disk, 4–64 GiB | ext4: the system and /var/lib/strata |
//! | 4 | strata-pv | Linux data (8300) | the rest | the Strata physical volume (default volume group) |
//!
//! Partitions start on MiB boundaries, which suits 512-byte and 4 KiB sectors alike; the first
//! and last MiB are left to the GPT headers.

use strata_storage::util::format_size;

use super::disks::PART_NAMES;
use super::error::{InstallError, InstallResult};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// The BIOS boot partition: GRUB's core image (about 100 KiB) fits with room to spare.
pub const BIOS_SIZE: u64 = MIB;
/// The boot (EFI system) partition: a kernel and two initramfs images fit several times over.
pub const BOOT_SIZE: u64 = 256 * MIB;
/// Smallest root file system: the system takes about 150 MiB; the rest is room for
/// /var/lib/strata (tokens, job records, images managed through the API, the backup
/// datastore) and logs.
pub const MIN_ROOT: u64 = 4 * GIB;
/// Default root size is a quarter of the disk, at most this.
pub const MAX_DEFAULT_ROOT: u64 = 64 * GIB;
/// Smallest physical volume worth creating.
pub const MIN_PV: u64 = 2 * GIB;
/// Smallest disk accepted: the partitions above at their minimum sizes, rounded up.
pub const MIN_DISK: u64 = 8 * GIB;

/// One partition: offset and size in bytes, MiB-aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Offset from the start of the disk.
    pub start: u64,
    /// Size.
    pub size: u64,
}

/// The partitions of the target disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// BIOS boot partition.
    pub bios: Extent,
    /// EFI system partition, mounted at /boot.
    pub boot: Extent,
    /// Root file system.
    pub root: Extent,
    /// Strata physical volume.
    pub pv: Extent,
}

/// Partition numbers of the layout.
pub const BIOS_PART: u32 = 1;
/// EFI system partition number.
pub const BOOT_PART: u32 = 2;
/// Root partition number.
pub const ROOT_PART: u32 = 3;
/// Physical volume partition number.
pub const PV_PART: u32 = 4;

impl Layout {
    /// The layout for a disk of `disk_size` bytes; `root_size` overrides the default root size.
    pub fn plan(disk: &str, disk_size: u64, root_size: Option<u64>) -> InstallResult<Layout> {
        if disk_size < MIN_DISK {
            return Err(InstallError::DiskTooSmall {
                disk: disk.to_string(),
                size: format_size(disk_size),
                min: format_size(MIN_DISK),
            });
        }
        // The last MiB holds the backup GPT.
        let usable_end = (disk_size / MIB) * MIB - MIB;
        let bios = Extent {
            start: MIB,
            size: BIOS_SIZE,
        };
        let boot = Extent {
            start: bios.start + bios.size,
            size: BOOT_SIZE,
        };
        let root_start = boot.start + boot.size;
        let root = match root_size {
            Some(r) => {
                let r = r.div_ceil(MIB) * MIB;
                if r < MIN_ROOT {
                    return Err(InstallError::answer(
                        "root-size",
                        &format_size(r),
                        format!(
                            "the root file system needs at least {}",
                            format_size(MIN_ROOT)
                        ),
                    ));
                }
                r
            }
            None => ((disk_size / 4) / MIB * MIB).clamp(MIN_ROOT, MAX_DEFAULT_ROOT),
        };
        let pv_start = root_start + root;
        let pv_size = usable_end.saturating_sub(pv_start);
        if pv_size < MIN_PV {
            return Err(InstallError::answer(
                "root-size",
                &format_size(root),
                format!(
                    "it leaves {} of {} for the physical volume; at least {} is needed",
                    format_size(pv_size),
                    format_size(disk_size),
                    format_size(MIN_PV)
                ),
            ));
        }
        Ok(Layout {
            bios,
            boot,
            root: Extent {
                start: root_start,
                size: root,
            },
            pv: Extent {
                start: pv_start,
                size: pv_size,
            },
        })
    }

    /// `sgdisk` arguments that create this layout on an empty partition table.
    pub fn sgdisk_args(&self) -> Vec<String> {
        let parts = [
            (BIOS_PART, self.bios, "ef02"),
            (BOOT_PART, self.boot, "ef00"),
            (ROOT_PART, self.root, "8304"),
            (PV_PART, self.pv, "8300"),
        ];
        let mut args = Vec::new();
        for (n, e, code) in parts {
            args.push(format!("--new={n}:{}M:+{}M", e.start / MIB, e.size / MIB));
            args.push(format!("--typecode={n}:{code}"));
            args.push(format!(
                "--change-name={n}:{}",
                PART_NAMES[(n - 1) as usize]
            ));
        }
        args
    }

    /// One line per partition, for the plan shown before installing.
    pub fn describe(&self, disk: &str) -> Vec<String> {
        [
            (BIOS_PART, self.bios, "BIOS boot"),
            (BOOT_PART, self.boot, "boot (EFI system, FAT32, /boot)"),
            (ROOT_PART, self.root, "root (ext4, /)"),
            (PV_PART, self.pv, "Strata physical volume"),
        ]
        .iter()
        .map(|(n, e, what)| {
            format!(
                "{} {:>10}  {what}",
                super::disks::partition_name(disk, *n),
                format_size(e.size)
            )
        })
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_invariants(l: &Layout, disk_size: u64) {
        let parts = [l.bios, l.boot, l.root, l.pv];
        assert_eq!(parts[0].start, MIB);
        for w in parts.windows(2) {
            assert_eq!(
                w[0].start + w[0].size,
                w[1].start,
                "partitions are contiguous"
            );
        }
        for p in parts {
            assert_eq!(p.start % MIB, 0);
            assert_eq!(p.size % MIB, 0);
        }
        assert!(
            l.pv.start + l.pv.size + MIB <= disk_size,
            "backup GPT has room"
        );
        assert!(l.pv.size >= MIN_PV);
    }

    #[test]
    fn default_root_is_a_quarter_of_the_disk_within_bounds() {
        for (disk, root) in [
            (MIN_DISK, MIN_ROOT),
            (10 * GIB + 12345, MIN_ROOT),
            (100 * GIB, 25 * GIB),
            (4096 * GIB, MAX_DEFAULT_ROOT),
        ] {
            let l = Layout::plan("/dev/vda", disk, None).unwrap();
            assert_eq!(l.root.size, root, "disk {disk}");
            check_invariants(&l, disk);
        }
    }

    #[test]
    fn too_small_disks_and_roots_are_refused() {
        let e = Layout::plan("/dev/vda", 2 * GIB, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Disk /dev/vda is too small: 2 GiB; Strata needs at least 8 GiB"
        );
        let e = Layout::plan("/dev/vda", 10 * GIB, Some(GIB)).unwrap_err();
        assert!(
            e.to_string()
                .contains("root file system needs at least 4 GiB"),
            "{e}"
        );
        let e = Layout::plan("/dev/vda", 10 * GIB, Some(9 * GIB)).unwrap_err();
        assert!(e.to_string().contains("for the physical volume"), "{e}");
        let l = Layout::plan("/dev/vda", 10 * GIB, Some(5 * GIB + 1)).unwrap();
        assert_eq!(l.root.size, 5 * GIB + MIB);
        check_invariants(&l, 10 * GIB);
    }

    #[test]
    fn sgdisk_arguments_name_every_partition() {
        let l = Layout::plan("/dev/vda", 8 * GIB, None).unwrap();
        let args = l.sgdisk_args();
        assert_eq!(args[0], "--new=1:1M:+1M");
        assert_eq!(args[1], "--typecode=1:ef02");
        assert_eq!(args[2], "--change-name=1:strata-bios");
        assert_eq!(args[3], "--new=2:2M:+256M");
        assert_eq!(args[6], "--new=3:258M:+4096M");
        assert_eq!(args[9], format!("--new=4:4354M:+{}M", 8192 - 4354 - 1));
        assert_eq!(args[11], "--change-name=4:strata-pv");
        assert!(l.describe("nvme0n1")[3].starts_with("nvme0n1p4"));
    }
}

//! Partitioning the target disk and making its file systems.
//!
//! Partition tables are written by `sgdisk` (Debian's gdisk package), file systems by
//! `mkfs.fat` (dosfstools) and `mkfs.ext4` (e2fsprogs). These are the reference tools for
//! their formats: a GPT needs a protective MBR, primary and backup headers and entry arrays
//! with CRCs, and the kernel must be told to re-read the table; an ext4 file system has no
//! maintained Rust writer at all. Their exit status and messages are checked, and the
//! identifiers (file-system UUIDs) are chosen here and passed in, so that no probing tool
//! (`blkid`) is needed afterwards.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::disks::{partition_name, SysView};
use super::error::{InstallError, InstallResult};
use super::layout::{Layout, BIOS_PART, BOOT_PART, PV_PART, ROOT_PART};
use super::run::run;

/// How long to wait for the kernel to create partition device nodes.
const NODE_WAIT: Duration = Duration::from_secs(15);
/// Bytes zeroed at the start of the disk and of the PV partition, so that no old signature
/// (a PV label and its metadata area, a file-system superblock) survives.
const ZERO_HEAD: u64 = 4 << 20;
/// Bytes zeroed at the end of the disk: the backup GPT (33 sectors) and then some.
const ZERO_TAIL: u64 = 1 << 20;

/// File-system identifiers chosen for the new system.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsIds {
    /// The root file system's UUID (ext4), e.g. `0b6c…-…`.
    pub root_uuid: String,
    /// The boot file system's volume id (FAT), e.g. `1A2B-3C4D`.
    pub boot_uuid: String,
}

impl FsIds {
    /// Fresh random identifiers.
    pub fn random() -> InstallResult<FsIds> {
        let mut b = [0u8; 20];
        getrandom::fill(&mut b).map_err(|e| {
            InstallError::io(
                "Reading",
                "the kernel's random numbers",
                std::io::Error::other(e.to_string()),
            )
        })?;
        Ok(FsIds::from_bytes(&b))
    }

    fn from_bytes(b: &[u8; 20]) -> FsIds {
        let mut u = [0u8; 16];
        u.copy_from_slice(&b[..16]);
        u[6] = (u[6] & 0x0f) | 0x40; // version 4
        u[8] = (u[8] & 0x3f) | 0x80; // RFC 4122 variant
        let hex: String = u.iter().map(|x| format!("{x:02x}")).collect();
        let root_uuid = format!(
            "{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        );
        let boot_uuid = format!("{:02X}{:02X}-{:02X}{:02X}", b[16], b[17], b[18], b[19]);
        FsIds {
            root_uuid,
            boot_uuid,
        }
    }
}

/// The partitions' device paths once created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionPaths {
    /// EFI system partition.
    pub boot: PathBuf,
    /// Root.
    pub root: PathBuf,
    /// Physical volume.
    pub pv: PathBuf,
}

impl PartitionPaths {
    /// Paths of the layout's partitions of `disk` under the view's `/dev`.
    pub fn of(view: &SysView, disk: &str) -> PartitionPaths {
        let p = |n| view.dev.join(partition_name(disk, n));
        PartitionPaths {
            boot: p(BOOT_PART),
            root: p(ROOT_PART),
            pv: p(PV_PART),
        }
    }
}

/// Zeroes `[start, end)` of `dev` (whole MiBs from `start`, cut at `end`) and syncs.
fn zero_range(dev: &Path, start: u64, end: u64) -> InstallResult<()> {
    let f = OpenOptions::new()
        .write(true)
        .open(dev)
        .map_err(|e| InstallError::io("Opening", dev, e))?;
    let zeros = vec![0u8; 1 << 20];
    let mut off = start;
    while off < end {
        let n = (end - off).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], off)
            .map_err(|e| InstallError::io("Clearing", dev, e))?;
        off += n as u64;
    }
    f.sync_all()
        .map_err(|e| InstallError::io("Syncing", dev, e))
}

fn zero_head(dev: &Path, bytes: u64) -> InstallResult<()> {
    zero_range(dev, 0, bytes)
}

/// Replaces the partition table of `disk` (`disk_size` bytes) with the layout and waits for
/// the partition devices.
pub fn partition(
    view: &SysView,
    disk: &str,
    disk_size: u64,
    layout: &Layout,
) -> InstallResult<PartitionPaths> {
    let dev = view.dev.join(disk);
    // Clear the old MBR and primary GPT with the first partitions' signatures, and the backup
    // GPT in the last MiB: sgdisk would otherwise recover the old table from the backup copy
    // (and fail, saying so). `--clear` then writes a protective MBR and both GPT copies.
    zero_head(&dev, ZERO_HEAD)?;
    zero_range(&dev, disk_size.saturating_sub(ZERO_TAIL), disk_size)?;
    let mut args = vec!["--clear".to_string()];
    args.extend(layout.sgdisk_args());
    args.push(dev.to_string_lossy().into_owned());
    run("sgdisk", &args)?;
    let paths = PartitionPaths::of(view, disk);
    // Wait until the kernel's partitions are the new ones (same names as an old table's, so
    // their device nodes existing proves nothing) and their device nodes exist.
    let deadline = Instant::now() + NODE_WAIT;
    let mut reread = false;
    while !(kernel_sees_layout(view, disk, layout)
        && [&paths.boot, &paths.root, &paths.pv]
            .iter()
            .all(|p| p.exists()))
    {
        if Instant::now() > deadline {
            return Err(InstallError::Timeout(format!(
                "The kernel did not take the new partition table of {} within {} s \
                 (is a partition of it in use?)",
                dev.display(),
                NODE_WAIT.as_secs()
            )));
        }
        if !reread && Instant::now() + NODE_WAIT / 2 > deadline {
            // sgdisk asks the kernel to re-read the table; ask once more if it is slow.
            let _ = run(
                "blockdev",
                &[std::ffi::OsStr::new("--rereadpt"), dev.as_os_str()],
            );
            reread = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The PV partition must not show an old label to `strata pv create`.
    zero_head(&paths.pv, ZERO_HEAD)?;
    Ok(paths)
}

/// Whether the kernel's partitions of `disk` (sysfs `start` and `size`, in 512-byte units)
/// are those of `layout`.
pub fn kernel_sees_layout(view: &SysView, disk: &str, layout: &Layout) -> bool {
    let read = |part: &str, field: &str| -> Option<u64> {
        std::fs::read_to_string(view.sys_block.join(disk).join(part).join(field))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    [
        (BIOS_PART, layout.bios),
        (BOOT_PART, layout.boot),
        (ROOT_PART, layout.root),
        (PV_PART, layout.pv),
    ]
    .iter()
    .all(|(n, e)| {
        let part = partition_name(disk, *n);
        read(&part, "start") == Some(e.start / 512) && read(&part, "size") == Some(e.size / 512)
    })
}

/// Makes the boot (FAT32) and root (ext4) file systems with the given identifiers.
pub fn make_filesystems(paths: &PartitionPaths, ids: &FsIds) -> InstallResult<()> {
    let volume_id = ids.boot_uuid.replace('-', "");
    run(
        "mkfs.fat",
        &[
            "-F",
            "32",
            "-n",
            "STRATA-BOOT",
            "-i",
            &volume_id,
            &paths.boot.to_string_lossy(),
        ],
    )?;
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-L",
            "strata-root",
            "-U",
            &ids.root_uuid,
            &paths.root.to_string_lossy(),
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_well_formed() {
        let ids = FsIds::from_bytes(&[0xab; 20]);
        assert_eq!(ids.root_uuid, "abababab-abab-4bab-abab-abababababab");
        assert_eq!(ids.boot_uuid, "ABAB-ABAB");
        let a = FsIds::random().unwrap();
        let b = FsIds::random().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.root_uuid.len(), 36);
        assert_eq!(a.boot_uuid.len(), 9);
    }

    #[test]
    fn the_kernels_partitions_are_compared_with_the_layout() {
        let dir = tempfile::tempdir().unwrap();
        let view = SysView {
            sys_block: dir.path().into(),
            ..SysView::default()
        };
        let layout = Layout::plan("/dev/vda", 10 << 30, None).unwrap();
        let write = |n: u32, start: u64, size: u64| {
            let p = dir.path().join("vda").join(format!("vda{n}"));
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("start"), format!("{start}\n")).unwrap();
            std::fs::write(p.join("size"), format!("{size}\n")).unwrap();
        };
        assert!(!kernel_sees_layout(&view, "vda", &layout));
        for (n, e) in [
            (1, layout.bios),
            (2, layout.boot),
            (3, layout.root),
            (4, layout.pv),
        ] {
            write(n, e.start / 512, e.size / 512);
        }
        assert!(kernel_sees_layout(&view, "vda", &layout));
        // An old table with a different root size is not the new one.
        write(3, layout.root.start / 512, layout.root.size / 512 + 2048);
        assert!(!kernel_sees_layout(&view, "vda", &layout));
    }

    #[test]
    fn zeroing_clears_old_signatures() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("vda4");
        std::fs::write(&dev, vec![0xffu8; 3 << 20]).unwrap();
        zero_head(&dev, 2 << 20).unwrap();
        zero_range(&dev, (3 << 20) - 4096, 3 << 20).unwrap();
        let data = std::fs::read(&dev).unwrap();
        assert_eq!(data.len(), 3 << 20, "zeroing never grows the device");
        assert!(data[..2 << 20].iter().all(|&b| b == 0));
        assert!(data[2 << 20..(3 << 20) - 4096].iter().all(|&b| b == 0xff));
        assert!(data[(3 << 20) - 4096..].iter().all(|&b| b == 0));
        let view = SysView {
            dev: dir.path().into(),
            ..SysView::default()
        };
        assert_eq!(
            PartitionPaths::of(&view, "nvme0n1").pv,
            dir.path().join("nvme0n1p4")
        );
    }
}

//! Putting the system on the target: mounting its file systems, copying the running (live)
//! system onto them, and writing the installed system's configuration from the answers.
//!
//! The installed system is the live system itself (busybox, the tools, `strata`, kernel
//! modules: see appliance-image/README.md), so nothing has to be unpacked from elsewhere; only
//! the kernel and the small boot initramfs come from the installation medium.

use std::fmt::Write as _;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use super::answers::{Answers, Network};
use super::error::{InstallError, InstallResult};
use super::partition::{FsIds, PartitionPaths};
use super::run::run;

/// The installed system's data directory (`strata serve --data`, see rootfs/etc/strata/serve).
pub const INSTALLED_DATA_DIR: &str = "/var/lib/strata";
/// Top-level folders copied from the running system.
pub const SYSTEM_DIRS: [&str; 6] = ["bin", "sbin", "lib", "lib64", "usr", "etc"];
/// Folders created empty on the target, with their modes.
const EMPTY_DIRS: [(&str, u32); 11] = [
    ("proc", 0o555),
    ("sys", 0o555),
    ("dev", 0o755),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("mnt", 0o755),
    ("root", 0o700),
    ("boot", 0o755),
    ("var/lib/strata", 0o700),
    ("var/log", 0o755),
    ("var/tmp", 0o1777),
];

/// The target's file systems, mounted; unmounted again on drop if [`Mounted::unmount`] was
/// not called (after a failure).
#[derive(Debug)]
pub struct Mounted {
    root: PathBuf,
    mounted: Vec<PathBuf>,
}

impl Mounted {
    /// Mounts the root file system at `at` and the boot file system at `at/boot`.
    pub fn mount(paths: &PartitionPaths, at: &Path) -> InstallResult<Mounted> {
        std::fs::create_dir_all(at).map_err(|e| InstallError::io("Creating", at, e))?;
        let mut m = Mounted {
            root: at.to_path_buf(),
            mounted: Vec::new(),
        };
        mount_one("ext4", &paths.root, at)?;
        m.mounted.push(at.to_path_buf());
        let boot = at.join("boot");
        std::fs::create_dir_all(&boot).map_err(|e| InstallError::io("Creating", &boot, e))?;
        mount_one("vfat", &paths.boot, &boot)?;
        m.mounted.push(boot);
        Ok(m)
    }

    /// The target's root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Flushes and unmounts, innermost first.
    pub fn unmount(mut self) -> InstallResult<()> {
        run("sync", &[] as &[&str])?;
        while let Some(p) = self.mounted.pop() {
            run("umount", &[&p])?;
        }
        Ok(())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        while let Some(p) = self.mounted.pop() {
            let _ = run("umount", &[&p]);
        }
    }
}

fn mount_one(fstype: &str, dev: &Path, at: &Path) -> InstallResult<()> {
    run(
        "mount",
        &["-t", fstype, &dev.to_string_lossy(), &at.to_string_lossy()],
    )?;
    Ok(())
}

/// Files, folders and symbolic links copied, and bytes of file data.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyStats {
    /// Entries copied.
    pub entries: u64,
    /// Bytes of regular files.
    pub bytes: u64,
}

/// Copies `src` to `dst` (which must not exist): folders, regular files and symbolic links
/// with their permission bits. Device nodes, sockets and pipes are skipped (the live system
/// has none under its system folders).
pub fn copy_tree(src: &Path, dst: &Path, stats: &mut CopyStats) -> InstallResult<()> {
    let meta = std::fs::symlink_metadata(src).map_err(|e| InstallError::io("Reading", src, e))?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = std::fs::read_link(src).map_err(|e| InstallError::io("Reading", src, e))?;
        symlink(&target, dst).map_err(|e| InstallError::io("Creating", dst, e))?;
    } else if ft.is_dir() {
        std::fs::create_dir(dst).map_err(|e| InstallError::io("Creating", dst, e))?;
        let mut names: Vec<_> = std::fs::read_dir(src)
            .map_err(|e| InstallError::io("Listing", src, e))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| InstallError::io("Listing", src, e))?;
        names.sort();
        for name in names {
            copy_tree(&src.join(&name), &dst.join(&name), stats)?;
        }
        std::fs::set_permissions(dst, meta.permissions())
            .map_err(|e| InstallError::io("Setting permissions of", dst, e))?;
    } else if ft.is_file() {
        stats.bytes += std::fs::copy(src, dst).map_err(|e| InstallError::io("Copying", src, e))?;
    } else {
        tracing::warn!(path = %src.display(), "not copied: neither file, folder nor link");
        return Ok(());
    }
    stats.entries += 1;
    Ok(())
}

/// Copies the running system's folders from `source` to the mounted target and creates the
/// empty ones.
pub fn copy_system(source: &Path, target: &Path) -> InstallResult<CopyStats> {
    let mut stats = CopyStats::default();
    for dir in SYSTEM_DIRS {
        let src = source.join(dir);
        if std::fs::symlink_metadata(&src).is_ok() {
            copy_tree(&src, &target.join(dir), &mut stats)?;
        }
    }
    for (dir, mode) in EMPTY_DIRS {
        let p = target.join(dir);
        std::fs::create_dir_all(&p).map_err(|e| InstallError::io("Creating", &p, e))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
            .map_err(|e| InstallError::io("Setting permissions of", &p, e))?;
    }
    Ok(stats)
}

/// Copies the kernel and the boot initramfs from the installation medium to `/boot`.
pub fn install_kernel(media: &Path, target: &Path) -> InstallResult<()> {
    for (from, to) in [
        ("boot/vmlinuz", "boot/vmlinuz"),
        ("boot/initrd-disk.img", "boot/initrd.img"),
    ] {
        let (src, dst) = (media.join(from), target.join(to));
        std::fs::copy(&src, &dst).map_err(|e| InstallError::io("Copying", &src, e))?;
    }
    Ok(())
}

/// `/etc/strata/appliance.conf`: read by the boot scripts with the shell's `.`, so every
/// value is single-quoted (answers are validated to contain no quote).
pub fn appliance_conf(a: &Answers, ids: &FsIds) -> String {
    let (network, interface, address, gateway, dns) = match &a.network {
        Network::Dhcp { interface } => (
            "dhcp",
            interface.clone(),
            String::new(),
            String::new(),
            String::new(),
        ),
        Network::Static {
            interface,
            address,
            prefix,
            gateway,
            dns,
        } => (
            "static",
            interface.clone(),
            format!("{address}/{prefix}"),
            gateway.map(|g| g.to_string()).unwrap_or_default(),
            dns.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(","),
        ),
        Network::None => (
            "none",
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ),
    };
    let mut s =
        String::from("# Written by `strata install`; read by /etc/strata/rc.boot and serve.\n");
    for (k, v) in [
        ("HOSTNAME", a.hostname.clone()),
        ("LISTEN", a.listen.to_string()),
        ("NETWORK", network.to_string()),
        ("INTERFACE", interface),
        ("ADDRESS", address),
        ("GATEWAY", gateway),
        ("DNS", dns),
        ("BRIDGE", a.bridge.clone().unwrap_or_default()),
        ("CONSOLE_TTY", a.console.tty.clone()),
        (
            "CONSOLE_SPEED",
            a.console.speed.map(|s| s.to_string()).unwrap_or_default(),
        ),
        ("BOOT_UUID", ids.boot_uuid.clone()),
        ("ROOT_UUID", ids.root_uuid.clone()),
    ] {
        debug_assert!(!v.contains('\''));
        let _ = writeln!(s, "{k}='{v}'");
    }
    s
}

/// `/etc/fstab` of the installed system.
pub fn fstab(ids: &FsIds) -> String {
    format!(
        "# <device> <mount point> <type> <options> <dump> <pass>\n\
         UUID={} / ext4 defaults 0 1\n\
         UUID={} /boot vfat umask=0077 0 2\n",
        ids.root_uuid, ids.boot_uuid
    )
}

/// Writes the installed system's configuration files.
pub fn write_config(target: &Path, a: &Answers, ids: &FsIds) -> InstallResult<()> {
    let write = |rel: &str, text: &str, mode: u32| -> InstallResult<()> {
        let p = target.join(rel);
        std::fs::write(&p, text).map_err(|e| InstallError::io("Writing", &p, e))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
            .map_err(|e| InstallError::io("Setting permissions of", &p, e))
    };
    write("etc/strata/appliance.conf", &appliance_conf(a, ids), 0o644)?;
    write("etc/fstab", &fstab(ids), 0o644)?;
    write("etc/hostname", &format!("{}\n", a.hostname), 0o644)?;
    let short = a.hostname.split('.').next().unwrap_or(&a.hostname);
    write(
        "etc/hosts",
        &format!(
            "127.0.0.1 localhost\n127.0.1.1 {} {short}\n::1 localhost\n",
            a.hostname
        ),
        0o644,
    )?;
    let root_hash = a.root_password_hash.as_deref().unwrap_or("*");
    write(
        "etc/shadow",
        &format!("root:{root_hash}:20000:0:99999:7:::\nnobody:*:20000:0:99999:7:::\n"),
        0o600,
    )?;
    if let Network::Static { dns, .. } = &a.network {
        let text: String = dns.iter().map(|d| format!("nameserver {d}\n")).collect();
        write("etc/resolv.conf", &text, 0o644)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answers::RawAnswers;

    fn answers(text: &str) -> Answers {
        Answers::from_raw(&RawAnswers::parse_file(text, Path::new("t")).unwrap()).unwrap()
    }

    fn ids() -> FsIds {
        FsIds {
            root_uuid: "11111111-2222-4333-8444-555555555555".into(),
            boot_uuid: "ABCD-0123".into(),
        }
    }

    #[test]
    fn copies_files_links_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("usr/bin")).unwrap();
        std::fs::create_dir_all(src.join("etc/strata")).unwrap();
        std::fs::write(src.join("usr/bin/tool"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            src.join("usr/bin/tool"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::fs::write(src.join("etc/shadow"), b"root:*:1::::::\n").unwrap();
        std::fs::set_permissions(
            src.join("etc/shadow"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        symlink("/bin/busybox", src.join("usr/bin/sh")).unwrap();
        std::os::unix::fs::symlink("tool", src.join("usr/bin/alias")).unwrap();
        let dst = dir.path().join("dst");
        std::fs::create_dir(&dst).unwrap();
        let stats = copy_system(&src, &dst).unwrap();
        assert_eq!(stats.bytes, 10 + 15);
        let mode = |p: &str| {
            std::fs::symlink_metadata(dst.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("usr/bin/tool"), 0o755);
        assert_eq!(mode("etc/shadow"), 0o600);
        assert_eq!(mode("tmp"), 0o1777);
        assert_eq!(mode("var/lib/strata"), 0o700);
        assert_eq!(
            std::fs::read_link(dst.join("usr/bin/sh")).unwrap(),
            Path::new("/bin/busybox")
        );
        assert_eq!(
            std::fs::read(dst.join("usr/bin/alias")).unwrap(),
            b"#!/bin/sh\n"
        );
        assert!(
            !dst.join("lib").exists(),
            "missing source folders are skipped"
        );
        // The target must be fresh: copying twice fails instead of mixing two systems.
        assert!(copy_system(&src, &dst).is_err());
    }

    #[test]
    fn configuration_files_reflect_the_answers() {
        let a = answers(
            "hostname = s1.lab\nlisten = 0.0.0.0:9000\nnetwork = static\naddress = 10.0.0.5/24\n\
             gateway = 10.0.0.1\ndns = 10.0.0.2,10.0.0.3\nconsole = ttyS1,9600\n\
             root-password-hash = $6$x$y\n",
        );
        let conf = appliance_conf(&a, &ids());
        for line in [
            "HOSTNAME='s1.lab'",
            "LISTEN='0.0.0.0:9000'",
            "NETWORK='static'",
            "INTERFACE='eth0'",
            "ADDRESS='10.0.0.5/24'",
            "GATEWAY='10.0.0.1'",
            "DNS='10.0.0.2,10.0.0.3'",
            "BRIDGE='br0'",
            "CONSOLE_TTY='ttyS1'",
            "CONSOLE_SPEED='9600'",
            "BOOT_UUID='ABCD-0123'",
        ] {
            assert!(
                conf.lines().any(|l| l == line),
                "{line} missing from\n{conf}"
            );
        }
        assert!(fstab(&ids()).contains("UUID=11111111-2222-4333-8444-555555555555 / ext4"));

        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc/strata")).unwrap();
        write_config(dir.path(), &a, &ids()).unwrap();
        let shadow = std::fs::read_to_string(dir.path().join("etc/shadow")).unwrap();
        assert!(shadow.starts_with("root:$6$x$y:"), "{shadow}");
        let resolv = std::fs::read_to_string(dir.path().join("etc/resolv.conf")).unwrap();
        assert_eq!(resolv, "nameserver 10.0.0.2\nnameserver 10.0.0.3\n");

        let dhcp = appliance_conf(&answers(""), &ids());
        assert!(dhcp.contains("NETWORK='dhcp'") && dhcp.contains("INTERFACE='auto'"));
        let unbridged = appliance_conf(&answers("bridge = none\n"), &ids());
        assert!(unbridged.lines().any(|l| l == "BRIDGE=''"), "{unbridged}");
        write_config(dir.path(), &answers(""), &ids()).unwrap();
        let shadow = std::fs::read_to_string(dir.path().join("etc/shadow")).unwrap();
        assert!(
            shadow.starts_with("root:*:"),
            "console login is locked without a hash"
        );
    }
}

//! Installing GRUB on the target for both BIOS and UEFI firmware.
//!
//! `grub-install` (Debian's grub2-common with grub-pc-bin and grub-efi-amd64-bin, shipped in
//! the image) builds the core images for the disk's partition table and file system and
//! writes them: for BIOS, the boot sector into the protective MBR and the core image into the
//! BIOS boot partition; for UEFI, `EFI/BOOT/BOOTX64.EFI` on the EFI system partition (the
//! removable-media path, which every UEFI firmware boots without an NVRAM entry, so the disk
//! also boots when moved to another machine). Writing those images by hand would mean
//! reimplementing grub-mkimage and grub-bios-setup. Both installs share one `grub.cfg` on the
//! boot partition, written here.

use std::path::Path;

use super::answers::Console;
use super::error::{InstallError, InstallResult};
use super::partition::FsIds;
use super::run::run;

/// GRUB's menu for the installed system.
pub fn grub_cfg(ids: &FsIds, console: &Console, version: &str) -> String {
    let mut s = String::from("# Written by `strata install`.\n");
    if let Some(unit) = console.serial_unit() {
        s.push_str(&format!(
            "serial --unit={unit} --speed={}\nterminal_input console serial\nterminal_output console serial\n",
            console.speed.unwrap_or(115_200)
        ));
    }
    s.push_str(&format!(
        "set timeout=2\nset default=0\n\
         search --no-floppy --fs-uuid --set=root {boot}\n\
         menuentry \"Strata appliance {version}\" {{\n\
         \x20 linux /vmlinuz root=UUID={root} rootfstype=ext4 rw {console} quiet panic=10\n\
         \x20 initrd /initrd.img\n\
         }}\n",
        boot = ids.boot_uuid,
        root = ids.root_uuid,
        console = console.kernel_args(),
    ));
    s
}

/// Installs GRUB for BIOS and UEFI onto `disk` whose boot partition is mounted at
/// `target/boot`, and writes the menu.
pub fn install(disk: &Path, target: &Path, cfg: &str) -> InstallResult<()> {
    let boot = target.join("boot");
    let boot_dir = format!("--boot-directory={}", boot.display());
    run(
        "grub-install",
        &[
            "--target=i386-pc",
            &boot_dir,
            "--modules=part_gpt fat",
            &disk.to_string_lossy(),
        ],
    )?;
    run(
        "grub-install",
        &[
            "--target=x86_64-efi",
            &format!("--efi-directory={}", boot.display()),
            &boot_dir,
            "--removable",
            "--no-nvram",
            "--modules=part_gpt fat",
        ],
    )?;
    let path = boot.join("grub/grub.cfg");
    std::fs::write(&path, cfg).map_err(|e| InstallError::io("Writing", &path, e))?;
    let efi = boot.join("EFI/BOOT/BOOTX64.EFI");
    if !efi.exists() {
        return Err(InstallError::io(
            "grub-install did not create",
            efi,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn menu_boots_the_root_by_uuid_on_the_chosen_console() {
        let ids = FsIds {
            root_uuid: "11111111-2222-4333-8444-555555555555".into(),
            boot_uuid: "ABCD-0123".into(),
        };
        let serial = Console {
            tty: "ttyS1".into(),
            speed: Some(9600),
        };
        let cfg = grub_cfg(&ids, &serial, "0.1.0");
        assert!(cfg.contains("serial --unit=1 --speed=9600"), "{cfg}");
        assert!(cfg.contains("search --no-floppy --fs-uuid --set=root ABCD-0123"));
        assert!(cfg.contains(
            "linux /vmlinuz root=UUID=11111111-2222-4333-8444-555555555555 rootfstype=ext4 rw \
             console=tty0 console=ttyS1,9600 quiet panic=10"
        ));
        let vt = Console {
            tty: "tty0".into(),
            speed: None,
        };
        let cfg = grub_cfg(&ids, &vt, "0.1.0");
        assert!(!cfg.contains("serial"));
        assert!(cfg.contains(" console=tty0 quiet panic=10"));
    }
}

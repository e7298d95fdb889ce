//! OVA import: OVAs made at test time (an OVF we write, a streamOptimized vmdk from qemu-img,
//! packed with the tar crate) import into images equal to the source disk; archives with
//! entries that escape the folder, links, or OVFs naming missing disks are refused.

mod vmdk_util;

use std::path::{Path, PathBuf};

use strata_storage::convert::NoProgress;
use strata_storage::format::{open_image, ImageFormat, OpenOptions};
use strata_storage::ova::{import_ova, ImportOptions};
use vmdk_util::*;

/// An archive entry: name, bytes, type.
type Entry<'a> = (&'a str, Vec<u8>, tar::EntryType);

fn ovf(disk_href: &str, capacity_mib: u64) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References>
    <File ovf:id="file1" ovf:href="{disk_href}"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="{capacity_mib}" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
    <Disk ovf:capacity="4194304" ovf:diskId="scratch"/>
  </DiskSection>
  <VirtualSystem ovf:id="test-vm"><Info>A test VM</Info><Name>test-vm</Name></VirtualSystem>
</Envelope>
"#
    )
}

/// Packs `(name in the archive, bytes)` into an OVA. Names are written raw into the header,
/// so hostile ones (`../x`) can be made too.
fn pack(out: &Path, entries: &[Entry]) {
    let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
    for (name, data, kind) in entries {
        let mut h = tar::Header::new_ustar();
        let field = &mut h.as_old_mut().name;
        field.fill(0);
        field[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(*kind);
        if *kind == tar::EntryType::Symlink {
            h.set_link_name("/etc/passwd").unwrap();
        }
        h.set_cksum();
        b.append(&h, data.as_slice()).unwrap();
    }
    b.finish().unwrap();
}

fn source_disk(dir: &Path) -> (PathBuf, PathBuf) {
    let raw = dir.join("disk.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", p(&raw), "32M"]);
    qemu_io_writes(&raw, "raw", &random_writes(7, 32 << 20, 20, 256 << 10));
    let vmdk = dir.join("disk1.vmdk");
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            p(&raw),
            p(&vmdk),
        ],
    );
    (raw, vmdk)
}

fn opts(format: ImageFormat) -> ImportOptions {
    ImportOptions {
        format,
        options: Default::default(),
        open: OpenOptions::default(),
    }
}

fn an_ova_imports_into_images_equal_to_its_disk() {
    strata_testkit::require_qemu_utils();
    let work = tempfile::tempdir().unwrap();
    let (raw, vmdk) = source_disk(work.path());
    let ova = work.path().join("vm.ova");
    pack(
        &ova,
        &[
            (
                "vm.ovf",
                ovf("disk1.vmdk", 32).into_bytes(),
                tar::EntryType::Regular,
            ),
            (
                "vm.mf",
                b"SHA256(disk1.vmdk)= 00\n".to_vec(),
                tar::EntryType::Regular,
            ),
            (
                "disk1.vmdk",
                std::fs::read(&vmdk).unwrap(),
                tar::EntryType::Regular,
            ),
        ],
    );
    for fmt in [ImageFormat::Raw, ImageFormat::Vmdk] {
        let out = work.path().join(format!("out-{fmt}"));
        let disks = import_ova(&ova, &out, &opts(fmt), &NoProgress).unwrap();
        assert_eq!(disks.len(), 2);
        assert_eq!(disks[0].path, out.join(format!("disk1.{fmt}")));
        let (same, msg) = try_run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                fmt.name(),
                p(&raw),
                p(&disks[0].path),
            ],
        );
        assert!(same, "{fmt}: {msg}");
        let blank = open_image(
            &disks[1].path,
            &OpenOptions {
                read_only: true,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        assert_eq!(blank.size(), 4 << 20);
        let left: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 2, "temporary files were left behind: {left:?}");
        // Importing again would overwrite: refused.
        let e = import_ova(&ova, &out, &opts(fmt), &NoProgress).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
    }
}

fn hostile_and_broken_ovas_are_refused() {
    let work = tempfile::tempdir().unwrap();
    let disk = b"not used".to_vec();
    let out = work.path().join("out");
    let cases: [(&str, Vec<Entry>, &str); 5] = [
        (
            "escape",
            vec![
                (
                    "vm.ovf",
                    ovf("disk1.vmdk", 1).into_bytes(),
                    tar::EntryType::Regular,
                ),
                ("../evil.vmdk", disk.clone(), tar::EntryType::Regular),
            ],
            "outside",
        ),
        (
            "absolute",
            vec![
                (
                    "vm.ovf",
                    ovf("disk1.vmdk", 1).into_bytes(),
                    tar::EntryType::Regular,
                ),
                ("/tmp/evil.vmdk", disk.clone(), tar::EntryType::Regular),
            ],
            "outside",
        ),
        (
            "link",
            vec![
                (
                    "vm.ovf",
                    ovf("disk1.vmdk", 1).into_bytes(),
                    tar::EntryType::Regular,
                ),
                ("disk1.vmdk", Vec::new(), tar::EntryType::Symlink),
            ],
            "link",
        ),
        (
            "missing",
            vec![(
                "vm.ovf",
                ovf("disk1.vmdk", 1).into_bytes(),
                tar::EntryType::Regular,
            )],
            "not in",
        ),
        (
            "no-ovf",
            vec![("disk1.vmdk", disk.clone(), tar::EntryType::Regular)],
            "no .ovf",
        ),
    ];
    for (name, entries, want) in cases {
        let ova = work.path().join(format!("{name}.ova"));
        pack(&ova, &entries);
        let e = import_ova(&ova, &out, &opts(ImageFormat::Raw), &NoProgress)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{name}: {e}");
        assert!(!work.path().join("evil.vmdk").exists() && !Path::new("/tmp/evil.vmdk").exists());
    }
    let href_escape = work.path().join("href.ova");
    pack(
        &href_escape,
        &[(
            "vm.ovf",
            ovf("../disk1.vmdk", 1).into_bytes(),
            tar::EntryType::Regular,
        )],
    );
    let e = import_ova(&href_escape, &out, &opts(ImageFormat::Raw), &NoProgress)
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside"), "{e}");
    let garbage = work.path().join("garbage.ova");
    std::fs::write(&garbage, vec![0x42u8; 4096]).unwrap();
    assert!(import_ova(&garbage, &out, &opts(ImageFormat::Raw), &NoProgress).is_err());
}

strata_testkit::main!(
    an_ova_imports_into_images_equal_to_its_disk,
    hostile_and_broken_ovas_are_refused,
);

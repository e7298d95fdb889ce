//! Tier 3: Debian's kernel and the busybox initramfs under Strata's own VMM (bzImage through
//! the 64-bit boot protocol, ACPI-described virtio-mmio, irqfd/ioeventfd), running the same
//! disk test as tier 2.
//!
//! On a PVM host (/sys/module/kvm_pvm exists) an unmodified Linux kernel does not finish booting
//! under KVM (ring 0 is emulated instruction by instruction and several instructions are not),
//! so the test is skipped there with a loud message; on hardware KVM it must pass.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use strata_storage::format::{open_image, OpenOptions};
use strata_tests::linux_guest::{
    check_console, check_image, guest_dir, prepare_raw, tool_or_skip, DISK_TEST_CMDLINE,
};
use strata_tests::{have_kvm, is_pvm_host, skip_loudly, Capture};
use strata_vmm::blk::DiskOptions;
use strata_vmm::kvm::VcpuExitReason;
use strata_vmm::vm::{run, DiskSpec, Payload, VmConfig};

const SERIAL: &str = "strata-tier3";
const TIER: &str = "tier 3 (Debian's Linux under Strata's own VMM)";

#[test]
fn linux_guest_under_strata_vmm_on_a_raw_image() -> Result<()> {
    if is_pvm_host() {
        skip_loudly(
            TIER,
            "this host's /dev/kvm is PVM (/sys/module/kvm_pvm exists): guest ring 0 is emulated \
             and an unmodified Linux kernel does not finish booting; this tier needs hardware KVM",
        );
        return Ok(());
    }
    if !have_kvm() {
        skip_loudly(TIER, "/dev/kvm cannot be opened");
        return Ok(());
    }
    if !tool_or_skip(TIER, "qemu-img", "qemu-utils")? {
        return Ok(());
    }
    let guest = guest_dir()?;
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("disk.raw");
    prepare_raw(&image)?;
    let disk = open_image(&image, &OpenOptions::default())?;
    let console = Capture::default();
    let report = run(VmConfig {
        memory: 512 << 20,
        cpus: 2,
        payload: Payload::Linux {
            kernel: guest.join("vmlinuz"),
            initrd: Some(guest.join("initramfs.gz")),
            cmdline: DISK_TEST_CMDLINE.to_string(),
        },
        disks: vec![DiskSpec {
            name: "raw".into(),
            device: Arc::clone(&disk) as _,
            options: DiskOptions {
                num_queues: 2,
                serial: SERIAL.into(),
                ..DiskOptions::default()
            },
        }],
        serial: Box::new(console.clone()),
        timeout: Some(Duration::from_secs(300)),
        kvm: None,
    })?;
    ensure!(
        report.reason == VcpuExitReason::Shutdown,
        "the guest did not power off ({:?}); console:\n{}",
        report.reason,
        console.text()
    );
    check_console("tier 3 raw", &console.text(), SERIAL)?;
    drop(disk);
    check_image("tier 3 raw", &image, "raw")
}

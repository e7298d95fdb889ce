//! Tier 3: Debian's kernel and the busybox initramfs under Strata's own VMM (bzImage through
//! the 64-bit boot protocol, ACPI-described virtio-mmio, irqfd/ioeventfd), running the same
//! disk test as tier 2.
//!
//! A second test presses the ACPI power button (the VMM's GED notifying a PNP0C0C device) once
//! the guest waits for it on the button driver's input device, as acpid or systemd-logind
//! would, and checks that the guest answers it and powers off.
//!
//! A third runs the network test: the guest's virtio-net (two queue pairs, one per vCPU) on a tap
//! on a bridge Strata made, with a peer namespace across it ([`strata_tests::peer_net`]); the
//! guest gives itself its address, pings the peer and runs iperf3 both ways.
//!
//! On a PVM host (/sys/module/kvm_pvm exists) an unmodified Linux kernel does not finish booting
//! under KVM (ring 0 is emulated instruction by instruction and several instructions are not),
//! so the tests show as ignored there, with that reason, under CI too (never as passed); on
//! hardware KVM they must pass.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use strata_storage::format::{open_image, OpenOptions};
use strata_tests::linux_guest::{
    check_console, check_image, guest_dir, guest_dir_with_net, prepare_raw, DISK_TEST_CMDLINE,
};
use strata_tests::netns::netns_unavailable;
use strata_tests::peer_net::{check_net_report, net_test_cmdline, PeerNet};
use strata_tests::Capture;
use strata_vmm::blk::DiskOptions;
use strata_vmm::devices::VmControl;
use strata_vmm::kvm::VcpuExitReason;
use strata_vmm::net::config::format_mac;
use strata_vmm::net::tap::TapIo;
use strata_vmm::net::NetOptions;
use strata_vmm::vm::{run, run_with_control, DiskSpec, NetSpec, Payload, VmConfig};

const SERIAL: &str = "strata-tier3";

/// Returns when this host can run the tier: hardware KVM (on PVM the tier is ignored, under
/// `CI` too) and qemu-img.
fn require_tier3_host() {
    strata_testkit::require_hardware_kvm();
    strata_testkit::require_tool("qemu-img", "qemu-utils");
}

fn linux_guest_under_strata_vmm_on_a_raw_image() -> Result<()> {
    require_tier3_host();
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
        nets: Vec::new(),
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

fn linux_guest_answers_the_acpi_power_button() -> Result<()> {
    require_tier3_host();
    let guest = guest_dir()?;
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("disk.raw");
    prepare_raw(&image)?;
    let disk = open_image(&image, &OpenOptions::default())?;
    let console = Capture::default();
    let control = Arc::new(VmControl::default());
    // Press the button once the guest says it waits for it (and again if a press came before
    // its input device was read: a press is an edge, not a state).
    let presser = {
        let (console, control) = (console.clone(), control.clone());
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(300);
            while std::time::Instant::now() < deadline && !control.stop_flag().is_set() {
                if console.text().contains("STRATA waiting-for-power-button") {
                    control.press_power_button();
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    let report = run_with_control(
        VmConfig {
            memory: 512 << 20,
            cpus: 1,
            payload: Payload::Linux {
                kernel: guest.join("vmlinuz"),
                initrd: Some(guest.join("initramfs.gz")),
                cmdline: "console=ttyS0 panic=-1 quiet strata.test=powerbutton".to_string(),
            },
            disks: vec![DiskSpec {
                name: "raw".into(),
                device: Arc::clone(&disk) as _,
                options: DiskOptions::default(),
            }],
            nets: Vec::new(),
            serial: Box::new(console.clone()),
            timeout: Some(Duration::from_secs(300)),
            kvm: None,
        },
        control.clone(),
    )?;
    control.request(VcpuExitReason::Stopped);
    let _ = presser.join();
    let log = console.text();
    ensure!(
        report.reason == VcpuExitReason::Shutdown,
        "the guest did not power off ({:?}); console:\n{log}",
        report.reason
    );
    ensure!(
        log.contains("STRATA power-button pressed"),
        "the guest did not see the power button; console:\n{log}"
    );
    Ok(())
}

fn linux_guest_under_strata_vmm_gets_an_address_and_runs_iperf3() -> Result<()> {
    require_tier3_host();
    strata_testkit::require_tool("iperf3", "iperf3");
    if let Some(why) = netns_unavailable() {
        strata_testkit::missing(&why);
    }
    let guest = guest_dir_with_net()?;
    let mut net = PeerNet::new("t3", "sttap3", 2)?;
    let mac = [0x52, 0x54, 0x00, 0x78, 0x00, 0x03];
    let taps: Vec<Arc<dyn TapIo>> = net
        .take_tap()
        .into_iter()
        .map(|q| Arc::new(q) as _)
        .collect();
    let console = Capture::default();
    let report = run(VmConfig {
        memory: 512 << 20,
        cpus: 2,
        payload: Payload::Linux {
            kernel: guest.join("vmlinuz"),
            initrd: Some(guest.join("initramfs-net.gz")),
            cmdline: net_test_cmdline(5),
        },
        disks: Vec::new(),
        nets: vec![NetSpec {
            name: "sttap3".into(),
            taps,
            options: NetOptions {
                mac,
                queue_pairs: 2,
                ..NetOptions::default()
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
    let figures = check_net_report(&mut net, &console.text(), &format_mac(&mac))?;
    let stats = report.net_stats[0];
    eprintln!("tier3 net: {figures}; device counters {stats:?}");
    ensure!(stats.tx_errors == 0, "transmit errors: {stats:?}");
    Ok(())
}

strata_testkit::main!(
    linux_guest_under_strata_vmm_on_a_raw_image,
    linux_guest_answers_the_acpi_power_button,
    linux_guest_under_strata_vmm_gets_an_address_and_runs_iperf3,
);

//! Tier 2 for networking: Debian's Linux (its virtio-net driver) under QEMU TCG on a tap that
//! is a port of a bridge Strata made (`strata_vmm::hostnet`, the rtnetlink code behind
//! `strata networks create`), reaching a peer network namespace across that bridge.
//!
//! Layout ([`strata_tests::peer_net`]), inside a fresh namespace (the "host"): a bridge; the
//! tap (opened by Strata's tap code with vnet headers and multi-queue, handed to QEMU as a
//! descriptor, as the appliance hands taps to its VMM) and one end of a veth pair as its ports,
//! both untagged in VLAN 20 when the kernel has bridge VLAN filtering (the bridge is then
//! VLAN-aware; elsewhere that row is skipped loudly); the veth's other end in a second namespace
//! (the peer) with 10.78.0.1/24 and two one-shot `iperf3` servers. The guest (10.78.0.2/24) pings
//! the peer three times and runs iperf3 to it and from it (`-R`).
//!
//! Checked on both sides: the guest's ping count and iperf3 rates on its console, and the
//! bytes each iperf3 server's JSON report says crossed the bridge.
//!
//! Needs root, /dev/net/tun, qemu-system-x86_64 and iperf3; without them it shows as ignored
//! with the reason, and fails under CI=1.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::time::Duration;

use anyhow::{Context, Result};
use strata_tests::linux_guest::{guest_dir_with_net, qemu_linux_command, run_qemu_console};
use strata_tests::netns::netns_unavailable;
use strata_tests::peer_net::{check_net_report, net_test_cmdline, PeerNet};

const MAC: &str = "52:54:00:78:00:02";

/// Tier 2 networking (Linux under QEMU on a tap on a Strata-made bridge) needs root, taps,
/// iproute2, QEMU and iperf3: missing, the test fails under CI and is ignored elsewhere.
fn require_tier2_net() {
    if let Some(why) = netns_unavailable() {
        strata_testkit::missing(&why);
    }
    strata_testkit::require_tool("qemu-system-x86_64", "qemu-system-x86");
    strata_testkit::require_tool("iperf3", "iperf3");
}

fn linux_under_qemu_on_a_strata_bridge_pings_and_runs_iperf3() -> Result<()> {
    require_tier2_net();
    let guest = guest_dir_with_net()?;
    let mut net = PeerNet::new("t2", "sttap2", 1)?;
    let tap = OwnedFd::from(net.take_tap().pop().context("no tap queue")?);

    let mut cmd = qemu_linux_command(&guest, "initramfs-net.gz", &net_test_cmdline(3));
    cmd.args(["-M", "q35", "-m", "512M", "-smp", "1"])
        .args(["-netdev", "tap,id=n0,fd=3,vhost=off"])
        .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={MAC}")]);
    let raw = tap.as_raw_fd();
    // SAFETY: between fork and exec only dup2 or fcntl run (async-signal-safe); it puts the tap on
    // descriptor 3 without CLOEXEC for QEMU's `fd=3`.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself keeps CLOEXEC: clear it then.
            let r = if raw == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(raw, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let console = run_qemu_console(cmd, Duration::from_secs(300));
    drop(tap);
    let figures = check_net_report(&mut net, &console?, MAC)?;
    eprintln!("tier2 net: {figures} — under QEMU TCG: not performance figures");
    Ok(())
}

strata_testkit::main!(linux_under_qemu_on_a_strata_bridge_pings_and_runs_iperf3,);

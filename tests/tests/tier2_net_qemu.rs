//! Tier 2 for networking: Debian's Linux (its virtio-net driver) under QEMU TCG on a tap that
//! is a port of a bridge Strata made (`strata_vmm::hostnet`, the rtnetlink code behind
//! `strata networks create`), reaching a peer network namespace across that bridge.
//!
//! Layout, all inside a fresh namespace (the "host"): a bridge `stbr2`; the tap
//! `sttap2` (opened by Strata's tap code with vnet headers and multi-queue, handed to QEMU as a
//! descriptor, as the appliance hands taps to its VMM) and one end of a veth pair as its ports,
//! both untagged in VLAN 20 (`set_port_vlan`) when the kernel has bridge VLAN filtering (the
//! bridge is then VLAN-aware; elsewhere that row is skipped loudly); the veth's other end in a second namespace (the
//! peer) with 10.78.0.1/24 and two one-shot `iperf3` servers. The guest (10.78.0.2/24) pings the
//! peer three times and runs iperf3 to it and from it (`-R`).
//!
//! Checked on both sides: the guest's ping count and iperf3 rates on its console, and the
//! bytes each iperf3 server's JSON report says crossed the bridge.
//!
//! Needs root, /dev/net/tun, qemu-system-x86_64 and iperf3; without them it skips loudly, and
//! fails under CI=1.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use strata_tests::linux_guest::{guest_dir_with_net, run_qemu_console, strata_line, tool_or_skip};
use strata_tests::netns::{netns_unavailable, NetNs};
use strata_tests::skip_loudly;
use strata_vmm::hostnet::{HostNetError, Netlink};
use strata_vmm::net::tap::open_queues;

const TIER: &str = "tier 2 networking (Linux under QEMU on a tap on a Strata-made bridge)";
const VLAN: u16 = 20;
const GUEST: &str = "10.78.0.2";
const PEER: &str = "10.78.0.1";
const MAC: &str = "52:54:00:78:00:02";

fn can_run() -> Result<bool> {
    if let Some(why) = netns_unavailable() {
        if std::env::var_os("CI").is_some() {
            bail!("{TIER} cannot run under CI: {why}");
        }
        skip_loudly(TIER, &why);
        return Ok(false);
    }
    Ok(
        tool_or_skip(TIER, "qemu-system-x86_64", "qemu-utils qemu-system-x86")?
            && tool_or_skip(TIER, "iperf3", "iperf3")?,
    )
}

/// The bridge, the tap and the veth in `host`, the veth's peer end in `peer`; returns the
/// tap's descriptor.
fn build_network(host: &NetNs, peer: &NetNs) -> Result<OwnedFd> {
    host.ip(&[
        "link",
        "add",
        "stveth2",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        peer.name(),
    ])?;
    let tap = host.run(|| {
        let mut nl = Netlink::open()?;
        // VLAN-aware when the kernel has bridge VLAN filtering (this host's does not).
        let (bridge, vlan) = match nl.create_bridge("stbr2", true) {
            Ok(b) => (b, true),
            Err(HostNetError::Kernel { err, .. })
                if err.raw_os_error() == Some(libc::EOPNOTSUPP) =>
            {
                skip_loudly(
                    "tier 2 networking: the ports in VLAN 20 on a VLAN-aware bridge",
                    "this kernel has no bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING); \
                     the test runs on a plain bridge",
                );
                (nl.create_bridge("stbr2", false)?, false)
            }
            Err(e) => return Err(e.into()),
        };
        nl.set_up(bridge.index, "stbr2")?;
        let mut queues = open_queues("sttap2", 1)?;
        let tap = queues.pop().context("no tap queue")?;
        for port in ["sttap2", "stveth2"] {
            let link = nl.require(port)?;
            nl.set_controller(link.index, Some(bridge.index), port)?;
            if vlan {
                nl.set_port_vlan(link.index, VLAN, port)?;
            }
            nl.set_up(link.index, port)?;
        }
        let facts = nl.require("sttap2")?;
        ensure!(
            facts.controller == Some(bridge.index) && facts.up,
            "the tap is not an up port of the bridge: {facts:?}"
        );
        Ok(OwnedFd::from(tap))
    })?;
    peer.ip(&["addr", "add", &format!("{PEER}/24"), "dev", "eth0"])?;
    peer.ip(&["link", "set", "eth0", "up"])?;
    Ok(tap)
}

/// A one-shot iperf3 server on `port` in `peer`, reporting in JSON.
fn iperf3_server(peer: &NetNs, port: u16) -> Result<Child> {
    Command::new("ip")
        .args(["netns", "exec", peer.name(), "iperf3", "-s", "-1", "-J"])
        .args(["-p", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting iperf3 -s")
}

/// Waits for a server to finish (the guest's run ends it); returns the bytes its report says
/// it received (`recv`) or sent.
fn server_bytes(server: Child, recv: bool) -> Result<u64> {
    let out = server.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "iperf3 server failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = if recv {
        "\"sum_received\""
    } else {
        "\"sum_sent\""
    };
    // The end summary: "sum_sent"/"sum_received" objects with a "bytes" field.
    let at = text
        .rfind(key)
        .with_context(|| format!("no {key} in iperf3's report: {text}"))?;
    let bytes = text[at..]
        .split("\"bytes\":")
        .nth(1)
        .and_then(|r| r.trim_start().split([',', '}', '\n']).next())
        .and_then(|n| n.trim().parse::<f64>().ok())
        .with_context(|| format!("no byte count after {key}"))?;
    Ok(bytes as u64)
}

/// Waits until `port` listens in `peer` (iperf3 needs a moment to bind).
fn wait_listening(peer: &NetNs, port: u16) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let out = Command::new("ip")
            .args(["netns", "exec", peer.name(), "ss", "-ltnH"])
            .output()?;
        if String::from_utf8_lossy(&out.stdout).contains(&format!(":{port}")) {
            return Ok(());
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(10),
            "iperf3 did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn linux_under_qemu_on_a_strata_bridge_pings_and_runs_iperf3() -> Result<()> {
    if !can_run()? {
        return Ok(());
    }
    let guest = guest_dir_with_net()?;
    let host = NetNs::new("t2host")?;
    let peer = NetNs::new("t2peer")?;
    let tap = build_network(&host, &peer)?;
    let send_server = iperf3_server(&peer, 5201)?;
    let recv_server = iperf3_server(&peer, 5202)?;
    wait_listening(&peer, 5201)?;
    wait_listening(&peer, 5202)?;

    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "q35", "-m", "512M", "-smp", "1"])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(guest.join("vmlinuz"))
        .arg("-initrd")
        .arg(guest.join("initramfs-net.gz"))
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 quiet strata.test=net strata.addr={GUEST}/24 \
             strata.peer={PEER} strata.secs=3"
        ))
        .args(["-netdev", "tap,id=n0,fd=3,vhost=off"])
        .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={MAC}")]);
    let raw = tap.as_raw_fd();
    // SAFETY: between fork and exec only dup2 runs (async-signal-safe); it puts the tap on
    // descriptor 3 without CLOEXEC for QEMU's `fd=3`.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let console = run_qemu_console(cmd, Duration::from_secs(300));
    drop(tap);
    let console = console?;
    eprintln!("--- guest console ---\n{console}\n--- end ---");
    ensure!(
        !console.contains("STRATA FAIL"),
        "the guest reported a failure"
    );
    ensure!(
        strata_line(&console, "done").is_some(),
        "the guest did not finish"
    );
    let nic = strata_line(&console, "nic").context("no nic line")?;
    ensure!(nic.contains(MAC), "the guest's NIC has another MAC: {nic}");
    ensure!(
        strata_line(&console, "address") == Some(&format!("{GUEST}/24")),
        "the guest has no address"
    );
    ensure!(
        strata_line(&console, "ping") == Some("3/3"),
        "the guest's pings were not all answered"
    );
    let sent = strata_line(&console, "iperf3-send").context("no iperf3-send line")?;
    let received = strata_line(&console, "iperf3-recv").context("no iperf3-recv line")?;
    let from_guest = server_bytes(send_server, true)?;
    let to_guest = server_bytes(recv_server, false)?;
    eprintln!(
        "tier2 net: guest to peer {sent} ({from_guest} bytes at the peer), \
         peer to guest {received} ({to_guest} bytes from the peer) — QEMU TCG, rates are not \
         performance figures"
    );
    ensure!(
        from_guest > 100_000 && to_guest > 100_000,
        "too little crossed the bridge: {from_guest} and {to_guest} bytes"
    );
    Ok(())
}

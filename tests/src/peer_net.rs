//! A Linux guest's network for tiers 2 and 3: a bridge made by Strata's rtnetlink code
//! (`strata_vmm::hostnet`, behind `strata networks create`) in a "host" namespace, the guest's
//! tap and a veth as its ports, the veth's other end in a peer namespace with one-shot iperf3
//! servers; and the check of the guest's `strata.test=net` report (tests/guest/init.sh).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use strata_vmm::hostnet::{HostNetError, Netlink};
use strata_vmm::net::tap::{open_queues, TapQueue};

use crate::linux_guest::strata_line;
use crate::netns::NetNs;
use crate::skip_loudly;

/// The guest's address.
pub const GUEST: &str = "10.78.0.2";
/// The peer's address.
pub const PEER: &str = "10.78.0.1";
/// The VLAN the ports are in on a VLAN-aware bridge.
pub const VLAN: u16 = 20;
/// The iperf3 server the guest sends to.
pub const SEND_PORT: u16 = 5201;
/// The iperf3 server the guest receives from (`-R`).
pub const RECV_PORT: u16 = 5202;

/// The kernel command line of the network test, running iperf3 for `secs` seconds each way.
pub fn net_test_cmdline(secs: u32) -> String {
    format!(
        "console=ttyS0 panic=-1 quiet strata.test=net strata.addr={GUEST}/24 \
         strata.peer={PEER} strata.secs={secs}"
    )
}

/// The guest's network: the namespaces, the tap and the iperf3 servers (killed on drop).
#[derive(Debug)]
pub struct PeerNet {
    /// The namespace of the bridge and the tap (kept for the network's lifetime).
    _host: NetNs,
    peer: NetNs,
    tap: Vec<TapQueue>,
    servers: Vec<(Child, bool)>,
}

impl PeerNet {
    /// Builds the network with tap `tap` of `queues` queues, and starts the iperf3 servers.
    pub fn new(tag: &str, tap: &str, queues: usize) -> Result<PeerNet> {
        let host = NetNs::new(&format!("{tag}h"))?;
        let peer = NetNs::new(&format!("{tag}p"))?;
        host.ip(&[
            "link",
            "add",
            "stveth",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            peer.name(),
        ])?;
        let name = tap.to_string();
        let queues = host.run(move || bridge_ports(&name, queues))?;
        peer.ip(&["addr", "add", &format!("{PEER}/24"), "dev", "eth0"])?;
        peer.ip(&["link", "set", "eth0", "up"])?;
        let mut net = PeerNet {
            _host: host,
            peer,
            tap: queues,
            servers: Vec::new(),
        };
        for (port, recv) in [(SEND_PORT, true), (RECV_PORT, false)] {
            let server = iperf3_server(&net.peer, port)?;
            net.servers.push((server, recv));
            wait_listening(&net.peer, port)?;
        }
        Ok(net)
    }

    /// Takes the tap's queues (opened by Strata's tap code with vnet headers, multi-queue).
    pub fn take_tap(&mut self) -> Vec<TapQueue> {
        std::mem::take(&mut self.tap)
    }

    /// Waits for both servers (the guest's runs end them); returns the bytes that went from
    /// the guest to the peer and from the peer to the guest, as the servers counted them.
    pub fn server_bytes(&mut self) -> Result<(u64, u64)> {
        let mut out = [0u64; 2];
        for (i, (server, recv)) in self.servers.drain(..).enumerate() {
            out[i] = server_bytes(server, recv)?;
        }
        Ok((out[0], out[1]))
    }
}

impl Drop for PeerNet {
    fn drop(&mut self) {
        for (s, _) in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

/// In the calling thread's namespace: bridge `stbr` (VLAN-aware when the kernel can), tap
/// `tap` and `stveth` up as its ports.
fn bridge_ports(tap: &str, queues: usize) -> Result<Vec<TapQueue>> {
    let mut nl = Netlink::open()?;
    let (bridge, vlan) = match nl.create_bridge("stbr", true) {
        Ok(b) => (b, true),
        Err(HostNetError::Kernel { err, .. }) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            skip_loudly(
                "networking: the ports in VLAN 20 on a VLAN-aware bridge",
                "this kernel has no bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING); the \
                 guest's network is a plain bridge",
            );
            (nl.create_bridge("stbr", false)?, false)
        }
        Err(e) => return Err(e.into()),
    };
    nl.set_up(bridge.index, "stbr")?;
    let taps = open_queues(tap, queues)?;
    for port in [tap, "stveth"] {
        let link = nl.require(port)?;
        nl.set_controller(link.index, Some(bridge.index), port)?;
        if vlan {
            nl.set_port_vlan(link.index, VLAN, port)?;
        }
        nl.set_up(link.index, port)?;
    }
    let facts = nl.require(tap)?;
    ensure!(
        facts.controller == Some(bridge.index) && facts.up,
        "the tap is not an up port of the bridge: {facts:?}"
    );
    Ok(taps)
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

/// Waits for a server to finish; returns the bytes its report says it received (`recv`) or
/// sent.
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

/// Checks the guest's report of the network test (its NIC has `mac`, it got its address, all
/// three pings were answered, both iperf3 runs finished) and the servers' byte counts; returns
/// a line with the figures for the log.
pub fn check_net_report(net: &mut PeerNet, console: &str, mac: &str) -> Result<String> {
    eprintln!("--- guest console ---\n{console}\n--- end ---");
    ensure!(
        !console.contains("STRATA FAIL"),
        "the guest reported a failure"
    );
    ensure!(
        strata_line(console, "done").is_some(),
        "the guest did not finish"
    );
    let nic = strata_line(console, "nic").context("no nic line")?;
    ensure!(nic.contains(mac), "the guest's NIC has another MAC: {nic}");
    ensure!(
        strata_line(console, "address") == Some(&format!("{GUEST}/24")),
        "the guest has no address"
    );
    ensure!(
        strata_line(console, "ping") == Some("3/3"),
        "the guest's pings were not all answered"
    );
    let sent = strata_line(console, "iperf3-send").context("no iperf3-send line")?;
    let received = strata_line(console, "iperf3-recv").context("no iperf3-recv line")?;
    let (from_guest, to_guest) = net.server_bytes()?;
    ensure!(
        from_guest > 100_000 && to_guest > 100_000,
        "too little crossed the bridge: {from_guest} and {to_guest} bytes"
    );
    Ok(format!(
        "guest to peer {sent} ({from_guest} bytes at the peer), peer to guest {received} \
         ({to_guest} bytes from the peer)"
    ))
}

//! Tier 1 for virtio-net: the freestanding virtio-net driver (tests/guest/netdrv) under
//! Strata's own VMM, on KVM (PVM hosts included), with its tap inside a network namespace.
//!
//! - One guest on a tap: the test reads the guest's UDP broadcast from the namespace, pings the
//!   guest (the guest answers ARP and ICMP echo), sends a unicast frame for another address
//!   (the guest turned promiscuous mode off through the control queue, so the device's filter
//!   must drop it), and stops the guest with a datagram.
//! - Two guests on one bridge: one resolves and pings the other; the host pings both.
//!
//! Needs root (namespaces, taps, bridges) and /dev/kvm; without them the test skips loudly,
//! and under CI=1 it fails.

use std::net::{Ipv4Addr, UdpSocket};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use strata_tests::netns::{netns_unavailable, ping, send_frame, NetNs};
use strata_tests::{netdrv_image, number_after, Capture};
use strata_vmm::kvm::VcpuExitReason;
use strata_vmm::net::tap::{open_queues, TapIo};
use strata_vmm::net::NetOptions;
use strata_vmm::vm::{run, NetSpec, Payload, RunReport, VmConfig};

/// The test needs KVM, root and network namespaces: without them it fails under CI and is
/// ignored (with the reason) elsewhere.
fn require_net_host() {
    strata_testkit::require_kvm();
    if let Some(why) = netns_unavailable() {
        strata_testkit::missing(&why);
    }
}

struct Guest {
    log: Capture,
    thread: JoinHandle<Result<RunReport>>,
}

/// Starts the net test guest with MAC `mac` on the tap `tap` (opened inside `ns`), after
/// running `ip -n NS` with each of `setup` (the tap exists then; the guest sends at once).
fn start_guest(ns: &NetNs, tap: &str, mac: [u8; 6], setup: &[&[&str]]) -> Result<Guest> {
    let name = tap.to_string();
    let queues = ns.run(move || Ok(open_queues(&name, 1)?))?;
    for args in setup {
        ns.ip(args)?;
    }
    ns.ip(&["link", "set", tap, "up"])?;
    let taps: Vec<Arc<dyn TapIo>> = queues.into_iter().map(|q| Arc::new(q) as _).collect();
    let log = Capture::default();
    let serial = log.clone();
    let image = netdrv_image()?;
    let tap = tap.to_string();
    let thread = std::thread::spawn(move || {
        run(VmConfig {
            memory: 64 << 20,
            cpus: 1,
            payload: Payload::Flat {
                image,
                load_addr: 0x10_0000,
            },
            disks: Vec::new(),
            nets: vec![NetSpec {
                name: tap,
                taps,
                options: NetOptions {
                    mac,
                    ..NetOptions::default()
                },
            }],
            serial: Box::new(serial),
            timeout: Some(Duration::from_secs(180)),
            kvm: None,
        })
        .context("running the VM")
    });
    Ok(Guest { log, thread })
}

fn wait_for(log: &Capture, text: &str, timeout: Duration) -> Result<()> {
    let t0 = Instant::now();
    while !log.text().contains(text) {
        if t0.elapsed() > timeout {
            bail!(
                "the guest did not print {text:?}; its console:\n{}",
                log.text()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn finish(guest: Guest, row: &str) -> Result<(String, RunReport)> {
    let report = guest
        .thread
        .join()
        .map_err(|_| anyhow::anyhow!("the VM thread panicked"))??;
    let log = guest.log.text();
    eprintln!("--- guest serial ({row}) ---\n{log}--- end ---");
    ensure!(
        report.reason == VcpuExitReason::Shutdown,
        "{row}: the guest did not power off ({:?})",
        report.reason
    );
    ensure!(
        log.contains("NETTEST PASS"),
        "{row}: the guest reported failure"
    );
    Ok((log, report))
}

fn stop_datagram(sock: &UdpSocket, to: &str) -> Result<()> {
    sock.send_to(b"NETDRV STOP", to)?;
    Ok(())
}

fn a_guest_on_a_tap_sends_and_answers_arp_and_ping() -> Result<()> {
    require_net_host();
    let ns = NetNs::new("t1net")?;
    let sock = ns.run(|| {
        let s = UdpSocket::bind("0.0.0.0:7777")?;
        s.set_broadcast(true)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(s)
    })?;
    let mac = [0x52, 0x54, 0x00, 0x00, 0x00, 0x02];
    let guest = start_guest(
        &ns,
        "sttap0",
        mac,
        &[&["addr", "add", "10.77.0.1/24", "dev", "sttap0"]],
    )?;
    // The guest's broadcast, read from the namespace.
    let mut buf = [0u8; 512];
    let (n, from) = sock
        .recv_from(&mut buf)
        .context("no datagram from the guest")?;
    let hello = String::from_utf8_lossy(&buf[..n]).into_owned();
    eprintln!("tier1 net: {hello:?} from {from}");
    ensure!(
        hello == "NETDRV HELLO 52:54:00:00:00:02",
        "unexpected datagram {hello:?}"
    );
    ensure!(from.ip() == Ipv4Addr::new(10, 77, 0, 2), "from {from}");
    // ARP and ICMP echo through the host's own stack.
    let replies = ping(&ns, Ipv4Addr::new(10, 77, 0, 2), 3, Duration::from_secs(5))?;
    ensure!(replies == 3, "{replies} of 3 echo requests answered");
    // A unicast frame for another address: the receive filter drops it.
    let mut foreign = vec![
        0x52, 0x54, 0x00, 0x99, 0x99, 0x99, 0x52, 0x54, 0, 0, 0, 1, 0x88, 0xb5,
    ];
    foreign.extend([0u8; 46]);
    send_frame(&ns, "sttap0", foreign)?;
    std::thread::sleep(Duration::from_millis(300));
    stop_datagram(&sock, "10.77.0.2:7777")?;
    let (log, report) = finish(guest, "tap")?;
    let echo = number_after(&log, "echo").context("echo count")?;
    let arp = number_after(&log, "arp").context("arp count")?;
    ensure!(
        echo >= 3 && arp >= 1,
        "the guest answered {arp} ARP and {echo} echo requests"
    );
    let stats = report.net_stats[0];
    eprintln!("tier1 net: device counters {stats:?}");
    ensure!(
        stats.rx_dropped >= 1,
        "the foreign frame was not dropped by the device"
    );
    ensure!(
        stats.tx_frames >= 5 && stats.rx_frames >= 5,
        "too few frames: {stats:?}"
    );
    ensure!(stats.tx_errors == 0, "transmit errors: {stats:?}");
    Ok(())
}

fn two_guests_on_one_bridge_reach_each_other() -> Result<()> {
    require_net_host();
    let ns = NetNs::new("t1br")?;
    ns.ip(&["link", "add", "stbr0", "type", "bridge"])?;
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", "stbr0"])?;
    ns.ip(&["link", "set", "stbr0", "up"])?;
    let sock = ns.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_broadcast(true)?;
        Ok(s)
    })?;
    // Guest B (host 3) answers; guest A (host 2) pings host 3.
    let b = start_guest(
        &ns,
        "sttapb",
        [0x52, 0x54, 0x00, 0x00, 0x00, 0x03],
        &[&["link", "set", "sttapb", "master", "stbr0"]],
    )?;
    let a = start_guest(
        &ns,
        "sttapa",
        [0x52, 0x54, 0x00, 0x03, 0x01, 0x02],
        &[&["link", "set", "sttapa", "master", "stbr0"]],
    )?;
    wait_for(&a.log, "PING OK 10.77.0.3", Duration::from_secs(120))?;
    for host in [2, 3] {
        let replies = ping(
            &ns,
            Ipv4Addr::new(10, 77, 0, host),
            2,
            Duration::from_secs(5),
        )?;
        ensure!(
            replies == 2,
            "the host got {replies} of 2 replies from 10.77.0.{host}"
        );
    }
    stop_datagram(&sock, "10.77.0.255:7777")?;
    let (log_a, _) = finish(a, "bridge, guest A")?;
    let (log_b, _) = finish(b, "bridge, guest B")?;
    let replies = number_after(&log_a, "replies").context("reply count")?;
    let answered = number_after(&log_b, "echo").context("echo count")?;
    eprintln!("tier1 net bridge: A got {replies} replies; B answered {answered} echo requests");
    ensure!(
        replies >= 3 && answered >= 5,
        "A {replies} replies, B {answered} answers"
    );
    Ok(())
}

strata_testkit::main!(
    a_guest_on_a_tap_sends_and_answers_arp_and_ping,
    two_guests_on_one_bridge_reach_each_other,
);

//! Networks and VM NICs end to end through the `strata` binary (local mode), inside a network
//! namespace: `strata networks create` makes a bridge over rtnetlink, `strata vm define --net`
//! records a NIC, `strata vm start` runs the freestanding virtio-net guest in a sandboxed VMM
//! process (namespaces, uid drop, seccomp filters) on a tap the supervisor opened and made a
//! port of the bridge; the host pings the guest across the bridge and stops it with a
//! datagram. Refusals: an unknown network (404), a VLAN on a network that is not VLAN-aware,
//! removing a network a VM uses (409).
//!
//! Needs root and /dev/kvm; without them it skips loudly (and fails under CI=1).

mod common;

use std::net::{Ipv4Addr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::CliEnv;
use strata_tests::netdrv_image;
use strata_tests::netns::{netns_unavailable, ping, NetNs};

fn strata(ns: &NetNs, env: &CliEnv, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args([
        "netns",
        "exec",
        ns.name(),
        env!("CARGO_BIN_EXE_strata"),
        "--data",
    ])
    .arg(env.data())
    .args(args)
    .env_remove("STRATA_DATA");
    c
}

fn ok(ns: &NetNs, env: &CliEnv, args: &[&str]) -> String {
    let o = strata(ns, env, args).output().unwrap();
    assert!(
        o.status.success(),
        "strata {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn as_str(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn fails(ns: &NetNs, env: &CliEnv, args: &[&str]) -> String {
    let o = strata(ns, env, args).output().unwrap();
    assert!(!o.status.success(), "strata {args:?} succeeded");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn a_vm_on_a_strata_network_answers_ping_across_the_bridge() {
    strata_testkit::require_kvm();
    if let Some(why) = netns_unavailable() {
        strata_testkit::missing(&why);
    }
    let env = CliEnv::new();
    let ns = NetNs::new("clinet").unwrap();
    ok(
        &ns,
        &env,
        &["networks", "create", "lan", "--bridge", "stbr0"],
    );
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", "stbr0"])
        .unwrap();
    let list = ok(&ns, &env, &["networks", "list", "--output", "json"]);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list[0]["definition"]["bridge"], "stbr0", "{list}");
    assert_eq!(list[0]["present"], true, "{list}");

    std::fs::create_dir_all(env.data().join("import")).unwrap();
    let kernel = env.data().join("import/netdrv.bin");
    std::fs::write(&kernel, netdrv_image().unwrap()).unwrap();
    let kernel = kernel.to_string_lossy().into_owned();
    let define = |name: &str, net: &str| {
        vec![
            "vm".to_string(),
            "define".into(),
            name.into(),
            "--boot".into(),
            "flat".into(),
            "--kernel".into(),
            kernel.clone(),
            "--memory".into(),
            "64M".into(),
            "--net".into(),
            net.into(),
        ]
    };
    let e = fails(&ns, &env, &as_str(&define("x", "network=nosuch")));
    assert!(e.contains("nosuch"), "{e}");
    let e = fails(&ns, &env, &as_str(&define("x", "network=lan,vlan=5")));
    assert!(e.contains("not VLAN-aware"), "{e}");
    let e = fails(
        &ns,
        &env,
        &as_str(&define("x", "network=lan,mac=01:00:00:00:00:01")),
    );
    assert!(e.contains("unicast"), "{e}");
    let out = ok(
        &ns,
        &env,
        &as_str(&define("g1", "network=lan,mac=52:54:00:00:00:02,rate=50")),
    );
    assert!(
        out.contains("mac 52:54:00:00:00:02") && out.contains("rate 50 MB/s"),
        "{out}"
    );
    // A generated MAC is kept in the definition.
    let out = ok(&ns, &env, &as_str(&define("g2", "network=lan")));
    assert!(out.contains("mac 52:54:00:"), "{out}");
    ok(&ns, &env, &["vm", "remove", "g2"]);

    let mut vm = strata(&ns, &env, &["vm", "start", "g1", "--quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // The guest is up once it answers.
    let t0 = Instant::now();
    let mut replies = 0;
    while replies < 3 && t0.elapsed() < Duration::from_secs(60) {
        replies = ping(&ns, Ipv4Addr::new(10, 77, 0, 2), 3, Duration::from_secs(1)).unwrap();
    }
    assert_eq!(
        replies, 3,
        "the guest did not answer ping across the bridge"
    );
    let show = ok(&ns, &env, &["networks", "show", "lan", "--output", "json"]);
    let show: serde_json::Value = serde_json::from_str(&show).unwrap();
    let ports = show["ports"].as_array().cloned().unwrap_or_default();
    assert!(
        ports
            .iter()
            .any(|p| p.as_str().is_some_and(|p| p.starts_with("st"))),
        "the VM's tap is not a port of the bridge: {show}"
    );
    let e = fails(&ns, &env, &["networks", "remove", "lan"]);
    assert!(e.contains("used by VM g1"), "{e}");
    let sock = ns.run(|| Ok(UdpSocket::bind("10.77.0.1:0")?)).unwrap();
    sock.send_to(b"NETDRV STOP", "10.77.0.2:7777").unwrap();
    let st = vm.wait().unwrap();
    assert!(st.success(), "vm start ended with {st}");
    let console = ok(&ns, &env, &["vm", "console", "g1"]);
    assert!(console.contains("NETTEST PASS"), "{console}");
    let status = ok(&ns, &env, &["vm", "status", "g1", "--output", "json"]);
    assert!(status.contains("guest powered off"), "{status}");
    // The tap went with the VMM; the network can go once no VM uses it.
    ok(&ns, &env, &["vm", "remove", "g1"]);
    ok(&ns, &env, &["networks", "remove", "lan"]);
    let list = ok(&ns, &env, &["networks", "list", "--output", "json"]);
    assert_eq!(list.trim(), "[]");
}

strata_testkit::main!(a_vm_on_a_strata_network_answers_ping_across_the_bridge,);

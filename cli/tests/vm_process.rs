//! The VMM process model, end to end through `strata serve` (tier 1: freestanding guests, which
//! run on any KVM including PVM):
//!
//! - a VM outlives a server killed with SIGKILL: a new server adopts it, reports it running,
//!   its console keeps growing and the counter its guest writes to disk keeps advancing;
//! - a VMM killed with SIGKILL is reported failed within a second, other VMs and the API go
//!   on, and its volume checks clean, holds what the guest flushed and opens for a new VM;
//! - the ACPI power button reaches the guest, which acknowledges it and powers off;
//! - a VMM thread making a system call outside its seccomp filter dies of SIGSYS, and the
//!   reason names the thread's role and the call;
//! - the VMM runs as an unprivileged uid in namespaces of its own, with an empty root, and
//!   holds no file of the server's and no other VM's disk.
//!
//! The guest is the ticker (tests/guest/blkdrv with -DTICKER): it writes a counter to its disk
//! and prints "tick N" about ten times a second, and answers the power button.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::vms::*;
use common::Server;
use serde_json::{json, Value};
use strata_api::client::Client;
use strata_tests::{ticker_counter, ticker_image};

const TICKER_ACK: &str = "ticker: power button pressed, powering off";

/// Puts the ticker guest in the server's import folder; returns its path.
fn write_ticker(srv: &Server) -> String {
    let path = srv.data.join("import/ticker.bin");
    std::fs::write(&path, ticker_image().unwrap()).unwrap();
    path.to_string_lossy().into_owned()
}

/// A 4 MiB raw image `name` in the image folder, adopted; returns its path.
fn raw_image(srv: &Server, c: &Client, name: &str) -> PathBuf {
    let path = srv.data.join("images").join(name);
    std::fs::File::create(&path)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let r = c
        .request(
            "POST",
            &format!("/api/images/{name}/adopt"),
            Some(&json!({"format": "raw"})),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    path
}

/// The last "tick N" the console shows.
fn last_tick(c: &Client, vm: &str) -> u64 {
    let log = console(c, vm, "?tail=4096");
    log["data"]
        .as_str()
        .unwrap_or_default()
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("tick ")?.trim().parse().ok())
        .unwrap_or(0)
}

fn wait_ticks(c: &Client, vm: &str, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let t = last_tick(c, vm);
        if t >= at_least {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "VM {vm} did not tick {at_least} times: {:?} / {:?}",
            status(c, vm),
            console(c, vm, "?tail=2000")["data"]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn vmm_pid(c: &Client, vm: &str) -> u32 {
    let s = status(c, vm);
    s["pid"].as_u64().unwrap_or_else(|| panic!("{s:?}")) as u32
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        })
        .unwrap_or(false)
}

fn ticker_on_disk(path: &Path) -> Option<u64> {
    ticker_counter(&std::fs::read(path).unwrap())
}

fn a_vm_outlives_a_killed_server_and_a_new_server_adopts_it() {
    strata_testkit::require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut srv = Server::start_on(&data);
    let token = srv.token.clone();
    let c = srv.client();
    let ticker = write_ticker(&srv);
    let disk = raw_image(&srv, &c, "tick.raw");
    define_and_start(
        &c,
        json!({"name": "tick", "memory": "32M", "boot": "flat", "kernel": ticker,
               "disks": [{"source": "image:tick.raw"}]}),
    );
    wait_ticks(&c, "tick", 3);
    let pid = vmm_pid(&c, "tick");
    let console_file = data.join("vms/tick/console.log");

    srv.kill9();
    assert!(alive(pid), "the VMM died with its server");
    let before = (
        ticker_on_disk(&disk).unwrap(),
        std::fs::metadata(&console_file).unwrap().len(),
    );
    std::thread::sleep(Duration::from_millis(1500));
    let during = (
        ticker_on_disk(&disk).unwrap(),
        std::fs::metadata(&console_file).unwrap().len(),
    );
    assert!(
        during.0 > before.0 && during.1 > before.1,
        "with no server, the guest's disk counter and console must go on: {before:?} -> {during:?}"
    );

    let srv = Server::start_on(&data);
    let c = srv.client_with(Some(&token));
    let s = status(&c, "tick");
    assert_eq!(s["state"], "running", "{s:?}");
    assert_eq!(s["pid"], pid, "{s:?}");
    let bytes = s["console_bytes"].as_u64().unwrap();
    let counter = ticker_on_disk(&disk).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let s = status(&c, "tick");
    assert!(
        s["console_bytes"].as_u64().unwrap() > bytes,
        "the console must keep growing under the new server: {s:?}"
    );
    assert!(
        ticker_on_disk(&disk).unwrap() > counter,
        "the guest's disk counter must keep advancing under the new server"
    );

    // The live console, through the new server.
    let mut seen = String::new();
    c.stream_get("/api/vms/tick/console/stream", &mut |bytes| {
        seen.push_str(&String::from_utf8_lossy(bytes));
        Ok(!seen.contains("tick "))
    })
    .unwrap();
    let line: Value = serde_json::from_str(seen.lines().next().unwrap()).unwrap();
    assert!(line["data"].as_str().is_some(), "{seen}");

    // A stop through the new server presses the power button; the ticker answers it.
    let r = c
        .request("POST", "/api/vms/tick/stop?timeout=30", None)
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["state"], "stopped", "{:?}", r.body);
    assert_eq!(
        r.body["exit_reason"],
        "guest powered off after the power button was pressed"
    );
    assert!(console(&c, "tick", "?tail=200")["data"]
        .as_str()
        .unwrap()
        .contains(TICKER_ACK));
    assert!(!alive(pid));
}

fn a_killed_vmm_is_failed_at_once_and_its_volume_is_consistent_and_usable() {
    let (srv, c, dir, spinner) = guest_setup(Then::Spin);
    let ticker = write_ticker(&srv);
    create_volume(&c, "v1");
    define_and_start(
        &c,
        json!({"name": "victim", "memory": "32M", "boot": "flat", "kernel": ticker,
               "disks": [{"source": "lv:strata/v1"}]}),
    );
    define_and_start(
        &c,
        json!({"name": "bystander", "memory": "32M", "boot": "flat", "kernel": spinner}),
    );
    let flushed = wait_ticks(&c, "victim", 5);
    let pid = vmm_pid(&c, "victim");

    // SAFETY: kill(2) of the VMM process the server started for this test.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let t0 = Instant::now();
    let s = wait_for(&c, "victim", Duration::from_secs(10), |s| {
        s["state"] != "running"
    });
    let took = t0.elapsed();
    assert_eq!(s["state"], "failed", "{s:?}");
    assert!(
        s["exit_reason"].as_str().unwrap().contains("SIGKILL"),
        "{s:?}"
    );
    assert!(took < Duration::from_secs(1), "reported after {took:?}");
    // Nothing else noticed.
    assert_eq!(status(&c, "bystander")["state"], "running");

    // The group checks clean, and the volume holds at least what the guest had flushed.
    let r = c
        .request("POST", "/api/storage/strata/check", None)
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["clean"], true, "{:?}", r.body);
    let copy = dir.path().join("v1.raw");
    let r = c
        .download_to("/api/volumes/strata/v1/download", &copy)
        .unwrap();
    assert_eq!(r.status, 200);
    let counter = ticker_on_disk(&copy).expect("the counter is on the volume");
    assert!(
        counter >= flushed,
        "the volume lost flushed writes: counter {counter}, console showed tick {flushed}"
    );

    // The volume opens for a new VM at once.
    define_and_start(
        &c,
        json!({"name": "heir", "memory": "32M", "boot": "flat", "kernel": ticker,
               "disks": [{"source": "lv:strata/v1"}]}),
    );
    wait_ticks(&c, "heir", 2);
    for vm in ["heir", "bystander"] {
        let r = c
            .request("POST", &format!("/api/vms/{vm}/stop?force=true"), None)
            .unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
}

fn the_power_button_reaches_the_guest_which_powers_off_cleanly() {
    strata_testkit::require_kvm();
    let srv = Server::start();
    let c = srv.client();
    let ticker = write_ticker(&srv);
    let disk = raw_image(&srv, &c, "pb.raw");
    define_and_start(
        &c,
        json!({"name": "pb", "memory": "32M", "boot": "flat", "kernel": ticker,
               "disks": [{"source": "image:pb.raw"}]}),
    );
    wait_ticks(&c, "pb", 2);
    let r = c.request("POST", "/api/vms/pb/power-button", None).unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let s = wait_for(&c, "pb", Duration::from_secs(30), |s| {
        s["state"] != "running"
    });
    assert_eq!(s["state"], "stopped", "{s:?}");
    assert_eq!(
        s["exit_reason"],
        "guest powered off after the power button was pressed"
    );
    let log = console(&c, "pb", "?tail=300")["data"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(log.ends_with(&format!("{TICKER_ACK}\n")), "{log}");
    // It flushed its last counter before powering off.
    let last = log
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("tick ")?.parse::<u64>().ok())
        .unwrap();
    assert_eq!(ticker_on_disk(&disk), Some(last));
}

fn a_vmm_thread_outside_its_seccomp_filter_dies_of_sigsys_and_the_reason_is_recorded() {
    strata_testkit::require_kvm();
    for (role, kind) in [("vcpu", "vcpu"), ("control", "control")] {
        let dir = tempfile::tempdir().unwrap();
        let srv = Server::start_with_env(
            &dir.path().join("data"),
            &[],
            &[("STRATA_VMM_SECCOMP_PROBE", role)],
        );
        let c = srv.client();
        let guest = write_guest(&srv.data.join("import"), "spin.bin", Then::Spin);
        let (st, body) = define(
            &c,
            json!({"name": "probe", "memory": "32M", "boot": "flat", "kernel": guest}),
        );
        assert_eq!(st, 201, "{body:?}");
        // The vCPU's call comes once the VM runs; the control thread's before the VMM answers
        // its first request, which fails the start itself. Either way the status says why.
        let _ = c.request("POST", "/api/vms/probe/start", None).unwrap();
        let s = wait_for(&c, "probe", Duration::from_secs(30), |s| {
            s["state"] == "failed"
        });
        let why = s["exit_reason"].as_str().unwrap_or_default();
        assert_eq!(s["state"], "failed", "{role}: {s:?}");
        assert!(why.contains("SIGSYS"), "{role}: {why}");
        assert!(why.contains(&format!("a {kind} thread")), "{role}: {why}");
        assert!(
            why.contains(&format!("system call {}", libc::SYS_socket)),
            "{role}: {why}"
        );
    }
}

/// Where each descriptor of process `pid` points.
fn fd_targets(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .collect()
}

fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

fn the_vmm_runs_confined_without_the_servers_files_or_other_vms_disks() {
    strata_testkit::require_kvm();
    let srv = Server::start();
    let c = srv.client();
    let ticker = write_ticker(&srv);
    let a_disk = raw_image(&srv, &c, "a.raw");
    let b_disk = raw_image(&srv, &c, "b.raw");
    create_volume(&c, "bvol");
    define_and_start(
        &c,
        json!({"name": "a", "memory": "32M", "boot": "flat", "kernel": ticker,
               "disks": [{"source": "image:a.raw"}]}),
    );
    define_and_start(
        &c,
        json!({"name": "b", "memory": "32M", "boot": "flat", "kernel": ticker,
               "disks": [{"source": "image:b.raw"}, {"source": "lv:strata/bvol"}]}),
    );
    wait_ticks(&c, "a", 2);
    wait_ticks(&c, "b", 2);
    let data = srv.data.canonicalize().unwrap();
    for (vm, own, other) in [("a", &a_disk, &b_disk), ("b", &b_disk, &a_disk)] {
        let pid = vmm_pid(&c, vm);
        let own = own.canonicalize().unwrap().to_string_lossy().into_owned();
        let other = other.canonicalize().unwrap().to_string_lossy().into_owned();
        // An unprivileged uid and gid of its own, no groups, no new privileges.
        let uid = status_field(pid, "Uid");
        let ids: Vec<u64> = uid.split_whitespace().map(|v| v.parse().unwrap()).collect();
        assert!(
            ids.iter().all(|&u| u >= 1000 && u == ids[0]),
            "{vm}: Uid {uid}"
        );
        assert!(
            status_field(pid, "Gid")
                .split_whitespace()
                .all(|g| g == ids[0].to_string()),
            "{vm}"
        );
        assert_eq!(status_field(pid, "Groups"), "", "{vm}");
        assert_eq!(status_field(pid, "NoNewPrivs"), "1", "{vm}");
        // Every thread under a seccomp filter.
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
        {
            let st = std::fs::read_to_string(t.path().join("status")).unwrap();
            assert!(
                st.lines().any(|l| l == "Seccomp:\t2"),
                "{vm}: thread {:?} has no seccomp filter",
                t.file_name()
            );
        }
        // Namespaces of its own.
        for ns in ["mnt", "pid", "net", "ipc", "uts"] {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
            let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
            assert_ne!(theirs, ours, "{vm}: shares our {ns} namespace");
        }
        // An empty root: no path leads anywhere.
        let root: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root"))
            .unwrap()
            .flatten()
            .collect();
        assert!(root.is_empty(), "{vm}: its root holds {root:?}");
        // Only its own disk image, /dev/kvm, its log; sockets, pipes and anonymous inodes.
        let log = data.join(format!("vms/{vm}/vmm.log"));
        for target in fd_targets(pid) {
            if !target.starts_with('/') {
                continue; // socket:, pipe:, anon_inode:
            }
            assert!(
                target == own
                    || target == "/dev/kvm"
                    || target == "/dev/null"
                    || Path::new(&target) == log,
                "{vm}: holds {target}"
            );
            assert_ne!(target, other, "{vm}: holds the other VM's disk");
            for forbidden in ["tokens.json", "datastore", "/pv/", ".pv", "tls"] {
                assert!(!target.contains(forbidden), "{vm}: holds {target}");
            }
        }
    }
    for vm in ["a", "b"] {
        let r = c
            .request("POST", &format!("/api/vms/{vm}/stop?force=true"), None)
            .unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
}

strata_testkit::main!(
    a_vm_outlives_a_killed_server_and_a_new_server_adopts_it,
    a_killed_vmm_is_failed_at_once_and_its_volume_is_consistent_and_usable,
    the_power_button_reaches_the_guest_which_powers_off_cleanly,
    a_vmm_thread_outside_its_seccomp_filter_dies_of_sigsys_and_the_reason_is_recorded,
    the_vmm_runs_confined_without_the_servers_files_or_other_vms_disks,
);

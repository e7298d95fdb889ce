//! End-to-end tests of the VM resource of the HTTP API over real HTTP on loopback: definitions,
//! validation, conflicts, and guests started, watched and stopped through the API. (The VMM
//! process model itself — restarts, kills, sandbox, power button — is tested in vm_process.rs.)
//! The spinning guests ignore the ACPI power button, so these tests stop them with `force`.
//!
//! Guests: two tiny freestanding images written here (they print a line on the serial port,
//! then spin or power off), which run on any KVM including PVM; and the Linux test guest of the
//! tests crate (tests/guest), which needs hardware KVM and says loudly when it is skipped.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::vms::*;
use common::Server;
use serde_json::{json, Value};

fn vms_are_defined_listed_shown_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let srv = Server::start_on(&data);
    let c = srv.client();
    let kernel = write_guest(&srv.data.join("import"), "guest.bin", Then::Spin);
    create_volume(&c, "web-root");
    let (st, body) = define(
        &c,
        json!({"name": "web", "memory": "64M", "vcpus": 2, "boot": "flat", "kernel": kernel,
               "disks": [{"source": "lv:strata/web-root", "serial": "root0"}]}),
    );
    assert_eq!(st, 201, "{body:?}");
    assert_eq!(body["definition"]["memory"], 64 << 20);
    assert_eq!(body["definition"]["vcpus"], 2);
    assert_eq!(
        body["definition"]["disks"][0]["source"],
        "lv:strata/web-root"
    );
    assert_eq!(body["definition"]["disks"][0]["readonly"], false);
    assert_eq!(body["status"]["state"], "defined");

    // Defaults: Linux boot, 512 MiB, one vCPU, the default command line.
    let (st, body) = define(&c, json!({"name": "db", "kernel": kernel}));
    assert_eq!(st, 201, "{body:?}");
    assert_eq!(body["definition"]["boot"], "linux");
    assert_eq!(body["definition"]["memory"], 512 << 20);
    assert_eq!(body["definition"]["vcpus"], 1);
    assert_eq!(
        body["definition"]["cmdline"],
        "console=ttyS0 reboot=k panic=1"
    );

    let (st, body) = define(&c, json!({"name": "web", "kernel": kernel}));
    assert_eq!(st, 409, "a second define must conflict: {body:?}");

    let list = c.request("GET", "/api/vms", None).unwrap();
    assert_eq!(list.status, 200);
    let names: Vec<&str> = list
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["definition"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["db", "web"]);

    let one = c.request("GET", "/api/vms/web", None).unwrap();
    assert_eq!(one.status, 200);
    assert_eq!(one.body["definition"]["disks"][0]["serial"], "root0");
    let s = status(&c, "web");
    assert_eq!(s["state"], "defined");
    assert_eq!(s["uptime_seconds"], Value::Null);
    let con = console(&c, "web", "");
    assert_eq!(con["data"], "");
    assert_eq!(con["end"], 0);

    // Definitions live in the data directory: a restarted server still has them.
    drop(c);
    let token = srv.token.clone();
    drop(srv);
    let srv = Server::start_on(&data);
    let c = srv.client_with(Some(&token));
    let one = c.request("GET", "/api/vms/web", None).unwrap();
    assert_eq!(one.status, 200, "{:?}", one.body);

    for name in ["web", "db"] {
        let r = c
            .request("DELETE", &format!("/api/vms/{name}"), None)
            .unwrap();
        assert_eq!(r.status, 204, "{:?}", r.body);
    }
    let r = c.request("GET", "/api/vms/web", None).unwrap();
    assert_eq!(r.status, 404);
    let r = c.request("DELETE", "/api/vms/web", None).unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(c.request("GET", "/api/vms", None).unwrap().body, json!([]));
    // The volume stays.
    let r = c
        .request("GET", "/api/volumes/strata/web-root", None)
        .unwrap();
    assert_eq!(r.status, 200);
}

fn bad_vm_definitions_are_refused_with_the_right_status() {
    let srv = Server::start();
    let c = srv.client();
    let kernel = write_guest(&srv.data.join("import"), "guest.bin", Then::Spin);
    let long = "x".repeat(65);
    let cases = [
        (json!({"name": "../escape", "kernel": kernel}), 400),
        (json!({"name": "a/b", "kernel": kernel}), 400),
        (json!({"name": long, "kernel": kernel}), 400),
        (json!({"name": "", "kernel": kernel}), 400),
        (
            json!({"name": "m", "memory": "lots", "kernel": kernel}),
            400,
        ),
        (json!({"name": "m", "memory": "1M", "kernel": kernel}), 400),
        (
            json!({"name": "m", "memory": "100T", "kernel": kernel}),
            400,
        ),
        (json!({"name": "m", "vcpus": 0, "kernel": kernel}), 400),
        (json!({"name": "m", "vcpus": 65, "kernel": kernel}), 400),
        (json!({"name": "m", "vcpus": 1000, "kernel": kernel}), 400),
        (json!({"name": "m", "kernel": "guest.bin"}), 400),
        // Outside the import folders: the same 403 whether the file exists or not.
        (json!({"name": "m", "kernel": "/nonexistent/vmlinuz"}), 403),
        (
            json!({"name": "m", "kernel": kernel, "initrd": "/nonexistent/initrd"}),
            403,
        ),
        (
            json!({"name": "m", "kernel": kernel, "cmdline": "a\u{7}b"}),
            400,
        ),
        (
            json!({"name": "m", "kernel": kernel, "boot": "flat", "cmdline": "x"}),
            400,
        ),
        (json!({"name": "m", "kernel": kernel, "boot": "bios"}), 400),
        (
            json!({"name": "m", "kernel": kernel, "disks": [{"source": "lv:strata/missing"}]}),
            404,
        ),
        (
            json!({"name": "m", "kernel": kernel, "disks": [{"source": "lv:nogroup/x"}]}),
            404,
        ),
        (
            json!({"name": "m", "kernel": kernel, "disks": [{"source": "image:missing.raw"}]}),
            404,
        ),
        (
            json!({"name": "m", "kernel": kernel, "disks": [{"source": "image:../etc/passwd"}]}),
            400,
        ),
        (
            json!({"name": "m", "kernel": kernel, "disks": [{"source": "/etc/passwd"}]}),
            400,
        ),
        (
            json!({"name": "m", "kernel": kernel, "disks": [{"source": "lv:strata/../x"}]}),
            400,
        ),
        (json!({"kernel": kernel}), 400),
    ];
    for (body, want) in cases {
        let (st, reply) = define(&c, body.clone());
        assert_eq!(st, want, "{body} answered {reply:?}");
        assert!(
            reply["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{reply:?}"
        );
    }
    create_volume(&c, "d0");
    let disk = json!({"source": "lv:strata/d0", "serial": "s"});
    let (st, reply) = define(
        &c,
        json!({"name": "m", "kernel": kernel, "disks": [disk, disk]}),
    );
    assert_eq!(st, 400, "a disk given twice: {reply:?}");
    let (st, reply) = define(
        &c,
        json!({"name": "m", "kernel": kernel,
               "disks": [{"source": "lv:strata/d0", "serial": "012345678901234567890"}]}),
    );
    assert_eq!(st, 400, "a 21-byte serial: {reply:?}");
    let r = c
        .send("POST", "/api/vms", b"{not json".to_vec(), true)
        .unwrap();
    assert_eq!(r.status, 400);
    // Nothing was defined by any of these.
    assert_eq!(c.request("GET", "/api/vms", None).unwrap().body, json!([]));

    // Unknown VMs and bad names in paths.
    for (m, p) in [
        ("GET", "/api/vms/nope"),
        ("GET", "/api/vms/nope/status"),
        ("GET", "/api/vms/nope/console"),
        ("POST", "/api/vms/nope/start"),
        ("POST", "/api/vms/nope/stop"),
        ("DELETE", "/api/vms/nope"),
    ] {
        let r = c.request(m, p, None).unwrap();
        assert_eq!(r.status, 404, "{m} {p}: {:?}", r.body);
    }
    let r = c.request("GET", "/api/vms/..%2Fetc", None).unwrap();
    assert_eq!(r.status, 400, "{:?}", r.body);
    let (st, _) = define(
        &c,
        json!({"name": "idle", "boot": "flat", "kernel": kernel}),
    );
    assert_eq!(st, 201);
    let r = c.request("POST", "/api/vms/idle/stop", None).unwrap();
    assert_eq!(
        r.status, 409,
        "stopping a VM that is not running: {:?}",
        r.body
    );
    let r = c
        .request("GET", "/api/vms/idle/console?offset=abc", None)
        .unwrap();
    assert_eq!(r.status, 400, "{:?}", r.body);

    // Every VM route is in the OpenAPI document, so http_api's 401 check covers it.
    let doc = c.request("GET", "/api/openapi.json", None).unwrap().body;
    for path in [
        "/api/vms",
        "/api/vms/{name}",
        "/api/vms/{name}/start",
        "/api/vms/{name}/stop",
        "/api/vms/{name}/status",
        "/api/vms/{name}/console",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} is not documented");
    }
}

fn a_guest_is_started_watched_and_stopped_through_the_api() {
    let (_srv, c, _dir, spinner) = guest_setup(Then::Spin);
    create_volume(&c, "spin-root");
    define_and_start(
        &c,
        json!({"name": "spin", "memory": "32M", "boot": "flat", "kernel": spinner,
               "disks": [{"source": "lv:strata/spin-root"}]}),
    );
    let s = status(&c, "spin");
    assert!(s["pid"].as_u64().is_some(), "{s:?}");

    // Running: a second start, removing the VM or its disk all conflict.
    let r = c.request("POST", "/api/vms/spin/start", None).unwrap();
    assert_eq!(r.status, 409, "{:?}", r.body);
    let r = c.request("DELETE", "/api/vms/spin", None).unwrap();
    assert_eq!(r.status, 409, "{:?}", r.body);
    let r = c
        .request("DELETE", "/api/volumes/strata/spin-root", None)
        .unwrap();
    assert_eq!(r.status, 409, "removing a running VM's disk: {:?}", r.body);
    // Nor can it be resized under the guest; the volume says who holds it.
    let r = c
        .request(
            "POST",
            "/api/volumes/strata/spin-root/resize",
            Some(&json!({"size": "128M"})),
        )
        .unwrap();
    assert_eq!(r.status, 409, "resizing a running VM's disk: {:?}", r.body);
    let r = c
        .request("GET", "/api/volumes/strata/spin-root", None)
        .unwrap();
    assert_eq!(r.body["held_by"], json!(["VM spin"]), "{:?}", r.body);
    // Another VM with the same disk cannot start while this one runs.
    let (st, _) = define(
        &c,
        json!({"name": "twin", "memory": "32M", "boot": "flat", "kernel": spinner,
               "disks": [{"source": "lv:strata/spin-root"}]}),
    );
    assert_eq!(st, 201);
    let r = c.request("POST", "/api/vms/twin/start", None).unwrap();
    assert_eq!(r.status, 409, "{:?}", r.body);

    let s = wait_for(&c, "spin", Duration::from_secs(60), |s| {
        s["console_bytes"].as_u64() >= Some(GREETING.len() as u64)
    });
    assert_eq!(s["state"], "running", "{s:?}");
    let all = console(&c, "spin", "");
    assert_eq!(all["data"], GREETING, "{all:?}");
    assert_eq!(all["offset"], 0);
    assert_eq!(all["next_offset"], GREETING.len());
    assert_eq!(all["state"], "running");
    let rest = console(&c, "spin", "?offset=7");
    assert_eq!(rest["data"], &GREETING[7..]);
    let tail = console(&c, "spin", "?tail=3");
    assert_eq!(tail["data"], &GREETING[GREETING.len() - 3..]);
    let none = console(&c, "spin", &format!("?offset={}", GREETING.len()));
    assert_eq!(none["data"], "");
    let part = console(&c, "spin", "?offset=0&limit=6");
    assert_eq!(part["data"], &GREETING[..6]);
    assert_eq!(part["next_offset"], 6);

    std::thread::sleep(Duration::from_millis(1100));
    let s = status(&c, "spin");
    assert!(s["uptime_seconds"].as_u64() >= Some(1), "{s:?}");

    let r = c
        .request("POST", "/api/vms/spin/stop?force=true", None)
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["state"], "stopped");
    assert_eq!(r.body["exit_reason"], "stopped by request");
    assert!(r.body["ended_at"].as_u64().is_some());
    assert_eq!(r.body["pid"], Value::Null);
    let r = c
        .request("POST", "/api/vms/spin/stop?force=true", None)
        .unwrap();
    assert_eq!(r.status, 409, "{:?}", r.body);
    // The log of the ended run stays readable.
    assert_eq!(console(&c, "spin", "")["data"], GREETING);
    assert_eq!(console(&c, "spin", "")["state"], "stopped");

    // Stopped: the disk is free for the other VM, and can be removed once that one ends too.
    let r = c.request("POST", "/api/vms/twin/start", None).unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = c
        .request("POST", "/api/vms/twin/stop?force=true", None)
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = c
        .request("DELETE", "/api/volumes/strata/spin-root", None)
        .unwrap();
    assert_eq!(r.status, 204, "{:?}", r.body);
    for name in ["spin", "twin"] {
        let r = c
            .request("DELETE", &format!("/api/vms/{name}"), None)
            .unwrap();
        assert_eq!(r.status, 204, "{:?}", r.body);
    }
}

fn a_guest_that_powers_off_is_stopped_and_can_start_again() {
    let (srv, c, _dir, guest) = guest_setup(Then::PowerOff);
    let image = srv.data.join("images/off-disk.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    // A file put into the image folder by hand has no recorded format until adopted.
    let r = c
        .request(
            "POST",
            "/api/images/off-disk.raw/adopt",
            Some(&json!({"format": "raw"})),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let (st, body) = define(
        &c,
        json!({"name": "off", "memory": "32M", "boot": "flat", "kernel": guest,
               "disks": [{"source": "image:off-disk.raw", "readonly": true}]}),
    );
    assert_eq!(st, 201, "{body:?}");
    for run in 0..2 {
        let r = c.request("POST", "/api/vms/off/start", None).unwrap();
        assert_eq!(r.status, 200, "run {run}: {:?}", r.body);
        let s = wait_for(&c, "off", Duration::from_secs(60), |s| {
            s["state"] != "running"
        });
        assert_eq!(s["state"], "stopped", "run {run}: {s:?}");
        assert_eq!(s["exit_reason"], "guest powered off");
        // Each run has its own log.
        assert_eq!(console(&c, "off", "")["data"], GREETING);
    }
    let r = c
        .request("DELETE", "/api/images/off-disk.raw", None)
        .unwrap();
    assert_eq!(r.status, 204, "{:?}", r.body);
}

fn a_linux_guest_boots_runs_its_disk_test_and_powers_off_through_the_api() {
    use strata_tests::linux_guest::{check_console, guest_dir, prepare_raw, DISK_TEST_CMDLINE};
    // On PVM the freestanding-guest tests cover start, console and stop.
    strata_testkit::require_hardware_kvm();
    let guest: PathBuf = guest_dir().expect("building the Linux test guest");
    let srv = Server::start();
    let c = srv.client();
    prepare_raw(&srv.data.join("images/linux-disk.raw")).unwrap();
    let r = c
        .request(
            "POST",
            "/api/images/linux-disk.raw/adopt",
            Some(&json!({"format": "raw"})),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let serial = "strata-api";
    let (st, body) = define(
        &c,
        json!({"name": "linux", "memory": "512M", "vcpus": 2,
               "kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"),
               "cmdline": DISK_TEST_CMDLINE,
               "disks": [{"source": "image:linux-disk.raw", "serial": serial}]}),
    );
    assert_eq!(st, 201, "{body:?}");
    let r = c.request("POST", "/api/vms/linux/start", None).unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let s = wait_for(&c, "linux", Duration::from_secs(300), |s| {
        s["state"] != "running"
    });
    let log = console(&c, "linux", "?tail=1048576");
    assert_eq!(s["state"], "stopped", "{s:?}\n{}", log["data"]);
    assert_eq!(s["exit_reason"], "guest powered off");
    check_console(
        "Linux through the API",
        log["data"].as_str().unwrap(),
        serial,
    )
    .unwrap();
}

fn strata_cli(data: &Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("--data")
        .arg(data)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn the_cli_manages_a_vm_the_server_runs_remotely_and_locally() {
    let (srv, c, _dir, spinner) = guest_setup(Then::Spin);
    let remote_args = srv.remote_args();
    let remote = |args: &[&str]| {
        let mut all: Vec<&str> = remote_args.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        strata_cli(&srv.data, &all)
    };
    let (ok, out, err) = remote(&[
        "vm", "define", "shared", "--boot", "flat", "--memory", "32M", "--kernel", &spinner,
    ]);
    assert!(ok, "{err}");
    assert!(out.starts_with("VM shared: defined"), "{out}");
    // With --remote, start returns at once: the VM runs in the server.
    let (ok, out, err) = remote(&["vm", "start", "shared"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("shared: running"), "{out}");
    wait_for(&c, "shared", Duration::from_secs(60), |s| {
        s["console_bytes"].as_u64() >= Some(GREETING.len() as u64)
    });

    // The local CLI (another process) sees it through the files.
    for cli in [
        &remote as &dyn Fn(&[&str]) -> (bool, String, String),
        &|a: &[&str]| strata_cli(&srv.data, a),
    ] {
        let (ok, out, err) = cli(&["vm", "list"]);
        assert!(ok, "{err}");
        assert!(
            out.lines()
                .any(|l| l.starts_with("shared") && l.contains("running")),
            "{out}"
        );
        let (ok, out, err) = cli(&["vm", "console", "shared"]);
        assert!(ok, "{err}");
        assert_eq!(out, GREETING);
        let (ok, out, err) = cli(&["vm", "console", "shared", "--tail", "3"]);
        assert!(ok, "{err}");
        assert_eq!(out, &GREETING[GREETING.len() - 3..]);
        let (ok, _, err) = cli(&["vm", "start", "shared"]);
        assert!(!ok && err.contains("is running"), "{err}");
        let (ok, _, err) = cli(&["vm", "remove", "shared"]);
        assert!(!ok && err.contains("is running"), "{err}");
    }

    // A local stop reaches the server's VM (through the VMM's control socket). The spinning
    // guest does not answer the power button, so it is stopped hard at once.
    let (ok, out, err) = strata_cli(&srv.data, &["vm", "stop", "shared", "--force"]);
    assert!(ok, "{err}");
    assert!(out.contains("stopped (stopped by request)"), "{out}");
    let s = status(&c, "shared");
    assert_eq!(s["state"], "stopped", "{s:?}");
    assert_eq!(s["exit_reason"], "stopped by request");
    let (ok, out, err) = remote(&["vm", "status", "shared", "--output", "json"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"]["state"], "stopped");
    let (ok, _, err) = remote(&["vm", "stop", "shared", "--force"]);
    assert!(!ok && err.contains("not running"), "{err}");
    // `vm run` works on this machine's files only.
    let (ok, _, err) = remote(&["vm", "run", "--kernel", &spinner]);
    assert!(!ok && err.contains("vm run"), "{err}");
    let (ok, _, err) = remote(&["vm", "remove", "shared"]);
    assert!(ok, "{err}");
    assert_eq!(
        c.request("GET", "/api/vms/shared", None).unwrap().status,
        404
    );
}

fn a_kernel_the_vmm_cannot_load_leaves_the_vm_failed_with_the_reason() {
    // A flat image is not a bzImage: the Linux loader refuses it when the VM is built.
    let (srv, c, _dir, not_linux) = guest_setup(Then::Spin);
    define_and_start(
        &c,
        json!({"name": "broken", "memory": "32M", "kernel": not_linux}),
    );
    let s = wait_for(&c, "broken", Duration::from_secs(60), |s| {
        s["state"] != "running"
    });
    assert_eq!(s["state"], "failed", "{s:?}");
    let reason = s["exit_reason"].as_str().unwrap();
    assert!(reason.contains("bzImage"), "{reason}");
    // A failed VM can be removed; its kernel file going away is reported at start.
    std::fs::remove_file(srv.data.join("import/guest.bin")).unwrap();
    let r = c.request("POST", "/api/vms/broken/start", None).unwrap();
    assert_eq!(r.status, 404, "{:?}", r.body);
    let r = c.request("DELETE", "/api/vms/broken", None).unwrap();
    assert_eq!(r.status, 204, "{:?}", r.body);
}

fn a_guest_in_a_reboot_loop_is_rebuilt_then_stopped_as_failed() {
    let (_srv, c, _dir, guest) = guest_setup(Then::Reboot);
    define_and_start(
        &c,
        json!({"name": "looper", "memory": "32M", "boot": "flat", "kernel": guest}),
    );
    let s = wait_for(&c, "looper", Duration::from_secs(60), |s| {
        s["state"] != "running"
    });
    assert_eq!(s["state"], "failed", "{s:?}");
    assert!(
        s["exit_reason"].as_str().unwrap().contains("reboot loop"),
        "{s:?}"
    );
    // Each boot printed the greeting into the one console log of the run.
    assert_eq!(s["reboots"], 4);
    assert_eq!(console(&c, "looper", "")["data"], GREETING.repeat(5));
}

fn running_vms_together_may_not_claim_more_than_the_hosts_memory() {
    let (_srv, c, _dir, guest) = guest_setup(Then::Spin);
    let host_mib = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap()
        / 1024;
    // Each is 60% of the host: one runs (its memory is mapped lazily), two may not.
    let memory = format!("{}M", host_mib * 6 / 10);
    define_and_start(
        &c,
        json!({"name": "first", "memory": memory, "boot": "flat", "kernel": guest}),
    );
    let (st, reply) = define(
        &c,
        json!({"name": "second", "memory": memory, "boot": "flat", "kernel": guest}),
    );
    assert_eq!(st, 201, "{reply:?}");
    let r = c.request("POST", "/api/vms/second/start", None).unwrap();
    assert_eq!(r.status, 409, "{:?}", r.body);
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .contains("host's memory"),
        "{:?}",
        r.body
    );
    let r = c
        .request("POST", "/api/vms/first/stop?force=true", None)
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    wait_for(&c, "first", Duration::from_secs(60), |s| {
        s["state"] != "running"
    });
    let r = c.request("POST", "/api/vms/second/start", None).unwrap();
    assert_eq!(r.status, 200, "once the first stopped: {:?}", r.body);
    let r = c
        .request("POST", "/api/vms/second/stop?force=true", None)
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
}

strata_testkit::main!(
    vms_are_defined_listed_shown_and_removed,
    bad_vm_definitions_are_refused_with_the_right_status,
    a_guest_is_started_watched_and_stopped_through_the_api,
    a_guest_that_powers_off_is_stopped_and_can_start_again,
    a_linux_guest_boots_runs_its_disk_test_and_powers_off_through_the_api,
    the_cli_manages_a_vm_the_server_runs_remotely_and_locally,
    a_kernel_the_vmm_cannot_load_leaves_the_vm_failed_with_the_reason,
    a_guest_in_a_reboot_loop_is_rebuilt_then_stopped_as_failed,
    running_vms_together_may_not_claim_more_than_the_hosts_memory,
);

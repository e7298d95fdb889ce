//! Helpers for tests that define, start and watch VMs through the HTTP API: tiny freestanding
//! guests written here, and the requests every such test makes.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use strata_api::client::Client;

use super::Server;

pub const GREETING: &str = "strata flat guest up\n";

/// What a flat test guest does after printing its greeting.
#[derive(Clone, Copy)]
pub enum Then {
    Spin,
    PowerOff,
    Reboot,
}

/// 64-bit code: print `text` on COM1, then spin forever, or write the ACPI sleep/reset
/// register to power off or reboot.
pub fn flat_guest(text: &str, then: Then) -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in text.bytes() {
        code.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b; out dx, al
    }
    let acpi = match then {
        Then::Spin => None,
        Then::PowerOff => Some(0x34), // SLP_EN | S5 << 2
        Then::Reboot => Some(0x01),   // the FADT's reset value
    };
    if let Some(value) = acpi {
        // mov dx, 0x3c0; mov al, value; out dx, al
        code.extend_from_slice(&[0x66, 0xba, 0xc0, 0x03, 0xb0, value, 0xee]);
    }
    code.extend_from_slice(&[0xeb, 0xfe]); // jmp $
    code
}

pub fn write_guest(dir: &Path, name: &str, then: Then) -> String {
    let path = dir.join(name);
    std::fs::write(&path, flat_guest(GREETING, then)).unwrap();
    path.to_string_lossy().into_owned()
}

pub fn create_volume(c: &Client, name: &str) {
    let r = c
        .request(
            "POST",
            "/api/volumes",
            Some(&json!({"vg": "strata", "name": name, "size": "16M", "pool": "data"})),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
}

pub fn define(c: &Client, body: Value) -> (u16, Value) {
    let r = c.request("POST", "/api/vms", Some(&body)).unwrap();
    (r.status, r.body)
}

pub fn status(c: &Client, name: &str) -> Value {
    let r = c
        .request("GET", &format!("/api/vms/{name}/status"), None)
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body
}

pub fn console(c: &Client, name: &str, query: &str) -> Value {
    let r = c
        .request("GET", &format!("/api/vms/{name}/console{query}"), None)
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body
}

/// Polls until `done(status)` or `timeout`; returns the last status.
pub fn wait_for(c: &Client, name: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let s = status(c, name);
        if done(&s) || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Defines a VM (expecting 201) and starts it (expecting 200).
pub fn define_and_start(c: &Client, body: Value) {
    let (st, reply) = define(c, body.clone());
    assert_eq!(st, 201, "{body}: {reply:?}");
    let name = body["name"].as_str().unwrap();
    let r = c
        .request("POST", &format!("/api/vms/{name}/start"), None)
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
}

/// For tests that run guests: a server, its client, a scratch folder and a flat guest file (in
/// the server's import folder). Without KVM see [`strata_testkit::require_kvm`].
pub fn guest_setup(then: Then) -> (Server, Client, tempfile::TempDir, String) {
    strata_testkit::require_kvm();
    let srv = Server::start();
    let c = srv.client();
    let dir = tempfile::tempdir().unwrap();
    let guest = write_guest(&srv.data.join("import"), "guest.bin", then);
    (srv, c, dir, guest)
}

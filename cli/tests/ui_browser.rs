//! The web UI in a real headless Chromium (Debian's chromium and chromium-driver) against a
//! real `strata serve` over HTTPS: sign in, volumes, an upload converted onto a volume,
//! snapshots and clones, a backup verified and restored, a VM's console, sign out; a session
//! that expires; API errors shown to the user. Screenshots of each page are taken (into
//! docs/ui/ with `STRATA_UPDATE_SCREENSHOTS=1`), and the dashboard's page weight and time to
//! interactive are measured and printed (reported, not asserted).
//!
//! Without Chromium the tests fail under `CI=1` and are skipped loudly elsewhere.

mod common;
#[path = "common/webdriver.rs"]
mod webdriver;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Server;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use webdriver::Browser;

const LONG: Duration = Duration::from_secs(60);
const GREETING: &str = "strata flat guest up";

/// Where screenshots go: docs/ui/ when asked, else a scratch folder (they are taken either
/// way, so the code that takes them runs in every test run).
fn shots() -> (PathBuf, Option<tempfile::TempDir>) {
    if std::env::var_os("STRATA_UPDATE_SCREENSHOTS").is_some() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/ui");
        std::fs::create_dir_all(&dir).unwrap();
        (dir, None)
    } else {
        let t = tempfile::tempdir().unwrap();
        (t.path().to_path_buf(), Some(t))
    }
}

fn wait_view(b: &Browser, view: &str) {
    b.wait(
        &format!("#content[data-view=\"{view}\"][data-ready=\"1\"]"),
        LONG,
    );
}

fn go(b: &Browser, view: &str) {
    b.click_on(&format!("#nav a[data-view=\"{view}\"]"));
    wait_view(b, view);
}

fn submit_dialog(b: &Browser) {
    b.click_on("dialog[open] footer button[type=submit]");
}

fn wait_dialog_closed(b: &Browser) {
    b.wait_js(
        "the dialog to close",
        "return !document.querySelector('dialog[open]')",
        LONG,
    );
}

fn sign_in_with_password(b: &Browser, srv: &Server, user: &str, password: &str) {
    b.goto(&format!("{}/ui/", srv.url));
    b.wait("#form-user", LONG);
    assert!(b.url().contains("/ui/login"), "{}", b.url());
    b.type_into(&b.wait("#user", LONG), user);
    b.type_into(&b.wait("#password", LONG), password);
    b.click_on("#sign-in-user");
    wait_view(b, "dashboard");
}

fn sign_in_with_token(b: &Browser, srv: &Server) {
    b.goto(&format!("{}/ui/login", srv.url));
    b.click_on("#tab-token");
    b.type_into(&b.wait("#token", LONG), &srv.token);
    b.click_on("#sign-in-token");
    wait_view(b, "dashboard");
}

/// A 64-bit flat guest that prints the greeting on COM1 and spins (as in vm_api.rs).
fn flat_guest() -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03];
    for b in format!("{GREETING}\n").bytes() {
        code.extend_from_slice(&[0xb0, b, 0xee]);
    }
    code.extend_from_slice(&[0xeb, 0xfe]);
    code
}

/// An image with data in the first 4 KiB of every 64 KiB (the rest zeros).
fn test_image(path: &Path, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    let mut x: u32 = 0x1234_5678;
    for block in data.chunks_mut(64 << 10) {
        for b in block.iter_mut().take(4096) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
    }
    std::fs::write(path, &data).unwrap();
    data
}

fn sha(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Records every value the progress bars matching `css` take, from now on.
fn watch_progress(b: &Browser, key: &str, css: &str) {
    b.exec(
        "const [key, css] = arguments;
         window.__seen = window.__seen || {};
         const seen = window.__seen[key] = [];
         const look = () => document.querySelectorAll(css).forEach(p => {
           const v = Number(p.getAttribute('value'));
           if (seen[seen.length - 1] !== v) seen.push(v);
         });
         new MutationObserver(look).observe(document.body, {subtree: true, childList: true, attributes: true, attributeFilter: ['value']});
         look();",
        json!([key, css]),
    );
}

fn seen_progress(b: &Browser, key: &str) -> Vec<f64> {
    b.exec("return window.__seen[arguments[0]]", json!([key]))
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_f64)
        .collect()
}

/// The dashboard's page weight and time to interactive, from the browser's performance
/// entries.
fn measure_dashboard(b: &Browser) -> Value {
    b.wait_js(
        "the dashboard to be interactive",
        "return performance.getEntriesByName('strata-interactive').length > 0",
        LONG,
    );
    b.exec(
        "const nav = performance.getEntriesByType('navigation')[0];
         const res = performance.getEntriesByType('resource');
         const all = [nav, ...res];
         const sum = (k) => all.reduce((s, e) => s + (e[k] || 0), 0);
         return {
           transferred: sum('transferSize'), encoded: sum('encodedBodySize'), decoded: sum('decodedBodySize'),
           requests: all.length,
           interactive_ms: performance.getEntriesByName('strata-interactive')[0].startTime,
           dom_content_loaded_ms: nav.domContentLoadedEventEnd,
           resources: all.map(e => [e.name.replace(location.origin, ''), e.transferSize, e.encodedBodySize]),
         };",
        json!([]),
    )
}

fn request_json(srv: &Server, method: &str, path: &str, body: Option<Value>) -> Value {
    let r = srv.client().request(method, path, body.as_ref()).unwrap();
    assert!(r.status < 300, "{method} {path}: {} {:?}", r.status, r.body);
    r.body
}

/// Downloads `path` (raw bytes) through the API.
fn download(srv: &Server, path: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("d");
    let r = srv.client().download_to(path, &out).unwrap();
    assert_eq!(r.status, 200, "{path}: {:?}", r.body);
    std::fs::read(out).unwrap()
}

fn the_ui_drives_volumes_images_backups_and_vms_and_signing_out_ends_the_session() {
    let b = Browser::start();
    let srv = Server::start_with_args(&["--usage-interval", "1s"]);
    let (shots, _keep) = shots();
    request_json(
        &srv,
        "POST",
        "/api/users",
        Some(json!({"name": "ada", "password": "correct horse battery", "admin": true})),
    );

    // Signing in: the pages send to the sign-in page first; a wrong password is refused.
    b.goto(&format!("{}/ui/volumes", srv.url));
    b.wait("#form-user", LONG);
    assert!(
        b.url().contains("/ui/login?next=/ui/volumes"),
        "{}",
        b.url()
    );
    b.type_into(&b.wait("#user", LONG), "ada");
    b.type_into(&b.wait("#password", LONG), "wrong horse battery");
    b.click_on("#sign-in-user");
    let err = b.wait("#error-user", LONG);
    assert!(b.text(&err).contains("Wrong"), "{}", b.text(&err));
    b.screenshot(&shots.join("login.png"));
    sign_in_with_password(&b, &srv, "ada", "correct horse battery");
    let cold = measure_dashboard(&b);
    let cookie = b
        .cookies()
        .into_iter()
        .find(|c| c["name"] == "__Host-strata-session")
        .expect("the session cookie");
    assert_eq!(cookie["httpOnly"], true, "{cookie}");
    assert_eq!(cookie["secure"], true, "{cookie}");
    assert_eq!(cookie["sameSite"], "Strict", "{cookie}");
    assert!(cookie["expiry"].as_u64().is_some(), "{cookie}");
    let session = cookie["value"].as_str().unwrap().to_string();
    assert!(b.text_of("#who").contains("ada"));
    // A second load of the dashboard (assets may come from the cache now).
    b.goto(&format!("{}/ui/", srv.url));
    wait_view(&b, "dashboard");
    let warm = measure_dashboard(&b);
    println!("DASHBOARD cold load: {cold}");
    println!("DASHBOARD warm load: {warm}");

    // Create a volume.
    go(&b, "volumes");
    b.click_on("[data-action=create-volume]");
    b.fill_field("Name", "web-disk");
    b.fill_field("Size", "64M");
    b.fill_field("Thin pool", "data");
    submit_dialog(&b);
    wait_dialog_closed(&b);
    b.wait("tr[data-volume=web-disk]", LONG);

    // Upload an image, watching the progress bar move (large enough that the browser reports
    // progress several times on loopback).
    go(&b, "images");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("seed.raw");
    let data = test_image(&file, 48 << 20);
    watch_progress(&b, "upload", "#upload-progress");
    let input = b.wait("#upload input[type=file]", LONG);
    b.type_into(&input, file.to_str().unwrap());
    b.fill_field("Image name", "seed.raw");
    b.fill_field("File format", "raw");
    b.fill_field("Store as", "raw");
    let started = Instant::now();
    b.click_on("#upload-start");
    b.wait_js(
        "the upload to complete",
        "return document.getElementById('upload-status').textContent.includes('complete')",
        LONG,
    );
    let took = started.elapsed();
    let seen = seen_progress(&b, "upload");
    println!("UPLOAD progress values seen over {took:?}: {seen:?}");
    assert!(
        seen.iter().any(|v| *v > 0.0 && *v < 100.0),
        "the upload's progress bar never showed a value between 0 and 100: {seen:?}"
    );
    assert_eq!(seen.last(), Some(&100.0), "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    b.wait("tr[data-image=\"seed.raw\"]", LONG);
    b.screenshot(&shots.join("images.png"));

    // Convert it onto the volume, following the job's progress bar.
    b.click_on("button[data-action=convert][data-image=\"seed.raw\"]");
    b.fill_field("Convert to", "lv:strata/web-disk");
    watch_progress(&b, "convert", "#job-dialog progress");
    submit_dialog(&b);
    b.wait("#job-dialog .job-progress[data-state=succeeded]", LONG);
    let seen = seen_progress(&b, "convert");
    println!("CONVERT progress values seen: {seen:?}");
    assert_eq!(seen.last(), Some(&100.0), "{seen:?}");
    b.click_on("dialog[open] footer button");
    wait_dialog_closed(&b);
    let vol = download(&srv, "/api/volumes/strata/web-disk/download");
    assert_eq!(vol.len(), 64 << 20);
    assert_eq!(
        sha(&vol[..data.len()]),
        sha(&data),
        "the volume holds the image"
    );
    assert!(vol[data.len()..].iter().all(|&x| x == 0));

    // Snapshot, clone, template.
    go(&b, "volumes");
    b.click_on("button[data-action=snapshot][data-volume=web-disk]");
    b.fill_field("Snapshot name", "web-disk-snap");
    submit_dialog(&b);
    wait_dialog_closed(&b);
    b.click_on("button[data-action=clone][data-volume=web-disk-snap]");
    b.fill_field("Clone name", "web-disk-clone");
    submit_dialog(&b);
    wait_dialog_closed(&b);
    b.wait("tr[data-volume=web-disk-clone]", LONG);
    b.click_on("button[data-action=template][data-volume=web-disk-clone]");
    b.wait(
        "button[data-action=untemplate][data-volume=web-disk-clone]",
        LONG,
    );
    let tree = b.text_of("section[data-vg=strata] table");
    assert!(
        tree.contains("snapshot") && tree.contains("template"),
        "{tree}"
    );
    // The snapshot and the clone sit under the volume they were made from, in that order.
    let order = b.exec(
        "return [...document.querySelectorAll('section[data-vg=strata] tr[data-volume]')].map(r => r.dataset.volume)",
        json!([]),
    );
    assert_eq!(
        order,
        json!(["web-disk", "web-disk-snap", "web-disk-clone"])
    );
    let clone = request_json(&srv, "GET", "/api/volumes/strata/web-disk-clone", None);
    assert_eq!(clone["template"], true, "{clone}");
    assert_eq!(clone["origin"], "web-disk-snap", "{clone}");
    b.screenshot(&shots.join("volumes.png"));

    // Back up the volume and see the snapshot with its verification state; verify it.
    go(&b, "backups");
    b.click_on("[data-action=backup-now]");
    b.fill_field("Source", "lv:strata/web-disk");
    submit_dialog(&b);
    wait_dialog_closed(&b);
    let group = "section[data-group=\"volume/strata/web-disk\"]";
    b.wait_js(
        "the backup to be listed",
        &format!("location.pathname; return !!document.querySelector('{group} tr[data-snapshot]')"),
        LONG,
    );
    assert!(
        b.text_of(group).contains("not verified"),
        "{}",
        b.text_of(group)
    );
    b.click_on(&format!("{group} button[data-action=verify]"));
    b.wait_js(
        "the snapshot to show as verified",
        &format!(
            "const t = document.querySelector('{group}'); return t && t.innerText.includes('verified') && !t.innerText.includes('not verified')"
        ),
        LONG,
    );
    let snapshot = b
        .exec(
            &format!("return document.querySelector('{group} tr[data-snapshot]').dataset.snapshot"),
            json!([]),
        )
        .as_str()
        .unwrap()
        .to_string();
    let listed = request_json(&srv, "GET", "/api/backups", None);
    assert_eq!(listed[0]["verified"]["ok"], true, "{listed}");
    b.screenshot(&shots.join("backups.png"));

    // Restore it into a new image and compare with the volume.
    b.click_on(&format!("{group} button[data-action=restore]"));
    b.fill_field("Restore to", "image");
    b.fill_field("New image name", "restored.raw");
    submit_dialog(&b);
    b.wait("#job-dialog .job-progress[data-state=succeeded]", LONG);
    b.click_on("dialog[open] footer button");
    wait_dialog_closed(&b);
    let restored = download(&srv, "/api/images/restored.raw/download");
    assert_eq!(sha(&restored), sha(&vol), "the restore of {snapshot}");

    // Jobs: live list and a job's log.
    go(&b, "jobs");
    b.wait("tr[data-job]", LONG);
    let jobs = b.text_of("#content table");
    for kind in ["convert", "backup", "verify", "restore"] {
        assert!(
            jobs.contains(kind),
            "{kind} missing from the jobs list: {jobs}"
        );
    }
    b.screenshot(&shots.join("jobs.png"));
    b.click_on("tr[data-job] button[data-action=log]");
    let log = b.wait("#job-log", LONG);
    let text = b.text(&log);
    assert!(
        text.contains("Started") && text.contains("Succeeded"),
        "{text}"
    );
    b.screenshot(&shots.join("job-log.png"));
    b.click_on("dialog[open] footer button");
    wait_dialog_closed(&b);

    // A VM: define it, start it, and see its console output arrive.
    if strata_tests::have_kvm() {
        let kernel = srv.data.join("import/guest.bin");
        std::fs::write(&kernel, flat_guest()).unwrap();
        go(&b, "vms");
        b.click_on("[data-action=define-vm]");
        b.fill_field("Name", "test-vm");
        b.fill_field("Memory", "32M");
        b.fill_field("Boots", "flat");
        b.fill_field("Kernel or image on the server", kernel.to_str().unwrap());
        b.fill_field("Disks", "lv:strata/web-disk");
        submit_dialog(&b);
        wait_dialog_closed(&b);
        b.click_on("tr[data-vm=test-vm] a.name");
        wait_view(&b, "vms");
        b.click_on("button[data-action=start]");
        b.wait_js(
            "the guest's greeting in the console",
            &format!("const r = document.querySelector('#console .xterm-rows'); return r && r.textContent.includes('{GREETING}')"),
            LONG,
        );
        b.wait("#vm-state .badge", LONG);
        b.wait_js(
            "the VM to show as running",
            "return document.getElementById('vm-state').innerText.includes('running')",
            LONG,
        );
        b.screenshot(&shots.join("vm-console.png"));
        b.click_on("button[data-action=force-stop]");
        submit_dialog(&b);
        b.wait_js(
            "the VM to show as stopped",
            "const s = document.getElementById('vm-state'); return s && s.innerText.includes('stopped')",
            LONG,
        );
        go(&b, "vms");
        b.screenshot(&shots.join("vms.png"));
    } else {
        strata_testkit::partial_skip("the VM part of the web UI test: /dev/kvm cannot be opened");
    }

    // Settings and the dashboard as they look now, at 1280×800 and on a phone.
    go(&b, "settings");
    b.wait("[data-action=create-token]", LONG);
    b.screenshot(&shots.join("settings.png"));
    go(&b, "dashboard");
    b.wait_js(
        "usage graphs with samples",
        "return document.querySelectorAll('.series svg path.line').length > 0",
        LONG,
    );
    // Every meter on the dashboard shows figures the API gave it (a field read under the
    // wrong name shows as "–").
    let meters = b.exec(
        "return [...document.querySelectorAll('.usage-line')].map((l) => l.innerText).join('\\n')",
        serde_json::json!([]),
    );
    let meters = meters.as_str().unwrap_or_default().to_string();
    assert!(meters.contains("Data"), "no thin pool meter: {meters}");
    assert!(!meters.contains('–'), "a meter without figures: {meters}");
    b.screenshot(&shots.join("dashboard.png"));
    b.set_size(390, 844);
    wait_view(&b, "dashboard");
    b.screenshot(&shots.join("dashboard-phone.png"));
    go(&b, "volumes");
    b.screenshot(&shots.join("volumes-phone.png"));
    b.set_size(1280, 800);

    // Signing out: the pages and the old cookie no longer work.
    b.click_on("#sign-out");
    b.wait("#form-user", LONG);
    assert!(b.text_of("#notice-user").contains("signed out"));
    b.goto(&format!("{}/ui/volumes", srv.url));
    b.wait("#form-user", LONG);
    assert!(b.url().contains("/ui/login"), "{}", b.url());
    let anon = srv.client_with(None);
    let cookie = format!("__Host-strata-session={session}");
    for path in ["/api/volumes", "/ui/session"] {
        let r = anon
            .request_with("GET", path, &[("cookie", &cookie)], None)
            .unwrap();
        assert_eq!(r.status, 401, "{path} with the old cookie: {:?}", r.body);
    }
    let r = anon
        .request_with("GET", "/ui/volumes", &[("cookie", &cookie)], None)
        .unwrap();
    assert_eq!(r.status, 303, "the page with the old cookie");
}

fn an_expired_session_sends_the_user_to_sign_in_again() {
    let b = Browser::start();
    let srv = Server::start_with_args(&["--session-lifetime", "4s"]);
    sign_in_with_token(&b, &srv);
    let session = b
        .cookies()
        .into_iter()
        .find(|c| c["name"] == "__Host-strata-session")
        .unwrap()["value"]
        .as_str()
        .unwrap()
        .to_string();
    let anon = srv.client_with(None);
    let cookie = format!("__Host-strata-session={session}");
    let r = anon
        .request_with("GET", "/api/volumes", &[("cookie", &cookie)], None)
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    std::thread::sleep(Duration::from_secs(5));
    // The page notices the end of its session (the event stream ends, or the next action is
    // refused) and goes to the sign-in page, which says so.
    if let Some(link) = b.find("#nav a[data-view=volumes]") {
        let _ = b.try_cmd(
            "POST",
            &format!("/element/{}/click", link.id()),
            Some(json!({})),
        );
    }
    b.wait("#form-user", LONG);
    assert!(b.url().contains("reason=expired"), "{}", b.url());
    assert!(
        b.text_of("#notice-user").contains("ended"),
        "{}",
        b.text_of("#notice-user")
    );
    let r = anon
        .request_with("GET", "/api/volumes", &[("cookie", &cookie)], None)
        .unwrap();
    assert_eq!(r.status, 401, "{:?}", r.body);
    b.goto(&format!("{}/ui/", srv.url));
    b.wait("#form-user", LONG);
}

fn the_ui_shows_the_apis_errors() {
    let b = Browser::start();
    let srv = Server::start_with_args(&["--nbd-listen", "127.0.0.1:0"]);
    let (shots, _keep) = shots();
    sign_in_with_token(&b, &srv);
    go(&b, "volumes");

    // No room in the volume group (the thin pool takes it): 507, shown in the dialog, which
    // stays open.
    b.click_on("[data-action=create-volume]");
    b.fill_field("Name", "too-big");
    b.fill_field("Size", "100G");
    b.fill_field("Thin pool", "");
    submit_dialog(&b);
    let e = b.wait("dialog[open] .api-error", LONG);
    let text = b.text(&e);
    assert!(
        text.contains("507") && text.contains("Out of space"),
        "{text}"
    );
    b.screenshot(&shots.join("error-out-of-space.png"));
    b.click_on("dialog[open] footer button[type=button]");
    wait_dialog_closed(&b);

    // A volume in use (exported over NBD) cannot be removed: 409, shown above the tree.
    request_json(
        &srv,
        "POST",
        "/api/volumes",
        Some(json!({"vg": "strata", "name": "shared", "size": "16M", "pool": "data"})),
    );
    let export = request_json(
        &srv,
        "POST",
        "/api/exports",
        Some(json!({"source": "lv:strata/shared"})),
    );
    go(&b, "volumes");
    b.click_on("button[data-action=remove][data-volume=shared]");
    submit_dialog(&b);
    let e = b.wait("dialog[open] .api-error", LONG);
    let text = b.text(&e);
    assert!(text.contains("409") && text.contains("in use"), "{text}");
    b.click_on("dialog[open] footer button[type=button]");
    wait_dialog_closed(&b);
    // Resizing it fails the same way, with the error above the tree.
    b.click_on("button[data-action=resize][data-volume=shared]");
    b.fill_field("New size", "32M");
    submit_dialog(&b);
    let e = b.wait("dialog[open] .api-error", LONG);
    assert!(b.text(&e).contains("409"), "{}", b.text(&e));
    b.screenshot(&shots.join("error-in-use.png"));
    b.click_on("dialog[open] footer button[type=button]");
    wait_dialog_closed(&b);
    // Shrinking asks for the explicit confirmation first, without asking the server.
    let id = export["id"].as_str().unwrap();
    request_json(&srv, "DELETE", &format!("/api/exports/{id}"), None);
    go(&b, "volumes");
    b.click_on("button[data-action=resize][data-volume=shared]");
    b.fill_field("New size", "8M");
    submit_dialog(&b);
    let e = b.wait("dialog[open] .api-error", LONG);
    assert!(b.text(&e).contains("tick the box"), "{}", b.text(&e));
    let v = request_json(&srv, "GET", "/api/volumes/strata/shared", None);
    assert_eq!(v["size"], 16 << 20, "not shrunk without the confirmation");
    b.click_on("dialog[open] input[type=checkbox]");
    submit_dialog(&b);
    wait_dialog_closed(&b);
    let v = request_json(&srv, "GET", "/api/volumes/strata/shared", None);
    assert_eq!(v["size"], 8 << 20, "shrunk after the confirmation");
}

/// Cross-site request forgery: requests carrying only the session cookie need the session's
/// CSRF token to change anything and must come from the appliance's own pages; bearer tokens
/// work as before.
fn state_changes_with_the_session_cookie_need_the_csrf_token() {
    let srv = Server::start();
    let anon = srv.client_with(None);
    let r = anon
        .request_with(
            "POST",
            "/ui/session",
            &[],
            Some(&json!({"token": srv.token})),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let set_cookie = r
        .headers
        .iter()
        .find(|(k, _)| k == "set-cookie")
        .map(|(_, v)| v.clone())
        .expect("a session cookie");
    for part in [
        "__Host-strata-session=",
        "HttpOnly",
        "SameSite=Strict",
        "Secure",
        "Path=/",
        "Max-Age=",
    ] {
        assert!(set_cookie.contains(part), "{part} missing: {set_cookie}");
    }
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    let csrf = r.body["csrf"].as_str().unwrap().to_string();
    let create = |name: &str, headers: &[(&str, &str)]| {
        anon.request_with(
            "POST",
            "/api/volumes",
            headers,
            Some(&json!({"vg": "strata", "name": name, "size": "4M", "pool": "data"})),
        )
        .unwrap()
    };
    // Without the token, with a wrong one, or from another origin: refused, nothing made.
    let wrong = "0".repeat(64);
    for (what, headers) in [
        ("no token", vec![("cookie", cookie.as_str())]),
        (
            "a wrong token",
            vec![
                ("cookie", cookie.as_str()),
                ("x-csrf-token", wrong.as_str()),
            ],
        ),
        (
            "another origin",
            vec![
                ("cookie", cookie.as_str()),
                ("x-csrf-token", csrf.as_str()),
                ("origin", "https://evil.example"),
            ],
        ),
        (
            "a cross-site fetch",
            vec![
                ("cookie", cookie.as_str()),
                ("x-csrf-token", csrf.as_str()),
                ("sec-fetch-site", "cross-site"),
            ],
        ),
    ] {
        let r = create("forged", &headers);
        assert_eq!(r.status, 403, "{what}: {:?}", r.body);
    }
    let r = srv
        .client()
        .request("GET", "/api/volumes/strata/forged", None)
        .unwrap();
    assert_eq!(
        r.status, 404,
        "a refused request made nothing: {:?}",
        r.body
    );
    // Reading needs no token, but not from another site either.
    let r = anon
        .request_with("GET", "/api/volumes", &[("cookie", &cookie)], None)
        .unwrap();
    assert_eq!(r.status, 200);
    let r = anon
        .request_with(
            "GET",
            "/api/volumes",
            &[("cookie", &cookie), ("sec-fetch-site", "cross-site")],
            None,
        )
        .unwrap();
    assert_eq!(r.status, 403, "{:?}", r.body);
    // With the token, from the appliance's own origin: done.
    let origin = srv.url.clone();
    let r = create(
        "made",
        &[
            ("cookie", &cookie),
            ("x-csrf-token", &csrf),
            ("origin", &origin),
            ("sec-fetch-site", "same-origin"),
        ],
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    // Signing out needs the token too.
    let r = anon
        .request_with("DELETE", "/ui/session", &[("cookie", &cookie)], None)
        .unwrap();
    assert_eq!(r.status, 403, "{:?}", r.body);
    // Bearer tokens are unchanged: no CSRF token needed, cookies play no part.
    let r = srv
        .client()
        .request(
            "POST",
            "/api/volumes",
            Some(&json!({"vg": "strata", "name": "scripted", "size": "4M", "pool": "data"})),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = anon
        .request_with(
            "DELETE",
            "/ui/session",
            &[("cookie", &cookie), ("x-csrf-token", &csrf)],
            None,
        )
        .unwrap();
    assert_eq!(r.status, 204, "{:?}", r.body);
    let r = anon
        .request_with("GET", "/api/volumes", &[("cookie", &cookie)], None)
        .unwrap();
    assert_eq!(r.status, 401, "signed out: {:?}", r.body);
}

strata_testkit::main!(
    the_ui_drives_volumes_images_backups_and_vms_and_signing_out_ends_the_session,
    an_expired_session_sends_the_user_to_sign_in_again,
    the_ui_shows_the_apis_errors,
    state_changes_with_the_session_cookie_need_the_csrf_token,
);

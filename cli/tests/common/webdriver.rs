//! A small WebDriver client for the browser tests: Debian's chromedriver drives Debian's
//! headless Chromium (nothing is downloaded at test time).
//!
//! Written by hand over a blocking HTTP/1.1 exchange per command: the W3C WebDriver protocol
//! is JSON over HTTP on loopback, and the commands the tests need (navigate, find, click,
//! type, execute script, screenshot, cookies, window size) are a few lines each, where the
//! fantoccini crate would bring an async stack and the `webdriver` crate's dependency tree.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The key of element references in the W3C protocol.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A headless Chromium under chromedriver, with a fresh profile.
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    _profile: tempfile::TempDir,
}

/// An element of the page.
#[derive(Clone, Debug)]
pub struct Element(String);

fn which(tool: &str) -> Option<String> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .ok()?;
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!p.is_empty()).then_some(p)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP exchange with chromedriver: the status and the JSON body.
fn http(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<(u16, Value)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    // chromedriver says `Connection: close` but keeps the connection open: read the head,
    // then as many bytes as it announces.
    let mut raw = Vec::new();
    let mut buf = [0u8; 64 << 10];
    let split = loop {
        if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::other("no HTTP header end"));
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut payload = raw[split + 4..].to_vec();
    let lower = head.to_ascii_lowercase();
    let length = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    match length {
        Some(len) => {
            while payload.len() < len {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                payload.extend_from_slice(&buf[..n]);
            }
        }
        None => {
            s.read_to_end(&mut payload)?;
            if lower.contains("transfer-encoding: chunked") {
                payload = dechunk(&payload);
            }
        }
    }
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
    Ok((status, value))
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&data[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        let start = eol + 2;
        out.extend_from_slice(&data[start..(start + size).min(data.len())]);
        data = &data[(start + size + 2).min(data.len())..];
    }
}

impl Browser {
    /// Starts Chromium at 1280×800. Without Chromium or chromedriver the test ends (see
    /// [`strata_testkit::missing`]: a failure under `CI=1`, ignored elsewhere).
    pub fn start() -> Browser {
        let (Some(driver), Some(chromium)) = (which("chromedriver"), which("chromium")) else {
            strata_testkit::missing(
                "chromium or chromedriver is not installed (apt-get install chromium chromium-driver)",
            );
        };
        let port = free_port();
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new(&driver)
            .arg(format!("--port={port}"))
            .arg(format!(
                "--log-path={}",
                profile.path().join("chromedriver.log").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let mut b = Browser {
            driver: child,
            port,
            session: String::new(),
            _profile: profile,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http(port, "GET", "/status", None).map_or(true, |(_, v)| v["value"]["ready"] != true)
        {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "pageLoadStrategy": "normal",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                    "--ignore-certificate-errors", "--window-size=1280,800",
                    format!("--user-data-dir={}", b._profile.path().join("profile").display()),
                ],
            },
        }}});
        let (status, v) = http(port, "POST", "/session", Some(&caps)).expect("new session");
        assert_eq!(status, 200, "new WebDriver session: {v}");
        b.session = v["value"]["sessionId"].as_str().unwrap().to_string();
        b.set_size(1280, 800);
        b
    }

    /// A command of this session; its `value`, or the WebDriver error.
    pub fn try_cmd(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let full = format!("/session/{}{path}", self.session);
        let (status, v) =
            http(self.port, method, &full, body.as_ref()).map_err(|e| e.to_string())?;
        if status == 200 {
            Ok(v["value"].clone())
        } else {
            Err(format!("{method} {path}: {status} {}", v["value"]))
        }
    }

    pub fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.try_cmd(method, path, body)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn set_size(&self, width: u32, height: u32) {
        self.cmd(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        );
        // The window includes no browser chrome in headless mode; make the viewport exact.
        let inner = self.exec("return [innerWidth, innerHeight]", json!([]));
        let (iw, ih) = (
            inner[0].as_i64().unwrap_or(0),
            inner[1].as_i64().unwrap_or(0),
        );
        if iw != width as i64 || ih != height as i64 {
            let w = width as i64 + (width as i64 - iw);
            let h = height as i64 + (height as i64 - ih);
            self.cmd(
                "POST",
                "/window/rect",
                Some(json!({"width": w, "height": h})),
            );
        }
    }

    pub fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    pub fn url(&self) -> String {
        self.cmd("GET", "/url", None)
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Runs `script` (a function body; `arguments` are `args`) and returns its result.
    pub fn exec(&self, script: &str, args: Value) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
    }

    /// The first element matching `css` now, if any.
    pub fn find(&self, css: &str) -> Option<Element> {
        self.try_cmd(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        )
        .ok()
        .and_then(|v| v[ELEMENT].as_str().map(|s| Element(s.to_string())))
    }

    /// Every element matching `css` now.
    pub fn find_all(&self, css: &str) -> Vec<Element> {
        self.cmd(
            "POST",
            "/elements",
            Some(json!({"using": "css selector", "value": css})),
        )
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v[ELEMENT].as_str().map(|s| Element(s.to_string())))
                .collect()
        })
        .unwrap_or_default()
    }

    /// Waits until an element matches `css` (and is displayed).
    pub fn wait(&self, css: &str, timeout: Duration) -> Element {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.find(css) {
                if self.displayed(&e) {
                    return e;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no {css} after {timeout:?} on {}: {}",
                self.url(),
                self.text_of("body")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `script` (a function body) returns something truthy; returns it.
    pub fn wait_js(&self, what: &str, script: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.exec(script, json!([]));
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not after {timeout:?} on {}: {}",
                self.url(),
                self.text_of("body")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn displayed(&self, e: &Element) -> bool {
        self.try_cmd("GET", &format!("/element/{}/displayed", e.0), None)
            .map(|v| v == true)
            .unwrap_or(false)
    }

    /// Clicks `e`. A notice shown over it for a moment (a toast) intercepts the click, as it
    /// would a user's: try again until it has gone, for up to 10 s.
    pub fn click(&self, e: &Element) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.try_cmd("POST", &format!("/element/{}/click", e.0), Some(json!({}))) {
                Ok(_) => return,
                Err(err)
                    if err.contains("element click intercepted") && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(err) => panic!("{err}"),
            }
        }
    }

    /// Clicks the element matching `css`, waiting for it.
    pub fn click_on(&self, css: &str) {
        let e = self.wait(css, Duration::from_secs(20));
        self.click(&e);
    }

    /// Types `text` into an element (after clearing it, unless it is a file input).
    pub fn type_into(&self, e: &Element, text: &str) {
        let _ = self.try_cmd("POST", &format!("/element/{}/clear", e.0), Some(json!({})));
        self.cmd(
            "POST",
            &format!("/element/{}/value", e.0),
            Some(json!({ "text": text })),
        );
    }

    /// Sets the value of the field labelled `label` in the open dialog (a select: by option
    /// value).
    pub fn fill_field(&self, label: &str, value: &str) {
        // Dialogs open after their data arrives: wait for the label first.
        self.wait_js(
            &format!("a field labelled {label:?}"),
            &format!(
                "const d = document.querySelector('dialog[open]') || document;
                 return [...d.querySelectorAll('label')].some(l => l.textContent.trim() === {})",
                Value::String(label.to_string())
            ),
            Duration::from_secs(20),
        );
        let ok = self.exec(
            "const [label, value] = arguments;
             const d = document.querySelector('dialog[open]') || document;
             const l = [...d.querySelectorAll('label')].find(l => l.textContent.trim() === label);
             if (!l) return false;
             const i = document.getElementById(l.htmlFor);
             if (i.tagName === 'SELECT') { i.value = value; i.dispatchEvent(new Event('change', {bubbles: true})); return i.value === value; }
             return 'type';",
            json!([label, value]),
        );
        if ok == "type" {
            let id = self.exec(
                "const d = document.querySelector('dialog[open]') || document;
                 return [...d.querySelectorAll('label')].find(l => l.textContent.trim() === arguments[0]).htmlFor;",
                json!([label]),
            );
            let e = self.find(&format!("#{}", id.as_str().unwrap())).unwrap();
            self.type_into(&e, value);
        } else {
            assert_eq!(ok, true, "no field {label:?} taking {value:?}");
        }
    }

    pub fn text(&self, e: &Element) -> String {
        self.cmd("GET", &format!("/element/{}/text", e.0), None)
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// The visible text of the first element matching `css` ("" when none).
    pub fn text_of(&self, css: &str) -> String {
        self.exec(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';",
            json!([css]),
        )
        .as_str()
        .unwrap_or("")
        .to_string()
    }

    /// Saves a PNG of the viewport.
    pub fn screenshot(&self, path: &Path) {
        use base64::Engine;
        let b64 = self.cmd("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// The cookies the browser holds for the current page (HttpOnly ones included).
    pub fn cookies(&self) -> Vec<Value> {
        self.cmd("GET", "/cookie", None)
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = http(
                self.port,
                "DELETE",
                &format!("/session/{}", self.session),
                None,
            );
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Element {
    pub fn id(&self) -> &str {
        &self.0
    }
}

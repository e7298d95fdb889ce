//! Shared helpers for end-to-end tests of the `strata` binary and its HTTP API.
#![allow(dead_code)]

pub mod vms;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use strata_api::client::{Client, Trust};

/// A `strata serve` process on a free loopback port with its own data directory.
pub struct Server {
    child: Child,
    pub url: String,
    pub token: String,
    pub data: PathBuf,
    /// The SHA-256 fingerprint of its TLS certificate (empty with --http).
    pub fingerprint: String,
    _dir: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts a server on a fresh data directory.
    pub fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mut s = Server::start_on(&data);
        s._dir = Some(dir);
        s
    }

    /// Starts a server on a fresh data directory with more arguments for `strata serve`.
    pub fn start_with_args(extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mut s = Server::start_with(&data, extra);
        s._dir = Some(dir);
        s
    }

    /// Sends SIGTERM and waits at most `timeout` for the server to exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY: kill(2) with the pid of our own child process; no memory is passed.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Starts a server on `data` (which may already hold state).
    pub fn start_on(data: &Path) -> Server {
        Server::start_with(data, &[])
    }

    /// `start_on` with more arguments for `strata serve`.
    pub fn start_with(data: &Path, extra: &[&str]) -> Server {
        Server::start_with_env(data, extra, &[])
    }

    /// `start_with` with environment variables for the server (and the VMMs it starts).
    pub fn start_with_env(data: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_strata"))
            .args([
                "--data",
                data.to_str().unwrap(),
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--pv-size",
                "4G",
            ])
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start strata serve");
        let out = child.stdout.take().unwrap();
        let mut lines = BufReader::new(out).lines();
        let (mut url, mut token, mut fingerprint) = (None, None, String::new());
        let deadline = Instant::now() + Duration::from_secs(60);
        while url.is_none() {
            assert!(Instant::now() < deadline, "strata serve did not start");
            let Some(Ok(line)) = lines.next() else {
                panic!("strata serve exited early")
            };
            if let Some(rest) = line.strip_prefix("Strata API listening on ") {
                url = Some(rest.trim_end_matches("/api").to_string());
            } else if let Some(fp) = line.strip_prefix("TLS certificate SHA-256 fingerprint: ") {
                fingerprint = fp.trim().to_string();
            } else if token.is_none() && line.starts_with("  ") && line.trim().contains('.') {
                token = Some(line.trim().to_string());
            }
        }
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            url: url.unwrap(),
            token: token.unwrap_or_default(),
            data: data.to_path_buf(),
            fingerprint,
            _dir: None,
        }
    }

    /// How clients trust it: its pinned certificate fingerprint (none over plain HTTP).
    pub fn trust(&self) -> Option<Trust> {
        (!self.fingerprint.is_empty()).then(|| Trust::Fingerprint(self.fingerprint.clone()))
    }

    /// A client with the admin token.
    pub fn client(&self) -> Client {
        self.client_with(Some(&self.token))
    }

    /// A client with the given token (or none).
    pub fn client_with(&self, token: Option<&str>) -> Client {
        Client::with_trust(&self.url, token.map(str::to_string), self.trust()).unwrap()
    }

    /// The arguments that point the CLI at this server: --remote, --token, --fingerprint.
    pub fn remote_args(&self) -> Vec<String> {
        let mut a = vec![
            "--remote".to_string(),
            self.url.clone(),
            "--token".to_string(),
            self.token.clone(),
        ];
        if !self.fingerprint.is_empty() {
            a.extend(["--fingerprint".to_string(), self.fingerprint.clone()]);
        }
        a
    }
}

impl Server {
    /// Kills the server with SIGKILL (its VMs keep running) and waits for it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // VMs outlive their server: stop this server's VMs hard, through the API while it
        // lives, and kill what is left by the pids recorded in the data directory.
        if let Ok(None) = self.child.try_wait() {
            let c = self.client();
            if let Ok(r) = c.request("GET", "/api/vms", None) {
                for vm in r.body.as_array().cloned().unwrap_or_default() {
                    if vm["status"]["state"] == "running" || vm["status"]["state"] == "paused" {
                        let name = vm["definition"]["name"].as_str().unwrap_or_default();
                        let _ =
                            c.request("POST", &format!("/api/vms/{name}/stop?force=true"), None);
                    }
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        kill_vms(&self.data);
    }
}

/// Kills every VMM process (and its monitor) recorded under `data/vms`.
pub fn kill_vms(data: &Path) {
    let Ok(dirs) = std::fs::read_dir(data.join("vms")) else {
        return;
    };
    for d in dirs.flatten() {
        let Ok(text) = std::fs::read(d.path().join("status.json")) else {
            continue;
        };
        let Ok(v) = serde_json::from_slice::<Value>(&text) else {
            continue;
        };
        for key in ["pid", "monitor_pid"] {
            let Some(pid) = v[key].as_u64().filter(|p| *p > 1) else {
                continue;
            };
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "strata" {
                // SAFETY: kill(2) of a strata process this test's server started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts a job with `method path body`, expecting 202, and returns its id.
pub fn start_job(c: &Client, path: &str, body: &Value) -> String {
    let r = c.request("POST", path, Some(body)).unwrap();
    assert_eq!(r.status, 202, "{path} {body}: {:?}", r.body);
    r.body["id"].as_str().unwrap().to_string()
}

/// Polls a job until it ends; returns its last status and every (done, total) seen.
pub fn wait_job(c: &Client, id: &str) -> (Value, Vec<(u64, u64)>) {
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut seen = Vec::new();
    loop {
        let r = c.request("GET", &format!("/api/jobs/{id}"), None).unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
        let done = r.body["bytes_done"].as_u64().unwrap();
        let total = r.body["bytes_total"].as_u64().unwrap();
        if seen.last() != Some(&(done, total)) {
            seen.push((done, total));
        }
        if r.body["state"] != "running" {
            return (r.body, seen);
        }
        assert!(
            Instant::now() < deadline,
            "job {id} still running: {:?}",
            r.body
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn succeed(c: &Client, id: &str) -> Value {
    let (status, _) = wait_job(c, id);
    assert_eq!(status["state"], "succeeded", "{status}");
    status
}

pub fn image_names(c: &Client) -> Vec<String> {
    let r = c.request("GET", "/api/images", None).unwrap();
    assert_eq!(r.status, 200);
    r.body
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

/// Files in a folder, hidden ones included.
pub fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Returns when `tool` is installed; see [`strata_testkit::missing`] otherwise (a failure
/// under `CI=1`, where scripts/install-deps.sh installs it).
pub fn require_tool(tool: &str) {
    let package = match tool {
        "qemu-img" | "qemu-io" => "qemu-utils",
        "qemu-system-x86_64" => "qemu-system-x86",
        "nbdinfo" | "nbdcopy" | "nbdfuse" => "libnbd-bin",
        "promtool" => "prometheus",
        "chromium" | "chromedriver" => "chromium chromium-driver",
        other => other,
    };
    strata_testkit::require_tool(tool, package);
}

/// A temporary data directory and the `strata` binary run on it.
pub struct CliEnv {
    dir: tempfile::TempDir,
}

impl CliEnv {
    pub fn new() -> CliEnv {
        CliEnv {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_strata"));
        c.arg("--data").arg(self.data()).args(args);
        c.env_remove("STRATA_DATA");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs a command that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "strata {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    /// Runs a command that must fail with one line on stderr; returns that line.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(!o.status.success(), "strata {args:?} succeeded");
        let err = String::from_utf8(o.stderr).unwrap();
        assert_eq!(
            err.lines().count(),
            1,
            "strata {args:?}: not one line: {err}"
        );
        assert!(err.starts_with("strata: "), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        err
    }
}

/// The entry named `name` of a JSON list of volumes.
pub fn lv<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("{name} not listed in {list}"))
}

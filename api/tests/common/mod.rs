//! Shared helpers for end-to-end tests of the `strata` binary and its HTTP API.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use strata_api::client::Client;

/// A `strata serve` process on a free loopback port with its own data directory.
pub struct Server {
    child: Child,
    pub url: String,
    pub token: String,
    pub data: PathBuf,
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

    /// Starts a server on `data` (which may already hold state).
    pub fn start_on(data: &Path) -> Server {
        Server::start_with(data, &[])
    }

    /// `start_on` with more arguments for `strata serve`.
    pub fn start_with(data: &Path, extra: &[&str]) -> Server {
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
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start strata serve");
        let out = child.stdout.take().unwrap();
        let mut lines = BufReader::new(out).lines();
        let (mut url, mut token) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(60);
        while url.is_none() {
            assert!(Instant::now() < deadline, "strata serve did not start");
            let Some(Ok(line)) = lines.next() else {
                panic!("strata serve exited early")
            };
            if let Some(rest) = line.strip_prefix("Strata API listening on ") {
                url = Some(rest.trim_end_matches("/api").to_string());
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
            _dir: None,
        }
    }

    /// A client with the admin token.
    pub fn client(&self) -> Client {
        Client::new(&self.url, Some(self.token.clone())).unwrap()
    }

    /// A client with the given token (or none).
    pub fn client_with(&self, token: Option<&str>) -> Client {
        Client::new(&self.url, token.map(str::to_string)).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

//! The test Ceph cluster: one per test binary, started with `scripts/ceph-cluster.sh` on first
//! use and stopped when the test process ends (the script's watcher sees its standard input, a
//! pipe this process holds, reach end of file), even if the process is killed.
//!
//! Without the Ceph packages the tests that need a cluster skip loudly, unless `CI` is set: then
//! they fail. `STRATA_CEPH_DIR=DIR` uses a cluster already started with the script instead (for
//! iterating on tests).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

/// A running test cluster.
#[derive(Debug)]
pub struct TestCluster {
    /// The cluster's directory.
    pub dir: PathBuf,
    /// Its ceph.conf.
    pub conf: PathBuf,
    /// The admin keyring.
    pub keyring: PathBuf,
    /// The RBD pool the script made.
    pub pool: String,
    /// The S3 endpoint, when started with radosgw.
    pub rgw_endpoint: Option<String>,
    /// radosgw's S3 access key and secret key, when started with radosgw.
    pub s3_keys: Option<(String, String)>,
    /// Held open for the life of the process: its end of file stops the cluster.
    _lifeline: Mutex<Option<ChildStdin>>,
}

/// The project's cluster script.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ceph-cluster.sh")
}

fn packages_missing() -> Option<&'static str> {
    ["ceph-mon", "ceph-osd", "ceph-mgr", "ceph", "rbd"]
        .into_iter()
        .find(|tool| {
            !std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
                .unwrap_or(false)
        })
}

fn parse(text: &str) -> anyhow::Result<TestCluster> {
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
    };
    let need =
        |key: &str| get(key).ok_or_else(|| anyhow::anyhow!("the script printed no {key}: {text}"));
    Ok(TestCluster {
        dir: need("dir")?.into(),
        conf: need("conf")?.into(),
        keyring: need("keyring")?.into(),
        pool: need("pool")?,
        rgw_endpoint: get("rgw_endpoint"),
        s3_keys: get("s3_access_key").zip(get("s3_secret_key")),
        _lifeline: Mutex::new(None),
    })
}

fn start(extra: &[&str]) -> anyhow::Result<TestCluster> {
    if let Some(dir) = std::env::var_os("STRATA_CEPH_DIR") {
        let out = Command::new(script()).arg("env").arg(&dir).output()?;
        anyhow::ensure!(out.status.success(), "ceph-cluster.sh env {dir:?} failed");
        return parse(&String::from_utf8_lossy(&out.stdout));
    }
    let mut child = Command::new(script())
        .args(["start", "--stop-on-eof"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut text = String::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut text)?;
    }
    let lifeline = child.stdin.take();
    let status = child.wait()?;
    anyhow::ensure!(
        status.success(),
        "scripts/ceph-cluster.sh start failed: {status}"
    );
    let c = parse(&text)?;
    *c._lifeline.lock().unwrap_or_else(|p| p.into_inner()) = lifeline;
    eprintln!("test Ceph cluster running in {}", c.dir.display());
    Ok(c)
}

/// The test binary's cluster, started on first use. Where the Ceph packages are missing the
/// test ends through [`strata_testkit::missing`] (a failure under `CI`); panics when the
/// packages are there and the cluster does not start.
pub fn cluster() -> &'static TestCluster {
    static CLUSTER: OnceLock<Result<TestCluster, String>> = OnceLock::new();
    cluster_in(&CLUSTER, &[])
}

/// [`cluster`] with radosgw (an S3 endpoint) too.
pub fn rgw_cluster() -> &'static TestCluster {
    static CLUSTER: OnceLock<Result<TestCluster, String>> = OnceLock::new();
    let c = cluster_in(&CLUSTER, &["--rgw"]);
    assert!(
        c.rgw_endpoint.is_some() && c.s3_keys.is_some(),
        "the test cluster has no radosgw (STRATA_CEPH_DIR without --rgw?)"
    );
    c
}

fn cluster_in<'a>(
    cell: &'a OnceLock<Result<TestCluster, String>>,
    extra: &[&str],
) -> &'a TestCluster {
    let c = cell.get_or_init(|| {
        if std::env::var_os("STRATA_CEPH_DIR").is_none() {
            if let Some(tool) = packages_missing() {
                return Err(tool.to_string());
            }
        }
        match start(extra) {
            Ok(c) => Ok(c),
            Err(e) => panic!("the test Ceph cluster did not start: {e:#}"),
        }
    });
    match c {
        Ok(c) => c,
        Err(tool) => strata_testkit::missing(&format!(
            "{tool} is missing: the Ceph packages are not installed (scripts/install-deps.sh)"
        )),
    }
}

/// A name no other test of this run uses: `PREFIX-PID-N`.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

impl TestCluster {
    /// Runs `tool` (`rbd`, `ceph`, `rados`) on this cluster; returns its standard output,
    /// failing on an error.
    pub fn tool(&self, tool: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(tool)
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{tool} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs the `rbd` tool on this cluster.
    pub fn rbd(&self, args: &[&str]) -> anyhow::Result<String> {
        self.tool("rbd", args)
    }

    /// Runs the `ceph` tool on this cluster.
    pub fn ceph(&self, args: &[&str]) -> anyhow::Result<String> {
        self.tool("ceph", args)
    }

    /// Makes a new pool for one test (quota tests must not fill the shared pool).
    pub fn new_pool(&self, name: &str) -> anyhow::Result<()> {
        self.ceph(&["osd", "pool", "create", name, "8", "8"])?;
        self.ceph(&["osd", "pool", "application", "enable", name, "rbd"])?;
        Ok(())
    }

    /// Removes a pool made with [`TestCluster::new_pool`].
    pub fn remove_pool(&self, name: &str) -> anyhow::Result<()> {
        self.ceph(&[
            "osd",
            "pool",
            "rm",
            name,
            name,
            "--yes-i-really-really-mean-it",
        ])?;
        Ok(())
    }

    /// The storage layer's description of this cluster (admin user).
    #[cfg(feature = "rbd")]
    pub fn spec(&self) -> strata_storage::volume::rbd::ClusterSpec {
        strata_storage::volume::rbd::ClusterSpec {
            conf: self.conf.clone(),
            user: "admin".into(),
            keyring: None,
        }
    }
}

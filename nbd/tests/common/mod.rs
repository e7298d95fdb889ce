//! Shared helpers of the NBD interop tests: real clients (qemu-img, qemu-io, nbdinfo,
//! nbdcopy), servers on free loopback ports, a volume group with a thin volume, a snapshot of
//! it and a backup of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use strata_backup::{BackupOptions, Changes, Datastore, NoProgress, SnapshotName};
use strata_nbd::{start, ExportRegistry, Limits, Listen, ServerConfig, ServerHandle, TlsSettings};
use strata_storage::volume::{Vg, VolumeStore};
use strata_storage::BlockDevice;

pub const MIB: u64 = 1 << 20;

/// Every client tool the tests use (see [`strata_testkit::missing`]).
pub fn require_clients() {
    strata_testkit::require_qemu_utils();
    strata_testkit::require_tool("nbdinfo", "libnbd-bin");
    strata_testkit::require_tool("nbdcopy", "libnbd-bin");
}

/// Runs a command; returns its output (success not checked).
pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

/// Runs a command that must succeed; returns its standard output.
pub fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A server on a free loopback port.
pub fn serve(registry: Arc<ExportRegistry>, tls: Option<TlsSettings>) -> ServerHandle {
    start(
        ServerConfig {
            listen: vec![Listen::Tcp("127.0.0.1:0".parse().unwrap())],
            tls,
            limits: Limits::default(),
        },
        registry,
    )
    .expect("start the NBD server")
}

/// `nbd://ADDR/NAME` of a server.
pub fn uri(server: &ServerHandle, name: &str) -> String {
    format!("nbd://{}/{name}", server.tcp_addr().unwrap())
}

/// Deterministic test bytes.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 512) as u8).wrapping_mul(31) ^ seed ^ (i as u8))
        .collect()
}

/// Writes `data` at `offset` of `dev` and flushes.
pub fn write(dev: &dyn BlockDevice, offset: u64, data: &[u8]) {
    use strata_storage::io::{IoBuf, QueueOptions, Request};
    let mut q = dev.open_queue(&QueueOptions::with_depth(2)).unwrap();
    for req in [
        Request::write(0, offset, IoBuf::from_slice(data)),
        Request::flush(1),
    ] {
        q.submit(req).unwrap();
        let mut out = Vec::new();
        while out.is_empty() {
            q.wait(None).unwrap();
            q.reap(&mut out);
        }
        out.pop().unwrap().result.unwrap();
    }
}

/// A data directory with volume group `tvg`: thin pool `pool`, 32 MiB thin volume `vm1` with
/// data at 1–3 MiB and 10 MiB, bitmap `b1` (64 KiB granularity) added after the first write,
/// so it holds exactly the 10 MiB write; snapshot `snap1` taken after both; a backup of `vm1`
/// in `DATA/datastore`. `expected` is the volume's content.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub data: PathBuf,
    pub vg: Vg,
    pub expected: Vec<u8>,
    pub backup: SnapshotName,
    pub store: Datastore,
}

pub const VOLUME_SIZE: u64 = 32 * MIB;

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let store = VolumeStore::new(&data);
        let pv = data.join("pv0.img");
        store.pv_create(&pv, Some(256 * MIB)).unwrap();
        let vg = store.vg_create("tvg", &[pv], 4 * MIB).unwrap();
        vg.create_pool("pool", 128 * MIB, 0, 0).unwrap();
        vg.create_thin("pool", "vm1", VOLUME_SIZE).unwrap();
        let mut expected = vec![0u8; VOLUME_SIZE as usize];
        {
            let dev = vg.open_lv("vm1", false).unwrap();
            let a = pattern(2 * MIB as usize, 1);
            write(dev.as_ref(), MIB, &a);
            expected[MIB as usize..3 * MIB as usize].copy_from_slice(&a);
            vg.bitmaps("vm1").unwrap().add("b1", 64 << 10).unwrap();
            let b = pattern(128 << 10, 2);
            write(dev.as_ref(), 10 * MIB, &b);
            expected[10 * MIB as usize..10 * MIB as usize + b.len()].copy_from_slice(&b);
        }
        vg.snapshot("vm1", "snap1").unwrap();
        let ds = Datastore::create(&data.join("datastore")).unwrap();
        let backup = {
            let dev = vg.open_lv("snap1", true).unwrap();
            let opts = BackupOptions {
                id: "volume/tvg/vm1".into(),
                source_label: "lv:tvg/snap1".into(),
                source_format: "volume".into(),
                changes: Changes::Untracked,
                pipeline: Default::default(),
            };
            strata_backup::create(&ds, dev, &opts, &NoProgress)
                .unwrap()
                .snapshot
        };
        Fixture {
            dir,
            data,
            vg,
            expected,
            backup,
            store: ds,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Writes `data` into a new raw file.
pub fn raw_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}

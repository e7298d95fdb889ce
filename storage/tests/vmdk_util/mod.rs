//! Helpers shared by the vmdk, convert and OVA tests: qemu-img as the oracle, whole-device reads.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use strata_storage::io::blocking::BlockingQueue;
use strata_storage::BlockDevice;

/// Runs a command and returns its stdout; panics with its stderr on failure.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and returns whether it succeeded, with its combined output.
pub fn try_run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

pub fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Reads `len` bytes at `offset` of a device in 4 MiB requests.
pub fn read_range(dev: &dyn BlockDevice, offset: u64, len: u64) -> Vec<u8> {
    let mut q = BlockingQueue::open(dev, 8).expect("queue");
    let mut out = Vec::with_capacity(len as usize);
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(4 << 20) as usize;
        out.extend(
            q.read_at(at, n)
                .unwrap_or_else(|e| panic!("read at {at}: {e}")),
        );
        at += n as u64;
    }
    out
}

/// Reads a file range (zeros past its end).
pub fn file_range(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).expect("open");
    let mut v = vec![0u8; len as usize];
    let mut done = 0;
    while done < v.len() {
        let n = f
            .read_at(&mut v[done..], offset + done as u64)
            .expect("read");
        if n == 0 {
            break;
        }
        done += n;
    }
    v
}

/// qemu-io writes of patterns at pseudo-random sector-aligned places: `(offset, len, pattern)`.
pub fn random_writes(seed: u64, size: u64, count: usize, max_len: u64) -> Vec<(u64, u64, u8)> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..count)
        .map(|_| {
            let len = rng.u64(1..=max_len / 512) * 512;
            let off = rng.u64(0..(size - len) / 512) * 512;
            (off, len, rng.u8(1..=255))
        })
        .collect()
}

/// Applies writes with qemu-io.
pub fn qemu_io_writes(path: &Path, fmt: &str, writes: &[(u64, u64, u8)]) {
    let mut args = vec!["-f".to_string(), fmt.to_string()];
    for (o, l, pat) in writes {
        args.push("-c".into());
        args.push(format!("write -P {pat} {o} {l}"));
    }
    args.push(p(path).to_string());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run("qemu-io", &refs);
}

/// First differing byte, for messages.
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then_some(a.len().min(b.len())))
}

/// A fresh monolithicSparse image laid out on a fault-injecting device.
pub fn sparse_on_fault_device(
    size: u64,
    zeroed: bool,
) -> (
    std::sync::Arc<strata_storage::io::fault::FaultDevice>,
    strata_storage::io::fault::FaultController,
) {
    use strata_storage::format::vmdk::create::{
        init_sparse_extent, new_descriptor, SparseLayout, VmdkCreateOptions,
    };
    use strata_storage::format::vmdk::descriptor::{Access, ExtentLine, ExtentType};
    let (dev, ctl) = strata_storage::io::fault::FaultDevice::new(0);
    let line = ExtentLine {
        access: Access::ReadWrite,
        sectors: size / 512,
        kind: ExtentType::Sparse,
        file: "x.vmdk".into(),
        offset: 0,
    };
    let text = new_descriptor(&VmdkCreateOptions::default(), size, vec![line]).render();
    init_sparse_extent(
        dev.as_ref(),
        &SparseLayout::new(size, zeroed, false, Some(&text)),
        Some(&text),
    )
    .unwrap();
    (dev, ctl)
}

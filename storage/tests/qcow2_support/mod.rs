//! Helpers shared by the qcow2 integration tests: running qemu-img and qemu-io, reading and
//! writing whole images through queues, and random workloads against a model.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use strata_storage::format::{open_image, Image, OpenOptions};
use strata_storage::io::{Completion, IoBuf, IoQueue, QueueOptions, Request};
use strata_storage::BlockDevice;

/// Runs a command, panicking with its output on failure; returns stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd} {args:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and returns (exit code, stdout+stderr).
pub fn run_status(cmd: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), s)
}

/// `qemu-img check` exits 0.
pub fn assert_qemu_check_clean(path: &Path) {
    let (code, out) = run_status("qemu-img", &["check", path.to_str().unwrap()]);
    assert_eq!(
        code,
        0,
        "qemu-img check of {} is not clean:\n{out}",
        path.display()
    );
}

/// What `qemu-img convert -O raw` produces for `path`.
pub fn qemu_raw(path: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!(
        "{}.raw-{}",
        path.file_name().unwrap().to_string_lossy(),
        fastrand::u32(..)
    ));
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            path.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

/// Writes `model` to a raw file and runs `qemu-img compare` against `path`.
pub fn assert_qemu_compare(path: &Path, model: &[u8], dir: &Path) {
    let raw = dir.join(format!("model-{}.raw", fastrand::u32(..)));
    std::fs::write(&raw, model).unwrap();
    let (code, out) = run_status(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            raw.to_str().unwrap(),
            path.to_str().unwrap(),
        ],
    );
    std::fs::remove_file(&raw).unwrap();
    assert_eq!(
        code,
        0,
        "qemu-img compare differs for {}:\n{out}",
        path.display()
    );
}

/// Opens an image read-only or read-write.
pub fn open(path: &Path, writable: bool) -> Arc<dyn Image> {
    open_image(
        path,
        &OpenOptions {
            read_only: !writable,
            ..OpenOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
}

/// Reads the whole device with several requests of mixed sizes in flight.
pub fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let size = dev.size() as usize;
    let mut out = vec![0u8; size];
    let mut q = dev.open_queue(&QueueOptions::with_depth(16)).unwrap();
    let mut at = 0usize;
    let mut rng = fastrand::Rng::with_seed(size as u64);
    let mut in_flight = 0;
    let mut done: Vec<Completion> = Vec::new();
    let mut offsets = std::collections::HashMap::new();
    let mut tag = 0u64;
    while at < size || in_flight > 0 {
        while at < size && in_flight < 16 {
            let len = [512usize, 4096, 65536, 100_000, 1 << 20][rng.usize(..5)].min(size - at);
            q.submit(Request::read(tag, at as u64, IoBuf::new(len)))
                .unwrap();
            offsets.insert(tag, at);
            tag += 1;
            at += len;
            in_flight += 1;
        }
        q.wait(Some(Duration::from_secs(30))).unwrap();
        q.reap(&mut done);
        for c in done.drain(..) {
            c.result
                .as_ref()
                .unwrap_or_else(|e| panic!("read failed: {e}"));
            let b = c.buf.unwrap();
            let o = offsets[&c.tag];
            b.copy_to_slice(0, &mut out[o..o + b.len()]);
            in_flight -= 1;
        }
    }
    out
}

/// First differing byte, for messages.
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Asserts equality without printing megabytes.
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if let Some(at) = first_diff(got, want) {
        panic!(
            "{what}: contents differ at byte {at} (lengths {} and {}): got {:?}, want {:?}",
            got.len(),
            want.len(),
            got.get(at..(at + 8).min(got.len())),
            want.get(at..(at + 8).min(want.len()))
        );
    }
}

/// One operation of a random workload.
#[derive(Clone, Copy, Debug)]
pub enum Action {
    Write { offset: u64, len: u64, seed: u8 },
    Discard { offset: u64, len: u64 },
    Zero { offset: u64, len: u64, unmap: bool },
    Flush,
}

/// Deterministic data for a write.
pub fn pattern(offset: u64, len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((offset + i as u64).wrapping_mul(131) >> 3) as u8 ^ seed)
        .collect()
}

/// A random workload of sector-aligned operations on a device of `size` bytes.
pub fn workload(size: u64, n: usize, seed: u64) -> Vec<Action> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n)
        .map(|_| {
            let offset = rng.u64(..size / 512) * 512;
            let len = (rng.u64(1..=512) * 512).min(size - offset);
            match rng.u8(..10) {
                0..=5 => Action::Write {
                    offset,
                    len,
                    seed: rng.u8(..),
                },
                6 => Action::Discard { offset, len },
                7 | 8 => Action::Zero {
                    offset,
                    len,
                    unmap: rng.bool(),
                },
                _ => Action::Flush,
            }
        })
        .collect()
}

/// Runs `actions` on `dev` in batches of independent requests, updating `model`.
pub fn apply(dev: &dyn BlockDevice, actions: &[Action], model: &mut [u8]) {
    let mut q: Box<dyn IoQueue> = dev.open_queue(&QueueOptions::with_depth(32)).unwrap();
    let mut batch: Vec<Action> = Vec::new();
    let overlaps = |a: &Action, b: &Action| match (range(a), range(b)) {
        (Some((o1, l1)), Some((o2, l2))) => o1 < o2 + l2 && o2 < o1 + l1,
        _ => true,
    };
    for a in actions {
        if batch.iter().any(|b| overlaps(a, b)) || batch.len() == 16 {
            run_batch(q.as_mut(), &batch, model);
            batch.clear();
        }
        batch.push(*a);
    }
    run_batch(q.as_mut(), &batch, model);
}

fn range(a: &Action) -> Option<(u64, u64)> {
    match *a {
        Action::Write { offset, len, .. }
        | Action::Discard { offset, len }
        | Action::Zero { offset, len, .. } => Some((offset, len)),
        Action::Flush => None,
    }
}

fn run_batch(q: &mut dyn IoQueue, batch: &[Action], model: &mut [u8]) {
    for (i, a) in batch.iter().enumerate() {
        let req = match *a {
            Action::Write { offset, len, seed } => Request::write(
                i as u64,
                offset,
                IoBuf::from_slice(&pattern(offset, len as usize, seed)),
            ),
            Action::Discard { offset, len } => Request::discard(i as u64, offset, len),
            Action::Zero { offset, len, unmap } => {
                Request::write_zeroes(i as u64, offset, len, unmap)
            }
            Action::Flush => Request::flush(i as u64),
        };
        q.submit(req).unwrap();
    }
    let mut done = Vec::new();
    while done.len() < batch.len() {
        q.wait(Some(Duration::from_secs(30))).unwrap();
        q.reap(&mut done);
    }
    for c in done {
        let a = batch[c.tag as usize];
        c.result
            .as_ref()
            .unwrap_or_else(|e| panic!("{a:?} failed: {e}"));
        match a {
            Action::Write { offset, len, seed } => {
                model[offset as usize..(offset + len) as usize].copy_from_slice(&pattern(
                    offset,
                    len as usize,
                    seed,
                ));
            }
            Action::Discard { offset, len } | Action::Zero { offset, len, .. } => {
                model[offset as usize..(offset + len) as usize].fill(0);
            }
            Action::Flush => {}
        }
    }
}

/// A fresh temporary folder.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// Path helper.
pub fn p(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Fills an image made by qemu-img with a mix of data, zero writes and discards via qemu-io.
pub fn qemu_io_fill(path: &Path, size: u64, seed: u64, fmt: &str) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut args: Vec<String> = vec!["-f".into(), fmt.into()];
    for _ in 0..24 {
        let off = rng.u64(..size / 512) * 512;
        let len = (rng.u64(1..=256) * 512).min(size - off);
        let cmd = match rng.u8(..6) {
            0 => format!("write -z {off} {len}"),
            1 => format!("discard {off} {len}"),
            _ => format!("write -P {} {off} {len}", rng.u8(1..)),
        };
        args.push("-c".into());
        args.push(cmd);
    }
    args.push(path.to_str().unwrap().into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run("qemu-io", &refs);
}

/// Strata writes a random workload (seeded by `seed`) to the image at `path`; the result reads
/// back the same in Strata before and after reopening and in qemu-img (`compare`), and
/// `qemu-img check` is clean. Returns the image's contents.
pub fn write_and_verify(path: &Path, dir: &Path, seed: u64, what: &str) -> Vec<u8> {
    let mut model = qemu_raw(path, dir);
    {
        let img = open(path, true);
        let size = img.size();
        apply(img.as_ref(), &workload(size, 300, seed), &mut model);
        img.flush().unwrap();
        assert_same(
            &read_all(img.as_ref()),
            &model,
            &format!("{what}: read back before close"),
        );
    }
    assert_qemu_check_clean(path);
    assert_qemu_compare(path, &model, dir);
    assert_same(
        &read_all(open(path, false).as_ref()),
        &model,
        &format!("{what}: after reopening"),
    );
    model
}

/// The qcow2 image at `path`, opened by the driver itself (writable or not).
pub fn open_q(path: &Path, writable: bool) -> Arc<strata_storage::format::qcow2::Qcow2Image> {
    let file = strata_storage::format::open_host_file(
        path,
        &OpenOptions {
            read_only: !writable,
            ..OpenOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    strata_storage::format::qcow2::open(
        file,
        &strata_storage::format::qcow2::Qcow2Options::default(),
    )
    .unwrap_or_else(|e| panic!("opening {} as qcow2: {e}", path.display()))
}

/// A fault-injecting device holding `bytes`, all of them durable.
pub fn device_with(
    bytes: &[u8],
) -> (
    Arc<strata_storage::io::fault::FaultDevice>,
    strata_storage::io::fault::FaultController,
) {
    use strata_storage::HostFile;
    let (dev, ctl) = strata_storage::io::fault::FaultDevice::new(bytes.len() as u64);
    dev.write_all_at(0, bytes).unwrap();
    dev.sync_data().unwrap();
    (dev, ctl)
}

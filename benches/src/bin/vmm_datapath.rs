//! The virtio-blk data path driven from the host side, against fio on the same file.
//!
//! A driver thread plays the guest: it fills a split virtqueue in (host-allocated) guest memory
//! with 4 KiB random reads, keeps `depth` of them in flight, kicks the device's ioeventfd-style
//! eventfd when EVENT_IDX asks for it and waits on the interrupt eventfd. The device side is the
//! real thing: Strata's virtio-blk worker thread (`blk::worker::Worker`), its `QueueEngine`, its
//! eventfds, and the storage engine (io_uring, O_DIRECT) on a raw image — only KVM is left out.
//! The peer is `fio --ioengine=io_uring --direct=1` on the same file, alternating run by run.
//!
//! Usage: vmm_datapath [--file PATH] [--seconds S] [--rounds N] [--size BYTES] [--stats]
//!        (a PATH that does not exist is made, --size bytes of random data; one that exists must
//!        be --size bytes long, and is never overwritten)
//!        [--only-strata-depth D]   (one run of our device alone, for profiling)
//!        [--only-qcow2]   (with --only-strata-depth: on the qcow2 copy instead of the raw file)
//!        [--rows raw1,raw32,qcow2-1,qcow2-32]   (the table's rows to run; default all four)
//!        [--poll-us N]   (the device's polling window before it sleeps; default 256, 0: off)
//!        [--seccomp]   (the worker runs under the VMM's device-worker seccomp filter, as in a
//!                       sandboxed VMM process; benches/vmm_process.sh compares with and without)
//! Prints each run, the medians and the ratio.

use std::num::Wrapping;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use strata_storage::format::{open_image, OpenOptions};
use strata_vmm::blk::chain::SharedMemory;
use strata_vmm::blk::config::DEFAULT_POLL;
use strata_vmm::blk::engine::Signal;
use strata_vmm::blk::worker::Worker;
use strata_vmm::blk::{BlkConfig, DiskOptions, QueueEngine};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const QSIZE: u16 = 256;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1_0000;
const USED: u64 = 0x2_0000;
const HDRS: u64 = 0x3_0000;
const STATUS: u64 = 0x4_0000;
const DATA: u64 = 0x10_0000;
const BS: u64 = 4096;
/// The table's rows, as `--rows` names them.
const ROWS: [&str; 4] = ["raw1", "raw32", "qcow2-1", "qcow2-32"];

/// The interrupt: an eventfd the driver thread blocks on.
struct Irq(EventFd);

impl Signal for Irq {
    fn signal_used(&self) {
        let _ = self.0.write(1);
    }
}

fn vring_need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// The guest side: queue `slot`'s read of the 4 KiB block `block`.
fn write_request(mem: &GuestMemoryMmap, slot: u16, block: u64) -> Result<()> {
    let d = u64::from(slot) * 3;
    let hdr = HDRS + 16 * u64::from(slot);
    let mut h = [0u8; 16];
    h[8..16].copy_from_slice(&(block * BS / 512).to_le_bytes());
    mem.write_slice(&h, GuestAddress(hdr))?;
    let descs: [(u64, u32, u16, u16); 3] = [
        (hdr, 16, 1, (d + 1) as u16),
        (
            DATA + u64::from(slot) * BS,
            BS as u32,
            1 | 2,
            (d + 2) as u16,
        ),
        (STATUS + u64::from(slot), 1, 2, 0),
    ];
    for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(DESC + 16 * (d + i as u64)))?;
    }
    Ok(())
}

/// Runs the driver for `secs` at `depth`; returns completed requests per second.
fn strata_run(image: &Path, depth: u16, secs: u64) -> Result<f64> {
    let disk = open_image(image, &OpenOptions::default())?;
    let blocks = disk.size() / BS;
    let opts = DiskOptions {
        queue_size: QSIZE,
        poll_max: poll_max()?,
        ..DiskOptions::default()
    };
    let cfg = Arc::new(BlkConfig::new(disk, &opts).map_err(anyhow::Error::msg)?);
    let mem: SharedMemory = Arc::new(GuestMemoryMmap::from_ranges(&[(
        GuestAddress(0),
        64 << 20,
    )])?);
    let mut queue = Queue::new(QSIZE)?;
    queue.set_size(QSIZE);
    queue.set_desc_table_address(Some(DESC as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_event_idx(true);
    queue.set_ready(true);
    let kick = EventFd::new(0)?;
    let irq = Arc::new(Irq(EventFd::new(0)?));
    let engine = QueueEngine::new("bench", cfg)?;
    let worker = Worker::spawn(
        "bench-q0".into(),
        engine,
        queue,
        mem.clone(),
        kick.try_clone()?,
        irq.clone(),
    )?;
    let used_event = GuestAddress(AVAIL + 4 + 2 * u64::from(QSIZE));
    let avail_event = GuestAddress(USED + 4 + 8 * u64::from(QSIZE));
    let mut avail_idx = Wrapping(0u16);
    let mut used_seen = Wrapping(0u16);
    let kicks = std::cell::Cell::new(0u64);
    let mut sleeps = 0u64;
    let publish = |mem: &GuestMemoryMmap, slot: u16, avail_idx: &mut Wrapping<u16>| -> Result<()> {
        let at = GuestAddress(AVAIL + 4 + 2 * u64::from(avail_idx.0 % QSIZE));
        mem.write_obj(slot * 3, at)?;
        *avail_idx += 1;
        Ok(())
    };
    let flush_avail = |mem: &GuestMemoryMmap, old: u16, new: u16| -> Result<()> {
        fence(Ordering::SeqCst);
        mem.store(new, GuestAddress(AVAIL + 2), Ordering::Release)?;
        fence(Ordering::SeqCst);
        let event: u16 = mem.load(avail_event, Ordering::Acquire)?;
        if vring_need_event(event, new, old) {
            kicks.set(kicks.get() + 1);
            kick.write(1)?;
        }
        Ok(())
    };
    for slot in 0..depth {
        write_request(&mem, slot, fastrand::u64(0..blocks))?;
        publish(&mem, slot, &mut avail_idx)?;
    }
    flush_avail(&mem, 0, avail_idx.0)?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut done = 0u64;
    while Instant::now() < deadline {
        // Ask for an interrupt on the next completion, then re-check before sleeping.
        mem.store(used_seen.0, used_event, Ordering::Release)?;
        fence(Ordering::SeqCst);
        let mut used_idx: u16 = mem.load(GuestAddress(USED + 2), Ordering::Acquire)?;
        if used_idx == used_seen.0 {
            sleeps += 1;
            irq.0.read()?;
            used_idx = mem.load(GuestAddress(USED + 2), Ordering::Acquire)?;
        }
        let old = avail_idx.0;
        while used_seen.0 != used_idx {
            let at = USED + 4 + 8 * u64::from(used_seen.0 % QSIZE);
            let id: u32 = mem.read_obj(GuestAddress(at))?;
            let slot = (id / 3) as u16;
            let st: u8 = mem.read_obj(GuestAddress(STATUS + u64::from(slot)))?;
            if st != 0 {
                bail!("request failed with status {st}");
            }
            done += 1;
            used_seen += 1;
            write_request(&mem, slot, fastrand::u64(0..blocks))?;
            publish(&mem, slot, &mut avail_idx)?;
        }
        flush_avail(&mem, old, avail_idx.0)?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let stats = worker.stop();
    if show_stats() {
        eprintln!(
            "requests {} interrupts {} kicks {} sleeps {sleeps}",
            stats.requests,
            stats.interrupts,
            kicks.get()
        );
    }
    Ok(done as f64 / elapsed)
}

/// `--stats`: print the device's counters after each run.
fn show_stats() -> bool {
    std::env::args().any(|a| a == "--stats")
}

/// `--poll-us N`: the device's polling window before it sleeps (`DiskOptions::poll_max`);
/// without it, the default.
fn poll_max() -> Result<Duration> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == "--poll-us") {
        Some(i) => {
            let us = args
                .get(i + 1)
                .context("--poll-us needs a value")?
                .parse()?;
            Ok(Duration::from_micros(us))
        }
        None => Ok(DEFAULT_POLL),
    }
}

fn fio_run(image: &Path, depth: u16, secs: u64) -> Result<f64> {
    let out = Command::new("fio")
        .args([
            "--name=peer",
            "--direct=1",
            "--ioengine=io_uring",
            "--rw=randread",
            "--bs=4k",
        ])
        .arg(format!("--filename={}", image.display()))
        .arg(format!("--iodepth={depth}"))
        .arg(format!("--runtime={secs}"))
        .args(["--time_based", "--output-format=json"])
        .output()
        .context("running fio (apt-get install fio)")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["jobs"][0]["read"]["iops"]
        .as_f64()
        .context("fio's JSON has no read IOPS")
}

/// One table row: `rounds` paired runs of our device on `ours` and fio on `peer` (which side goes
/// first alternates by round, so that neither always runs on a disk the other just warmed or
/// tired); medians, and the median of the rounds' ratios.
fn row(label: &str, ours: &Path, peer: &Path, depth: u16, secs: u64, rounds: usize) -> Result<()> {
    let (mut mine, mut theirs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        let (s, f) = if r % 2 == 0 {
            let s = strata_run(ours, depth, secs)?;
            (s, fio_run(peer, depth, secs)?)
        } else {
            let f = fio_run(peer, depth, secs)?;
            (strata_run(ours, depth, secs)?, f)
        };
        eprintln!("{label} round {r}: strata {s:.0}, fio {f:.0}");
        mine.push(s);
        theirs.push(f);
        ratios.push(s / f);
    }
    let (s, f) = (median(mine), median(theirs));
    println!(
        "| {label} | {s:.0} | {f:.0} | {:.4}x | {:.4}x |",
        s / f,
        median(ratios)
    );
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut file: Option<PathBuf> = None;
    let (mut secs, mut rounds, mut size) = (5u64, 3usize, 1u64 << 30);
    let mut only: Option<u16> = None;
    let mut only_qcow2 = false;
    let mut rows: Vec<String> = ROWS.map(String::from).to_vec();
    while let Some(a) = args.next() {
        let mut val = || args.next().context("missing value");
        match a.as_str() {
            "--file" => file = Some(PathBuf::from(val()?)),
            "--seconds" => secs = val()?.parse()?,
            "--rounds" => rounds = val()?.parse()?,
            "--size" => size = val()?.parse()?,
            "--stats" => {}
            "--poll-us" => drop(val()?),
            "--seccomp" => strata_vmm::sandbox::enable_seccomp(None)?,
            // Profiling aid: only our device at one depth, no peer, no table.
            "--only-strata-depth" => only = Some(val()?.parse()?),
            "--only-qcow2" => only_qcow2 = true,
            "--rows" => rows = val()?.split(',').map(String::from).collect(),
            other => bail!("unknown argument {other}"),
        }
    }
    let default_file = file.is_none();
    let file = file.unwrap_or_else(|| PathBuf::from("benches/work/vmm-datapath.raw"));
    if file.exists() && !default_file && std::fs::metadata(&file)?.len() != size {
        // A file the caller named is never overwritten: it may be an image they want to keep.
        bail!(
            "{} is {} bytes, not --size {size}: give its size with --size, or name a file that \
             does not exist yet (it is filled with random data)",
            file.display(),
            std::fs::metadata(&file)?.len()
        );
    }
    if !file.exists() || std::fs::metadata(&file)?.len() != size {
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        eprintln!(
            "filling {} with {} MiB of random data",
            file.display(),
            size >> 20
        );
        let status = Command::new("fio")
            .args([
                "--name=fill",
                "--rw=write",
                "--bs=1M",
                "--direct=1",
                "--ioengine=io_uring",
            ])
            .arg(format!("--filename={}", file.display()))
            .arg(format!("--size={size}"))
            .args(["--refill_buffers", "--output=/dev/null"])
            .status()?;
        if !status.success() {
            bail!("filling the file with fio failed");
        }
    }
    if let Some(depth) = only {
        let (image, what) = if only_qcow2 {
            (qcow2_copy(&file)?, "qcow2")
        } else {
            (file.clone(), "raw")
        };
        let s = strata_run(&image, depth, secs);
        if only_qcow2 {
            let _ = std::fs::remove_file(&image);
        }
        println!("strata {what} QD{depth}: {:.0} IOPS (no peer run)", s?);
        return Ok(());
    }
    println!(
        "4k random read, {secs} s runs, {rounds} rounds alternating, file {}",
        file.display()
    );
    println!("| row | strata device IOPS | fio IOPS | ratio of medians | median of round ratios |");
    println!("|---|---|---|---|---|");
    if let Some(bad) = rows.iter().find(|r| !ROWS.contains(&r.as_str())) {
        bail!("unknown row {bad} (rows: {})", ROWS.join(", "));
    }
    for depth in [1u16, 32] {
        if !rows.contains(&format!("raw{depth}")) {
            continue;
        }
        row(
            &format!("raw 4k randread QD{depth}"),
            &file,
            &file,
            depth,
            secs,
            rounds,
        )?;
    }
    if !rows.iter().any(|r| r.starts_with("qcow2")) {
        return Ok(());
    }
    match qcow2_copy(&file) {
        Ok(qcow2) => {
            for depth in [1u16, 32] {
                if !rows.contains(&format!("qcow2-{depth}")) {
                    continue;
                }
                let label = format!("qcow2 4k randread QD{depth} (fio on the raw file)");
                row(&label, &qcow2, &file, depth, secs, rounds)?;
            }
            let _ = std::fs::remove_file(&qcow2);
        }
        Err(e) => println!("| qcow2 rows | SKIPPED: {e:#} | | | |"),
    }
    Ok(())
}

/// A qcow2 copy of the raw `file` made by qemu-img, next to it, under a name of the benchmark's
/// own (`FILE.vmm-datapath-copy.qcow2`, removed after its rows), never a name a user's image
/// may have.
fn qcow2_copy(file: &Path) -> Result<PathBuf> {
    let mut name = file
        .file_name()
        .context("--file names no file")?
        .to_os_string();
    name.push(".vmm-datapath-copy.qcow2");
    let qcow2 = file.with_file_name(name);
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(file)
        .arg(&qcow2)
        .status()
        .context("running qemu-img convert")?;
    if !st.success() {
        bail!("qemu-img could not make the qcow2 copy");
    }
    // qemu-img leaves the copy's gigabyte in the page cache, dirty: written back while the first
    // rounds run (and flushed by their first direct reads), it would slow whichever row comes
    // first. Sync it and give the disk a moment before measuring.
    std::fs::File::open(&qcow2)
        .and_then(|f| f.sync_all())
        .context("syncing the qcow2 copy")?;
    std::thread::sleep(Duration::from_secs(2));
    open_image(&qcow2, &OpenOptions::default())?;
    Ok(qcow2)
}

//! Several queues on one qcow2 image while one of them flushes: does a flush stall the others?
//!
//! Four queues (one thread each) write 4 KiB at random into clusters that are not allocated yet
//! (every write allocates), at depth 8 each, on a fresh image (64 KiB clusters, io_uring,
//! O_DIRECT). In the "flushing" runs queue 0 also issues a flush every 10 ms (each flush writes
//! the metadata the allocations dirtied back and syncs). The figure is the other three queues'
//! writes per second, with flushes and without, and its ratio.
//!
//! The peer is the same workload built against another version of the block layer (for
//! example main's), given with `--peer BINARY`: it is this program compiled in another checkout,
//! run alternately with ours, round by round, in the same session.
//!
//! Usage: qcow2_queues [--file PATH] [--seconds S] [--rounds N] [--size BYTES] [--peer BINARY]
//!        qcow2_queues --run flush|steady --file PATH --seconds S --size BYTES   (one run, JSON)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use strata_storage::format::{create_image, open_image, ImageFormat, OpenOptions};
use strata_storage::io::{Completion, IoBuf, QueueOptions, Request};
use strata_storage::BlockDevice;

const QUEUES: u64 = 4;
const DEPTH: usize = 8;
const CLUSTER: u64 = 64 << 10;
const BS: usize = 4096;
const FLUSH_EVERY: Duration = Duration::from_millis(10);
/// Tag of the flushing queue's flush (write tags are below the depth).
const FLUSH_TAG: u64 = 1 << 32;

/// One queue's loop: writes into its own unallocated clusters until `stop`; queue 0 of a
/// flushing run also flushes every 10 ms. Returns (writes completed, flushes completed).
fn queue_loop(
    dev: &dyn BlockDevice,
    q_index: u64,
    flushing: bool,
    start: &Barrier,
    stop: &AtomicBool,
) -> Result<(u64, u64)> {
    let clusters = dev.size() / CLUSTER;
    let mut q = dev.open_queue(&QueueOptions::with_depth(DEPTH + 1))?;
    // This queue's clusters: every QUEUES-th one, visited in a random order without repeats.
    let mine: Vec<u64> = (q_index..clusters).step_by(QUEUES as usize).collect();
    let mut order = mine;
    fastrand::shuffle(&mut order);
    let mut next = order.into_iter();
    let data = IoBuf::from_slice(&[0x5a; BS]);
    let mut bufs: Vec<IoBuf> = (0..DEPTH)
        .map(|_| IoBuf::from_slice(data.as_slice().unwrap_or(&[])))
        .collect();
    let mut writes = 0u64;
    let mut flushes = 0u64;
    let mut flush_in_flight = false;
    let mut last_flush = Instant::now();
    let mut done: Vec<Completion> = Vec::new();
    start.wait();
    let mut submit = |q: &mut Box<dyn strata_storage::io::IoQueue>, tag: u64, buf: IoBuf| {
        let cluster = next.next().context("ran out of unallocated clusters")?;
        let at = cluster * CLUSTER + fastrand::u64(0..CLUSTER / BS as u64) * BS as u64;
        q.submit(Request::write(tag, at, buf))
            .map_err(|_| anyhow::anyhow!("queue full below its depth"))
    };
    for tag in 0..DEPTH as u64 {
        let buf = bufs.pop().context("buffer")?;
        submit(&mut q, tag, buf)?;
    }
    while !stop.load(Ordering::Relaxed) {
        if flushing && !flush_in_flight && last_flush.elapsed() >= FLUSH_EVERY {
            q.submit(Request::flush(FLUSH_TAG))
                .map_err(|_| anyhow::anyhow!("queue full below its depth"))?;
            flush_in_flight = true;
            last_flush = Instant::now();
        }
        q.wait(Some(Duration::from_millis(2)))?;
        q.reap(&mut done);
        for c in done.drain(..) {
            if let Err(e) = c.result {
                bail!("queue {q_index}: request failed: {e}");
            }
            if c.tag == FLUSH_TAG {
                flushes += 1;
                flush_in_flight = false;
                continue;
            }
            writes += 1;
            let buf = c.buf.context("a write came back without its buffer")?;
            submit(&mut q, c.tag, buf)?;
        }
    }
    // Let what is in flight finish before the queue is dropped.
    while q.in_flight() > 0 {
        q.wait(Some(Duration::from_secs(5)))?;
        q.reap(&mut done);
        done.clear();
    }
    Ok((writes, flushes))
}

/// One run on a fresh image; prints one JSON line.
fn run_once(file: &Path, size: u64, secs: u64, flushing: bool) -> Result<()> {
    let _ = std::fs::remove_file(file);
    let mut opts = BTreeMap::new();
    opts.insert("cluster_size".to_string(), CLUSTER.to_string());
    create_image(file, ImageFormat::Qcow2, size, &opts)?;
    let dev = open_image(
        file,
        &OpenOptions {
            format: Some(ImageFormat::Qcow2),
            ..OpenOptions::default()
        },
    )?;
    let start = Arc::new(Barrier::new(QUEUES as usize + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let others = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for i in 0..QUEUES {
        let (dev, start, stop) = (dev.clone(), start.clone(), stop.clone());
        handles.push(std::thread::spawn(move || {
            queue_loop(dev.as_ref(), i, flushing && i == 0, &start, &stop)
        }));
    }
    start.wait();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    let mut first = (0, 0);
    for (i, h) in handles.into_iter().enumerate() {
        let r = h
            .join()
            .map_err(|_| anyhow::anyhow!("queue thread panicked"))??;
        if i == 0 {
            first = r;
        } else {
            others.fetch_add(r.0, Ordering::Relaxed);
        }
    }
    drop(dev);
    let _ = std::fs::remove_file(file);
    println!(
        "{}",
        serde_json::json!({
            "others_writes_per_s": others.load(Ordering::Relaxed) as f64 / elapsed,
            "flusher_writes_per_s": first.0 as f64 / elapsed,
            "flushes_per_s": first.1 as f64 / elapsed,
        })
    );
    Ok(())
}

/// Lets the file system finish with the previous run's image (writes out what it deferred, then
/// a pause) so that no run pays for the one before it.
fn settle(file: &Path) -> Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    let status = Command::new("sync")
        .arg("-f")
        .arg(dir)
        .status()
        .context("running sync -f")?;
    if !status.success() {
        bail!("sync -f {} failed", dir.display());
    }
    std::thread::sleep(Duration::from_secs(2));
    Ok(())
}

/// Runs `bin --run MODE` and returns its JSON.
fn child(
    bin: &Path,
    file: &Path,
    size: u64,
    secs: u64,
    flushing: bool,
) -> Result<serde_json::Value> {
    let out = Command::new(bin)
        .args(["--run", if flushing { "flush" } else { "steady" }])
        .arg("--file")
        .arg(file)
        .args(["--size", &size.to_string(), "--seconds", &secs.to_string()])
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim()).context("parsing a run's JSON")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut file = PathBuf::from("benches/work/qcow2-queues.qcow2");
    let (mut secs, mut rounds, mut size) = (4u64, 3usize, 256u64 << 30);
    let mut run: Option<String> = None;
    let mut peer: Option<PathBuf> = None;
    while let Some(a) = args.next() {
        let mut val = || args.next().context("missing value");
        match a.as_str() {
            "--file" => file = PathBuf::from(val()?),
            "--seconds" => secs = val()?.parse()?,
            "--rounds" => rounds = val()?.parse()?,
            "--size" => size = val()?.parse()?,
            "--run" => run = Some(val()?),
            "--peer" => peer = Some(PathBuf::from(val()?)),
            other => bail!("unknown argument {other}"),
        }
    }
    if let Some(mode) = run {
        return run_once(&file, size, secs, mode == "flush");
    }
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let me = std::env::current_exe()?;
    let mut sides: Vec<(&str, PathBuf)> = vec![("strata", me)];
    if let Some(p) = peer {
        sides.push(("peer", p));
    }
    // results[side][flushing] = per-round figures of the other queues.
    let mut results = vec![[Vec::new(), Vec::new()]; sides.len()];
    let mut flushes = vec![Vec::new(); sides.len()];
    for r in 0..rounds {
        // Odd rounds run the peer first: the first run of a round follows the last round's
        // flushing run, whose freed image the file system may still be cleaning up.
        let mut order: Vec<usize> = (0..sides.len()).collect();
        if r % 2 == 1 {
            order.reverse();
        }
        for flushing in [false, true] {
            for &i in &order {
                let (name, bin) = &sides[i];
                settle(&file)?;
                let v = child(bin, &file, size, secs, flushing)?;
                let w = v["others_writes_per_s"].as_f64().unwrap_or(0.0);
                eprintln!(
                    "round {r} {name} {}: other queues {w:.0} writes/s, flusher {:.0} writes/s, {:.0} flushes/s",
                    if flushing { "flushing" } else { "steady" },
                    v["flusher_writes_per_s"].as_f64().unwrap_or(0.0),
                    v["flushes_per_s"].as_f64().unwrap_or(0.0),
                );
                results[i][usize::from(flushing)].push(w);
                if flushing {
                    flushes[i].push(v["flushes_per_s"].as_f64().unwrap_or(0.0));
                }
            }
        }
    }
    println!(
        "4 queues x QD8, 4 KiB random writes into unallocated 64 KiB clusters, {secs} s runs, \
         {rounds} rounds alternating (the peer first in odd rounds), the file system synced and left 2 s between runs; medians"
    );
    println!("| version | other 3 queues, writes/s | same, queue 0 flushing every 10 ms | flushes/s | ratio |");
    println!("|---|---|---|---|---|");
    for (i, (name, bin)) in sides.iter().enumerate() {
        let steady = median(results[i][0].clone());
        let with = median(results[i][1].clone());
        println!(
            "| {name} ({}) | {steady:.0} | {with:.0} | {:.0} | {:.2}x |",
            bin.display(),
            median(flushes[i].clone()),
            if steady > 0.0 { with / steady } else { 0.0 }
        );
    }
    Ok(())
}

//! `strata image bench`: keeps a queue full of reads or writes and reports operations and bytes
//! per second, like `qemu-img bench` (with a random pattern and a time limit added).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use serde::Serialize;
use strata_storage::format::{self, OpenOptions};
use strata_storage::io::{Completion, IoBuf, QueueOptions, Request};
use strata_storage::util::parse_size;

use super::image::{CacheArg, EngineArg, FormatArg};
use super::Output;

/// Offsets a benchmark visits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// One after another (wrapping at the end of the image).
    #[default]
    Seq,
    /// Uniformly random, aligned to the buffer size.
    Rand,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Number of requests (ignored with --time).
    #[arg(short = 'c', long, default_value_t = 75_000)]
    count: u64,
    /// Requests in flight.
    #[arg(short = 'd', long, default_value_t = 64)]
    depth: usize,
    /// Bytes per request, e.g. 4K, 1M.
    #[arg(short = 's', long = "buf-size", default_value = "4K")]
    buf_size: String,
    /// Write instead of read.
    #[arg(short = 'w', long)]
    write: bool,
    /// Access pattern.
    #[arg(long, value_enum, default_value = "seq")]
    pattern: Pattern,
    /// I/O engine.
    #[arg(long, value_enum, default_value = "auto")]
    engine: EngineArg,
    /// Cache mode: none is O_DIRECT.
    #[arg(short = 't', long = "cache", value_enum, default_value = "none")]
    cache: CacheArg,
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format", value_enum)]
    format: Option<FormatArg>,
    /// First offset for the sequential pattern.
    #[arg(short = 'o', long, default_value = "0")]
    offset: String,
    /// Distance between sequential requests (default: the buffer size).
    #[arg(short = 'S', long)]
    step: Option<String>,
    /// Run for this many seconds instead of a fixed count.
    #[arg(long)]
    time: Option<f64>,
    /// Requests queued before they go to the engine together (1: each at once).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// With -w: flush after every N writes (0: never).
    #[arg(long, default_value_t = 0)]
    flush_interval: u64,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// The image file, or a logical volume as lv:VG/NAME.
    file: PathBuf,
}

#[derive(Debug, Serialize)]
struct BenchReport {
    file: String,
    engine: &'static str,
    direct_io: bool,
    operation: &'static str,
    pattern: Pattern,
    depth: usize,
    buf_size: usize,
    ops: u64,
    seconds: f64,
    ops_per_sec: f64,
    mib_per_sec: f64,
}

/// Yields request offsets.
struct Offsets {
    pattern: Pattern,
    next: u64,
    step: u64,
    slots: u64,
    buf: u64,
    end: u64,
    rng: fastrand::Rng,
}

impl Offsets {
    fn next(&mut self) -> u64 {
        match self.pattern {
            Pattern::Rand => self.rng.u64(..self.slots) * self.buf,
            Pattern::Seq => {
                if self.next + self.buf > self.end {
                    self.next = 0;
                }
                let o = self.next;
                self.next += self.step;
                o
            }
        }
    }
}

pub fn run(a: BenchArgs) -> anyhow::Result<ExitCode> {
    let buf_size = usize::try_from(parse_size(&a.buf_size)?).context("Buffer size is too large")?;
    if buf_size == 0 || buf_size > 64 << 20 {
        bail!("Buffer size must be between 1 byte and 64 MiB");
    }
    if a.depth == 0 || a.depth > 4096 {
        bail!("Depth must be between 1 and 4096");
    }
    let opts = OpenOptions {
        format: a.format.map(Into::into),
        read_only: !a.write,
        cache: a.cache.into(),
        engine: a.engine.into(),
        references: Default::default(),
    };
    let spec = a.file.to_string_lossy();
    let (img, engine, direct_io): (std::sync::Arc<dyn strata_storage::BlockDevice>, _, _) = if spec
        .starts_with(strata_storage::source::LV_PREFIX)
    {
        // A logical volume (`lv:VG/NAME`): its PVs use the chosen engine and cache mode.
        super::refuse_volume_under_restore(&spec)?;
        let src = strata_storage::source::open_source(&spec, &opts, &super::data_dir())?;
        let engine = strata_storage::io::engine::Engine::resolve(opts.engine)?.name();
        (
            src.device(),
            engine,
            opts.cache == strata_storage::io::file::CacheMode::None,
        )
    } else {
        let file = format::open_host_file(&a.file, &opts)?;
        let engine = file.engine().name();
        let direct_io = file.handle().is_direct();
        // An image with dirty bitmaps: writes mark them, as the VMM's would.
        let img = format::open_image_on(file, opts.format)?;
        let tracked = strata_storage::bitmap::attach_image_bitmaps(img, &a.file)
            .with_context(|| format!("Could not open the dirty bitmaps of {}", a.file.display()))?;
        (tracked.device().clone(), engine, direct_io)
    };
    let size = img.size();
    if (buf_size as u64) > size {
        bail!("Buffer size {buf_size} is larger than the image ({size} bytes)");
    }
    let start = parse_size(&a.offset)?;
    let step = a
        .step
        .as_deref()
        .map(parse_size)
        .transpose()?
        .unwrap_or(buf_size as u64);
    let mut offsets = Offsets {
        pattern: a.pattern,
        next: start,
        step,
        slots: size / buf_size as u64,
        buf: buf_size as u64,
        end: size,
        rng: fastrand::Rng::with_seed(0x5eed),
    };
    let deadline = a.time.map(Duration::from_secs_f64);
    let count = if deadline.is_some() {
        u64::MAX
    } else {
        a.count
    };

    let mut q = img.open_queue(&QueueOptions::with_depth(a.depth).batch(a.batch))?;
    let mut free: Vec<IoBuf> = (0..a.depth)
        .map(|i| {
            let mut b = IoBuf::new(buf_size);
            if a.write {
                let fill = vec![(i as u8) | 1; buf_size];
                b.copy_from_slice(0, &fill);
            }
            b
        })
        .collect();
    let mut done: Vec<Completion> = Vec::with_capacity(a.depth);
    let (mut issued, mut completed, mut writes_since_flush) = (0u64, 0u64, 0u64);
    const FLUSH_TAG: u64 = u64::MAX;
    let began = Instant::now();
    while completed < issued || issued < count {
        let stop = deadline.is_some_and(|d| began.elapsed() >= d);
        while issued < count && !stop && q.in_flight() < a.depth {
            let Some(buf) = free.pop() else { break };
            let offset = offsets.next();
            let req = if a.write {
                Request::write(issued, offset, buf)
            } else {
                Request::read(issued, offset, buf)
            };
            if let Err(full) = q.submit(req) {
                let mut back = full.0;
                free.extend(back.op.take_buf());
                break;
            }
            issued += 1;
            writes_since_flush += u64::from(a.write);
        }
        if a.flush_interval > 0 && writes_since_flush >= a.flush_interval && q.in_flight() < a.depth
        {
            // A flush covers writes completed before it; wait for those in flight first.
            while q.in_flight() > 0 {
                q.wait(None)?;
                reap(q.as_mut(), &mut done, &mut free, &mut completed)?;
            }
            q.submit(Request::flush(FLUSH_TAG))
                .map_err(|_| anyhow::anyhow!("queue full for flush"))?;
            q.wait(None)?;
            let mut c = Vec::new();
            while c.is_empty() {
                q.reap(&mut c);
                if c.is_empty() {
                    q.wait(None)?;
                }
            }
            c.remove(0).result.context("Flush failed")?;
            writes_since_flush = 0;
        }
        if stop && q.in_flight() == 0 {
            break;
        }
        q.wait(None)?;
        reap(q.as_mut(), &mut done, &mut free, &mut completed)?;
    }
    let seconds = began.elapsed().as_secs_f64();
    let report = BenchReport {
        file: a.file.display().to_string(),
        engine,
        direct_io,
        operation: if a.write { "write" } else { "read" },
        pattern: a.pattern,
        depth: a.depth,
        buf_size,
        ops: completed,
        seconds,
        ops_per_sec: completed as f64 / seconds,
        mib_per_sec: completed as f64 * buf_size as f64 / seconds / (1 << 20) as f64,
    };
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Human => {
            println!(
                "Sent {} {} requests, {} bytes each, {} in parallel ({}, {}{})",
                report.ops,
                report.operation,
                buf_size,
                a.depth,
                if a.pattern == Pattern::Rand {
                    "random"
                } else {
                    "sequential"
                },
                engine,
                if direct_io { ", O_DIRECT" } else { "" }
            );
            println!("Run completed in {:.3} seconds.", seconds);
            println!(
                "ops/s: {:.0}  MiB/s: {:.1}",
                report.ops_per_sec, report.mib_per_sec
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn reap(
    q: &mut dyn strata_storage::io::IoQueue,
    done: &mut Vec<Completion>,
    free: &mut Vec<IoBuf>,
    completed: &mut u64,
) -> anyhow::Result<()> {
    q.reap(done);
    for c in done.drain(..) {
        c.result
            .with_context(|| format!("Request {} failed", c.tag))?;
        if let Some(b) = c.buf {
            free.push(b);
        }
        *completed += 1;
    }
    Ok(())
}

//! `strata image convert`: copies an image or a volume (`lv:VG/NAME`) into a new image of any
//! format or, with `-n`, into an existing image or volume, like `qemu-img convert`. The work is `strata_storage::convert`; this module
//! parses arguments and draws the progress bar.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use strata_storage::convert::{
    auto_source_cache, convert_files, ConvertOptions, ConvertProgress, ConvertRequest, SnapshotSel,
};
use strata_storage::format::{self, OpenOptions};
use strata_storage::io::file::CacheMode;
use strata_storage::util::{format_size, parse_size};

use super::image::{CacheArg, EngineArg, FormatArg};

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Source format (probed when omitted).
    #[arg(short = 'f', value_enum)]
    source_format: Option<FormatArg>,
    /// Target format.
    #[arg(short = 'O', value_enum)]
    target_format: FormatArg,
    /// Target format options, comma-separated key=value pairs (vmdk: subformat=…, adapter_type=…).
    #[arg(short = 'o', default_value = "")]
    options: String,
    /// Write a compressed target: streamOptimized vmdk or compressed qcow2.
    #[arg(short = 'c')]
    compress: bool,
    /// Read an internal snapshot of a qcow2 source instead of its current state, without
    /// applying it: snapshot.name=NAME or snapshot.id=ID (or a bare name).
    #[arg(short = 'l')]
    snapshot: Option<String>,
    /// Show a progress bar.
    #[arg(short = 'p')]
    progress: bool,
    /// Write into an existing target instead of creating it.
    #[arg(short = 'n')]
    existing: bool,
    /// Zero-detection granularity (bytes or with a suffix); 0 writes every byte.
    #[arg(short = 'S', default_value = "4k")]
    sparse_size: String,
    /// Allow out-of-order writes.
    #[arg(short = 'W')]
    out_of_order: bool,
    /// Bytes per read request (with a suffix: 2M).
    #[arg(long, default_value = "2M")]
    chunk: String,
    /// Requests in flight on each side.
    #[arg(short = 'm', default_value_t = 16)]
    in_flight: usize,
    /// Cache mode for the target: writeback goes through the page cache; none is O_DIRECT.
    /// Strata always flushes the target before the command ends (and a new image before it gets
    /// its name), so writeback is as durable as qemu-img's `-t writeback`. `unsafe`, qemu-img's
    /// convert default, which never flushes, is accepted for qemu-img command lines and behaves
    /// as writeback: Strata's default flushes.
    #[arg(short = 't', long = "cache", value_enum, default_value = "writeback")]
    cache: TargetCacheArg,
    /// Cache mode for the source: none is O_DIRECT, writeback reads through the page cache, auto
    /// (the default) reads through the page cache when most of the source file's data is in it
    /// already, else with O_DIRECT.
    #[arg(short = 'T', long = "source-cache", value_enum, default_value = "auto")]
    source_cache: SourceCacheArg,
    /// I/O engine.
    #[arg(long, value_enum, default_value = "auto")]
    engine: EngineArg,
    /// Print what was copied and skipped.
    #[arg(long)]
    stats: bool,
    /// The source image, or a volume as lv:VG/NAME.
    source: PathBuf,
    /// The target image, or (with -n) a volume as lv:VG/NAME.
    target: PathBuf,
}

/// Target cache modes (`-t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetCacheArg {
    /// O_DIRECT: bypass the host page cache.
    None,
    /// Use the host page cache; flushed at the end.
    Writeback,
    /// qemu-img's default; accepted, and flushed at the end like writeback.
    Unsafe,
}

impl From<TargetCacheArg> for CacheArg {
    fn from(c: TargetCacheArg) -> CacheArg {
        match c {
            TargetCacheArg::None => CacheArg::None,
            TargetCacheArg::Writeback | TargetCacheArg::Unsafe => CacheArg::Writeback,
        }
    }
}

/// Source cache modes (`-T`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceCacheArg {
    /// The page cache when most of the source's data is cached, else O_DIRECT.
    Auto,
    /// O_DIRECT: bypass the host page cache.
    None,
    /// Use the host page cache.
    Writeback,
}

impl SourceCacheArg {
    fn resolve(self, source: &std::path::Path) -> CacheMode {
        match self {
            SourceCacheArg::Auto => auto_source_cache(source),
            SourceCacheArg::None => CacheMode::None,
            SourceCacheArg::Writeback => CacheMode::Writeback,
        }
    }
}

struct Bar(ProgressBar);

impl ConvertProgress for Bar {
    fn progress(&self, done: u64, total: u64) {
        self.0.set_length(total);
        self.0.set_position(done);
    }

    fn cancelled(&self) -> bool {
        super::interrupt::requested()
    }
}

pub fn run(a: ConvertArgs) -> anyhow::Result<ExitCode> {
    let sparse_size = parse_size(&a.sparse_size)?;
    let data_dir = super::data_dir();
    for spec in [&a.source, &a.target] {
        super::refuse_volume_under_restore(&spec.to_string_lossy())?;
    }
    let req = ConvertRequest {
        source: &a.source,
        source_format: a.source_format.map(Into::into),
        target: &a.target,
        target_format: a.target_format.into(),
        target_options: format::parse_options(&a.options)?,
        compress: a.compress,
        open: OpenOptions {
            cache: CacheArg::from(a.cache).into(),
            engine: a.engine.into(),
            ..OpenOptions::default()
        },
        convert: ConvertOptions {
            sparse_size,
            out_of_order: a.out_of_order,
            in_flight: a.in_flight.max(1),
            chunk: parse_size(&a.chunk)?.max(512),
            existing_target: a.existing,
        },
        volumes: Some(&data_dir),
        source_snapshot: a.snapshot.as_deref().map(SnapshotSel::parse).transpose()?,
        source_cache: Some(a.source_cache.resolve(&a.source)),
    };
    let bar = if a.progress {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template(
                "{wide_bar} {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Some(Bar(b))
    } else {
        None
    };
    let started = Instant::now();
    let progress: &dyn ConvertProgress = match &bar {
        Some(b) => b,
        None => &super::interrupt::Quiet,
    };
    super::interrupt::install();
    let report = convert_files(&req, progress).with_context(|| {
        format!(
            "Could not convert {} to {}",
            a.source.display(),
            a.target.display()
        )
    })?;
    if let Some(b) = bar {
        b.0.finish_and_clear();
    }
    if a.stats {
        eprintln!(
            "converted {} in {:.2} s: read {}, wrote {}, zeroed {}, skipped {}",
            format_size(report.size),
            started.elapsed().as_secs_f64(),
            format_size(report.read),
            format_size(report.written),
            format_size(report.zeroed),
            format_size(report.skipped)
        );
    }
    Ok(ExitCode::SUCCESS)
}

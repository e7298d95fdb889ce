//! `strata image convert`: copies an image into a new (or, with `-n`, an existing) image of
//! any format, like `qemu-img convert`. The work is `strata_storage::convert`; this module
//! parses arguments and draws the progress bar.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use strata_storage::convert::{
    convert, convert_files, convert_to_target, ConvertOptions, ConvertProgress, ConvertReport,
    ConvertRequest, ConvertTarget,
};
use strata_storage::format::{self, ImageFormat, OpenOptions};
use strata_storage::source::{open_source, SourceSpec, LV_PREFIX};
use strata_storage::util::{format_size, parse_size};
use strata_storage::volume::VolumeStore;

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
    /// Requests in flight on each side.
    #[arg(short = 'm', default_value_t = 16)]
    in_flight: usize,
    /// Cache mode for both images: none is O_DIRECT.
    #[arg(short = 't', long = "cache", value_enum, default_value = "none")]
    cache: CacheArg,
    /// I/O engine.
    #[arg(long, value_enum, default_value = "auto")]
    engine: EngineArg,
    /// Print what was copied and skipped.
    #[arg(long)]
    stats: bool,
    /// The source image, or a logical volume as `lv:VG/NAME`.
    source: PathBuf,
    /// The target image, or an existing logical volume as `lv:VG/NAME` (written in place, as
    /// with -n).
    target: PathBuf,
}

struct Bar(ProgressBar);

impl ConvertProgress for Bar {
    fn progress(&self, done: u64, total: u64) {
        self.0.set_length(total);
        self.0.set_position(done);
    }
}

pub fn run(a: ConvertArgs) -> anyhow::Result<ExitCode> {
    let sparse_size = parse_size(&a.sparse_size)?;
    let req = ConvertRequest {
        source: &a.source,
        source_format: a.source_format.map(Into::into),
        target: &a.target,
        target_format: a.target_format.into(),
        target_options: format::parse_options(&a.options)?,
        compress: a.compress,
        open: OpenOptions {
            cache: a.cache.into(),
            engine: a.engine.into(),
            ..OpenOptions::default()
        },
        convert: ConvertOptions {
            sparse_size,
            out_of_order: a.out_of_order,
            in_flight: a.in_flight.max(1),
            existing_target: a.existing,
            ..ConvertOptions::default()
        },
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
        None => &strata_storage::convert::NoProgress,
    };
    let volumes = is_volume(&a.source) || is_volume(&a.target);
    let report = if volumes {
        convert_volumes(&req, progress)
    } else {
        convert_files(&req, progress).map_err(Into::into)
    }
    .with_context(|| {
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

fn is_volume(p: &std::path::Path) -> bool {
    p.to_string_lossy().starts_with(LV_PREFIX)
}

/// A conversion from or into a logical volume (`lv:VG/NAME`, found through the devices file).
/// A volume source is read as raw; a volume target must exist and is written in place (zeros
/// included, as with -n). Both sides in one group share one open group (it has one owner).
fn convert_volumes(
    req: &ConvertRequest<'_>,
    progress: &dyn ConvertProgress,
) -> anyhow::Result<ConvertReport> {
    let source = SourceSpec::parse(&req.source.to_string_lossy())?;
    let target = SourceSpec::parse(&req.target.to_string_lossy())?;
    if matches!(source, SourceSpec::Volume { .. })
        && req.source_format.is_some_and(|f| f != ImageFormat::Raw)
    {
        bail!("-f applies to image files: a volume is read as it is (raw)");
    }
    let src_opts = OpenOptions {
        format: req.source_format,
        read_only: true,
        ..req.open
    };
    let (tvg, tlv) = match target {
        SourceSpec::Path(_) => {
            let src = open_source(&req.source.to_string_lossy(), &src_opts, &super::data_dir())?;
            return Ok(convert_to_target(src.device().as_ref(), req, progress)?);
        }
        SourceSpec::Volume { vg, lv } => (vg, lv),
    };
    if req.compress || !req.target_options.is_empty() {
        bail!("-c and -o apply to new images; a volume target is written in place");
    }
    if req.target_format != ImageFormat::Raw {
        bail!("a volume target holds raw data: use -O raw");
    }
    let opts = ConvertOptions {
        existing_target: true,
        ..req.convert.clone()
    };
    let store = VolumeStore::new(&super::data_dir()).with_io(req.open.engine, req.open.cache);
    if let SourceSpec::Volume { vg, lv } = &source {
        if *vg == tvg {
            if *lv == tlv {
                bail!("the source and the target are the same volume");
            }
            let group = store.open_vg(vg, false)?;
            let src = group.open_lv(lv, true)?;
            let dst = group.open_lv(&tlv, false)?;
            return Ok(convert(
                src.as_ref(),
                ConvertTarget::Device(dst.as_ref()),
                &opts,
                progress,
            )?);
        }
    }
    let src = open_source(&req.source.to_string_lossy(), &src_opts, &super::data_dir())?;
    let group = store.open_vg(&tvg, false)?;
    let dst = group.open_lv(&tlv, false)?;
    Ok(convert(
        src.device().as_ref(),
        ConvertTarget::Device(dst.as_ref()),
        &opts,
        progress,
    )?)
}

//! `strata image …`: image files, in the style of qemu-img.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use strata_storage::format::{self, ImageFormat, OpenOptions};
use strata_storage::io::engine::EngineChoice;
use strata_storage::io::file::CacheMode;
use strata_storage::util::{format_size, parse_size};

use super::bench::BenchArgs;
use super::Output;

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Create an image file.
    Create(CreateArgs),
    /// Show an image's format, sizes and format-specific facts.
    Info(InfoArgs),
    /// Measure I/O on an image, like `qemu-img bench`.
    Bench(BenchArgs),
    /// List, create, apply or delete internal snapshots (qcow2).
    Snapshot(super::snapshot::SnapshotArgs),
    /// Check an image's consistency and repair it (qcow2).
    Check(super::check::CheckArgs),
    /// Change an image's virtual size.
    Resize(super::resize::ResizeArgs),
    /// Show where each range of an image is stored.
    Map(super::map::MapArgs),
    /// Compare the contents of two images.
    Compare(super::compare::CompareArgs),
    /// Change the backing file of a qcow2 image.
    Rebase(super::rebase::RebaseArgs),
    /// Write a qcow2 image's data into its backing file.
    Commit(super::commit::CommitArgs),
    /// Convert an image or volume to another format or into a volume, like `qemu-img convert`.
    Convert(super::convert::ConvertArgs),
    /// Import the disks of an OVA (or OVF folder) as images.
    ImportOva(super::import_ova::ImportOvaArgs),
    /// Dirty bitmaps (changed-block tracking) of an image: inside a qcow2 v3 image (shared with
    /// QEMU), else beside it in IMAGE.bitmaps.
    #[command(subcommand)]
    Bitmap(super::bitmap::BitmapCommand),
}

/// Image formats on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// Raw image.
    Raw,
    /// qcow2 image.
    Qcow2,
    /// VMware disk.
    Vmdk,
    /// Microsoft VHD (qemu's "vpc"; `vpc` is accepted too).
    #[value(alias = "vpc")]
    Vhd,
    /// Microsoft VHDX.
    Vhdx,
}

impl From<FormatArg> for ImageFormat {
    fn from(f: FormatArg) -> ImageFormat {
        match f {
            FormatArg::Raw => ImageFormat::Raw,
            FormatArg::Qcow2 => ImageFormat::Qcow2,
            FormatArg::Vmdk => ImageFormat::Vmdk,
            FormatArg::Vhd => ImageFormat::Vhd,
            FormatArg::Vhdx => ImageFormat::Vhdx,
        }
    }
}

/// I/O engines on the command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum EngineArg {
    /// io_uring where available, else threads.
    #[default]
    Auto,
    /// io_uring.
    Uring,
    /// Thread pool.
    Threads,
}

impl From<EngineArg> for EngineChoice {
    fn from(e: EngineArg) -> EngineChoice {
        match e {
            EngineArg::Auto => EngineChoice::Auto,
            EngineArg::Uring => EngineChoice::Uring,
            EngineArg::Threads => EngineChoice::Threads,
        }
    }
}

/// Cache modes on the command line (qemu-img's `-t`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum CacheArg {
    /// O_DIRECT: bypass the host page cache.
    #[default]
    None,
    /// Use the host page cache.
    Writeback,
}

impl From<CacheArg> for CacheMode {
    fn from(c: CacheArg) -> CacheMode {
        match c {
            CacheArg::None => CacheMode::None,
            CacheArg::Writeback => CacheMode::Writeback,
        }
    }
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Image format.
    #[arg(short = 'f', long = "format", value_enum, default_value = "raw")]
    format: FormatArg,
    /// Format options, comma-separated key=value pairs (raw: preallocation=off|falloc|full;
    /// qcow2: cluster_size, compat, lazy_refcounts, extended_l2, refcount_bits, preallocation,
    /// compression_type; vmdk: subformat, adapter_type, hwversion, zeroed_grain; vhd:
    /// subformat=dynamic|fixed, force_size, block_size; vhdx: subformat=dynamic|fixed,
    /// block_size, log_size, block_state_zero).
    #[arg(short = 'o', long = "options", default_value = "")]
    options: String,
    /// Backing file (qcow2; vhd: the parent of a differencing disk, in the same folder),
    /// relative to the new image's folder unless absolute.
    #[arg(short = 'b', long = "backing")]
    backing: Option<String>,
    /// Format of the backing file (probed when omitted).
    #[arg(short = 'F', long = "backing-format", value_enum)]
    backing_format: Option<FormatArg>,
    /// Don't print the summary line.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// The image file to create; an existing file is never overwritten.
    file: PathBuf,
    /// Virtual size, e.g. 512M, 10G (default with -b: the backing file's).
    size: Option<String>,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format", value_enum)]
    format: Option<FormatArg>,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// The image file.
    file: PathBuf,
}

pub fn run(cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ImageCommand::Create(a) => create(a),
        ImageCommand::Info(a) => info(a),
        ImageCommand::Bench(a) => super::bench::run(a),
        ImageCommand::Snapshot(a) => super::snapshot::run(a),
        ImageCommand::Check(a) => super::check::run(a),
        ImageCommand::Resize(a) => super::resize::run(a),
        ImageCommand::Map(a) => super::map::run(a),
        ImageCommand::Compare(a) => super::compare::run(a),
        ImageCommand::Rebase(a) => super::rebase::run(a),
        ImageCommand::Commit(a) => super::commit::run(a),
        ImageCommand::Convert(a) => super::convert::run(a),
        ImageCommand::ImportOva(a) => super::import_ova::run(a),
        ImageCommand::Bitmap(c) => super::bitmap::run_image(c),
    }
}

fn create(a: CreateArgs) -> anyhow::Result<ExitCode> {
    let mut opts = format::parse_options(&a.options)?;
    if let Some(b) = &a.backing {
        opts.insert("backing_file".into(), b.clone());
    }
    if let Some(f) = a.backing_format {
        opts.insert("backing_fmt".into(), ImageFormat::from(f).name().into());
    }
    let size = match &a.size {
        Some(s) => parse_size(s)?,
        None if opts.contains_key("backing_file") => 0,
        None => anyhow::bail!("An image size is needed (or a backing file to take it from)"),
    };
    let fmt: ImageFormat = a.format.into();
    format::create_image(&a.file, fmt, size, &opts)
        .with_context(|| format!("Could not create {}", a.file.display()))?;
    if !a.quiet {
        let extra: String = opts.iter().map(|(k, v)| format!(" {k}={v}")).collect();
        println!(
            "Formatting '{}', fmt={fmt} size={size}{extra}",
            a.file.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn info(a: InfoArgs) -> anyhow::Result<ExitCode> {
    let opts = OpenOptions {
        format: a.format.map(Into::into),
        read_only: true,
        cache: CacheMode::Writeback,
        engine: EngineChoice::Auto,
        references: Default::default(),
    };
    let img = format::open_image(&a.file, &opts)?;
    let info = img.info()?;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&info)?),
        Output::Human => {
            println!("image: {}", info.filename);
            println!("file format: {}", info.format);
            println!(
                "virtual size: {} ({} bytes)",
                format_size(info.virtual_size),
                info.virtual_size
            );
            println!("disk size: {}", format_size(info.actual_size));
            for (k, v) in &info.format_specific {
                println!(
                    "{k}: {}",
                    v.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string())
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

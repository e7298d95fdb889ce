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
    /// Convert an image to another format, like `qemu-img convert`.
    Convert(super::convert::ConvertArgs),
    /// Import the disks of an OVA (or OVF folder) as images.
    ImportOva(super::import_ova::ImportOvaArgs),
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
}

impl From<FormatArg> for ImageFormat {
    fn from(f: FormatArg) -> ImageFormat {
        match f {
            FormatArg::Raw => ImageFormat::Raw,
            FormatArg::Qcow2 => ImageFormat::Qcow2,
            FormatArg::Vmdk => ImageFormat::Vmdk,
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
    /// Format options, comma-separated key=value pairs (raw: preallocation=off|falloc|full).
    #[arg(short = 'o', long = "options", default_value = "")]
    options: String,
    /// Don't print the summary line.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// The image file to create; an existing file is never overwritten.
    file: PathBuf,
    /// Virtual size, e.g. 512M, 10G.
    size: String,
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
        ImageCommand::Convert(a) => super::convert::run(a),
        ImageCommand::ImportOva(a) => super::import_ova::run(a),
    }
}

fn create(a: CreateArgs) -> anyhow::Result<ExitCode> {
    let size = parse_size(&a.size)?;
    let opts = format::parse_options(&a.options)?;
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

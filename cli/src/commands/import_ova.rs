//! `strata image import-ova`: converts the disks an OVA references into images in a folder.
//! The work is `strata_storage::ova`; this module parses arguments and prints the result.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use strata_storage::format::{self, OpenOptions};
use strata_storage::ova::{import_ova, ImportOptions};
use strata_storage::util::format_size;

use super::image::{CacheArg, FormatArg};
use super::Output;

#[derive(Debug, Args)]
pub struct ImportOvaArgs {
    /// Format of the imported disks.
    #[arg(short = 'O', value_enum, default_value = "raw")]
    target_format: FormatArg,
    /// Format options for the imported disks (e.g. subformat=monolithicSparse).
    #[arg(short = 'o', default_value = "")]
    options: String,
    /// Cache mode: none is O_DIRECT.
    #[arg(short = 't', long = "cache", value_enum, default_value = "none")]
    cache: CacheArg,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// The OVA file.
    ova: PathBuf,
    /// The folder to write the disks into (created if missing).
    dir: PathBuf,
}

pub fn run(a: ImportOvaArgs) -> anyhow::Result<ExitCode> {
    let opts = ImportOptions {
        format: a.target_format.into(),
        options: format::parse_options(&a.options)?,
        open: OpenOptions {
            cache: a.cache.into(),
            ..OpenOptions::default()
        },
    };
    super::interrupt::install();
    let disks = import_ova(&a.ova, &a.dir, &opts, &super::interrupt::Quiet)
        .with_context(|| format!("Could not import {}", a.ova.display()))?;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&disks)?),
        Output::Human => {
            for d in &disks {
                println!(
                    "{}: {} ({})",
                    d.disk_id,
                    d.path.display(),
                    format_size(d.capacity)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

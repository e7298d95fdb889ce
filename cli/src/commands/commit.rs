//! `strata image commit`: write a qcow2 image's data into its backing file.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use strata_storage::format::qcow2::tools;

#[derive(Debug, Args)]
pub struct CommitArgs {
    /// Keep the image's data instead of emptying it afterwards.
    #[arg(short = 'd')]
    keep: bool,
    /// The qcow2 image.
    file: PathBuf,
}

pub fn run(a: CommitArgs) -> anyhow::Result<ExitCode> {
    tools::commit(&a.file, a.keep)
        .with_context(|| format!("Could not commit {}", a.file.display()))?;
    println!("Image committed.");
    Ok(ExitCode::SUCCESS)
}

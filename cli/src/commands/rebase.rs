//! `strata image rebase`: change a qcow2 image's backing file, copying what differs unless `-u`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use strata_storage::format::qcow2::tools;

use super::image::FormatArg;

#[derive(Debug, Args)]
pub struct RebaseArgs {
    /// Unsafe: only change the name in the header, copy nothing.
    #[arg(short = 'u')]
    unsafe_: bool,
    /// New backing file ("" for none), relative to the image's folder unless absolute.
    #[arg(short = 'b', value_name = "BACKING")]
    backing: String,
    /// Format of the new backing file (probed when omitted).
    #[arg(short = 'F', value_enum)]
    backing_format: Option<FormatArg>,
    /// The qcow2 image.
    file: PathBuf,
}

pub fn run(a: RebaseArgs) -> anyhow::Result<ExitCode> {
    let backing = (!a.backing.is_empty()).then_some(a.backing.as_str());
    tools::rebase(
        &a.file,
        backing,
        a.backing_format.map(Into::into),
        a.unsafe_,
    )
    .with_context(|| format!("Could not rebase {}", a.file.display()))?;
    Ok(ExitCode::SUCCESS)
}

//! `strata image resize`: change an image's virtual size (`+N`/`-N` relative, shrinking only with
//! `--shrink`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use strata_storage::format::{self, ImageFormat, OpenOptions};
use strata_storage::util::parse_size;

use super::qcow2_util::open_qcow2;

#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// Allow making the image smaller (data past the new end is lost).
    #[arg(long)]
    shrink: bool,
    /// The image.
    file: PathBuf,
    /// New size, or +SIZE / -SIZE relative to the current one.
    #[arg(allow_hyphen_values = true)]
    size: String,
}

pub fn run(a: ResizeArgs) -> anyhow::Result<ExitCode> {
    let opts = OpenOptions {
        read_only: false,
        ..OpenOptions::default()
    };
    let img = format::open_image(&a.file, &opts)
        .with_context(|| format!("Could not open {}", a.file.display()))?;
    let cur = img.size();
    let new = if let Some(d) = a.size.strip_prefix('+') {
        cur.checked_add(parse_size(d)?).context("Size overflow")?
    } else if let Some(d) = a.size.strip_prefix('-') {
        cur.checked_sub(parse_size(d)?)
            .context("The image would shrink below zero bytes")?
    } else {
        parse_size(&a.size)?
    };
    if new < cur && !a.shrink {
        bail!(
            "Use --shrink to make {} smaller ({cur} to {new} bytes): data past the new end is lost",
            a.file.display()
        );
    }
    if img.format() == ImageFormat::Qcow2 {
        drop(img);
        open_qcow2(&a.file, true)?.resize_image(new, a.shrink)?;
    } else {
        img.resize(new)?;
    }
    println!("Image resized.");
    Ok(ExitCode::SUCCESS)
}

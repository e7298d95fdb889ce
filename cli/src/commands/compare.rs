//! `strata image compare`: exit 0 when two images read the same, 1 when they differ, 2 on error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use strata_storage::format::compare::{compare, Comparison};
use strata_storage::format::{self, OpenOptions};

use super::image::FormatArg;

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Format of the first image (probed when omitted).
    #[arg(short = 'f', value_enum)]
    format_a: Option<FormatArg>,
    /// Format of the second image (probed when omitted).
    #[arg(short = 'F', value_enum)]
    format_b: Option<FormatArg>,
    /// Strict: images of different sizes differ.
    #[arg(short = 's', long)]
    strict: bool,
    /// The first image.
    a: PathBuf,
    /// The second image.
    b: PathBuf,
}

pub fn run(a: CompareArgs) -> anyhow::Result<ExitCode> {
    let open = |p: &PathBuf, f: Option<FormatArg>| {
        format::open_image(
            p,
            &OpenOptions {
                format: f.map(Into::into),
                read_only: true,
                ..OpenOptions::default()
            },
        )
    };
    let result = open(&a.a, a.format_a)
        .and_then(|x| open(&a.b, a.format_b).map(|y| (x, y)))
        .and_then(|(x, y)| compare(x.as_ref(), y.as_ref(), a.strict));
    match result {
        Ok(Comparison::Identical) => {
            println!("Images are identical.");
            Ok(ExitCode::SUCCESS)
        }
        Ok(Comparison::MismatchAt(o)) => {
            println!("Content mismatch at offset {o}!");
            Ok(ExitCode::from(1))
        }
        Ok(Comparison::SizeMismatch) => {
            println!("Image size mismatch!");
            Ok(ExitCode::from(1))
        }
        Err(e) => {
            eprintln!("strata: {e}");
            Ok(ExitCode::from(2))
        }
    }
}

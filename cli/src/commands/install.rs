//! `strata install`: installs the Strata appliance onto a disk. Run by the Strata ISO's init;
//! see appliance-image/README.md for the answer keys and the disk layout.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use strata_installer::answers::AnswerSources;
use strata_installer::disks::SysView;
use strata_installer::{install, InstallOptions, Mode};

#[derive(Debug, Args)]
pub struct InstallArgs {
    /// Answer file (`key = value` lines); overrides the medium's answer file and the kernel
    /// command line.
    #[arg(long, value_name = "FILE")]
    answers: Option<PathBuf>,
    /// Ask on the console even when answers are given (they become the defaults).
    #[arg(long)]
    interactive: bool,
    /// Where the installation medium is mounted.
    #[arg(long, value_name = "DIR", default_value = "/run/strata/media")]
    media: PathBuf,
    /// Read answers from this kernel command line file.
    #[arg(long, value_name = "FILE", default_value = "/proc/cmdline")]
    cmdline: PathBuf,
    /// Show the plan (disk, partitions, settings) and change nothing.
    #[arg(long)]
    dry_run: bool,
}

pub fn run(a: InstallArgs) -> anyhow::Result<ExitCode> {
    let opts = InstallOptions {
        answers: AnswerSources {
            media_file: Some(a.media.join("strata/answers.conf")),
            cmdline: Some(a.cmdline),
            explicit_file: a.answers,
        },
        media: a.media,
        source_root: PathBuf::from("/"),
        target_mount: PathBuf::from("/mnt/target"),
        token_mount: PathBuf::from("/run/strata/token"),
        after_file: Some(PathBuf::from("/run/strata/after")),
        view: SysView::default(),
        mode: if a.interactive {
            Mode::Interactive
        } else {
            Mode::Auto
        },
        terminal: std::io::stdin().is_terminal(),
        dry_run: a.dry_run,
    };
    let mut input = std::io::stdin().lock();
    let mut out = std::io::stdout();
    install(&opts, &mut input, &mut out)?;
    Ok(ExitCode::SUCCESS)
}

//! The command-line interface: argument definitions and dispatch. Each command group lives in its
//! own module and calls the storage layer; no command keeps logic of its own that a library
//! should hold.

mod bench;
mod check;
mod commit;
mod compare;
mod image;
mod map;
mod qcow2_util;
mod rebase;
mod resize;
mod snapshot;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Strata: storage-centric virtualization. Images, volumes, backups and VMs.
#[derive(Debug, Parser)]
#[command(name = "strata", version, about, propagate_version = true)]
pub struct Cli {
    /// Log more (-v: info, -vv: debug, -vvv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Work with image files: create, info, bench.
    #[command(subcommand)]
    Image(image::ImageCommand),
}

/// Output format for commands that report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Text for people.
    #[default]
    Human,
    /// JSON for programs.
    Json,
}

/// Sets up `tracing` to stderr; warnings by default.
pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Image(cmd) => image::run(cmd),
    }
}

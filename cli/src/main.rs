//! The `strata` command. Parses the command line, runs the command, and turns any error into
//! one line on stderr and a non-zero exit status.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::process::ExitCode;

use clap::Parser;

mod commands;

use commands as cli;

fn main() -> ExitCode {
    // A bug must still end in one readable line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("strata: internal error: {info}");
    }));
    let args = cli::Cli::parse();
    cli::init_logging(args.verbose);
    match cli::run(args) {
        Ok(code) => code,
        Err(e) if cli::interrupt::requested() => {
            eprintln!("strata: interrupted: {e:#}");
            ExitCode::from(cli::interrupt::EXIT_STATUS)
        }
        Err(e) => {
            eprintln!("strata: {e:#}");
            ExitCode::FAILURE
        }
    }
}

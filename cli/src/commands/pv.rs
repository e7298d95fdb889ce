//! `strata pv …`: physical volumes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use strata_storage::util::{format_size, parse_size};
use strata_storage::volume::VolumeStore;

use super::Output;

#[derive(Debug, Subcommand)]
pub enum PvCommand {
    /// Label a file or block device as a PV and register it in the devices file.
    Create(CreateArgs),
    /// List registered PVs.
    List(ListArgs),
    /// Remove the label of a PV that belongs to no volume group, and unregister it.
    Remove(RemoveArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Create the file with this size if it does not exist (e.g. 10G).
    #[arg(long)]
    size: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// The file or block device.
    path: PathBuf,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
}

#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// The PV.
    path: PathBuf,
}

pub fn run(cmd: PvCommand, data: &Path) -> anyhow::Result<ExitCode> {
    let store = VolumeStore::new(data);
    match cmd {
        PvCommand::Create(a) => {
            let size = a.size.as_deref().map(parse_size).transpose()?;
            let pv = store.pv_create(&a.path, size)?;
            match a.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&pv)?),
                Output::Human => println!(
                    "Physical volume {} created ({}, identifier {})",
                    pv.path,
                    format_size(pv.size),
                    pv.uuid
                ),
            }
        }
        PvCommand::List(a) => {
            let pvs = store.pv_list()?;
            match a.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&pvs)?),
                Output::Human => {
                    println!("{:<40} {:<10} {:>12}  PROBLEM", "PV", "VG", "SIZE");
                    for p in pvs {
                        println!(
                            "{:<40} {:<10} {:>12}  {}",
                            p.path,
                            p.vg.as_deref().unwrap_or("-"),
                            format_size(p.size),
                            p.problem.as_deref().unwrap_or("")
                        );
                    }
                }
            }
        }
        PvCommand::Remove(a) => {
            store.pv_remove(&a.path)?;
            match a.output {
                Output::Json => println!("{}", serde_json::json!({ "removed": a.path })),
                Output::Human => println!("Physical volume {} removed", a.path.display()),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

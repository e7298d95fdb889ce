//! `strata vg …`: volume groups.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use strata_storage::util::{format_size, parse_size};
use strata_storage::volume::{VgInfo, VolumeStore};

use super::Output;

#[path = "vg_rbd.rs"]
mod rbd;

#[derive(Debug, Subcommand)]
pub enum VgCommand {
    /// Create a volume group on registered PVs.
    Create(CreateArgs),
    /// Define a volume group on a Ceph RBD pool (its volumes are RBD images).
    CreateRbd(CreateRbdArgs),
    /// List volume groups.
    List(OutputArgs),
    /// Show a volume group and its PVs.
    Show(NameArgs),
    /// Add PVs to a volume group.
    Extend(PvsArgs),
    /// Remove an empty PV from a volume group.
    Reduce(ReduceArgs),
    /// Remove a volume group that holds no volumes.
    Remove(NameArgs),
    /// Check a volume group's metadata and thin pools.
    Check(NameArgs),
}

#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Extent size (default 4M).
    #[arg(long, default_value = "4M")]
    extent_size: String,
    #[command(flatten)]
    out: OutputArgs,
    /// Name of the new group.
    name: String,
    /// Registered PVs.
    #[arg(required = true)]
    pvs: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CreateRbdArgs {
    /// The Ceph configuration file (monitor addresses; it may name the keyring).
    #[arg(long)]
    conf: PathBuf,
    /// The Ceph user, without "client." (e.g. admin).
    #[arg(long = "id", default_value = "admin")]
    user: String,
    /// The RBD pool.
    #[arg(long)]
    pool: String,
    /// A keyring file, when the configuration does not name one.
    #[arg(long)]
    keyring: Option<PathBuf>,
    #[command(flatten)]
    out: OutputArgs,
    /// Name of the new group.
    name: String,
}

#[derive(Debug, Args)]
pub struct NameArgs {
    #[command(flatten)]
    out: OutputArgs,
    /// The volume group.
    name: String,
}

#[derive(Debug, Args)]
pub struct PvsArgs {
    #[command(flatten)]
    out: OutputArgs,
    /// The volume group.
    name: String,
    /// Registered PVs to add.
    #[arg(required = true)]
    pvs: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ReduceArgs {
    #[command(flatten)]
    out: OutputArgs,
    /// The volume group.
    name: String,
    /// The PV to remove (path or identifier).
    pv: String,
}

fn print_info(info: &VgInfo, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(info)?),
        Output::Human => {
            println!("volume group: {}", info.name);
            println!("identifier: {}", info.uuid);
            println!(
                "size: {}  free: {}",
                format_size(info.size),
                format_size(info.free)
            );
            println!("extent size: {}", format_size(info.extent_size));
            println!("volumes: {}", info.lv_count);
            println!("metadata sequence: {}", info.seqno);
            for p in &info.pvs {
                println!(
                    "  pv {} ({}): {} of {} extents used{}",
                    p.path,
                    p.uuid,
                    p.pe_used,
                    p.pe_count,
                    if p.problems.is_empty() {
                        String::new()
                    } else {
                        format!(" [{}]", p.problems.join("; "))
                    }
                );
            }
        }
    }
    Ok(())
}

fn resolve_pv(pv: &str) -> String {
    Path::new(pv)
        .canonicalize()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| pv.to_string())
}

/// Commands on an RBD group, when `cmd` names one; `None` for local groups and group-less
/// commands.
fn run_rbd(cmd: &VgCommand, store: &VolumeStore) -> anyhow::Result<Option<ExitCode>> {
    let name = match cmd {
        VgCommand::Show(a) | VgCommand::Remove(a) | VgCommand::Check(a) => &a.name,
        VgCommand::Extend(a) => &a.name,
        VgCommand::Reduce(a) => &a.name,
        _ => return Ok(None),
    };
    if store.rbd_groups().get(name)?.is_none() {
        return Ok(None);
    }
    rbd::run(cmd, name, store).map(Some)
}

pub fn run(cmd: VgCommand, data: &Path) -> anyhow::Result<ExitCode> {
    let store = VolumeStore::new(data);
    if let Some(code) = run_rbd(&cmd, &store)? {
        return Ok(code);
    }
    match cmd {
        VgCommand::CreateRbd(a) => rbd::create(a, &store)?,
        VgCommand::Create(a) => {
            let vg = store.vg_create(&a.name, &a.pvs, parse_size(&a.extent_size)?)?;
            match a.out.output {
                Output::Json => print_info(&vg.info(), Output::Json)?,
                Output::Human => println!("Volume group {} created", a.name),
            }
        }
        VgCommand::List(a) => {
            let list = store.vg_list()?;
            match a.output {
                Output::Json => {
                    // Local groups, then RBD groups (their records, with "type": "rbd").
                    let mut all = serde_json::to_value(&list)?;
                    if let Some(arr) = all.as_array_mut() {
                        for g in store.rbd_groups().load()? {
                            let mut v = serde_json::to_value(&g)?;
                            v["type"] = "rbd".into();
                            arr.push(v);
                        }
                    }
                    println!("{}", serde_json::to_string_pretty(&all)?)
                }
                Output::Human => {
                    println!(
                        "{:<16} {:>4} {:>4} {:>12} {:>12}  STATUS",
                        "VG", "PVS", "LVS", "SIZE", "FREE"
                    );
                    for g in store.rbd_groups().load()? {
                        println!(
                            "{:<16} {:>4} {:>4} {:>12} {:>12}  rbd pool {} ({})",
                            g.name,
                            "-",
                            "-",
                            "-",
                            "-",
                            g.pool,
                            g.conf.display()
                        );
                    }
                    for v in list {
                        let status = if v.missing_pvs.is_empty() {
                            "ok".to_string()
                        } else {
                            format!("{} PVs missing", v.missing_pvs.len())
                        };
                        println!(
                            "{:<16} {:>4} {:>4} {:>12} {:>12}  {status}",
                            v.name,
                            v.pv_count,
                            v.lv_count,
                            format_size(v.size),
                            format_size(v.free)
                        );
                    }
                }
            }
        }
        VgCommand::Show(a) => {
            let vg = store.open_vg(&a.name, true)?;
            print_info(&vg.info(), a.out.output)?;
        }
        VgCommand::Extend(a) => {
            let vg = store.open_vg(&a.name, false)?;
            store.vg_extend(&vg, &a.pvs)?;
            match a.out.output {
                Output::Json => print_info(&vg.info(), Output::Json)?,
                Output::Human => println!("Volume group {} extended", a.name),
            }
        }
        VgCommand::Reduce(a) => {
            let vg = store.open_vg(&a.name, false)?;
            vg.reduce(&resolve_pv(&a.pv))?;
            match a.out.output {
                Output::Json => print_info(&vg.info(), Output::Json)?,
                Output::Human => println!("Volume group {} reduced", a.name),
            }
        }
        VgCommand::Remove(a) => {
            let vg = store.open_vg(&a.name, false)?;
            vg.remove()?;
            match a.out.output {
                Output::Json => println!("{}", serde_json::json!({ "removed": a.name })),
                Output::Human => println!("Volume group {} removed", a.name),
            }
        }
        VgCommand::Check(a) => {
            let vg = store.open_vg(&a.name, false)?;
            let report = vg.check()?;
            match a.out.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Output::Human => {
                    for w in &report.warnings {
                        println!("warning: {w}");
                    }
                    for e in &report.errors {
                        println!("error: {e}");
                    }
                    for p in &report.pools {
                        println!(
                            "pool {}: {} devices, {} blocks mapped, {} used ({} shared), {} metadata blocks, {}",
                            p.pool,
                            p.devices,
                            p.mapped_blocks,
                            p.used_blocks,
                            p.shared_blocks,
                            p.used_metadata_blocks,
                            if p.is_clean() { "clean".to_string() } else { format!("{} errors", p.error_count) }
                        );
                        for e in &p.errors {
                            println!("  error: {e}");
                        }
                    }
                    println!(
                        "{}: {}",
                        report.vg,
                        if report.is_clean() {
                            "clean"
                        } else {
                            "INCONSISTENT"
                        }
                    );
                }
            }
            if !report.is_clean() {
                return Ok(ExitCode::from(2));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

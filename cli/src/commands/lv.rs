//! `strata lv …`: logical volumes — linear, thin pools, thin volumes, snapshots, clones.

use std::path::Path;
use std::process::ExitCode;

use anyhow::bail;
use clap::{Args, Subcommand};
use strata_storage::util::{format_size, parse_size};
use strata_storage::volume::name::split_lv_path;
use strata_storage::volume::{Group, LvInfo, LvType, VolumeStore};

use super::Output;

#[derive(Debug, Subcommand)]
pub enum LvCommand {
    /// Create a linear volume, or a thin volume with --thin.
    Create(CreateArgs),
    /// Create a thin pool.
    CreatePool(CreatePoolArgs),
    /// Take a read-only thin snapshot (O(1), any depth).
    Snapshot(TwoArgs),
    /// Make a writable linked clone of a snapshot or template.
    Clone(TwoArgs),
    /// List volumes (of one group, or of all).
    List(ListArgs),
    /// Show one volume.
    Show(OneArgs),
    /// Change a volume's size (pools only grow).
    Resize(ResizeArgs),
    /// Rename a volume.
    Rename(TwoArgs),
    /// Remove a volume.
    Remove(OneArgs),
    /// Mark a thin volume as a template (read-only; clones may be made from it), or unmark it.
    /// In an RBD group a template is a protected snapshot.
    Template(TemplateArgs),
    /// Take in an RBD image made outside Strata (`rbd create`) as a volume of an RBD group.
    Adopt(OneArgs),
    /// Dirty bitmaps (changed-block tracking) of a volume.
    #[command(subcommand)]
    Bitmap(super::bitmap::BitmapCommand),
}

#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Size, e.g. 10G (virtual size for thin volumes).
    #[arg(long)]
    size: String,
    /// Create a thin volume in this pool (VG/POOL).
    #[arg(long)]
    thin: Option<String>,
    #[command(flatten)]
    out: OutputArgs,
    /// VG/NAME of the new volume.
    path: String,
}

#[derive(Debug, Args)]
pub struct CreatePoolArgs {
    /// Data size, e.g. 100G.
    #[arg(long)]
    size: String,
    /// Data block size (power of two, 4K to the extent size; default 64K).
    #[arg(long)]
    block_size: Option<String>,
    /// Metadata volume size (default: sized from the data, at least 4M).
    #[arg(long)]
    metadata_size: Option<String>,
    #[command(flatten)]
    out: OutputArgs,
    /// VG/POOL.
    path: String,
}

#[derive(Debug, Args)]
pub struct TwoArgs {
    #[command(flatten)]
    out: OutputArgs,
    /// VG/NAME of the source.
    from: String,
    /// VG/NAME of the result.
    to: String,
}

#[derive(Debug, Args)]
pub struct OneArgs {
    #[command(flatten)]
    out: OutputArgs,
    /// VG/NAME.
    path: String,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    out: OutputArgs,
    /// Only this volume group.
    vg: Option<String>,
}

#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// New size, e.g. 20G, or +5G to grow by that much.
    #[arg(long, allow_hyphen_values = true)]
    size: String,
    /// For a thin pool: grow its metadata volume to this size instead.
    #[arg(long)]
    metadata: bool,
    /// Allow a smaller size: the data past the new end is lost.
    #[arg(long)]
    shrink: bool,
    #[command(flatten)]
    out: OutputArgs,
    /// VG/NAME.
    path: String,
}

#[derive(Debug, Args)]
pub struct TemplateArgs {
    /// Remove the template mark (makes the volume writable again).
    #[arg(long)]
    unset: bool,
    #[command(flatten)]
    out: OutputArgs,
    /// VG/NAME.
    path: String,
}

/// Opens the group (local or RBD) of `VG/NAME` for changes; returns it and NAME.
pub fn open<'a>(
    store: &VolumeStore,
    path: &'a str,
    read_only: bool,
) -> anyhow::Result<(Group, &'a str)> {
    let (vg, lv) = split_lv_path(path)?;
    Ok((store.open_group(vg, read_only)?, lv))
}

fn same_vg<'a>(path: &'a str, vg: &str) -> anyhow::Result<&'a str> {
    let (g, lv) = split_lv_path(path)?;
    if g != vg {
        bail!("{path} is in volume group {g}, not {vg}: both must be in the same group");
    }
    Ok(lv)
}

fn print_one(info: &LvInfo, output: Output, verb: &str) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(info)?),
        Output::Human => println!("Logical volume {}/{} {verb}", info.vg, info.name),
    }
    Ok(())
}

fn kind(l: &LvInfo) -> &'static str {
    match l.kind {
        LvType::Linear => "linear",
        LvType::ThinPool => "thin-pool",
        LvType::Snapshot if l.template => "template",
        LvType::Snapshot => "snapshot",
        LvType::Thin if l.template => "template",
        LvType::Thin if l.origin.is_some() => "clone",
        LvType::Thin => "thin",
    }
}

fn print_list(lvs: &[LvInfo], output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(lvs)?);
        return Ok(());
    }
    println!(
        "{:<12} {:<24} {:<10} {:>12} {:>12}  {:<12} DETAILS",
        "VG", "LV", "TYPE", "SIZE", "USED", "POOL/ORIGIN"
    );
    for l in lvs {
        let used = match (&l.usage, l.mapped_bytes) {
            (Some(u), _) => format_size(u.used_bytes),
            (None, Some(m)) => format_size(m),
            _ => "-".into(),
        };
        let from = match (&l.pool, &l.origin) {
            (Some(p), Some(o)) => format!("{p}/{o}"),
            (Some(p), None) => p.clone(),
            _ => "-".into(),
        };
        let details = match &l.usage {
            Some(u) => format!(
                "{} volumes, {} virtual, overcommit {:.2}x, metadata {}/{} blocks",
                u.devices,
                format_size(u.virtual_bytes),
                u.overcommit,
                u.used_metadata_blocks,
                u.metadata_blocks
            ),
            None => [l.read_only.then_some("read-only"), l.open.then_some("open")]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(", "),
        };
        println!(
            "{:<12} {:<24} {:<10} {:>12} {:>12}  {:<12} {details}",
            l.vg,
            l.name,
            kind(l),
            format_size(l.size),
            used,
            from
        );
    }
    Ok(())
}

fn adopt(vg: &Group, name: &str) -> anyhow::Result<()> {
    Ok(vg.adopt(name)?)
}

/// A size argument, absolute or `+N` relative to `current`.
fn new_size(text: &str, current: u64) -> anyhow::Result<u64> {
    Ok(match text.strip_prefix('+') {
        Some(delta) => current
            .checked_add(parse_size(delta)?)
            .ok_or_else(|| anyhow::anyhow!("Size {text} is too large"))?,
        None => parse_size(text)?,
    })
}

pub fn run(cmd: LvCommand, data: &Path) -> anyhow::Result<ExitCode> {
    let store = VolumeStore::new(data);
    match cmd {
        LvCommand::Create(a) => {
            let (vg, name) = open(&store, &a.path, false)?;
            let size = parse_size(&a.size)?;
            let pool = a
                .thin
                .as_deref()
                .map(|p| same_vg(p, &vg.name()))
                .transpose()?;
            vg.create(name, size, pool)?;
            print_one(&vg.lv_info(name)?, a.out.output, "created")?;
        }
        LvCommand::CreatePool(a) => {
            let (vg, name) = open(&store, &a.path, false)?;
            let block = a
                .block_size
                .as_deref()
                .map(parse_size)
                .transpose()?
                .unwrap_or(0);
            let meta = a
                .metadata_size
                .as_deref()
                .map(parse_size)
                .transpose()?
                .unwrap_or(0);
            vg.local("thin pools")?
                .create_pool(name, parse_size(&a.size)?, block, meta)?;
            print_one(&vg.lv_info(name)?, a.out.output, "created")?;
        }
        LvCommand::Snapshot(a) => {
            let (vg, origin) = open(&store, &a.from, false)?;
            let snap = same_vg(&a.to, &vg.name())?;
            vg.snapshot(origin, snap)?;
            print_one(&vg.lv_info(snap)?, a.out.output, "created")?;
        }
        LvCommand::Clone(a) => {
            let (vg, source) = open(&store, &a.from, false)?;
            let new = same_vg(&a.to, &vg.name())?;
            vg.clone_lv(source, new)?;
            print_one(&vg.lv_info(new)?, a.out.output, "created")?;
        }
        LvCommand::List(a) => {
            let names: Vec<String> = match &a.vg {
                Some(v) => vec![v.clone()],
                None => {
                    let mut n: Vec<String> = store.vg_list()?.into_iter().map(|v| v.name).collect();
                    n.extend(store.rbd_groups().load()?.into_iter().map(|g| g.name));
                    n
                }
            };
            let mut all = Vec::new();
            for n in names {
                all.extend(store.open_group(&n, true)?.list_lvs()?);
            }
            print_list(&all, a.out.output)?;
        }
        LvCommand::Show(a) => {
            let (vg, name) = open(&store, &a.path, true)?;
            let info = vg.lv_info(name)?;
            print_list(std::slice::from_ref(&info), a.out.output)?;
        }
        LvCommand::Resize(a) => {
            let (vg, name) = open(&store, &a.path, false)?;
            let info = vg.lv_info(name)?;
            if a.metadata {
                let local = vg.local("thin pool metadata")?;
                let pool = local.pool(name)?;
                let current = pool.usage().metadata_blocks * 4096;
                local.resize_pool_metadata(name, new_size(&a.size, current)?)?;
            } else {
                let size = new_size(&a.size, info.size)?;
                if size < info.size && !a.shrink {
                    anyhow::bail!(
                        "Use --shrink to make {} smaller ({} to {size} bytes): data past the new \
                         end is lost",
                        a.path,
                        info.size
                    );
                }
                vg.resize_lv(name, size)?;
            }
            print_one(&vg.lv_info(name)?, a.out.output, "resized")?;
        }
        LvCommand::Rename(a) => {
            let (vg, old) = open(&store, &a.from, false)?;
            let new = match a.to.split_once('/') {
                Some(_) => same_vg(&a.to, &vg.name())?,
                None => a.to.as_str(),
            };
            vg.rename_lv(old, new)?;
            print_one(&vg.lv_info(new)?, a.out.output, "renamed")?;
        }
        LvCommand::Remove(a) => {
            let (vg, name) = open(&store, &a.path, false)?;
            vg.remove_lv(name)?;
            match a.out.output {
                Output::Json => println!("{}", serde_json::json!({ "removed": a.path })),
                Output::Human => println!("Logical volume {} removed", a.path),
            }
        }
        LvCommand::Bitmap(c) => {
            let (vg, lv) = open(&store, c.target(), false)?;
            super::bitmap::run(
                &c,
                &*vg.local("dirty bitmaps (RBD volumes track changes with Ceph's fast-diff)")?
                    .bitmaps(lv)?,
            )?;
        }
        LvCommand::Adopt(a) => {
            let (vg, name) = open(&store, &a.path, false)?;
            adopt(&vg, name)?;
            print_one(&vg.lv_info(name)?, a.out.output, "adopted")?;
        }
        LvCommand::Template(a) => {
            let (vg, name) = open(&store, &a.path, false)?;
            vg.set_template(name, !a.unset)?;
            print_one(
                &vg.lv_info(name)?,
                a.out.output,
                if a.unset {
                    "is no longer a template"
                } else {
                    "is a template"
                },
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

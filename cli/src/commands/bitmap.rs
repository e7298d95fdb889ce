//! `strata lv bitmap …` and `strata image bitmap …`: the dirty bitmaps (changed-block tracking)
//! of a volume or an image file — add, list, show, clear, remove, merge. The caller opens the
//! bitmap set (under the volume group's lock, or the image's) and hands it to [`run`].

use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};
use strata_storage::bitmap::BitmapSet;
use strata_storage::device::BlockDevice;
use strata_storage::util::{format_size, parse_size};

use super::lv::OutputArgs;
use super::Output;

#[derive(Debug, Subcommand)]
pub enum BitmapCommand {
    /// Add an empty bitmap that records every write from now on.
    Add(BitmapAddArgs),
    /// List the bitmaps.
    List(BitmapListArgs),
    /// Show a bitmap's dirty ranges.
    Show(BitmapArgs),
    /// Clear a bitmap (it is valid again from now on).
    Clear(BitmapArgs),
    /// Delete a bitmap.
    Remove(BitmapArgs),
    /// Set every bit of SOURCE in TARGET too.
    Merge(BitmapMergeArgs),
}

#[derive(Debug, Args)]
pub struct BitmapAddArgs {
    /// Bytes per bit (power of two; default 64K).
    #[arg(long, default_value = "64K")]
    granularity: String,
    #[command(flatten)]
    out: OutputArgs,
    /// The volume (VG/NAME) or image file.
    target: String,
    /// Bitmap name.
    name: String,
}

#[derive(Debug, Args)]
pub struct BitmapListArgs {
    #[command(flatten)]
    out: OutputArgs,
    /// The volume (VG/NAME) or image file.
    target: String,
}

#[derive(Debug, Args)]
pub struct BitmapArgs {
    #[command(flatten)]
    out: OutputArgs,
    /// The volume (VG/NAME) or image file.
    target: String,
    /// Bitmap name.
    name: String,
}

#[derive(Debug, Args)]
pub struct BitmapMergeArgs {
    #[command(flatten)]
    out: OutputArgs,
    /// The volume (VG/NAME) or image file.
    target: String,
    /// Bitmap whose bits are added.
    source: String,
    /// Bitmap that receives them.
    into: String,
}

impl BitmapCommand {
    /// The volume or image the command is about.
    pub fn target(&self) -> &str {
        match self {
            BitmapCommand::Add(a) => &a.target,
            BitmapCommand::List(a) => &a.target,
            BitmapCommand::Show(a) | BitmapCommand::Clear(a) | BitmapCommand::Remove(a) => {
                &a.target
            }
            BitmapCommand::Merge(a) => &a.target,
        }
    }

    fn output(&self) -> Output {
        match self {
            BitmapCommand::Add(a) => a.out.output,
            BitmapCommand::List(a) => a.out.output,
            BitmapCommand::Show(a) | BitmapCommand::Clear(a) | BitmapCommand::Remove(a) => {
                a.out.output
            }
            BitmapCommand::Merge(a) => a.out.output,
        }
    }
}

/// Runs `cmd` on `set`, the bitmaps of `cmd.target()`. Changes are saved before this returns.
pub fn run(cmd: &BitmapCommand, set: &BitmapSet) -> anyhow::Result<()> {
    let output = cmd.output();
    let done = |what: String| -> anyhow::Result<()> {
        match output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&set.infos())?),
            Output::Human => println!("{what}"),
        }
        Ok(())
    };
    match cmd {
        BitmapCommand::Add(a) => {
            set.add(&a.name, parse_size(&a.granularity)?)?;
            done(format!("Bitmap {} added to {}", a.name, a.target))?;
        }
        BitmapCommand::List(_) => match output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&set.infos())?),
            Output::Human => {
                println!(
                    "{:<24} {:>12} {:>14}  STATE",
                    "BITMAP", "GRANULARITY", "DIRTY"
                );
                for b in set.infos() {
                    println!(
                        "{:<24} {:>12} {:>14}  {}",
                        b.name,
                        format_size(b.granularity),
                        format_size(b.dirty_bytes),
                        if b.valid {
                            "valid"
                        } else {
                            "invalid (unclean stop: back up everything)"
                        }
                    );
                }
            }
        },
        BitmapCommand::Show(a) => {
            let (ranges, valid) = set.dirty_ranges(&a.name)?;
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "name": a.name,
                        "valid": valid,
                        "ranges": ranges.iter().map(|(o, l)| serde_json::json!({"offset": o, "length": l})).collect::<Vec<_>>(),
                    }))?
                ),
                Output::Human => {
                    println!(
                        "bitmap {} of {}: {}",
                        a.name,
                        a.target,
                        if valid { "valid" } else { "INVALID" }
                    );
                    for (o, l) in ranges {
                        println!("  {o:>16} +{l}");
                    }
                }
            }
        }
        BitmapCommand::Clear(a) => {
            set.clear(&a.name)?;
            done(format!("Bitmap {} of {} cleared", a.name, a.target))?;
        }
        BitmapCommand::Remove(a) => {
            set.remove(&a.name)?;
            done(format!("Bitmap {} removed from {}", a.name, a.target))?;
        }
        BitmapCommand::Merge(a) => {
            set.merge(&a.source, &a.into)?;
            done(format!("Bitmap {} merged into {}", a.source, a.into))?;
        }
    }
    Ok(())
}

/// `strata image bitmap …`: the bitmaps of an image file — inside a qcow2 (version 3) image,
/// as enabled persistent bitmaps QEMU sees too, else in its sidecar `IMAGE.bitmaps` — updated
/// by whatever opens the image through Strata with its bitmaps (`strata vm run`, NBD exports,
/// the appliance). Writes by other tools (convert -n, bench -w, or qemu to a sidecar) are not
/// recorded.
pub fn run_image(cmd: BitmapCommand) -> anyhow::Result<std::process::ExitCode> {
    let path = std::path::PathBuf::from(cmd.target());
    let open = |read_only: bool| {
        let opts = strata_storage::format::OpenOptions {
            read_only,
            ..Default::default()
        };
        strata_storage::format::open_image(&path, &opts)
            .with_context(|| format!("Could not open {}", path.display()))
    };
    let mut device: Arc<dyn BlockDevice> = open(true)?;
    let changes = !matches!(cmd, BitmapCommand::List(_) | BitmapCommand::Show(_));
    if changes && device.persistent_bitmaps().is_some() {
        // The bitmaps are changed inside the image: it is opened for writing.
        drop(device);
        device = open(false)?;
    }
    let bitmaps = strata_storage::bitmap::ImageBitmaps::open_on(&device, &path)?;
    run(&cmd, &bitmaps.set)?;
    if bitmaps.set.in_image() && changes {
        // Writes the bits back and clears the in-use flags the writable open set.
        bitmaps.set.save()?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}

//! `strata image check`: qemu-img check's findings, repairs and exit codes (0 clean, 1 check not
//! completed, 2 corruptions, 3 leaks only).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use strata_storage::format::qcow2::check::{CheckReport, Repair};
use strata_storage::format::{self, ImageFormat};

use super::Output;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RepairArg {
    /// Fix leaked clusters.
    Leaks,
    /// Fix leaks and corruptions.
    All,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Repair what is found.
    #[arg(short = 'r', long = "repair", value_enum)]
    repair: Option<RepairArg>,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// Image format (probed when omitted; a fixed VHD needs `-f vhd`).
    #[arg(short = 'f', long = "format", value_enum)]
    format: Option<super::image::FormatArg>,
    /// The image (qcow2, vmdk, vhd or vhdx).
    file: PathBuf,
}

pub fn run(a: CheckArgs) -> anyhow::Result<ExitCode> {
    let repair = match a.repair {
        None => Repair::None,
        Some(RepairArg::Leaks) => Repair::Leaks,
        Some(RepairArg::All) => Repair::All,
    };
    let report = match check_any(&a.file, a.format.map(Into::into), repair) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("strata: {e:#}");
            eprintln!("Check not completed");
            return Ok(ExitCode::from(1));
        }
    };
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Human => print_human(&report),
    }
    Ok(ExitCode::from(report.exit_code()))
}

/// Checks a qcow2, vmdk, VHD or VHDX image; raw images have nothing to check.
fn check_any(
    file: &std::path::Path,
    format: Option<ImageFormat>,
    repair: Repair,
) -> anyhow::Result<CheckReport> {
    Ok(format::check::check_file(file, format, repair)?)
}

fn print_human(r: &CheckReport) {
    for m in &r.messages {
        eprintln!("{m}");
    }
    if r.leaks_fixed + r.corruptions_fixed > 0 {
        println!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n",
            r.leaks_fixed, r.corruptions_fixed
        );
    }
    match r.exit_code() {
        0 => println!("No errors were found on the image."),
        1 => println!("{} internal errors occurred during the check.", r.check_errors),
        2 => println!(
            "{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
            r.corruptions
        ),
        _ => println!(
            "{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
            r.leaks
        ),
    }
    if r.total_clusters > 0 {
        let pct = |n: u64| n as f64 * 100.0 / r.total_clusters.max(1) as f64;
        println!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters),
            r.fragmented_clusters as f64 * 100.0 / r.allocated_clusters.max(1) as f64,
            r.compressed_clusters as f64 * 100.0 / r.allocated_clusters.max(1) as f64
        );
    }
    if r.format != "vmdk" {
        println!("Image end offset: {}", r.image_end_offset);
    }
}

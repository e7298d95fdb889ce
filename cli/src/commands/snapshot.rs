//! `strata image snapshot`: list, create, apply and delete internal snapshots of qcow2 images.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{ArgGroup, Args};
use strata_storage::util::format_size;

use super::qcow2_util::open_qcow2;

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("action").required(true).args(["list", "create", "apply", "delete"])))]
pub struct SnapshotArgs {
    /// List the snapshots.
    #[arg(short = 'l', long)]
    list: bool,
    /// Create a snapshot with this name.
    #[arg(short = 'c', long, value_name = "NAME")]
    create: Option<String>,
    /// Revert the image to this snapshot (ID or name).
    #[arg(short = 'a', long, value_name = "NAME")]
    apply: Option<String>,
    /// Delete this snapshot (ID or name).
    #[arg(short = 'd', long, value_name = "NAME")]
    delete: Option<String>,
    /// The qcow2 image.
    file: PathBuf,
}

pub fn run(a: SnapshotArgs) -> anyhow::Result<ExitCode> {
    let img = open_qcow2(&a.file, !a.list)?;
    let name = a.file.display();
    if let Some(n) = &a.create {
        img.snapshot_create(n)
            .with_context(|| format!("Could not create snapshot '{n}' in {name}"))?;
    } else if let Some(n) = &a.apply {
        img.snapshot_apply(n)
            .with_context(|| format!("Could not apply snapshot '{n}' to {name}"))?;
    } else if let Some(n) = &a.delete {
        img.snapshot_delete(n)
            .with_context(|| format!("Could not delete snapshot '{n}' from {name}"))?;
    } else {
        let snaps = img.snapshots();
        println!("Snapshot list:");
        println!(
            "{:<8}{:<24}{:>10}  {:<20}{:>14}",
            "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK"
        );
        for s in snaps {
            let secs = s.vm_clock_nsec / 1_000_000_000;
            println!(
                "{:<8}{:<24}{:>10}  {:<20}{:>14}",
                s.id,
                s.name,
                format_size(s.vm_state_size),
                date(s.date_sec),
                format!(
                    "{:02}:{:02}:{:02}.{:03}",
                    secs / 3600,
                    secs / 60 % 60,
                    secs % 60,
                    s.vm_clock_nsec / 1_000_000 % 1000
                )
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `YYYY-MM-DD hh:mm:ss` in UTC from seconds since the epoch.
fn date(secs: u32) -> String {
    let days = i64::from(secs / 86_400);
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(super::date(0), "1970-01-01 00:00:00");
        assert_eq!(super::date(1_700_000_000), "2023-11-14 22:13:20");
    }
}

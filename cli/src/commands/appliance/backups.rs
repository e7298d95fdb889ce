//! `strata backups …`: the appliance's snapshots in its datastores (list, create, restore,
//! verify, prune, gc), the datastores themselves, their keys, and sync between them.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::json;

use super::backup_stores;
use super::print::{print_array, print_object, Column};
use super::{encode, finish_job, run_job, Api, Common, JobArgs};

#[derive(Debug, Subcommand)]
pub enum BackupsCommand {
    /// List snapshots in the appliance's datastore.
    List {
        /// Only this group, e.g. volume/strata/vm-100-disk-0.
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        store: StoreName,
        #[command(flatten)]
        common: Common,
    },
    /// Back up a volume (lv:VG/NAME) or image (image:NAME) (a job).
    Create {
        /// Source.
        source: String,
        /// Snapshot group (default derived from the source).
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        store: StoreName,
        #[command(flatten)]
        job: JobArgs,
    },
    /// Restore a snapshot (or a group's latest) to a new image (image:NAME) or onto a volume
    /// (lv:VG/NAME) (a job).
    Restore {
        /// Snapshot ID/TIME or group ID.
        snapshot: String,
        /// Target.
        target: String,
        /// Format of a new image (default raw).
        #[arg(short = 'O', long)]
        format: Option<String>,
        /// Live restore onto a volume: usable at once (VMs, `strata vm run`, `strata nbd
        /// serve`), chunks fetched as they are read and the rest copied in the background.
        /// Without --remote, --no-wait only sets it up and the copy runs wherever the volume
        /// is opened next.
        #[arg(long)]
        live: bool,
        /// Workers fetching, checking and writing chunks (default four per core).
        #[arg(long)]
        workers: Option<usize>,
        #[command(flatten)]
        store: StoreName,
        #[command(flatten)]
        job: JobArgs,
    },
    /// Verify one snapshot, or all (a job).
    Verify {
        /// Snapshot or group; all when absent.
        snapshot: Option<String>,
        #[command(flatten)]
        store: StoreName,
        #[command(flatten)]
        job: JobArgs,
    },
    /// Remove snapshots no keep rule selects.
    Prune {
        /// Groups to prune (all when none are given).
        ids: Vec<String>,
        /// Keep this many newest snapshots.
        #[arg(long, default_value_t = 0)]
        keep_last: usize,
        /// Keep one per day for this many days.
        #[arg(long, default_value_t = 0)]
        keep_daily: usize,
        /// Keep one per week for this many weeks.
        #[arg(long, default_value_t = 0)]
        keep_weekly: usize,
        /// Keep one per month for this many months.
        #[arg(long, default_value_t = 0)]
        keep_monthly: usize,
        /// Only say what would be removed.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        store: StoreName,
        #[command(flatten)]
        common: Common,
    },
    /// Remove chunks no snapshot references (a job).
    Gc {
        #[command(flatten)]
        store: StoreName,
        #[command(flatten)]
        job: JobArgs,
    },
    /// The datastores: the appliance's own (`local`), local folders, S3 buckets.
    #[command(subcommand)]
    Store(backup_stores::StoreCommand),
    /// Encryption keys.
    #[command(subcommand)]
    Key(crate::commands::backup_stores::KeyCommand),
    /// Copy snapshots from one datastore to another, transferring only missing chunks (a job).
    Sync {
        /// Source datastore.
        #[arg(long)]
        from: String,
        /// Target datastore.
        #[arg(long)]
        to: String,
        /// Only these snapshots: ID/TIME, a group ID, or a group prefix ending in '/'.
        #[arg(long)]
        snapshots: Vec<String>,
        #[command(flatten)]
        job: JobArgs,
    },
}

/// Which backup datastore.
#[derive(Debug, Args)]
pub struct StoreName {
    /// The datastore (default: the appliance's own, `local`).
    #[arg(long = "store")]
    store: Option<String>,
}

const BACKUP_COLUMNS: &[Column] = &[
    Column::text("SNAPSHOT", "snapshot"),
    Column::size("SIZE", "manifest.size"),
    Column::text("SOURCE", "manifest.source"),
];

/// Runs a `backups` command.
pub fn backups(cmd: BackupsCommand, api: &Api) -> anyhow::Result<ExitCode> {
    match cmd {
        BackupsCommand::List { id, store, common } => {
            let mut q = Vec::new();
            if let Some(id) = id {
                q.push(format!("id={}", encode(&id)));
            }
            if let Some(s) = &store.store {
                q.push(format!("store={}", encode(s)));
            }
            let path = if q.is_empty() {
                "/api/backups".to_string()
            } else {
                format!("/api/backups?{}", q.join("&"))
            };
            let v = api.ok("GET", &path, None)?;
            print_array(&v, common.output, BACKUP_COLUMNS);
        }
        BackupsCommand::Create {
            source,
            id,
            store,
            job,
        } => {
            return run_job(
                api,
                "/api/backups",
                &json!({"source": source, "id": id, "store": store.store}),
                &job,
            );
        }
        BackupsCommand::Restore {
            snapshot,
            target,
            format,
            live,
            workers,
            store,
            job,
        } => {
            let mut body = json!({"snapshot": snapshot, "target": target, "format": format,
                                  "workers": workers, "store": store.store});
            if live {
                body["live"] = true.into();
                if job.no_wait && matches!(api, Api::Local { .. }) {
                    // A job run here ends with this command: set the restore up only; the
                    // volume's next opener runs the copy.
                    body["copy"] = false.into();
                    let started = api.ok("POST", "/api/backups/restore", Some(&body))?;
                    let local = JobArgs {
                        no_wait: false,
                        quiet: true,
                        common: Common {
                            output: job.common.output,
                        },
                    };
                    return finish_job(api, started, &local);
                }
            }
            return run_job(api, "/api/backups/restore", &body, &job);
        }
        BackupsCommand::Verify {
            snapshot,
            store,
            job,
        } => {
            return run_job(
                api,
                "/api/backups/verify",
                &json!({"snapshot": snapshot, "store": store.store}),
                &job,
            );
        }
        BackupsCommand::Prune {
            ids,
            keep_last,
            keep_daily,
            keep_weekly,
            keep_monthly,
            dry_run,
            store,
            common,
        } => {
            let body = json!({"ids": ids, "keep_last": keep_last, "keep_daily": keep_daily,
                              "keep_weekly": keep_weekly, "keep_monthly": keep_monthly,
                              "dry_run": dry_run, "store": store.store});
            let v = api.ok("POST", "/api/backups/prune", Some(&body))?;
            print_object(&v, common.output, "");
        }
        BackupsCommand::Gc { store, job } => {
            return run_job(api, "/api/backups/gc", &json!({"store": store.store}), &job)
        }
        BackupsCommand::Store(cmd) => return backup_stores::store(cmd, api),
        BackupsCommand::Key(cmd) => return crate::commands::backup_stores::key_command(cmd),
        BackupsCommand::Sync {
            from,
            to,
            snapshots,
            job,
        } => return backup_stores::sync(api, from, to, snapshots, &job),
    }
    Ok(ExitCode::SUCCESS)
}

//! Commands for what the appliance manages — `volumes`, `images`, `backups`, `storage`,
//! `jobs` — in the shape of the HTTP API. With `--remote URL --token T` they talk to a running
//! `strata serve`; without, they run the same router in-process on the local data directory.
//!
//! The singular commands (`lv`, `image`, `backup`, ...) are the low-level tools on devices and
//! files you name; these plural ones work on the appliance's own volume groups, image folder
//! and datastore, exactly as API clients see them.

mod backup_stores;
mod backups;
mod client;
mod exports;
mod networks;
mod print;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

pub use backups::{backups, BackupsCommand};
pub use client::{encode, Api};
pub use exports::{exports, ExportsCommand};
pub use networks::{networks, NetworksCommand};
use print::{print_array, print_list, print_object, Column};

use super::Output;

/// Output and waiting options shared by the appliance commands.
#[derive(Debug, Args)]
pub struct Common {
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
}

/// Options of commands that start a job.
#[derive(Debug, Args)]
pub struct JobArgs {
    /// Print the job and return at once instead of following it to its end.
    #[arg(long)]
    no_wait: bool,
    /// No progress bar.
    #[arg(short, long)]
    quiet: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Subcommand)]
pub enum VolumesCommand {
    /// List volumes (of one group, or all).
    List {
        /// Only this volume group.
        vg: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Show one volume.
    Show {
        /// VG/NAME.
        volume: String,
        #[command(flatten)]
        common: Common,
    },
    /// Create a volume: thin in a pool (default the group's pool `data`), or linear with --linear.
    Create {
        /// Virtual size, e.g. 32G.
        #[arg(long)]
        size: String,
        /// Thin pool in the same group.
        #[arg(long, default_value = "data", conflicts_with = "linear")]
        pool: String,
        /// A linear (fully allocated) volume instead of a thin one.
        #[arg(long)]
        linear: bool,
        /// VG/NAME of the new volume.
        volume: String,
        #[command(flatten)]
        common: Common,
    },
    /// Remove a volume (its snapshots and clones stay).
    Remove {
        /// VG/NAME.
        volume: String,
    },
    /// Change a volume's size.
    Resize {
        /// New size, e.g. 64G.
        #[arg(long)]
        size: String,
        /// Allow a smaller size: the data past the new end is lost.
        #[arg(long)]
        shrink: bool,
        /// VG/NAME.
        volume: String,
        #[command(flatten)]
        common: Common,
    },
    /// Take in an image made outside Strata in an RBD group's pool as a volume (admin).
    Adopt {
        /// VG/IMAGE.
        volume: String,
        #[command(flatten)]
        common: Common,
    },
    /// Take a read-only snapshot.
    Snapshot {
        /// VG/NAME of the volume.
        volume: String,
        /// Name of the snapshot.
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Download a volume's contents into a new local raw file.
    Export {
        /// VG/NAME.
        volume: String,
        /// The new file.
        file: PathBuf,
    },
    /// Make a writable clone of a snapshot.
    Clone {
        /// VG/NAME of the snapshot.
        volume: String,
        /// Name of the clone.
        name: String,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Debug, Subcommand)]
pub enum StorageCommand {
    /// Volume groups and thin pools with their usage.
    Show {
        #[command(flatten)]
        common: Common,
    },
    /// Check a volume group's metadata.
    Check {
        /// Volume group.
        vg: String,
        #[command(flatten)]
        common: Common,
    },
    /// Add a volume group on a Ceph RBD pool (admin): its volumes are RBD images.
    CreateRbd {
        /// Name of the new group.
        name: String,
        /// The Ceph configuration file (a server path in an import folder).
        #[arg(long)]
        conf: String,
        /// The Ceph user, without `client.`.
        #[arg(long = "id", default_value = "admin")]
        user: String,
        /// The RBD pool.
        #[arg(long)]
        pool: String,
        /// A keyring file (a server path in an import folder), if the configuration names none.
        #[arg(long)]
        keyring: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Remove a volume group on RBD that holds no volumes (admin; its pool stays).
    Remove {
        /// Volume group.
        vg: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImagesCommand {
    /// List the appliance's images.
    List {
        #[command(flatten)]
        common: Common,
    },
    /// Show one image.
    Show {
        /// Image name.
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Create an empty image.
    Create {
        /// raw, qcow2, vmdk, vhd or vhdx.
        #[arg(short = 'f', long, default_value = "qcow2")]
        format: String,
        /// Format options, as with `strata image create -o`.
        #[arg(short = 'o', long, default_value = "")]
        options: String,
        /// Image name.
        name: String,
        /// Virtual size, e.g. 10G.
        size: String,
        #[command(flatten)]
        common: Common,
    },
    /// Remove an image.
    Remove {
        /// Image name.
        name: String,
    },
    /// State the format of an image put into the image folder by hand (or made before formats
    /// were recorded), after a check; until then it is listed as `unknown` and refused for use.
    /// Needs an admin token.
    Adopt {
        /// Image name.
        name: String,
        /// Its format: raw, qcow2, vmdk, vhd or vhdx.
        #[arg(short = 'f', long)]
        format: String,
        #[command(flatten)]
        common: Common,
    },
    /// Import a disk image file (raw, qcow2, vmdk, vhd or vhdx) from this machine as a new image (a job;
    /// uploaded when --remote).
    Import {
        /// The file.
        file: PathBuf,
        /// Name of the new image.
        name: String,
        /// Format of the new image (default qcow2).
        #[arg(short = 'O', long)]
        format: Option<String>,
        /// Format of the file (default: probed here, from the file's first bytes; the server
        /// is told the result and never probes).
        #[arg(short = 'f', long = "source-format")]
        source_format: Option<String>,
        #[command(flatten)]
        job: JobArgs,
    },
    /// Download an image into a new local file, converted to --format if given.
    Export {
        /// Image name.
        name: String,
        /// The new file.
        file: PathBuf,
        /// raw, qcow2, vmdk, vhd or vhdx (default: the image's own).
        #[arg(short = 'O', long)]
        format: Option<String>,
    },
    /// Convert between the appliance's images and volumes (a job): SOURCE is image:NAME,
    /// lv:VG/NAME or an absolute path on the server; TARGET is image:NAME (new) or lv:VG/NAME
    /// (an existing volume).
    Convert {
        /// Source.
        source: String,
        /// Target.
        target: String,
        /// Format of a new image (default qcow2).
        #[arg(short = 'O', long)]
        format: Option<String>,
        /// Format options of a new image.
        #[arg(short = 'o', long, default_value = "")]
        options: String,
        /// Compress (qcow2, or streamOptimized vmdk).
        #[arg(short = 'c', long)]
        compress: bool,
        #[command(flatten)]
        job: JobArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// List jobs.
    List {
        #[command(flatten)]
        common: Common,
    },
    /// Show a job.
    Show {
        /// Job id.
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Cancel a running job.
    Cancel {
        /// Job id.
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Follow a job to its end.
    Wait {
        /// Job id.
        id: String,
        #[command(flatten)]
        job: JobArgs,
    },
}

const VOLUME_COLUMNS: &[Column] = &[
    Column::text("NAME", "name"),
    Column::text("VG", "vg"),
    Column::text("TYPE", "type"),
    Column::size("SIZE", "size"),
    Column::text("POOL", "pool"),
    Column::text("ORIGIN", "origin"),
];
const IMAGE_COLUMNS: &[Column] = &[
    Column::text("NAME", "name"),
    Column::text("FORMAT", "format"),
    Column::size("SIZE", "virtual_size"),
    Column::size("ALLOCATED", "actual_size"),
];
const JOB_COLUMNS: &[Column] = &[
    Column::text("ID", "id"),
    Column::text("KIND", "kind"),
    Column::text("STATE", "state"),
    Column::percent("PROGRESS", "progress"),
    Column::text("WHAT", "description"),
];
fn split_volume(v: &str) -> anyhow::Result<(String, String)> {
    let v = v.strip_prefix("lv:").unwrap_or(v);
    match v.split_once('/') {
        Some((g, n)) if !g.is_empty() && !n.is_empty() => Ok((encode(g), encode(n))),
        _ => bail!("{v:?} is not VG/NAME"),
    }
}

/// Refuses --no-wait where the job would die with this process.
fn check_no_wait(api: &Api, a: &JobArgs) -> anyhow::Result<()> {
    if a.no_wait && matches!(api, Api::Local { .. }) {
        bail!("--no-wait needs --remote: a job run locally ends when this command does");
    }
    Ok(())
}

/// Starts a job with `method path body` and follows it unless told not to.
fn run_job(api: &Api, path: &str, body: &Value, a: &JobArgs) -> anyhow::Result<ExitCode> {
    check_no_wait(api, a)?;
    let job = api.ok("POST", path, Some(body))?;
    finish_job(api, job, a)
}

fn finish_job(api: &Api, job: Value, a: &JobArgs) -> anyhow::Result<ExitCode> {
    let id = job["id"]
        .as_str()
        .context("the server did not return a job id")?
        .to_string();
    if a.no_wait {
        print_object(&job, a.common.output, &format!("Started job {id}"));
        return Ok(ExitCode::SUCCESS);
    }
    let done = api.wait_job(&id, a.quiet)?;
    print_object(
        &done["result"],
        a.common.output,
        &format!("Job {id} succeeded"),
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs a `volumes` command.
pub fn volumes(cmd: VolumesCommand, api: &Api) -> anyhow::Result<ExitCode> {
    match cmd {
        VolumesCommand::List { vg, common } => {
            let list = api.ok("GET", "/api/volumes", None)?;
            let list: Vec<Value> = list
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|v| vg.as_deref().is_none_or(|g| v["vg"] == g))
                .collect();
            print_list(&list, common.output, VOLUME_COLUMNS);
        }
        VolumesCommand::Show { volume, common } => {
            let (g, n) = split_volume(&volume)?;
            let v = api.ok("GET", &format!("/api/volumes/{g}/{n}"), None)?;
            print_object(&v, common.output, "");
        }
        VolumesCommand::Create {
            size,
            pool,
            linear,
            volume,
            common,
        } => {
            let (g, n) = volume
                .split_once('/')
                .with_context(|| format!("{volume:?} is not VG/NAME"))?;
            let mut body = json!({"vg": g, "name": n, "size": size});
            if !linear {
                body["pool"] = pool.into();
            }
            let v = api.ok("POST", "/api/volumes", Some(&body))?;
            print_object(&v, common.output, &format!("Created {volume}"));
        }
        VolumesCommand::Remove { volume } => {
            let (g, n) = split_volume(&volume)?;
            api.ok("DELETE", &format!("/api/volumes/{g}/{n}"), None)?;
            println!("Removed {volume}");
        }
        VolumesCommand::Resize {
            size,
            shrink,
            volume,
            common,
        } => {
            let (g, n) = split_volume(&volume)?;
            let v = api.ok(
                "POST",
                &format!("/api/volumes/{g}/{n}/resize"),
                Some(&json!({"size": size, "shrink": shrink})),
            )?;
            print_object(&v, common.output, &format!("Resized {volume}"));
        }
        VolumesCommand::Adopt { volume, common } => {
            let (g, n) = split_volume(&volume)?;
            let v = api.ok(
                "POST",
                &format!("/api/volumes/{g}/adopt"),
                Some(&json!({"image": n})),
            )?;
            print_object(&v, common.output, &format!("Adopted {volume}"));
        }
        VolumesCommand::Snapshot {
            volume,
            name,
            common,
        } => {
            let (g, n) = split_volume(&volume)?;
            let v = api.ok(
                "POST",
                &format!("/api/volumes/{g}/{n}/snapshot"),
                Some(&json!({"name": name})),
            )?;
            print_object(
                &v,
                common.output,
                &format!("Snapshot {name} of {volume} taken"),
            );
        }
        VolumesCommand::Export { volume, file } => {
            let (g, n) = split_volume(&volume)?;
            api.download(&format!("/api/volumes/{g}/{n}/download"), &file)?;
            println!("Wrote {}", file.display());
        }
        VolumesCommand::Clone {
            volume,
            name,
            common,
        } => {
            let (g, n) = split_volume(&volume)?;
            let v = api.ok(
                "POST",
                &format!("/api/volumes/{g}/{n}/clone"),
                Some(&json!({"name": name})),
            )?;
            print_object(&v, common.output, &format!("Cloned {volume} as {name}"));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs a `storage` command.
pub fn storage(cmd: StorageCommand, api: &Api) -> anyhow::Result<ExitCode> {
    match cmd {
        StorageCommand::Show { common } => {
            let v = api.ok("GET", "/api/storage", None)?;
            print_object(&v, common.output, "");
        }
        StorageCommand::Check { vg, common } => {
            let v = api.ok("POST", &format!("/api/storage/{}/check", encode(&vg)), None)?;
            print_object(&v, common.output, "");
        }
        StorageCommand::CreateRbd {
            name,
            conf,
            user,
            pool,
            keyring,
            common,
        } => {
            let body = json!({"name": name, "conf": conf, "user": user, "pool": pool,
                              "keyring": keyring});
            let v = api.ok("POST", "/api/storage/rbd", Some(&body))?;
            print_object(
                &v,
                common.output,
                &format!("Added volume group {name} on RBD"),
            );
        }
        StorageCommand::Remove { vg } => {
            api.ok("DELETE", &format!("/api/storage/{}", encode(&vg)), None)?;
            println!("Removed volume group {vg}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs an `images` command.
pub fn images(cmd: ImagesCommand, api: &Api) -> anyhow::Result<ExitCode> {
    match cmd {
        ImagesCommand::List { common } => {
            let v = api.ok("GET", "/api/images", None)?;
            print_array(&v, common.output, IMAGE_COLUMNS);
        }
        ImagesCommand::Show { name, common } => {
            let v = api.ok("GET", &format!("/api/images/{}", encode(&name)), None)?;
            print_object(&v, common.output, "");
        }
        ImagesCommand::Create {
            format,
            options,
            name,
            size,
            common,
        } => {
            let body = json!({"name": name, "format": format, "size": size, "options": options});
            let v = api.ok("POST", "/api/images", Some(&body))?;
            print_object(&v, common.output, &format!("Created image {name}"));
        }
        ImagesCommand::Remove { name } => {
            api.ok("DELETE", &format!("/api/images/{}", encode(&name)), None)?;
            println!("Removed image {name}");
        }
        ImagesCommand::Adopt {
            name,
            format,
            common,
        } => {
            let v = api.ok(
                "POST",
                &format!("/api/images/{}/adopt", encode(&name)),
                Some(&json!({ "format": format })),
            )?;
            print_object(
                &v,
                common.output,
                &format!("Adopted image {name} as {format}"),
            );
        }
        ImagesCommand::Import {
            file,
            name,
            format,
            source_format,
            job,
        } => {
            check_no_wait(api, &job)?;
            let source_format = match source_format {
                Some(f) => f,
                None => probe_local_file(&file)?,
            };
            let started = api.import_file(&file, &name, format.as_deref(), &source_format)?;
            return finish_job(api, started, &job);
        }
        ImagesCommand::Export { name, file, format } => {
            let mut path = format!("/api/images/{}/download", encode(&name));
            if let Some(f) = format {
                path.push_str(&format!("?format={}", encode(&f)));
            }
            api.download(&path, &file)?;
            println!("Wrote {}", file.display());
        }
        ImagesCommand::Convert {
            source,
            target,
            format,
            options,
            compress,
            job,
        } => {
            let mut body = json!({"source": source, "target": target, "options": options,
                                  "compress": compress});
            if let Some(f) = format {
                body["format"] = f.into();
            }
            return run_job(api, "/api/convert", &body, &job);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The format of a file of the caller's own, probed from its first bytes as `qemu-img` does.
fn probe_local_file(file: &std::path::Path) -> anyhow::Result<String> {
    use strata_storage::format::{self, Probed};
    let opts = format::OpenOptions {
        read_only: true,
        cache: strata_storage::io::file::CacheMode::Writeback,
        ..Default::default()
    };
    let host = format::open_host_file(file, &opts)
        .with_context(|| format!("Could not open {}", file.display()))?;
    match format::probe(host.as_ref())? {
        Probed::Known(f) => Ok(f.to_string()),
        Probed::Foreign(what) => {
            anyhow::bail!("{}: {what} images are not supported", file.display())
        }
    }
}

/// Runs a `jobs` command.
pub fn jobs(cmd: JobsCommand, api: &Api) -> anyhow::Result<ExitCode> {
    match cmd {
        JobsCommand::List { common } => {
            let v = api.ok("GET", "/api/jobs", None)?;
            print_array(&v, common.output, JOB_COLUMNS);
        }
        JobsCommand::Show { id, common } => {
            let v = api.ok("GET", &format!("/api/jobs/{}", encode(&id)), None)?;
            print_object(&v, common.output, "");
        }
        JobsCommand::Cancel { id, common } => {
            let v = api.ok("DELETE", &format!("/api/jobs/{}", encode(&id)), None)?;
            print_object(&v, common.output, &format!("Asked job {id} to stop"));
        }
        JobsCommand::Wait { id, job } => {
            let done = api.wait_job(&id, job.quiet)?;
            print_object(
                &done["result"],
                job.common.output,
                &format!("Job {id} succeeded"),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

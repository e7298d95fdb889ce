//! The command-line interface: argument definitions and dispatch. Each command group lives in its
//! own module and calls the storage layer; no command keeps logic of its own that a library
//! should hold.

mod appliance;
mod backup;
mod backup_stores;
mod bench;
mod bitmap;
mod check;
mod commit;
mod compare;
mod convert;
mod image;
mod import_ova;
mod install;
pub mod interrupt;
mod lv;
mod map;
mod nbd;
mod pv;
mod qcow2_util;
mod rebase;
mod resize;
mod serve;
mod snapshot;
mod vg;
mod vhost_user;
mod vm;
mod vm_manage;

use std::process::ExitCode;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use strata_service::DataDir;

/// Strata: storage-centric virtualization. Images, volumes, backups and VMs.
#[derive(Debug, Parser)]
#[command(name = "strata", version, about, propagate_version = true)]
pub struct Cli {
    /// Log more (-v: info, -vv: debug, -vvv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Strata's data directory (default: $STRATA_DATA, else /var/lib/strata).
    #[arg(long, global = true, value_name = "DIR")]
    pub data: Option<PathBuf>,

    /// Send appliance commands (volumes, images, backups, storage, jobs) to a running
    /// `strata serve` at this URL (https://HOST:PORT) instead of working on --data.
    #[arg(long, global = true, env = "STRATA_REMOTE", value_name = "URL")]
    pub remote: Option<String>,

    /// API token for --remote.
    #[arg(
        long,
        global = true,
        env = "STRATA_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,

    /// For an https:// --remote: the SHA-256 fingerprint of the server's certificate, as
    /// `strata serve` prints it (AB:CD:…).
    #[arg(long, global = true, env = "STRATA_FINGERPRINT", value_name = "SHA256")]
    pub fingerprint: Option<String>,

    /// For an https:// --remote: trust server certificates issued by the CAs in this PEM file
    /// (the appliance's own CA is the server's DATA/tls/ca.pem).
    #[arg(
        long,
        global = true,
        env = "STRATA_CA",
        value_name = "FILE",
        conflicts_with = "fingerprint"
    )]
    pub ca: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Work with image files: create, info, bench.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Back up and restore images and volumes: create, restore, list, show, verify, prune, gc.
    #[command(subcommand)]
    Backup(backup::BackupCommand),
    /// Run virtual machines under Strata's KVM VMM.
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Serve a disk to QEMU or Cloud Hypervisor as a vhost-user-blk back-end.
    VhostUserBlk(vhost_user::VhostUserArgs),
    /// Serve volumes, snapshots, images and backups over NBD.
    #[command(subcommand)]
    Nbd(nbd::NbdCommand),
    /// Serve the HTTP API (setting up an empty data directory first).
    Serve(serve::ServeArgs),
    /// Set up an empty data directory: default volume group, thin pool, first API token.
    Init(serve::InitArgs),
    /// Install the Strata appliance onto a disk (run from the Strata ISO).
    Install(install::InstallArgs),
    /// Manage API tokens.
    #[command(subcommand)]
    Token(serve::TokenCommand),
    /// The appliance's volumes (local, or on a server with --remote).
    #[command(subcommand)]
    Volumes(appliance::VolumesCommand),
    /// The appliance's image folder: list, import, export, convert (local or --remote).
    #[command(subcommand)]
    Images(appliance::ImagesCommand),
    /// The appliance's backup datastore (local or --remote).
    #[command(subcommand)]
    Backups(appliance::BackupsCommand),
    /// The appliance's volume groups and pools (local or --remote).
    #[command(subcommand)]
    Storage(appliance::StorageCommand),
    /// Long-running operations (local or --remote).
    #[command(subcommand)]
    Jobs(appliance::JobsCommand),
    /// NBD exports of volumes, snapshots, images and backups (served by `strata serve`).
    #[command(subcommand)]
    Exports(appliance::ExportsCommand),
    /// Networks: the bridges VMs' NICs join (local or --remote).
    #[command(subcommand)]
    Networks(appliance::NetworksCommand),
    /// Physical volumes: create, list, remove.
    #[command(subcommand)]
    Pv(pv::PvCommand),
    /// Volume groups: create, list, show, extend, reduce, remove, check.
    #[command(subcommand)]
    Vg(vg::VgCommand),
    /// Logical volumes: linear, thin pools, thin volumes, snapshots, clones.
    #[command(subcommand)]
    Lv(lv::LvCommand),
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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

static DATA_DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// The data directory chosen on the command line (`--data`, `$STRATA_DATA`, or the default),
/// for commands that reach volumes through a source name (`lv:VG/NAME`).
pub fn data_dir() -> std::path::PathBuf {
    DATA_DIR
        .get()
        .cloned()
        .unwrap_or_else(|| strata_storage::volume::resolve_data_dir(None))
}

/// The device to use for `source` (opened from `spec`): a volume under live restore comes back
/// as the live-restore device, whose workers continue the copy while this command has it open
/// (see `strata_backup::live`); a volume holding an unfinished plain restore is refused.
pub fn live_restore_device(
    source: &strata_storage::source::Source,
    spec: &str,
) -> anyhow::Result<std::sync::Arc<dyn strata_storage::BlockDevice>> {
    use strata_backup::live::{wrap_source, LiveOptions, Wrapped};
    let wrapped = wrap_source(source, &data_dir(), LiveOptions::default())
        .map_err(|e| anyhow::anyhow!("Could not open {spec}: {e}"))?;
    if let Wrapped::Live(live) = &wrapped {
        let st = live.status();
        eprintln!(
            "strata: {spec} is under live restore from {}: {} of {} chunks restored; the rest              is fetched as it is read and copied in the background while it is open",
            st.snapshot, st.chunks_done, st.chunks_total
        );
    }
    Ok(wrapped.device())
}

/// Refuses `spec` if it names a volume with an unfinished restore: the tools that open volumes
/// by themselves (convert) would see it partly restored.
pub fn refuse_volume_under_restore(spec: &str) -> anyhow::Result<()> {
    let Some((vg, lv)) = spec
        .strip_prefix(strata_storage::source::LV_PREFIX)
        .and_then(|s| s.split_once('/'))
    else {
        return Ok(());
    };
    let paths = strata_backup::live::RestorePaths::of(&data_dir(), vg, lv);
    if let Some(rec) = paths.read()? {
        anyhow::bail!(
            "{spec} is being restored from {} and is not whole yet; use it through `strata nbd \
             serve` or `strata vm run` (a live restore), or wait for the restore to end",
            rec.snapshot
        );
    }
    Ok(())
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let data_path = strata_storage::volume::resolve_data_dir(cli.data.as_deref());
    let _ = DATA_DIR.set(data_path.clone());
    let data = DataDir::at(&data_path);
    let api = || match &cli.remote {
        Some(url) => {
            let trust = match (&cli.fingerprint, &cli.ca) {
                (Some(fp), _) => Some(strata_api::client::Trust::Fingerprint(fp.clone())),
                (None, Some(ca)) => Some(strata_api::client::Trust::CaFile(ca.clone())),
                (None, None) => None,
            };
            appliance::Api::remote(url, cli.token.clone(), trust)
        }
        None => appliance::Api::local(data.clone()),
    };
    let remote_only_for_appliance = |what: &str| -> anyhow::Result<()> {
        if cli.remote.is_some() {
            anyhow::bail!(
                "`strata {what}` works on this machine's files and devices; with --remote use \
                 the appliance commands (volumes, images, backups, storage, jobs)"
            );
        }
        Ok(())
    };
    match &cli.command {
        Command::Volumes(_)
        | Command::Images(_)
        | Command::Backups(_)
        | Command::Storage(_)
        | Command::Jobs(_)
        | Command::Exports(_)
        | Command::Networks(_) => {}
        Command::Image(_) => remote_only_for_appliance("image")?,
        Command::Backup(_) => remote_only_for_appliance("backup")?,
        Command::Vm(vm::VmCommand::Run(_)) => remote_only_for_appliance("vm run")?,
        Command::Vm(_) => {}
        Command::VhostUserBlk(_) => remote_only_for_appliance("vhost-user-blk")?,
        Command::Nbd(_) => remote_only_for_appliance("nbd")?,
        Command::Serve(_) => remote_only_for_appliance("serve")?,
        Command::Init(_) => remote_only_for_appliance("init")?,
        Command::Token(_) => remote_only_for_appliance("token")?,
        Command::Pv(_) => remote_only_for_appliance("pv")?,
        Command::Vg(_) => remote_only_for_appliance("vg")?,
        Command::Lv(_) => remote_only_for_appliance("lv")?,
        Command::Install(_) => remote_only_for_appliance("install")?,
    }
    match cli.command {
        Command::Volumes(cmd) => appliance::volumes(cmd, &api()?),
        Command::Images(cmd) => appliance::images(cmd, &api()?),
        Command::Backups(cmd) => appliance::backups(cmd, &api()?),
        Command::Storage(cmd) => appliance::storage(cmd, &api()?),
        Command::Jobs(cmd) => appliance::jobs(cmd, &api()?),
        Command::Exports(cmd) => appliance::exports(cmd, &api()?),
        Command::Networks(cmd) => appliance::networks(cmd, &api()?),
        Command::Image(cmd) => image::run(cmd),
        Command::Backup(cmd) => backup::run(cmd),
        Command::Vm(cmd) => vm::run(cmd, &api),
        Command::VhostUserBlk(args) => vhost_user::run(args),
        Command::Nbd(cmd) => nbd::run(cmd),
        Command::Serve(a) => serve::serve(a, data),
        Command::Init(a) => serve::init(a, data),
        Command::Token(cmd) => serve::token(cmd, data),
        Command::Install(a) => install::run(a),
        Command::Pv(cmd) => pv::run(cmd, &data_path),
        Command::Vg(cmd) => vg::run(cmd, &data_path),
        Command::Lv(cmd) => lv::run(cmd, &data_path),
    }
}

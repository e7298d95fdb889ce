//! `strata vhost-user-blk`: serve a disk to QEMU or Cloud Hypervisor over vhost-user.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use strata_vmm::blk::BlkConfig;

use super::vm::DiskArg;

#[derive(Debug, Args)]
pub struct VhostUserArgs {
    /// The vhost-user socket to listen on (created; an old one is replaced).
    #[arg(long)]
    socket: PathBuf,
    /// The disk: SOURCE[,format=raw|qcow2|vmdk|vhd|vhdx][,readonly=on][,queues=N][,serial=ID], where
    /// SOURCE is an image file or a volume `lv:VG/NAME`.
    #[arg(long)]
    disk: String,
}

pub fn run(args: VhostUserArgs) -> anyhow::Result<ExitCode> {
    let disk = DiskArg::parse(&args.disk)?;
    let (spec, _source) = disk.open()?;
    let cfg = BlkConfig::new(spec.device, &spec.options)
        .map_err(|e| anyhow::anyhow!("{}: {e}", spec.name))?;
    strata_vmm::vhost_user::serve(Arc::new(cfg), &args.socket)
        .with_context(|| format!("serving {} on {}", spec.name, args.socket.display()))?;
    Ok(ExitCode::SUCCESS)
}

//! `strata vm …`: `run` boots a Linux guest from the command line, with disks and kernel given
//! there (in this process, unsandboxed: the low-level tool), or, with `--config FILE
//! --api-socket PATH`, is the sandboxed VMM process of an appliance VM (see
//! `strata_vmm::process`); `define`, `list`, `status`, `start`, `stop`, `console` and `remove`
//! manage the appliance's VMs through the API's routes (see [`super::vm_manage`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use strata_storage::format::{ImageFormat, OpenOptions};
use strata_storage::source::{open_source, Source};
use strata_storage::util::parse_size;
use strata_vmm::blk::config::DEFAULT_POLL;
use strata_vmm::blk::DiskOptions;
use strata_vmm::kvm::VcpuExitReason;
use strata_vmm::vm::{DiskSpec, Payload, VmConfig};

use super::appliance::Api;

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Boot a Linux kernel (bzImage) with virtio-blk disks.
    Run(RunArgs),
    /// Define, list, start, stop, watch and remove the appliance's VMs (local or --remote).
    #[command(flatten)]
    Manage(super::vm_manage::ManageCommand),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Run as the VMM process of an appliance VM, as its supervisor configured it in FILE
    /// (`vmm.json` in the VM's folder; written by `strata serve` or `strata vm start`).
    #[arg(long, value_name = "FILE", requires = "api_socket", conflicts_with_all = ["kernel", "disks", "serial"])]
    config: Option<PathBuf>,
    /// With --config: the control socket to create.
    #[arg(long, value_name = "PATH", requires = "config")]
    api_socket: Option<PathBuf>,
    /// The kernel (bzImage, booted through the 64-bit boot protocol).
    #[arg(long, required_unless_present = "config")]
    kernel: Option<PathBuf>,
    /// An initramfs.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// The kernel command line.
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=1")]
    cmdline: String,
    /// Guest memory (K, M, G suffixes).
    #[arg(long, default_value = "512M")]
    memory: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// A disk: SOURCE[,format=raw|qcow2|vmdk|vhd|vhdx][,readonly=on][,queues=N][,serial=ID]
    /// [,poll-max-us=N], where SOURCE is an image file or a volume `lv:VG/NAME`. Repeatable; the
    /// first is /dev/vda. `poll-max-us` is the longest a queue's worker polls before it sleeps
    /// (default 256, 0 never polls, at most 1000).
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// Write the serial console here instead of stdout.
    #[arg(long)]
    serial: Option<PathBuf>,
}

/// A parsed `--disk` argument.
#[derive(Debug, PartialEq, Eq)]
pub struct DiskArg {
    /// The source: an image path or `lv:VG/NAME`.
    pub path: PathBuf,
    /// Its format, probed when absent.
    pub format: Option<ImageFormat>,
    /// Device options.
    pub read_only: bool,
    /// Virtqueues.
    pub queues: u16,
    /// GET_ID string.
    pub serial: String,
    /// The longest a queue's worker polls before it sleeps.
    pub poll_max: Duration,
}

impl DiskArg {
    /// Parses `PATH[,key=value…]`.
    pub fn parse(text: &str) -> anyhow::Result<DiskArg> {
        let mut parts = text.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .context("--disk needs a path")?;
        let mut arg = DiskArg {
            path: PathBuf::from(path),
            format: None,
            read_only: false,
            queues: 1,
            serial: String::new(),
            poll_max: DEFAULT_POLL,
        };
        for part in parts {
            let (k, v) = part
                .split_once('=')
                .with_context(|| format!("--disk option '{part}' is not key=value"))?;
            match k {
                "format" => arg.format = Some(v.parse()?),
                "readonly" => arg.read_only = parse_on_off("readonly", v)?,
                "queues" => {
                    arg.queues = v
                        .parse()
                        .with_context(|| format!("queues={v} is not a number"))?
                }
                "serial" => arg.serial = v.to_string(),
                "poll-max-us" => {
                    let us = v
                        .parse()
                        .with_context(|| format!("poll-max-us={v} is not a number"))?;
                    arg.poll_max = Duration::from_micros(us);
                }
                _ => bail!(
                    "unknown --disk option '{k}' (format, readonly, queues, serial, poll-max-us)"
                ),
            }
        }
        Ok(arg)
    }

    /// Opens the source and builds the device options. Volumes come with their dirty bitmaps
    /// tracking writes (the storage layer wraps them); an image file is tracked when it has
    /// bitmaps (inside a qcow2 v3 image, else a sidecar file). The returned `Source` keeps a
    /// volume's group open and locked.
    pub fn open(&self) -> anyhow::Result<(DiskSpec, Source)> {
        let spec = self.path.to_string_lossy();
        let opts = OpenOptions {
            format: self.format,
            read_only: self.read_only,
            ..OpenOptions::default()
        };
        let source = open_source(&spec, &opts, &super::data_dir())
            .with_context(|| format!("opening {spec}"))?;
        // Images come with their bitmaps attached (writes tracked) by open_source;
        // a volume under live restore is wrapped in its live-restore device.
        let device = super::live_restore_device(&source, &spec)?;
        let disk = DiskSpec {
            name: source.describe(),
            device,
            options: DiskOptions {
                read_only: self.read_only,
                num_queues: self.queues,
                serial: self.serial.clone(),
                poll_max: self.poll_max,
                ..DiskOptions::default()
            },
        };
        Ok((disk, source))
    }
}

pub(super) fn parse_on_off(key: &str, v: &str) -> anyhow::Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => bail!("{key}={v}: expected on or off"),
    }
}

pub fn run(cmd: VmCommand, api: &dyn Fn() -> anyhow::Result<Api>) -> anyhow::Result<ExitCode> {
    match cmd {
        VmCommand::Run(args) => run_vm(args),
        VmCommand::Manage(cmd) => super::vm_manage::run(cmd, &api()?),
    }
}

pub(super) fn warn_if_pvm() {
    if Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!(
            "strata: warning: this host's KVM is PVM (software nested virtualisation); an \
             unmodified Linux kernel does not finish booting under it"
        );
    }
}

fn run_vm(args: RunArgs) -> anyhow::Result<ExitCode> {
    if let (Some(config), Some(socket)) = (&args.config, &args.api_socket) {
        strata_vmm::process::run(config, socket)?;
        return Ok(ExitCode::SUCCESS);
    }
    let Some(kernel) = args.kernel.clone() else {
        bail!("vm run needs --kernel (or --config and --api-socket)");
    };
    let memory = parse_size(&args.memory)?;
    let disks: Vec<DiskArg> = args
        .disks
        .iter()
        .map(|d| DiskArg::parse(d))
        .collect::<Result<_, _>>()?;
    warn_if_pvm();
    // Disks stay open across guest reboots; everything else is built anew each boot.
    let (specs, _sources): (Vec<DiskSpec>, Vec<Source>) = disks
        .iter()
        .map(DiskArg::open)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .unzip();
    loop {
        let serial: Box<dyn Write + Send> = match &args.serial {
            Some(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("opening {}", p.display()))?,
            ),
            None => Box::new(std::io::stdout()),
        };
        let report = strata_vmm::vm::run(VmConfig {
            memory,
            cpus: args.cpus,
            payload: Payload::Linux {
                kernel: kernel.clone(),
                initrd: args.initrd.clone(),
                cmdline: args.cmdline.clone(),
            },
            disks: specs
                .iter()
                .map(|s| DiskSpec {
                    name: s.name.clone(),
                    device: Arc::clone(&s.device),
                    options: s.options.clone(),
                })
                .collect(),
            nets: Vec::new(),
            serial,
            timeout: None,
            kvm: None,
        })?;
        match report.reason {
            VcpuExitReason::Reboot => eprintln!("strata: guest rebooted"),
            VcpuExitReason::Shutdown | VcpuExitReason::Stopped => return Ok(ExitCode::SUCCESS),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_arguments_parse_and_bad_ones_are_refused() {
        let d = DiskArg::parse("/x.qcow2,format=qcow2,readonly=on,queues=4,serial=abc").unwrap();
        assert_eq!(d.path, PathBuf::from("/x.qcow2"));
        assert_eq!(d.format, Some(ImageFormat::Qcow2));
        assert!(d.read_only);
        assert_eq!(d.queues, 4);
        assert_eq!(d.serial, "abc");
        assert!(DiskArg::parse("").is_err());
        assert!(DiskArg::parse("/x,bogus=1").is_err());
        assert!(DiskArg::parse("/x,readonly=maybe").is_err());
        assert!(DiskArg::parse("/x,queues=many").is_err());
    }

    #[test]
    fn a_disk_s_polling_window_is_set_in_microseconds_and_defaults_to_the_device_s() {
        let d = DiskArg::parse("/x,poll-max-us=0").unwrap();
        assert_eq!(d.poll_max, Duration::ZERO);
        let d = DiskArg::parse("/x,poll-max-us=250").unwrap();
        assert_eq!(d.poll_max, Duration::from_micros(250));
        let d = DiskArg::parse("/x").unwrap();
        assert_eq!(d.poll_max, DiskOptions::default().poll_max);
        let e = DiskArg::parse("/x,poll-max-us=-1").unwrap_err();
        assert!(
            format!("{e:#}").contains("poll-max-us=-1 is not a number"),
            "{e:#}"
        );
    }
}

//! `strata vm …`: `run` boots a Linux guest from the command line; `define`, `list`, `status`,
//! `start`, `stop`, `console` and `remove` manage VMs kept in the data directory, through the
//! same service methods as the HTTP API.
//!
//! Without `--remote`, `vm start` runs the VM in this command's process, in the foreground,
//! printing its console until it ends (Ctrl-C or `strata vm stop` from another shell stops it).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use strata_storage::format::{ImageFormat, OpenOptions};
use strata_storage::source::{open_source, Source};
use strata_storage::util::parse_size;
use strata_vmm::blk::DiskOptions;
use strata_vmm::kvm::VcpuExitReason;
use strata_vmm::vm::{DiskSpec, Payload, VmConfig};

use super::Output;
use crate::service::vm_runner::track_image_writes;
use crate::service::vms::{BootKind, ConsoleQuery, DefineVm, VmDisk, VmInfo, VmState};
use crate::service::{DataDir, Service};

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Boot a Linux kernel (bzImage) with virtio-blk disks.
    Run(RunArgs),
    /// Define a VM in the data directory.
    Define(DefineArgs),
    /// List defined VMs with their state.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Show a VM's definition and status.
    Status {
        /// The VM.
        name: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Start a VM and stay with it, printing its console, until it ends (Ctrl-C stops it).
    Start {
        /// The VM.
        name: String,
        /// Do not print the console (it is kept in the console log all the same).
        #[arg(long)]
        quiet: bool,
    },
    /// Stop a running VM (a hard stop: the vCPUs stop, the disks are flushed).
    Stop {
        /// The VM.
        name: String,
    },
    /// Print a VM's serial console log (the current or last run).
    Console {
        /// The VM.
        name: String,
        /// Start at this byte offset.
        #[arg(long, conflicts_with = "tail")]
        offset: Option<u64>,
        /// Only the last this many bytes.
        #[arg(long)]
        tail: Option<u64>,
        /// Keep printing new output while the VM runs.
        #[arg(long, short)]
        follow: bool,
    },
    /// Remove a VM that is not running (its disks stay).
    Remove {
        /// The VM.
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct DefineArgs {
    /// Name of the VM.
    name: String,
    /// The kernel (bzImage), or a freestanding image with --boot flat.
    #[arg(long)]
    kernel: PathBuf,
    /// An initramfs.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// The kernel command line (default: console=ttyS0 reboot=k panic=1).
    #[arg(long)]
    cmdline: Option<String>,
    /// What the kernel is.
    #[arg(long, value_enum, default_value = "linux")]
    boot: BootArg,
    /// Guest memory (K, M, G suffixes).
    #[arg(long, default_value = "512M")]
    memory: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// A disk: SOURCE[,readonly=on][,serial=ID] where SOURCE is lv:VG/NAME or image:NAME.
    /// Repeatable; the first is /dev/vda.
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
}

/// What a defined VM boots.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BootArg {
    /// A Linux bzImage.
    Linux,
    /// A freestanding 64-bit image entered at 1 MiB.
    Flat,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The kernel (bzImage, booted through the 64-bit boot protocol).
    #[arg(long)]
    kernel: PathBuf,
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
    /// A disk: SOURCE[,format=raw|qcow2|vmdk][,readonly=on][,queues=N][,serial=ID], where
    /// SOURCE is an image file or a volume `lv:VG/NAME`. Repeatable; the first is /dev/vda.
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
                _ => bail!("unknown --disk option '{k}' (format, readonly, queues, serial)"),
            }
        }
        Ok(arg)
    }

    /// Opens the source and builds the device options. Volumes come with their dirty bitmaps
    /// tracking writes (the storage layer wraps them); an image file is tracked when it has a
    /// sidecar bitmap file. The returned `Source` keeps a volume's group open and locked.
    pub fn open(&self) -> anyhow::Result<(DiskSpec, Source)> {
        let spec = self.path.to_string_lossy();
        let opts = OpenOptions {
            format: self.format,
            read_only: self.read_only,
            ..OpenOptions::default()
        };
        let source = open_source(&spec, &opts, &super::data_dir())
            .with_context(|| format!("opening {spec}"))?;
        let mut device = source.device();
        if let Source::Image(_) = &source {
            device = track_image_writes(device, &self.path)
                .with_context(|| format!("opening the dirty bitmaps of {spec}"))?;
        }
        let disk = DiskSpec {
            name: source.describe(),
            device,
            options: DiskOptions {
                read_only: self.read_only,
                num_queues: self.queues,
                serial: self.serial.clone(),
                ..DiskOptions::default()
            },
        };
        Ok((disk, source))
    }
}

fn parse_on_off(key: &str, v: &str) -> anyhow::Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => bail!("{key}={v}: expected on or off"),
    }
}

/// Parses a defined VM's `--disk SOURCE[,readonly=on][,serial=ID]`.
fn parse_vm_disk(text: &str) -> anyhow::Result<VmDisk> {
    let mut parts = text.split(',');
    let source = parts
        .next()
        .filter(|p| !p.is_empty())
        .context("--disk needs a source (lv:VG/NAME or image:NAME)")?;
    let mut disk = VmDisk {
        source: source.to_string(),
        readonly: false,
        serial: String::new(),
    };
    for part in parts {
        match part.split_once('=') {
            Some(("readonly", v)) => disk.readonly = parse_on_off("readonly", v)?,
            Some(("serial", v)) => disk.serial = v.to_string(),
            _ => bail!("--disk option '{part}' is not readonly=on|off or serial=ID"),
        }
    }
    Ok(disk)
}

/// An absolute spelling of a path given on the command line (the service wants absolute
/// paths on the server, which is this machine).
fn absolute(p: &Path) -> anyhow::Result<String> {
    Ok(std::path::absolute(p)
        .with_context(|| format!("resolving {}", p.display()))?
        .to_string_lossy()
        .into_owned())
}

pub fn run(cmd: VmCommand, data: DataDir) -> anyhow::Result<ExitCode> {
    // `vm run` needs no data directory; the other commands open the services on it.
    let open = || Service::open(data.clone());
    match cmd {
        VmCommand::Run(args) => return run_vm(args),
        VmCommand::Define(a) => {
            let req = DefineVm {
                name: a.name,
                memory: a.memory,
                vcpus: a.vcpus,
                boot: match a.boot {
                    BootArg::Linux => BootKind::Linux,
                    BootArg::Flat => BootKind::Flat,
                },
                kernel: absolute(&a.kernel)?,
                initrd: a.initrd.as_deref().map(absolute).transpose()?,
                cmdline: a.cmdline,
                disks: a
                    .disks
                    .iter()
                    .map(|d| parse_vm_disk(d))
                    .collect::<Result<_, _>>()?,
            };
            let info = open()?.define_vm(&req)?;
            print_info(&info, a.output)?;
        }
        VmCommand::List { output } => {
            let vms = open()?.list_vms()?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&vms)?);
            } else {
                println!(
                    "{:<24} {:<8} {:>8} {:>5} {:>10}  DISKS",
                    "NAME", "STATE", "MEMORY", "VCPUS", "UPTIME"
                );
                for vm in &vms {
                    let d = &vm.definition;
                    let disks: Vec<&str> = d.disks.iter().map(|x| x.source.as_str()).collect();
                    println!(
                        "{:<24} {:<8} {:>7}M {:>5} {:>10}  {}",
                        d.name,
                        state_name(vm.status.state),
                        d.memory >> 20,
                        d.vcpus,
                        vm.status
                            .uptime_seconds
                            .map_or("-".into(), |s| format!("{s}s")),
                        disks.join(" ")
                    );
                }
            }
        }
        VmCommand::Status { name, output } => print_info(&open()?.vm_info(&name)?, output)?,
        VmCommand::Start { name, quiet } => return start_foreground(&open()?, &name, quiet),
        VmCommand::Stop { name } => {
            let s = open()?.stop_vm(&name)?;
            println!(
                "{name}: {} ({})",
                state_name(s.state),
                s.exit_reason.unwrap_or_default()
            );
        }
        VmCommand::Console {
            name,
            offset,
            tail,
            follow,
        } => {
            let svc = open()?;
            let mut q = ConsoleQuery {
                offset,
                tail,
                limit: None,
            };
            loop {
                let chunk = svc.vm_console(&name, &q)?;
                let mut out = std::io::stdout().lock();
                out.write_all(chunk.data.as_bytes())?;
                out.flush()?;
                let more = chunk.next_offset < chunk.end;
                let wait_for_more = follow && chunk.state == VmState::Running;
                if !(more || wait_for_more) {
                    break;
                }
                if !more {
                    std::thread::sleep(CONSOLE_POLL);
                }
                q = ConsoleQuery {
                    offset: Some(chunk.next_offset),
                    tail: None,
                    limit: None,
                };
            }
        }
        VmCommand::Remove { name } => {
            open()?.remove_vm(&name)?;
            println!("Removed VM {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// How often the foreground start and `console --follow` look for new output.
const CONSOLE_POLL: Duration = Duration::from_millis(200);

fn state_name(s: VmState) -> &'static str {
    match s {
        VmState::Defined => "defined",
        VmState::Running => "running",
        VmState::Stopped => "stopped",
        VmState::Failed => "failed",
    }
}

fn print_info(info: &VmInfo, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(info)?);
        return Ok(());
    }
    let (d, s) = (&info.definition, &info.status);
    println!("VM {}: {}", d.name, state_name(s.state));
    println!("  memory   {} MiB, {} vCPU(s)", d.memory >> 20, d.vcpus);
    println!("  kernel   {} ({:?})", d.kernel, d.boot);
    if let Some(i) = &d.initrd {
        println!("  initrd   {i}");
    }
    if !d.cmdline.is_empty() {
        println!("  cmdline  {}", d.cmdline);
    }
    for (i, disk) in d.disks.iter().enumerate() {
        println!(
            "  disk {i}   {}{}{}",
            disk.source,
            if disk.readonly { " (read-only)" } else { "" },
            if disk.serial.is_empty() {
                String::new()
            } else {
                format!(" serial {}", disk.serial)
            }
        );
    }
    if let Some(u) = s.uptime_seconds {
        println!("  uptime   {u} s");
    }
    if let Some(r) = &s.exit_reason {
        println!("  ended    {r}");
    }
    if let Some(pid) = s.pid {
        println!("  process  {pid}");
    }
    Ok(())
}

/// Starts the VM in this process and stays until it ends, printing its console; Ctrl-C or
/// SIGTERM stops it.
fn start_foreground(svc: &Service, name: &str, quiet: bool) -> anyhow::Result<ExitCode> {
    if svc.vm_definition(name)?.boot == BootKind::Linux {
        warn_if_pvm();
    }
    svc.start_vm(name)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut interrupt, mut terminate) = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        Ok::<_, std::io::Error>((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        ))
    })?;
    let mut offset = 0;
    loop {
        let chunk = svc.vm_console(
            name,
            &ConsoleQuery {
                offset: Some(offset),
                tail: None,
                limit: None,
            },
        )?;
        if !quiet {
            let mut out = std::io::stdout().lock();
            out.write_all(chunk.data.as_bytes())?;
            out.flush()?;
        }
        offset = chunk.next_offset;
        if chunk.state != VmState::Running && offset >= chunk.end {
            break;
        }
        let stop = rt.block_on(async {
            tokio::select! {
                _ = interrupt.recv() => true,
                _ = terminate.recv() => true,
                _ = tokio::time::sleep(CONSOLE_POLL) => false,
            }
        });
        if stop {
            eprintln!("strata: stopping VM {name}");
            svc.stop_vm(name)?;
        }
    }
    let s = svc.vm_status(name)?;
    let reason = s.exit_reason.unwrap_or_default();
    eprintln!("strata: VM {name} {}: {reason}", state_name(s.state));
    Ok(if s.state == VmState::Failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn warn_if_pvm() {
    if Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!(
            "strata: warning: this host's KVM is PVM (software nested virtualisation); an \
             unmodified Linux kernel does not finish booting under it"
        );
    }
}

fn run_vm(args: RunArgs) -> anyhow::Result<ExitCode> {
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
                kernel: args.kernel.clone(),
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
            serial,
            timeout: None,
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
    fn defined_vm_disks_parse_and_bad_ones_are_refused() {
        let d = parse_vm_disk("lv:strata/root,readonly=on,serial=r0").unwrap();
        assert_eq!(
            d,
            VmDisk {
                source: "lv:strata/root".into(),
                readonly: true,
                serial: "r0".into()
            }
        );
        assert!(!parse_vm_disk("image:a.raw").unwrap().readonly);
        assert!(parse_vm_disk("").is_err());
        assert!(parse_vm_disk("image:a.raw,queues=2").is_err());
        assert!(parse_vm_disk("image:a.raw,readonly=maybe").is_err());
    }
}

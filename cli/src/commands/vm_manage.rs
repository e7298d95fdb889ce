//! `strata vm define|list|status|start|stop|console|remove`: the appliance's VMs, in the shape
//! of the HTTP API's `/api/vms` routes. With `--remote URL --token T` they talk to a running
//! `strata serve` (where the VMs run); without, they run the same router in this process on
//! the local data directory.
//!
//! Each VM runs in a VMM process of its own, supervised by the process that started it (it
//! serves the VM's volumes). So without `--remote`, `vm start` stays in the foreground printing
//! the console until the VM ends (Ctrl-C stops it: power button, then hard after the timeout);
//! `vm stop` from another shell works too. With `--remote`, `vm start` returns at once unless
//! `--attach` is given (Ctrl-C then only detaches). `vm console --attach` follows the live
//! console stream from the VMM.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use serde::de::DeserializeOwned;

use super::appliance::{encode, Api};
use super::Output;
use strata_service::vms::{
    BootKind, ConsoleChunk, DefineVm, NicSpec, VmDisk, VmInfo, VmState, VmStatus, DEFAULT_CMDLINE,
};

/// How often `start` and `console --follow` look for new output.
const CONSOLE_POLL: Duration = Duration::from_millis(200);

#[derive(Debug, Subcommand)]
pub enum ManageCommand {
    /// Define a VM (local or --remote; kernel paths are on the machine that runs it).
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
    /// Start a VM. Locally it runs in this process: the command stays, printing the console,
    /// until the VM ends (Ctrl-C stops it). With --remote it returns at once unless --attach.
    Start {
        /// The VM.
        name: String,
        /// With --remote: stay and print the console until the VM ends (Ctrl-C detaches).
        #[arg(long)]
        attach: bool,
        /// Do not print the console (it is kept in the console log all the same).
        #[arg(long)]
        quiet: bool,
    },
    /// Stop a running VM: press its ACPI power button, wait for the guest to power off, then
    /// stop it hard (the vCPUs stop, the disks are flushed).
    Stop {
        /// The VM.
        name: String,
        /// Stop hard at once, without the power button.
        #[arg(long)]
        force: bool,
        /// Seconds to wait for the guest after the power button.
        #[arg(long, default_value_t = 60, conflicts_with = "force")]
        timeout: u64,
    },
    /// Pause a running VM's vCPUs.
    Pause {
        /// The VM.
        name: String,
    },
    /// Let a paused VM run again.
    Resume {
        /// The VM.
        name: String,
    },
    /// Press a running VM's ACPI power button (and return at once).
    PowerButton {
        /// The VM.
        name: String,
    },
    /// Show a running VM's disk counters.
    DiskStats {
        /// The VM.
        name: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
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
        /// Follow the live console stream from the VMM (from the current end, or --offset)
        /// until the VM ends; Ctrl-C detaches.
        #[arg(long, conflicts_with_all = ["tail", "follow"])]
        attach: bool,
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
    /// A NIC: network=NAME[,mac=52:54:00:..][,vlan=N][,rate=MB/s]. Repeatable. Without mac=
    /// one is generated and kept in the definition.
    #[arg(long = "net")]
    nets: Vec<String>,
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
            Some(("readonly", v)) => disk.readonly = super::vm::parse_on_off("readonly", v)?,
            Some(("serial", v)) => disk.serial = v.to_string(),
            _ => bail!("--disk option '{part}' is not readonly=on|off or serial=ID"),
        }
    }
    Ok(disk)
}

/// Parses a defined VM's `--net network=NAME[,mac=M][,vlan=N][,rate=MB/s]`.
fn parse_vm_nic(text: &str) -> anyhow::Result<NicSpec> {
    let mut nic = NicSpec::default();
    for part in text.split(',') {
        match part.split_once('=') {
            Some(("network", v)) if !v.is_empty() => nic.network = v.to_string(),
            Some(("mac", v)) => nic.mac = Some(v.to_string()),
            Some(("vlan", v)) => {
                nic.vlan = Some(
                    v.parse()
                        .with_context(|| format!("vlan={v} is not a number"))?,
                )
            }
            Some(("rate", v)) => {
                nic.rate = Some(
                    v.parse()
                        .with_context(|| format!("rate={v} is not a number of MB/s"))?,
                )
            }
            _ => bail!("--net option '{part}' is not network=NAME, mac=MAC, vlan=N or rate=MB/s"),
        }
    }
    if nic.network.is_empty() {
        bail!("--net needs network=NAME");
    }
    Ok(nic)
}

/// A path for the machine that runs the VM: made absolute when that is this one; sent as
/// given to a remote server (which wants absolute paths on its side).
fn server_path(api: &Api, p: &std::path::Path) -> anyhow::Result<String> {
    let p = match api {
        Api::Remote(_) => p.to_path_buf(),
        Api::Local { .. } => {
            std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))?
        }
    };
    Ok(p.to_string_lossy().into_owned())
}

fn get<T: DeserializeOwned>(api: &Api, method: &str, path: &str) -> anyhow::Result<T> {
    let v = api.ok(method, path, None)?;
    serde_json::from_value(v).with_context(|| format!("reading the answer to {method} {path}"))
}

fn vm_path(name: &str, rest: &str) -> String {
    format!("/api/vms/{}{rest}", encode(name))
}

fn console(api: &Api, name: &str, query: &str) -> anyhow::Result<ConsoleChunk> {
    get(api, "GET", &vm_path(name, &format!("/console{query}")))
}

/// Runs a VM command.
pub fn run(cmd: ManageCommand, api: &Api) -> anyhow::Result<ExitCode> {
    match cmd {
        ManageCommand::Define(a) => {
            let req = DefineVm {
                name: a.name,
                memory: a.memory,
                vcpus: a.vcpus,
                boot: match a.boot {
                    BootArg::Linux => BootKind::Linux,
                    BootArg::Flat => BootKind::Flat,
                },
                kernel: server_path(api, &a.kernel)?,
                initrd: a
                    .initrd
                    .as_deref()
                    .map(|p| server_path(api, p))
                    .transpose()?,
                cmdline: a.cmdline,
                disks: a
                    .disks
                    .iter()
                    .map(|d| parse_vm_disk(d))
                    .collect::<Result<_, _>>()?,
                nics: a
                    .nets
                    .iter()
                    .map(|n| parse_vm_nic(n))
                    .collect::<Result<_, _>>()?,
            };
            let v = api.ok("POST", "/api/vms", Some(&serde_json::to_value(&req)?))?;
            print_info(&serde_json::from_value(v)?, a.output)?;
        }
        ManageCommand::List { output } => {
            let vms: Vec<VmInfo> = get(api, "GET", "/api/vms")?;
            print_list(&vms, output)?;
        }
        ManageCommand::Status { name, output } => {
            print_info(&get(api, "GET", &vm_path(&name, ""))?, output)?
        }
        ManageCommand::Start {
            name,
            attach,
            quiet,
        } => return start(api, &name, attach, quiet),
        ManageCommand::Stop {
            name,
            force,
            timeout,
        } => {
            let query = if force {
                "?force=true".to_string()
            } else {
                format!("?timeout={timeout}")
            };
            let s: VmStatus = get(api, "POST", &vm_path(&name, &format!("/stop{query}")))?;
            println!(
                "{name}: {} ({})",
                state_name(s.state),
                s.exit_reason.unwrap_or_default()
            );
        }
        ManageCommand::Pause { name } => {
            let s: VmStatus = get(api, "POST", &vm_path(&name, "/pause"))?;
            println!("{name}: {}", state_name(s.state));
        }
        ManageCommand::Resume { name } => {
            let s: VmStatus = get(api, "POST", &vm_path(&name, "/resume"))?;
            println!("{name}: {}", state_name(s.state));
        }
        ManageCommand::PowerButton { name } => {
            let _: VmStatus = get(api, "POST", &vm_path(&name, "/power-button"))?;
            println!("{name}: power button pressed");
        }
        ManageCommand::DiskStats { name, output } => {
            let v: Vec<strata_vmm::control::DiskStats> =
                get(api, "GET", &vm_path(&name, "/disk-stats"))?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<32} {:>12} {:>8} {:>16}",
                    "DISK", "REQUESTS", "ERRORS", "BYTES"
                );
                for d in v {
                    println!(
                        "{:<32} {:>12} {:>8} {:>16}",
                        d.name, d.requests, d.errors, d.bytes
                    );
                }
            }
        }
        ManageCommand::Console {
            name,
            offset,
            attach: true,
            ..
        } => attach_console(api, &name, offset)?,
        ManageCommand::Console {
            name,
            offset,
            tail,
            follow,
            attach: false,
        } => {
            let mut query = match (offset, tail) {
                (_, Some(t)) => format!("?tail={t}"),
                (Some(o), None) => format!("?offset={o}"),
                (None, None) => String::new(),
            };
            loop {
                let chunk = console(api, &name, &query)?;
                print_console(&chunk)?;
                let more = chunk.next_offset < chunk.end;
                let wait_for_more =
                    follow && matches!(chunk.state, VmState::Running | VmState::Paused);
                if !(more || wait_for_more) {
                    break;
                }
                if !more {
                    std::thread::sleep(CONSOLE_POLL);
                }
                query = format!("?offset={}", chunk.next_offset);
            }
        }
        ManageCommand::Remove { name } => {
            api.ok("DELETE", &vm_path(&name, ""), None)?;
            println!("Removed VM {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the live console stream until the VM ends.
fn attach_console(api: &Api, name: &str, from: Option<u64>) -> anyhow::Result<()> {
    let query = from.map(|o| format!("?from={o}")).unwrap_or_default();
    let mut pending: Vec<u8> = Vec::new();
    api.stream(&vm_path(name, &format!("/console/stream{query}")), &mut |bytes| {
        pending.extend_from_slice(bytes);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let chunk: strata_vmm::control::ConsoleChunk = serde_json::from_slice(&line)
                .context("reading the console stream")?;
            if chunk.skipped > 0 {
                eprintln!(
                    "strata: {} console bytes are no longer held by the VMM (see `strata vm console`)",
                    chunk.skipped
                );
            }
            let mut out = std::io::stdout().lock();
            out.write_all(chunk.data.as_bytes())?;
            out.flush()?;
        }
        Ok(true)
    })
}

fn print_console(chunk: &ConsoleChunk) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(chunk.data.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn state_name(s: VmState) -> &'static str {
    match s {
        VmState::Defined => "defined",
        VmState::Running => "running",
        VmState::Stopped => "stopped",
        VmState::Failed => "failed",
        VmState::Paused => "paused",
    }
}

fn print_list(vms: &[VmInfo], output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(vms)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<8} {:>8} {:>5} {:>10}  DISKS",
        "NAME", "STATE", "MEMORY", "VCPUS", "UPTIME"
    );
    for vm in vms {
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
    Ok(())
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
    if !d.cmdline.is_empty() && d.cmdline != DEFAULT_CMDLINE {
        println!("  cmdline  {}", d.cmdline);
    }
    for (i, disk) in d.disks.iter().enumerate() {
        let ro = if disk.readonly { " (read-only)" } else { "" };
        let serial = if disk.serial.is_empty() {
            String::new()
        } else {
            format!(" serial {}", disk.serial)
        };
        println!("  disk {i}   {}{ro}{serial}", disk.source);
    }
    for (i, nic) in d.nics.iter().enumerate() {
        let vlan = nic.vlan.map(|v| format!(" vlan {v}")).unwrap_or_default();
        let rate = nic
            .rate_bytes_per_sec
            .map(|r| format!(" rate {} MB/s", r as f64 / 1e6))
            .unwrap_or_default();
        println!("  nic {i}    {} mac {}{vlan}{rate}", nic.network, nic.mac);
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

/// Starts the VM; locally (or with `attach`) stays until it ends, printing its console.
/// Ctrl-C or SIGTERM stops a local VM, and detaches from a remote one.
fn start(api: &Api, name: &str, attach: bool, quiet: bool) -> anyhow::Result<ExitCode> {
    let local = matches!(api, Api::Local { .. });
    if local {
        let info: VmInfo = get(api, "GET", &vm_path(name, ""))?;
        if info.definition.boot == BootKind::Linux {
            super::vm::warn_if_pvm();
        }
    }
    let s: VmStatus = get(api, "POST", &vm_path(name, "/start"))?;
    if !local && !attach {
        println!(
            "{name}: {} (pid {})",
            state_name(s.state),
            s.pid.unwrap_or(0)
        );
        return Ok(ExitCode::SUCCESS);
    }
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
        let chunk = console(api, name, &format!("?offset={offset}"))?;
        if !quiet {
            print_console(&chunk)?;
        }
        offset = chunk.next_offset;
        let live = matches!(chunk.state, VmState::Running | VmState::Paused);
        if !live && offset >= chunk.end {
            break;
        }
        let signalled = rt.block_on(async {
            tokio::select! {
                _ = interrupt.recv() => true,
                _ = terminate.recv() => true,
                _ = tokio::time::sleep(CONSOLE_POLL) => false,
            }
        });
        if signalled && !local {
            eprintln!("strata: detached; VM {name} keeps running on the server");
            return Ok(ExitCode::SUCCESS);
        }
        if signalled {
            eprintln!("strata: stopping VM {name} (power button; hard stop after 60 s)");
            api.ok("POST", &vm_path(name, "/stop"), None)?;
        }
    }
    let s: VmStatus = get(api, "GET", &vm_path(name, "/status"))?;
    let reason = s.exit_reason.unwrap_or_default();
    eprintln!("strata: VM {name} {}: {reason}", state_name(s.state));
    Ok(if s.state == VmState::Failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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

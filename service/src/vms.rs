//! Virtual machines: definitions kept in the data directory, each run in a sandboxed VMM
//! process of its own (see [`super::vm_runner`] and `strata_vmm::process`), their status and
//! their serial console logs.
//!
//! # Layout
//! ```text
//! DATA/vms/NAME/
//!   config.json       the definition (created exclusively; replaced atomically)
//!   status.json       the last run: state, times, exit reason, VMM and monitor pids, run id
//!   vmm.json          the VMM process's configuration for the current or last run
//!   control.sock      the running VMM's control socket
//!   exit.json         how the VMM process ended (written by its monitor)
//!   console.log       the serial console of the current or last run (written by the monitor)
//!   console.old.log   the run before (or the part rotated away after 16 MiB)
//!   console.json      the stream offset of console.log's first byte
//!   vmm.log           the VMM's own log
//! ```
//!
//! A VM outlives the process that started it: any process sees its status and console through
//! the files and reaches it through its control socket (stop, pause, power button). Stopping
//! presses the ACPI power button and waits for the guest (60 s by default), then stops hard;
//! a forced stop is hard at once (the vCPUs leave KVM_RUN and every disk is flushed).
//!
//! # Locking
//! | state | guarded by |
//! |---|---|
//! | VMs this process supervises | a mutex in [`VmManager`]; start, stop and remove decide under it |
//! | a definition | created with `link` (fails if present), removed before the other files |
//! | a run's records | written by one process each (see [`super::vm_runner`]) |

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use strata_storage::source::{SourceSpec, LV_PREFIX};
use strata_storage::util::parse_size;

use super::vm_console;
use super::vm_disks::DiskServerSlot;
use super::vm_runner;
use super::{names, Service, ServiceError, ServiceResult};

/// A running VM's counters for one disk.
pub use strata_vmm::control::DiskStats as VmDiskStats;

/// The command line a Linux guest gets when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// Longest kernel command line accepted (the boot protocol's limit on x86-64 is 2048 with
/// the terminating NUL).
pub const MAX_CMDLINE: usize = 2047;
/// Most bytes one console request returns.
pub const MAX_CONSOLE_READ: u64 = 1 << 20;
/// Most vCPUs (the VMM's limit).
pub const MAX_VCPUS: u8 = 64;
/// Longest disk serial (virtio-blk's ID string).
pub const MAX_SERIAL: usize = 20;
/// The image prefix of disk sources.
pub const IMAGE_PREFIX: &str = "image:";

/// What the VM boots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootKind {
    /// A Linux bzImage through the 64-bit boot protocol, with an optional initramfs and a
    /// command line.
    #[default]
    Linux,
    /// A freestanding 64-bit image, loaded at 1 MiB and entered there in long mode with
    /// identity-mapped page tables (unikernels, test guests). No initrd, no command line.
    Flat,
}

/// A disk of a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDisk {
    /// `lv:VG/NAME` (a logical volume) or `image:NAME` (an image in the image folder).
    pub source: String,
    /// Present the disk read-only.
    #[serde(default)]
    pub readonly: bool,
    /// The ID string the guest reads (at most 20 bytes of printable ASCII).
    #[serde(default)]
    pub serial: String,
}

/// A NIC as a definition request gives it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NicSpec {
    /// The network (see [`super::networks`]).
    pub network: String,
    /// The MAC address (`52:54:00:12:34:56`); generated, and then kept, when not given.
    #[serde(default)]
    pub mac: Option<String>,
    /// A VLAN (1 to 4094) on a VLAN-aware network: the NIC's bridge port carries it untagged.
    #[serde(default)]
    pub vlan: Option<u16>,
    /// A rate limit in MB/s (10^6 bytes per second), each way.
    #[serde(default)]
    pub rate: Option<f64>,
}

/// A NIC of a VM as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmNic {
    /// The network.
    pub network: String,
    /// The MAC address.
    pub mac: String,
    /// The VLAN, if any.
    pub vlan: Option<u16>,
    /// The rate limit in bytes per second each way, if any.
    pub rate_bytes_per_sec: Option<u64>,
}

/// Largest rate limit accepted, in MB/s.
pub const MAX_RATE_MB: f64 = 100_000.0;

/// A request to define a VM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DefineVm {
    /// Name of the VM.
    pub name: String,
    /// Guest memory ("512M", "2G"; at least 16M, at most the host's RAM).
    #[serde(default = "default_memory")]
    pub memory: String,
    /// Number of vCPUs (1 to 64).
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// What `kernel` is.
    #[serde(default)]
    pub boot: BootKind,
    /// Absolute path on the server of the kernel (bzImage) or flat image.
    pub kernel: String,
    /// Absolute path on the server of an initramfs (Linux only).
    #[serde(default)]
    pub initrd: Option<String>,
    /// The kernel command line (Linux only; default `console=ttyS0 reboot=k panic=1`).
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Disks in order; the first is /dev/vda in Linux.
    #[serde(default)]
    pub disks: Vec<VmDisk>,
    /// NICs in order.
    #[serde(default)]
    pub nics: Vec<NicSpec>,
}

fn default_memory() -> String {
    "512M".into()
}

fn default_vcpus() -> u8 {
    1
}

/// A VM's definition as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDefinition {
    /// Name of the VM.
    pub name: String,
    /// Guest memory in bytes.
    pub memory: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// What `kernel` is.
    pub boot: BootKind,
    /// The kernel or flat image on the server.
    pub kernel: String,
    /// The initramfs on the server.
    pub initrd: Option<String>,
    /// The kernel command line (empty for flat images).
    pub cmdline: String,
    /// Disks in order.
    pub disks: Vec<VmDisk>,
    /// NICs in order.
    #[serde(default)]
    pub nics: Vec<VmNic>,
}

/// Where a VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Never started.
    Defined,
    /// Running now.
    Running,
    /// Ended normally: the guest powered off or a stop was requested.
    Stopped,
    /// Ended by an error (the VMM failed, or the process running it died).
    Failed,
    /// Running, with its vCPUs paused.
    Paused,
}

/// A VM's state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmStatus {
    /// Name of the VM.
    pub name: String,
    /// defined, running, stopped or failed.
    pub state: VmState,
    /// When the current or last run started (seconds since the Unix epoch).
    pub started_at: Option<u64>,
    /// When the last run ended (seconds since the Unix epoch).
    pub ended_at: Option<u64>,
    /// Seconds the current run has lasted, or the last run lasted.
    pub uptime_seconds: Option<u64>,
    /// Why the last run ended ("guest powered off", "stopped by request", an error).
    pub exit_reason: Option<String>,
    /// Guest reboots during the current or last run (the VM is rebuilt each time).
    pub reboots: u32,
    /// The process running the VM, while it runs.
    pub pid: Option<u32>,
    /// Bytes the serial console has written in this run (the console log's end offset).
    pub console_bytes: u64,
}

/// A VM: its definition and its status.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmInfo {
    /// The definition.
    pub definition: VmDefinition,
    /// The status.
    pub status: VmStatus,
}

/// Which part of the console log to return.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConsoleQuery {
    /// Return output from this byte offset on (a previous answer's `next_offset`, to poll).
    pub offset: Option<u64>,
    /// Return only the last this many bytes (overrides `offset`).
    pub tail: Option<u64>,
    /// Return at most this many bytes (default and maximum 1 MiB).
    pub limit: Option<u64>,
}

/// A piece of the serial console log.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConsoleChunk {
    /// The output, as text (invalid UTF-8 replaced).
    pub data: String,
    /// Offset of the first byte returned.
    pub offset: u64,
    /// Offset after the last byte returned: pass it as `offset` to continue.
    pub next_offset: u64,
    /// The oldest offset still kept (older output was rotated away).
    pub start: u64,
    /// The log's current end offset.
    pub end: u64,
    /// The requested offset was older than `start`; output begins at `start` instead.
    pub truncated: bool,
    /// The VM's state when read.
    pub state: VmState,
}

/// The VMs this process supervises, and where definitions live.
#[derive(Debug)]
pub struct VmManager {
    dir: PathBuf,
    pub(super) runs: vm_runner::Runs,
    /// The `strata` binary that runs VMM processes.
    pub(super) program: PathBuf,
    pub(super) disk_server: DiskServerSlot,
}

impl VmManager {
    /// VMs defined under `dir` (created if missing).
    pub fn new(dir: PathBuf) -> ServiceResult<VmManager> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| ServiceError::internal(format!("Creating {}: {e}", dir.display())))?;
        Ok(VmManager {
            dir,
            runs: vm_runner::Runs::default(),
            program: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("strata")),
            disk_server: DiskServerSlot::default(),
        })
    }

    /// Runs VMM processes with `program` (a `strata` binary) instead of this executable.
    pub fn set_program(&mut self, program: PathBuf) {
        self.program = program;
    }

    /// The folder of VM `name` (after validating the name).
    pub fn vm_dir(&self, name: &str) -> ServiceResult<PathBuf> {
        names::validate("VM", name)?;
        Ok(self.dir.join(name))
    }

    fn config_path(&self, name: &str) -> ServiceResult<PathBuf> {
        Ok(self.vm_dir(name)?.join("config.json"))
    }

    pub(super) fn load(&self, name: &str) -> ServiceResult<VmDefinition> {
        let path = self.config_path(name)?;
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ServiceError::NotFound(format!("VM {name}")))
            }
            Err(e) => {
                return Err(ServiceError::internal(format!(
                    "Reading {}: {e}",
                    path.display()
                )))
            }
        };
        serde_json::from_slice(&text).map_err(|e| {
            ServiceError::internal(format!("The definition {} is damaged: {e}", path.display()))
        })
    }

    /// Names of all defined VMs, sorted.
    pub(super) fn names(&self) -> ServiceResult<Vec<String>> {
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| ServiceError::internal(format!("Listing {}: {e}", self.dir.display())))?;
        let mut out: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| names::validate("VM", n).is_ok())
            .filter(|n| self.dir.join(n).join("config.json").is_file())
            .collect();
        out.sort();
        Ok(out)
    }
}

/// Host RAM in bytes, from /proc/meminfo.
pub(super) fn host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

fn bad(msg: String) -> ServiceError {
    ServiceError::BadRequest(msg)
}

fn parse_memory(text: &str) -> ServiceResult<u64> {
    let bytes = parse_size(text).map_err(|e| bad(format!("Memory {text:?} is not a size: {e}")))?;
    let min = strata_vmm::memory::MIN_MEMORY;
    if bytes < min {
        return Err(bad(format!(
            "Memory {text:?} is too small (at least {} MiB)",
            min >> 20
        )));
    }
    if let Some(host) = host_memory() {
        if bytes > host {
            return Err(bad(format!(
                "Memory {text:?} is more than the host's {} MiB of RAM",
                host >> 20
            )));
        }
    }
    Ok(bytes)
}

fn check_cmdline(cmdline: &str) -> ServiceResult<()> {
    if cmdline.len() > MAX_CMDLINE {
        return Err(bad(format!(
            "The kernel command line is longer than {MAX_CMDLINE} bytes"
        )));
    }
    if cmdline.chars().any(|c| c.is_control() || !c.is_ascii()) {
        return Err(bad(
            "The kernel command line may hold only printable ASCII".into()
        ));
    }
    Ok(())
}

fn check_serial(serial: &str) -> ServiceResult<()> {
    if serial.len() > MAX_SERIAL || serial.chars().any(|c| !c.is_ascii_graphic()) {
        return Err(bad(format!(
            "Disk serial {serial:?} must be at most {MAX_SERIAL} printable ASCII characters \
             without spaces"
        )));
    }
    Ok(())
}

impl Service {
    /// Puts a disk source in its one canonical spelling (`lv:VG/NAME` or `image:NAME`) and
    /// checks that it exists (404 otherwise).
    fn canonical_disk(&self, source: &str) -> ServiceResult<String> {
        if let Some(name) = source.strip_prefix(IMAGE_PREFIX) {
            if !self.image_path(name)?.is_file() {
                return Err(ServiceError::NotFound(format!("Image {name}")));
            }
            return Ok(format!("{IMAGE_PREFIX}{name}"));
        }
        if source.starts_with(LV_PREFIX) {
            // The volume layer's one naming rule (checked by the parse) decides, as at create.
            if let SourceSpec::Volume { vg, lv } = SourceSpec::parse(source)? {
                self.volumes.get(&vg)?.lv_info(&lv)?;
                return Ok(format!("{LV_PREFIX}{vg}/{lv}"));
            }
        }
        Err(bad(format!(
            "Disk source {source:?} must be lv:VG/NAME or image:NAME"
        )))
    }

    /// Checks a definition request and turns it into a definition.
    fn validate_vm(&self, req: &DefineVm) -> ServiceResult<VmDefinition> {
        names::validate("VM", &req.name)?;
        let memory = parse_memory(&req.memory)?;
        if req.vcpus == 0 || req.vcpus > MAX_VCPUS {
            return Err(bad(format!(
                "vcpus {} is out of range (1 to {MAX_VCPUS})",
                req.vcpus
            )));
        }
        self.server_paths.file("kernel", &req.kernel)?;
        let cmdline = match req.boot {
            BootKind::Linux => {
                if let Some(initrd) = &req.initrd {
                    self.server_paths.file("initrd", initrd)?;
                }
                let cmdline = req.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE);
                check_cmdline(cmdline)?;
                cmdline.to_string()
            }
            BootKind::Flat => {
                if req.initrd.is_some() || req.cmdline.is_some() {
                    return Err(bad(
                        "A flat image takes no initrd and no command line".into()
                    ));
                }
                String::new()
            }
        };
        if req.disks.len() > strata_vmm::vm::MAX_DISKS {
            return Err(bad(format!(
                "At most {} disks are supported",
                strata_vmm::vm::MAX_DISKS
            )));
        }
        let mut disks: Vec<VmDisk> = Vec::with_capacity(req.disks.len());
        for d in &req.disks {
            check_serial(&d.serial)?;
            let source = self.canonical_disk(&d.source)?;
            if disks.iter().any(|o| o.source == source) {
                return Err(bad(format!("Disk {source} is given twice")));
            }
            disks.push(VmDisk {
                source,
                readonly: d.readonly,
                serial: d.serial.clone(),
            });
        }
        let nics = self.check_nics(&req.nics, disks.len())?;
        Ok(VmDefinition {
            name: req.name.clone(),
            memory,
            vcpus: req.vcpus,
            boot: req.boot,
            kernel: req.kernel.clone(),
            initrd: req.initrd.clone(),
            cmdline,
            disks,
            nics,
        })
    }

    /// Checks NIC requests: the networks exist, MACs are unicast and distinct (generated when
    /// not given), VLANs are in range on VLAN-aware networks, rates are positive.
    fn check_nics(&self, nics: &[NicSpec], disks: usize) -> ServiceResult<Vec<VmNic>> {
        use strata_vmm::net::config::{check_mac, format_mac, parse_mac};
        use strata_vmm::vm::{MAX_DEVICES, MAX_NICS};
        if nics.len() > MAX_NICS {
            return Err(bad(format!("At most {MAX_NICS} NICs are supported")));
        }
        if nics.len() + disks > MAX_DEVICES {
            return Err(bad(format!(
                "At most {MAX_DEVICES} disks and NICs together are supported"
            )));
        }
        let mut out: Vec<VmNic> = Vec::with_capacity(nics.len());
        for n in nics {
            let net = self.network_definition(&n.network)?;
            let mac = match &n.mac {
                Some(text) => {
                    let mac = parse_mac(text).map_err(bad)?;
                    check_mac(&mac).map_err(bad)?;
                    mac
                }
                None => {
                    // Locally administered, in QEMU's customary 52:54:00 prefix.
                    let mut mac = [0x52, 0x54, 0x00, 0, 0, 0];
                    for b in &mut mac[3..] {
                        *b = fastrand::u8(..);
                    }
                    mac
                }
            };
            let mac = format_mac(&mac);
            if out.iter().any(|o| o.mac == mac) {
                return Err(bad(format!("MAC {mac} is given twice")));
            }
            if let Some(v) = n.vlan {
                if !(1..=4094).contains(&v) {
                    return Err(bad(format!("VLAN {v} is out of range (1 to 4094)")));
                }
                if !net.vlan_aware {
                    return Err(bad(format!(
                        "Network {} is not VLAN-aware; a NIC on it cannot name a VLAN",
                        n.network
                    )));
                }
            }
            let rate_bytes_per_sec = match n.rate {
                None => None,
                Some(r) if r.is_finite() && r > 0.0 && r <= MAX_RATE_MB => {
                    Some(((r * 1e6) as u64).max(1))
                }
                Some(r) => {
                    return Err(bad(format!(
                        "Rate {r} MB/s is out of range (above 0, at most {MAX_RATE_MB})"
                    )))
                }
            };
            out.push(VmNic {
                network: net.name,
                mac,
                vlan: n.vlan,
                rate_bytes_per_sec,
            });
        }
        Ok(out)
    }

    /// Defines a VM (409 if the name is taken).
    pub fn define_vm(&self, req: &DefineVm) -> ServiceResult<VmInfo> {
        let def = self.validate_vm(req)?;
        let dir = self.vms.vm_dir(&def.name)?;
        let config = dir.join("config.json");
        let taken = || ServiceError::Conflict(format!("VM {} exists already", def.name));
        if config.exists() {
            return Err(taken());
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| ServiceError::internal(format!("Creating {}: {e}", dir.display())))?;
        // A folder without a definition is what a removal interrupted by a crash leaves.
        vm_runner::clear_run_files(&dir)?;
        let json = serde_json::to_vec_pretty(&def)
            .map_err(|e| ServiceError::internal(format!("Encoding the definition: {e}")))?;
        if !create_exclusively(&config, &json)? {
            return Err(taken());
        }
        self.vm_info(&def.name)
    }

    /// Every VM with its status.
    pub fn list_vms(&self) -> ServiceResult<Vec<VmInfo>> {
        let mut out = Vec::new();
        for name in self.vms.names()? {
            match self.vm_info(&name) {
                Ok(info) => out.push(info),
                // Removed meanwhile.
                Err(ServiceError::NotFound(_)) => {}
                Err(e) => tracing::warn!(vm = %name, error = %e, "skipping a VM"),
            }
        }
        Ok(out)
    }

    /// One VM's definition.
    pub fn vm_definition(&self, name: &str) -> ServiceResult<VmDefinition> {
        self.vms.load(name)
    }

    /// One VM: definition and status.
    pub fn vm_info(&self, name: &str) -> ServiceResult<VmInfo> {
        let definition = self.vms.load(name)?;
        let status = self.vms.status(name)?;
        Ok(VmInfo { definition, status })
    }

    /// One VM's status.
    pub fn vm_status(&self, name: &str) -> ServiceResult<VmStatus> {
        self.vms.load(name)?;
        self.vms.status(name)
    }

    /// Removes a stopped VM: its definition, status and console logs (409 while it runs).
    pub fn remove_vm(&self, name: &str) -> ServiceResult<()> {
        self.vms.load(name)?;
        let dir = self.vms.vm_dir(name)?;
        self.while_vm_not_running(name, || {
            let config = dir.join("config.json");
            std::fs::remove_file(&config).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => ServiceError::NotFound(format!("VM {name}")),
                _ => ServiceError::internal(format!("Removing {}: {e}", config.display())),
            })?;
            strata_storage::format::raw::sync_parent_dir(&config)?;
            vm_runner::clear_run_files(&dir)?;
            // Only an empty folder goes; anything else a person put there stays.
            let _ = std::fs::remove_dir(&dir);
            Ok(())
        })
    }

    /// A piece of the VM's serial console log (the current or last run).
    pub fn vm_console(&self, name: &str, q: &ConsoleQuery) -> ServiceResult<ConsoleChunk> {
        self.vms.load(name)?;
        let dir = self.vms.vm_dir(name)?;
        let state = self.vms.status(name)?.state;
        let limit = q.limit.unwrap_or(MAX_CONSOLE_READ).min(MAX_CONSOLE_READ);
        let chunk = vm_console::read_console_file(&dir, q.offset, q.tail, limit)?;
        Ok(ConsoleChunk { state, ..chunk })
    }
}

/// Writes `contents` to `path` only if `path` does not exist: temp file, fsync, `link` (which
/// fails if the name is taken, also against other processes), fsync of the directory.
/// Returns false if the name was taken.
pub(crate) fn create_exclusively(path: &Path, contents: &[u8]) -> ServiceResult<bool> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".new-{}-{}", std::process::id(), fastrand::u64(..)));
    let ctx = |what: &str, e: std::io::Error| {
        ServiceError::internal(format!("{what} {}: {e}", path.display()))
    };
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| ctx("Creating a file for", e))?;
        f.write_all(contents).map_err(|e| ctx("Writing", e))?;
        f.sync_all().map_err(|e| ctx("Syncing", e))?;
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(ctx("Creating", e)),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    let created = result?;
    strata_storage::format::raw::sync_parent_dir(path)?;
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DataDir;

    fn service() -> (tempfile::TempDir, Service, String) {
        let dir = tempfile::tempdir().unwrap();
        let svc = Service::open(DataDir::at(dir.path().join("data"))).unwrap();
        let kernel = svc.data().import_dir().join("kernel.bin");
        std::fs::write(&kernel, [0xeb, 0xfe]).unwrap();
        (dir, svc, kernel.to_string_lossy().into_owned())
    }

    fn request(name: &str, kernel: &str) -> DefineVm {
        DefineVm {
            name: name.into(),
            memory: "64M".into(),
            vcpus: 1,
            boot: BootKind::Flat,
            kernel: kernel.into(),
            initrd: None,
            cmdline: None,
            disks: Vec::new(),
            nics: Vec::new(),
        }
    }

    #[test]
    fn definitions_persist_and_names_are_exclusive() {
        let (_dir, svc, kernel) = service();
        let info = svc.define_vm(&request("web1", &kernel)).unwrap();
        assert_eq!(info.definition.memory, 64 << 20);
        assert_eq!(info.status.state, VmState::Defined);
        let again = svc.define_vm(&request("web1", &kernel)).unwrap_err();
        assert_eq!(again.status(), 409, "{again}");
        let reopened = Service::open(svc.data().clone()).unwrap();
        assert_eq!(reopened.vm_definition("web1").unwrap(), info.definition);
        assert_eq!(reopened.list_vms().unwrap().len(), 1);
        reopened.remove_vm("web1").unwrap();
        assert_eq!(reopened.vm_info("web1").unwrap_err().status(), 404);
        assert!(reopened.list_vms().unwrap().is_empty());
        // The name is free again, with no status left from before.
        let info = reopened.define_vm(&request("web1", &kernel)).unwrap();
        assert_eq!(info.status.state, VmState::Defined);
    }

    #[test]
    fn bad_definitions_are_refused_with_the_right_status() {
        let (_dir, svc, kernel) = service();
        let cases: Vec<(DefineVm, u16)> = vec![
            (request("../x", &kernel), 400),
            (
                DefineVm {
                    memory: "lots".into(),
                    ..request("a", &kernel)
                },
                400,
            ),
            (
                DefineVm {
                    memory: "1M".into(),
                    ..request("a", &kernel)
                },
                400,
            ),
            (
                DefineVm {
                    memory: "64T".into(),
                    ..request("a", &kernel)
                },
                400,
            ),
            (
                DefineVm {
                    vcpus: 0,
                    ..request("a", &kernel)
                },
                400,
            ),
            (request("a", "relative/kernel"), 400),
            // Outside the import folders: 403, whether or not the file exists.
            (request("a", "/nonexistent/kernel"), 403),
            (
                DefineVm {
                    cmdline: Some("console=ttyS0".into()),
                    ..request("a", &kernel)
                },
                400,
            ),
            (
                DefineVm {
                    boot: BootKind::Linux,
                    cmdline: Some("a\nb".into()),
                    ..request("a", &kernel)
                },
                400,
            ),
            (
                DefineVm {
                    disks: vec![VmDisk {
                        source: "image:missing.raw".into(),
                        readonly: false,
                        serial: String::new(),
                    }],
                    ..request("a", &kernel)
                },
                404,
            ),
            (
                DefineVm {
                    disks: vec![VmDisk {
                        source: "/etc/passwd".into(),
                        readonly: false,
                        serial: String::new(),
                    }],
                    ..request("a", &kernel)
                },
                400,
            ),
        ];
        for (req, status) in cases {
            let e = svc.define_vm(&req).unwrap_err();
            assert_eq!(e.status(), status, "{req:?}: {e}");
        }
        assert!(svc.list_vms().unwrap().is_empty());
    }

    #[test]
    fn disks_are_canonical_and_not_given_twice() {
        let (_dir, svc, kernel) = service();
        let img = svc.image_path("d.raw").unwrap();
        std::fs::File::create(&img)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let disk = |serial: &str| VmDisk {
            source: "image:d.raw".into(),
            readonly: true,
            serial: serial.into(),
        };
        let twice = DefineVm {
            disks: vec![disk(""), disk("")],
            ..request("a", &kernel)
        };
        assert_eq!(svc.define_vm(&twice).unwrap_err().status(), 400);
        let long_serial = DefineVm {
            disks: vec![disk("012345678901234567890")],
            ..request("a", &kernel)
        };
        assert_eq!(svc.define_vm(&long_serial).unwrap_err().status(), 400);
        let ok = DefineVm {
            disks: vec![disk("root")],
            ..request("a", &kernel)
        };
        let info = svc.define_vm(&ok).unwrap();
        assert_eq!(info.definition.disks, vec![disk("root")]);
    }
}

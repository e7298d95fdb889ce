//! Running VMs: one VMM process per VM (`strata vm run --config … --api-socket …`, see
//! `strata_vmm::process`), supervised from here: started, watched, stopped, and adopted again
//! by a new `strata serve` after the old one ended or was killed.
//!
//! # Records in the VM's folder
//! | file | written by | holds |
//! |---|---|---|
//! | `status.json` | the supervisor, at start and when it sees the end | run id, VMM pid, monitor pid, uid, start time; the final state |
//! | `vmm.json` | the supervisor, at start | the VMM's configuration |
//! | `control.sock` | the VMM | its control socket |
//! | `exit.json` | the VMM's monitor, at the end | exit status or signal, the VMM's outcome, notes |
//! | `console.log`, `console.old.log`, `console.json` | the monitor | the console log and its base |
//! | `vmm.log` | the VMM and its monitor (stderr) | their log |
//!
//! A VM's state is derived from these by any process ([`derive_status`]): a run recorded as
//! running has ended when its exit record (same run id) exists, or failed when its monitor is
//! gone without one. The process that started or adopted a VM also holds it in its table of
//! runs, serves its served disks (see [`super::vm_disks`]) and reports it running until it has
//! released them, so a client seeing "stopped" can at once remove a disk or start it again.
//!
//! Lock order: the table of runs, then a run's fields.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use strata_storage::bitmap::sidecar_path;
use strata_storage::StorageError;
pub use strata_vmm::control::ControlError;
use strata_vmm::control::{ControlClient, Reply, Request, RunState};
use strata_vmm::process::config::{
    now_secs, BootSpec, ConsoleState, DiskConfig, DiskSource, EndState, NicConfig, RebootLimit,
    SandboxSpec, CONFIG_FILE, CONSOLE_FILE, CONSOLE_STATE_FILE, EXIT_FILE, LOG_FILE,
    OLD_CONSOLE_FILE, SOCKET_FILE,
};
use strata_vmm::process::{ExitRecord, VmmConfig};

use super::vm_disks::ServedDisks;
use super::vms::{BootKind, VmDefinition, VmState, VmStatus, IMAGE_PREFIX};
use super::{write_atomically, Service, ServiceError, ServiceResult};

/// The exit reason of a VM stopped hard through the API or the CLI.
pub const STOPPED_BY_REQUEST: &str = "stopped by request";
/// How long `vm stop` waits for the guest to answer the power button by default.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a hard stop waits for the VMM process to end.
pub const HARD_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Where a flat image is loaded and entered.
pub const FLAT_LOAD_ADDR: u64 = 0x10_0000;
/// Largest flat image accepted.
pub const MAX_FLAT_IMAGE: u64 = 64 << 20;
/// A guest that reboots this many times within [`REBOOT_LOOP_WINDOW`] is stopped as failed.
pub const REBOOT_LOOP_LIMIT: usize = 5;
/// See [`REBOOT_LOOP_LIMIT`].
pub const REBOOT_LOOP_WINDOW: Duration = Duration::from_secs(10);
/// The first uid/gid given to VMM processes; VM slot `n` runs as `VMM_ID_BASE + n`.
pub const VMM_ID_BASE: u32 = 2_100_000_000;
/// Slots of [`VMM_ID_BASE`].
pub const VMM_ID_SLOTS: u32 = 1 << 16;
/// How long a new VMM has to answer on its control socket.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a control request may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

const STATUS_FILE: &str = "status.json";

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(super) fn io_error(what: &str, path: &Path, e: std::io::Error) -> ServiceError {
    ServiceError::internal(format!("{what} {}: {e}", path.display()))
}

/// What `status.json` holds: the current or last run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    /// running, stopped or failed.
    pub state: VmState,
    /// Start (seconds since the epoch).
    pub started_at: u64,
    /// End (seconds since the epoch).
    pub ended_at: Option<u64>,
    /// Why it ended.
    pub exit_reason: Option<String>,
    /// Guest reboots.
    pub reboots: u32,
    /// The VMM process.
    pub pid: u32,
    /// The run's id (matches the exit record).
    #[serde(default)]
    pub run_id: String,
    /// The VMM's monitor process.
    #[serde(default)]
    pub monitor_pid: u32,
    /// The uid/gid the VMM runs as.
    #[serde(default)]
    pub uid: Option<u32>,
}

impl RunRecord {
    /// The record in the VM folder `dir`, if the VM ever ran.
    pub fn load(dir: &Path) -> ServiceResult<Option<RunRecord>> {
        let path = dir.join(STATUS_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                ServiceError::internal(format!("The run record {} is damaged: {e}", path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("Reading", &path, e)),
        }
    }

    pub(super) fn save(&self, dir: &Path) -> ServiceResult<()> {
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| ServiceError::internal(format!("Encoding a run record: {e}")))?;
        write_atomically(&dir.join(STATUS_FILE), &json)
    }
}

/// Whether process `pid` lives (not a zombie) and is a `strata` process (a reused pid is not).
pub fn process_is_strata(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": comm may hold spaces and parentheses; the state follows the last ')'.
    let Some(close) = stat.rfind(')') else {
        return false;
    };
    let comm = stat.find('(').map_or("", |open| &stat[open + 1..close]);
    let state = stat[close + 1..].trim_start().chars().next();
    comm == "strata" && !matches!(state, Some('Z' | 'X'))
}

/// The console log's end offset in folder `dir`.
pub fn console_end(dir: &Path) -> u64 {
    let len = std::fs::metadata(dir.join(CONSOLE_FILE)).map_or(0, |m| m.len());
    ConsoleState::load(dir).base + len
}

/// The status of VM `name` (folder `dir`) as its files tell it.
pub fn derive_status(name: &str, dir: &Path) -> ServiceResult<VmStatus> {
    let console_bytes = console_end(dir);
    let Some(record) = RunRecord::load(dir)? else {
        return Ok(VmStatus {
            name: name.to_string(),
            state: VmState::Defined,
            started_at: None,
            ended_at: None,
            uptime_seconds: None,
            exit_reason: None,
            reboots: 0,
            pid: None,
            console_bytes,
        });
    };
    let ended = |state: VmState, ended_at: u64, reason: String, reboots: u32| VmStatus {
        name: name.to_string(),
        state,
        started_at: Some(record.started_at),
        ended_at: Some(ended_at),
        uptime_seconds: Some(ended_at.saturating_sub(record.started_at)),
        exit_reason: Some(reason),
        reboots,
        pid: None,
        console_bytes,
    };
    if record.state != VmState::Running && record.state != VmState::Paused {
        return Ok(ended(
            record.state,
            record.ended_at.unwrap_or(record.started_at),
            record.exit_reason.clone().unwrap_or_default(),
            record.reboots,
        ));
    }
    if let Some(exit) = exit_record(dir, &record.run_id) {
        let (state, reason) = exit.describe();
        let reboots = exit.outcome.as_ref().map_or(record.reboots, |o| o.reboots);
        return Ok(ended(end_state(state), exit.ended_at, reason, reboots));
    }
    if !process_is_strata(record.monitor_pid) {
        return Ok(ended(
            VmState::Failed,
            now_secs(),
            format!(
                "The VMM's monitor process (pid {}) ended without recording how the VM ended",
                record.monitor_pid
            ),
            record.reboots,
        ));
    }
    let live = control_status(dir);
    let state = match live.as_ref().map(|s| s.state) {
        Some(RunState::Paused) => VmState::Paused,
        _ => VmState::Running,
    };
    Ok(VmStatus {
        name: name.to_string(),
        state,
        started_at: Some(record.started_at),
        ended_at: None,
        uptime_seconds: Some(now_secs().saturating_sub(record.started_at)),
        exit_reason: None,
        reboots: live.map_or(record.reboots, |s| s.reboots),
        pid: Some(record.pid),
        console_bytes,
    })
}

fn end_state(s: EndState) -> VmState {
    match s {
        EndState::Stopped => VmState::Stopped,
        EndState::Failed => VmState::Failed,
    }
}

/// The exit record of run `run_id` in `dir`, if it has ended.
fn exit_record(dir: &Path, run_id: &str) -> Option<ExitRecord> {
    ExitRecord::load(dir)
        .ok()
        .flatten()
        .filter(|e| e.run_id == run_id)
}

fn control_status(dir: &Path) -> Option<strata_vmm::control::VmmStatus> {
    let mut c = ControlClient::connect(&dir.join(SOCKET_FILE), Duration::from_secs(2)).ok()?;
    match c.call(&Request::Status).ok()? {
        Reply::Status(s) => Some(s),
        _ => None,
    }
}

/// Removes the run's files in `dir` (the definition stays).
pub fn clear_run_files(dir: &Path) -> ServiceResult<()> {
    for f in [
        STATUS_FILE,
        CONSOLE_FILE,
        OLD_CONSOLE_FILE,
        CONSOLE_STATE_FILE,
        EXIT_FILE,
        CONFIG_FILE,
        SOCKET_FILE,
        LOG_FILE,
    ] {
        let p = dir.join(f);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("Removing", &p, e)),
        }
    }
    Ok(())
}

/// A VM this process supervises (started or adopted).
#[derive(Debug)]
pub struct Run {
    name: String,
    dir: PathBuf,
    sources: Vec<String>,
    vmm_pid: u32,
    monitor_pid: u32,
    child: Mutex<Option<Child>>,
    served: Mutex<Option<ServedDisks>>,
    ended: (Mutex<bool>, Condvar),
}

impl Run {
    fn wait_ended(&self, timeout: Duration) -> bool {
        let ended = lock(&self.ended.0);
        *self
            .ended
            .1
            .wait_timeout_while(ended, timeout, |e| !*e)
            .unwrap_or_else(|p| p.into_inner())
            .0
    }
}

type RunTable = BTreeMap<String, Arc<Run>>;

/// The VMs this process supervises, by name.
#[derive(Debug, Default)]
pub struct Runs(Arc<Mutex<RunTable>>);

impl Runs {
    /// The run of `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Run>> {
        lock(&self.0).get(name).cloned()
    }
}

/// The tap of NIC `k` of VM `vm`: `st` and 8 hex digits of a hash of the VM's name, `n` and the
/// index (at most 15 bytes, stable across runs, distinct between VMs but for hash collisions,
/// which the tap's exclusive open then reports).
pub fn tap_name(vm: &str, k: usize) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(vm.as_bytes());
    format!("st{:02x}{:02x}{:02x}{:02x}n{k}", h[0], h[1], h[2], h[3])
}

/// Refuses to start when this host has no usable KVM.
fn check_kvm(name: &str) -> ServiceResult<()> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| {
            ServiceError::Storage(StorageError::Unsupported(format!(
                "Cannot start VM {name}: /dev/kvm cannot be opened ({e}); this host cannot run \
                 VMs (is KVM enabled and loaded?)"
            )))
        })
}

/// A resolved path as the text a definition holds.
fn path_text(p: PathBuf) -> String {
    p.to_string_lossy().into_owned()
}

fn random_id() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// How `stop_vm` stops.
#[derive(Clone, Copy, Debug)]
pub enum StopMode {
    /// Press the power button, wait this long, then stop hard.
    Graceful(Duration),
    /// Stop hard at once.
    Force,
}

impl super::vms::VmManager {
    /// The VMs running now (in any process): definition, status and run record. `table` is
    /// this process's table of runs, which the caller holds.
    fn running(
        &self,
        table: &RunTable,
    ) -> ServiceResult<Vec<(VmDefinition, VmStatus, Option<RunRecord>)>> {
        let mut out = Vec::new();
        for name in self.names()? {
            let Ok(def) = self.load(&name) else {
                continue;
            };
            let status = self.status_in(&name, table)?;
            if matches!(status.state, VmState::Running | VmState::Paused) {
                let record = RunRecord::load(&self.vm_dir(&name)?)?;
                out.push((def, status, record));
            }
        }
        Ok(out)
    }

    /// Runs `f` (a removal) unless a running VM (of any process) has `source` as a disk (409);
    /// no VM can start from this process meanwhile.
    pub fn unless_in_use<T>(
        &self,
        source: &str,
        f: impl FnOnce() -> ServiceResult<T>,
    ) -> ServiceResult<T> {
        let table = lock(&self.runs.0);
        let in_use = |name: &str| {
            ServiceError::Conflict(format!(
                "{source} is a disk of running VM {name}; stop the VM first"
            ))
        };
        if let Some(run) = table
            .values()
            .find(|r| r.sources.iter().any(|s| s == source))
        {
            return Err(in_use(&run.name));
        }
        for (def, _, _) in self.running(&table)? {
            if def.disks.iter().any(|d| d.source == source) {
                return Err(in_use(&def.name));
            }
        }
        let out = f();
        drop(table);
        out
    }

    /// The status of `name`: from its files, but running while this process still holds it.
    pub(super) fn status(&self, name: &str) -> ServiceResult<VmStatus> {
        let table = lock(&self.runs.0);
        self.status_in(name, &table)
    }

    /// [`VmManager::status`] with the table of runs held by the caller.
    fn status_in(&self, name: &str, table: &RunTable) -> ServiceResult<VmStatus> {
        let dir = self.vm_dir(name)?;
        let mut s = derive_status(name, &dir)?;
        if let Some(run) = table.get(name) {
            if !matches!(s.state, VmState::Running | VmState::Paused) {
                s.state = VmState::Running;
                s.ended_at = None;
                s.exit_reason = None;
                s.pid = Some(run.vmm_pid);
                s.uptime_seconds = s.started_at.map(|t| now_secs().saturating_sub(t));
            }
        }
        Ok(s)
    }
}

impl Service {
    /// Runs `f` while holding the table, if VM `name` runs nowhere (409 otherwise).
    pub(super) fn while_vm_not_running<T>(
        &self,
        name: &str,
        f: impl FnOnce() -> ServiceResult<T>,
    ) -> ServiceResult<T> {
        let table = lock(&self.vms.runs.0);
        let status = self.vms.status_in(name, &table)?;
        if table.contains_key(name) || matches!(status.state, VmState::Running | VmState::Paused) {
            return Err(ServiceError::Conflict(format!(
                "VM {name} is running{}; stop it first",
                status
                    .pid
                    .map(|p| format!(" (in process {p})"))
                    .unwrap_or_default()
            )));
        }
        let out = f();
        drop(table);
        out
    }

    /// Starts a defined VM in a VMM process of its own (409 if it runs already or a disk is in
    /// use by another running VM; 501 without KVM). Returns once the VMM answers on its
    /// control socket; the status shows the run.
    pub fn start_vm(&self, name: &str) -> ServiceResult<VmStatus> {
        let def = self.vm_definition(name)?;
        let dir = self.vms.vm_dir(name)?;
        check_kvm(name)?;
        let runs = self.vms.runs.0.clone();
        let mut table = lock(&runs);
        let status = self.vms.status_in(name, &table)?;
        if table.contains_key(name) || matches!(status.state, VmState::Running | VmState::Paused) {
            return Err(ServiceError::Conflict(format!(
                "VM {name} is running already{}",
                status
                    .pid
                    .map(|p| format!(" (in process {p})"))
                    .unwrap_or_default()
            )));
        }
        let running = self.vms.running(&table)?;
        // Guest memory is mapped lazily: without this bound, VMs each smaller than the host
        // could together push it into the out-of-memory killer.
        let claimed: u64 = running.iter().map(|(d, _, _)| d.memory).sum();
        if let Some(host) = super::vms::host_memory() {
            let limit = host / 10 * 9;
            if claimed.saturating_add(def.memory) > limit {
                return Err(ServiceError::Conflict(format!(
                    "VM {name} needs {} MiB, and running VMs hold {} MiB of the {} MiB \
                     allowed (90% of the host's memory)",
                    def.memory >> 20,
                    claimed >> 20,
                    limit >> 20
                )));
            }
        }
        for d in &def.disks {
            if let Some((other, _, _)) = running
                .iter()
                .find(|(o, _, _)| o.disks.iter().any(|x| x.source == d.source))
            {
                return Err(ServiceError::Conflict(format!(
                    "{} is a disk of running VM {}",
                    d.source, other.name
                )));
            }
        }
        let used_ids: Vec<u32> = running
            .iter()
            .filter_map(|(_, _, r)| r.as_ref()?.uid)
            .collect();
        let id = (VMM_ID_BASE..VMM_ID_BASE + VMM_ID_SLOTS)
            .find(|i| !used_ids.contains(i))
            .ok_or_else(|| ServiceError::Conflict("Every VMM uid slot is in use".into()))?;
        let boot = self.boot_spec(&def)?;
        let mut served = None;
        let mut fds: Vec<std::os::fd::OwnedFd> = Vec::new();
        let mut disks = Vec::new();
        for d in &def.disks {
            let (source, keep) = self.disk_source(&def, d, &mut served)?;
            if let Some(stream) = keep {
                fds.push(stream.into());
            }
            disks.push(DiskConfig {
                name: d.source.clone(),
                source,
                read_only: d.readonly,
                serial: d.serial.clone(),
                queues: 1,
            });
        }
        let mut nics = Vec::new();
        for (k, n) in def.nics.iter().enumerate() {
            let tap = tap_name(name, k);
            // One queue pair per vCPU.
            let pairs = usize::from(def.vcpus)
                .min(usize::from(strata_vmm::net::config::MAX_QUEUE_PAIRS))
                .max(1);
            let queues = self.open_nic(&n.network, &tap, pairs, n.vlan, Some(id))?;
            let mut raw = Vec::new();
            for q in queues {
                let fd: std::os::fd::OwnedFd = q.into();
                raw.push(fd.as_raw_fd());
                fds.push(fd);
            }
            nics.push(NicConfig {
                name: format!("{}/{tap}", n.network),
                mac: n.mac.clone(),
                fds: raw,
                rate_bytes_per_sec: n.rate_bytes_per_sec,
            });
        }
        let run_id = random_id();
        let cfg = VmmConfig {
            name: name.to_string(),
            run_id: run_id.clone(),
            memory: def.memory,
            vcpus: def.vcpus,
            boot,
            disks,
            nics,
            dir: dir.clone(),
            sandbox: SandboxSpec {
                uid_gid: Some((id, id)),
                ..SandboxSpec::default()
            },
            reboot_limit: RebootLimit {
                count: REBOOT_LOOP_LIMIT,
                window_seconds: REBOOT_LOOP_WINDOW.as_secs(),
            },
        };
        let json = serde_json::to_vec_pretty(&cfg)
            .map_err(|e| ServiceError::internal(format!("Encoding the VMM configuration: {e}")))?;
        write_atomically(&dir.join(CONFIG_FILE), &json)?;
        for f in [EXIT_FILE, SOCKET_FILE] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        let started_at = now_secs();
        let mut child = self.spawn_vmm(&dir, &fds)?;
        drop(fds);
        let vmm_pid = match wait_ready(&dir, &mut child, &run_id) {
            Ok(pid) => pid,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                // The status shows why, as for a VM that fails later.
                let failed = RunRecord {
                    state: VmState::Failed,
                    started_at,
                    ended_at: Some(now_secs()),
                    exit_reason: Some(e.to_string()),
                    reboots: 0,
                    pid: 0,
                    run_id,
                    monitor_pid: child.id(),
                    uid: Some(id),
                };
                if let Err(save) = failed.save(&dir) {
                    tracing::warn!(vm = %name, error = %save, "recording a failed start failed");
                }
                return Err(e);
            }
        };
        let record = RunRecord {
            state: VmState::Running,
            started_at,
            ended_at: None,
            exit_reason: None,
            reboots: 0,
            pid: vmm_pid,
            run_id,
            monitor_pid: child.id(),
            uid: Some(id),
        };
        record.save(&dir)?;
        let run = Arc::new(Run {
            name: name.to_string(),
            dir: dir.clone(),
            sources: def.disks.iter().map(|d| d.source.clone()).collect(),
            vmm_pid,
            monitor_pid: child.id(),
            child: Mutex::new(Some(child)),
            served: Mutex::new(served),
            ended: (Mutex::new(false), Condvar::new()),
        });
        table.insert(name.to_string(), run.clone());
        drop(table);
        watch(run, runs);
        tracing::info!(vm = %name, pid = vmm_pid, "VM started");
        self.vm_status(name)
    }

    /// What the VMM boots, with server paths checked again (a link may have changed).
    fn boot_spec(&self, def: &VmDefinition) -> ServiceResult<BootSpec> {
        let kernel = self.server_paths.file("kernel", &def.kernel)?;
        if !kernel.is_file() {
            return Err(ServiceError::NotFound(format!(
                "The kernel {} of VM {}",
                def.kernel, def.name
            )));
        }
        Ok(match def.boot {
            BootKind::Linux => BootSpec::Linux {
                kernel,
                initrd: match &def.initrd {
                    Some(i) => {
                        let p = self.server_paths.file("initrd", i)?;
                        if !p.is_file() {
                            return Err(ServiceError::NotFound(format!(
                                "The initrd {i} of VM {}",
                                def.name
                            )));
                        }
                        Some(p)
                    }
                    None => None,
                },
                cmdline: def.cmdline.clone(),
            },
            BootKind::Flat => {
                let len = std::fs::metadata(&kernel)
                    .map_err(|e| io_error("Reading", &kernel, e))?
                    .len();
                let room = def
                    .memory
                    .saturating_sub(FLAT_LOAD_ADDR)
                    .min(MAX_FLAT_IMAGE);
                if len > room {
                    return Err(ServiceError::BadRequest(format!(
                        "The flat image {} ({len} bytes) is larger than the {room} bytes it \
                         may take",
                        path_text(kernel)
                    )));
                }
                BootSpec::Flat {
                    image: kernel,
                    load_addr: FLAT_LOAD_ADDR,
                }
            }
        })
    }

    /// Where disk `d` comes from: an image the VMM opens itself, or a disk this process
    /// serves (returned with the socket the VMM inherits).
    fn disk_source(
        &self,
        def: &VmDefinition,
        d: &super::vms::VmDisk,
        served: &mut Option<ServedDisks>,
    ) -> ServiceResult<(DiskSource, Option<std::os::unix::net::UnixStream>)> {
        if let Some(image) = d.source.strip_prefix(IMAGE_PREFIX) {
            let path = self.image_path(image)?;
            if !path.is_file() {
                return Err(ServiceError::NotFound(format!("Image {image}")));
            }
            if d.readonly || !sidecar_path(&path).exists() {
                let format = self.image_format(image)?;
                return Ok((
                    DiskSource::Image {
                        path,
                        format: format.to_string(),
                    },
                    None,
                ));
            }
        }
        let holder = format!("VM {}", def.name);
        let resolved = self.resolve_source(&d.source, d.readonly, &holder)?;
        // An image's writes are tracked in its dirty bitmaps here, where the sidecar file can
        // be rewritten (resolve_source attaches them).
        let device = resolved.device();
        let server = self.vms.disk_server.get(self.data().root().join("run"))?;
        let set = served.get_or_insert_with(|| ServedDisks::new(server));
        let description = format!("{} of VM {}", d.source, def.name);
        let disk = set.serve(device, resolved, description, d.readonly)?;
        Ok((
            DiskSource::Served {
                fd: disk.stream.as_raw_fd(),
                size: disk.facts.size,
                writable: disk.facts.writable(),
                discard: disk.facts.discard(),
                write_zeroes: disk.facts.write_zeroes(),
            },
            Some(disk.stream),
        ))
    }

    fn spawn_vmm(&self, dir: &Path, fds: &[std::os::fd::OwnedFd]) -> ServiceResult<Child> {
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::process::CommandExt;
        let log_path = dir.join(LOG_FILE);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(|e| io_error("Opening", &log_path, e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| io_error("Opening", &log_path, e))?;
        let raw: Vec<i32> = fds.iter().map(|s| s.as_raw_fd()).collect();
        let mut cmd = Command::new(&self.vms.program);
        cmd.arg("vm")
            .arg("run")
            .arg("--config")
            .arg(dir.join(CONFIG_FILE))
            .arg("--api-socket")
            .arg(dir.join(SOCKET_FILE))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // SAFETY: between fork and exec the closure only makes async-signal-safe calls
        // (setsid, fcntl) on descriptors this process owns.
        unsafe {
            cmd.pre_exec(move || {
                // A session of its own: the VM outlives this process and its terminal.
                libc::setsid();
                for fd in &raw {
                    let flags = libc::fcntl(*fd, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(*fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd.spawn().map_err(|e| {
            ServiceError::internal(format!(
                "Starting the VMM process {}: {e}",
                self.vms.program.display()
            ))
        })
    }

    /// Stops a running VM and waits for it to end (409 if it is not running): presses the
    /// power button and waits for the guest to power off, stopping hard after the timeout,
    /// or stops hard at once.
    pub fn stop_vm_with(&self, name: &str, mode: StopMode) -> ServiceResult<VmStatus> {
        self.vm_definition(name)?;
        let dir = self.vms.vm_dir(name)?;
        let status = self.vms.status(name)?;
        if !matches!(status.state, VmState::Running | VmState::Paused) {
            return Err(ServiceError::Conflict(format!("VM {name} is not running")));
        }
        let socket = dir.join(SOCKET_FILE);
        let mut control = ControlClient::connect(&socket, CONTROL_TIMEOUT).map_err(control_err)?;
        let reason = match mode {
            StopMode::Force => STOPPED_BY_REQUEST.to_string(),
            StopMode::Graceful(timeout) => {
                if status.state == VmState::Paused {
                    control.call(&Request::Resume).map_err(control_err)?;
                }
                control.call(&Request::PowerButton).map_err(control_err)?;
                if self.wait_not_running(name, timeout)? {
                    return self.vm_status(name);
                }
                format!(
                    "{STOPPED_BY_REQUEST}: the guest did not power off within {} s of the \
                     power button",
                    timeout.as_secs()
                )
            }
        };
        match control.call(&Request::Stop { reason }) {
            Ok(_) | Err(ControlError::Closed) => {}
            Err(ControlError::Io(_)) if !self.is_running(name)? => {}
            Err(e) => return Err(control_err(e)),
        }
        if !self.wait_not_running(name, HARD_STOP_TIMEOUT)? {
            return Err(ServiceError::internal(format!(
                "VM {name} did not stop within {} s",
                HARD_STOP_TIMEOUT.as_secs()
            )));
        }
        self.vm_status(name)
    }

    /// Stops a running VM hard (see [`Service::stop_vm_with`]).
    pub fn stop_vm(&self, name: &str) -> ServiceResult<VmStatus> {
        self.stop_vm_with(name, StopMode::Force)
    }

    fn is_running(&self, name: &str) -> ServiceResult<bool> {
        Ok(matches!(
            self.vms.status(name)?.state,
            VmState::Running | VmState::Paused
        ))
    }

    /// Waits until VM `name` no longer runs (and, if this process supervises it, has released
    /// its disks), up to `timeout`. Returns whether it ended.
    fn wait_not_running(&self, name: &str, timeout: Duration) -> ServiceResult<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(run) = self.vms.runs.get(name) {
                let left = deadline.saturating_duration_since(Instant::now());
                return Ok(run.wait_ended(left));
            }
            if !self.is_running(name)? {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a control request to a running VM.
    fn vm_control(&self, name: &str, req: Request) -> ServiceResult<Reply> {
        self.vm_definition(name)?;
        if !self.is_running(name)? {
            return Err(ServiceError::Conflict(format!("VM {name} is not running")));
        }
        let dir = self.vms.vm_dir(name)?;
        let mut c =
            ControlClient::connect(&dir.join(SOCKET_FILE), CONTROL_TIMEOUT).map_err(control_err)?;
        c.call(&req).map_err(control_err)
    }

    /// Pauses a running VM's vCPUs.
    pub fn pause_vm(&self, name: &str) -> ServiceResult<VmStatus> {
        self.vm_control(name, Request::Pause)?;
        self.vm_status(name)
    }

    /// Lets a paused VM run again.
    pub fn resume_vm(&self, name: &str) -> ServiceResult<VmStatus> {
        self.vm_control(name, Request::Resume)?;
        self.vm_status(name)
    }

    /// Presses a running VM's ACPI power button (and returns at once).
    pub fn press_power_button(&self, name: &str) -> ServiceResult<VmStatus> {
        self.vm_control(name, Request::PowerButton)?;
        self.vm_status(name)
    }

    /// Each disk's counters of a running VM.
    pub fn vm_disk_stats(&self, name: &str) -> ServiceResult<Vec<strata_vmm::control::DiskStats>> {
        match self.vm_control(name, Request::DiskStats)? {
            Reply::DiskStats { disks } => Ok(disks),
            other => Err(ServiceError::internal(format!(
                "The VMM answered {other:?} to a disk statistics request"
            ))),
        }
    }

    /// The live console of a running VM from `from` (the current end if absent).
    pub fn vm_console_stream(
        &self,
        name: &str,
        from: Option<u64>,
    ) -> ServiceResult<strata_vmm::control::ConsoleStream> {
        self.vm_definition(name)?;
        if !self.is_running(name)? {
            return Err(ServiceError::Conflict(format!("VM {name} is not running")));
        }
        let dir = self.vms.vm_dir(name)?;
        ControlClient::connect(&dir.join(SOCKET_FILE), CONTROL_TIMEOUT)
            .and_then(|c| c.console(from, Some(Duration::from_secs(1))))
            .map_err(control_err)
    }

    /// Takes over every VM whose VMM process still runs (a new `strata serve` after the old
    /// one ended), and records as ended those whose process died meanwhile. VMs with disks
    /// the old server served have lost them (their I/O fails) and are reported so.
    pub fn adopt_vms(&self) -> ServiceResult<Vec<String>> {
        let mut adopted = Vec::new();
        let runs = self.vms.runs.0.clone();
        for name in self.vms.names()? {
            let dir = self.vms.vm_dir(&name)?;
            let Some(record) = RunRecord::load(&dir)? else {
                continue;
            };
            if !matches!(record.state, VmState::Running | VmState::Paused) {
                continue;
            }
            let status = derive_status(&name, &dir)?;
            if !matches!(status.state, VmState::Running | VmState::Paused) {
                record_end(&dir, &record, &status);
                tracing::warn!(vm = %name, reason = ?status.exit_reason, "VM ended while no server ran");
                continue;
            }
            let def = self.vm_definition(&name)?;
            let run = Arc::new(Run {
                name: name.clone(),
                dir: dir.clone(),
                sources: def.disks.iter().map(|d| d.source.clone()).collect(),
                vmm_pid: record.pid,
                monitor_pid: record.monitor_pid,
                child: Mutex::new(None),
                served: Mutex::new(None),
                ended: (Mutex::new(false), Condvar::new()),
            });
            lock(&runs).insert(name.clone(), run.clone());
            watch(run, runs.clone());
            tracing::info!(vm = %name, pid = record.pid, "adopted a running VM");
            adopted.push(name);
        }
        Ok(adopted)
    }

    /// At server shutdown: VMs keep running, except those whose disks this process serves
    /// (they would lose them), which are stopped (power button, then hard after `grace`).
    pub fn release_vms(&self, grace: Duration) {
        let runs: Vec<Arc<Run>> = lock(&self.vms.runs.0).values().cloned().collect();
        for run in runs {
            if lock(&run.served).is_none() {
                continue;
            }
            tracing::info!(vm = %run.name, "stopping a VM whose disks this server serves");
            if let Err(e) = self.stop_vm_with(&run.name, StopMode::Graceful(grace)) {
                tracing::warn!(vm = %run.name, error = %e, "stopping the VM failed");
            }
        }
    }

    /// Waits until VM `name` no longer runs, up to `timeout`; returns its status then.
    pub fn wait_vm(&self, name: &str, timeout: Duration) -> ServiceResult<VmStatus> {
        self.wait_not_running(name, timeout)?;
        self.vm_status(name)
    }
}

fn control_err(e: ControlError) -> ServiceError {
    ServiceError::internal(e.to_string())
}

/// Waits for a new VMM to answer on its socket; returns its pid. Fails with the VMM's own
/// reason if it ends first.
fn wait_ready(dir: &Path, child: &mut Child, run_id: &str) -> ServiceResult<u32> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let socket = dir.join(SOCKET_FILE);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            let why = exit_record(dir, run_id).map_or_else(
                || "The VMM process ended before it was ready (see vmm.log)".to_string(),
                |e| e.describe().1,
            );
            return Err(ServiceError::internal(why));
        }
        if let Ok(mut c) = ControlClient::connect(&socket, Duration::from_secs(2)) {
            if c.call(&Request::Status).is_ok() {
                return c
                    .peer_pid()
                    .map_err(|e| ServiceError::internal(format!("The VMM's pid: {e}")));
            }
        }
        if Instant::now() > deadline {
            return Err(ServiceError::internal(format!(
                "The VMM did not answer on {} within {} s",
                socket.display(),
                READY_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Folds a finished run's status into its record.
fn record_end(dir: &Path, record: &RunRecord, status: &VmStatus) {
    let done = RunRecord {
        state: status.state,
        ended_at: status.ended_at.or(Some(now_secs())),
        exit_reason: status.exit_reason.clone(),
        reboots: status.reboots,
        ..record.clone()
    };
    if let Err(e) = done.save(dir) {
        tracing::warn!(error = %e, "recording the VM's end failed");
    }
}

/// Blocks until process `pid` has ended (a pidfd, or polling where that is unavailable).
fn wait_process_end(pid: u32) {
    // SAFETY: pidfd_open(2) with a pid and no flags; the result is a new descriptor we close.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) } as i32;
    if fd >= 0 {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: poll(2) on one pollfd we own.
            let n = unsafe { libc::poll(&mut pfd, 1, 1000) };
            if n > 0 || !process_is_strata(pid) {
                break;
            }
        }
        // SAFETY: closing the pidfd opened above.
        unsafe { libc::close(fd) };
        return;
    }
    while process_is_strata(pid) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Watches a run until its VMM ends, then releases its disks, records the end and takes it
/// out of the table.
fn watch(run: Arc<Run>, runs: Arc<Mutex<BTreeMap<String, Arc<Run>>>>) {
    let thread_run = run.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("vm-{}-watch", run.name))
        .spawn(move || {
            let run = thread_run;
            wait_process_end(run.vmm_pid);
            // The monitor writes the exit record, then ends.
            let child = lock(&run.child).take();
            match child {
                Some(mut c) => {
                    let _ = c.wait();
                }
                None => {
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while process_is_strata(run.monitor_pid) && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
            // Close the served disks before anyone can see the VM ended.
            drop(lock(&run.served).take());
            let mut table = lock(&runs);
            if let Ok(Some(record)) = RunRecord::load(&run.dir) {
                if let Ok(status) = derive_status(&run.name, &run.dir) {
                    tracing::info!(vm = %run.name, state = ?status.state, reason = ?status.exit_reason, "VM ended");
                    record_end(&run.dir, &record, &status);
                }
            }
            table.remove(&run.name);
            drop(table);
            *lock(&run.ended.0) = true;
            run.ended.1.notify_all();
        });
    if let Err(e) = spawned {
        tracing::error!(vm = %run.name, error = %e, "cannot watch the VM");
    }
}

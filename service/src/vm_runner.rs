//! Running VMs: starting one on Strata's VMM in a thread of this process, stopping it, its run
//! record (`status.json`); the console log is in [`super::vm_console`].
//!
//! A run's thread builds the VM again after each guest reboot (disks stay open) and ends when
//! the guest powers off, a stop is requested, the VMM fails, or the guest reboots in a loop.
//! When it ends, it closes the disks, records the outcome and leaves the table of runs, in
//! that order and (the last two) under the table's lock, so that a client seeing "stopped"
//! can at once remove a disk or start the VM again.
//!
//! Lock order: the table of runs, then a run's console, then its record.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use strata_storage::bitmap::{sidecar_path, TrackedDevice};
use strata_storage::{BlockDevice, StorageError};
use strata_vmm::blk::DiskOptions;
use strata_vmm::devices::VmControl;
use strata_vmm::kvm::VcpuExitReason;
use strata_vmm::vm::{DiskSpec, Payload, VmConfig};

use super::vm_console::{ConsoleLog, ConsoleWriter, CONSOLE_FILE, OLD_CONSOLE_FILE};
use super::vms::{BootKind, ConsoleChunk, VmDefinition, VmState, VmStatus, IMAGE_PREFIX};
use super::volumes::Resolved;
use super::{write_atomically, Service, ServiceError, ServiceResult};

/// The exit reason of a VM stopped through the API or the CLI.
pub const STOPPED_BY_REQUEST: &str = "stopped by request";
/// How long a stop request waits for the VM to end.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Where a flat image is loaded and entered.
pub const FLAT_LOAD_ADDR: u64 = 0x10_0000;
/// Largest flat image accepted.
pub const MAX_FLAT_IMAGE: u64 = 64 << 20;
/// A guest that reboots this many times within [`REBOOT_LOOP_WINDOW`] is stopped as failed.
pub const REBOOT_LOOP_LIMIT: usize = 5;
/// See [`REBOOT_LOOP_LIMIT`].
pub const REBOOT_LOOP_WINDOW: Duration = Duration::from_secs(10);

const STATUS_FILE: &str = "status.json";
/// Another process asks the one running the VM to stop it by creating this file.
const STOP_REQUEST_FILE: &str = "stop-request";
/// How often a run looks for [`STOP_REQUEST_FILE`].
const STOP_REQUEST_POLL: Duration = Duration::from_millis(200);

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
    /// The process running it.
    pub pid: u32,
    /// Console bytes rotated away before the current `console.log`.
    pub console_base: u64,
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

    fn to_status(&self, name: &str, console_bytes: u64, running_for: Option<u64>) -> VmStatus {
        let running = self.state == VmState::Running;
        VmStatus {
            name: name.to_string(),
            state: self.state,
            started_at: Some(self.started_at),
            ended_at: self.ended_at,
            uptime_seconds: running_for
                .or_else(|| self.ended_at.map(|end| end.saturating_sub(self.started_at))),
            exit_reason: self.exit_reason.clone(),
            reboots: self.reboots,
            pid: running.then_some(self.pid),
            console_bytes,
        }
    }

    /// The status as a process that does not run the VM sees it: a run recorded as running
    /// whose process is gone has failed.
    pub fn status_seen_from_outside(&self, name: &str, console_bytes: u64) -> VmStatus {
        if self.state != VmState::Running {
            return self.to_status(name, console_bytes, None);
        }
        if self.pid != std::process::id() && process_is_strata(self.pid) {
            let running_for = now().saturating_sub(self.started_at);
            return self.to_status(name, console_bytes, Some(running_for));
        }
        let ended = RunRecord {
            state: VmState::Failed,
            exit_reason: Some(format!(
                "The process that ran it (pid {}) ended without stopping it",
                self.pid
            )),
            ..self.clone()
        };
        ended.to_status(name, console_bytes, None)
    }
}

/// Whether process `pid` lives and is a `strata` process (a reused pid is not).
fn process_is_strata(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "strata")
}

/// The process of another `strata` that runs the VM in `dir`, if any.
fn foreign_owner(dir: &Path) -> ServiceResult<Option<u32>> {
    Ok(RunRecord::load(dir)?.and_then(|r| {
        (r.state == VmState::Running && r.pid != std::process::id() && process_is_strata(r.pid))
            .then_some(r.pid)
    }))
}

/// Removes the run record and console logs in `dir`.
pub fn clear_run_files(dir: &Path) -> ServiceResult<()> {
    for f in [
        STATUS_FILE,
        CONSOLE_FILE,
        OLD_CONSOLE_FILE,
        STOP_REQUEST_FILE,
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

/// A VM running in this process.
#[derive(Debug)]
pub struct Run {
    name: String,
    dir: PathBuf,
    sources: Vec<String>,
    /// Guest memory, counted against the host's.
    memory: u64,
    started: Instant,
    record: Arc<Mutex<RunRecord>>,
    console: Arc<Mutex<ConsoleLog>>,
    control: Mutex<Option<Arc<VmControl>>>,
    stop_requested: AtomicBool,
    /// The exit reason a requested stop records.
    stop_reason: Mutex<&'static str>,
    ended: (Mutex<bool>, Condvar),
}

impl Run {
    /// The status now.
    pub fn status(&self) -> VmStatus {
        let console_bytes = {
            let c = lock(&self.console);
            c.end()
        };
        let record = lock(&self.record).clone();
        let running_for =
            (record.state == VmState::Running).then(|| self.started.elapsed().as_secs());
        record.to_status(&self.name, console_bytes, running_for)
    }

    /// A piece of the console log, read under the log's lock (no rotation in between).
    pub fn read_console(
        &self,
        offset: Option<u64>,
        tail: Option<u64>,
        limit: u64,
    ) -> ServiceResult<ConsoleChunk> {
        lock(&self.console).read(offset, tail, limit)
    }

    fn request_stop(&self, reason: &'static str) {
        let slot = lock(&self.control);
        *lock(&self.stop_reason) = reason;
        self.stop_requested.store(true, Ordering::SeqCst);
        if let Some(control) = slot.as_ref() {
            control.request(VcpuExitReason::Stopped);
        }
    }

    /// Stops the VM when another process asks through [`STOP_REQUEST_FILE`], until it ends.
    fn watch_stop_requests(&self) {
        let path = self.dir.join(STOP_REQUEST_FILE);
        while !self.wait_ended(STOP_REQUEST_POLL) {
            if path.exists() {
                tracing::info!(vm = %self.name, "stop requested by another process");
                self.request_stop(STOPPED_BY_REQUEST);
            }
        }
    }

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

/// The VMs running in this process, by name.
#[derive(Debug, Default)]
pub struct Runs(Arc<Mutex<BTreeMap<String, Arc<Run>>>>);

impl Runs {
    /// The run of `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Run>> {
        lock(&self.0).get(name).cloned()
    }

    /// Runs `f` while holding the table, unless a running VM has `source` as a disk (409).
    pub fn unless_in_use<T>(
        &self,
        source: &str,
        f: impl FnOnce() -> ServiceResult<T>,
    ) -> ServiceResult<T> {
        let table = lock(&self.0);
        if let Some(run) = table
            .values()
            .find(|r| r.sources.iter().any(|s| s == source))
        {
            return Err(ServiceError::Conflict(format!(
                "{source} is a disk of running VM {}; stop the VM first",
                run.name
            )));
        }
        let out = f();
        drop(table);
        out
    }

    /// Runs `f` while holding the table, if VM `name` (folder `dir`) runs nowhere (409 if it
    /// runs here or in another live `strata` process).
    pub fn while_not_running<T>(
        &self,
        name: &str,
        dir: &Path,
        f: impl FnOnce() -> ServiceResult<T>,
    ) -> ServiceResult<T> {
        let table = lock(&self.0);
        if table.contains_key(name) {
            return Err(ServiceError::Conflict(format!(
                "VM {name} is running; stop it first"
            )));
        }
        if let Some(pid) = foreign_owner(dir)? {
            return Err(running_elsewhere(name, pid));
        }
        let out = f();
        drop(table);
        out
    }
}

fn running_elsewhere(name: &str, pid: u32) -> ServiceError {
    ServiceError::Conflict(format!(
        "VM {name} is running (in process {pid}); stop it first"
    ))
}

/// Wraps an image's device so that writes are tracked in its sidecar dirty bitmaps, when the
/// image has a sidecar file and is opened writable (volumes are tracked by the storage layer).
pub fn track_image_writes(
    device: Arc<dyn BlockDevice>,
    image: &Path,
) -> Result<Arc<dyn BlockDevice>, StorageError> {
    let sidecar = sidecar_path(image);
    if !sidecar.exists() || device.read_only() {
        return Ok(device);
    }
    Ok(Arc::new(TrackedDevice::open_image(device, image)?) as Arc<dyn BlockDevice>)
}

/// What a run boots, read once at start.
enum Boot {
    Linux {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
    Flat(Vec<u8>),
}

impl Boot {
    fn load(def: &VmDefinition) -> ServiceResult<Boot> {
        let exists = |what: &str, p: &str| -> ServiceResult<PathBuf> {
            let path = PathBuf::from(p);
            if !path.is_file() {
                return Err(ServiceError::NotFound(format!(
                    "The {what} {p} of VM {}",
                    def.name
                )));
            }
            Ok(path)
        };
        let kernel = exists("kernel", &def.kernel)?;
        match def.boot {
            BootKind::Linux => Ok(Boot::Linux {
                kernel,
                initrd: def
                    .initrd
                    .as_deref()
                    .map(|p| exists("initrd", p))
                    .transpose()?,
                cmdline: def.cmdline.clone(),
            }),
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
                        def.kernel
                    )));
                }
                let image = std::fs::read(&kernel).map_err(|e| io_error("Reading", &kernel, e))?;
                Ok(Boot::Flat(image))
            }
        }
    }

    fn payload(&self) -> Payload {
        match self {
            Boot::Linux {
                kernel,
                initrd,
                cmdline,
            } => Payload::Linux {
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                cmdline: cmdline.clone(),
            },
            Boot::Flat(image) => Payload::Flat {
                image: image.clone(),
                load_addr: FLAT_LOAD_ADDR,
            },
        }
    }
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

/// How a run ended.
struct Outcome {
    state: VmState,
    reason: String,
}

impl Outcome {
    fn stopped(reason: &str) -> Outcome {
        Outcome {
            state: VmState::Stopped,
            reason: reason.into(),
        }
    }

    fn failed(reason: String) -> Outcome {
        Outcome {
            state: VmState::Failed,
            reason,
        }
    }
}

/// Runs the VM until it ends, building it again after each guest reboot.
fn boot_until_end(run: &Run, def: &VmDefinition, boot: &Boot, disks: &[DiskSpec]) -> Outcome {
    let mut reboots: Vec<Instant> = Vec::new();
    loop {
        let control = Arc::new(VmControl::default());
        {
            let mut slot = lock(&run.control);
            if run.stop_requested.load(Ordering::SeqCst) {
                return Outcome::stopped(*lock(&run.stop_reason));
            }
            *slot = Some(control.clone());
        }
        let cfg = VmConfig {
            memory: def.memory,
            cpus: def.vcpus,
            payload: boot.payload(),
            disks: disks
                .iter()
                .map(|d| DiskSpec {
                    name: d.name.clone(),
                    device: Arc::clone(&d.device),
                    options: d.options.clone(),
                })
                .collect(),
            serial: Box::new(ConsoleWriter(run.console.clone())),
            timeout: None,
        };
        let result = strata_vmm::vm::run_with_control(cfg, control);
        *lock(&run.control) = None;
        let stop_requested = run.stop_requested.load(Ordering::SeqCst);
        let report = match result {
            Ok(r) => r,
            Err(e) => return Outcome::failed(format!("The VMM failed: {e}")),
        };
        match report.reason {
            VcpuExitReason::Shutdown => return Outcome::stopped("guest powered off"),
            _ if stop_requested => return Outcome::stopped(*lock(&run.stop_reason)),
            VcpuExitReason::Stopped => {
                return Outcome::failed("The VMM stopped the VM without a request".into())
            }
            VcpuExitReason::Reboot => {
                reboots.retain(|t| t.elapsed() < REBOOT_LOOP_WINDOW);
                reboots.push(Instant::now());
                if reboots.len() >= REBOOT_LOOP_LIMIT {
                    return Outcome::failed(format!(
                        "The guest rebooted {REBOOT_LOOP_LIMIT} times within {} s (a reboot \
                         loop)",
                        REBOOT_LOOP_WINDOW.as_secs()
                    ));
                }
                let mut record = lock(&run.record);
                record.reboots += 1;
                if let Err(e) = record.save(&run.dir) {
                    tracing::warn!(vm = %def.name, error = %e, "recording a reboot failed");
                }
                tracing::info!(vm = %def.name, "guest rebooted");
            }
        }
    }
}

impl Service {
    /// Starts a defined VM in this process (409 if it runs already or a disk is in use by
    /// another running VM; 501 without KVM). Returns at once; the status shows the run.
    pub fn start_vm(&self, name: &str) -> ServiceResult<VmStatus> {
        let def = self.vm_definition(name)?;
        let dir = self.vms.vm_dir(name)?;
        check_kvm(name)?;
        let runs = self.vms.runs.0.clone();
        let mut table = lock(&runs);
        if table.contains_key(name) {
            return Err(ServiceError::Conflict(format!(
                "VM {name} is running already"
            )));
        }
        if let Some(pid) = foreign_owner(&dir)? {
            return Err(running_elsewhere(name, pid));
        }
        // Guest memory is mapped lazily: without this bound, VMs each smaller than the host
        // could together push it into the out-of-memory killer (and the server with them).
        let running: u64 = table.values().map(|r| r.memory).sum();
        if let Some(host) = super::vms::host_memory() {
            let limit = host / 10 * 9;
            if running.saturating_add(def.memory) > limit {
                return Err(ServiceError::Conflict(format!(
                    "VM {name} needs {} MiB, and running VMs hold {} MiB of the {} MiB \
                     allowed (90% of the host's memory)",
                    def.memory >> 20,
                    running >> 20,
                    limit >> 20
                )));
            }
        }
        for d in &def.disks {
            if let Some(other) = table.values().find(|r| r.sources.contains(&d.source)) {
                return Err(ServiceError::Conflict(format!(
                    "{} is a disk of running VM {}",
                    d.source, other.name
                )));
            }
        }
        // The kernel and initrd are checked again (a link may have changed since the
        // definition), and loaded from the resolved paths the check returns.
        let mut def = def;
        def.kernel = path_text(self.server_paths.file("kernel", &def.kernel)?);
        if let Some(initrd) = &def.initrd {
            def.initrd = Some(path_text(self.server_paths.file("initrd", initrd)?));
        }
        let boot = Boot::load(&def)?;
        let mut holders: Vec<Resolved> = Vec::new();
        let mut disks = Vec::new();
        for d in &def.disks {
            let resolved =
                self.resolve_source(&d.source, d.readonly, &format!("VM {}", def.name))?;
            let device = match d.source.strip_prefix(IMAGE_PREFIX) {
                Some(image) => track_image_writes(resolved.device(), &self.image_path(image)?)?,
                None => resolved.device(),
            };
            disks.push(DiskSpec {
                name: d.source.clone(),
                device,
                options: DiskOptions {
                    read_only: d.readonly,
                    serial: d.serial.clone(),
                    ..DiskOptions::default()
                },
            });
            holders.push(resolved);
        }
        let record = Arc::new(Mutex::new(RunRecord {
            state: VmState::Running,
            started_at: now(),
            ended_at: None,
            exit_reason: None,
            reboots: 0,
            pid: std::process::id(),
            console_base: 0,
        }));
        let console = ConsoleLog::create(&dir, record.clone())?;
        remove_stop_request(&dir)?;
        lock(&record).save(&dir)?;
        let run = Arc::new(Run {
            name: name.to_string(),
            dir: dir.clone(),
            sources: def.disks.iter().map(|d| d.source.clone()).collect(),
            memory: def.memory,
            started: Instant::now(),
            record,
            console: Arc::new(Mutex::new(console)),
            control: Mutex::new(None),
            stop_requested: AtomicBool::new(false),
            stop_reason: Mutex::new(STOPPED_BY_REQUEST),
            ended: (Mutex::new(false), Condvar::new()),
        });
        let thread_run = run.clone();
        let thread_runs = runs.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("vm-{name}"))
            .spawn(move || {
                let run = thread_run;
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    boot_until_end(&run, &def, &boot, &disks)
                }))
                .unwrap_or_else(|_| Outcome::failed("The VM's thread panicked".into()));
                // Close the disks before anyone can see the VM ended.
                drop(disks);
                drop(holders);
                finish(&run, &thread_runs, outcome);
            });
        if let Err(e) = spawned {
            let mut r = lock(&run.record);
            r.state = VmState::Failed;
            r.ended_at = Some(now());
            r.exit_reason = Some(format!("Starting the VM's thread failed: {e}"));
            r.save(&dir)?;
            return Err(ServiceError::internal(format!(
                "Starting the thread of VM {name}: {e}"
            )));
        }
        tracing::info!(vm = %name, "VM started");
        let watched = run.clone();
        let watcher = std::thread::Builder::new()
            .name(format!("vm-{name}-watch"))
            .spawn(move || watched.watch_stop_requests());
        if let Err(e) = watcher {
            tracing::warn!(vm = %name, error = %e, "other processes cannot stop this VM");
        }
        table.insert(name.to_string(), run.clone());
        drop(table);
        Ok(run.status())
    }

    /// Stops a running VM (a hard stop; disks are flushed) and waits for it to end (409 if it
    /// is not running). A VM another `strata` process runs is asked to stop through a file in
    /// its folder.
    pub fn stop_vm(&self, name: &str) -> ServiceResult<VmStatus> {
        self.vm_definition(name)?;
        let dir = self.vms.vm_dir(name)?;
        let Some(run) = self.vms.runs.get(name) else {
            if let Some(pid) = foreign_owner(&dir)? {
                return self.stop_foreign_vm(name, &dir, pid);
            }
            return Err(ServiceError::Conflict(format!("VM {name} is not running")));
        };
        run.request_stop(STOPPED_BY_REQUEST);
        if !run.wait_ended(STOP_TIMEOUT) {
            return Err(ServiceError::internal(format!(
                "VM {name} did not stop within {} s",
                STOP_TIMEOUT.as_secs()
            )));
        }
        Ok(run.status())
    }

    fn stop_foreign_vm(&self, name: &str, dir: &Path, pid: u32) -> ServiceResult<VmStatus> {
        let path = dir.join(STOP_REQUEST_FILE);
        File::create(&path).map_err(|e| io_error("Creating", &path, e))?;
        let deadline = Instant::now() + STOP_TIMEOUT + STOP_REQUEST_POLL;
        while foreign_owner(dir)?.is_some() {
            if Instant::now() > deadline {
                return Err(ServiceError::internal(format!(
                    "VM {name} (in process {pid}) did not stop within {} s",
                    STOP_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(STOP_REQUEST_POLL / 2);
        }
        self.vm_status(name)
    }

    /// Stops every VM running in this process and waits for them (at server shutdown, so that
    /// their disks are flushed).
    pub fn stop_all_vms(&self) {
        let runs: Vec<Arc<Run>> = lock(&self.vms.runs.0).values().cloned().collect();
        for run in &runs {
            run.request_stop("stopped: the server shut down");
        }
        for run in &runs {
            if !run.wait_ended(STOP_TIMEOUT) {
                tracing::warn!(vm = %run.name, "VM did not stop in time");
            }
        }
    }

    /// Waits until VM `name` is no longer running in this process, up to `timeout`; returns its
    /// status then (for the CLI's foreground start).
    pub fn wait_vm(&self, name: &str, timeout: Duration) -> ServiceResult<VmStatus> {
        if let Some(run) = self.vms.runs.get(name) {
            run.wait_ended(timeout);
        }
        self.vm_status(name)
    }
}

fn remove_stop_request(dir: &Path) -> ServiceResult<()> {
    let path = dir.join(STOP_REQUEST_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("Removing", &path, e)),
    }
}

/// Records how a run ended and takes it out of the table.
fn finish(run: &Run, runs: &Arc<Mutex<BTreeMap<String, Arc<Run>>>>, outcome: Outcome) {
    tracing::info!(vm = %run.name, state = ?outcome.state, reason = %outcome.reason, "VM ended");
    {
        let mut table = lock(runs);
        {
            let mut r = lock(&run.record);
            r.state = outcome.state;
            r.ended_at = Some(now());
            r.exit_reason = Some(outcome.reason);
            if let Err(e) = r.save(&run.dir) {
                tracing::warn!(vm = %run.name, error = %e, "recording the VM's end failed");
            }
        }
        if let Err(e) = remove_stop_request(&run.dir) {
            tracing::warn!(vm = %run.name, error = %e, "a stop request stays behind");
        }
        table.remove(&run.name);
    }
    *lock(&run.ended.0) = true;
    run.ended.1.notify_all();
}

/// A resolved path as the text a definition holds (resolved paths come from `canonicalize`,
/// so they are the file system's own names).
fn path_text(p: PathBuf) -> String {
    p.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_recorded_by_a_dead_process_has_failed() {
        let record = RunRecord {
            state: VmState::Running,
            started_at: 1,
            ended_at: None,
            exit_reason: None,
            reboots: 0,
            pid: u32::MAX - 1,
            console_base: 0,
        };
        let s = record.status_seen_from_outside("x", 0);
        assert_eq!(s.state, VmState::Failed);
        assert!(s.exit_reason.unwrap().contains("ended without stopping it"));
        assert_eq!(s.pid, None);
    }
}

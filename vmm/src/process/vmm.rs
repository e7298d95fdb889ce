//! The VMM process proper (the monitor's child): opens what the VM needs, confines itself,
//! serves the control socket and runs the VM, building it again after each guest reboot, until
//! the guest powers off, a stop is asked for, the VMM fails, or the guest reboots in a loop.

use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_storage::format::{open_image, ImageFormat, OpenOptions, References};
use strata_storage::BlockDevice;

use super::config::{
    BootSpec, DiskConfig, DiskSource, EndState, NicConfig, Outcome, VmmConfig, MAX_BOOT_FILE,
};
use super::console::{ConsoleBuffer, ConsoleWriter};
use super::served::ServedDisk;
use super::NoteLine;
use crate::blk::config::DiskCounters;
use crate::blk::DiskOptions;
use crate::control::{
    Answer, ConsoleChunk, ControlHandler, DiskStats, Reply, Request, RunState, SandboxInfo,
    VmmStatus,
};
use crate::devices::VmControl;
use crate::kvm::VcpuExitReason;
use crate::net::config::parse_mac;
use crate::net::tap::{TapIo, TapQueue};
use crate::net::NetOptions;
use crate::sandbox::{self, jail, Role};
use crate::vm::{DiskSpec, NetSpec, Payload, VmConfig};

/// The environment variable that makes threads of one role make a forbidden system call (the
/// test of the seccomp filters; see [`sandbox::enable_seccomp`]).
pub const SECCOMP_PROBE_ENV: &str = "STRATA_VMM_SECCOMP_PROBE";
/// How long a pause waits for the vCPUs to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request that needs the built VM waits for it to be built.
const BUILD_WAIT: Duration = Duration::from_secs(10);

/// What the VM boots, read into memory before the sandbox closes.
enum Boot {
    Linux {
        name: String,
        kernel: Arc<Vec<u8>>,
        initrd: Option<Arc<Vec<u8>>>,
        cmdline: String,
    },
    Flat {
        image: Arc<Vec<u8>>,
        load_addr: u64,
    },
}

impl Boot {
    fn payload(&self) -> Payload {
        match self {
            Boot::Linux {
                name,
                kernel,
                initrd,
                cmdline,
            } => Payload::LinuxImage {
                name: name.clone(),
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                cmdline: cmdline.clone(),
            },
            Boot::Flat { image, load_addr } => Payload::Flat {
                image: image.as_ref().clone(),
                load_addr: *load_addr,
            },
        }
    }
}

fn read_bounded(path: &Path, max: u64, what: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    File::open(path)
        .and_then(|f| f.take(max + 1).read_to_end(&mut out))
        .map_err(|e| format!("Reading the {what} {}: {e}", path.display()))?;
    if out.len() as u64 > max {
        return Err(format!(
            "The {what} {} is larger than {max} bytes",
            path.display()
        ));
    }
    Ok(out)
}

fn load_boot(spec: &BootSpec, memory: u64) -> Result<Boot, String> {
    Ok(match spec {
        BootSpec::Linux {
            kernel,
            initrd,
            cmdline,
        } => Boot::Linux {
            name: kernel.display().to_string(),
            kernel: Arc::new(read_bounded(kernel, MAX_BOOT_FILE, "kernel")?),
            initrd: initrd
                .as_deref()
                .map(|p| read_bounded(p, MAX_BOOT_FILE, "initrd").map(Arc::new))
                .transpose()?,
            cmdline: cmdline.clone(),
        },
        BootSpec::Flat { image, load_addr } => {
            let room = memory.saturating_sub(*load_addr).min(MAX_BOOT_FILE);
            Boot::Flat {
                image: Arc::new(read_bounded(image, room, "flat image")?),
                load_addr: *load_addr,
            }
        }
    })
}

/// One open disk.
struct Disk {
    name: String,
    device: Arc<dyn BlockDevice>,
    served: Option<Arc<ServedDisk>>,
    options: DiskOptions,
    counters: Arc<DiskCounters>,
}

fn open_disk(d: &DiskConfig) -> Result<Disk, String> {
    let mut served = None;
    let device: Arc<dyn BlockDevice> = match &d.source {
        DiskSource::Image { path, format } => {
            let format: ImageFormat = format
                .parse()
                .map_err(|e| format!("Disk {}: {e}", d.name))?;
            let opts = OpenOptions {
                format: Some(format),
                references: References::Refuse,
                read_only: d.read_only,
                ..OpenOptions::default()
            };
            open_image(path, &opts).map_err(|e| format!("Opening disk {}: {e}", d.name))?
        }
        DiskSource::Served {
            fd,
            size,
            writable,
            discard,
            write_zeroes,
        } => {
            // SAFETY: the supervisor passed this descriptor to us for this disk alone, and
            // nothing else in the process owns it.
            let socket = unsafe { OwnedFd::from_raw_fd(*fd) };
            let disk = ServedDisk::start(
                &d.name,
                socket,
                *size,
                *writable && !d.read_only,
                *discard,
                *write_zeroes,
            )
            .map_err(|e| format!("Disk {}: {e}", d.name))?;
            served = Some(disk.clone());
            disk
        }
    };
    let counters = Arc::new(DiskCounters::default());
    Ok(Disk {
        name: d.name.clone(),
        device,
        served,
        options: DiskOptions {
            read_only: d.read_only,
            num_queues: d.queues.max(1),
            serial: d.serial.clone(),
            counters: Some(counters.clone()),
            ..DiskOptions::default()
        },
        counters,
    })
}

/// One NIC, its tap queues taken from the descriptors the supervisor passed.
struct Nic {
    name: String,
    taps: Vec<Arc<dyn TapIo>>,
    options: NetOptions,
}

fn open_nic(n: &NicConfig) -> Result<Nic, String> {
    let mac = parse_mac(&n.mac).map_err(|e| format!("NIC {}: {e}", n.name))?;
    let mut seen = Vec::new();
    let mut taps: Vec<Arc<dyn TapIo>> = Vec::new();
    for &fd in &n.fds {
        if fd <= 2 || seen.contains(&fd) {
            return Err(format!(
                "NIC {}: descriptor {fd} is not a tap queue",
                n.name
            ));
        }
        seen.push(fd);
        // SAFETY: the supervisor passed this descriptor to us for this NIC alone (checked
        // above to be distinct and not a standard stream), and nothing else in the process
        // owns it.
        let q = TapQueue::from_fd(unsafe { OwnedFd::from_raw_fd(fd) });
        q.name()
            .map_err(|e| format!("NIC {}: descriptor {fd} is not a tap queue: {e}", n.name))?;
        taps.push(Arc::new(q));
    }
    let queue_pairs = u16::try_from(taps.len()).unwrap_or(u16::MAX);
    Ok(Nic {
        name: n.name.clone(),
        taps,
        options: NetOptions {
            mac,
            queue_pairs,
            rate_bytes_per_sec: n.rate_bytes_per_sec,
            counters: Some(Arc::default()),
            ..NetOptions::default()
        },
    })
}

/// What the control socket and the boot loop share.
struct Shared {
    started: Instant,
    console: Arc<ConsoleBuffer>,
    control: Mutex<Option<Arc<VmControl>>>,
    stop: Mutex<Option<String>>,
    reboots: AtomicU32,
    presses: AtomicU32,
    disks: Vec<(String, Arc<DiskCounters>)>,
    sandbox: Mutex<SandboxInfo>,
}

impl Shared {
    fn control(&self) -> Option<Arc<VmControl>> {
        self.control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The built VM's control, waiting up to [`BUILD_WAIT`] while the VM is being built (right
    /// after start, or between a guest reboot and the next boot).
    fn built_control(&self) -> Option<Arc<VmControl>> {
        let deadline = Instant::now() + BUILD_WAIT;
        loop {
            if let Some(c) = self.control().filter(|c| c.is_built()) {
                return Some(c);
            }
            if Instant::now() > deadline || self.stop_reason().is_some() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn stop_reason(&self) -> Option<String> {
        self.stop.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ControlHandler for Shared {
    fn handle(&self, req: Request) -> Answer {
        match req {
            Request::Status => {
                let control = self.control();
                let state = if self.stop_reason().is_some() {
                    RunState::Stopping
                } else if control.as_ref().is_some_and(|c| c.is_paused()) {
                    RunState::Paused
                } else {
                    RunState::Running
                };
                Answer::Ok(Reply::Status(VmmStatus {
                    state,
                    reboots: self.reboots.load(Ordering::SeqCst),
                    console_end: self.console.end(),
                    power_button_presses: self.presses.load(Ordering::SeqCst),
                    uptime_seconds: self.started.elapsed().as_secs(),
                    sandbox: self
                        .sandbox
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone(),
                }))
            }
            Request::Pause => match self.built_control() {
                Some(c) if c.pause(PAUSE_TIMEOUT) => Answer::Ok(Reply::Done),
                Some(_) => Answer::Error(format!(
                    "The vCPUs did not pause within {} s",
                    PAUSE_TIMEOUT.as_secs()
                )),
                None => Answer::Error("The VM is between boots; try again".into()),
            },
            Request::Resume => {
                if let Some(c) = self.control() {
                    c.resume();
                }
                Answer::Ok(Reply::Done)
            }
            Request::PowerButton => match self.built_control() {
                Some(c) if c.press_power_button() => {
                    self.presses.fetch_add(1, Ordering::SeqCst);
                    tracing::info!("power button pressed");
                    Answer::Ok(Reply::Done)
                }
                _ => Answer::Error("The VM is between boots; try again".into()),
            },
            Request::Stop { reason } => {
                let slot = self.control.lock().unwrap_or_else(|p| p.into_inner());
                self.stop
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(reason);
                if let Some(c) = slot.as_ref() {
                    c.resume();
                    c.request(VcpuExitReason::Stopped);
                }
                Answer::Ok(Reply::Done)
            }
            Request::DiskStats => Answer::Ok(Reply::DiskStats {
                disks: self
                    .disks
                    .iter()
                    .map(|(name, c)| {
                        let (requests, errors, bytes) = c.snapshot();
                        DiskStats {
                            name: name.clone(),
                            requests,
                            errors,
                            bytes,
                        }
                    })
                    .collect(),
            }),
            Request::Console { .. } => Answer::Error("Console requests stream".into()),
        }
    }

    fn console(&self, from: u64, wait: Duration) -> Option<ConsoleChunk> {
        self.console.read(from, wait)
    }

    fn console_end(&self) -> u64 {
        self.console.end()
    }
}

/// Sends a line to the monitor.
fn note(pipe: &mut File, line: &NoteLine) {
    use std::io::Write;
    if let Ok(mut bytes) = serde_json::to_vec(line) {
        bytes.push(b'\n');
        let _ = pipe.write_all(&bytes);
    }
}

/// Runs the VMM; returns the process's exit code (0 stopped, 1 failed). Everything it has to
/// say on the way out goes to `notes`.
pub fn run_vmm(
    cfg: VmmConfig,
    socket: &Path,
    console_pipe: File,
    mut notes: File,
    mut missing: Vec<String>,
) -> i32 {
    let fail = |notes: &mut File, reason: String| {
        note(
            notes,
            &NoteLine::Outcome(Outcome {
                state: EndState::Failed,
                reason,
                reboots: 0,
            }),
        );
        1
    };
    // Everything the VM will use is opened now, as the user that started us.
    let kvm = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(f) => Arc::new(OwnedFd::from(f)),
        Err(e) => return fail(&mut notes, format!("Cannot open /dev/kvm: {e}")),
    };
    let boot = match load_boot(&cfg.boot, cfg.memory) {
        Ok(b) => b,
        Err(e) => return fail(&mut notes, e),
    };
    let mut disks = Vec::new();
    for d in &cfg.disks {
        match open_disk(d) {
            Ok(disk) => disks.push(disk),
            Err(e) => return fail(&mut notes, e),
        }
    }
    if !cfg.nics.is_empty() {
        // Looks at /dev/vhost-net once, now that files can still be seen.
        crate::net::device::vhost_net_notice();
    }
    let mut nics = Vec::new();
    for n in &cfg.nics {
        match open_nic(n) {
            Ok(nic) => nics.push(nic),
            Err(e) => return fail(&mut notes, e),
        }
    }
    let _ = std::fs::remove_file(socket);
    let listener = match UnixListener::bind(socket) {
        Ok(l) => l,
        Err(e) => {
            return fail(
                &mut notes,
                format!("Binding the control socket {}: {e}", socket.display()),
            )
        }
    };
    if let Err(e) = std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)) {
        return fail(&mut notes, format!("Protecting the control socket: {e}"));
    }
    // Then the process gives up everything else.
    let root = jail::is_root();
    if cfg.sandbox.namespaces && root {
        match jail::enter_namespaces(true) {
            Ok(m) => missing.extend(m.0),
            Err(e) => return fail(&mut notes, format!("Setting up the VMM's namespaces: {e}")),
        }
    } else if cfg.sandbox.namespaces {
        missing.push("namespaces (the VMM does not run as root)".into());
    }
    if let Err(e) = jail::harden() {
        return fail(&mut notes, format!("Hardening the VMM process: {e}"));
    }
    let (uid, gid) = match cfg.sandbox.uid_gid {
        Some((uid, gid)) if root => {
            if let Err(e) = jail::drop_privileges(uid, gid) {
                return fail(&mut notes, format!("Dropping privileges: {e}"));
            }
            (uid, gid)
        }
        _ => {
            // SAFETY: getuid and getgid have no arguments and cannot fail.
            let ids = unsafe { (libc::getuid(), libc::getgid()) };
            if root {
                missing.push("an unprivileged uid (none configured)".into());
            }
            ids
        }
    };
    if !missing.is_empty() {
        let line = "!".repeat(78);
        let text = format!(
            "the VMM of {} runs without: {}",
            cfg.name,
            missing.join("; ")
        );
        eprintln!("{line}\nWARNING: {text}\n{line}");
        tracing::warn!("{text}");
        note(&mut notes, &NoteLine::Note(format!("sandbox: {text}")));
    }
    let mut seccomp = false;
    if cfg.sandbox.seccomp {
        sandbox::set_note_fd(std::os::fd::AsRawFd::as_raw_fd(&notes));
        let probe = std::env::var(SECCOMP_PROBE_ENV)
            .ok()
            .and_then(|r| Role::from_name(&r));
        if let Err(e) = sandbox::enable_seccomp(probe) {
            return fail(&mut notes, e.to_string());
        }
        if let Err(e) = sandbox::start_device_thread() {
            return fail(&mut notes, format!("Starting the device thread: {e}"));
        }
        seccomp = true;
    }
    for disk in disks.iter().filter_map(|d| d.served.as_ref()) {
        if let Err(e) = disk.start_reader() {
            return fail(&mut notes, format!("Starting a disk's reader thread: {e}"));
        }
    }
    let console = ConsoleBuffer::new(console_pipe);
    let shared = Arc::new(Shared {
        started: Instant::now(),
        console: console.clone(),
        control: Mutex::new(None),
        stop: Mutex::new(None),
        reboots: AtomicU32::new(0),
        presses: AtomicU32::new(0),
        disks: disks
            .iter()
            .map(|d| (d.name.clone(), d.counters.clone()))
            .collect(),
        sandbox: Mutex::new(SandboxInfo {
            uid,
            gid,
            seccomp,
            missing,
        }),
    });
    if let Err(e) = crate::control::serve(listener, shared.clone()) {
        return fail(&mut notes, format!("Starting the control server: {e}"));
    }
    sandbox::enter(Role::Vmm);
    let outcome = boot_until_end(&cfg, &shared, &boot, &disks, &nics, &kvm);
    // Close the disks (flushed when the last boot ended) before the monitor can report the end.
    drop(disks);
    console.finish();
    let code = i32::from(outcome.state == EndState::Failed);
    note(&mut notes, &NoteLine::Outcome(outcome));
    code
}

fn outcome(state: EndState, reason: impl Into<String>, shared: &Shared) -> Outcome {
    Outcome {
        state,
        reason: reason.into(),
        reboots: shared.reboots.load(Ordering::SeqCst),
    }
}

/// Runs the VM until it ends, building it again after each guest reboot.
fn boot_until_end(
    cfg: &VmmConfig,
    shared: &Shared,
    boot: &Boot,
    disks: &[Disk],
    nics: &[Nic],
    kvm: &Arc<OwnedFd>,
) -> Outcome {
    let mut reboots: Vec<Instant> = Vec::new();
    let window = Duration::from_secs(cfg.reboot_limit.window_seconds);
    loop {
        let control = Arc::new(VmControl::default());
        {
            let mut slot = shared.control.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(reason) = shared.stop_reason() {
                return outcome(EndState::Stopped, reason, shared);
            }
            *slot = Some(control.clone());
        }
        let vm = VmConfig {
            memory: cfg.memory,
            cpus: cfg.vcpus,
            payload: boot.payload(),
            disks: disks
                .iter()
                .map(|d| DiskSpec {
                    name: d.name.clone(),
                    device: d.device.clone(),
                    options: d.options.clone(),
                })
                .collect(),
            nets: nics
                .iter()
                .map(|n| NetSpec {
                    name: n.name.clone(),
                    taps: n.taps.clone(),
                    options: n.options.clone(),
                })
                .collect(),
            serial: Box::new(ConsoleWriter(shared.console.clone())),
            timeout: None,
            kvm: Some(kvm.clone()),
        };
        let result = crate::vm::run_with_control(vm, control);
        *shared.control.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let stop = shared.stop_reason();
        let report = match result {
            Ok(r) => r,
            Err(e) => return outcome(EndState::Failed, format!("The VMM failed: {e}"), shared),
        };
        match report.reason {
            VcpuExitReason::Shutdown => {
                let why = if shared.presses.load(Ordering::SeqCst) > 0 {
                    "guest powered off after the power button was pressed"
                } else {
                    "guest powered off"
                };
                return outcome(EndState::Stopped, why, shared);
            }
            _ if stop.is_some() => {
                return outcome(EndState::Stopped, stop.unwrap_or_default(), shared)
            }
            VcpuExitReason::Stopped => {
                return outcome(
                    EndState::Failed,
                    "The VMM stopped the VM without a request",
                    shared,
                )
            }
            VcpuExitReason::Reboot => {
                reboots.retain(|t| t.elapsed() < window);
                reboots.push(Instant::now());
                if reboots.len() >= cfg.reboot_limit.count {
                    return outcome(
                        EndState::Failed,
                        format!(
                            "The guest rebooted {} times within {} s (a reboot loop)",
                            cfg.reboot_limit.count, cfg.reboot_limit.window_seconds
                        ),
                        shared,
                    );
                }
                shared.reboots.fetch_add(1, Ordering::SeqCst);
                tracing::info!(vm = %cfg.name, "guest rebooted");
            }
        }
    }
}

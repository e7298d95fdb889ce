//! What the supervisor tells a VMM process to run (`vmm.json`), and what the VMM's monitor
//! records when it ends (`exit.json`). Both are files in the VM's folder, written atomically.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The VMM's configuration file in the VM's folder.
pub const CONFIG_FILE: &str = "vmm.json";
/// The control socket in the VM's folder.
pub const SOCKET_FILE: &str = "control.sock";
/// The monitor's exit record in the VM's folder.
pub const EXIT_FILE: &str = "exit.json";
/// The VMM's own log (its stderr) in the VM's folder.
pub const LOG_FILE: &str = "vmm.log";
/// The console log of the current or last run.
pub const CONSOLE_FILE: &str = "console.log";
/// The previous console log (the run before, or the part rotated away).
pub const OLD_CONSOLE_FILE: &str = "console.old.log";
/// Where the console log's first byte is in the run's console stream.
pub const CONSOLE_STATE_FILE: &str = "console.json";
/// The console log is rotated to [`OLD_CONSOLE_FILE`] when it reaches this size.
pub const CONSOLE_LOG_LIMIT: u64 = 16 << 20;
/// Largest configuration file read.
pub const MAX_CONFIG: u64 = 1 << 20;
/// Largest flat image or initrd read into memory, and largest kernel.
pub const MAX_BOOT_FILE: u64 = 1 << 30;

/// What the VM boots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum BootSpec {
    /// A bzImage through the 64-bit boot protocol.
    Linux {
        /// The bzImage.
        kernel: PathBuf,
        /// An initramfs.
        initrd: Option<PathBuf>,
        /// The command line.
        cmdline: String,
    },
    /// A freestanding image loaded and entered at `load_addr`.
    Flat {
        /// The image file.
        image: PathBuf,
        /// Where it goes.
        load_addr: u64,
    },
}

/// Where a disk comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DiskSource {
    /// An image file the VMM opens itself, in its recorded format, refusing references to
    /// other files.
    Image {
        /// The file.
        path: PathBuf,
        /// Its format's name (`raw`, `qcow2`, ...).
        format: String,
    },
    /// A disk the supervisor serves over NBD on a connected socket the VMM inherits as
    /// descriptor `fd` (the handshake is done; transmission starts at once).
    Served {
        /// The inherited descriptor.
        fd: i32,
        /// The disk's size in bytes.
        size: u64,
        /// Whether the server takes writes.
        writable: bool,
        /// Whether it takes discard (TRIM).
        discard: bool,
        /// Whether it takes write-zeroes.
        write_zeroes: bool,
    },
}

/// One disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// The source as the definition names it (`lv:VG/NAME`, `image:NAME`).
    pub name: String,
    /// Where the data is.
    pub source: DiskSource,
    /// Present it read-only.
    pub read_only: bool,
    /// GET_ID string.
    pub serial: String,
    /// Virtqueues.
    pub queues: u16,
}

/// One NIC: a tap the supervisor opened (and attached to its network's bridge), whose queue
/// descriptors the VMM inherits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicConfig {
    /// The network and tap, for logs (`NETWORK/TAP`).
    pub name: String,
    /// The guest's MAC address (`52:54:00:12:34:56`).
    pub mac: String,
    /// The tap's queue descriptors, one per queue pair.
    pub fds: Vec<i32>,
    /// A rate limit in bytes per second, each way.
    pub rate_bytes_per_sec: Option<u64>,
}

/// How to confine the VMM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// Become this uid/gid after opening everything (only when started as root).
    pub uid_gid: Option<(u32, u32)>,
    /// New mount (empty root), IPC, UTS, network and pid namespaces.
    pub namespaces: bool,
    /// Seccomp filters per thread role.
    pub seccomp: bool,
}

impl Default for SandboxSpec {
    fn default() -> Self {
        SandboxSpec {
            uid_gid: None,
            namespaces: true,
            seccomp: true,
        }
    }
}

/// When repeated guest reboots count as a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebootLimit {
    /// This many reboots...
    pub count: usize,
    /// ...within this many seconds.
    pub window_seconds: u64,
}

/// The whole configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmConfig {
    /// The VM's name.
    pub name: String,
    /// This run's id, repeated in the exit record.
    pub run_id: String,
    /// Guest memory in bytes.
    pub memory: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// What to boot.
    pub boot: BootSpec,
    /// Disks in order.
    pub disks: Vec<DiskConfig>,
    /// NICs in order.
    #[serde(default)]
    pub nics: Vec<NicConfig>,
    /// The VM's folder (console logs, exit record).
    pub dir: PathBuf,
    /// Confinement.
    pub sandbox: SandboxSpec,
    /// The reboot-loop limit.
    pub reboot_limit: RebootLimit,
}

impl VmmConfig {
    /// Reads a configuration file (at most [`MAX_CONFIG`] bytes).
    pub fn load(path: &Path) -> std::io::Result<VmmConfig> {
        use std::io::Read;
        let mut text = Vec::new();
        std::fs::File::open(path)?
            .take(MAX_CONFIG + 1)
            .read_to_end(&mut text)?;
        if text.len() as u64 > MAX_CONFIG {
            return Err(std::io::Error::other(format!(
                "{} is larger than {MAX_CONFIG} bytes",
                path.display()
            )));
        }
        serde_json::from_slice(&text).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })
    }
}

/// How a run ended, as the VMM saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndState {
    /// Normally: the guest powered off or a stop was asked for.
    Stopped,
    /// By an error.
    Failed,
}

/// The VMM's own account of the end, sent to the monitor just before it exits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// Stopped or failed.
    pub state: EndState,
    /// Why.
    pub reason: String,
    /// Guest reboots during the run.
    pub reboots: u32,
}

/// What the monitor writes when the VMM process has ended (`exit.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// The run ([`VmmConfig::run_id`]).
    pub run_id: String,
    /// The VMM process's pid (in the supervisor's pid namespace).
    pub vmm_pid: u32,
    /// When it ended (seconds since the epoch).
    pub ended_at: u64,
    /// Its exit code, if it exited.
    pub exit_code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// The VMM's own account, if it got to give one.
    pub outcome: Option<Outcome>,
    /// Other things it said on the way out (a seccomp violation names the call here).
    pub notes: Vec<String>,
}

impl ExitRecord {
    /// The record in folder `dir`, if there is one.
    pub fn load(dir: &Path) -> std::io::Result<Option<ExitRecord>> {
        match std::fs::read(dir.join(EXIT_FILE)) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// How the run ended, in words, and whether it ended well.
    pub fn describe(&self) -> (EndState, String) {
        let signal = self.signal.map(signal_name);
        match (&self.outcome, signal) {
            (Some(o), None) => (o.state, o.reason.clone()),
            (_, Some(sig)) => {
                let mut why = format!("The VMM process (pid {}) was killed by {sig}", self.vmm_pid);
                if let Some(note) = self.notes.first() {
                    why.push_str(": ");
                    why.push_str(note);
                }
                (EndState::Failed, why)
            }
            (None, None) => (
                EndState::Failed,
                format!(
                    "The VMM process (pid {}) exited with status {} without saying why{}",
                    self.vmm_pid,
                    self.exit_code.unwrap_or(-1),
                    self.notes
                        .first()
                        .map(|n| format!(": {n}"))
                        .unwrap_or_default()
                ),
            ),
        }
    }
}

/// A signal's name (SIGKILL, SIGSYS, ...), or its number.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSYS => "SIGSYS",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGPIPE => "SIGPIPE",
        _ => return format!("signal {sig}"),
    };
    format!("{name} (signal {sig})")
}

/// Where the console log's first byte is in the run's stream (`console.json`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleState {
    /// Stream offset of `console.log`'s first byte (bytes rotated away before it).
    pub base: u64,
}

impl ConsoleState {
    /// The state in folder `dir` (base 0 when absent or unreadable: a run before any rotation).
    pub fn load(dir: &Path) -> ConsoleState {
        std::fs::read(dir.join(CONSOLE_STATE_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }
}

/// Writes `bytes` to `path` atomically, readable by its owner only (a temporary file, fsync,
/// rename, fsync of the folder: [`strata_storage::durable::write_atomically`]).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use strata_storage::durable::{write_atomically, Create};
    write_atomically(path, bytes, 0o600, Create::OrReplace).map_err(std::io::Error::other)
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

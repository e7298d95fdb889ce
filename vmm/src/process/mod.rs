//! One process per VM: `strata vm run --config FILE --api-socket PATH`.
//!
//! ```text
//! supervisor (strata serve, or a local `strata vm start`)
//!   └─ monitor  (this process: outside the sandbox; console log, exit record)
//!        └─ VMM (forked into a new pid namespace; namespaces, uid drop, seccomp)
//! ```
//!
//! The supervisor writes `vmm.json` ([`config::VmmConfig`]) in the VM's folder and starts this
//! process in a session of its own, so that the VM outlives the supervisor. The process makes
//! two pipes (console bytes, notes), asks for a new pid namespace for its next child, and
//! forks: the child runs the VM ([`vmm::run_vmm`]), the parent becomes its monitor
//! ([`monitor::run`]). The VMM dies with its monitor (parent-death signal), so killing either
//! ends the VM, and the monitor records how the VMM ended (its exit status or signal, and what
//! it said: its outcome, or the system call a seccomp filter refused) in `exit.json`, which any
//! later supervisor reads.
//!
//! Files in the VM's folder: see [`config`]'s constants.

pub mod config;
mod console;
mod monitor;
mod served;
mod vmm;

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use config::{ExitRecord, VmmConfig};
pub use served::{client_handshake, ExportFacts, ServedDisk};
pub use vmm::SECCOMP_PROBE_ENV;

/// A line the VMM sends its monitor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoteLine {
    /// How the run ended.
    Outcome(config::Outcome),
    /// Anything else worth keeping.
    Note(String),
}

/// Why the VMM process could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The configuration could not be read.
    #[error("Reading the VMM configuration: {0}")]
    Config(std::io::Error),
    /// The process has threads already (forking would copy a process in an unknown state).
    #[error("The VMM process must start single-threaded (it has {0} threads)")]
    Threads(usize),
    /// A system call failed.
    #[error("{0}: {1}")]
    Os(&'static str, std::io::Error),
}

fn pipe() -> Result<(OwnedFd, OwnedFd), ProcessError> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the local array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(ProcessError::Os(
            "Creating a pipe",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Closes every descriptor above stderr except `keep` (whatever the supervisor let through by
/// accident must not reach the sandboxed VMM: another VM's disk, a token file).
fn close_inherited(keep: &[i32]) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2 && !keep.contains(fd))
        .collect();
    for fd in fds {
        // SAFETY: closing a descriptor of this single-threaded process that nothing in it owns
        // (the directory listing's own descriptor is closed already and fails harmlessly).
        unsafe { libc::close(fd) };
    }
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(1, |d| d.count())
}

/// Runs the VM described by the file `config` with its control socket at `socket`; returns
/// when the VM has ended and its exit record is written (the monitor's side), or never (the
/// VMM's side exits the process).
pub fn run(config: &Path, socket: &Path) -> Result<(), ProcessError> {
    let cfg = VmmConfig::load(config).map_err(ProcessError::Config)?;
    let threads = thread_count();
    if threads > 1 {
        return Err(ProcessError::Threads(threads));
    }
    let mut inherited: Vec<i32> = cfg
        .disks
        .iter()
        .filter_map(|d| match d.source {
            config::DiskSource::Served { fd, .. } => Some(fd),
            config::DiskSource::Image { .. } => None,
        })
        .collect();
    inherited.extend(cfg.nics.iter().flat_map(|n| n.fds.iter().copied()));
    close_inherited(&inherited);
    let (console_r, console_w) = pipe()?;
    let (notes_r, notes_w) = pipe()?;
    // A roomy console pipe, so that a busy monitor seldom holds up a vCPU writing the console.
    // SAFETY: fcntl(F_SETPIPE_SZ) on our own pipe; failure leaves the default size.
    unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&console_w),
            libc::F_SETPIPE_SZ,
            1 << 20,
        )
    };
    let mut missing = Vec::new();
    if cfg.sandbox.namespaces && sandbox_root() {
        if let Err(e) = crate::sandbox::jail::unshare_pid_namespace() {
            missing.push(e);
        }
    }
    // SAFETY: the process is single-threaded (checked above), so the child starts in a
    // consistent state; both sides only continue with code of this module.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(ProcessError::Os(
            "Starting the VMM process",
            std::io::Error::last_os_error(),
        ));
    }
    if pid == 0 {
        // The VMM. It must not outlive its monitor.
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
        drop(console_r);
        drop(notes_r);
        let code = vmm::run_vmm(
            cfg,
            socket,
            File::from(console_w),
            File::from(notes_w),
            missing,
        );
        std::process::exit(code);
    }
    drop(console_w);
    drop(notes_w);
    monitor::run(&cfg, pid, console_r, notes_r);
    Ok(())
}

fn sandbox_root() -> bool {
    crate::sandbox::jail::is_root()
}

//! The seccomp filters, one per [`Role`], built with `seccompiler` (BPF compiled once, at
//! [`super::enable_seccomp`]). A call outside a thread's filter traps (SIGSYS; see `sigsys.rs`).
//!
//! Every filter allows what any Rust thread needs to live and die (memory, futexes, signals
//! returning, its own exit, writing a log line) and the calls the SIGSYS handler makes. Beyond
//! that, each role gets only what its code calls; `ioctl` is limited to KVM's ioctl type (the
//! VMM's main thread) or to KVM_RUN alone (vCPUs). Nothing may open a file, create a socket,
//! execute a program, or change credentials.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::Role;

/// KVM's ioctl type (the `0xAE` in `_IO(KVMIO, n)`).
const KVMIO: u64 = 0xae;
/// `KVM_RUN`, `_IO(KVMIO, 0x80)`.
const KVM_RUN: u64 = 0xae80;

/// Why the sandbox could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A filter did not compile (a bug in the rules below).
    #[error("Building the seccomp filter for {0}: {1}")]
    Build(&'static str, String),
    /// The kernel refused a filter.
    #[error("Installing the seccomp filter: {0}")]
    Apply(String),
    /// The SIGSYS handler could not be installed.
    #[error("Installing the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

/// Every role's compiled filter.
pub(super) struct Filters(BTreeMap<Role, BpfProgram>);

impl Filters {
    pub(super) fn compile() -> Result<Filters, SeccompError> {
        let mut out = BTreeMap::new();
        for role in Role::ALL {
            let err = |e: &dyn std::fmt::Display| SeccompError::Build(role.name(), e.to_string());
            let filter = SeccompFilter::new(
                rules(role).map_err(|e| err(&e))?,
                SeccompAction::Trap,
                SeccompAction::Allow,
                TargetArch::x86_64,
            )
            .map_err(|e| err(&e))?;
            let program: BpfProgram = filter.try_into().map_err(|e| err(&e))?;
            out.insert(role, program);
        }
        Ok(Filters(out))
    }

    /// Installs `role`'s filter on the calling thread.
    pub(super) fn apply(&self, role: Role) -> Result<(), SeccompError> {
        let program = self
            .0
            .get(&role)
            .ok_or_else(|| SeccompError::Apply(format!("no filter for {}", role.name())))?;
        seccompiler::apply_filter(program).map_err(|e| SeccompError::Apply(e.to_string()))
    }
}

/// A call no filter allows, for the test hook: creating a socket.
pub(super) fn forbidden_call() {
    // SAFETY: socket(2) with constant arguments; if it were allowed we would close the result.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd >= 0 {
        // SAFETY: closing the descriptor we just got.
        unsafe { libc::close(fd) };
    }
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Calls every thread makes: memory, synchronisation, signals, time, exit, logging, and what
/// the SIGSYS handler calls.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_getrandom,
    libc::SYS_write,
    libc::SYS_close,
    // Descriptor flags of descriptors the thread holds (Rust checks a descriptor is open when
    // it drops one, in debug builds).
    libc::SYS_fcntl,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_sched_getaffinity,
    // Filters only ever narrow: a new thread adds its role's, the SIGSYS handler a last one.
    libc::SYS_seccomp,
];

/// What a thread that creates threads needs besides [`COMMON`].
const SPAWN: &[i64] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_prctl,
    libc::SYS_getrlimit,
    libc::SYS_prlimit64,
];

/// Eventfds, epoll and plain reads and writes on descriptors the thread was given.
const EVENTS: &[i64] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_fcntl,
    libc::SYS_dup,
];

/// The block layer's data path on descriptors already open: io_uring, the thread-pool engine's
/// positional I/O, and a socket to the supervisor's disk server.
const BLOCK_IO: &[i64] = &[
    libc::SYS_io_uring_enter,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_fallocate,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
];

/// A NIC's worker: its rate-limit timer.
const NET_TIMER: &[i64] = &[libc::SYS_timerfd_settime, libc::SYS_timerfd_gettime];

/// Opening I/O queues: io_uring setup on descriptors already open.
const QUEUE_SETUP: &[i64] = &[libc::SYS_io_uring_setup, libc::SYS_io_uring_register];

/// The control socket: accepting, reading and writing, descriptors passed along.
const SOCKET_SERVER: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_ioctl,
];

fn ioctl_type(kind: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(0xff00),
        kind << 8,
    )?])
}

fn ioctl_exactly(request: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        request,
    )?])
}

/// The tap ioctls a NIC's threads make: offloads and attaching or detaching a queue.
fn tap_ioctls() -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    crate::net::tap::WORKER_IOCTLS
        .iter()
        .map(|&r| ioctl_exactly(r))
        .collect()
}

/// `FIONBIO`: setting a socket non-blocking, which the control server does on accepted sockets.
fn fionbio() -> Result<SeccompRule, seccompiler::BackendError> {
    ioctl_exactly(libc::FIONBIO)
}

fn rules(role: Role) -> Result<Rules, seccompiler::BackendError> {
    let mut calls: Vec<i64> = COMMON.to_vec();
    let mut ioctl: Vec<SeccompRule> = Vec::new();
    match role {
        Role::Vmm => {
            // Builds the VM on every boot (KVM ioctls, guest memory, eventfds), starts and
            // kicks vCPUs, flushes disks at the end; and everything a vCPU needs.
            calls.extend_from_slice(SPAWN);
            calls.extend_from_slice(EVENTS);
            calls.extend_from_slice(BLOCK_IO);
            calls.extend_from_slice(QUEUE_SETUP);
            calls.push(libc::SYS_rt_sigaction);
            ioctl.push(ioctl_type(KVMIO)?);
            // Probing a NIC's tap for UFO at each boot.
            ioctl.extend(tap_ioctls()?);
        }
        Role::Vcpu => {
            // KVM_RUN; exits write the console pipe and eventfds (irqfd, worker stop), wait on
            // the device thread, and stop workers on a device reset.
            calls.extend_from_slice(&[libc::SYS_read, libc::SYS_writev]);
            ioctl.push(ioctl_exactly(KVM_RUN)?);
        }
        Role::DeviceManager => {
            calls.extend_from_slice(SPAWN);
            calls.extend_from_slice(EVENTS);
            calls.extend_from_slice(BLOCK_IO);
            calls.extend_from_slice(QUEUE_SETUP);
            // A NIC's start: its workers' timers, the tap's offloads and queues.
            calls.push(libc::SYS_timerfd_create);
            ioctl.extend(tap_ioctls()?);
        }
        Role::DeviceWorker => {
            calls.extend_from_slice(EVENTS);
            calls.extend_from_slice(BLOCK_IO);
            calls.extend_from_slice(NET_TIMER);
            // A NIC's worker attaches and detaches its tap queue.
            ioctl.extend(tap_ioctls()?);
        }
        Role::Control => {
            calls.extend_from_slice(SPAWN);
            calls.extend_from_slice(EVENTS);
            calls.extend_from_slice(SOCKET_SERVER);
            calls.retain(|&c| c != libc::SYS_ioctl);
            ioctl.push(fionbio()?);
        }
        Role::DiskClient => {
            calls.extend_from_slice(EVENTS);
            calls.extend_from_slice(&[
                libc::SYS_recvmsg,
                libc::SYS_recvfrom,
                libc::SYS_sendmsg,
                libc::SYS_sendto,
                libc::SYS_shutdown,
            ]);
        }
    }
    calls.sort_unstable();
    calls.dedup();
    let mut rules: Rules = calls.into_iter().map(|c| (c, Vec::new())).collect();
    if !ioctl.is_empty() {
        rules.insert(libc::SYS_ioctl, ioctl);
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_and_none_allows_opening_files_or_sockets() {
        Filters::compile().unwrap();
        for role in Role::ALL {
            let r = rules(role).unwrap();
            for forbidden in [
                libc::SYS_open,
                libc::SYS_openat,
                libc::SYS_socket,
                libc::SYS_connect,
                libc::SYS_execve,
                libc::SYS_setuid,
                libc::SYS_ptrace,
                libc::SYS_mount,
            ] {
                assert!(!r.contains_key(&forbidden), "{role:?} allows {forbidden}");
            }
        }
        // vCPUs may issue KVM_RUN only.
        assert_eq!(rules(Role::Vcpu).unwrap()[&libc::SYS_ioctl].len(), 1);
    }

    #[test]
    fn a_call_outside_the_filter_kills_the_thread_with_sigsys() {
        // In a child process, so that the trap does not end the test runner.
        // SAFETY: fork in a test; the child only installs a filter, makes calls and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let applied = Filters::compile().is_ok_and(|f| f.apply(Role::DeviceWorker).is_ok());
            if !applied {
                // SAFETY: leaving the forked child.
                unsafe { libc::_exit(3) };
            }
            forbidden_call();
            // SAFETY: leaving the forked child (not reached when the filter works).
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }
}

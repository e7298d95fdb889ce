//! The VMM process's sandbox, in Firecracker's and Cloud Hypervisor's manner:
//!
//! - `jail.rs`: new mount (with an empty root), IPC, network and pid namespaces where the kernel
//!   allows them (each one missing is logged once, loudly), no core dumps, and a drop to an
//!   unprivileged uid/gid of the VM's own after /dev/kvm, the disks and the sockets are open;
//! - `seccomp.rs`: one seccomp filter per thread role ([`Role`]), built with `seccompiler` and
//!   installed by each thread itself ([`enter`]) before it touches anything the guest controls:
//!   a vCPU before its first KVM_RUN, a virtqueue worker before it reads a descriptor;
//! - `sigsys.rs`: a syscall outside a filter traps into a handler that writes which thread made
//!   which call to the VMM's note descriptor (the monitor process records it), then kills the
//!   process with SIGSYS;
//! - `device_thread.rs`: the thread that opens I/O queues and starts virtqueue workers when a
//!   guest's driver starts a device, so that vCPU filters need neither thread creation nor
//!   io_uring setup.
//!
//! Filters stack: a thread inherits its creator's filter and adds its own, so a thread may use
//! only what both allow. The VMM's main thread, which builds the VM on every boot and creates
//! the vCPU threads, therefore allows everything a vCPU needs.
//!
//! Nothing here is switched on in a process that did not call [`enable_seccomp`]: tests and the
//! one-shot `strata vm run` run the same code unsandboxed.

mod device_thread;
pub mod jail;
mod seccomp;
mod sigsys;

use std::sync::OnceLock;

pub use device_thread::{on_device_thread, start_device_thread};
pub use seccomp::SeccompError;
pub use sigsys::set_note_fd;

/// What a thread does, which decides its seccomp filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The main thread: builds the VM on every boot, creates the vCPUs, waits for the end,
    /// flushes the disks.
    Vmm,
    /// A vCPU: KVM_RUN and the exits it serves (serial, virtio-mmio registers, power control).
    Vcpu,
    /// The device thread: opens I/O queues (io_uring setup) and starts workers.
    DeviceManager,
    /// A virtqueue worker: epoll on eventfds, io_uring submission and completion.
    DeviceWorker,
    /// The control socket: accepts the supervisor's connections and answers them.
    Control,
    /// The reader of a disk served by the supervisor over a socket.
    DiskClient,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 6] = [
        Role::Vmm,
        Role::Vcpu,
        Role::DeviceManager,
        Role::DeviceWorker,
        Role::Control,
        Role::DiskClient,
    ];

    /// The role's name (in logs, notes and the `--seccomp-probe` test hook).
    pub fn name(self) -> &'static str {
        match self {
            Role::Vmm => "vmm",
            Role::Vcpu => "vcpu",
            Role::DeviceManager => "device-manager",
            Role::DeviceWorker => "device-worker",
            Role::Control => "control",
            Role::DiskClient => "disk-client",
        }
    }

    /// The role named `name`.
    pub fn from_name(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == name)
    }
}

/// The process's seccomp policy, once enabled.
struct Policy {
    filters: seccomp::Filters,
    probe: Option<Role>,
}

static POLICY: OnceLock<Policy> = OnceLock::new();

/// Switches seccomp on for this process: compiles every role's filter (so that installing one
/// later cannot fail on a bad rule) and installs the SIGSYS handler. `probe` names a role whose
/// threads make one forbidden system call right after entering it (the test of the filters
/// themselves; the process then dies with SIGSYS).
pub fn enable_seccomp(probe: Option<Role>) -> Result<(), SeccompError> {
    let filters = seccomp::Filters::compile()?;
    keep_malloc_out_of_files();
    sigsys::install_handler().map_err(SeccompError::Handler)?;
    POLICY
        .set(Policy { filters, probe })
        .map_err(|_| SeccompError::Handler(std::io::Error::other("seccomp is enabled already")))
}

/// glibc's malloc, the first time it trims a thread arena's heap in a process, opens
/// /proc/sys/vm/overcommit_memory to decide whether it may (`check_may_shrink_heap`). No
/// filter allows opening files, so a sandboxed thread freeing enough memory — a NIC's worker
/// dropping its frame buffers when the device stops — died of SIGSYS. With the trim threshold
/// above any arena heap's size (64 MiB) glibc does not shrink thread arenas' heaps and does not
/// ask; freed memory stays for reuse. The VMM's large allocations (guest memory) are mappings
/// of their own and unaffected. vmm/tests/seccomp_malloc.rs checks it.
fn keep_malloc_out_of_files() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a malloc tunable; any value is valid for M_TRIM_THRESHOLD.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
    }
}

/// Whether [`enable_seccomp`] was called.
pub fn seccomp_enabled() -> bool {
    POLICY.get().is_some()
}

/// Makes the calling thread take on `role`: installs its filter when seccomp is enabled (and
/// does nothing otherwise). A thread whose filter cannot be installed must not go on to serve
/// the guest, so the process aborts (fail closed).
pub fn enter(role: Role) {
    let Some(policy) = POLICY.get() else {
        return;
    };
    sigsys::set_thread_role(role);
    if let Err(e) = policy.filters.apply(role) {
        tracing::error!(
            role = role.name(),
            "installing the seccomp filter failed: {e}"
        );
        std::process::abort();
    }
    if policy.probe == Some(role) {
        seccomp::forbidden_call();
    }
}

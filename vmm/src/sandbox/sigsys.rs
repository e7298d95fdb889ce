//! What happens when a thread makes a system call its filter does not allow: the filter's
//! action is SECCOMP_RET_TRAP, so the kernel sends SIGSYS to the thread with the call's number.
//! The handler writes one line naming the thread's role, its id and the call to the note
//! descriptor (a pipe to the monitor process, which records it as the VM's end), then kills
//! the process with SIGSYS: it adds a last filter to the thread whose only answer is
//! SECCOMP_RET_KILL_PROCESS and makes one more call. (Raising SIGSYS again would not do: the
//! VMM is the init of its pid namespace, and init ignores signals it sends itself that have
//! no handler.) Everything it does is async-signal-safe: no allocation, no locks, only
//! `write`, `gettid`, `seccomp` and `getpid`, which every filter allows.

use std::cell::Cell;
use std::sync::atomic::{AtomicI32, Ordering};

use super::Role;

/// Where notes go (-1: nowhere but stderr).
static NOTE_FD: AtomicI32 = AtomicI32::new(-1);

thread_local! {
    static ROLE: Cell<Option<Role>> = const { Cell::new(None) };
}

/// Sends SIGSYS notes to `fd` (besides stderr). The descriptor must stay open for the life of
/// the process.
pub fn set_note_fd(fd: i32) {
    NOTE_FD.store(fd, Ordering::SeqCst);
}

pub(super) fn set_thread_role(role: Role) {
    ROLE.with(|r| r.set(Some(role)));
}

/// The start of every note, which the monitor looks for.
pub const NOTE_PREFIX: &str = "seccomp:";

pub(super) fn install_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid starting point; we set the handler, the flags and
    // an empty mask, and pass pointers to locals that live through the call.
    let r = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut())
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A fixed buffer that formats without allocating.
struct Line {
    buf: [u8; 192],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn number(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The system call number in a SIGSYS siginfo (`si_syscall`: after the three ints, the padding
/// and the `_call_addr` pointer of the `_sigsys` member on x86-64).
///
/// # Safety
/// `info` must point at the siginfo the kernel passed to a SIGSYS handler.
unsafe fn syscall_number(info: *const libc::siginfo_t) -> i32 {
    // SAFETY: the caller passes the kernel's siginfo, which is 128 bytes; offset 24 is inside
    // it and aligned for an i32.
    unsafe { std::ptr::read((info as *const u8).add(24) as *const i32) }
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel calls this handler for SIGSYS with its siginfo.
    let nr = unsafe { syscall_number(info) };
    let role = ROLE.with(|r| r.get()).map_or("unsandboxed", Role::name);
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    let mut line = Line {
        buf: [0; 192],
        len: 0,
    };
    line.push(NOTE_PREFIX.as_bytes());
    line.push(b" a ");
    line.push(role.as_bytes());
    line.push(b" thread (tid ");
    line.number(tid as u64);
    line.push(b") made system call ");
    line.number(nr as u64);
    line.push(b", which its seccomp filter does not allow\n");
    for fd in [NOTE_FD.load(Ordering::SeqCst), 2] {
        if fd >= 0 {
            // SAFETY: write(2) of our own stack buffer; a failed write changes nothing.
            unsafe { libc::write(fd, line.buf.as_ptr().cast(), line.len) };
        }
    }
    kill_process();
}

/// Ends the process with SIGSYS, whatever its pid namespace: a filter that kills on every call,
/// then a call.
fn kill_process() -> ! {
    // One BPF instruction: return SECCOMP_RET_KILL_PROCESS.
    let mut program = [libc::sock_filter {
        code: 0x06, // BPF_RET | BPF_K
        jt: 0,
        jf: 0,
        k: 0x8000_0000, // SECCOMP_RET_KILL_PROCESS
    }];
    let fprog = libc::sock_fprog {
        len: 1,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: seccomp(SECCOMP_SET_MODE_FILTER) with a valid one-instruction program that
    // lives through the call (no_new_privs is set: a filter is installed already); the next
    // call is then refused by killing the process.
    unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &fprog as *const libc::sock_fprog,
        );
        libc::syscall(libc::SYS_getpid);
        // Not reached: the kernel refused the filter, so say so through the exit code.
        libc::_exit(128 + libc::SIGSYS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trapped_call_is_noted_and_the_process_dies_of_sigsys() {
        let mut fds = [0i32; 2];
        // SAFETY: pipe(2) into a local array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: fork in a test; the child installs a filter, makes a forbidden call and is
        // killed (or exits).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            set_note_fd(fds[1]);
            set_thread_role(Role::DeviceWorker);
            let filters = super::super::seccomp::Filters::compile();
            let ok = install_handler().is_ok()
                && filters.is_ok_and(|f| f.apply(Role::DeviceWorker).is_ok());
            if ok {
                super::super::seccomp::forbidden_call();
            }
            // SAFETY: leaving the forked child (not reached when the filter works).
            unsafe { libc::_exit(if ok { 0 } else { 3 }) };
        }
        // SAFETY: closing our copy of the write end, then waiting for our own child.
        unsafe { libc::close(fds[1]) };
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let mut note = [0u8; 256];
        // SAFETY: reading into a local buffer from our pipe.
        let n = unsafe { libc::read(fds[0], note.as_mut_ptr().cast(), note.len()) };
        let note = String::from_utf8_lossy(&note[..n.max(0) as usize]).into_owned();
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "status {status:#x}, note {note:?}"
        );
        assert!(
            note.starts_with("seccomp: a device-worker thread"),
            "{note}"
        );
        assert!(
            note.contains(&format!("system call {}", libc::SYS_socket)),
            "{note}"
        );
    }
}

//! What happens when a thread makes a system call its filter does not allow: the filter's
//! action is SECCOMP_RET_TRAP, so the kernel sends SIGSYS to the thread with the call's number.
//! The handler writes one line naming the thread's role, its id and the call to the note
//! descriptor (a pipe to the monitor process, which records it as the VM's end), then raises
//! SIGSYS again with the default action (the handler is one-shot), which kills the process.
//! Everything it does is async-signal-safe: no allocation, no locks, only `write`, `gettid`,
//! `getpid` and `tgkill`, which every filter allows.

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
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND | libc::SA_NODEFER;
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
    // SAFETY: the handler was one-shot (SA_RESETHAND) and SIGSYS is not blocked in it
    // (SA_NODEFER): raising it again takes the default action, which ends the process.
    unsafe {
        let pid = libc::getpid();
        libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGSYS);
    }
}

//! Namespaces, an empty root, no core dumps and an unprivileged uid/gid for the VMM process.
//!
//! Order matters: the process opens /dev/kvm, its disks and its sockets first (as root), then
//! [`enter_namespaces`] gives it new mount, IPC and network namespaces (the pid namespace was
//! made by its parent, the monitor, with [`unshare_pid_namespace`] before it forked), replaces
//! its root with an empty read-only tmpfs, and [`drop_privileges`] sets the uid and gid with no
//! supplementary groups. After that it can reach no file, no network and no other process;
//! what it holds open is all it has. A namespace the kernel refuses (a container without
//! CAP_SYS_ADMIN, a kernel without it) is reported in the returned list, which the caller logs
//! once, loudly; the VM still runs.

use std::ffi::CString;
use std::io;

/// What the jail could not do.
#[derive(Debug, Default)]
pub struct Missing(pub Vec<String>);

fn last_error(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Makes the caller's future children start in a new pid namespace (the first one is its pid
/// 1). Returns false, with the reason, when the kernel refuses.
pub fn unshare_pid_namespace() -> Result<(), String> {
    // SAFETY: unshare(2) with a flag constant; it changes only this process's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(format!(
            "a new pid namespace ({})",
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// New mount, IPC, UTS and network namespaces, and an empty root. Returns what the kernel
/// refused; fails only when a half-made change would leave the process in an unknown state.
pub fn enter_namespaces(network: bool) -> io::Result<Missing> {
    let mut missing = Missing::default();
    let mut wanted = vec![
        (libc::CLONE_NEWIPC, "an IPC namespace"),
        (libc::CLONE_NEWUTS, "a UTS namespace"),
    ];
    if network {
        wanted.push((libc::CLONE_NEWNET, "a network namespace"));
    } else {
        missing
            .0
            .push("a network namespace (a disk needs the host's network)".into());
    }
    for (flag, what) in wanted {
        // SAFETY: unshare(2) with a flag constant.
        if unsafe { libc::unshare(flag) } != 0 {
            missing
                .0
                .push(format!("{what} ({})", io::Error::last_os_error()));
        }
    }
    // SAFETY: unshare(2) with a flag constant.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        missing.0.push(format!(
            "a mount namespace and an empty root ({})",
            io::Error::last_os_error()
        ));
        return Ok(missing);
    }
    empty_root()?;
    Ok(missing)
}

fn mount(
    source: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let c = |s: &str| CString::new(s).map_err(|_| io::Error::other("a NUL in a mount argument"));
    let source = source.map(c).transpose()?;
    let target_c = c(target)?;
    let fstype = fstype.map(c).transpose()?;
    let data = data.map(c).transpose()?;
    let ptr = |o: &Option<CString>| o.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: mount(2) with NUL-terminated strings that live through the call (or nulls).
    let r = unsafe {
        libc::mount(
            ptr(&source),
            target_c.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    if r != 0 {
        return Err(last_error(&format!("mount on {target}")));
    }
    Ok(())
}

/// Replaces the root with an empty, read-only tmpfs and detaches the old one, so that no path
/// leads anywhere (in the new mount namespace only).
fn empty_root() -> io::Result<()> {
    mount(None, "/", None, libc::MS_REC | libc::MS_PRIVATE, None)?;
    // Any existing directory will do as the mount point: the mount is private to us.
    let base = if std::path::Path::new("/tmp").is_dir() {
        "/tmp"
    } else {
        "/"
    };
    mount(
        Some("strata-vmm"),
        base,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("size=4k,mode=0555"),
    )?;
    std::env::set_current_dir(base)?;
    let dot = CString::new(".").map_err(io::Error::other)?;
    // SAFETY: pivot_root(".", ".") puts the old root on top of the new one (the current
    // directory, a fresh tmpfs mount point); both strings are NUL-terminated constants.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } != 0 {
        return Err(last_error("pivot_root"));
    }
    // SAFETY: detaching the old root, now mounted at "."; the string is NUL-terminated.
    if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(last_error("detaching the old root"));
    }
    std::env::set_current_dir("/")?;
    mount(
        None,
        "/",
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
        None,
    )
}

/// No core dumps (they would hold guest memory), not dumpable (no ptrace, /proc entries owned
/// by root), no new privileges.
pub fn harden() -> io::Result<()> {
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit with a pointer to a local; prctl with integer arguments.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_CORE, &none) != 0 {
            return Err(last_error("setting RLIMIT_CORE"));
        }
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            return Err(last_error("PR_SET_DUMPABLE"));
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(last_error("PR_SET_NO_NEW_PRIVS"));
        }
    }
    Ok(())
}

/// Becomes `uid`/`gid` with no supplementary groups, for good (real, effective and saved ids).
/// Must run while the process is still single-threaded or before other threads start work:
/// glibc's set*id calls change every thread.
pub fn drop_privileges(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: setgroups with an empty list, then setresgid and setresuid with plain integers.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(last_error("setgroups"));
        }
        if libc::setresgid(gid, gid, gid) != 0 {
            return Err(last_error("setresgid"));
        }
        if libc::setresuid(uid, uid, uid) != 0 {
            return Err(last_error("setresuid"));
        }
        // Confirm: a process that could regain root is not sandboxed.
        if libc::setuid(0) == 0 && uid != 0 {
            return Err(io::Error::other("root could be regained after dropping it"));
        }
    }
    Ok(())
}

/// Whether this process runs as root (and so can set up namespaces and change its ids).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

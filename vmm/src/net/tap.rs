//! Tap devices with virtio-net headers and several queues, and the [`TapIo`] trait the data
//! path uses (which [`MemoryTap`] implements for tests and the fuzz target).
//!
//! A tap is opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE`, once per queue
//! pair (each open of the same name adds a queue), non-blocking, with a 12-byte vnet header
//! (`TUNSETVNETHDRSZ`). Whoever may create network devices opens it (the supervisor, as root,
//! before the VMM's sandbox closes) and the VMM gets the descriptors; the VMM only reads,
//! writes, sets offloads (`TUNSETOFFLOAD`) and attaches or detaches queues (`TUNSETQUEUE`).

use std::collections::VecDeque;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

use super::HDR_LEN;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_ATTACH_QUEUE: libc::c_short = 0x0200;
const IFF_DETACH_QUEUE: libc::c_short = 0x0400;

/// `TUNSETOFFLOAD` flags.
pub mod offload {
    /// Partial checksums.
    pub const CSUM: u32 = 0x01;
    /// TSO over IPv4.
    pub const TSO4: u32 = 0x02;
    /// TSO over IPv6.
    pub const TSO6: u32 = 0x04;
    /// TSO with ECN.
    pub const TSO_ECN: u32 = 0x08;
    /// UDP fragmentation offload.
    pub const UFO: u32 = 0x10;
}

/// The ioctl numbers the VMM's worker threads issue on a tap (for the seccomp filter).
pub const WORKER_IOCTLS: [u64; 2] = [TUNSETOFFLOAD, TUNSETQUEUE];

/// Most guest-memory pieces [`TapIo::write_frame_parts`] takes (a frame in more is copied
/// first; Linux's own TX chains have at most 19).
pub const MAX_WRITE_PIECES: usize = 64;

/// Longest interface name (IFNAMSIZ less the NUL).
pub const MAX_NAME: usize = 15;

/// One queue of a tap device (or a stand-in): frames with their 12-byte vnet header in front.
pub trait TapIo: AsRawFd + Send + Sync + std::fmt::Debug {
    /// Reads one frame (header included) into `buf`; `WouldBlock` when none is waiting.
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame (header included); `WouldBlock` when the device cannot take it now.
    fn write_frame(&self, frame: &[u8]) -> io::Result<usize>;
    /// Writes one frame given as `header` (the virtio header, host memory) followed by `pieces`
    /// of guest memory, each (host address, length), at most [`MAX_WRITE_PIECES`] of them: no
    /// copy on the way for a real tap (`writev`). `WouldBlock` as for [`TapIo::write_frame`].
    ///
    /// # Safety
    /// Every piece must be mapped, readable memory for the duration of the call. (The guest may
    /// change those bytes meanwhile: the frame then carries the guest's own garbage, which is
    /// no hazard to the host, as the header is the device's checked copy.)
    unsafe fn write_frame_parts(
        &self,
        header: &[u8],
        pieces: &[(usize, usize)],
    ) -> io::Result<usize>;
    /// Sets the offloads the device may hand us (`offload::*`), for every queue.
    fn set_offload(&self, flags: u32) -> io::Result<()>;
    /// Attaches (receives traffic) or detaches this queue.
    fn set_enabled(&self, enabled: bool) -> io::Result<()>;
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn ifreq(name: &str, flags: libc::c_short) -> io::Result<IfReq> {
    if name.is_empty() || name.len() > MAX_NAME || name.bytes().any(|b| b == 0 || b == b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a valid interface name (1 to {MAX_NAME} bytes)"),
        ));
    }
    let mut r = IfReq {
        name: [0; 16],
        flags,
        _pad: [0; 22],
    };
    r.name[..name.len()].copy_from_slice(name.as_bytes());
    Ok(r)
}

fn check(r: libc::c_int, what: &str) -> io::Result<()> {
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// One queue of a real tap device.
#[derive(Debug)]
pub struct TapQueue {
    fd: OwnedFd,
}

impl TapQueue {
    /// Takes a descriptor opened by [`open_queues`] (in this process or another).
    pub fn from_fd(fd: OwnedFd) -> TapQueue {
        TapQueue { fd }
    }

    /// The descriptor.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// The interface's name (TUNGETIFF).
    pub fn name(&self) -> io::Result<String> {
        let mut r = IfReq {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes an ifreq into the local struct, which is large enough.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNGETIFF, &mut r) };
        check(rc, "TUNGETIFF")?;
        let end = r.name.iter().position(|&b| b == 0).unwrap_or(16);
        Ok(String::from_utf8_lossy(&r.name[..end]).into_owned())
    }
}

impl From<TapQueue> for OwnedFd {
    fn from(q: TapQueue) -> OwnedFd {
        q.fd
    }
}

impl AsRawFd for TapQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl TapIo for TapQueue {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: read(2) into the caller's buffer, at most its length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: write(2) from the caller's buffer, at most its length.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    unsafe fn write_frame_parts(
        &self,
        header: &[u8],
        pieces: &[(usize, usize)],
    ) -> io::Result<usize> {
        if pieces.len() > MAX_WRITE_PIECES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a frame in too many pieces",
            ));
        }
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let mut iov = [empty; MAX_WRITE_PIECES + 1];
        iov[0] = libc::iovec {
            iov_base: header.as_ptr() as *mut libc::c_void,
            iov_len: header.len(),
        };
        for (v, &(addr, len)) in iov[1..].iter_mut().zip(pieces) {
            *v = libc::iovec {
                iov_base: addr as *mut libc::c_void,
                iov_len: len,
            };
        }
        // SAFETY: writev(2) only reads the buffers: the header borrowed for the call and the
        // guest pieces the caller guarantees readable (this function's contract).
        let n = unsafe {
            libc::writev(
                self.fd.as_raw_fd(),
                iov.as_ptr(),
                (pieces.len() + 1) as libc::c_int,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        check(
            unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) },
            "TUNSETOFFLOAD",
        )
    }

    fn set_enabled(&self, enabled: bool) -> io::Result<()> {
        let mut r = IfReq {
            name: [0; 16],
            flags: if enabled {
                IFF_ATTACH_QUEUE
            } else {
                IFF_DETACH_QUEUE
            },
            _pad: [0; 22],
        };
        // SAFETY: TUNSETQUEUE reads an ifreq from the local struct.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNSETQUEUE, &mut r) };
        match r {
            // Attaching an attached queue or detaching a detached one is EINVAL: no change.
            _ if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) => Ok(()),
            _ => check(r, "TUNSETQUEUE"),
        }
    }
}

/// Opens (creating if needed) tap `name` with `queues` queues. The device is not persistent:
/// it goes away when the last descriptor is closed.
pub fn open_queues(name: &str, queues: usize) -> io::Result<Vec<TapQueue>> {
    open_queues_owned(name, queues, None)
}

/// Like [`open_queues`], and makes `owner` the tap's owner (`TUNSETOWNER`): then only that
/// uid (and CAP_NET_ADMIN) may attach more queues to it.
pub fn open_queues_owned(
    name: &str,
    queues: usize,
    owner: Option<u32>,
) -> io::Result<Vec<TapQueue>> {
    if queues == 0 || queues > 256 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{queues} tap queues is out of range (1 to 256)"),
        ));
    }
    let path = CString::new("/dev/net/tun").map_err(io::Error::other)?;
    let mut out = Vec::with_capacity(queues);
    for _ in 0..queues {
        // SAFETY: open(2) with a NUL-terminated constant path.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        check(fd, "opening /dev/net/tun")?;
        // SAFETY: the descriptor was just opened and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = ifreq(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE)?;
        // SAFETY: TUNSETIFF reads (and updates) the local ifreq.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) };
        check(rc, &format!("creating tap {name} (TUNSETIFF)"))?;
        let size: libc::c_int = HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int from the local.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ, &size) };
        check(rc, "TUNSETVNETHDRSZ")?;
        if let (Some(uid), true) = (owner, out.is_empty()) {
            // SAFETY: TUNSETOWNER takes the uid by value.
            let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOWNER, uid as libc::c_ulong) };
            check(rc, "TUNSETOWNER")?;
        }
        out.push(TapQueue { fd });
    }
    Ok(out)
}

/// Whether the tap takes UFO (TUNSETOFFLOAD with the UFO flag; kernels without it refuse).
/// Leaves the offloads off.
pub fn supports_ufo(q: &dyn TapIo) -> bool {
    let ok = q
        .set_offload(offload::CSUM | offload::TSO4 | offload::TSO6 | offload::UFO)
        .is_ok();
    let _ = q.set_offload(0);
    ok
}

/// Most frames a [`MemoryTap`] holds each way.
pub const MEMORY_TAP_FRAMES: usize = 256;

/// An in-memory tap for tests and fuzzing: frames the host "sends" wait in `inbound` until the
/// device reads them; frames the device writes land in `outbound`. Both hold at most
/// [`MEMORY_TAP_FRAMES`] (writes beyond that are `WouldBlock`). Readable is an eventfd, so the
/// worker's epoll works on it as on a tap.
#[derive(Debug)]
pub struct MemoryTap {
    inbound: Mutex<VecDeque<Vec<u8>>>,
    outbound: Mutex<Vec<Vec<u8>>>,
    readable: EventFd,
    offload: Mutex<u32>,
    enabled: Mutex<bool>,
}

impl MemoryTap {
    /// An empty tap.
    pub fn new() -> io::Result<MemoryTap> {
        Ok(MemoryTap {
            inbound: Mutex::default(),
            outbound: Mutex::default(),
            readable: EventFd::new(libc::EFD_NONBLOCK)?,
            offload: Mutex::new(0),
            enabled: Mutex::new(true),
        })
    }

    /// Queues a frame (header included) for the device to read; false when full.
    pub fn push_inbound(&self, frame: Vec<u8>) -> bool {
        let mut q = self.inbound.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= MEMORY_TAP_FRAMES {
            return false;
        }
        q.push_back(frame);
        let _ = self.readable.write(1);
        true
    }

    /// Frames the device wrote, taken.
    pub fn take_outbound(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.outbound.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Frames still waiting to be read.
    pub fn inbound_len(&self) -> usize {
        self.inbound.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The offloads last set.
    pub fn offload(&self) -> u32 {
        *self.offload.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the queue is attached.
    pub fn enabled(&self) -> bool {
        *self.enabled.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl AsRawFd for MemoryTap {
    fn as_raw_fd(&self) -> RawFd {
        self.readable.as_raw_fd()
    }
}

impl TapIo for MemoryTap {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut q = self.inbound.lock().unwrap_or_else(|p| p.into_inner());
        let Some(frame) = q.pop_front() else {
            let _ = self.readable.read();
            return Err(io::ErrorKind::WouldBlock.into());
        };
        // Like a tap: a frame longer than the buffer is cut.
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }

    fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        let mut q = self.outbound.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= MEMORY_TAP_FRAMES {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        q.push(frame.to_vec());
        Ok(frame.len())
    }

    unsafe fn write_frame_parts(
        &self,
        header: &[u8],
        pieces: &[(usize, usize)],
    ) -> io::Result<usize> {
        let mut frame = header.to_vec();
        for &(addr, len) in pieces {
            let at = frame.len();
            frame.resize(at + len, 0);
            // SAFETY: the caller guarantees `len` readable bytes at `addr` (the contract);
            // the destination was just sized for them.
            unsafe { std::ptr::copy(addr as *const u8, frame[at..].as_mut_ptr(), len) };
        }
        self.write_frame(&frame)
    }

    fn set_offload(&self, flags: u32) -> io::Result<()> {
        *self.offload.lock().unwrap_or_else(|p| p.into_inner()) = flags;
        Ok(())
    }

    fn set_enabled(&self, enabled: bool) -> io::Result<()> {
        *self.enabled.lock().unwrap_or_else(|p| p.into_inner()) = enabled;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_and_queue_counts_are_refused() {
        assert!(open_queues("", 1).is_err());
        assert!(open_queues("a-name-that-is-too-long", 1).is_err());
        assert!(open_queues("ok0", 0).is_err());
    }
}

//! Network namespaces for network tests: a named namespace (`ip netns add`, removed on drop),
//! running code inside it on a thread of its own (`setns`), and the host-side tools the tests
//! need there — an ICMP echo over a raw socket, a raw Ethernet frame out of an interface.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Whether this process may create network namespaces and taps (root with /dev/net/tun and
/// `ip`); the reason when it may not.
pub fn netns_unavailable() -> Option<String> {
    if !crate::is_root() {
        return Some("network tests need root (network namespaces, taps, bridges)".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("the ip tool (iproute2) is missing".into());
    }
    None
}

impl NetNs {
    /// A fresh namespace named after `tag`, with its loopback up.
    pub fn new(tag: &str) -> Result<NetNs> {
        let name = format!(
            "strata-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        run_ok(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS...`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run_ok(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Runs `f` on a thread that has entered the namespace (sockets and devices it creates
    /// belong to the namespace; descriptors stay usable from any thread).
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || -> Result<T> {
            let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: setns(2) on this thread with a namespace descriptor we hold open.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns into {path}: {}", std::io::Error::last_os_error());
            }
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("a thread in the namespace panicked"))?
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run_ok(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn checksum(b: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in b.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// Sends `count` ICMP echo requests to `dst` from inside `ns` and counts the replies (each
/// waited for up to `wait`).
pub fn ping(ns: &NetNs, dst: std::net::Ipv4Addr, count: u16, wait: Duration) -> Result<u16> {
    ns.run(move || {
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
        if fd < 0 {
            bail!("a raw ICMP socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: the descriptor was just created.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: setsockopt with a pointer to a local of the right size.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.octets()),
            },
            sin_zero: [0; 8],
        };
        let id: u16 = 0x5a5a;
        let mut replies = 0;
        for seq in 0..count {
            let mut pkt = vec![8u8, 0, 0, 0];
            pkt.extend_from_slice(&id.to_be_bytes());
            pkt.extend_from_slice(&seq.to_be_bytes());
            pkt.extend((0..48u8).map(|i| i ^ 0x33));
            let c = checksum(&pkt);
            pkt[2..4].copy_from_slice(&c.to_be_bytes());
            // SAFETY: sendto with our buffer and a sockaddr_in that lives through the call.
            unsafe {
                libc::sendto(
                    sock.as_raw_fd(),
                    pkt.as_ptr().cast(),
                    pkt.len(),
                    0,
                    (&addr as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            };
            let deadline = Instant::now() + wait;
            while Instant::now() < deadline {
                let mut buf = [0u8; 2048];
                // SAFETY: recv into a local buffer.
                let n =
                    unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 28 {
                    continue;
                }
                let n = n as usize;
                let ihl = usize::from(buf[0] & 15) * 4;
                let icmp = &buf[ihl..n];
                let from = std::net::Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
                if from == dst
                    && icmp[0] == 0
                    && icmp[4..6] == id.to_be_bytes()
                    && icmp[6..8] == seq.to_be_bytes()
                    && icmp[8..] == pkt[8..]
                {
                    replies += 1;
                    break;
                }
            }
        }
        Ok(replies)
    })
}

/// Sends one raw Ethernet frame out of interface `ifname` inside `ns`.
pub fn send_frame(ns: &NetNs, ifname: &str, frame: Vec<u8>) -> Result<()> {
    let ifname = ifname.to_string();
    ns.run(move || {
        let c = CString::new(ifname.clone())?;
        // SAFETY: if_nametoindex with a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
        if index == 0 {
            bail!("no interface {ifname}");
        }
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            bail!("a packet socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: the descriptor was just created.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a zeroed sockaddr_ll is valid; we fill the fields sendto needs.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = index as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[0..6]);
        // SAFETY: sendto with our buffer and a sockaddr_ll that lives through the call.
        let n = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            bail!(
                "sending a frame on {ifname}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    })
}

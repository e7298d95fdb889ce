//! The virtio-net data path driven from the host side: Strata's device against QEMU's user-space
//! virtio-net (`-netdev tap,vhost=off`) on the same tap, alternating run by run.
//!
//! A driver thread plays the guest: it keeps a split receive queue and a split transmit queue
//! (256 entries, EVENT_IDX) in guest memory that is a file in /dev/shm, kicks the device when
//! EVENT_IDX asks for it and polls the used rings (interrupts are suppressed for both devices:
//! `used_event` always lags). Negotiated for both: VERSION_1, MAC, MRG_RXBUF, EVENT_IDX, CSUM and
//! HOST_TSO4 (no control queue, one queue pair).
//!
//! - Strata: the real device (`net::NetDevice` and its pair worker thread, epoll, the tap), with
//!   guest memory mapped from the same file and eventfds as kicks — only KVM is left out.
//! - QEMU: `qemu-system-x86_64 -qtest stdio` (no guest CPU at all) with `virtio-net-pci` on the
//!   tap descriptor and the file as its RAM (`memory-backend-file,share=on`); the driver sets
//!   the device up and kicks it over qtest ([`strata_benches::qtest`]).
//!
//! Rows: transmit of 60-byte and 1514-byte frames (dropped by the kernel behind the tap: no
//! protocol takes them) and of 64 KB TCP segments with TSO (a virtio header with GSO, handed to
//! the tap as one packet); receive of 60-byte and 1514-byte frames, which the driver thread
//! itself sends into the tap through an AF_PACKET socket, at most 192 in flight (closed loop:
//! the injection is part of the measured cost for both devices). Each run also checks its frames
//! arrived: the tap's counters for transmit, the used lengths for receive.
//!
//! The process moves into a network namespace of its own first (needs root and /dev/net/tun).
//!
//! Usage: net_datapath [--seconds S] [--rounds N] [--seccomp] [--only strata|qemu]
//!        [--rows I,J,...]   (rows by index, from 0: the three transmit rows, then receive)
//! Prints each run, the medians and the ratios (frames per second and Gbit/s of frame bytes).

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{fence, AtomicU16, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use strata_benches::qtest::{Qtest, VirtioPci};
use strata_vmm::hostnet::Netlink;
use strata_vmm::net::config::NetConfig;
use strata_vmm::net::features as f;
use strata_vmm::net::tap::{open_queues, TapQueue};
use strata_vmm::net::{NetDevice, NetOptions, HDR_LEN};
use strata_vmm::transport::mmio::MmioInterrupt;
use strata_vmm::transport::{Activation, VirtioDevice};
use virtio_queue::{Queue, QueueT};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const QSIZE: u16 = 256;
const MEM_SIZE: usize = 64 << 20;
const RX_RING: u64 = 0x10_0000;
const TX_RING: u64 = 0x10_4000;
const RX_BUFS: u64 = 0x20_0000;
const RX_BUF_LEN: u32 = 2048;
const TX_BUFS: u64 = 0x40_0000;
const TX_STRIDE: u64 = 0x1_1000;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// A unicast address nobody has: transmitted frames are "for another host" behind the tap.
const OTHER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];
const TAP: &str = "stbench0";
const FEATURES: u64 =
    f::VERSION_1 | f::MAC | f::MRG_RXBUF | f::RING_EVENT_IDX | f::CSUM | f::HOST_TSO4;
/// Receive frames in flight (sent into the tap, not yet in the used ring) at most.
const RX_IN_FLIGHT: u64 = 192;
const RX_BATCH: usize = 32;
const TSO_PAYLOAD: usize = 64_000;

/// Guest memory: a file in /dev/shm that the device side maps too.
struct Ram {
    ptr: *mut u8,
    path: PathBuf,
}

impl Ram {
    fn new() -> Result<Ram> {
        let path = PathBuf::from(format!("/dev/shm/strata-net-bench-{}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        file.set_len(MEM_SIZE as u64)?;
        // SAFETY: a fresh shared mapping of a file we hold open; nothing else aliases it in
        // this process but through `Ram`, and it is unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!(
                "mmap of {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(Ram {
            ptr: ptr.cast(),
            path,
        })
    }

    fn at(&self, gpa: u64, len: usize) -> *mut u8 {
        assert!(gpa as usize + len <= MEM_SIZE, "guest address out of range");
        // SAFETY: in bounds of the mapping (checked above).
        unsafe { self.ptr.add(gpa as usize) }
    }

    fn write(&self, gpa: u64, data: &[u8]) {
        let p = self.at(gpa, data.len());
        // SAFETY: `p` has room for `data` (checked by `at`); the device only reads these bytes
        // while they are ours to write between its used and our avail publication.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
    }

    fn read(&self, gpa: u64, out: &mut [u8]) {
        let p = self.at(gpa, out.len());
        // SAFETY: in bounds (checked by `at`).
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) };
    }

    fn zero(&self, gpa: u64, len: usize) {
        let p = self.at(gpa, len);
        // SAFETY: in bounds (checked by `at`).
        unsafe { std::ptr::write_bytes(p, 0, len) };
    }

    fn u16_at(&self, gpa: u64) -> &AtomicU16 {
        assert!(gpa % 2 == 0);
        // SAFETY: aligned, in bounds, and shared memory is only ever accessed atomically here
        // for ring indexes.
        unsafe { AtomicU16::from_ptr(self.at(gpa, 2).cast()) }
    }

    fn u32_at(&self, gpa: u64) -> &AtomicU32 {
        assert!(gpa % 4 == 0);
        // SAFETY: as for `u16_at`.
        unsafe { AtomicU32::from_ptr(self.at(gpa, 4).cast()) }
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`, which nothing uses any more.
        unsafe { libc::munmap(self.ptr.cast(), MEM_SIZE) };
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(self.path.with_extension("bios"));
    }
}

fn vring_need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// One split ring as the driver sees it: descriptor table, avail ring, used ring, a page each.
struct Vring {
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    published: u16,
    used_seen: u16,
}

impl Vring {
    fn new(ram: &Ram, base: u64) -> Vring {
        ram.zero(base, 0x3000);
        Vring {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_avail: 0,
            published: 0,
            used_seen: 0,
        }
    }

    fn set_desc(&self, ram: &Ram, i: u16, addr: u64, len: u32, write: bool) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&(if write { 2u16 } else { 0 }).to_le_bytes());
        ram.write(self.desc + 16 * u64::from(i), &raw);
    }

    fn push(&mut self, ram: &Ram, head: u16) {
        let slot = u64::from(self.next_avail % QSIZE);
        ram.u16_at(self.avail + 4 + 2 * slot)
            .store(head, Ordering::Relaxed);
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Publishes what was pushed; returns whether the device asked to be kicked.
    fn publish(&mut self, ram: &Ram) -> bool {
        if self.next_avail == self.published {
            return false;
        }
        fence(Ordering::SeqCst);
        ram.u16_at(self.avail + 2)
            .store(self.next_avail, Ordering::Release);
        fence(Ordering::SeqCst);
        let event = ram
            .u16_at(self.used + 4 + 8 * u64::from(QSIZE))
            .load(Ordering::Acquire);
        let kick = vring_need_event(event, self.next_avail, self.published);
        self.published = self.next_avail;
        kick
    }

    /// Calls `f(id, len)` for each new used entry; returns how many there were. Keeps the
    /// device's interrupts off (`used_event` one behind what was seen).
    fn reap(&mut self, ram: &Ram, mut f: impl FnMut(u16, u32)) -> u32 {
        let idx = ram.u16_at(self.used + 2).load(Ordering::Acquire);
        let mut n = 0;
        while self.used_seen != idx {
            let at = self.used + 4 + 8 * u64::from(self.used_seen % QSIZE);
            let id = ram.u32_at(at).load(Ordering::Relaxed);
            let len = ram.u32_at(at + 4).load(Ordering::Relaxed);
            f(id as u16, len);
            self.used_seen = self.used_seen.wrapping_add(1);
            n += 1;
        }
        ram.u16_at(self.avail + 4 + 2 * u64::from(QSIZE))
            .store(self.used_seen.wrapping_sub(1), Ordering::Release);
        n
    }
}

/// The device under test, as the driver needs it.
trait Nic {
    fn kick(&mut self, queue: u16) -> Result<()>;
}

struct StrataNic {
    device: NetDevice,
    kicks: Vec<EventFd>,
}

impl Nic for StrataNic {
    fn kick(&mut self, queue: u16) -> Result<()> {
        self.kicks[usize::from(queue)].write(1)?;
        Ok(())
    }
}

impl Drop for StrataNic {
    fn drop(&mut self) {
        self.device.reset();
    }
}

/// Strata's device on `tap`, its queues at the driver's rings.
fn start_strata(ram: &Ram, tap: &TapQueue) -> Result<StrataNic> {
    let file = File::options().read(true).write(true).open(&ram.path)?;
    let mem = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        MEM_SIZE,
        Some(FileOffset::new(file, 0)),
    )])?;
    let cfg = NetConfig::new(
        &NetOptions {
            mac: MAC,
            ..NetOptions::default()
        },
        false,
    )
    .map_err(anyhow::Error::msg)?;
    ensure!(
        cfg.features() & FEATURES == FEATURES,
        "our device lacks features"
    );
    let mut queues = Vec::new();
    let mut kicks = Vec::new();
    for (i, base) in [(0usize, RX_RING), (1, TX_RING)] {
        let mut q = Queue::new(QSIZE)?;
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(base as u32), Some(0));
        q.set_avail_ring_address(Some((base + 0x1000) as u32), Some(0));
        q.set_used_ring_address(Some((base + 0x2000) as u32), Some(0));
        q.set_event_idx(true);
        q.set_ready(true);
        let kick = EventFd::new(libc::EFD_NONBLOCK)?;
        queues.push((i, q, kick.try_clone()?));
        kicks.push(kick);
    }
    let taps: Vec<Arc<dyn strata_vmm::net::tap::TapIo>> =
        vec![Arc::new(TapQueue::from_fd(tap.fd().try_clone()?))];
    let mut device =
        NetDevice::new("bench".into(), Arc::new(cfg), taps).map_err(anyhow::Error::msg)?;
    device
        .activate(Activation {
            queues,
            mem: Arc::new(mem),
            interrupt: Arc::new(MmioInterrupt::new(EventFd::new(libc::EFD_NONBLOCK)?)),
            driver_features: FEATURES,
        })
        .map_err(anyhow::Error::msg)?;
    Ok(StrataNic { device, kicks })
}

struct QemuNic {
    pci: VirtioPci,
}

impl Nic for QemuNic {
    fn kick(&mut self, queue: u16) -> Result<()> {
        self.pci.notify(queue)
    }
}

/// QEMU's virtio-net-pci on `tap` under qtest, its RAM the driver's file; `prepare` lays out
/// the rings (after QEMU mapped the file, before the queues are enabled).
fn start_qemu(ram: &Ram, tap: &TapQueue, prepare: &mut dyn FnMut()) -> Result<QemuNic> {
    // Firmware that halts at once: QEMU's vCPU may run (TCG) beside qtest, and SeaBIOS would
    // enumerate PCI through the same ports (0xcf8/0xcfc) as our driver.
    let bios = ram.path.with_extension("bios");
    let mut image = vec![0xf4u8; 0x1_0000];
    image[0xfff0..0xfff4].copy_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]); // cli; hlt; jmp hlt
    std::fs::write(&bios, image)?;
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "q35,memory-backend=mem", "-m", "64M"])
        .arg("-bios")
        .arg(&bios)
        .arg("-object")
        .arg(format!(
            "memory-backend-file,id=mem,size=64M,mem-path={},share=on",
            ram.path.display()
        ))
        .args(["-nodefaults", "-display", "none"])
        .args(["-netdev", "tap,id=n0,fd=3,vhost=off"])
        .arg("-device")
        .arg(format!(
            "virtio-net-pci,netdev=n0,addr=03.0,disable-legacy=on,mac={},mq=off,ctrl_vq=off,\
             vectors=0,tx=bh,rx_queue_size={QSIZE},tx_queue_size={QSIZE},mrg_rxbuf=on,\
             event_idx=on,csum=on,host_tso4=on",
            strata_vmm::net::config::format_mac(&MAC)
        ));
    let raw = tap.as_raw_fd();
    // SAFETY: only dup2 or fcntl (async-signal-safe) run between fork and exec: the tap on
    // descriptor 3, without CLOEXEC, for QEMU's `fd=3`.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself keeps CLOEXEC: clear it then.
            let r = if raw == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(raw, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut pci = VirtioPci::probe(Qtest::spawn(cmd)?, 3)?;
    pci.negotiate(FEATURES)?;
    prepare();
    for (i, base) in [(0u16, RX_RING), (1, TX_RING)] {
        pci.setup_queue(i, QSIZE, base, base + 0x1000, base + 0x2000)?;
    }
    pci.driver_ok()?;
    ensure!(
        pci.config_byte(0)? == MAC[0],
        "QEMU's device has another MAC"
    );
    Ok(QemuNic { pci })
}

#[derive(Clone, Copy, Debug)]
enum Dir {
    Tx,
    Rx,
}

#[derive(Clone, Copy, Debug)]
struct Row {
    dir: Dir,
    /// Ethernet frame length.
    frame: usize,
    tso: bool,
}

impl Row {
    fn label(&self) -> String {
        match (self.dir, self.tso) {
            (Dir::Tx, true) => format!("transmit {} B TCP segments (TSO)", self.frame),
            (Dir::Tx, false) => format!("transmit {} B frames", self.frame),
            (Dir::Rx, _) => format!("receive {} B frames", self.frame),
        }
    }
}

fn ipv4_checksum(b: &[u8]) -> u16 {
    let mut s: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// A transmit buffer: virtio header and frame.
fn tx_frame(row: &Row) -> Vec<u8> {
    let mut b = vec![0u8; HDR_LEN + row.frame];
    let e = HDR_LEN;
    b[e..e + 6].copy_from_slice(&OTHER_MAC);
    b[e + 6..e + 12].copy_from_slice(&MAC);
    if !row.tso {
        b[e + 12..e + 14].copy_from_slice(&0x88b5u16.to_be_bytes());
        for (i, x) in b[e + 14..].iter_mut().enumerate() {
            *x = i as u8;
        }
        return b;
    }
    // IPv4 + TCP, checksum left to the device (NEEDS_CSUM), cut into 1448-byte segments.
    b[e + 12..e + 14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = e + 14;
    let ip_len = (row.frame - 14) as u16;
    b[ip] = 0x45;
    b[ip + 2..ip + 4].copy_from_slice(&ip_len.to_be_bytes());
    b[ip + 8] = 64;
    b[ip + 9] = 6;
    b[ip + 12..ip + 16].copy_from_slice(&[10, 99, 0, 2]);
    b[ip + 16..ip + 20].copy_from_slice(&[10, 99, 0, 1]);
    let c = ipv4_checksum(&b[ip..ip + 20]);
    b[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
    let tcp = ip + 20;
    b[tcp..tcp + 2].copy_from_slice(&40000u16.to_be_bytes());
    b[tcp + 2..tcp + 4].copy_from_slice(&5201u16.to_be_bytes());
    b[tcp + 12] = 5 << 4;
    b[tcp + 13] = 0x10;
    b[tcp + 14..tcp + 16].copy_from_slice(&65535u16.to_be_bytes());
    // The pseudo-header sum, as a driver leaves it for checksum offload.
    let tcp_len = u32::from(ip_len) - 20;
    let mut s: u32 = 0x0a63 + 0x0002 + 0x0a63 + 0x0001 + 6 + tcp_len;
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    b[tcp + 16..tcp + 18].copy_from_slice(&(s as u16).to_be_bytes());
    // virtio_net_hdr: NEEDS_CSUM, GSO TCPv4, hdr_len, gso_size, csum_start, csum_offset.
    b[0] = 1;
    b[1] = 1;
    b[2..4].copy_from_slice(&54u16.to_le_bytes());
    b[4..6].copy_from_slice(&1448u16.to_le_bytes());
    b[6..8].copy_from_slice(&34u16.to_le_bytes());
    b[8..10].copy_from_slice(&16u16.to_le_bytes());
    b
}

/// The tap's counters (rx_packets: frames the devices wrote to it; tx_dropped) in this
/// namespace.
fn tap_counters() -> Result<(u64, u64)> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        bail!("getifaddrs: {}", std::io::Error::last_os_error());
    }
    let mut out = None;
    let mut p = head;
    while !p.is_null() {
        // SAFETY: `p` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*p };
        // SAFETY: ifa_name is a NUL-terminated string of the node.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if name.to_bytes() == TAP.as_bytes()
            && !ifa.ifa_addr.is_null()
            && !ifa.ifa_data.is_null()
            // SAFETY: ifa_addr is non-null and points at a sockaddr.
            && i32::from(unsafe { (*ifa.ifa_addr).sa_family }) == libc::AF_PACKET
        {
            // SAFETY: for AF_PACKET entries ifa_data points at a struct rtnl_link_stats
            // (u32 counters: rx_packets, tx_packets, ..., tx_dropped at index 7).
            let stats = unsafe { std::slice::from_raw_parts(ifa.ifa_data.cast::<u32>(), 8) };
            out = Some((u64::from(stats[0]), u64::from(stats[7])));
        }
        p = ifa.ifa_next;
    }
    // SAFETY: frees the list getifaddrs returned; nothing refers to it any more.
    unsafe { libc::freeifaddrs(head) };
    out.with_context(|| format!("no counters for {TAP}"))
}

/// An AF_PACKET socket that sends frames out of the tap (into its reader: the device).
struct Injector {
    fd: OwnedFd,
    frames: Vec<Vec<u8>>,
}

impl Injector {
    fn new(ifindex: u32, frame: usize) -> Result<Injector> {
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            bail!("a packet socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: the descriptor was just created and is owned by nothing else.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: a zeroed sockaddr_ll is valid; the fields bind needs are set.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: bind with a sockaddr_ll that lives through the call.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r != 0 {
            bail!(
                "binding the packet socket: {}",
                std::io::Error::last_os_error()
            );
        }
        let one: libc::c_int = 1;
        // SAFETY: setsockopt with a pointer to a local int.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        let frames = (0..RX_BATCH)
            .map(|k| {
                let mut b = vec![0u8; frame];
                b[0..6].copy_from_slice(&MAC);
                b[6..12].copy_from_slice(&OTHER_MAC);
                b[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
                b[14] = k as u8;
                b
            })
            .collect();
        Ok(Injector { fd, frames })
    }

    /// Sends up to `n` frames (at most a batch); returns how many went.
    fn send(&mut self, n: usize) -> Result<usize> {
        let n = n.min(self.frames.len());
        let mut iov: Vec<libc::iovec> = self.frames[..n]
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: zeroed mmsghdr entries are valid; each gets one iovec of ours.
        let mut msgs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: sendmmsg over `n` headers whose buffers live through the call.
        let sent = unsafe { libc::sendmmsg(self.fd.as_raw_fd(), msgs.as_mut_ptr(), n as u32, 0) };
        if sent < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::ENOBUFS)
            {
                return Ok(0);
            }
            bail!("sendmmsg: {e}");
        }
        Ok(sent as usize)
    }
}

/// What one run measured.
#[derive(Clone, Copy, Debug, Default)]
struct Measured {
    frames_per_sec: f64,
    gbit_per_sec: f64,
}

/// Lays out the rings for `row` (buffers, descriptors, everything available).
fn prepare(ram: &Ram, row: &Row) -> (Vring, Vring) {
    let mut rx = Vring::new(ram, RX_RING);
    let mut tx = Vring::new(ram, TX_RING);
    match row.dir {
        Dir::Rx => {
            for i in 0..QSIZE {
                let addr = RX_BUFS + u64::from(i) * u64::from(RX_BUF_LEN);
                rx.set_desc(ram, i, addr, RX_BUF_LEN, true);
                rx.push(ram, i);
            }
            rx.publish(ram);
        }
        Dir::Tx => {
            let frame = tx_frame(row);
            for i in 0..QSIZE {
                let addr = TX_BUFS + u64::from(i) * TX_STRIDE;
                ram.write(addr, &frame);
                tx.set_desc(ram, i, addr, frame.len() as u32, false);
                tx.push(ram, i);
            }
        }
    }
    (rx, tx)
}

/// Drives `nic` for `secs` seconds in the direction of `row`.
fn drive(
    ram: &Ram,
    nic: &mut dyn Nic,
    rings: (Vring, Vring),
    row: &Row,
    ifindex: u32,
    secs: u64,
) -> Result<Measured> {
    match row.dir {
        Dir::Tx => drive_tx(ram, nic, rings.1, row, secs),
        Dir::Rx => drive_rx(ram, nic, rings.0, row, ifindex, secs),
    }
}

fn measured(done: u64, bytes_per_frame: usize, elapsed: Duration) -> Measured {
    let s = elapsed.as_secs_f64();
    Measured {
        frames_per_sec: done as f64 / s,
        gbit_per_sec: (done * bytes_per_frame as u64 * 8) as f64 / s / 1e9,
    }
}

/// Keeps the transmit ring full; checks the tap got every completed frame.
fn drive_tx(ram: &Ram, nic: &mut dyn Nic, mut tx: Vring, row: &Row, secs: u64) -> Result<Measured> {
    let (before, _) = tap_counters()?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let (mut done, mut idle) = (0u64, 0u32);
    let mut last_progress = start;
    let mut ids = Vec::with_capacity(usize::from(QSIZE));
    if tx.publish(ram) {
        nic.kick(1)?;
    }
    loop {
        ids.clear();
        let n = tx.reap(ram, |id, _| ids.push(id));
        let now = Instant::now();
        if n == 0 {
            idle += 1;
            pause(idle);
            if now - last_progress > Duration::from_secs(5) {
                bail!("the device stopped transmitting after {done} frames");
            }
        } else {
            idle = 0;
            last_progress = now;
            done += u64::from(n);
            for &id in &ids {
                tx.push(ram, id);
            }
            if tx.publish(ram) {
                nic.kick(1)?;
            }
        }
        if now >= deadline {
            break;
        }
    }
    let elapsed = start.elapsed();
    let (after, _) = tap_counters()?;
    ensure!(
        after - before >= done,
        "the tap counted {} frames, the device completed {done}",
        after - before
    );
    Ok(measured(done, row.frame, elapsed))
}

/// Sends frames into the tap (at most RX_IN_FLIGHT outstanding) and takes them from the
/// receive ring; checks each used length.
fn drive_rx(
    ram: &Ram,
    nic: &mut dyn Nic,
    mut rx: Vring,
    row: &Row,
    ifindex: u32,
    secs: u64,
) -> Result<Measured> {
    let mut injector = Injector::new(ifindex, row.frame)?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let (mut done, mut injected, mut lost, mut bad, mut idle) = (0u64, 0u64, 0u64, 0u64, 0u32);
    let mut last_progress = start;
    let mut ids = Vec::with_capacity(usize::from(QSIZE));
    let want = (HDR_LEN + row.frame) as u32;
    nic.kick(0)?;
    loop {
        let outstanding = injected.saturating_sub(done + lost);
        if outstanding + RX_BATCH as u64 <= RX_IN_FLIGHT {
            injected += injector.send(RX_BATCH)? as u64;
        }
        ids.clear();
        let n = rx.reap(ram, |id, len| {
            ids.push(id);
            if len != want {
                bad += 1;
            }
        });
        let now = Instant::now();
        if n == 0 {
            idle += 1;
            pause(idle);
            // Frames that never came were dropped somewhere; count them and go on.
            if outstanding > 0 && now - last_progress > Duration::from_millis(200) {
                lost += outstanding;
                last_progress = now;
            }
            if lost > 0 && done == 0 && now - start > Duration::from_secs(5) {
                bail!("the device delivered nothing");
            }
        } else {
            idle = 0;
            last_progress = now;
            done += u64::from(n);
            // A late frame counted as lost before: take it back.
            lost = lost.min(injected.saturating_sub(done));
            for &id in &ids {
                rx.push(ram, id);
            }
            if rx.publish(ram) {
                nic.kick(0)?;
            }
        }
        if now >= deadline {
            break;
        }
    }
    let elapsed = start.elapsed();
    ensure!(bad == 0, "{bad} frames arrived with the wrong length");
    let mut head = [0u8; 20];
    ram.read(RX_BUFS, &mut head);
    ensure!(
        head[HDR_LEN..HDR_LEN + 6] == MAC && u16::from_le_bytes([head[10], head[11]]) == 1,
        "a received buffer holds something else: {head:02x?}"
    );
    if lost > 0 {
        eprintln!("  ({lost} of {injected} frames sent into the tap never arrived)");
    }
    Ok(measured(done, row.frame, elapsed))
}

fn pause(idle_rounds: u32) {
    if idle_rounds < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// Reads whatever waits in the tap, so that a run starts empty.
fn drain(tap: &TapQueue) {
    use strata_vmm::net::tap::TapIo;
    let mut buf = vec![0u8; 70_000];
    while tap.read_frame(&mut buf).is_ok() {}
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    Strata,
    Qemu,
}

fn run(
    peer: Peer,
    ram: &Ram,
    tap: &TapQueue,
    ifindex: u32,
    row: &Row,
    secs: u64,
) -> Result<Measured> {
    drain(tap);
    match peer {
        Peer::Strata => {
            let rings = prepare(ram, row);
            let mut nic = start_strata(ram, tap)?;
            drive(ram, &mut nic, rings, row, ifindex, secs)
        }
        Peer::Qemu => {
            let mut rings = None;
            let mut nic = start_qemu(ram, tap, &mut || rings = Some(prepare(ram, row)))?;
            let rings = rings.context("the rings were not prepared")?;
            drive(ram, &mut nic, rings, row, ifindex, secs)
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut secs, mut rounds) = (3u64, 3usize);
    let mut only: Option<Peer> = None;
    let mut pick: Option<Vec<usize>> = None;
    while let Some(a) = args.next() {
        let mut val = || args.next().context("missing value");
        match a.as_str() {
            "--seconds" => secs = val()?.parse()?,
            "--rounds" => rounds = val()?.parse()?,
            "--seccomp" => strata_vmm::sandbox::enable_seccomp(None)?,
            "--only" => {
                only = Some(match val()?.as_str() {
                    "strata" => Peer::Strata,
                    "qemu" => Peer::Qemu,
                    other => bail!("--only strata|qemu, not {other}"),
                })
            }
            "--rows" => {
                pick = Some(
                    val()?
                        .split(',')
                        .map(|r| r.parse::<usize>())
                        .collect::<Result<_, _>>()?,
                )
            }
            other => bail!("unknown argument {other}"),
        }
    }
    ensure!(
        rounds > 0 && secs > 0,
        "--rounds and --seconds must be positive"
    );
    // SAFETY: unshare(2) with a constant flag, before any thread starts: the whole process
    // (and QEMU, its child) works in a network namespace of its own.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        bail!(
            "a network namespace of our own (run as root): {}",
            std::io::Error::last_os_error()
        );
    }
    // No IPv6 on the tap: its router solicitations would be frames neither side sent.
    for knob in ["all", "default"] {
        std::fs::write(format!("/proc/sys/net/ipv6/conf/{knob}/disable_ipv6"), "1")
            .context("turning IPv6 off in our namespace")?;
    }
    let tap = open_queues(TAP, 1)?.pop().context("no tap queue")?;
    let mut nl = Netlink::open()?;
    let link = nl.require(TAP)?;
    nl.set_up(link.index, TAP)?;
    let ram = Ram::new()?;
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .context("qemu-system-x86_64 is missing (apt-get install qemu-system-x86)")?;
    println!(
        "virtio-net host-side data path, {secs} s runs, {rounds} rounds alternating, one tap; \
         peer: {qemu} (virtio-net-pci, vhost=off, under qtest); load average at start {}",
        loadavg()
    );
    let rows = [
        Row {
            dir: Dir::Tx,
            frame: 60,
            tso: false,
        },
        Row {
            dir: Dir::Tx,
            frame: 1514,
            tso: false,
        },
        Row {
            dir: Dir::Tx,
            frame: 54 + TSO_PAYLOAD,
            tso: true,
        },
        Row {
            dir: Dir::Rx,
            frame: 60,
            tso: false,
        },
        Row {
            dir: Dir::Rx,
            frame: 1514,
            tso: false,
        },
    ];
    let rows: Vec<Row> = match pick {
        Some(p) => p
            .iter()
            .map(|&i| rows.get(i).copied().context("--rows: no such row"))
            .collect::<Result<_>>()?,
        None => rows.to_vec(),
    };
    let peers: Vec<Peer> = match only {
        Some(p) => vec![p],
        None => vec![Peer::Strata, Peer::Qemu],
    };
    let mut table = Vec::new();
    for row in &rows {
        let mut results: Vec<Vec<Measured>> = vec![Vec::new(); peers.len()];
        for r in 0..rounds {
            for (k, &peer) in peers.iter().enumerate() {
                let m = run(peer, &ram, &tap, link.index, row, secs)
                    .with_context(|| format!("{} with {peer:?}", row.label()))?;
                eprintln!(
                    "{} round {r}: {peer:?} {:.0} frames/s, {:.2} Gbit/s",
                    row.label(),
                    m.frames_per_sec,
                    m.gbit_per_sec
                );
                results[k].push(m);
            }
        }
        let med: Vec<(f64, f64)> = results
            .into_iter()
            .map(|v| {
                (
                    median(v.iter().map(|m| m.frames_per_sec).collect()),
                    median(v.iter().map(|m| m.gbit_per_sec).collect()),
                )
            })
            .collect();
        table.push((row.label(), med));
    }
    println!("| row | strata frames/s | strata Gbit/s | qemu frames/s | qemu Gbit/s | ratio |");
    println!("|---|---|---|---|---|---|");
    for (label, med) in table {
        let cell = |p: Peer| peers.iter().position(|&q| q == p).map(|k| med[k]);
        let fmt = |c: Option<(f64, f64)>| match c {
            Some((fps, g)) => (format!("{fps:.0}"), format!("{g:.2}")),
            None => ("-".into(), "-".into()),
        };
        let (s, q) = (cell(Peer::Strata), cell(Peer::Qemu));
        let ratio = match (s, q) {
            (Some(s), Some(q)) => format!("{:.2}x", s.0 / q.0),
            _ => "-".into(),
        };
        let ((sf, sg), (qf, qg)) = (fmt(s), fmt(q));
        println!("| {label} | {sf} | {sg} | {qf} | {qg} | {ratio} |");
    }
    println!("load average at end {}", loadavg());
    Ok(())
}

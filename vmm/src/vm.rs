//! Building and running a VM: memory, the in-kernel irqchip, legacy devices, one virtio-mmio
//! block device per disk and one network device per NIC, the guest payload (a Linux kernel or a freestanding test image), and
//! the vCPU threads; then waiting for power-off, reset or a timeout.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use strata_storage::BlockDevice;
use tracing::{info, warn};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::blk::engine::QueueStats;
use crate::blk::{BlkConfig, BlkDevice, DiskOptions};
use crate::boot;
use crate::bus::{Bus, SharedDevice};
use crate::devices::{
    ExitCounters, PostMark, SerialDevice, SystemControl, VmControl, ACPI_SLEEP_PORT, I8042_PORT,
    POST_PORT, SERIAL_GSI, SERIAL_PORT,
};
use crate::error::{Result, VmmError};
use crate::ged::{Ged, GedDevice, GED_GSI, GED_PORT};
use crate::kvm::vcpu::{install_kick_handler, kick_until_stopped, VcpuExitReason};
use crate::kvm::{Vcpu, Vm};
use crate::memory::{self, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use crate::net::config::NetCountersSnapshot;
use crate::net::tap::TapIo;
use crate::net::{NetConfig, NetDevice, NetOptions};
use crate::sandbox::{self, Role};
use crate::transport::mmio::{VirtioMmio, QUEUE_NOTIFY};

/// The first interrupt line given to virtio devices (0-4 are legacy; 4 is the serial port).
pub const FIRST_VIRTIO_GSI: u32 = 5;
/// Most virtio devices (disks and NICs together) per VM (I/O APIC pins 5 to 23).
pub const MAX_DEVICES: usize = 19;
/// Most disks per VM (every device may be a disk).
pub const MAX_DISKS: usize = MAX_DEVICES;
/// Most NICs per VM.
pub const MAX_NICS: usize = 8;

/// What the VM runs.
#[derive(Debug)]
pub enum Payload {
    /// A Linux bzImage through the 64-bit boot protocol.
    Linux {
        /// The bzImage.
        kernel: PathBuf,
        /// An initramfs.
        initrd: Option<PathBuf>,
        /// The kernel command line.
        cmdline: String,
    },
    /// A Linux bzImage held in memory (read before the VMM gave up its file-system access),
    /// booted like [`Payload::Linux`].
    LinuxImage {
        /// The kernel's name, for errors.
        name: String,
        /// The bzImage.
        kernel: Arc<Vec<u8>>,
        /// An initramfs.
        initrd: Option<Arc<Vec<u8>>>,
        /// The kernel command line.
        cmdline: String,
    },
    /// A freestanding 64-bit image loaded at `load_addr` and entered there in long mode with
    /// identity-mapped page tables and `rsp` = `load_addr` (the stack grows down below it).
    Flat {
        /// The image's bytes.
        image: Vec<u8>,
        /// Where to load and enter it.
        load_addr: u64,
    },
}

/// A disk to attach.
#[derive(Debug)]
pub struct DiskSpec {
    /// A name for logs (usually the path).
    pub name: String,
    /// The block device: any image, volume or wrapper.
    pub device: Arc<dyn BlockDevice>,
    /// How to present it.
    pub options: DiskOptions,
}

/// A NIC to attach.
#[derive(Debug)]
pub struct NetSpec {
    /// A name for logs (the network or tap name).
    pub name: String,
    /// The tap's queues, one per queue pair.
    pub taps: Vec<Arc<dyn TapIo>>,
    /// How to present it.
    pub options: NetOptions,
}

/// A VM to run.
pub struct VmConfig {
    /// Guest memory in bytes.
    pub memory: u64,
    /// Number of vCPUs.
    pub cpus: u8,
    /// What to boot.
    pub payload: Payload,
    /// Disks, in order (the first is /dev/vda in Linux).
    pub disks: Vec<DiskSpec>,
    /// NICs, in order (after the disks on the device windows).
    pub nets: Vec<NetSpec>,
    /// Where the serial console goes.
    pub serial: Box<dyn Write + Send>,
    /// Give up after this long (the VM is stopped and the run reports a timeout).
    pub timeout: Option<Duration>,
    /// An open /dev/kvm to use instead of opening it (a sandboxed VMM cannot open files).
    pub kvm: Option<Arc<OwnedFd>>,
}

impl std::fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConfig")
            .field("memory", &self.memory)
            .field("cpus", &self.cpus)
            .field("payload", &self.payload)
            .field("disks", &self.disks)
            .field("nets", &self.nets)
            .finish()
    }
}

/// How a run ended, with the counters tests and benchmarks report.
#[derive(Debug)]
pub struct RunReport {
    /// Power-off, reset, or `Stopped` (timeout).
    pub reason: VcpuExitReason,
    /// Per-queue counters of every disk, in order.
    pub queue_stats: Vec<Vec<QueueStats>>,
    /// Counters of every NIC, in order.
    pub net_stats: Vec<NetCountersSnapshot>,
    /// MMIO exits to user space.
    pub mmio_exits: u64,
    /// Port I/O exits to user space.
    pub pio_exits: u64,
    /// POST codes the guest wrote, with the exit counts at that moment.
    pub marks: Vec<PostMark>,
}

/// Builds the VM described by `cfg`, runs it until it powers off, resets or times out.
pub fn run(cfg: VmConfig) -> Result<RunReport> {
    run_with_control(cfg, Arc::new(VmControl::default()))
}

/// Like [`run`], with a [`VmControl`] the caller keeps: `control.request(VcpuExitReason::Stopped)`
/// from any thread stops the VM (a hard stop: the vCPUs leave KVM_RUN, the disks are flushed)
/// and this function returns with reason `Stopped`. A request made before the call takes effect
/// as soon as the VM is built.
pub fn run_with_control(cfg: VmConfig, control: Arc<VmControl>) -> Result<RunReport> {
    if cfg.cpus == 0 || cfg.cpus > 64 {
        return Err(VmmError::Config(format!(
            "--cpus {} is out of range (1 to 64)",
            cfg.cpus
        )));
    }
    if cfg.nets.len() > MAX_NICS {
        return Err(VmmError::Config(format!(
            "At most {MAX_NICS} NICs are supported"
        )));
    }
    if cfg.disks.len() + cfg.nets.len() > MAX_DEVICES {
        return Err(VmmError::Config(format!(
            "At most {MAX_DEVICES} disks and NICs together are supported"
        )));
    }
    install_kick_handler()?;
    let mem = memory::create(cfg.memory)?;
    let vm = match &cfg.kvm {
        Some(fd) => Vm::with_kvm_fd(fd, mem.clone())?,
        None => Vm::new(mem.clone())?,
    };
    let counters = ExitCounters::default();
    let mut pio = Bus::with_counter(counters.pio.clone());
    let mut mmio = Bus::with_counter(counters.mmio.clone());
    let counters = Arc::new(counters);
    let marks = Arc::new(Mutex::new(Vec::new()));

    let serial_irq = eventfd()?;
    vm.register_irqfd(&serial_irq, SERIAL_GSI)?;
    insert(
        &mut pio,
        SERIAL_PORT,
        8,
        Arc::new(Mutex::new(SerialDevice::new(serial_irq, cfg.serial))),
    )?;
    let ged_irq = eventfd()?;
    vm.register_irqfd(&ged_irq, GED_GSI)?;
    let ged = Ged::new(ged_irq);
    insert(
        &mut pio,
        GED_PORT,
        1,
        Arc::new(Mutex::new(GedDevice(ged.clone()))),
    )?;
    for (port, len) in [(ACPI_SLEEP_PORT, 1), (I8042_PORT, 1), (POST_PORT, 1)] {
        let dev = SystemControl::new(control.clone(), port, counters.clone(), marks.clone());
        insert(&mut pio, port, len, Arc::new(Mutex::new(dev)))?;
    }

    let mut devices = Vec::new();
    let mut mmio_windows = Vec::new();
    for (i, disk) in cfg.disks.into_iter().enumerate() {
        let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE;
        let gsi = FIRST_VIRTIO_GSI + i as u32;
        let blk = BlkConfig::new(disk.device, &disk.options)
            .map_err(|e| VmmError::Config(format!("Disk {}: {e}", disk.name)))?;
        let mut kicks = Vec::new();
        for q in 0..blk.num_queues() {
            let kick = eventfd()?;
            vm.register_mmio_ioeventfd(&kick, base + QUEUE_NOTIFY, u32::from(q))?;
            kicks.push(kick);
        }
        let irq = eventfd()?;
        vm.register_irqfd(&irq, gsi)?;
        let name = format!("vd{}", (b'a' + i as u8) as char);
        let dev = Arc::new(Mutex::new(VirtioMmio::new(
            name.clone(),
            BlkDevice::new(name, Arc::new(blk)),
            mem.clone(),
            kicks,
            irq,
        )));
        insert(&mut mmio, base, VIRTIO_MMIO_SIZE, dev.clone())?;
        devices.push((dev, disk.name));
        mmio_windows.push((base, gsi));
    }
    let mut nics = Vec::new();
    for (k, nic) in cfg.nets.into_iter().enumerate() {
        let i = mmio_windows.len();
        let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE;
        let gsi = FIRST_VIRTIO_GSI + i as u32;
        let ufo = nic
            .taps
            .first()
            .is_some_and(|t| crate::net::tap::supports_ufo(t.as_ref()));
        let net = NetConfig::new(&nic.options, ufo)
            .map_err(|e| VmmError::Config(format!("NIC {}: {e}", nic.name)))?;
        let mut kicks = Vec::new();
        for q in 0..net.num_queues() {
            let kick = eventfd()?;
            vm.register_mmio_ioeventfd(&kick, base + QUEUE_NOTIFY, q as u32)?;
            kicks.push(kick);
        }
        let irq = eventfd()?;
        vm.register_irqfd(&irq, gsi)?;
        let name = format!("net{k}");
        let counters = net.counters().clone();
        let device = NetDevice::new(name.clone(), Arc::new(net), nic.taps)
            .map_err(|e| VmmError::Config(format!("NIC {}: {e}", nic.name)))?;
        let dev = Arc::new(Mutex::new(VirtioMmio::new(
            name,
            device,
            mem.clone(),
            kicks,
            irq,
        )));
        insert(&mut mmio, base, VIRTIO_MMIO_SIZE, dev.clone())?;
        nics.push((dev, counters));
        mmio_windows.push((base, gsi));
    }

    let (entry, boot_params, stack) = match &cfg.payload {
        Payload::Linux {
            kernel,
            initrd,
            cmdline,
        } => {
            let e = boot::linux::load(
                &mem,
                kernel,
                initrd.as_deref(),
                cmdline,
                cfg.cpus,
                &mmio_windows,
            )?;
            (e.entry, e.boot_params, 0)
        }
        Payload::LinuxImage {
            name,
            kernel,
            initrd,
            cmdline,
        } => {
            let e = boot::linux::load_from(
                &mem,
                name,
                &mut std::io::Cursor::new(kernel.as_slice()),
                initrd.as_deref().map(Vec::as_slice),
                cmdline,
                cfg.cpus,
                &mmio_windows,
            )?;
            (e.entry, e.boot_params, 0)
        }
        Payload::Flat { image, load_addr } => {
            mem.write_slice(image, GuestAddress(*load_addr))
                .map_err(|e| VmmError::Boot(format!("the image does not fit in memory: {e}")))?;
            (*load_addr, 0, *load_addr)
        }
    };

    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let errors: Arc<Mutex<Vec<VmmError>>> = Arc::default();
    for id in 0..cfg.cpus {
        let mut vcpu = Vcpu::new(&vm, id, cfg.cpus)?;
        if id == 0 {
            vcpu.enter_long_mode(&mem, entry, boot_params, stack)?;
        }
        let (pio, mmio, control, errors) =
            (pio.clone(), mmio.clone(), control.clone(), errors.clone());
        let t = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                // The vCPU's seccomp filter goes on before the guest runs a single instruction.
                sandbox::enter(Role::Vcpu);
                match vcpu.run(&pio, &mmio, control.stop_flag()) {
                    Ok(VcpuExitReason::Stopped) => {}
                    Ok(reason) => control.request(reason),
                    Err(e) => {
                        errors.lock().unwrap_or_else(|p| p.into_inner()).push(e);
                        control.request(VcpuExitReason::Stopped);
                    }
                }
            })
            .map_err(|e| VmmError::io("Starting a vCPU thread", e))?;
        threads.push(t);
    }
    {
        use std::os::unix::thread::JoinHandleExt;
        control.attach(ged, threads.iter().map(|t| t.as_pthread_t()).collect());
    }

    let reason = control.wait(cfg.timeout);
    control.detach();
    kick_until_stopped(control.stop_flag(), &threads);
    for t in threads {
        let _ = t.join();
    }
    let mut queue_stats = Vec::new();
    for (dev, name) in &devices {
        let mut d = dev.lock().unwrap_or_else(|p| p.into_inner());
        d.stop();
        let stats = d.device().stats();
        queue_stats.push(stats.lock().unwrap_or_else(|p| p.into_inner()).clone());
        if let Err(e) = d.device().flush_disk() {
            warn!("flushing {name} at the end of the VM failed: {e}");
        }
    }
    let mut net_stats = Vec::new();
    for (dev, counters) in &nics {
        dev.lock().unwrap_or_else(|p| p.into_inner()).stop();
        net_stats.push(counters.snapshot());
    }
    if let Some(e) = errors.lock().unwrap_or_else(|p| p.into_inner()).pop() {
        return Err(e);
    }
    let reason = reason.unwrap_or(VcpuExitReason::Stopped);
    info!(?reason, "VM ended");
    let marks = marks.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(RunReport {
        reason,
        queue_stats,
        net_stats,
        mmio_exits: counters.mmio.load(Ordering::Relaxed),
        pio_exits: counters.pio.load(Ordering::Relaxed),
        marks,
    })
}

fn insert(bus: &mut Bus, base: u64, len: u64, dev: SharedDevice) -> Result<()> {
    bus.insert(base, len, dev).map_err(VmmError::Config)
}

fn eventfd() -> Result<EventFd> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::io("Creating an eventfd", e))
}

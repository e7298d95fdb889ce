//! vCPUs: CPUID from KVM's supported set, the local APIC's LINT pins, the 64-bit entry state
//! (the Linux 64-bit boot protocol's, also used by freestanding test guests), and the run loop
//! that sends the remaining exits to the buses.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use kvm_bindings::{kvm_segment, KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_RESET};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::bus::Bus;
use crate::error::{Result, VmmError};
use crate::kvm::Vm;

/// The boot GDT (null, null, 64-bit code at 0x10, data at 0x18, as the boot protocol asks).
const GDT_ADDR: u64 = 0x500;
const GDT: [u64; 4] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
const IDT_ADDR: u64 = 0x520;
/// Identity page tables for the first 4 GiB in 2 MiB pages: PML4, PDPT, four PDs.
const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Why a vCPU stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuExitReason {
    /// The guest powered off.
    Shutdown,
    /// The guest asked for a reset (or triple-faulted).
    Reboot,
    /// The VMM asked the vCPU to stop.
    Stopped,
}

/// Shared by the vCPUs and the VMM: set when the VM must stop; also holds vCPUs parked while
/// the VM is paused.
#[derive(Debug, Default)]
pub struct StopFlag {
    stop: AtomicBool,
    paused: Mutex<bool>,
    changed: Condvar,
    parked: AtomicUsize,
}

impl StopFlag {
    /// Asks every vCPU to stop at its next exit (parked ones too).
    pub fn set(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _p = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        self.changed.notify_all();
    }

    /// Whether a stop was asked for.
    pub fn is_set(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Asks vCPUs to park at their next exit (`true`) or lets them run again (`false`).
    pub fn set_paused(&self, paused: bool) {
        *self.paused.lock().unwrap_or_else(|p| p.into_inner()) = paused;
        self.changed.notify_all();
    }

    /// Whether a pause is asked for.
    pub fn is_paused(&self) -> bool {
        *self.paused.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// vCPUs parked now.
    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::SeqCst)
    }

    /// Blocks the calling vCPU while a pause is asked for and no stop is.
    fn park_while_paused(&self) {
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        if !*paused || self.is_set() {
            return;
        }
        self.parked.fetch_add(1, Ordering::SeqCst);
        while *paused && !self.is_set() {
            paused = self.changed.wait(paused).unwrap_or_else(|p| p.into_inner());
        }
        self.parked.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One vCPU.
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    id: u8,
}

impl Vcpu {
    /// Creates vCPU `id` of `count` with CPUID from KVM's supported set and the local APIC's
    /// LINT0 as ExtINT and LINT1 as NMI (as a BIOS would leave them).
    pub fn new(vm: &Vm, id: u8, count: u8) -> Result<Vcpu> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(|e| VmmError::Kvm("Creating a vCPU", e))?;
        let mut cpuid = vm
            .kvm()
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmmError::Kvm("Reading supported CPUID", e))?;
        for e in cpuid.as_mut_slice() {
            match e.function {
                1 => {
                    // Initial APIC id, logical processor count, and the hypervisor bit.
                    e.ebx =
                        (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                    e.ecx |= 1 << 31;
                }
                0xb | 0x1f => e.edx = u32::from(id),
                _ => {}
            }
        }
        fd.set_cpuid2(&cpuid)
            .map_err(|e| VmmError::Kvm("Setting CPUID", e))?;
        let mut lapic = fd
            .get_lapic()
            .map_err(|e| VmmError::Kvm("Reading the local APIC", e))?;
        set_lvt_mode(&mut lapic.regs, 0x350, 7); // LINT0: ExtINT
        set_lvt_mode(&mut lapic.regs, 0x360, 4); // LINT1: NMI
        fd.set_lapic(&lapic)
            .map_err(|e| VmmError::Kvm("Setting the local APIC", e))?;
        Ok(Vcpu { fd, id })
    }

    /// The vCPU's id (its APIC id).
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Puts the vCPU in 64-bit mode at `entry` with identity-mapped page tables for the first
    /// 4 GiB (written into guest memory), `rsi` set to `boot_params` and `rsp` to `stack`.
    pub fn enter_long_mode(
        &self,
        mem: &GuestMemoryMmap,
        entry: u64,
        boot_params: u64,
        stack: u64,
    ) -> Result<()> {
        write_boot_tables(mem)?;
        let mut sregs = self
            .fd
            .get_sregs()
            .map_err(|e| VmmError::Kvm("Reading special registers", e))?;
        let code = segment(0x10, 0xb, true);
        let data = segment(0x18, 0x3, false);
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
        sregs.idt.base = IDT_ADDR;
        sregs.idt.limit = 0;
        sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
        sregs.cr3 = PML4_ADDR;
        sregs.cr4 = CR4_PAE;
        sregs.efer = EFER_LME | EFER_LMA;
        self.fd
            .set_sregs(&sregs)
            .map_err(|e| VmmError::Kvm("Setting special registers", e))?;
        let regs = kvm_bindings::kvm_regs {
            rflags: 2,
            rip: entry,
            rsi: boot_params,
            rsp: stack,
            rbp: stack,
            ..Default::default()
        };
        self.fd
            .set_regs(&regs)
            .map_err(|e| VmmError::Kvm("Setting registers", e))?;
        let fpu = kvm_bindings::kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd
            .set_fpu(&fpu)
            .map_err(|e| VmmError::Kvm("Setting the FPU", e))
    }

    /// Runs until the guest powers off or resets, or `stop` is set (and the thread is kicked
    /// with a signal). Port and MMIO exits go to the buses.
    pub fn run(&mut self, pio: &Bus, mmio: &Bus, stop: &StopFlag) -> Result<VcpuExitReason> {
        loop {
            if stop.is_set() {
                return Ok(VcpuExitReason::Stopped);
            }
            stop.park_while_paused();
            if stop.is_set() {
                return Ok(VcpuExitReason::Stopped);
            }
            match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => pio.write(u64::from(port), data),
                Ok(VcpuExit::IoIn(port, data)) => pio.read(u64::from(port), data),
                Ok(VcpuExit::MmioRead(addr, data)) => mmio.read(addr, data),
                Ok(VcpuExit::MmioWrite(addr, data)) => mmio.write(addr, data),
                Ok(VcpuExit::Shutdown) => return Ok(VcpuExitReason::Reboot),
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    return Ok(if kind == KVM_SYSTEM_EVENT_RESET {
                        VcpuExitReason::Reboot
                    } else {
                        VcpuExitReason::Shutdown
                    })
                }
                Ok(VcpuExit::Hlt) => return Ok(VcpuExitReason::Shutdown),
                Ok(VcpuExit::Intr) => {}
                Ok(other) => {
                    return Err(VmmError::Boot(format!(
                        "vCPU {} stopped on an unexpected exit: {other:?}",
                        self.id
                    )))
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => return Err(VmmError::Kvm("Running a vCPU", e)),
            }
        }
    }
}

/// A flat 4 GiB segment: `code` selects a 64-bit code segment, else a data segment.
fn segment(selector: u16, type_: u8, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        ..Default::default()
    }
}

/// Sets the delivery mode (bits 8-10) of the local APIC LVT register at `offset`.
fn set_lvt_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = regs[offset + i] as u8;
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (i, x) in v.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *x as std::os::raw::c_char;
    }
}

/// Writes the GDT, an empty IDT and identity page tables for 4 GiB.
fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<()> {
    let w = |addr: u64, v: u64| {
        mem.write_obj(v, GuestAddress(addr))
            .map_err(|e| VmmError::Boot(format!("writing boot tables: {e}")))
    };
    for (i, e) in GDT.iter().enumerate() {
        w(GDT_ADDR + 8 * i as u64, *e)?;
    }
    w(IDT_ADDR, 0)?;
    w(PML4_ADDR, PDPT_ADDR | 3)?;
    for i in 0..4u64 {
        w(PDPT_ADDR + 8 * i, (PD_ADDR + 0x1000 * i) | 3)?;
    }
    for j in 0..2048u64 {
        // Present, writable, 2 MiB page.
        w(PD_ADDR + 8 * j, (j << 21) | 0x83)?;
    }
    Ok(())
}

/// Stops vCPU threads: sets the flag, then signals the threads until they have all left
/// KVM_RUN (a signal that lands just before KVM_RUN is entered would otherwise be lost).
pub fn kick_until_stopped(stop: &StopFlag, threads: &[std::thread::JoinHandle<()>]) {
    use std::os::unix::thread::JoinHandleExt;
    stop.set();
    for _ in 0..500 {
        if threads.iter().all(|t| t.is_finished()) {
            return;
        }
        for t in threads.iter().filter(|t| !t.is_finished()) {
            // SAFETY: pthread_kill on a live thread handle (not yet joined) with a signal whose
            // handler is installed by `install_kick_handler` and does nothing.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The signal used to kick vCPUs out of KVM_RUN.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

/// Installs a no-op handler for [`kick_signal`] so that it interrupts KVM_RUN (EINTR) instead of
/// killing the process.
pub fn install_kick_handler() -> Result<()> {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    vmm_sys_util::signal::register_signal_handler(kick_signal(), noop)
        .map_err(|e| VmmError::io("Installing the vCPU kick handler", e.into()))
}

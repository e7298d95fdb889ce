//! The VM file descriptor: capability checks, guest memory slots, the in-kernel irqchip and PIT,
//! and the eventfds that keep notifications and interrupts inside the kernel.

use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::blk::chain::SharedMemory;
use crate::error::{Result, VmmError};

/// Where KVM puts its TSS (three pages just below the identity map page, inside the hole).
const TSS_ADDR: usize = 0xfffb_d000;

/// Capabilities the VMM needs, with what they are for.
const NEEDED: &[(Cap, &str)] = &[
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY (guest memory)"),
    (
        Cap::Irqchip,
        "KVM_CAP_IRQCHIP (in-kernel interrupt controllers)",
    ),
    (Cap::Pit2, "KVM_CAP_PIT2 (in-kernel timer)"),
    (
        Cap::Ioeventfd,
        "KVM_CAP_IOEVENTFD (queue notifications without exits)",
    ),
    (Cap::Irqfd, "KVM_CAP_IRQFD (interrupts from device threads)"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID (CPUID for the guest)"),
    (
        Cap::ImmediateExit,
        "KVM_CAP_IMMEDIATE_EXIT (stopping vCPUs)",
    ),
];

/// A KVM virtual machine with its memory.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    mem: SharedMemory,
}

impl Vm {
    /// Opens /dev/kvm, checks every needed capability, creates the VM with an in-kernel
    /// irqchip and PIT, and maps `mem`.
    pub fn new(mem: SharedMemory) -> Result<Vm> {
        let kvm = Kvm::new().map_err(VmmError::NoKvm)?;
        Vm::with_kvm(kvm, mem)
    }

    /// Like [`Vm::new`] on a /dev/kvm descriptor opened earlier (it is duplicated, so the VMM
    /// can build the VM again after a guest reboot without opening files).
    pub fn with_kvm_fd(kvm_fd: &OwnedFd, mem: SharedMemory) -> Result<Vm> {
        let fd = kvm_fd
            .try_clone()
            .map_err(|e| VmmError::io("Duplicating the /dev/kvm descriptor", e))?;
        // SAFETY: `fd` is a fresh duplicate of an open /dev/kvm descriptor that nothing else
        // owns; `Kvm` takes ownership and closes it.
        let kvm = unsafe { Kvm::from_raw_fd(fd.into_raw_fd()) };
        Vm::with_kvm(kvm, mem)
    }

    fn with_kvm(kvm: Kvm, mem: SharedMemory) -> Result<Vm> {
        if kvm.get_api_version() != 12 {
            return Err(VmmError::MissingCapability("KVM API version 12"));
        }
        for (cap, what) in NEEDED {
            if !kvm.check_extension(*cap) {
                return Err(VmmError::MissingCapability(what));
            }
        }
        let fd = kvm
            .create_vm()
            .map_err(|e| VmmError::Kvm("Creating the VM", e))?;
        fd.set_tss_address(TSS_ADDR)
            .map_err(|e| VmmError::Kvm("Setting the TSS address", e))?;
        fd.create_irq_chip()
            .map_err(|e| VmmError::Kvm("Creating the in-kernel irqchip", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| VmmError::Kvm("Creating the in-kernel PIT", e))?;
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| VmmError::Memory(e.to_string()))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping of `memory_size` bytes owned by `mem`, which
            // this `Vm` keeps (an `Arc`) for as long as the VM file descriptor exists; the VM is
            // dropped before or with it, so KVM never sees the mapping go away under it.
            unsafe { fd.set_user_memory_region(r) }
                .map_err(|e| VmmError::Kvm("Mapping guest memory", e))?;
        }
        Ok(Vm { kvm, fd, mem })
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Guest memory.
    pub fn memory(&self) -> &SharedMemory {
        &self.mem
    }

    /// Makes a guest write of `datamatch` (as a 32-bit value) to MMIO `addr` signal `evt`
    /// inside the kernel.
    pub fn register_mmio_ioeventfd(&self, evt: &EventFd, addr: u64, datamatch: u32) -> Result<()> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(|e| VmmError::Kvm("Registering an ioeventfd", e))
    }

    /// Makes a write to `evt` raise interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|e| VmmError::Kvm("Registering an irqfd", e))
    }
}

//! Linux boot through the 64-bit boot protocol: the bzImage's protected-mode kernel is loaded at
//! 1 MiB by linux-loader, the zero page (boot_params) gets the setup header, the e820 map, the
//! command line and initrd pointers and the ACPI RSDP address, and the vCPU enters at the
//! 64-bit entry point (load address + 0x200) in long mode with `rsi` pointing at the zero page.

use std::fs::File;
use std::io::{Read, Seek};
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, CAN_USE_HEAP, KEEP_SEGMENTS, LOADED_HIGH};
use linux_loader::loader::{bzimage::BzImage, load_cmdline, Cmdline, KernelLoader};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, ReadVolatile,
};

use crate::boot::acpi;
use crate::error::{Result, VmmError};
use crate::memory::MMIO_HOLE_START;

/// The zero page.
const ZERO_PAGE: u64 = 0x7000;
/// The command line.
const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest command line we pass.
const CMDLINE_MAX: usize = 4096;
/// Where the kernel goes.
const HIMEM_START: u64 = 0x10_0000;
/// End of conventional memory below the EBDA.
const EBDA_START: u64 = 0x9_fc00;
/// The ACPI tables' area (the BIOS read-only area, reserved in e820).
pub const ACPI_START: u64 = 0xe_0000;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Where to enter the kernel.
#[derive(Clone, Copy, Debug)]
pub struct LinuxEntry {
    /// The 64-bit entry point.
    pub entry: u64,
    /// The zero page, for `rsi`.
    pub boot_params: u64,
}

/// Loads `kernel` (a bzImage), `initrd` and `cmdline` into `mem`, and ACPI tables describing
/// `cpus` CPUs and the virtio-mmio windows `(base, gsi)`.
pub fn load(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    cpus: u8,
    virtio_mmio: &[(u64, u32)],
) -> Result<LinuxEntry> {
    let boot_err = |what: &str, e: &dyn std::fmt::Display| VmmError::Boot(format!("{what}: {e}"));
    let mut file = File::open(kernel).map_err(|e| boot_err(&kernel.display().to_string(), &e))?;
    let initrd = initrd
        .map(|p| std::fs::read(p).map_err(|e| boot_err(&p.display().to_string(), &e)))
        .transpose()?;
    let name = kernel.display().to_string();
    load_from(
        mem,
        &name,
        &mut file,
        initrd.as_deref(),
        cmdline,
        cpus,
        virtio_mmio,
    )
}

/// Like [`load`], from a kernel and initrd already open or in memory (`name` names the
/// kernel in errors).
pub fn load_from<F: Read + ReadVolatile + Seek>(
    mem: &GuestMemoryMmap,
    name: &str,
    kernel: &mut F,
    initrd: Option<&[u8]>,
    cmdline: &str,
    cpus: u8,
    virtio_mmio: &[(u64, u32)],
) -> Result<LinuxEntry> {
    let boot_err = |what: &str, e: &dyn std::fmt::Display| VmmError::Boot(format!("{what}: {e}"));
    let loaded = BzImage::load(mem, None, kernel, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| boot_err(&format!("{name} is not a loadable bzImage"), &e))?;
    let mut params = boot_params::default();
    let Some(hdr) = loaded.setup_header else {
        return Err(VmmError::Boot("the bzImage has no setup header".into()));
    };
    params.hdr = hdr;
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP | KEEP_SEGMENTS;
    params.hdr.heap_end_ptr = 0xfe00;

    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(|e| boot_err("command line", &e))?;
    cl.insert_str(cmdline)
        .map_err(|e| boot_err("command line", &e))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl).map_err(|e| boot_err("command line", &e))?;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;

    let low_end = mem
        .iter()
        .map(|r| r.start_addr().0 + r.len())
        .filter(|&end| end <= MMIO_HOLE_START)
        .max()
        .unwrap_or(0);
    if let Some(data) = initrd {
        let max = u64::from(params.hdr.initrd_addr_max).min(low_end.saturating_sub(1));
        let addr = (max + 1)
            .checked_sub(data.len() as u64)
            .map(|a| a & !0xfff)
            .filter(|&a| a >= loaded.kernel_end)
            .ok_or_else(|| VmmError::Boot("the initrd does not fit in low memory".into()))?;
        mem.write_slice(data, GuestAddress(addr))
            .map_err(|e| boot_err("writing the initrd", &e))?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = data.len() as u32;
    }

    let mut e820 = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0x10_0000 - EBDA_START, E820_RESERVED),
    ];
    for r in mem.iter() {
        let start = r.start_addr().0.max(HIMEM_START);
        let end = r.start_addr().0 + r.len();
        if end > start {
            e820.push((start, end - start, E820_RAM));
        }
    }
    for (i, (addr, size, kind)) in e820.iter().enumerate() {
        params.e820_table[i].addr = *addr;
        params.e820_table[i].size = *size;
        params.e820_table[i].r#type = *kind;
    }
    params.e820_entries = e820.len() as u8;

    params.acpi_rsdp_addr = acpi::write_tables(mem, ACPI_START, cpus, virtio_mmio)?;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(|e| boot_err("writing the zero page", &e))?;
    Ok(LinuxEntry {
        entry: loaded.kernel_load.0 + 0x200,
        boot_params: ZERO_PAGE,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_a_bzimage_is_refused_with_its_name() {
        let mem = crate::memory::create(64 << 20).unwrap();
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), vec![0u8; 8192]).unwrap();
        let e = load(&mem, f.path(), None, "console=ttyS0", 1, &[]).unwrap_err();
        assert!(e.to_string().contains("not a loadable bzImage"), "{e}");
    }
}

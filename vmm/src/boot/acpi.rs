//! ACPI tables for a Linux guest: RSDP, XSDT, a hardware-reduced FADT, a MADT listing the local
//! APICs and the I/O APIC, and a DSDT that declares each virtio-mmio window as an `LNRO0005`
//! device with its memory range and interrupt, which Linux's virtio_mmio driver binds to by
//! itself (Debian's kernel cannot take virtio-mmio devices from the command line).
//!
//! Power-off and reset go through the FADT's sleep-control and reset registers, both at port
//! [`ACPI_SLEEP_PORT`], served by [`crate::devices::SystemControl`]. The power button is a
//! `PNP0C0C` device notified by a Generic Event Device (see [`crate::ged`]): a hardware-reduced
//! FADT has no fixed-feature power button.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::{ACPI_RESET_VALUE, ACPI_SLEEP_PORT, S5_SLEEP_TYPE};
use crate::error::{Result, VmmError};
use crate::ged::{EVENT_POWER_BUTTON, GED_GSI, GED_PORT};
use crate::memory::{IOAPIC_ADDR, LAPIC_ADDR, VIRTIO_MMIO_SIZE};

const OEM_ID: [u8; 6] = *b"STRATA";
const OEM_TABLE_ID: [u8; 8] = *b"STRATAVM";

/// The power button (`PWRB`, `PNP0C0C`) and the GED (`ACPI0013`) whose `_EVT` method reads the
/// event register and notifies the button (0x80: "pressed").
fn power_button_aml(bytes: &mut Vec<u8>) {
    let pwrb_hid = aml::EISAName::new("PNP0C0C");
    let zero = aml::ZERO;
    let pwrb_name = aml::Name::new("_HID".into(), &pwrb_hid);
    let pwrb_uid = aml::Name::new("_UID".into(), &zero);
    aml::Device::new("PWRB".into(), vec![&pwrb_name, &pwrb_uid]).to_aml_bytes(bytes);

    let ged_hid: aml::AmlStr = "ACPI0013";
    let irq = aml::Interrupt::new(true, true, false, false, GED_GSI);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let port = GED_PORT as u16;
    let one_byte = 1u8;
    let region = aml::OpRegion::new(
        "GDST".into(),
        aml::OpRegionSpace::SystemIO,
        &port,
        &one_byte,
    );
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 8)],
    );
    let gdat: aml::Path = "GDAT".into();
    let store = aml::Store::new(&aml::Local(0), &gdat);
    let bit = EVENT_POWER_BUTTON;
    let masked = aml::And::new(&aml::Local(1), &aml::Local(0), &bit);
    let pressed = aml::Equal::new(&masked, &bit);
    let button: aml::Path = "\\_SB_.PWRB".into();
    let notify_value = 0x80u8;
    let notify = aml::Notify::new(&button, &notify_value);
    let on_button = aml::If::new(&pressed, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&store, &on_button]);
    let names = (
        aml::Name::new("_HID".into(), &ged_hid),
        aml::Name::new("_UID".into(), &zero),
        aml::Name::new("_CRS".into(), &crs),
    );
    aml::Device::new(
        "GED0".into(),
        vec![&names.0, &names.1, &names.2, &region, &field, &evt],
    )
    .to_aml_bytes(bytes);
}

/// The DSDT's AML: \_S5, the power button with its GED, and one device per virtio-mmio window
/// `(base, gsi)`.
pub fn dsdt_aml(virtio_mmio: &[(u64, u32)]) -> Vec<u8> {
    let mut bytes = Vec::new();
    let s5_type = S5_SLEEP_TYPE;
    let s5 = aml::Package::new(vec![&s5_type, &s5_type]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut bytes);
    let resources: Vec<(aml::Memory32Fixed, aml::Interrupt)> = virtio_mmio
        .iter()
        .map(|&(base, gsi)| {
            (
                aml::Memory32Fixed::new(true, base as u32, VIRTIO_MMIO_SIZE as u32),
                aml::Interrupt::new(true, true, false, false, gsi),
            )
        })
        .collect();
    let templates: Vec<aml::ResourceTemplate> = resources
        .iter()
        .map(|(m, i)| aml::ResourceTemplate::new(vec![m, i]))
        .collect();
    let hid: aml::AmlStr = "LNRO0005";
    let uids: Vec<u32> = (0..virtio_mmio.len() as u32).collect();
    let names: Vec<(aml::Name, aml::Name, aml::Name)> = templates
        .iter()
        .zip(&uids)
        .map(|(t, uid)| {
            (
                aml::Name::new("_HID".into(), &hid),
                aml::Name::new("_UID".into(), uid),
                aml::Name::new("_CRS".into(), t),
            )
        })
        .collect();
    let devices: Vec<aml::Device> = names
        .iter()
        .enumerate()
        .map(|(i, (h, u, c))| {
            let path = format!("VR{i:02X}");
            aml::Device::new(path.as_str().into(), vec![h, u, c])
        })
        .collect();
    let mut sb = Vec::new();
    power_button_aml(&mut sb);
    let power = RawAml(sb);
    let mut children: Vec<&dyn Aml> = vec![&power];
    children.extend(devices.iter().map(|d| d as &dyn Aml));
    aml::Scope::new("\\_SB_".into(), children).to_aml_bytes(&mut bytes);
    bytes
}

/// AML bytes made elsewhere, put into a scope as they are.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// Writes the tables at `base` (in the reserved BIOS area) and returns the RSDP's address.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    base: u64,
    cpus: u8,
    virtio_mmio: &[(u64, u32)],
) -> Result<u64> {
    let mut at = base + 64; // The RSDP goes first, at `base`.
    let mut put = |bytes: &[u8]| -> Result<u64> {
        let addr = at;
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| VmmError::Boot(format!("writing ACPI tables: {e}")))?;
        at = (addr + bytes.len() as u64 + 15) & !15;
        Ok(addr)
    };

    let aml_bytes = dsdt_aml(virtio_mmio);
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, 1);
    dsdt.append_slice(&aml_bytes);
    let dsdt_addr = put(dsdt.as_slice())?;

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    let port = |p: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(p),
        )
    };
    fadt.sleep_control_reg = port(ACPI_SLEEP_PORT as u16);
    fadt.sleep_status_reg = port(ACPI_SLEEP_PORT as u16);
    fadt.reset_reg = port(ACPI_SLEEP_PORT as u16);
    fadt.reset_value = ACPI_RESET_VALUE;
    let mut fadt_bytes = Vec::new();
    fadt.finalize().to_aml_bytes(&mut fadt_bytes);
    let fadt_addr = put(&fadt_bytes)?;

    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        1,
        LocalInterruptController::Address(LAPIC_ADDR as u32),
    );
    for id in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(cpus, IOAPIC_ADDR as u32, 0));
    let mut madt_bytes = Vec::new();
    madt.to_aml_bytes(&mut madt_bytes);
    let madt_addr = put(&madt_bytes)?;

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let xsdt_addr = put(&xsdt_bytes)?;

    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    mem.write_slice(&rsdp, GuestAddress(base))
        .map_err(|e| VmmError::Boot(format!("writing the RSDP: {e}")))?;
    Ok(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(mem: &GuestMemoryMmap, addr: u64) -> (bool, [u8; 4]) {
        let mut head = [0u8; 8];
        mem.read_slice(&mut head, GuestAddress(addr)).unwrap();
        let len = u32::from_le_bytes(head[4..8].try_into().unwrap()) as usize;
        let mut t = vec![0u8; len];
        mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
        let sum = t.iter().fold(0u8, |a, b| a.wrapping_add(*b));
        (sum == 0, head[0..4].try_into().unwrap())
    }

    #[test]
    fn tables_chain_from_the_rsdp_with_valid_checksums() {
        let mem = crate::memory::create(64 << 20).unwrap();
        let rsdp = write_tables(&mem, 0xe0000, 2, &[(0xd000_0000, 5), (0xd000_1000, 6)]).unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, GuestAddress(rsdp)).unwrap();
        assert_eq!(&r[0..8], b"RSD PTR ");
        assert_eq!(r.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let xsdt = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let (ok, sig) = checksum_ok(&mem, xsdt);
        assert!(ok);
        assert_eq!(&sig, b"XSDT");
        let mut entries = [0u8; 16];
        mem.read_slice(&mut entries, GuestAddress(xsdt + 36))
            .unwrap();
        let fadt = u64::from_le_bytes(entries[0..8].try_into().unwrap());
        let madt = u64::from_le_bytes(entries[8..16].try_into().unwrap());
        assert_eq!(checksum_ok(&mem, fadt), (true, *b"FACP"));
        assert_eq!(checksum_ok(&mem, madt), (true, *b"APIC"));
        let x_dsdt: u64 = mem.read_obj(GuestAddress(fadt + 140)).unwrap();
        assert_eq!(checksum_ok(&mem, x_dsdt), (true, *b"DSDT"));
    }

    #[test]
    fn dsdt_declares_each_virtio_mmio_window() {
        let aml = dsdt_aml(&[(0xd000_0000, 5), (0xd000_1000, 6)]);
        let count = aml.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(count, 2);
        assert!(aml.windows(4).any(|w| w == b"VR01"));
        assert!(aml.windows(4).any(|w| w == b"_S5_"));
        // The GED and the power button it notifies.
        assert!(aml.windows(8).any(|w| w == b"ACPI0013"));
        assert!(aml.windows(4).any(|w| w == b"PWRB"));
        assert!(aml.windows(4).any(|w| w == b"_EVT"));
    }
}

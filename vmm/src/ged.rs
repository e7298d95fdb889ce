//! The ACPI power button: a Generic Event Device (GED, `ACPI0013`) with one event register.
//!
//! Our FADT is hardware-reduced (`HW_REDUCED_ACPI`), which has no PM1 event block and so no
//! fixed-feature power button; hardware-reduced platforms signal events through a GED instead
//! (ACPI 6.x §5.6.9). The DSDT (see [`crate::boot::acpi`]) declares the GED with one edge
//! interrupt, [`GED_GSI`], and an `_EVT` method that reads [`GED_PORT`] and, when the
//! power-button bit is set, does `Notify (\_SB.PWRB, 0x80)` on a `PNP0C0C` power-button device.
//! Linux's `evged` and `button` drivers turn that into a KEY_POWER input event, which
//! systemd-logind or acpid answer by shutting down.
//!
//! Pressing the button latches [`EVENT_POWER_BUTTON`] and raises the interrupt through an
//! irqfd; reading the register returns the latched events and clears them (read-to-clear), so
//! a freestanding guest can do the same without AML.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use tracing::warn;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// The GED's event register (one byte, read-to-clear).
pub const GED_PORT: u64 = 0x3c4;
/// The GED's interrupt line (ISA IRQ 3, COM2's, which no device of ours uses), edge-triggered.
pub const GED_GSI: u32 = 3;
/// The power-button bit of the event register.
pub const EVENT_POWER_BUTTON: u8 = 1;

/// The event register and its interrupt, shared by the bus device and whoever presses.
#[derive(Debug)]
pub struct Ged {
    pending: AtomicU8,
    irq: EventFd,
}

impl Ged {
    /// A GED raising `irq` (an eventfd registered as an irqfd on [`GED_GSI`]).
    pub fn new(irq: EventFd) -> Arc<Ged> {
        Arc::new(Ged {
            pending: AtomicU8::new(0),
            irq,
        })
    }

    /// Presses the power button: latches the event and interrupts the guest.
    pub fn press_power_button(&self) {
        self.pending.fetch_or(EVENT_POWER_BUTTON, Ordering::SeqCst);
        if let Err(e) = self.irq.write(1) {
            warn!("raising the power-button interrupt failed: {e}");
        }
    }
}

/// The bus side of a [`Ged`].
#[derive(Debug)]
pub struct GedDevice(pub Arc<Ged>);

impl BusDevice for GedDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (0, Some(first)) = (offset, data.first_mut()) {
            *first = self.0.pending.swap(0, Ordering::SeqCst);
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_press_latches_the_event_until_read_and_interrupts() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ged = Ged::new(irq.try_clone().unwrap());
        let mut dev = GedDevice(ged.clone());
        let mut b = [0xffu8];
        dev.read(0, &mut b);
        assert_eq!(b, [0], "no event before a press");
        ged.press_power_button();
        assert_eq!(irq.read().unwrap(), 1);
        dev.read(0, &mut b);
        assert_eq!(b, [EVENT_POWER_BUTTON]);
        dev.read(0, &mut b);
        assert_eq!(b, [0], "reading clears the event");
    }
}

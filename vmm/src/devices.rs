//! Legacy devices on port I/O: the 16550 serial console (vm-superio), the ACPI sleep-control and
//! reset register of our hardware-reduced FADT (power-off, reboot), the i8042 reset line
//! (reboot), and port 0x80 (POST codes, used by test guests to mark phases so that exits can be
//! counted per phase).

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::ged::Ged;
use crate::kvm::vcpu::{kick_signal, StopFlag, VcpuExitReason};

/// COM1.
pub const SERIAL_PORT: u64 = 0x3f8;
/// COM1's interrupt line.
pub const SERIAL_GSI: u32 = 4;
/// The ACPI sleep-control, sleep-status and reset register (one byte), as the FADT describes it.
pub const ACPI_SLEEP_PORT: u64 = 0x3c0;
/// The value written to [`ACPI_SLEEP_PORT`] to reset.
pub const ACPI_RESET_VALUE: u8 = 1;
/// SLP_TYP for S5 (power-off), as the DSDT's \_S5 package gives it.
pub const S5_SLEEP_TYPE: u8 = 5;
/// The i8042 command port.
pub const I8042_PORT: u64 = 0x64;
/// The POST code port.
pub const POST_PORT: u64 = 0x80;
/// SLP_EN in the sleep-control register.
const SLP_EN: u8 = 1 << 5;

/// Raises an interrupt line through an irqfd.
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The serial console.
#[allow(missing_debug_implementations)] // vm-superio's Serial is not Debug.
pub struct SerialDevice(Serial<IrqLine, NoEvents, Box<dyn Write + Send>>);

impl SerialDevice {
    /// A 16550 writing to `out` and interrupting through `irq`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> SerialDevice {
        SerialDevice(Serial::new(IrqLine(irq), out))
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(off), [b]) => *b = self.0.read(off),
            (_, other) => other.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            // A failed write to the console's sink must not stop the guest.
            let _ = self.0.write(off, *b);
        }
    }
}

/// How the VM ends, shared by devices (which ask) and the VMM (which waits); also how a
/// controller pauses, resumes and presses the power button of the running VM.
#[derive(Debug, Default)]
pub struct VmControl {
    stop: StopFlag,
    reason: Mutex<Option<VcpuExitReason>>,
    changed: Condvar,
    running: Mutex<Option<Running>>,
}

/// What a built VM registers with its control.
#[derive(Debug)]
struct Running {
    ged: Arc<Ged>,
    vcpus: Vec<libc::pthread_t>,
}

impl VmControl {
    /// Registers the built VM's power button and vCPU threads (their handles stay valid until
    /// [`VmControl::detach`], which comes before they are joined).
    pub(crate) fn attach(&self, ged: Arc<Ged>, vcpus: Vec<libc::pthread_t>) {
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = Some(Running { ged, vcpus });
    }

    /// Forgets the VM's threads (before they are joined).
    pub(crate) fn detach(&self) {
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Whether the VM is built (its devices and vCPUs exist) and has not ended.
    pub fn is_built(&self) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Presses the ACPI power button; false if no VM is built (between reboots, or ended).
    pub fn press_power_button(&self) -> bool {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        match running.as_ref() {
            Some(r) => {
                r.ged.press_power_button();
                true
            }
            None => false,
        }
    }

    /// Pauses the vCPUs (devices finish the I/O in flight); waits up to `timeout` until every
    /// running vCPU is parked. False if they did not all park, or no VM is built.
    pub fn pause(&self, timeout: Duration) -> bool {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let Some(r) = running.as_ref() else {
            return false;
        };
        self.stop.set_paused(true);
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if self.stop.parked() >= r.vcpus.len() || self.stop.is_set() {
                return !self.stop.is_set();
            }
            for t in &r.vcpus {
                // SAFETY: the handles are of vCPU threads not yet joined (they are joined only
                // after `detach`, which needs this lock); pthread_kill on an ended, unjoined
                // thread is harmless, and the kick signal's handler does nothing.
                unsafe { libc::pthread_kill(*t, kick_signal()) };
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        self.stop.set_paused(false);
    }

    /// Whether a pause is in force.
    pub fn is_paused(&self) -> bool {
        self.stop.is_paused()
    }

    /// Asks the VM to end for `reason`; the first reason wins.
    pub fn request(&self, reason: VcpuExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        r.get_or_insert(reason);
        self.stop.set();
        self.changed.notify_all();
    }

    /// The stop flag the vCPUs watch.
    pub fn stop_flag(&self) -> &StopFlag {
        &self.stop
    }

    /// Waits until an end is requested or `timeout` passes; returns the reason if any.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<VcpuExitReason> {
        let r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        let r = match timeout {
            Some(t) => {
                self.changed
                    .wait_timeout_while(r, t, |r| r.is_none())
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
            None => self
                .changed
                .wait_while(r, |r| r.is_none())
                .unwrap_or_else(|p| p.into_inner()),
        };
        *r
    }
}

/// POST marks kept per run (the test guests write a handful).
pub const MAX_POST_MARKS: usize = 1024;

/// A snapshot taken when the guest writes a POST code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PostMark {
    /// The code written.
    pub code: u8,
    /// MMIO exits so far.
    pub mmio_exits: u64,
    /// Port I/O exits so far.
    pub pio_exits: u64,
}

/// Exit counters the POST port snapshots (the buses count into them).
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// MMIO exits.
    pub mmio: Arc<AtomicU64>,
    /// Port I/O exits.
    pub pio: Arc<AtomicU64>,
}

/// PM1 control, the i8042 reset line and the POST port.
#[derive(Debug)]
pub struct SystemControl {
    control: Arc<VmControl>,
    port_base: u64,
    counters: Arc<ExitCounters>,
    marks: Arc<Mutex<Vec<PostMark>>>,
}

impl SystemControl {
    /// A device answering at `port_base` (one of the ports above).
    pub fn new(
        control: Arc<VmControl>,
        port_base: u64,
        counters: Arc<ExitCounters>,
        marks: Arc<Mutex<Vec<PostMark>>>,
    ) -> SystemControl {
        SystemControl {
            control,
            port_base,
            counters,
            marks,
        }
    }
}

impl BusDevice for SystemControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let value = crate::bus::le_value(data);
        match self.port_base + offset {
            ACPI_SLEEP_PORT if value as u8 == ACPI_RESET_VALUE => {
                self.control.request(VcpuExitReason::Reboot)
            }
            ACPI_SLEEP_PORT
                if value as u8 & SLP_EN != 0 && (value as u8 >> 2) & 7 == S5_SLEEP_TYPE =>
            {
                self.control.request(VcpuExitReason::Shutdown)
            }
            I8042_PORT if value == 0xfe => self.control.request(VcpuExitReason::Reboot),
            POST_PORT => {
                let mark = PostMark {
                    code: value as u8,
                    mmio_exits: self.counters.mmio.load(Ordering::Relaxed),
                    pio_exits: self.counters.pio.load(Ordering::Relaxed),
                };
                let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
                // Linux's I/O delay writes this port too: keep the first marks only, so a
                // guest looping on it cannot grow our memory.
                if marks.len() < MAX_POST_MARKS {
                    marks.push(mark);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleep_control_requests_shutdown_and_i8042_reboot() {
        let control = Arc::new(VmControl::default());
        let counters = Arc::new(ExitCounters::default());
        let marks = Arc::new(Mutex::new(Vec::new()));
        let mut pm = SystemControl::new(control.clone(), ACPI_SLEEP_PORT, counters.clone(), marks);
        pm.write(0, &[SLP_EN]); // S0: not a power-off
        assert_eq!(control.wait(Some(Duration::from_millis(1))), None);
        pm.write(0, &[SLP_EN | (S5_SLEEP_TYPE << 2)]);
        assert_eq!(control.wait(None), Some(VcpuExitReason::Shutdown));
        assert!(control.stop_flag().is_set());
        let control = Arc::new(VmControl::default());
        let mut kbd = SystemControl::new(control.clone(), I8042_PORT, counters, Default::default());
        kbd.write(0, &[0xfe]);
        assert_eq!(control.wait(None), Some(VcpuExitReason::Reboot));
    }

    #[test]
    fn post_marks_are_bounded() {
        let marks = Arc::new(Mutex::new(Vec::new()));
        let control = Arc::new(VmControl::default());
        let counters = Arc::new(ExitCounters::default());
        let mut post = SystemControl::new(control, POST_PORT, counters, marks.clone());
        for i in 0..(3 * MAX_POST_MARKS) {
            post.write(0, &[i as u8]);
        }
        let marks = marks.lock().unwrap();
        assert_eq!(marks.len(), MAX_POST_MARKS);
        assert_eq!(marks[1].code, 1, "the first marks are the ones kept");
    }

    #[test]
    fn serial_output_reaches_the_sink() {
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let mut s = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(sink.clone()));
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
    }
}

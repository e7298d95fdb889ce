//! A virtio-pci driver for a QEMU device, played over QEMU's qtest protocol: QEMU runs with
//! `-qtest stdio` (no guest CPU runs at all), and this module writes its PCI configuration
//! space (ports 0xcf8/0xcfc), the device's registers and queue notifications as qtest commands.
//! Guest memory is a shared file both sides map, so the rings and buffers need no commands.
//!
//! This is how the network benchmark drives QEMU's own user-space virtio-net with the same
//! host-side driver that drives Strata's device: the cost measured is the device's, not a
//! guest's. Only what that needs is here: one function on bus 0, the modern (virtio 1.x)
//! capabilities, split queues.
//!
//! The qtest protocol is line based: a command such as `writel 0xe0003000 0x1` is answered by
//! `OK` (or `OK 0x...` with a value) or `FAIL ...`. `QTEST_DEBUG=1` prints every exchange.
//!
//! QEMU's vCPU may still run beside qtest (this QEMU has no separate qtest accelerator), so the
//! caller gives it firmware that halts at once: SeaBIOS would enumerate PCI through the same
//! ports.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::{bail, ensure, Context, Result};

/// Where the device's memory BAR is placed.
const BAR_BASE: u64 = 0xe000_0000;
const PCI_VENDOR_CAP: u32 = 0x09;
const CAP_COMMON: u32 = 1;
const CAP_NOTIFY: u32 = 2;
const CAP_DEVICE: u32 = 4;

/// A QEMU process under qtest.
#[derive(Debug)]
pub struct Qtest {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    line: String,
}

impl Qtest {
    /// Starts `cmd` (a qemu-system command line without `-qtest`) under qtest.
    pub fn spawn(mut cmd: Command) -> Result<Qtest> {
        cmd.args(["-qtest", "stdio", "-qtest-log", "/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
        let stdin = child.stdin.take().context("qtest stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("qtest stdout")?);
        Ok(Qtest {
            child,
            stdin,
            stdout,
            line: String::new(),
        })
    }

    /// Sends one command and returns the value of its `OK` answer (0 when it has none).
    pub fn cmd(&mut self, command: &str) -> Result<u64> {
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()?;
        loop {
            self.line.clear();
            if self.stdout.read_line(&mut self.line)? == 0 {
                bail!("QEMU closed qtest while answering {command:?}");
            }
            let l = self.line.trim();
            if std::env::var_os("QTEST_DEBUG").is_some() {
                eprintln!("qtest: {command} -> {l}");
            }
            // Asynchronous interrupt notices come only with irq_intercept, which we never send.
            if let Some(rest) = l.strip_prefix("OK") {
                let v = rest.trim();
                if v.is_empty() {
                    return Ok(0);
                }
                return u64::from_str_radix(v.trim_start_matches("0x"), 16)
                    .with_context(|| format!("qtest answered {l:?} to {command:?}"));
            }
            if l.starts_with("FAIL") || l.starts_with("ERR") {
                bail!("qtest refused {command:?}: {l}");
            }
        }
    }

    fn cfg_addr(slot: u8, reg: u8) -> u32 {
        0x8000_0000 | (u32::from(slot) << 11) | u32::from(reg & 0xfc)
    }

    /// Reads the configuration dword at `reg` of function 0 of `slot` on bus 0.
    pub fn cfg_read(&mut self, slot: u8, reg: u8) -> Result<u32> {
        self.cmd(&format!("outl 0xcf8 {:#x}", Self::cfg_addr(slot, reg)))?;
        Ok(self.cmd("inl 0xcfc")? as u32)
    }

    /// Writes the configuration dword at `reg` of function 0 of `slot` on bus 0.
    pub fn cfg_write(&mut self, slot: u8, reg: u8, value: u32) -> Result<()> {
        self.cmd(&format!("outl 0xcf8 {:#x}", Self::cfg_addr(slot, reg)))?;
        self.cmd(&format!("outl 0xcfc {value:#x}"))?;
        Ok(())
    }
}

impl Drop for Qtest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A modern virtio-pci device driven over qtest.
#[derive(Debug)]
pub struct VirtioPci {
    qt: Qtest,
    common: u64,
    notify: u64,
    notify_multiplier: u64,
    device: u64,
    notify_addr: Vec<u64>,
}

/// Offsets in `struct virtio_pci_common_cfg` (virtio 1.2, 4.1.4.3).
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

impl VirtioPci {
    /// Finds the virtio device at `slot` of bus 0 (vendor 0x1af4), places its memory BAR and
    /// reads its capabilities.
    pub fn probe(mut qt: Qtest, slot: u8) -> Result<VirtioPci> {
        let id = qt.cfg_read(slot, 0)?;
        ensure!(
            id & 0xffff == 0x1af4,
            "no virtio device at 00:{slot:02x}.0 (id {id:#x})"
        );
        let mut caps = [None::<(u8, u64)>; 5];
        let mut multiplier = 0u64;
        let mut at = (qt.cfg_read(slot, 0x34)? & 0xfc) as u8;
        let mut seen = 0;
        while at != 0 {
            seen += 1;
            ensure!(seen < 48, "the capability list of 00:{slot:02x}.0 loops");
            let head = qt.cfg_read(slot, at)?;
            if head & 0xff == PCI_VENDOR_CAP {
                let cfg_type = (head >> 24) & 0xff;
                let bar = (qt.cfg_read(slot, at + 4)? & 0xff) as u8;
                let offset = u64::from(qt.cfg_read(slot, at + 8)?);
                if let Some(entry) = caps.get_mut(cfg_type as usize) {
                    entry.get_or_insert((bar, offset));
                }
                if cfg_type == CAP_NOTIFY {
                    multiplier = u64::from(qt.cfg_read(slot, at + 16)?);
                }
            }
            at = ((head >> 8) & 0xfc) as u8;
        }
        let find = |t: u32, what: &str| {
            caps[t as usize].with_context(|| format!("the device has no {what} capability"))
        };
        let (bar, common_off) = find(CAP_COMMON, "common configuration")?;
        let (nbar, notify_off) = find(CAP_NOTIFY, "notification")?;
        let (dbar, device_off) = find(CAP_DEVICE, "device configuration")?;
        ensure!(
            bar == nbar && bar == dbar && bar < 5,
            "the capabilities are in several BARs"
        );
        // A 64-bit memory BAR at BAR_BASE, then memory decoding and bus mastering (DMA) on.
        let reg = 0x10 + 4 * bar;
        qt.cfg_write(slot, reg, BAR_BASE as u32)?;
        qt.cfg_write(slot, reg + 4, (BAR_BASE >> 32) as u32)?;
        qt.cfg_write(slot, 0x04, 0x6)?;
        Ok(VirtioPci {
            qt,
            common: BAR_BASE + common_off,
            notify: BAR_BASE + notify_off,
            notify_multiplier: multiplier,
            device: BAR_BASE + device_off,
            notify_addr: Vec::new(),
        })
    }

    fn write(&mut self, width: u8, addr: u64, value: u64) -> Result<()> {
        self.qt
            .cmd(&format!("write{} {addr:#x} {value:#x}", width as char))?;
        Ok(())
    }

    fn read(&mut self, width: u8, addr: u64) -> Result<u64> {
        self.qt.cmd(&format!("read{} {addr:#x}", width as char))
    }

    /// Resets the device, acknowledges it and negotiates `wanted` (which must all be offered);
    /// leaves the status at FEATURES_OK.
    pub fn negotiate(&mut self, wanted: u64) -> Result<()> {
        let c = self.common;
        self.write(b'b', c + common::DEVICE_STATUS, 0)?;
        self.write(b'b', c + common::DEVICE_STATUS, 1 | 2)?;
        let mut offered = 0u64;
        for half in 0..2u64 {
            self.write(b'l', c + common::DEVICE_FEATURE_SELECT, half)?;
            offered |= self.read(b'l', c + common::DEVICE_FEATURE)? << (32 * half);
        }
        ensure!(
            offered & wanted == wanted,
            "the device does not offer features {:#x}",
            wanted & !offered
        );
        for half in 0..2u64 {
            self.write(b'l', c + common::DRIVER_FEATURE_SELECT, half)?;
            self.write(
                b'l',
                c + common::DRIVER_FEATURE,
                (wanted >> (32 * half)) & 0xffff_ffff,
            )?;
        }
        self.write(b'b', c + common::DEVICE_STATUS, 1 | 2 | 8)?;
        ensure!(
            self.read(b'b', c + common::DEVICE_STATUS)? & 8 != 0,
            "the device refused the features"
        );
        Ok(())
    }

    /// Sets up queue `index` with `size` entries at the given guest addresses and enables it.
    pub fn setup_queue(
        &mut self,
        index: u16,
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
    ) -> Result<()> {
        let c = self.common;
        self.write(b'w', c + common::QUEUE_SELECT, u64::from(index))?;
        self.write(b'w', c + common::QUEUE_SIZE, u64::from(size))?;
        for (reg, addr) in [
            (common::QUEUE_DESC, desc),
            (common::QUEUE_DRIVER, avail),
            (common::QUEUE_DEVICE, used),
        ] {
            self.write(b'l', c + reg, addr & 0xffff_ffff)?;
            self.write(b'l', c + reg + 4, addr >> 32)?;
        }
        let off = self.read(b'w', c + common::QUEUE_NOTIFY_OFF)?;
        self.write(b'w', c + common::QUEUE_ENABLE, 1)?;
        let i = usize::from(index);
        if self.notify_addr.len() <= i {
            self.notify_addr.resize(i + 1, 0);
        }
        self.notify_addr[i] = self.notify + off * self.notify_multiplier;
        Ok(())
    }

    /// Sets DRIVER_OK: the device runs.
    pub fn driver_ok(&mut self) -> Result<()> {
        self.write(b'b', self.common + common::DEVICE_STATUS, 1 | 2 | 4 | 8)
    }

    /// Reads the byte at `offset` of the device configuration space.
    pub fn config_byte(&mut self, offset: u64) -> Result<u8> {
        Ok(self.read(b'b', self.device + offset)? as u8)
    }

    /// Notifies queue `index` (it must have been set up).
    pub fn notify(&mut self, index: u16) -> Result<()> {
        let addr = *self
            .notify_addr
            .get(usize::from(index))
            .context("notifying a queue that was not set up")?;
        self.write(b'w', addr, u64::from(index))
    }
}

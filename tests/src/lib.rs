//! Helpers for Strata's end-to-end tests: locating the `strata` binary and external tools,
//! the freestanding test guest, and the loud skip messages tiers use when a row cannot run.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub mod linux_guest;

/// The freestanding virtio-blk test guest, built by build.rs.
pub fn blkdrv_image() -> anyhow::Result<Vec<u8>> {
    let path = env!("STRATA_BLKDRV_BIN");
    std::fs::read(path).map_err(|e| anyhow::anyhow!("reading the test guest {path}: {e}"))
}

/// Prints a skip notice that cannot be missed in CI logs.
pub fn skip_loudly(what: &str, why: &str) {
    let line = "!".repeat(78);
    eprintln!("{line}\nSKIPPED: {what}\n  reason: {why}\n{line}");
}

/// Whether this host's KVM is PVM (software nested virtualisation), where a Linux guest cannot
/// run under our VMM.
pub fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Whether /dev/kvm can be opened.
pub fn have_kvm() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The `strata` binary built from this workspace (cargo builds it for the tests of the api
/// crate; here we look in the shared target directory).
pub fn strata_bin() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    target.join(profile).join("strata")
}

/// A `Write` sink that keeps everything written, for capturing a guest's serial console.
#[derive(Clone, Debug, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    /// Everything written so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Finds `name` followed by a decimal number in `text` ("requests 35" gives 35).
pub fn number_after(text: &str, name: &str) -> Option<u64> {
    let at = text.find(name)? + name.len();
    text[at..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

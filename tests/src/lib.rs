//! Helpers for Strata's end-to-end tests: locating the `strata` binary and external tools,
//! the freestanding test guest. A row that cannot run here ends through `strata_testkit`
//! (a failure under `CI`, an ignored test with its reason elsewhere).

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub mod ceph;
pub mod linux_guest;
pub mod live;
pub mod netns;
pub mod peer_net;
pub mod s3proxy;

/// The freestanding virtio-blk test guest, built by build.rs.
pub fn blkdrv_image() -> anyhow::Result<Vec<u8>> {
    let path = env!("STRATA_BLKDRV_BIN");
    std::fs::read(path).map_err(|e| anyhow::anyhow!("reading the test guest {path}: {e}"))
}

/// The freestanding virtio-net test guest, built by build.rs (see tests/guest/netdrv/netdrv.c).
pub fn netdrv_image() -> anyhow::Result<Vec<u8>> {
    let path = env!("STRATA_NETDRV_BIN");
    std::fs::read(path).map_err(|e| anyhow::anyhow!("reading the test guest {path}: {e}"))
}

/// The ticker test guest, built by build.rs: writes a counter to sector 1024 of its disk
/// ("TICK" and a little-endian u64) and prints "tick N" about ten times a second; answers the
/// ACPI power button by printing "ticker: power button pressed, powering off" and powering off.
pub fn ticker_image() -> anyhow::Result<Vec<u8>> {
    let path = env!("STRATA_TICKER_BIN");
    std::fs::read(path).map_err(|e| anyhow::anyhow!("reading the test guest {path}: {e}"))
}

/// The counter the ticker guest last wrote to the disk image `bytes` (its sector 1024), if any.
pub fn ticker_counter(bytes: &[u8]) -> Option<u64> {
    let at = 1024 * 512;
    let block = bytes.get(at..at + 16)?;
    if &block[0..4] != b"TICK" {
        return None;
    }
    let mut c = [0u8; 8];
    c.copy_from_slice(&block[8..16]);
    Some(u64::from_le_bytes(c))
}

pub use strata_testkit::{have_kvm, is_pvm_host};

/// Prints a skip notice that cannot be missed in CI logs (for one row of a test whose other
/// rows run; a whole test that cannot run goes through `strata_testkit`).
pub fn skip_loudly(what: &str, why: &str) {
    let line = "!".repeat(78);
    eprintln!("{line}\nSKIPPED: {what}\n  reason: {why}\n{line}");
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
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

/// A thin volume of `size` bytes in a fresh volume group on a file-backed physical volume in
/// `dir` (Strata's own volume manager: no device-mapper needed). The group must outlive the
/// device.
pub fn thin_volume(
    dir: &Path,
    size: u64,
) -> anyhow::Result<(
    strata_storage::volume::Vg,
    Arc<dyn strata_storage::BlockDevice>,
)> {
    use strata_storage::io::engine::{EngineChoice, FileDevice};
    use strata_storage::io::file::FileOptions;
    use strata_storage::volume::label::PE_START;
    use strata_storage::volume::vg::format_pv;
    use strata_storage::volume::{PvHandle, Vg, VgOptions};
    let path = dir.join("pv0.img");
    std::fs::File::create(&path)?.set_len(PE_START + size + (64 << 20))?;
    let pv = FileDevice::open(&path, FileOptions::default(), EngineChoice::Auto)?;
    format_pv(pv.as_ref())?;
    let vg = Vg::create(
        "vmtest",
        vec![PvHandle::new(pv)],
        4 << 20,
        VgOptions::default(),
    )?;
    vg.create_pool("pool", size + (32 << 20), 0, 0)?;
    vg.create_thin("pool", "disk", size)?;
    let dev = vg.open_lv("disk", false)?;
    Ok((vg, dev))
}

/// Writes `data` at `offset` of `dev` through one of its queues and flushes.
pub fn write_device(
    dev: &dyn strata_storage::BlockDevice,
    offset: u64,
    data: &[u8],
) -> anyhow::Result<()> {
    use strata_storage::io::{IoBuf, QueueOptions, Request};
    let mut q = dev.open_queue(&QueueOptions::with_depth(2))?;
    let mut buf = IoBuf::new(data.len());
    buf.copy_from_slice(0, data);
    for req in [Request::write(0, offset, buf), Request::flush(1)] {
        q.submit(req).map_err(|_| anyhow::anyhow!("queue full"))?;
        let mut out = Vec::new();
        while out.is_empty() {
            q.wait(Some(std::time::Duration::from_secs(10)))?;
            q.reap(&mut out);
        }
        for c in out {
            c.result?;
        }
    }
    Ok(())
}

/// Reads `len` bytes at `offset` of `dev` through one of its queues.
pub fn read_device(
    dev: &dyn strata_storage::BlockDevice,
    offset: u64,
    len: usize,
) -> anyhow::Result<Vec<u8>> {
    use strata_storage::io::{IoBuf, QueueOptions, Request};
    let mut q = dev.open_queue(&QueueOptions::with_depth(1))?;
    q.submit(Request::read(0, offset, IoBuf::new(len)))
        .map_err(|_| anyhow::anyhow!("queue full"))?;
    let mut out = Vec::new();
    while out.is_empty() {
        q.wait(Some(std::time::Duration::from_secs(10)))?;
        q.reap(&mut out);
    }
    let c = out.pop().ok_or_else(|| anyhow::anyhow!("no completion"))?;
    c.result?;
    c.buf
        .map(|b| b.to_vec())
        .ok_or_else(|| anyhow::anyhow!("no buffer"))
}

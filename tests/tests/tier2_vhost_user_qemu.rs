//! Tier 2: the real Linux virtio-blk driver against Strata's device logic, served as a
//! vhost-user-blk back-end to QEMU (TCG on PVM hosts, where KVM cannot run Linux) booting
//! Debian's kernel and a busybox initramfs built by tests/guest/build.sh.
//!
//! The guest reads a pattern the host put on the disk and reports its checksum, writes its own
//! pattern with O_DIRECT and fsync, discards a range, and powers off; the host then finds the
//! guest's data with `qemu-img convert` (and the discarded range reads as zeros).
//!
//! Rows: raw (always), a qcow2 linked clone and a thin volume once those are on main (until
//! then each says loudly that it was skipped and why), and a thin volume under live restore
//! from a backup, its chunks fetched as the guest reads them.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use strata_storage::format::{open_image, OpenOptions};
use strata_tests::linux_guest::{
    check_console, check_device, check_image, guest_dir, host_pattern, prepare_raw,
    qemu_linux_command, run_qemu_console, DISK_TEST_CMDLINE, MIB,
};
use strata_tests::{thin_volume, write_device};
use strata_vmm::blk::{BlkConfig, DiskOptions};

const SERIAL: &str = "strata-tier2";

/// Runs QEMU (TCG) with our back-end on `socket`; returns the console output.
fn run_qemu(guest: &Path, socket: &Path, cmdline: &str) -> Result<String> {
    let mut cmd = qemu_linux_command(guest, "initramfs.gz", cmdline);
    cmd.args(["-M", "q35,memory-backend=mem", "-m", "512M"])
        .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
        .arg("-chardev")
        .arg(format!("socket,id=vu0,path={}", socket.display()))
        .args(["-device", "vhost-user-blk-pci,chardev=vu0,num-queues=2"]);
    run_qemu_console(cmd, Duration::from_secs(240))
}

/// Serves `image` to a QEMU guest running the disk test and checks both sides.
fn run_row(row: &str, image: &Path, format: &str) -> Result<()> {
    let disk = open_image(image, &OpenOptions::default())?;
    serve_to_guest(row, disk)?;
    check_image(row, image, format)
}

/// Serves `disk` to a QEMU guest running the disk test and checks the guest's report.
fn serve_to_guest(row: &str, disk: Arc<dyn strata_storage::BlockDevice>) -> Result<()> {
    let guest = guest_dir()?;
    let options = DiskOptions {
        num_queues: 2,
        serial: SERIAL.into(),
        ..DiskOptions::default()
    };
    let cfg = Arc::new(BlkConfig::new(disk, &options).map_err(anyhow::Error::msg)?);
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("vu.sock");
    let server = {
        let socket = socket.clone();
        std::thread::spawn(move || strata_vmm::vhost_user::serve(cfg, &socket))
    };
    let t0 = Instant::now();
    while !socket.exists() {
        ensure!(
            t0.elapsed() < Duration::from_secs(10),
            "the back-end did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let console = run_qemu(&guest, &socket, DISK_TEST_CMDLINE)?;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("the back-end thread panicked"))?
        .context("the vhost-user back-end")?;
    check_console(row, &console, SERIAL)
}

/// QEMU with its system emulator (see [`strata_testkit::missing`]).
fn require_tools() {
    strata_testkit::require_tool("qemu-system-x86_64", "qemu-utils qemu-system-x86");
    strata_testkit::require_tool("qemu-img", "qemu-utils");
}

fn linux_guest_through_vhost_user_on_a_raw_image() -> Result<()> {
    require_tools();
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("disk.raw");
    prepare_raw(&image)?;
    run_row("raw", &image, "raw")
}

fn linux_guest_through_vhost_user_on_a_qcow2_linked_clone() -> Result<()> {
    require_tools();
    let dir = tempfile::tempdir()?;
    let base = dir.path().join("base.raw");
    prepare_raw(&base)?;
    let clone = dir.path().join("clone.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(&clone)
        .status()?;
    ensure!(status.success(), "qemu-img create failed");
    run_row("qcow2 linked clone", &clone, "qcow2")?;
    let out = Command::new("qemu-img").arg("check").arg(&clone).output()?;
    ensure!(
        out.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

fn linux_guest_through_vhost_user_on_a_thin_volume() -> Result<()> {
    require_tools();
    let dir = tempfile::tempdir()?;
    let (_vg, lv) = thin_volume(dir.path(), 64 << 20)?;
    write_device(lv.as_ref(), 0, &host_pattern())?;
    write_device(lv.as_ref(), 2 * MIB as u64, &vec![0xcdu8; MIB])?;
    serve_to_guest("thin volume", lv.clone())?;
    check_device("thin volume", lv.as_ref())
}

fn linux_guest_through_vhost_user_on_a_volume_under_live_restore() -> Result<()> {
    require_tools();
    let dir = tempfile::tempdir()?;
    let source = dir.path().join("source.raw");
    prepare_raw(&source)?;
    // 1 MiB chunks: the guest's reads, writes and discard each touch chunks not yet restored
    // (the background copy waits until the guest is done).
    let lv = strata_tests::live::volume_under_live_restore(dir.path(), &source, 1 << 20)?;
    serve_to_guest("live restore", Arc::new(lv.live.clone()))?;
    let st = lv.live.status();
    eprintln!(
        "tier2 live restore: {} of {} chunks on the volume after the guest ran ({} bytes fetched on demand)",
        st.chunks_done, st.chunks_total, st.bytes_fetched
    );
    ensure!(
        st.chunks_done < st.chunks_total && st.bytes_fetched > 0,
        "the guest's I/O was not served by fetching its chunks on demand: {st:?}"
    );
    // The guest wrote its pattern at 1 MiB and discarded 2 MiB..3 MiB.
    strata_tests::live::finish_and_compare(&lv, &source, &[(MIB as u64, 2 * MIB as u64)])?;
    check_device("live restore", lv.volume.as_ref())
}

strata_testkit::main!(
    linux_guest_through_vhost_user_on_a_raw_image,
    linux_guest_through_vhost_user_on_a_qcow2_linked_clone,
    linux_guest_through_vhost_user_on_a_thin_volume,
    linux_guest_through_vhost_user_on_a_volume_under_live_restore,
);

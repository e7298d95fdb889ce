//! Tier 1: the freestanding virtio-blk driver (tests/guest/blkdrv) under Strata's own VMM, on
//! KVM — PVM hosts included. It proves the KVM glue: virtio-mmio discovery, feature negotiation,
//! queue setup, ioeventfd notifications, irqfd interrupts through the I/O APIC, EVENT_IDX, and
//! the data path into the block layer, checked from both sides.
//!
//! Rows: a raw image (always), a qcow2 linked clone and a thin volume (run once those exist on
//! main; until then each says loudly that it was skipped and why), a thin volume under live
//! restore from a backup (the guest's I/O fetches its chunks on demand), and an RBD volume on
//! the test Ceph cluster (feature `rbd`; skipped loudly without the Ceph packages unless CI is
//! set).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use strata_storage::bitmap::{BitmapSet, TrackedDevice};
use strata_storage::format::{open_image, OpenOptions};
use strata_storage::BlockDevice;
use strata_tests::{blkdrv_image, number_after, read_device, thin_volume, write_device, Capture};
use strata_vmm::blk::DiskOptions;
use strata_vmm::kvm::VcpuExitReason;
use strata_vmm::vm::{run, DiskSpec, Payload, VmConfig};

const DISK_SIZE: u64 = 64 << 20;
const SERIAL: &str = "strata-tier1";

fn host_pattern(off: u64) -> u8 {
    ((off.wrapping_mul(13)) ^ (off >> 9) ^ 0x5a) as u8
}

fn guest_pattern(off: u64) -> u8 {
    ((off.wrapping_mul(7)) ^ (off >> 11) ^ 0xc3) as u8
}

/// Writes what the guest expects to find: its read pattern in sectors 0..63, and non-zero data
/// in 128..143 (which the guest discards and zeroes).
fn prepare(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let head: Vec<u8> = (0..32768u64).map(host_pattern).collect();
    f.write_all_at(&head, 0)?;
    f.write_all_at(&[0xabu8; 8192], 128 * 512)?;
    f.sync_all()?;
    Ok(())
}

/// Boots the test guest on `disk`; returns the serial log and the report.
fn boot(disk: Arc<dyn BlockDevice>, name: &str) -> Result<(String, strata_vmm::vm::RunReport)> {
    let serial = Capture::default();
    let report = run(VmConfig {
        memory: 64 << 20,
        cpus: 1,
        payload: Payload::Flat {
            image: blkdrv_image()?,
            load_addr: 0x10_0000,
        },
        disks: vec![DiskSpec {
            name: name.to_string(),
            device: disk,
            options: DiskOptions {
                serial: SERIAL.into(),
                ..DiskOptions::default()
            },
        }],
        nets: Vec::new(),
        serial: Box::new(serial.clone()),
        timeout: Some(Duration::from_secs(300)),
        kvm: None,
    })
    .context("running the VM")?;
    Ok((serial.text(), report))
}

fn check_guest_run(row: &str, log: &str, report: &strata_vmm::vm::RunReport) -> Result<()> {
    eprintln!("--- guest serial ({row}) ---\n{log}--- end ---");
    ensure!(
        report.reason == VcpuExitReason::Shutdown,
        "{row}: the guest did not power off ({:?})",
        report.reason
    );
    ensure!(
        log.contains("BLKTEST PASS"),
        "{row}: the guest reported failure"
    );
    ensure!(
        log.contains(&format!("serial '{SERIAL}'")),
        "{row}: GET_ID did not return the serial"
    );
    let requests = number_after(log, "requests").context("request count")?;
    let interrupts = number_after(log, "interrupts").context("interrupt count")?;
    let notifies = number_after(log, "notifies").context("notify count")?;
    let [start, end] = report.marks[..] else {
        bail!("{row}: expected two phase marks, got {:?}", report.marks);
    };
    let mmio = end.mmio_exits - start.mmio_exits;
    let pio = end.pio_exits - start.pio_exits;
    eprintln!(
        "tier1 {row}: {requests} requests, {notifies} notifications, {interrupts} interrupts; \
         {mmio} MMIO exits and {pio} port exits to user space in the data phase \
         ({:.2} MMIO exits per request)",
        mmio as f64 / requests as f64
    );
    let stats = &report.queue_stats[0];
    let served: u64 = stats.iter().map(|s| s.requests).sum();
    ensure!(
        served == requests,
        "{row}: device served {served}, guest sent {requests}"
    );
    Ok(())
}

fn check_disk_contents(row: &str, disk: &dyn BlockDevice) -> Result<()> {
    let read = |offset: u64, len: usize| read_device(disk, offset, len);
    let written = read(64 * 512, 32768)?;
    let want: Vec<u8> = (64 * 512..64 * 512 + 32768u64).map(guest_pattern).collect();
    ensure!(
        written == want,
        "{row}: the guest's writes are not on the disk"
    );
    let zeroed = read(128 * 512, 8192)?;
    ensure!(
        zeroed.iter().all(|&b| b == 0),
        "{row}: discarded / zeroed sectors are not zero on the disk"
    );
    let head = read(0, 32768)?;
    ensure!(
        head.iter()
            .enumerate()
            .all(|(i, &b)| b == host_pattern(i as u64)),
        "{row}: the host's pattern changed"
    );
    Ok(())
}

fn freestanding_driver_on_a_raw_image() -> Result<()> {
    strata_testkit::require_kvm();
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("disk.raw");
    std::fs::File::create(&path)?.set_len(DISK_SIZE)?;
    prepare(&path)?;
    let disk = open_image(&path, &OpenOptions::default())?;
    // The storage layer's changed-block tracking, as `lv:` volumes get it: a dirty bitmap with
    // 4 KiB granularity, and the tracking wrapper around the disk.
    let bitmaps = Arc::new(BitmapSet::open(
        &dir.path().join("disk.raw.bitmaps"),
        DISK_SIZE,
    )?);
    bitmaps.add("cbt", 4096)?;
    let tracked = Arc::new(TrackedDevice::with_set(disk.clone(), bitmaps.clone())?);
    let (log, report) = boot(tracked, "raw")?;
    check_guest_run("raw", &log, &report)?;
    check_disk_contents("raw", disk.as_ref())?;
    // The guest wrote sectors 64..127, discarded 128..135 and zeroed 136..143: bytes 32 KiB to
    // 72 KiB, and nothing else (its reads and flush mark nothing).
    let (dirty, valid) = bitmaps.dirty_ranges("cbt")?;
    ensure!(valid, "the dirty bitmap is marked invalid");
    ensure!(
        dirty == vec![(32768, 40960)],
        "the dirty bitmap is not exactly the blocks the guest changed: {dirty:?}"
    );
    // The host sees the writes through a fresh open too (they reached the file).
    let reopened = open_image(&path, &OpenOptions::default())?;
    check_disk_contents("raw (reopened)", reopened.as_ref())
}

fn freestanding_driver_on_a_qcow2_linked_clone() -> Result<()> {
    strata_testkit::require_kvm();
    let dir = tempfile::tempdir()?;
    let base = dir.path().join("base.raw");
    std::fs::File::create(&base)?.set_len(DISK_SIZE)?;
    prepare(&base)?;
    let clone = dir.path().join("clone.qcow2");
    strata_testkit::require_tool("qemu-img", "qemu-utils");
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(&clone)
        .status()
        .context("running qemu-img (install qemu-utils)")?;
    ensure!(status.success(), "qemu-img create failed");
    let disk = open_image(&clone, &OpenOptions::default())?;
    let (log, report) = boot(disk.clone(), "qcow2 linked clone")?;
    check_guest_run("qcow2 linked clone", &log, &report)?;
    check_disk_contents("qcow2 linked clone", disk.as_ref())?;
    let out = std::process::Command::new("qemu-img")
        .arg("check")
        .arg(&clone)
        .output()?;
    ensure!(
        out.status.success(),
        "qemu-img check failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

fn freestanding_driver_on_a_thin_volume() -> Result<()> {
    strata_testkit::require_kvm();
    let dir = tempfile::tempdir()?;
    let (_vg, lv) = thin_volume(dir.path(), DISK_SIZE)?;
    let head: Vec<u8> = (0..32768u64).map(host_pattern).collect();
    write_device(lv.as_ref(), 0, &head)?;
    write_device(lv.as_ref(), 128 * 512, &[0xabu8; 8192])?;
    let (log, report) = boot(lv.clone(), "thin volume")?;
    check_guest_run("thin volume", &log, &report)?;
    check_disk_contents("thin volume", lv.as_ref())
}

fn freestanding_driver_on_a_volume_under_live_restore() -> Result<()> {
    strata_testkit::require_kvm();
    let dir = tempfile::tempdir()?;
    let source = dir.path().join("source.raw");
    std::fs::File::create(&source)?.set_len(DISK_SIZE)?;
    prepare(&source)?;
    // 64 KiB chunks: the guest's reads and writes touch the first two, neither restored yet
    // (the background copy waits), so they are fetched on demand.
    let lv = strata_tests::live::volume_under_live_restore(dir.path(), &source, 64 << 10)?;
    let disk: Arc<dyn BlockDevice> = Arc::new(lv.live.clone());
    let (log, report) = boot(disk.clone(), "live restore")?;
    check_guest_run("live restore", &log, &report)?;
    let st = lv.live.status();
    eprintln!(
        "tier1 live restore: {} of {} chunks on the volume after the guest ran ({} bytes fetched on demand)",
        st.chunks_done, st.chunks_total, st.bytes_fetched
    );
    ensure!(
        st.chunks_done > 0 && st.chunks_done < st.chunks_total && st.bytes_fetched > 0,
        "the guest's I/O was not served by fetching its chunks on demand: {st:?}"
    );
    check_disk_contents("live restore", disk.as_ref())?;
    // Copied to the end, the volume is the backed-up image plus the guest's changes.
    strata_tests::live::finish_and_compare(&lv, &source, &[(32768, 40960)])?;
    check_disk_contents("live restore (volume after the copy)", lv.volume.as_ref())
}

#[cfg(feature = "rbd")]
fn freestanding_driver_on_an_rbd_volume() -> Result<()> {
    use strata_storage::volume::rbd::{image, Cluster, Image, RbdDevice};
    strata_testkit::require_kvm();
    let c = strata_tests::ceph::cluster();
    let pool = Arc::new(Cluster::connect(&c.spec())?.pool(&c.pool)?);
    let name = strata_tests::ceph::unique("tier1");
    image::create(&pool, &name, DISK_SIZE)?;
    let open = |ro: bool| -> Result<Arc<dyn BlockDevice>> {
        let img = Image::open(&pool, &name, None, ro)?;
        Ok(Arc::new(RbdDevice::new(&name, img, ro, None)?))
    };
    let disk = open(false)?;
    let head: Vec<u8> = (0..32768u64).map(host_pattern).collect();
    write_device(disk.as_ref(), 0, &head)?;
    write_device(disk.as_ref(), 128 * 512, &[0xabu8; 8192])?;
    // The VMM's virtio workers wait on their own eventfds: completions reach them through the
    // device's completion thread.
    let (log, report) = boot(disk.clone(), "rbd volume")?;
    check_guest_run("rbd volume", &log, &report)?;
    check_disk_contents("rbd volume", disk.as_ref())?;
    drop(disk);
    // What the guest wrote is in Ceph: a fresh open (another librbd handle) reads it.
    check_disk_contents("rbd volume (reopened)", open(true)?.as_ref())?;
    image::remove(&pool, &name)?;
    Ok(())
}

strata_testkit::main!(
    freestanding_driver_on_a_raw_image,
    freestanding_driver_on_a_qcow2_linked_clone,
    freestanding_driver_on_a_thin_volume,
    freestanding_driver_on_a_volume_under_live_restore,
    #[cfg(feature = "rbd")]
    freestanding_driver_on_an_rbd_volume,
);

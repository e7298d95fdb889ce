//! The Linux test guest (tests/guest/build.sh) and what tiers 2 and 3 check on both sides of a
//! disk: the host's pattern the guest reads, the guest's pattern the host finds, and the
//! discarded range.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context, Result};

/// One mebibyte.
pub const MIB: usize = 1 << 20;

/// The kernel command line of the disk test.
pub const DISK_TEST_CMDLINE: &str = "console=ttyS0 panic=-1 quiet strata.test=disk";

/// The 1 MiB the host writes at offset 0 for the guest to read.
pub fn host_pattern() -> Vec<u8> {
    (0..MIB as u64)
        .map(|i| ((i.wrapping_mul(13)) ^ (i >> 9) ^ 0x5a) as u8)
        .collect()
}

/// The 1 MiB the guest writes at 1 MiB (the line init.sh repeats).
pub fn guest_pattern() -> Vec<u8> {
    let line = b"strata guest pattern 0123456789abcdef\n";
    line.iter().copied().cycle().take(MIB).collect()
}

/// sha256 of `data` as hex, by `sha256sum` (the guest uses busybox's).
pub fn sha256(data: &[u8]) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running sha256sum")?;
    child.stdin.take().context("stdin")?.write_all(data)?;
    let out = child.wait_with_output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// Builds (or reuses) the Linux test guest; returns its folder (`$STRATA_GUEST_DIR`, else
/// build/guest in the repository).
pub fn guest_dir() -> Result<PathBuf> {
    // Tests of one binary run in parallel; only one may build the guest.
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = std::env::var_os("STRATA_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("build/guest"));
    if !dir.join("vmlinuz").exists() || !dir.join("initramfs.gz").exists() {
        let status = Command::new("bash")
            .arg(repo.join("tests/guest/build.sh"))
            .arg(&dir)
            .status()
            .context("running tests/guest/build.sh")?;
        ensure!(status.success(), "tests/guest/build.sh failed");
    }
    Ok(dir)
}

/// The test guest with fio in its initramfs (`initramfs-fio.gz`, for `strata.test=fio`), built
/// once like [`guest_dir`].
pub fn guest_dir_with_fio() -> Result<PathBuf> {
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    guest_variant("initramfs-fio.gz", "STRATA_GUEST_FIO")
}

/// The test guest with iperf3 in its initramfs (`initramfs-net.gz`, for `strata.test=net`),
/// built once like [`guest_dir`].
pub fn guest_dir_with_net() -> Result<PathBuf> {
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    guest_variant("initramfs-net.gz", "STRATA_GUEST_NET")
}

/// The guest folder with initramfs `file`, which build.sh makes when `env` is 1.
fn guest_variant(file: &str, env: &str) -> Result<PathBuf> {
    let dir = guest_dir()?;
    if !dir.join(file).exists() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let status = Command::new("bash")
            .arg(repo.join("tests/guest/build.sh"))
            .arg(&dir)
            .env(env, "1")
            .status()
            .with_context(|| format!("running tests/guest/build.sh for {file}"))?;
        ensure!(status.success(), "tests/guest/build.sh ({file}) failed");
    }
    Ok(dir)
}

/// QEMU (TCG) booting the test guest in `guest` with initramfs `initramfs` and kernel command
/// line `cmdline` on a q35 machine, console on stdout, no default devices, no reboot; the
/// caller adds memory and devices.
pub fn qemu_linux_command(guest: &Path, initramfs: &str, cmdline: &str) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-nographic",
        "-no-reboot",
        "-nodefaults",
        "-serial",
        "stdio",
    ])
    .arg("-kernel")
    .arg(guest.join("vmlinuz"))
    .arg("-initrd")
    .arg(guest.join(initramfs))
    .args(["-append", cmdline]);
    cmd
}

/// Runs QEMU as `cmd` sets it up (its console on stdout), for at most `timeout`; returns the
/// console output once QEMU exits successfully.
pub fn run_qemu_console(mut cmd: Command, timeout: std::time::Duration) -> Result<String> {
    use std::time::Instant;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    // Read the console on a thread so that a chatty guest cannot fill the pipe and stall.
    let mut stdout = child.stdout.take().context("stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let console = reader.join().unwrap_or_default();
            bail!(
                "QEMU did not finish in {} s; console:\n{console}",
                timeout.as_secs()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let console = reader.join().unwrap_or_default();
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        bail!("QEMU failed ({status}): {err}\n{console}");
    }
    Ok(console)
}

/// A raw image with the host's pattern at 0 and non-zero bytes where the guest discards.
pub fn prepare_raw(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path)?;
    f.set_len(64 << 20)?;
    f.write_all_at(&host_pattern(), 0)?;
    f.write_all_at(&vec![0xcdu8; MIB], 2 * MIB as u64)?;
    f.sync_all()?;
    Ok(())
}

/// The value of the guest's `STRATA key value` line.
pub fn strata_line<'a>(console: &'a str, key: &str) -> Option<&'a str> {
    let prefix = format!("STRATA {key}");
    console.lines().find_map(|l| {
        let at = l.find(&prefix)?;
        Some(l[at + prefix.len()..].trim())
    })
}

/// Checks the guest's report of the disk test.
pub fn check_console(row: &str, console: &str, serial: &str) -> Result<()> {
    eprintln!("--- guest console ({row}) ---\n{console}\n--- end ---");
    ensure!(
        !console.contains("STRATA FAIL"),
        "{row}: the guest reported a failure"
    );
    ensure!(
        strata_line(console, "done").is_some(),
        "{row}: the guest did not finish"
    );
    ensure!(
        console.contains(&format!("serial '{serial}'")),
        "{row}: the guest did not see the serial (GET_ID)"
    );
    let host_data = strata_line(console, "host-data").context("no host-data line")?;
    ensure!(
        host_data == sha256(&host_pattern())?,
        "{row}: the guest read wrong host data"
    );
    let wrote = strata_line(console, "wrote").context("no wrote line")?;
    ensure!(
        wrote == sha256(&guest_pattern())?,
        "{row}: the guest's pattern differs"
    );
    if strata_line(console, "discarded").is_none() {
        bail!("{row}: discard was refused by the device");
    }
    Ok(())
}

/// Checks the image (any format qemu-img reads) from the host: the host's data unchanged, the
/// guest's writes present, the discarded range zero.
pub fn check_image(row: &str, image: &Path, format: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let flat = dir.path().join("flat.raw");
    let status = Command::new("qemu-img")
        .args(["convert", "-f", format, "-O", "raw"])
        .arg(image)
        .arg(&flat)
        .status()
        .context("running qemu-img convert")?;
    ensure!(status.success(), "qemu-img convert failed");
    check_flat(row, &std::fs::read(&flat)?)
}

/// Checks a block device (a volume) from the host, as [`check_image`] does an image.
pub fn check_device(row: &str, dev: &dyn strata_storage::BlockDevice) -> Result<()> {
    check_flat(row, &crate::read_device(dev, 0, 3 * MIB)?)
}

/// Checks a disk's first 3 MiB read some other way (a download), as [`check_image`] does.
pub fn check_bytes(row: &str, data: &[u8]) -> Result<()> {
    check_flat(row, data)
}

fn check_flat(row: &str, data: &[u8]) -> Result<()> {
    ensure!(data.len() >= 3 * MIB, "{row}: the disk is too small");
    ensure!(
        data[..MIB] == host_pattern()[..],
        "{row}: the host's data changed"
    );
    ensure!(
        data[MIB..2 * MIB] == guest_pattern()[..],
        "{row}: the guest's writes are not on the disk"
    );
    ensure!(
        data[2 * MIB..3 * MIB].iter().all(|&b| b == 0),
        "{row}: the discarded range is not zero"
    );
    Ok(())
}

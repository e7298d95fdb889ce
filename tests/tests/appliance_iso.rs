//! End-to-end test of the appliance ISO.
//!
//! Builds `strata-appliance.iso` with `appliance-image/build.sh` from Debian's packages and
//! this workspace's `strata`, then, in QEMU with software emulation (TCG: an unmodified Linux
//! kernel does not boot under this machine's PVM KVM):
//!
//! 1. boots the ISO by UEFI (OVMF) with a blank 10 GiB disk and a small USB-stick-like disk
//!    holding an empty FAT volume labelled `STRATA-OUT`; the answer file baked into the ISO
//!    asks for an unattended installation onto the only eligible disk, with the first API
//!    token written to that FAT volume (how an unattended installation hands out a secret:
//!    not through a console log);
//! 2. waits for the installer to finish and reboot (QEMU runs with `-no-reboot`, so it exits);
//! 3. reads the token from the FAT volume on the host (mtools);
//! 4. boots the installed disk alone by BIOS (SeaBIOS), with the guest's API port forwarded
//!    to a loopback port, and waits for `GET /api/health`; then checks that the token is
//!    accepted and a wrong or missing token refused, that the default volume group and thin
//!    pool are on the disk's PV partition, creates a thin volume and backs it up into the
//!    installed backup datastore; the answers put the API on a port that is not the default,
//!    so it answering there shows the installed system serves on the configured address;
//!    the NIC is a port of the management bridge br0 (the answers' default), which carries
//!    the address and is recorded as network br0;
//! 5. boots the disk alone again by UEFI, checks the API once more and finds the volume and
//!    its backup;
//! 6. boots the ISO by BIOS over the installed disk, a 2 GiB disk and the stick: the
//!    unattended installation must refuse the disk holding a Strata volume group; in the
//!    rescue shell that follows, runs the installer interactively on the serial console
//!    (typing the answers): it must refuse the small disk and the disk holding the volume
//!    group until told to wipe it, then reinstall.
//!
//! Prints the ISO size, build, install and boot-to-API times (benches/RESULTS.md).
//! Shows as ignored only when qemu-system-x86_64 is not installed and `CI` is not set; any
//! other missing host tool (xorriso, GRUB's BIOS or UEFI modules, mtools, OVMF...) fails it.

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

const GIB: u64 = 1 << 30;
/// Console lines that mean the guest failed and will not get further.
const FAILURES: [&str; 4] = [
    "installation failed",
    "strata-boot:",
    "Kernel panic",
    "the installation medium (media id",
];
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// The API port the test's answers configure: not the default (8006), so that the test shows
/// the installed system serves where it was told to.
const API_PORT: u16 = 8443;
/// The answer file baked into the test ISO.
const ANSWERS: &str = "\
# Unattended installation for the end-to-end test.
disk = auto
hostname = strata-test
listen = 0.0.0.0:8443
token-to = vfat:STRATA-OUT
after = reboot
";

/// Host tools of `appliance-image/build.sh` and this test, with their Debian packages
/// (scripts/install-deps.sh installs them).
const HOST_TOOLS: [(&str, &str); 13] = [
    ("apt-get", "apt"),
    ("dpkg-deb", "dpkg"),
    ("depmod", "kmod"),
    ("cpio", "cpio"),
    ("readelf", "binutils"),
    ("strip", "binutils"),
    ("grub-mkrescue", "grub-common"),
    ("xorriso", "xorriso"),
    ("mformat", "mtools"),
    ("mtype", "mtools"),
    ("gzip", "gzip"),
    ("xz", "xz-utils"),
    (DEBUGFS, "e2fsprogs"),
];
/// debugfs, by path: /sbin is not on every user's PATH.
const DEBUGFS: &str = "/sbin/debugfs";
/// GRUB's platform folders: grub-mkrescue quietly leaves out a platform whose folder is
/// missing, which would make an ISO that cannot boot that way.
const GRUB_PLATFORMS: [(&str, &str); 2] = [
    ("/usr/lib/grub/i386-pc", "grub-pc-bin"),
    ("/usr/lib/grub/x86_64-efi", "grub-efi-amd64-bin"),
];

/// Fails, naming the package, when a host tool, GRUB platform or OVMF is missing.
fn check_host_tools() -> Result<()> {
    let mut missing = Vec::new();
    for (tool, package) in HOST_TOOLS {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()?
            .success();
        if !found {
            missing.push(format!("{tool} (Debian package {package})"));
        }
    }
    let files = GRUB_PLATFORMS
        .iter()
        .chain(&[(OVMF_CODE, "ovmf"), (OVMF_VARS, "ovmf")]);
    for (path, package) in files {
        if !Path::new(path).exists() {
            missing.push(format!("{path} (Debian package {package})"));
        }
    }
    ensure!(
        missing.is_empty(),
        "the appliance ISO test needs {}: run scripts/install-deps.sh",
        missing.join(", ")
    );
    Ok(())
}

/// The ISO's El Torito boot catalogue must have a BIOS and a UEFI entry.
fn check_boot_catalogue(iso: &Path) -> Result<()> {
    let out = Command::new("xorriso")
        .args([
            "-indev",
            &iso.display().to_string(),
            "-report_el_torito",
            "plain",
        ])
        .output()
        .context("running xorriso")?;
    ensure!(out.status.success(), "xorriso -report_el_torito failed");
    let report = String::from_utf8_lossy(&out.stdout);
    let entries: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("El Torito boot img"))
        .collect();
    for platform in ["BIOS", "UEFI"] {
        ensure!(
            entries
                .iter()
                .any(|l| l.split_whitespace().any(|w| w == platform)),
            "the ISO has no {platform} boot image: {entries:?}"
        );
    }
    Ok(())
}

/// The byte offset of the GPT partition named `name` on a raw disk image.
fn gpt_partition_offset(disk: &Path, name: &str) -> Result<u64> {
    const SECTOR: u64 = 512;
    let f = File::open(disk)?;
    let mut header = [0u8; 92];
    f.read_exact_at(&mut header, SECTOR)?;
    ensure!(&header[..8] == b"EFI PART", "no GPT on {}", disk.display());
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let (table, count, size) = (
        u64_at(&header, 72),
        u32_at(&header, 80).min(128),
        u32_at(&header, 84),
    );
    ensure!((128..=4096).contains(&size), "odd GPT entry size {size}");
    let mut entry = vec![0u8; size as usize];
    for i in 0..u64::from(count) {
        f.read_exact_at(&mut entry, table * SECTOR + i * u64::from(size))?;
        let units: Vec<u16> = entry[56..128]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        if String::from_utf16_lossy(&units) == name {
            return Ok(u64_at(&entry, 32) * SECTOR);
        }
    }
    bail!("no partition named {name} on {}", disk.display())
}

/// Runs a debugfs request on the ext4 file system at `offset` of `disk` (read-only).
fn debugfs(disk: &Path, offset: u64, request: &str) -> Result<String> {
    let device = format!("{}?offset={offset}", disk.display());
    let out = Command::new(DEBUGFS)
        .args(["-R", request, &device])
        .output()
        .context("running debugfs")?;
    ensure!(
        out.status.success(),
        "debugfs {request}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Reads the installed root file system from the host (no guest involved).
fn check_installed_root(disk: &Path) -> Result<()> {
    let root = gpt_partition_offset(disk, "strata-root")?;
    let store = debugfs(disk, root, "ls /var/lib/strata/datastore")?;
    ensure!(
        store.contains(".strata-datastore") && store.contains("chunks"),
        "no backup datastore in the installed /var/lib/strata: {store:?}"
    );
    let recorded = debugfs(disk, root, "cat /var/lib/strata/appliance.json")?;
    ensure!(
        recorded.contains("\"datastore\": \"/var/lib/strata/datastore\"")
            && recorded.contains("\"thin_pool\": \"data\""),
        "appliance.json does not record the default storage: {recorded}"
    );
    let conf = debugfs(disk, root, "cat /etc/strata/appliance.conf")?;
    ensure!(
        conf.contains(&format!("LISTEN='0.0.0.0:{API_PORT}'")),
        "appliance.conf: {conf}"
    );
    Ok(())
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_path_buf()
}

/// The `strata` binary `cargo test --workspace` built next to this test.
fn strata_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test binary has no target folder")?;
    let bin = dir.join("strata");
    ensure!(
        bin.is_file(),
        "{} is missing: build it first (cargo build -p strata-cli, or run cargo test --workspace)",
        bin.display()
    );
    Ok(bin)
}

fn run(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {shown}"))?;
    ensure!(
        out.status.success(),
        "{shown} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A USB-stick-like image: an MBR with one FAT partition at 1 MiB labelled `label`.
fn make_fat_stick(path: &Path, label: &str) -> Result<String> {
    const SIZE: u64 = 8 << 20;
    const START: u32 = 2048;
    let sectors = (SIZE / 512) as u32 - START;
    let mut mbr = [0u8; 512];
    let entry = &mut mbr[446..462];
    entry[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
    entry[4] = 0x0c; // FAT32 (LBA); FAT16 content is accepted by every reader
    entry[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    entry[8..12].copy_from_slice(&START.to_le_bytes());
    entry[12..16].copy_from_slice(&sectors.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    let mut f = File::create(path)?;
    f.write_all(&mbr)?;
    f.set_len(SIZE)?;
    let spec = format!("{}@@1M", path.display());
    run(Command::new("mformat").args([
        "-i",
        &spec,
        "-v",
        label,
        "-T",
        &sectors.to_string(),
        "-h",
        "16",
        "-s",
        "32",
        "::",
    ]))?;
    Ok(spec)
}

/// A QEMU guest whose serial console is collected (and echoed to the test's output).
struct Guest {
    name: &'static str,
    child: Child,
    console: Arc<Mutex<String>>,
    started: Instant,
    /// Where [`Guest::expect`] searches from.
    cursor: usize,
    /// A line of [`FAILURES`] this guest is expected to show.
    expected_failure: Option<&'static str>,
}

/// Removes terminal escape sequences (GRUB draws its menu with them).
fn strip_escapes(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else if c != '\r' {
            out.push(c);
        }
    }
    out
}

impl Guest {
    fn start(name: &'static str, args: &[String]) -> Result<Guest> {
        Guest::start_with(name, args, false)
    }

    /// `typing`: the test types on the serial console ([`Guest::send`]).
    fn start_with(name: &'static str, args: &[String], typing: bool) -> Result<Guest> {
        let mut child = Command::new("qemu-system-x86_64")
            .args([
                "-machine", "q35", "-accel", "tcg", "-m", "1024", "-smp", "2",
            ])
            .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
            .args(args)
            .stdin(if typing {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting qemu-system-x86_64")?;
        let console = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().context("qemu stdout")?) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().context("qemu stderr")?),
        ] {
            let console = console.clone();
            let started = Instant::now();
            // Raw chunks, not lines: prompts wait for input without ending their line.
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 4096];
                let mut pending = String::new();
                let echo = |line: &str| {
                    let line = strip_escapes(line);
                    if !line.trim().is_empty() {
                        let t = started.elapsed().as_secs_f64();
                        eprintln!("[{name} {t:5.1}] {}", line.trim_end());
                    }
                };
                loop {
                    let n = match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let text = String::from_utf8_lossy(&buf[..n]);
                    console.lock().unwrap().push_str(&text);
                    pending.push_str(&text);
                    while let Some(i) = pending.find('\n') {
                        let line: String = pending.drain(..=i).collect();
                        echo(&line);
                    }
                }
                echo(&pending);
            });
        }
        Ok(Guest {
            name,
            child,
            console,
            started: Instant::now(),
            cursor: 0,
            expected_failure: None,
        })
    }

    /// Types a line on the serial console.
    fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self
            .child
            .stdin
            .as_mut()
            .context("guest started without typing")?;
        stdin.write_all(format!("{line}\n").as_bytes())?;
        stdin.flush()?;
        Ok(())
    }

    /// Calls `ready` every 200 ms until it returns a value; fails after `timeout`.
    fn poll<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut(&mut Guest) -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = ready(self).with_context(|| format!("while waiting for {what}"))? {
                return Ok(v);
            }
            ensure!(
                Instant::now() < deadline,
                "{}: no {what} within {} s",
                self.name,
                timeout.as_secs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits for `text` after the previous match, like expect(1); returns the seconds since
    /// the guest started.
    fn expect(&mut self, text: &str, timeout: Duration) -> Result<f64> {
        self.poll(&format!("{text:?}"), timeout, |g| {
            let console = g.console();
            if let Some(at) = console.get(g.cursor..).and_then(|rest| rest.find(text)) {
                g.cursor += at + text.len();
                return Ok(Some(g.started.elapsed().as_secs_f64()));
            }
            g.check_alive()?;
            Ok(None)
        })
    }

    fn console(&self) -> String {
        self.console.lock().unwrap().clone()
    }

    /// Fails when the guest reported a failure or QEMU exited.
    fn check_alive(&mut self) -> Result<()> {
        let text = self.console();
        let unexpected = FAILURES
            .iter()
            .filter(|f| Some(**f) != self.expected_failure);
        if let Some(f) = unexpected.into_iter().find(|f| text.contains(*f)) {
            bail!("{}: the guest failed ({f:?} on its console)", self.name);
        }
        if let Some(status) = self.child.try_wait()? {
            bail!("{}: qemu exited ({status})", self.name);
        }
        Ok(())
    }

    /// Waits for QEMU to exit by itself (the guest rebooted under -no-reboot).
    fn wait_exit(&mut self, timeout: Duration) -> Result<f64> {
        self.poll("reboot", timeout, |g| match g.child.try_wait()? {
            Some(status) => {
                ensure!(status.success(), "{}: qemu exited with {status}", g.name);
                Ok(Some(g.started.elapsed().as_secs_f64()))
            }
            None => Ok(None),
        })
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The fingerprint of the installed API's TLS certificate, read from the stick.
static FINGERPRINT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// An HTTPS request to the installed API (its certificate pinned by the fingerprint the
/// installer wrote to the stick) with an optional JSON body; returns the status code and body.
fn http(
    method: &str,
    port: u16,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Result<(u16, String)> {
    use strata_api::client::{Client, Trust};
    let fp = FINGERPRINT
        .get()
        .context("the TLS fingerprint is not known yet")?;
    let c = Client::with_trust(
        &format!("https://127.0.0.1:{port}"),
        token.map(str::to_string),
        Some(Trust::Fingerprint(fp.clone())),
    )?;
    let r = c.send(
        method,
        path,
        body.unwrap_or("").as_bytes().to_vec(),
        body.is_some(),
    )?;
    Ok((r.status, String::from_utf8_lossy(&r.raw).into_owned()))
}

/// The string value of `"key":"..."` in a JSON text (enough for the few fields read here).
fn json_string(json: &str, key: &str) -> Option<String> {
    let rest = json.split_once(&format!("\"{key}\":\""))?.1;
    Some(rest.split_once('"')?.0.to_string())
}

fn http_get(port: u16, path: &str, token: Option<&str>) -> Result<(u16, String)> {
    http("GET", port, path, token, None)
}

/// QEMU arguments for the ISO as a CD and `disks` as virtio disks, exiting on reboot.
fn installer_media(iso: &Path, disks: &[&Path]) -> Vec<String> {
    let mut args = vec!["-cdrom".to_string(), iso.display().to_string()];
    for d in disks {
        args.push("-drive".into());
        args.push(format!("file={},format=raw,if=virtio", d.display()));
    }
    args.push("-no-reboot".into());
    args
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Boots the installed disk alone and waits for the API; checks the token and the default
/// storage, and makes (`first_boot`) or finds a thin volume. Returns the seconds from power-on
/// to the first answer of `GET /api/health`.
fn boot_installed(
    name: &'static str,
    disk: &Path,
    firmware: &[String],
    token: &str,
    first_boot: bool,
) -> Result<f64> {
    let port = free_port()?;
    let mut args = firmware.to_vec();
    args.extend([
        "-drive".into(),
        format!("file={},format=raw,if=virtio", disk.display()),
        "-netdev".into(),
        format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:{API_PORT}"),
        "-device".into(),
        "virtio-net-pci,netdev=n0".into(),
    ]);
    let mut guest = Guest::start(name, &args)?;
    let boot_to_api = guest.poll("API answer", Duration::from_secs(600), |g| {
        g.check_alive()?;
        match http_get(port, "/api/health", None) {
            Ok((200, body)) => {
                ensure!(body.contains("\"status\":\"ok\""), "health answered {body}");
                Ok(Some(g.started.elapsed().as_secs_f64()))
            }
            _ => Ok(None),
        }
    })?;
    let (status, body) = http_get(port, "/api/tokens", Some(token))?;
    ensure!(
        status == 200,
        "{name}: the generated token was refused ({status}: {body})"
    );
    ensure!(
        body.contains("\"name\":\"admin\""),
        "{name}: token list {body}"
    );
    let (status, _) = http_get(port, "/api/tokens", Some("00000000.0000"))?;
    ensure!(status == 401, "{name}: a wrong token got {status}");
    let (status, _) = http_get(port, "/api/tokens", None)?;
    ensure!(status == 401, "{name}: no token got {status}");
    ensure!(
        guest
            .console()
            .contains(&format!("the API listens on 0.0.0.0:{API_PORT}")),
        "{name}: the boot scripts did not report the API address"
    );
    // The installer's default storage: group strata on the PV partition, pool strata/data.
    let (status, body) = http_get(port, "/api/storage", Some(token))?;
    ensure!(status == 200, "{name}: storage overview {status}: {body}");
    ensure!(
        body.contains("\"name\":\"strata\"")
            && body.contains("\"name\":\"data\"")
            && body.contains("/dev/vda4"),
        "{name}: no default group and pool on /dev/vda4: {body}"
    );
    // The management bridge (the installer's default `bridge = br0`): the NIC is its port,
    // the API answered on the bridge's DHCP address, and it is recorded as network br0.
    let (status, body) = http_get(port, "/api/networks/br0", Some(token))?;
    ensure!(
        status == 200
            && body.contains("\"bridge\":\"br0\"")
            && body.contains("\"present\":true")
            && body.contains("\"ports\":[\""),
        "{name}: no management bridge br0 with a port: {status}: {body}"
    );
    // A thin volume made and backed up into the installed datastore on the first boot is
    // there on the next, with its backup.
    if first_boot {
        let request = r#"{"vg":"strata","name":"kept","size":"32M","pool":"data"}"#;
        let (status, body) = http("POST", port, "/api/volumes", Some(token), Some(request))?;
        ensure!(
            status == 200,
            "{name}: creating a thin volume: {status}: {body}"
        );
        let request = r#"{"source":"lv:strata/kept","id":"volume/strata/kept"}"#;
        let (status, body) = http("POST", port, "/api/backups", Some(token), Some(request))?;
        ensure!(status == 202, "{name}: starting a backup: {status}: {body}");
        let job = json_string(&body, "id").context("backup job without an id")?;
        guest.poll("backup job", Duration::from_secs(300), |_| {
            let (status, body) = http_get(port, &format!("/api/jobs/{job}"), Some(token))?;
            ensure!(status == 200, "job {job}: {status}: {body}");
            match json_string(&body, "state").as_deref() {
                Some("running") => Ok(None),
                Some("succeeded") => Ok(Some(())),
                _ => bail!("backup job {job}: {body}"),
            }
        })?;
    } else {
        let (status, body) = http_get(port, "/api/volumes/strata/kept", Some(token))?;
        ensure!(
            status == 200,
            "{name}: the volume made on the first boot: {status}: {body}"
        );
        let (status, body) = http_get(port, "/api/backups", Some(token))?;
        ensure!(
            status == 200 && body.contains("\"snapshot\":\"volume/strata/kept/"),
            "{name}: the backup made on the first boot: {status}: {body}"
        );
    }
    Ok(boot_to_api)
}

fn appliance_iso_installs_unattended_and_serves_the_api() -> Result<()> {
    // Only a host without QEMU at all skips (shown as ignored; never in CI, where CI is set).
    // Every other tool the build and the test need must be there: a missing one fails the test.
    strata_testkit::require_tool("qemu-system-x86_64", "qemu-system-x86");
    check_host_tools()?;
    let dir = tempfile::tempdir()?;
    let iso = dir.path().join("strata-appliance.iso");
    let answers = dir.path().join("answers.conf");
    std::fs::write(&answers, ANSWERS)?;

    // 1. Build the ISO from Debian's packages.
    let build_started = Instant::now();
    let work = dir.path().join("work");
    let strata = strata_binary()?;
    let status = Command::new("bash")
        .arg(repo_root().join("appliance-image/build.sh"))
        .arg("--strata")
        .arg(&strata)
        .arg("--answers")
        .arg(&answers)
        .arg("--out")
        .arg(&iso)
        .arg("--work")
        .arg(&work)
        .args(["--grub-timeout", "1"])
        .status()
        .context("running appliance-image/build.sh")?;
    ensure!(
        status.success(),
        "appliance-image/build.sh failed ({status})"
    );
    let build_secs = build_started.elapsed().as_secs_f64();
    let iso_bytes = std::fs::metadata(&iso)?.len();
    check_boot_catalogue(&iso)?;
    std::fs::remove_dir_all(&work)?;

    // 2. Install by UEFI onto a blank disk.
    let disk = dir.path().join("disk.raw");
    File::create(&disk)?.set_len(10 * GIB)?;
    let stick = dir.path().join("stick.img");
    let stick_spec = make_fat_stick(&stick, "STRATA-OUT")?;
    let vars = dir.path().join("OVMF_VARS.fd");
    std::fs::copy(OVMF_VARS, &vars)?;
    let uefi = vec![
        "-drive".to_string(),
        format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"),
        "-drive".to_string(),
        format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
    ];
    let mut args = uefi.clone();
    args.extend(installer_media(&iso, &[&disk, &stick]));
    let mut installer = Guest::start("install", &args)?;
    let to_installer = installer.expect("strata-installer: starting", Duration::from_secs(300))?;
    installer.expect("Installation complete in", Duration::from_secs(900))?;
    let console = installer.console();
    ensure!(
        console.contains("answers from answer file /run/strata/media/strata/answers.conf"),
        "the installer did not take the ISO's answer file"
    );
    ensure!(
        console.contains("Plan: install on /dev/vda"),
        "the installer chose another disk"
    );
    let installer_secs: f64 = console
        .split("Installation complete in ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|s| s.parse().ok())
        .context("installer time not printed")?;
    let install_total = installer.wait_exit(Duration::from_secs(180))?;
    drop(installer);

    // 3. The token, from the FAT volume, as an operator would read the stick.
    let token = run(Command::new("mtype").args(["-i", &stick_spec, "::strata-token.txt"]))?
        .trim()
        .to_string();
    ensure!(
        token.len() > 40 && token.contains('.'),
        "odd token {token:?}"
    );
    let fingerprint =
        run(Command::new("mtype").args(["-i", &stick_spec, "::strata-fingerprint.txt"]))?
            .trim()
            .to_string();
    ensure!(
        fingerprint.len() == 95,
        "odd TLS fingerprint {fingerprint:?}"
    );
    let _ = FINGERPRINT.set(fingerprint.clone());
    let report = run(Command::new("mtype").args(["-i", &stick_spec, "::strata-install.json"]))?;
    ensure!(
        report.contains(&fingerprint),
        "the report lacks the TLS fingerprint: {report}"
    );
    ensure!(
        report.contains(&token) && report.contains("\"hostname\": \"strata-test\""),
        "report {report}"
    );
    ensure!(
        !console.contains(&token),
        "the token leaked onto the console"
    );
    ensure!(
        report.contains("thin pool strata/data, backup datastore /var/lib/strata/datastore"),
        "the installer did not report the default storage: {report}"
    );

    // The installed root file system, read from the host: the installer (not the API on
    // first use) made the datastore and recorded the storage, and the configuration names
    // the answered API address.
    check_installed_root(&disk)?;

    // 4. and 5. Boot the disk alone, by BIOS then by UEFI, and use the API with the token.
    let bios_api = boot_installed("boot-bios", &disk, &[], &token, true)?;
    let uefi_api = boot_installed("boot-uefi", &disk, &uefi, &token, false)?;

    // 6. The ISO booted by BIOS over the installed disk, a small disk and the token stick:
    //    the unattended installation (the ISO's answers) must refuse the disk holding a
    //    Strata volume group, and the installer's rescue shell follows. There the operator
    //    runs the installer interactively on the serial console, with a command-line answer
    //    file (`strata.token-to=console` overrides the ISO's answer): it refuses the small
    //    disk, refuses to overwrite the volume group until told to wipe, and reinstalls.
    let small = dir.path().join("small.raw");
    File::create(&small)?.set_len(2 * GIB)?;
    let mut args = installer_media(&iso, &[&disk, &small]);
    args.extend([
        "-drive".to_string(),
        format!("file={},format=raw,if=virtio", stick.display()),
        // The CD first: SeaBIOS would otherwise boot the installed disk.
        "-boot".to_string(),
        "order=d".to_string(),
    ]);
    let mut g = Guest::start_with("bios-iso", &args, true)?;
    g.expected_failure = Some("installation failed");
    g.expect("strata-installer: starting", Duration::from_secs(600))?;
    g.expect(
        "Disk /dev/vda holds a Strata volume group (physical volume label on vda4); \
         answer wipe=yes to replace it",
        Duration::from_secs(600),
    )?;
    g.expect(
        "installation failed (exit status 1)",
        Duration::from_secs(60),
    )?;
    g.expect("starting a shell", Duration::from_secs(60))?;
    g.send("echo strata.token-to=console >/tmp/cmdline")?;
    g.send("strata install --interactive --cmdline /tmp/cmdline")?;
    // What the console shows, and what the operator types then (None: just expect it).
    let dialogue: [(&str, Option<&str>); 15] = [
        ("Install on disk [vda]: ", Some("vdb")),
        (
            "Disk /dev/vdb is too small: 2 GiB; Strata needs at least 8 GiB",
            None,
        ),
        ("Install on disk [vda]: ", Some("vda")),
        (
            "/dev/vda holds a Strata volume group (physical volume label on vda4)",
            None,
        ),
        ("Type 'wipe' to go on: ", Some("no")),
        ("Install on disk [vda]: ", Some("vda")),
        ("Type 'wipe' to go on: ", Some("wipe")),
        ("Host name [strata-test]: ", Some("")),
        ("API address and port [0.0.0.0:8443]: ", Some("")),
        ("Network (dhcp, static, none) [dhcp]: ", Some("")),
        ("Plan: install on /dev/vda (10 GiB)", None),
        ("vda4   5.75 GiB  Strata physical volume", None),
        ("first API token \"admin\" printed on the console", None),
        ("will be erased. Type 'yes' to go on: ", Some("yes")),
        ("First API token \"admin\" (shown only now; keep it)", None),
    ];
    for (i, (shown, typed)) in dialogue.iter().enumerate() {
        // The prompts come quickly, the token only after the installation.
        let timeout = match i {
            14 => Duration::from_secs(600),
            _ => Duration::from_secs(60),
        };
        g.expect(shown, timeout)?;
        if let Some(line) = typed {
            g.send(line)?;
        }
    }
    g.expect("Installation complete in", Duration::from_secs(900))?;
    g.send("reboot -f")?;
    g.wait_exit(Duration::from_secs(180))?;

    let mib = iso_bytes as f64 / (1 << 20) as f64;
    eprintln!(
        "\nappliance-iso results: ISO {mib:.1} MiB ({iso_bytes} bytes); build {build_secs:.0} s; \
         UEFI power-on to installer {to_installer:.0} s; installer {installer_secs:.1} s; \
         power-on to installed and rebooting {install_total:.0} s; power-on to API: \
         BIOS {bios_api:.0} s, UEFI {uefi_api:.0} s (QEMU TCG, 2 vCPUs)\n"
    );
    Ok(())
}

strata_testkit::main!(appliance_iso_installs_unattended_and_serves_the_api,);

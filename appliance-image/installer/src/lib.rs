//! The appliance installer behind `strata install`, run by the Strata ISO's init.
//!
//! It gathers answers (answer file on the medium, kernel command line, or the operator on the
//! console), chooses and checks the target disk, shows the plan, then:
//!
//! 1. partitions the disk (GPT: BIOS boot, boot, root, Strata PV — [`layout`]),
//! 2. makes the file systems ([`partition`]),
//! 3. copies the running system onto the root file system and writes its configuration
//!    ([`system`]), with the kernel and boot initramfs from the medium,
//! 4. creates the default volume group and thin pool on the PV partition and the backup
//!    datastore ([`storage_setup`]),
//! 5. creates the first API token ([`token`]),
//! 6. installs GRUB for BIOS and UEFI ([`bootloader`]),
//! 7. unmounts, hands over the token, and tells the init what to do next (reboot by default).
//!
//! Nothing is written to any disk before the plan is complete and valid; the disk checks
//! (too small, holds the installer, mounted, holds Strata data) run first.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod answers;
pub mod bootloader;
pub mod disks;
pub mod error;
pub mod interactive;
pub mod layout;
pub mod partition;
pub mod run;
pub mod storage_setup;
pub mod system;
pub mod token;

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use strata_storage::util::format_size;

use answers::{AnswerSources, Answers, DiskChoice, Network, RawAnswers, TokenDelivery};
use disks::{Disk, SysView};
pub use error::{InstallError, InstallResult};
use interactive::Prompter;
use layout::Layout;

/// How the installer gets its answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Unattended when answers are given, else interactive on a terminal.
    Auto,
    /// Always ask (given answers become the defaults).
    Interactive,
}

/// Where things are and how to run.
#[derive(Clone, Debug)]
pub struct InstallOptions {
    /// The mounted installation medium (kernel, boot initramfs, answer file).
    pub media: PathBuf,
    /// The system to copy (the live system's `/`).
    pub source_root: PathBuf,
    /// Where to mount the target while installing.
    pub target_mount: PathBuf,
    /// Where the token volume is mounted while writing to it.
    pub token_mount: PathBuf,
    /// File telling the ISO's init what to do afterwards.
    pub after_file: Option<PathBuf>,
    /// Block devices and mounts.
    pub view: SysView,
    /// Answer sources.
    pub answers: AnswerSources,
    /// Answer mode.
    pub mode: Mode,
    /// Whether input is a terminal an operator can answer on.
    pub terminal: bool,
    /// Show the plan and stop.
    pub dry_run: bool,
}

/// The checked plan: everything needed to install, nothing written yet.
#[derive(Clone, Debug)]
struct Plan {
    answers: Answers,
    disk: Disk,
    layout: Layout,
    /// The token volume's device, for `token-to=vfat:LABEL`.
    token_dev: Option<PathBuf>,
}

fn write_out(out: &mut dyn Write, text: &str) -> InstallResult<()> {
    writeln!(out, "{text}").map_err(|e| InstallError::io("Writing to", "the console", e))
}

/// Runs the installer. Returns the report of a finished installation, or `None` after a dry
/// run.
pub fn install(
    opts: &InstallOptions,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> InstallResult<Option<token::InstallReport>> {
    let started = Instant::now();
    for f in ["boot/vmlinuz", "boot/initrd-disk.img"] {
        let p = opts.media.join(f);
        if !p.is_file() {
            return Err(InstallError::io(
                "The installation medium lacks",
                p,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "`strata install` runs from the Strata ISO, which mounts its medium there \
                     (see --media)",
                ),
            ));
        }
    }
    let (raw, sources) = opts.answers.load()?;
    let interactive = match opts.mode {
        Mode::Interactive => true,
        Mode::Auto if raw.is_empty() => true,
        Mode::Auto => false,
    };
    if interactive && !opts.terminal {
        return Err(InstallError::Aborted(
            "No answers were given (answer file or strata.* on the kernel command line) and \
             there is no terminal to ask on"
                .into(),
        ));
    }
    if sources.is_empty() {
        write_out(out, "Strata installer: no answers given")?;
    } else {
        write_out(
            out,
            &format!("Strata installer: answers from {}", sources.join(", ")),
        )?;
    }
    let plan = if interactive {
        plan_interactively(opts, raw, input, out)?
    } else {
        let answers = Answers::from_raw(&raw)?;
        plan(opts, answers)?
    };
    if !interactive {
        // The interactive installer showed it before asking for confirmation.
        show_plan(&plan, out)?;
    }
    if opts.dry_run {
        write_out(out, "Dry run: nothing was changed.")?;
        return Ok(None);
    }
    let report = execute(opts, &plan, out, started)?;
    Ok(Some(report))
}

/// The disks that hold the installer: the installation medium and the token volume.
fn exclusions(
    opts: &InstallOptions,
    disks: &[Disk],
    token_dev: Option<&Path>,
) -> InstallResult<disks::Exclusions> {
    let mut excl = Vec::new();
    if let Some(devno) = disks::devno_mounted_at(&opts.view, &opts.media)? {
        if let Some(d) = disks::disk_holding(disks, &devno) {
            excl.push((d.name.clone(), "the installation medium".to_string()));
        }
    }
    if let Some(dev) = token_dev {
        if let Some(d) = disks::disk_holding(disks, &dev.to_string_lossy()) {
            excl.push((
                d.name.clone(),
                format!("the token volume {}", dev.display()),
            ));
        }
    }
    Ok(excl)
}

fn token_device(a: &Answers) -> InstallResult<Option<PathBuf>> {
    match &a.token_to {
        TokenDelivery::Console => Ok(None),
        TokenDelivery::Vfat(label) => token::find_vfat(label).map(Some),
    }
}

/// Chooses and checks the disk and lays it out.
fn plan(opts: &InstallOptions, answers: Answers) -> InstallResult<Plan> {
    let token_dev = token_device(&answers)?;
    let all = disks::list_disks(&opts.view)?;
    let excl = exclusions(opts, &all, token_dev.as_deref())?;
    let disk = disks::choose(&all, &answers.disk, &excl, layout::MIN_DISK)?.clone();
    let mounts = disks::mounts(&opts.view)?;
    disks::check_target(&opts.view, &disk, &mounts, answers.wipe, layout::MIN_DISK)?;
    let layout = Layout::plan(&format!("/dev/{}", disk.name), disk.size, answers.root_size)?;
    Ok(Plan {
        answers,
        disk,
        layout,
        token_dev,
    })
}

fn plan_interactively(
    opts: &InstallOptions,
    mut raw: RawAnswers,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> InstallResult<Plan> {
    let mut p = Prompter::new(input, out);
    p.say("\nStrata appliance installer. Defaults are in brackets; press Enter to take them.\n")?;
    loop {
        let all = disks::list_disks(&opts.view)?;
        let probe = Answers::from_raw(&raw)?;
        let token_dev = token_device(&probe)?;
        let excl = exclusions(opts, &all, token_dev.as_deref())?;
        let mounts = disks::mounts(&opts.view)?;
        p.say("Disks:")?;
        for d in &all {
            let note = match excl.iter().find(|(n, _)| *n == d.name) {
                Some((_, why)) => format!(": {why}"),
                None => {
                    match disks::check_target(&opts.view, d, &mounts, false, layout::MIN_DISK) {
                        Ok(()) => String::new(),
                        // Choosing it asks whether to wipe (the error's advice is for answers).
                        Err(InstallError::ExistingStrata { what, .. }) => {
                            format!(": holds {what}; choosing it asks whether to replace it")
                        }
                        Err(e) => format!(": {e}"),
                    }
                }
            };
            p.say(&format!("  /dev/{}{note}", d.describe()))?;
        }
        let default = disks::choose(&all, &DiskChoice::Auto, &excl, layout::MIN_DISK)
            .map(|d| d.name.clone())
            .unwrap_or_default();
        if raw.get("disk").is_none_or(|d| d == "auto") {
            raw.set("disk", &default);
        }
        p.ask_answer(&mut raw, "disk", "Install on disk")?;
        let answers = Answers::from_raw(&raw)?;
        let disk = match disks::choose(&all, &answers.disk, &excl, layout::MIN_DISK) {
            Ok(d) => d.clone(),
            Err(e) => {
                p.say(&format!("  {e}"))?;
                raw.set("disk", "auto");
                continue;
            }
        };
        if let Some(what) = disks::strata_signature(&opts.view, &disk) {
            p.say(&format!("/dev/{} holds {what}.", disk.name))?;
            if !p.confirm("Replace it? Its volumes and backups will be lost.", "wipe")? {
                raw.set("disk", "auto");
                continue;
            }
            raw.set("wipe", "yes");
        }
        let answers = Answers::from_raw(&raw)?;
        if let Err(e) =
            disks::check_target(&opts.view, &disk, &mounts, answers.wipe, layout::MIN_DISK)
        {
            p.say(&format!("  {e}"))?;
            raw.set("disk", "auto");
            continue;
        }
        break;
    }
    p.ask_answer(&mut raw, "hostname", "Host name")?;
    p.ask_answer(&mut raw, "listen", "API address and port")?;
    p.ask_network(&mut raw)?;
    let answers = Answers::from_raw(&raw)?;
    let plan = plan(opts, answers)?;
    show_plan(&plan, p.writer())?;
    if opts.dry_run {
        return Ok(plan);
    }
    let question = format!(
        "All data on /dev/{} ({}) will be erased.",
        plan.disk.name,
        format_size(plan.disk.size)
    );
    if !p.confirm(&question, "yes")? {
        return Err(InstallError::Aborted(
            "Installation cancelled; nothing was changed".into(),
        ));
    }
    Ok(plan)
}

fn show_plan(plan: &Plan, out: &mut dyn Write) -> InstallResult<()> {
    let a = &plan.answers;
    let network = match &a.network {
        Network::Dhcp { interface } => format!("DHCP on {interface}"),
        Network::Static {
            interface,
            address,
            prefix,
            gateway,
            ..
        } => format!(
            "{address}/{prefix} on {interface}{}",
            gateway
                .map(|g| format!(", gateway {g}"))
                .unwrap_or_default()
        ),
        Network::None => "none".into(),
    };
    let network = match &a.bridge {
        Some(b) => format!("{network}, on bridge {b} (the interface its port; VMs join it)"),
        None => network,
    };
    let token_to = match &a.token_to {
        TokenDelivery::Console => "printed on the console".to_string(),
        TokenDelivery::Vfat(label) => format!(
            "written to the FAT volume {label} ({})",
            plan.token_dev
                .as_deref()
                .unwrap_or(Path::new("?"))
                .display()
        ),
    };
    let mut lines = vec![format!("Plan: install on /dev/{}", plan.disk.describe())];
    lines.extend(
        plan.layout
            .describe(&plan.disk.name)
            .into_iter()
            .map(|l| format!("  {l}")),
    );
    lines.push(format!(
        "  host name {}, API on {}, network {network}",
        a.hostname, a.listen
    ));
    lines.push(format!(
        "  default storage: volume group {vg} on {}, thin pool {vg}/{}, backup datastore",
        disks::partition_name(&plan.disk.name, layout::PV_PART),
        strata_service::bootstrap::DEFAULT_POOL,
        vg = strata_service::bootstrap::DEFAULT_VG,
    ));
    lines.push(format!("  first API token \"{}\" {token_to}", a.token_name));
    for l in lines {
        write_out(out, &l)?;
    }
    Ok(())
}

fn execute(
    opts: &InstallOptions,
    plan: &Plan,
    out: &mut dyn Write,
    started: Instant,
) -> InstallResult<token::InstallReport> {
    let a = &plan.answers;
    let disk_path = opts.view.dev.join(&plan.disk.name);
    let steps = 7;
    let mut n = 0;
    let mut step = |out: &mut dyn Write, what: &str| {
        n += 1;
        write_out(
            out,
            &format!(
                "[{n}/{steps}] {what} ({:.1} s)",
                started.elapsed().as_secs_f64()
            ),
        )
    };

    step(out, &format!("Partitioning {}", disk_path.display()))?;
    let paths = partition::partition(&opts.view, &plan.disk.name, plan.disk.size, &plan.layout)?;
    step(out, "Making the file systems")?;
    let ids = partition::FsIds::random()?;
    partition::make_filesystems(&paths, &ids)?;
    step(out, "Copying the system")?;
    let target = system::Mounted::mount(&paths, &opts.target_mount)?;
    let stats = system::copy_system(&opts.source_root, target.root())?;
    system::install_kernel(&opts.media, target.root())?;
    system::write_config(target.root(), a, &ids)?;
    tracing::info!(
        entries = stats.entries,
        bytes = stats.bytes,
        "system copied"
    );
    step(out, "Creating the default storage")?;
    let data_dir = target
        .root()
        .join(system::INSTALLED_DATA_DIR.trim_start_matches('/'));
    let storage = storage_setup::create_default_storage(
        &paths.pv,
        &data_dir,
        Path::new(system::INSTALLED_DATA_DIR),
    )?;
    write_out(out, &format!("  {storage}"))?;
    step(out, "Creating the first API token")?;
    let token = token::create_first_token(&data_dir, &a.token_name)?;
    step(out, "Making the API's TLS certificate")?;
    let tls_fingerprint = token::create_certificate(&data_dir, &a.hostname)?;
    step(out, "Installing the boot loader (BIOS and UEFI)")?;
    let version = env!("CARGO_PKG_VERSION");
    let cfg = bootloader::grub_cfg(&ids, &a.console, version);
    bootloader::install(&disk_path, target.root(), &cfg)?;
    step(out, "Finishing")?;
    target.unmount()?;
    let report = token::InstallReport {
        hostname: a.hostname.clone(),
        listen: a.listen.to_string(),
        disk: format!("/dev/{}", plan.disk.name),
        version: version.to_string(),
        install_seconds: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        storage,
        token_name: a.token_name.clone(),
        token,
        tls_fingerprint,
    };
    match (&a.token_to, &plan.token_dev) {
        (TokenDelivery::Vfat(label), Some(dev)) => {
            token::write_to_vfat(dev, &opts.token_mount, &report)?;
            write_out(
                out,
                &format!(
                    "The first API token and an installation report are on the FAT volume {label} ({}).",
                    dev.display()
                ),
            )?;
        }
        _ => write_out(out, &token::console_text(&report))?,
    }
    if let Some(f) = &opts.after_file {
        std::fs::write(f, a.after.as_str()).map_err(|e| InstallError::io("Writing", f, e))?;
    }
    write_out(
        out,
        &format!(
            "Installation complete in {:.1} s: Strata {version} on /dev/{}; the API will listen on {}.",
            report.install_seconds, plan.disk.name, a.listen
        ),
    )?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    //! The installer's refusals, through [`install`] on a fake machine: each comes before
    //! anything is written, with the error the operator sees.

    use super::*;
    use disks::tests::Fake;

    const GIB: u64 = 1 << 30;

    struct Machine {
        fake: Fake,
        media: tempfile::TempDir,
    }

    impl Machine {
        fn new() -> Machine {
            let media = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(media.path().join("boot")).unwrap();
            for f in ["boot/vmlinuz", "boot/initrd-disk.img"] {
                std::fs::write(media.path().join(f), b"x").unwrap();
            }
            Machine {
                fake: Fake::new(),
                media,
            }
        }

        /// A machine with a 10 GiB disk `vda` whose partition 4 holds a Strata PV label at
        /// `label_at` (0 or 4096, the two copies).
        fn with_installed_disk(label_at: usize) -> Machine {
            let m = Machine::new();
            m.fake.disk("vda", "253:0", 10 * GIB);
            m.fake.part("vda", "vda4", "253:4", None);
            let mut pv = vec![0u8; 8192];
            pv[label_at..label_at + 8].copy_from_slice(disks::PV_LABEL_MAGIC);
            std::fs::write(m.fake.view.dev.join("vda4"), pv).unwrap();
            m
        }

        /// Runs the installer unattended with `answers` (not a dry run: a refusal must come
        /// before any step runs).
        fn install(&self, answers: &str) -> (InstallResult<Option<token::InstallReport>>, String) {
            let file = self.media.path().join("answers.conf");
            std::fs::write(&file, answers).unwrap();
            let opts = plain_options(self, file);
            let mut out = Vec::new();
            let result = install(&opts, &mut &b""[..], &mut out);
            (result, String::from_utf8(out).unwrap())
        }

        /// Runs the installer's dry run with `answers`, which must succeed; returns its output.
        fn dry_run(&self, answers: &str) -> String {
            let file = self.media.path().join("answers.conf");
            std::fs::write(&file, answers).unwrap();
            let opts = InstallOptions {
                dry_run: true,
                ..plain_options(self, file)
            };
            let mut out = Vec::new();
            assert!(install(&opts, &mut &b""[..], &mut out).unwrap().is_none());
            String::from_utf8(out).unwrap()
        }

        /// The bytes of every fake device, to show that nothing was written.
        fn devices(&self) -> Vec<(String, Vec<u8>)> {
            let mut all: Vec<_> = std::fs::read_dir(&self.fake.view.dev)
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    let name = e.file_name().to_string_lossy().into_owned();
                    (name, std::fs::read(e.path()).unwrap())
                })
                .collect();
            all.sort();
            all
        }
    }

    fn refusal(m: &Machine, answers: &str) -> InstallError {
        let before = m.devices();
        let (result, out) = m.install(answers);
        let e = result.expect_err("the installer must refuse");
        assert!(!out.contains("Plan:"), "a plan was shown: {out}");
        assert_eq!(m.devices(), before, "a device was written");
        e
    }

    #[test]
    fn refuses_a_machine_without_disks() {
        let m = Machine::new();
        m.fake.disk("loop0", "7:0", 20 * GIB); // never a target
        let e = refusal(&m, "disk = auto\n");
        assert!(matches!(e, InstallError::NoDisk(_)), "{e}");
        assert_eq!(
            e.to_string(),
            "No disk found to install on (the machine reports no disks)"
        );
    }

    #[test]
    fn refuses_a_disk_too_small() {
        let m = Machine::new();
        m.fake.disk("vda", "253:0", 2 * GIB);
        for answers in ["disk = auto\n", "disk = vda\nwipe = yes\n"] {
            let e = refusal(&m, answers);
            assert_eq!(
                e.to_string(),
                "Disk /dev/vda is too small: 2 GiB; Strata needs at least 8 GiB",
                "{answers}"
            );
        }
    }

    #[test]
    fn refuses_the_disk_holding_the_installer() {
        // The ISO written to a USB stick (sdb), its ISO 9660 partition mounted as the medium.
        let m = Machine::new();
        m.fake.disk("sdb", "8:16", 32 * GIB);
        m.fake.part("sdb", "sdb1", "8:17", None);
        m.fake.mount("8:17", &m.media.path().display().to_string());
        let e = refusal(&m, "disk = sdb\nwipe = yes\n");
        assert!(matches!(e, InstallError::InstallerDisk { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "Disk /dev/sdb holds the installer itself (the installation medium); choose another disk"
        );
        // Unattended with disk=auto, the stick is never chosen: no disk is left.
        let e = refusal(&m, "disk = auto\n");
        assert!(matches!(e, InstallError::NoDisk(_)), "{e}");
        assert!(
            e.to_string()
                .contains("sdb (32 GiB QEMU HARDDISK): the installation medium"),
            "{e}"
        );
        // With a real disk next to it, auto takes that one.
        m.fake.disk("sda", "8:0", 32 * GIB);
        let out = m.dry_run("disk = auto\n");
        assert!(out.contains("Plan: install on /dev/sda (32 GiB"), "{out}");
    }

    #[test]
    fn refuses_an_existing_strata_volume_group_unless_told_to_wipe() {
        let m = Machine::with_installed_disk(0);
        for answers in ["disk = auto\n", "disk = vda\nwipe = no\n"] {
            let e = refusal(&m, answers);
            assert!(matches!(e, InstallError::ExistingStrata { .. }), "{e}");
            assert_eq!(
                e.to_string(),
                "Disk /dev/vda holds a Strata volume group (physical volume label on vda4); \
                 answer wipe=yes to replace it (its data will be lost)"
            );
        }
        // Told to wipe, the plan goes through (a dry run here: nothing is written).
        let out = m.dry_run("disk = auto\nwipe = yes\n");
        assert!(out.contains("Plan: install on /dev/vda (10 GiB"), "{out}");
        assert!(out.contains("Dry run: nothing was changed."), "{out}");
    }

    #[test]
    fn interactive_refuses_small_and_strata_disks_until_told_to_wipe() {
        let m = Machine::with_installed_disk(4096);
        m.fake.disk("vdb", "253:16", 2 * GIB);
        let file = m.media.path().join("answers.conf");
        std::fs::write(&file, "hostname = store1\n").unwrap();
        let opts = InstallOptions {
            mode: Mode::Interactive,
            terminal: true,
            dry_run: true,
            ..plain_options(&m, file)
        };
        let typed = "vdb\nvda\nno\nvda\nwipe\n\n\n\n";
        let mut out = Vec::new();
        install(&opts, &mut typed.as_bytes(), &mut out).unwrap();
        let out = String::from_utf8(out).unwrap();
        for shown in [
            "/dev/vda (10 GiB QEMU HARDDISK): holds a Strata volume group (physical volume \
             label on vda4); choosing it asks whether to replace it",
            "Disk /dev/vdb is too small: 2 GiB; Strata needs at least 8 GiB",
            "Type 'wipe' to go on: ",
            "Host name [store1]: ",
            "Plan: install on /dev/vda (10 GiB",
            "Dry run: nothing was changed.",
        ] {
            assert!(out.contains(shown), "{shown:?} not in {out}");
        }
        // Asked twice whether to wipe: "no" went back to the disk question.
        assert_eq!(out.matches("Type 'wipe' to go on: ").count(), 2, "{out}");
        assert_eq!(out.matches("Install on disk [vda]: ").count(), 3, "{out}");
    }

    fn plain_options(m: &Machine, answers: PathBuf) -> InstallOptions {
        InstallOptions {
            media: m.media.path().to_path_buf(),
            source_root: m.media.path().join("no-root"),
            target_mount: m.media.path().join("no-target"),
            token_mount: m.media.path().join("no-token"),
            after_file: None,
            view: m.fake.view.clone(),
            answers: AnswerSources {
                media_file: None,
                cmdline: None,
                explicit_file: Some(answers),
            },
            mode: Mode::Auto,
            terminal: false,
            dry_run: false,
        }
    }
}

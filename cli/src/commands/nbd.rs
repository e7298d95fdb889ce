//! `strata nbd serve`: one export from the command line, over NBD (the `strata-nbd` crate).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use strata_nbd::open::{open_export, OpenSettings, BACKUP_PREFIX};
use strata_nbd::{Access, ExportRegistry, Fingerprint, Limits, Listen, ServerConfig, TlsSettings};
use strata_storage::format::ImageFormat;
use strata_storage::source::LV_PREFIX;
use strata_storage::util::format_size;

#[derive(Debug, Subcommand)]
pub enum NbdCommand {
    /// Serve one volume, snapshot, image or backup snapshot until interrupted.
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// What to export: `lv:VG/NAME` (a volume or snapshot), `backup:ID[/TIME]` (a backup
    /// snapshot, read-only, read lazily), or an image file.
    source: String,
    /// TCP address to listen on (repeatable; default 127.0.0.1:10809 unless --unix is given).
    /// Addresses other than loopback need --tls-cert and --tls-key.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Vec<std::net::SocketAddr>,
    /// Unix socket to listen on.
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// Export read-only.
    #[arg(long)]
    read_only: bool,
    /// The export's name (default: VG/NAME for volumes, the file name for images, `backup`
    /// for backups). It is also the default export, reached with an empty name.
    #[arg(long)]
    name: Option<String>,
    /// Use a random secret export name instead (printed; never listed; no default export).
    #[arg(long, conflicts_with = "name")]
    secret_name: bool,
    /// The image's format (probed when absent).
    #[arg(long, value_name = "raw|qcow2|vmdk")]
    format: Option<ImageFormat>,
    /// The datastore holding `backup:` snapshots (default DATA/datastore).
    #[arg(long, value_name = "DIR")]
    datastore: Option<PathBuf>,
    /// Server certificate chain (PEM) for TLS (NBD_OPT_STARTTLS).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA certificate(s) (PEM) that client certificates must chain to.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// Admit only TLS clients presenting this certificate (PEM file; repeatable). Needs
    /// --tls-ca.
    #[arg(long, value_name = "FILE", requires = "tls_ca")]
    allow_cert: Vec<PathBuf>,
    /// Admit only TLS clients whose certificate has this SHA-256 fingerprint (repeatable).
    #[arg(long, value_name = "HEX", requires = "tls_ca")]
    allow_fingerprint: Vec<String>,
    /// Most connections at once.
    #[arg(long, default_value_t = 64)]
    max_connections: usize,
}

pub fn run(cmd: NbdCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        NbdCommand::Serve(a) => serve(a),
    }
}

fn default_name(source: &str) -> String {
    if let Some(lv) = source.strip_prefix(LV_PREFIX) {
        return lv.to_string();
    }
    if source.starts_with(BACKUP_PREFIX) {
        return "backup".into();
    }
    PathBuf::from(source)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".into())
}

fn secret_name() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no random bytes: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn serve(a: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut allowed = BTreeSet::new();
    for f in &a.allow_cert {
        allowed.insert(Fingerprint::of_pem_file(f)?);
    }
    for f in &a.allow_fingerprint {
        allowed.insert(Fingerprint::parse(f)?);
    }
    let (name, access) = if a.secret_name {
        if !allowed.is_empty() {
            bail!("--secret-name and a certificate allow-list exclude each other");
        }
        (secret_name()?, Access::SecretName)
    } else if !allowed.is_empty() {
        (
            a.name.clone().unwrap_or_else(|| default_name(&a.source)),
            Access::ClientCertificates(allowed),
        )
    } else {
        (
            a.name.clone().unwrap_or_else(|| default_name(&a.source)),
            Access::Open,
        )
    };
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => Some(TlsSettings::from_files(c, k, a.tls_ca.as_deref())?),
        _ => None,
    };
    let mut settings = OpenSettings::new(&super::data_dir());
    settings.read_only = a.read_only;
    settings.format = a.format;
    settings.datastore = a.datastore.clone();
    let config = open_export(&name, &a.source, &settings, access.clone())
        .with_context(|| format!("opening {}", a.source))?;
    let registry = ExportRegistry::new();
    let export = registry.add(config)?;
    if access != Access::SecretName {
        registry.set_default(Some(&name))?;
    }
    let mut listen: Vec<Listen> = a.listen.iter().copied().map(Listen::Tcp).collect();
    if let Some(p) = &a.unix {
        listen.push(Listen::Unix(p.clone()));
    }
    if listen.is_empty() {
        listen.push(Listen::Tcp(([127, 0, 0, 1], 10809).into()));
    }
    let limits = Limits {
        max_connections: a.max_connections.max(1),
        ..Limits::default()
    };
    let server = strata_nbd::start(
        ServerConfig {
            listen,
            tls,
            limits,
        },
        registry,
    )?;
    super::interrupt::install();
    let info = export.info();
    println!(
        "Serving {} ({}, {}) as NBD export '{}'",
        info.description,
        format_size(info.size),
        if info.read_only {
            "read-only"
        } else {
            "read-write"
        },
        name
    );
    let scheme = if a.tls_cert.is_some() { "nbds" } else { "nbd" };
    for l in server.addrs() {
        match l {
            Listen::Tcp(addr) => println!("  {scheme}://{addr}/{name}"),
            Listen::Unix(p) => println!("  {scheme}+unix:///{name}?socket={}", p.display()),
        }
    }
    // Wait for Ctrl-C or SIGTERM; the handler only sets a flag.
    while !super::interrupt::requested() {
        std::thread::sleep(Duration::from_millis(200));
    }
    if !server.stop(Duration::from_secs(30)) {
        bail!("clients' requests did not finish within 30 s of the stop");
    }
    Ok(ExitCode::SUCCESS)
}

//! `strata serve` and `strata token …`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use std::time::Duration;

use clap::{Args, Subcommand};

use super::Output;
use strata_api::server::limits::parse_duration;
use strata_api::server::{HttpLimits, Transport};
use strata_service::bootstrap::{self, ApplianceConfig, BootstrapOptions};
use strata_service::exports::NbdSettings;
use strata_service::server_paths::ServerPaths;
use strata_service::sessions::SessionSettings;
use strata_service::tls::{file_fingerprint, ApplianceTls, CertificateFiles};
use strata_service::{DataDir, Service};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address and port to listen on (HTTPS).
    #[arg(long, default_value = "127.0.0.1:8006")]
    listen: SocketAddr,
    /// Serve plain HTTP instead of HTTPS; only on a loopback address.
    #[arg(long)]
    http: bool,
    /// Serve plain HTTP on any address: tokens and data cross the network unencrypted.
    #[arg(long)]
    insecure_http: bool,
    /// PEM certificate chain to present instead of the appliance's own (DATA/tls/server.pem).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    #[command(flatten)]
    limits: LimitArgs,
    /// Address of the NBD server for exports (repeatable; default 127.0.0.1:10809). It starts
    /// with the first export; plain NBD only on loopback, TLS with the API's certificate.
    #[arg(long = "nbd-listen", value_name = "ADDR:PORT")]
    nbd_listen: Vec<SocketAddr>,
    /// A Unix socket for the NBD server, besides its TCP addresses.
    #[arg(long = "nbd-unix", value_name = "PATH")]
    nbd_unix: Option<std::path::PathBuf>,
    /// The CA that NBD clients' certificates must chain to (for exports limited to client
    /// certificates).
    #[arg(long = "nbd-client-ca", value_name = "FILE")]
    nbd_client_ca: Option<std::path::PathBuf>,
    /// A folder whose files API requests may name as import sources, kernels and initrds,
    /// besides DATA/import (repeatable). Paths elsewhere are refused with 403.
    #[arg(long = "import-dir", value_name = "DIR")]
    import_dirs: Vec<std::path::PathBuf>,
    #[command(flatten)]
    setup: SetupArgs,
    #[command(flatten)]
    ui: UiArgs,
}

/// The web UI's sessions and the dashboard's usage history.
#[derive(Debug, Args)]
pub struct UiArgs {
    /// How long a web UI session lasts at most after signing in.
    #[arg(long, default_value = "12h", value_parser = parse_duration)]
    session_lifetime: Duration,
    /// A web UI session ends after this long without a request.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    session_idle: Duration,
    /// Time between samples of storage usage (the dashboard's graphs and "estimated full").
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    usage_interval: Duration,
}

/// Bounds on slow and greedy clients.
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// Time a client has to send a request's headers (and finish the TLS handshake).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    header_timeout: Duration,
    /// Longest pause allowed in a request body.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    body_idle_timeout: Duration,
    /// Time a whole upload may take.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    upload_deadline: Duration,
    /// Largest upload accepted; a larger declared Content-Length gets 413 at once.
    #[arg(long, default_value = "4T")]
    max_upload: String,
    /// Connections served at once.
    #[arg(long, default_value_t = 512)]
    max_connections: usize,
    /// Time running jobs and open requests get to end when the server stops.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    shutdown_grace: Duration,
}

impl LimitArgs {
    fn limits(&self) -> anyhow::Result<HttpLimits> {
        Ok(HttpLimits {
            header_timeout: self.header_timeout,
            body_idle_timeout: self.body_idle_timeout,
            upload_deadline: self.upload_deadline,
            max_upload: strata_storage::util::parse_size(&self.max_upload)?,
            max_connections: self.max_connections.max(1),
            shutdown_grace: self.shutdown_grace,
        })
    }
}

/// How an empty data directory is set up (the embedded default).
#[derive(Debug, Args)]
pub struct SetupArgs {
    /// Device or partition for the default volume group (default: a sparse file in the data
    /// directory).
    #[arg(long, value_name = "DEVICE")]
    pv: Option<std::path::PathBuf>,
    /// Size of the sparse file backing the default volume group.
    #[arg(long, default_value = "32G", value_name = "SIZE")]
    pv_size: String,
}

impl SetupArgs {
    fn options(&self) -> anyhow::Result<BootstrapOptions> {
        Ok(BootstrapOptions {
            pv: self.pv.clone(),
            pv_file_size: strata_storage::util::parse_size(&self.pv_size)?,
        })
    }
}

#[derive(Debug, Args)]
pub struct InitArgs {
    #[command(flatten)]
    setup: SetupArgs,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; its secret is printed once.
    Create {
        /// Name of the token.
        name: String,
        /// The token may manage tokens too (create, list, revoke through the API).
        #[arg(long)]
        admin: bool,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// List tokens (never their secrets).
    List {
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Revoke a token by id or name.
    Revoke {
        /// Token id or name.
        id: String,
    },
}

/// Sets up the embedded default if needed and reports what was made.
fn setup(data: &DataDir, args: &SetupArgs) -> anyhow::Result<ApplianceConfig> {
    let (cfg, created) = bootstrap::ensure_default(data, &args.options()?)?;
    if created {
        if let (Some(vg), Some(pool), Some(pv)) =
            (&cfg.volume_group, &cfg.thin_pool, &cfg.physical_volume)
        {
            println!("Set up volume group {vg} with thin pool {vg}/{pool} on {pv}");
        }
    }
    Ok(cfg)
}

pub fn init(a: InitArgs, data: DataDir) -> anyhow::Result<ExitCode> {
    let cfg = setup(&data, &a.setup)?;
    let svc = Service::open(data)?;
    let token = if svc.tokens.is_empty()? {
        Some(svc.tokens.create("admin", true)?.1)
    } else {
        None
    };
    match a.output {
        Output::Json => println!("{}", serde_json::json!({"config": cfg, "token": token})),
        Output::Human => {
            if let Some(t) = token {
                println!("Created the first API token (shown only now; keep it):");
                println!("  {t}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Takes the data directory's server lock (`DATA/serve.lock`, flock) for this process's
/// lifetime: a second server on the same data directory would share its jobs and images and
/// remove the staging files of the first one's running jobs as leftovers.
fn lock_data_dir(data: &DataDir) -> anyhow::Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    data.ensure()?;
    let path = data.root().join("serve.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("Opening {}: {e}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        anyhow::bail!(
            "Another strata serve (process {}) is using the data directory {}",
            holder.trim(),
            data.root().display()
        );
    }
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    Ok(file)
}

pub fn serve(a: ServeArgs, data: DataDir) -> anyhow::Result<ExitCode> {
    let _lock = lock_data_dir(&data)?;
    setup(&data, &a.setup)?;
    let mut import = vec![data.import_dir()];
    for d in &a.import_dirs {
        if !d.is_absolute() || !d.is_dir() {
            anyhow::bail!(
                "--import-dir {} must be an existing folder given by its absolute path",
                d.display()
            );
        }
        import.push(d.clone());
    }
    let limits = a.limits.limits()?;
    let transport = transport(&a, &data)?;
    let listener = std::net::TcpListener::bind(a.listen)
        .map_err(|e| anyhow::anyhow!("Cannot listen on {}: {e}", a.listen))?;
    listener.set_nonblocking(true)?;
    let svc = Arc::new(
        Service::open(data.clone())?
            .with_server_paths(ServerPaths::Under(import))
            .with_sessions(SessionSettings {
                lifetime: a.ui.session_lifetime,
                idle: a.ui.session_idle,
            }),
    );
    svc.remove_leftovers()?;
    svc.start_usage_sampler(a.ui.usage_interval.max(Duration::from_secs(1)))?;
    svc.enable_exports(nbd_settings(&a, &data)?)?;
    // Live restores first: an adopted VM's disks may be volumes under live restore.
    for volume in svc.resume_restores() {
        println!("Resumed the live restore of {volume}");
    }
    for name in svc.adopt_vms()? {
        println!("Adopted running VM {name}");
    }
    if svc.tokens.is_empty()? {
        let (_, token) = svc.tokens.create("admin", true)?;
        println!("Created the first API token (shown only now; keep it):");
        println!("  {token}");
        println!("Use it as: Authorization: Bearer {token}");
    }
    println!("Data directory: {}", data.root().display());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        strata_api::server::serve(svc, listener, transport, limits).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Where the NBD server listens and the certificate it presents: the one given for HTTPS, else
/// the appliance's own.
fn nbd_settings(a: &ServeArgs, data: &DataDir) -> anyhow::Result<NbdSettings> {
    let mut listen: Vec<strata_nbd::Listen> = a
        .nbd_listen
        .iter()
        .copied()
        .map(strata_nbd::Listen::Tcp)
        .collect();
    if listen.is_empty() {
        listen.push(strata_nbd::Listen::Tcp(SocketAddr::from((
            [127, 0, 0, 1],
            10809,
        ))));
    }
    if let Some(p) = &a.nbd_unix {
        listen.push(strata_nbd::Listen::Unix(p.clone()));
    }
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(cert), Some(key)) => CertificateFiles {
            cert: cert.clone(),
            key: key.clone(),
        },
        _ => {
            let tls = ApplianceTls::in_data_dir(data.root());
            tls.ensure(&[])?;
            tls.server_files()
        }
    };
    Ok(NbdSettings {
        listen,
        tls: Some(tls),
        client_ca: a.nbd_client_ca.clone(),
    })
}

/// HTTPS with the given or the appliance's own certificate (made on first start), or plain
/// HTTP where that was asked for and is allowed. Prints what a client needs to trust it.
fn transport(a: &ServeArgs, data: &DataDir) -> anyhow::Result<Transport> {
    if a.http || a.insecure_http {
        if !a.listen.ip().is_loopback() && !a.insecure_http {
            anyhow::bail!(
                "--http serves plain HTTP on loopback addresses only; {} is not one (serve \
                 HTTPS, the default, or pass --insecure-http to send tokens and data \
                 unencrypted)",
                a.listen
            );
        }
        if !a.listen.ip().is_loopback() {
            tracing::warn!(listen = %a.listen, "serving plain HTTP on a network address");
            eprintln!(
                "WARNING: plain HTTP on {}: API tokens and disk data cross the network \
                 unencrypted",
                a.listen
            );
        }
        return Ok(Transport::Plain);
    }
    let files = match (&a.tls_cert, &a.tls_key) {
        (Some(cert), Some(key)) => CertificateFiles {
            cert: cert.clone(),
            key: key.clone(),
        },
        _ => {
            let tls = ApplianceTls::in_data_dir(data.root());
            let names = if a.listen.ip().is_unspecified() {
                Vec::new()
            } else {
                vec![a.listen.ip().to_string()]
            };
            if tls.ensure(&names)? {
                println!(
                    "Made the appliance's TLS certificate in {}",
                    tls.dir.display()
                );
            }
            println!("CA certificate: {}", tls.ca_cert().display());
            tls.server_files()
        }
    };
    let cfg = strata_api::server::listen::server_config(&files)?;
    println!(
        "TLS certificate SHA-256 fingerprint: {}",
        file_fingerprint(&files.cert)?
    );
    Ok(Transport::Tls(cfg))
}

pub fn token(cmd: TokenCommand, data: DataDir) -> anyhow::Result<ExitCode> {
    let svc = Service::open(data)?;
    match cmd {
        TokenCommand::Create {
            name,
            admin,
            output,
        } => {
            let (info, token) = svc.tokens.create(&name, admin)?;
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"id": info.id, "name": info.name, "token": token})
                ),
                Output::Human => println!("{token}"),
            }
        }
        TokenCommand::List { output } => {
            let list = svc.tokens.list()?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&list)?),
                Output::Human => {
                    println!("{:<10} {:<24} CREATED", "ID", "NAME");
                    for t in list {
                        println!("{:<10} {:<24} {}", t.id, t.name, t.created);
                    }
                }
            }
        }
        TokenCommand::Revoke { id } => {
            let t = svc.tokens.revoke(&id)?;
            println!("Revoked token {} ({})", t.id, t.name);
        }
    }
    Ok(ExitCode::SUCCESS)
}

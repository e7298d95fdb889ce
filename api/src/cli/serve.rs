//! `strata serve` and `strata token …`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Subcommand};

use super::Output;
use crate::service::bootstrap::{self, ApplianceConfig, BootstrapOptions};
use crate::service::server_paths::ServerPaths;
use crate::service::{DataDir, Service};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address and port to listen on.
    #[arg(long, default_value = "127.0.0.1:8006")]
    listen: SocketAddr,
    /// A folder whose files API requests may name as import sources, kernels and initrds,
    /// besides DATA/import (repeatable). Paths elsewhere are refused with 403.
    #[arg(long = "import-dir", value_name = "DIR")]
    import_dirs: Vec<std::path::PathBuf>,
    #[command(flatten)]
    setup: SetupArgs,
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
    let svc = Arc::new(Service::open(data.clone())?.with_server_paths(ServerPaths::Under(import)));
    svc.remove_leftovers()?;
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
    rt.block_on(crate::server::serve(svc, a.listen))?;
    Ok(ExitCode::SUCCESS)
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

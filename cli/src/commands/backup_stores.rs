//! `strata backup init` (a local or an S3 datastore), `strata backup key …` and `strata backup
//! sync`: making datastores, their encryption keys, and copies between datastores.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use strata_backup::Datastore;
use strata_storage::util::format_size;

use super::backup::{with_key, Bar, KeyArg, StoreArg};
use super::Output;

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Make a new key file (AES-256-GCM datastore key), optionally protected by a passphrase
    /// (Argon2id). Keep a copy away from the datastore: without it nothing can be restored.
    Create {
        /// The new key file.
        file: PathBuf,
        /// Protect the key with the passphrase in this file (first line).
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
    /// Show a key file's fingerprint.
    Show {
        /// The key file.
        file: PathBuf,
        /// Its passphrase, if it has one.
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct S3Args {
    /// Keep the datastore's chunks in packs on this S3 endpoint (https://…); the --store folder
    /// becomes its local cache.
    #[arg(long, value_name = "URL")]
    s3: Option<String>,
    /// Bucket.
    #[arg(long, requires = "s3")]
    bucket: Option<String>,
    /// Key prefix inside the bucket.
    #[arg(long, requires = "s3", default_value = "")]
    prefix: String,
    /// Access key id.
    #[arg(long, requires = "s3")]
    access_key: Option<String>,
    /// File holding the secret access key (kept where it is: the datastore records its path).
    #[arg(long, requires = "s3", value_name = "FILE")]
    secret_file: Option<PathBuf>,
    /// Region.
    #[arg(long, requires = "s3", default_value = "us-east-1")]
    region: String,
    /// Path-style requests (endpoint/bucket/key), as radosgw and MinIO usually need.
    #[arg(long, requires = "s3")]
    path_style: bool,
    /// Pack size target.
    #[arg(long, requires = "s3", default_value = "16M")]
    pack_size: String,
    /// Bound of the local chunk cache.
    #[arg(long, requires = "s3", default_value = "1G")]
    cache_size: String,
    /// Allow an S3 datastore without encryption.
    #[arg(long, requires = "s3")]
    insecure_plaintext: bool,
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    /// Source datastore folder.
    #[arg(long)]
    from: PathBuf,
    /// Key file of the source, if encrypted.
    #[arg(long, value_name = "FILE")]
    from_key: Option<PathBuf>,
    /// Target datastore folder.
    #[arg(long)]
    to: PathBuf,
    /// Key file of the target, if encrypted.
    #[arg(long, value_name = "FILE")]
    to_key: Option<PathBuf>,
    /// Passphrase of the key files (first line of this file).
    #[arg(long, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
    /// Only these snapshots: ID/TIME, a group ID, or a group prefix ending in '/'.
    #[arg(long = "snapshots")]
    snapshots: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// No progress bar.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    #[command(flatten)]
    store: StoreArg,
    /// Chunk size, a power of two from 64K to 16M (default 4M; 1M for an S3 datastore).
    #[arg(long)]
    chunk_size: Option<String>,
    #[command(flatten)]
    s3: S3Args,
}

/// Reads and unlocks a key file.
pub fn load_key(
    file: &std::path::Path,
    passphrase_file: Option<&std::path::Path>,
) -> anyhow::Result<strata_backup::crypt::CryptKey> {
    let bytes = strata_backup::store::read_bounded(file, strata_backup::crypt::MAX_KEY_FILE)
        .with_context(|| format!("Could not read key file {}", file.display()))?;
    let pass = passphrase_file.map(read_first_line).transpose()?;
    Ok(strata_backup::crypt::open_key_file(
        &bytes,
        pass.as_deref().map(str::as_bytes),
        &format!("key file {}", file.display()),
    )?)
}

pub fn read_first_line(p: &std::path::Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(p).with_context(|| format!("Could not read {}", p.display()))?;
    Ok(text.lines().next().unwrap_or("").to_string())
}

pub(super) fn init(a: InitArgs) -> anyhow::Result<ExitCode> {
    let key = match &a.store.key.key {
        Some(f) => Some(load_key(f, a.store.key.passphrase_file.as_deref())?),
        None => None,
    };
    let default_cs = if a.s3.s3.is_some() {
        strata_backup::remote::DEFAULT_REMOTE_CHUNK_SIZE as u64
    } else {
        strata_backup::store::DEFAULT_CHUNK_SIZE as u64
    };
    let cs = match &a.chunk_size {
        Some(t) => strata_storage::util::parse_size(t)?,
        None => default_cs,
    };
    let chunk_size =
        u32::try_from(cs).map_err(|_| anyhow::anyhow!("Chunk size {cs} is too large"))?;
    let opts = strata_backup::store::CreateOptions {
        chunk_size,
        key,
        key_file: None,
    };
    let store = match &a.s3.s3 {
        None => Datastore::create_with(&a.store.store, &opts)?,
        Some(url) => {
            let s = &a.s3;
            let need = |v: &Option<String>, what: &str| {
                v.clone()
                    .ok_or_else(|| anyhow::anyhow!("--s3 needs {what}"))
            };
            let secret_file = s
                .secret_file
                .clone()
                .ok_or_else(|| anyhow::anyhow!("--s3 needs --secret-file"))?;
            let secret_file = std::fs::canonicalize(&secret_file)
                .with_context(|| format!("Could not find {}", secret_file.display()))?;
            let spec = strata_backup::remote::RemoteSpec {
                kind: "s3".into(),
                s3: Some(strata_backup::s3::S3Config {
                    endpoint: url.clone(),
                    bucket: need(&s.bucket, "--bucket")?,
                    prefix: s.prefix.clone(),
                    region: s.region.clone(),
                    path_style: s.path_style,
                    access_key: need(&s.access_key, "--access-key")?,
                    secret_key: String::new(),
                }),
                secret_file: Some(secret_file),
                dir: None,
                pack_size: strata_storage::util::parse_size(&s.pack_size)?,
                cache_bytes: strata_storage::util::parse_size(&s.cache_size)?,
            };
            Datastore::create_remote(&a.store.store, spec, &opts, s.insecure_plaintext)?
        }
    };
    println!(
        "Created datastore {}{}",
        store.describe(),
        store
            .encryption()
            .map(|f| format!(", encrypted with key {f}"))
            .unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

pub(super) fn key_command(k: KeyCommand) -> anyhow::Result<ExitCode> {
    match k {
        KeyCommand::Create {
            file,
            passphrase_file,
        } => create_key_file(&file, passphrase_file.as_deref()),
        KeyCommand::Show {
            file,
            passphrase_file,
        } => {
            let key = load_key(&file, passphrase_file.as_deref())?;
            println!("{}", key.fingerprint());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `key create`: a new key file, owner-only, never overwriting one.
pub fn create_key_file(
    file: &std::path::Path,
    passphrase_file: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    {
        {
            if file.exists() {
                bail!(
                    "{} exists already; a key file is never overwritten",
                    file.display()
                );
            }
            let pass = passphrase_file.map(read_first_line).transpose()?;
            if pass.as_deref() == Some("") {
                bail!("The passphrase file's first line is empty");
            }
            let (bytes, key) =
                strata_backup::crypt::create_key_file(pass.as_deref().map(str::as_bytes))?;
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(file)
                .with_context(|| format!("Could not create {}", file.display()))?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            println!("Created key {} in {}", key.fingerprint(), file.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn sync(a: SyncArgs) -> anyhow::Result<ExitCode> {
    let open = |dir: &PathBuf, key: &Option<PathBuf>| -> anyhow::Result<Datastore> {
        let s = Datastore::open(dir)?;
        with_key(
            s,
            &KeyArg {
                key: key.clone(),
                passphrase_file: a.passphrase_file.clone(),
            },
        )
    };
    let from = open(&a.from, &a.from_key)?;
    let to = open(&a.to, &a.to_key)?;
    let bar = Bar::new(a.quiet || a.output == Output::Json);
    let stats = strata_backup::sync::sync(&from, &to, &a.snapshots, &bar)?;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&stats)?),
        Output::Human => {
            for s in &stats.copied {
                println!("copied {s}");
            }
            println!(
                "{} snapshots copied, {} present; {} chunks ({}) transferred, {} present{}",
                stats.copied.len(),
                stats.skipped,
                stats.chunks_transferred,
                format_size(stats.bytes_transferred),
                stats.chunks_present,
                if stats.rekeyed {
                    " (re-encoded for the target's keying)"
                } else {
                    ""
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

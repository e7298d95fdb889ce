//! `strata backups store …` and `strata backups sync`: the appliance's backup datastores (local
//! folders, S3 buckets) and copies between them. (`strata backups key …` is `strata backup key
//! …`: keys are made and read on this machine.)

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::json;

use super::print::{print_array, print_object, Column};
use super::{run_job, Api, Common, JobArgs};
use crate::commands::backup_stores::read_first_line;

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Add a datastore: a local folder on the server (--path), or an S3 bucket (--s3 …),
    /// encrypted with --key (mandatory for S3 unless --insecure-plaintext).
    Add(Box<AddArgs>),
    /// List the datastores.
    List {
        #[command(flatten)]
        common: Common,
    },
    /// Forget a datastore (its data stays in its folder or bucket).
    Remove {
        /// Its name.
        name: String,
    },
}

/// `backups store add`.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// Its name.
    pub name: String,
    /// A folder on the server.
    #[arg(long, conflicts_with = "s3")]
    pub path: Option<String>,
    /// S3 endpoint URL (https://…).
    #[arg(long, value_name = "URL")]
    pub s3: Option<String>,
    /// Bucket.
    #[arg(long, requires = "s3")]
    pub bucket: Option<String>,
    /// Key prefix in the bucket.
    #[arg(long, requires = "s3")]
    pub prefix: Option<String>,
    /// Access key id.
    #[arg(long, requires = "s3")]
    pub access_key: Option<String>,
    /// File holding the secret access key (first line); sent to the server, kept there
    /// owner-only.
    #[arg(long, requires = "s3", value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// Region.
    #[arg(long, requires = "s3")]
    pub region: Option<String>,
    /// Path-style requests (endpoint/bucket/key).
    #[arg(long, requires = "s3")]
    pub path_style: bool,
    /// Key file (`strata backups key create`); the server keeps an unprotected copy.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// The key file's passphrase (first line of this file).
    #[arg(long, value_name = "FILE", requires = "key")]
    pub passphrase_file: Option<PathBuf>,
    /// Allow an S3 datastore without encryption.
    #[arg(long, requires = "s3")]
    pub insecure_plaintext: bool,
    /// Chunk size of a new datastore (default 4M local, 1M S3).
    #[arg(long)]
    pub chunk_size: Option<String>,
    /// Pack size target (S3; default 16M).
    #[arg(long, requires = "s3")]
    pub pack_size: Option<String>,
    /// Bound of the local chunk cache (S3; default 1G).
    #[arg(long, requires = "s3")]
    pub cache_size: Option<String>,
    #[command(flatten)]
    pub common: Common,
}

const STORE_COLUMNS: &[Column] = &[
    Column::text("NAME", "name"),
    Column::text("KIND", "kind"),
    Column::text("KEY", "encryption"),
    Column::text("SNAPSHOTS", "snapshots"),
    Column::text("LOCATION", "location"),
];

pub fn store(cmd: StoreCommand, api: &Api) -> anyhow::Result<ExitCode> {
    match cmd {
        StoreCommand::Add(add) => {
            let AddArgs {
                name,
                path,
                s3,
                bucket,
                prefix,
                access_key,
                secret_file,
                region,
                path_style,
                key,
                passphrase_file,
                insecure_plaintext,
                chunk_size,
                pack_size,
                cache_size,
                common,
            } = *add;
            if path.is_none() && s3.is_none() {
                bail!("Give --path DIR or --s3 URL");
            }
            let secret_key = secret_file
                .as_deref()
                .map(read_first_line)
                .transpose()?
                .map(|s| s.trim().to_string());
            if s3.is_some() && secret_key.is_none() {
                bail!("--s3 needs --secret-file");
            }
            let key_text = match &key {
                Some(k) => Some(
                    std::fs::read_to_string(k)
                        .with_context(|| format!("Could not read {}", k.display()))?,
                ),
                None => None,
            };
            // Read as `strata backup key create` reads it (the line as it is).
            let passphrase = passphrase_file
                .as_deref()
                .map(read_first_line)
                .transpose()?;
            let body = json!({
                "name": name, "path": path, "s3": s3, "bucket": bucket, "prefix": prefix,
                "access_key": access_key, "secret_key": secret_key, "region": region,
                "path_style": path_style, "key": key_text, "passphrase": passphrase,
                "insecure_plaintext": insecure_plaintext, "chunk_size": chunk_size,
                "pack_size": pack_size, "cache_size": cache_size,
            });
            let v = api.ok("POST", "/api/backups/stores", Some(&body))?;
            print_object(&v, common.output, "");
        }
        StoreCommand::List { common } => {
            let v = api.ok("GET", "/api/backups/stores", None)?;
            print_array(&v, common.output, STORE_COLUMNS);
        }
        StoreCommand::Remove { name } => {
            api.ok(
                "DELETE",
                &format!("/api/backups/stores/{}", super::client::encode(&name)),
                None,
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn sync(
    api: &Api,
    from: String,
    to: String,
    snapshots: Vec<String>,
    job: &JobArgs,
) -> anyhow::Result<ExitCode> {
    run_job(
        api,
        "/api/backups/sync",
        &json!({"from": from, "to": to, "snapshots": snapshots}),
        job,
    )
}

//! `strata exports …`: NBD exports of the appliance's volumes, snapshots, images and backup
//! snapshots (served by `strata serve`).

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

use super::print::{print_array, print_object, Column};
use super::{encode, Api, Common};

#[derive(Debug, Subcommand)]
pub enum ExportsCommand {
    /// List exports and their clients.
    List {
        #[command(flatten)]
        common: Common,
    },
    /// Show one export.
    Show {
        /// Export id.
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Export SOURCE over NBD: lv:VG/NAME (a volume or snapshot), image:NAME, or
    /// backup:ID[/TIME]. An exported volume is held (no resize, remove or other writer).
    Add {
        /// What to export.
        source: String,
        /// The export's name (default: from the source).
        #[arg(long, conflicts_with = "secret")]
        name: Option<String>,
        /// Refuse writes.
        #[arg(long)]
        read_only: bool,
        /// A secret name made by the server, shown once: only clients that know it connect.
        #[arg(long)]
        secret: bool,
        /// Only TLS clients with this certificate (SHA-256 fingerprint; repeatable).
        #[arg(long = "allow-cert", value_name = "SHA256", conflicts_with = "secret")]
        allow_cert: Vec<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Stop an export; its clients are disconnected.
    Remove {
        /// Export id.
        id: String,
    },
}

const EXPORT_COLUMNS: &[Column] = &[
    Column::text("ID", "id"),
    Column::text("SOURCE", "source"),
    Column::text("ACCESS", "access"),
    Column::size("SIZE", "size"),
    Column::text("URI", "uri"),
];

/// Runs an `exports` command.
pub fn exports(cmd: ExportsCommand, api: &Api) -> anyhow::Result<ExitCode> {
    match cmd {
        ExportsCommand::List { common } => {
            let v = api.ok("GET", "/api/exports", None)?;
            print_array(&v, common.output, EXPORT_COLUMNS);
        }
        ExportsCommand::Show { id, common } => {
            let v = api.ok("GET", &format!("/api/exports/{}", encode(&id)), None)?;
            print_object(&v, common.output, "");
        }
        ExportsCommand::Add {
            source,
            name,
            read_only,
            secret,
            allow_cert,
            common,
        } => {
            let access = if secret {
                json!({"mode": "secret"})
            } else if !allow_cert.is_empty() {
                json!({"mode": "certificates", "fingerprints": allow_cert})
            } else {
                json!({"mode": "open"})
            };
            let body = json!({"source": source, "name": name, "read_only": read_only,
                              "access": access});
            let v = api.ok("POST", "/api/exports", Some(&body))?;
            let what = match (&v["uri"], &v["name"]) {
                (serde_json::Value::String(uri), serde_json::Value::String(n)) if secret => {
                    format!("Exported {source} as {uri}{n} (the name is secret: shown only now)")
                }
                (serde_json::Value::String(uri), _) => format!("Exported {source} at {uri}"),
                _ => format!("Exported {source}"),
            };
            print_object(&v, common.output, &what);
        }
        ExportsCommand::Remove { id } => {
            api.ok("DELETE", &format!("/api/exports/{}", encode(&id)), None)?;
            println!("Removed export {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

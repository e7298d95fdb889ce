//! The first API token: created in the installed system's data directory, then handed to the
//! operator: printed on the console, or written with an installation report to a FAT volume
//! (a USB stick) chosen by its label, which is what an unattended installation needs — the
//! token must leave the machine without anyone at its console, and without appearing in a
//! console log that others may read.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::error::{InstallError, InstallResult};
use super::run::run;
use strata_service::{DataDir, Service};

/// File names written to the token volume.
pub const REPORT_FILE: &str = "strata-install.json";
/// The token alone, for scripts.
pub const TOKEN_FILE: &str = "strata-token.txt";
/// The API's TLS certificate fingerprint alone, for `--fingerprint`.
pub const FINGERPRINT_FILE: &str = "strata-fingerprint.txt";

/// What the operator learns at the end of an installation.
#[derive(Clone, Debug, Serialize)]
pub struct InstallReport {
    /// Host name.
    pub hostname: String,
    /// Where the API listens.
    pub listen: String,
    /// The disk installed on.
    pub disk: String,
    /// Strata's version.
    pub version: String,
    /// Seconds the installation took.
    pub install_seconds: f64,
    /// The default storage made: group, pool, physical volume, datastore.
    pub storage: String,
    /// Name of the first token.
    pub token_name: String,
    /// The first token: `Authorization: Bearer TOKEN`.
    pub token: String,
    /// SHA-256 fingerprint of the API's TLS certificate (clients pin it with --fingerprint).
    pub tls_fingerprint: String,
}

/// Makes the appliance's TLS certificate in the data directory `data_dir` (for `hostname`)
/// and returns its SHA-256 fingerprint.
pub fn create_certificate(data_dir: &Path, hostname: &str) -> InstallResult<String> {
    let tls = strata_service::tls::ApplianceTls::in_data_dir(data_dir);
    tls.ensure(&[hostname.to_string()])
        .and_then(|_| strata_service::tls::file_fingerprint(&tls.server_files().cert))
        .map_err(|e| InstallError::Token(format!("Making the TLS certificate: {e}")))
}

/// Creates the first token named `name` in the data directory `data_dir`.
pub fn create_first_token(data_dir: &Path, name: &str) -> InstallResult<String> {
    let svc =
        Service::open(DataDir::at(data_dir)).map_err(|e| InstallError::Token(e.to_string()))?;
    let (_, token) = svc
        .tokens
        .create(name, true)
        .map_err(|e| InstallError::Token(e.to_string()))?;
    Ok(token)
}

/// The device holding the FAT volume labelled `label` (busybox `findfs`).
pub fn find_vfat(label: &str) -> InstallResult<PathBuf> {
    let out = run("findfs", &[format!("LABEL={label}")])
        .map_err(|_| InstallError::NoTokenVolume(label.to_string()))?;
    Ok(PathBuf::from(out.trim()))
}

/// Writes the report and the token to the FAT volume on `dev`, mounted at `mount_at` for the
/// time it takes.
pub fn write_to_vfat(dev: &Path, mount_at: &Path, report: &InstallReport) -> InstallResult<()> {
    std::fs::create_dir_all(mount_at).map_err(|e| InstallError::io("Creating", mount_at, e))?;
    run(
        "mount",
        &[
            "-t",
            "vfat",
            &dev.to_string_lossy(),
            &mount_at.to_string_lossy(),
        ],
    )?;
    let written = write_report_files(mount_at, report);
    let _ = run("sync", &[] as &[&str]);
    let unmounted = run("umount", &[mount_at]);
    written?;
    unmounted?;
    Ok(())
}

fn write_report_files(dir: &Path, report: &InstallReport) -> InstallResult<()> {
    let json = serde_json::to_string_pretty(report).unwrap_or_default() + "\n";
    for (name, text) in [
        (REPORT_FILE, json),
        (TOKEN_FILE, format!("{}\n", report.token)),
        (FINGERPRINT_FILE, format!("{}\n", report.tls_fingerprint)),
    ] {
        let p = dir.join(name);
        let mut f = std::fs::File::create(&p).map_err(|e| InstallError::io("Creating", &p, e))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| InstallError::io("Writing", &p, e))?;
    }
    Ok(())
}

/// The token as printed on the console.
pub fn console_text(report: &InstallReport) -> String {
    format!(
        "First API token \"{name}\" (shown only now; keep it):\n  {token}\n\
         Use it as: Authorization: Bearer {token}\n\
         TLS certificate SHA-256 fingerprint: {fp}\n",
        name = report.token_name,
        token = report.token,
        fp = report.tls_fingerprint
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(token: String) -> InstallReport {
        InstallReport {
            hostname: "strata".into(),
            listen: "0.0.0.0:8006".into(),
            disk: "/dev/vda".into(),
            version: "0.1.0".into(),
            install_seconds: 1.5,
            storage: "pending".into(),
            token_name: "admin".into(),
            token,
            tls_fingerprint: "AB:CD".into(),
        }
    }

    #[test]
    fn first_token_authenticates_against_the_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let token = create_first_token(dir.path(), "admin").unwrap();
        let svc = Service::open(DataDir::at(dir.path())).unwrap();
        assert_eq!(svc.tokens.list().unwrap()[0].name, "admin");
        assert_eq!(
            svc.tokens.verify(&token).unwrap().name,
            "admin",
            "the token is accepted"
        );
        assert!(svc.tokens.verify("00000000.00").is_err());
        assert!(
            create_first_token(dir.path(), "admin").is_err(),
            "names are unique"
        );

        write_report_files(dir.path(), &report(token.clone())).unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(REPORT_FILE)).unwrap()).unwrap();
        assert_eq!(json["token"], token.as_str());
        assert_eq!(json["listen"], "0.0.0.0:8006");
        let plain = std::fs::read_to_string(dir.path().join(TOKEN_FILE)).unwrap();
        assert_eq!(plain.trim(), token);
        assert!(console_text(&report(token.clone())).contains(&format!("Bearer {token}")));
    }
}

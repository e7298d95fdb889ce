//! The appliance's own TLS certificate: made on first start (or by the installer) in
//! `DATA/tls/`, as Proxmox VE makes `pve-root-ca.pem` and `pve-ssl.pem`.
//!
//! ```text
//! DATA/tls/ca.pem       a CA of this appliance only (self-signed, 10 years)
//! DATA/tls/ca.key       its key (0600)
//! DATA/tls/server.pem   the server's certificate, signed by that CA, then the CA (2 years)
//! DATA/tls/server.key   its key (0600)
//! ```
//! Clients either pin the server certificate's SHA-256 fingerprint (printed by `strata serve`,
//! the way `proxmox-backup-client` pins one) or trust `ca.pem`. Certificates given with
//! `strata serve --tls-cert/--tls-key` replace the generated ones. Keys are ECDSA P-256 from
//! `rcgen` (on `ring`, the same provider rustls uses here).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{ServiceError, ServiceResult};

/// Days the appliance CA is valid.
const CA_DAYS: i64 = 3650;
/// Days the server certificate is valid.
const SERVER_DAYS: i64 = 730;

/// The certificate and key a server presents.
#[derive(Clone, Debug)]
pub struct CertificateFiles {
    /// PEM: the server certificate, then any chain.
    pub cert: PathBuf,
    /// PEM: its private key.
    pub key: PathBuf,
}

/// The generated files of a data directory's `tls/` folder.
#[derive(Clone, Debug)]
pub struct ApplianceTls {
    /// The folder.
    pub dir: PathBuf,
}

impl ApplianceTls {
    /// The TLS folder of the data directory `data_root`.
    pub fn in_data_dir(data_root: &Path) -> ApplianceTls {
        ApplianceTls {
            dir: data_root.join("tls"),
        }
    }

    /// The CA certificate clients may trust.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The server's certificate and key.
    pub fn server_files(&self) -> CertificateFiles {
        CertificateFiles {
            cert: self.dir.join("server.pem"),
            key: self.dir.join("server.key"),
        }
    }

    /// Makes the CA and the server certificate unless they exist; returns whether it made
    /// them. `names` are the host names and addresses the certificate is for (localhost and
    /// the loopback addresses are always included).
    pub fn ensure(&self, names: &[String]) -> ServiceResult<bool> {
        let files = self.server_files();
        if files.cert.is_file() && files.key.is_file() {
            return Ok(false);
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| ServiceError::internal(format!("Creating {}: {e}", self.dir.display())))?;
        let (ca_pem, ca_key_pem, server_pem, server_key_pem) = generate(names)?;
        // Keys first, owner-only; the certificate that makes the pair usable last.
        write_file(&self.dir.join("ca.key"), ca_key_pem.as_bytes(), 0o600)?;
        write_file(&self.ca_cert(), ca_pem.as_bytes(), 0o644)?;
        write_file(&files.key, server_key_pem.as_bytes(), 0o600)?;
        write_file(
            &files.cert,
            format!("{server_pem}{ca_pem}").as_bytes(),
            0o644,
        )?;
        Ok(true)
    }
}

fn generate(names: &[String]) -> ServiceResult<(String, String, String, String)> {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let err = |e: rcgen::Error| ServiceError::internal(format!("Making a TLS certificate: {e}"));
    let host = hostname();
    let now = time_now();
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("Strata appliance CA ({host})"));
    dn.push(DnType::OrganizationName, "Strata");
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = now - time::Duration::days(1);
    ca.not_after = now + time::Duration::days(CA_DAYS);
    let ca_key = KeyPair::generate().map_err(err)?;
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;

    let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    if !host.is_empty() {
        sans.push(host.clone());
    }
    for n in names {
        if !n.is_empty() && !sans.contains(n) {
            sans.push(n.clone());
        }
    }
    let mut server = CertificateParams::new(sans).map_err(err)?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        if host.is_empty() {
            "strata".into()
        } else {
            host
        },
    );
    dn.push(DnType::OrganizationName, "Strata");
    server.distinguished_name = dn;
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    server.not_before = now - time::Duration::days(1);
    server.not_after = now + time::Duration::days(SERVER_DAYS);
    let server_key = KeyPair::generate().map_err(err)?;
    let server_cert = server
        .signed_by(&server_key, &ca_cert, &ca_key)
        .map_err(err)?;
    Ok((
        ca_cert.pem(),
        ca_key.serialize_pem(),
        server_cert.pem(),
        server_key.serialize_pem(),
    ))
}

/// The rustls crypto provider of the server and the client: `ring`.
///
/// rustls marks its `ring` provider deprecated because it lacks the post-quantum key exchange
/// that its `aws-lc-rs` provider has. That provider builds a large C library with cmake, which
/// takes minutes on the appliance's build machines; the classical suites (ECDHE with X25519 or
/// P-256, AES-GCM, ChaCha20-Poly1305) are what clients of this API speak anyway.
#[allow(deprecated)]
pub fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// The SHA-256 fingerprint of a DER certificate, as `AB:CD:…` (the form `openssl x509
/// -fingerprint -sha256` and Proxmox print).
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The DER bytes of every certificate in a PEM file, in order.
pub fn read_pem_certificates(path: &Path) -> ServiceResult<Vec<Vec<u8>>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| ServiceError::BadRequest(format!("Reading {}: {e}", path.display())))?
        .collect();
    let certs =
        certs.map_err(|e| ServiceError::BadRequest(format!("Reading {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(ServiceError::BadRequest(format!(
            "{} holds no certificate",
            path.display()
        )));
    }
    Ok(certs.into_iter().map(|c| c.to_vec()).collect())
}

/// The fingerprint of the first certificate in a PEM file (the server's own).
pub fn file_fingerprint(path: &Path) -> ServiceResult<String> {
    Ok(fingerprint(&read_pem_certificates(path)?[0]))
}

/// Parses a fingerprint as given by a user: 32 bytes in hex, with or without colons.
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], String> {
    let hex: String = text.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "Invalid fingerprint {text:?}: expected 32 bytes in hex (AB:CD:…), the SHA-256 \
             fingerprint `strata serve` prints"
        ));
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> ServiceResult<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let ctx =
        |e: std::io::Error| ServiceError::internal(format!("Writing {}: {e}", path.display()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(ctx)?;
    f.write_all(bytes).map_err(ctx)?;
    f.sync_all().map_err(ctx)?;
    std::fs::rename(&tmp, path).map_err(ctx)?;
    strata_storage::format::raw::sync_parent_dir(path)?;
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_is_made_once_with_its_ca_and_a_stable_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let tls = ApplianceTls::in_data_dir(dir.path());
        assert!(tls.ensure(&["strata.example".into()]).unwrap());
        let fp = file_fingerprint(&tls.server_files().cert).unwrap();
        assert_eq!(fp.len(), 32 * 3 - 1);
        assert!(!tls.ensure(&[]).unwrap(), "made again");
        assert_eq!(file_fingerprint(&tls.server_files().cert).unwrap(), fp);
        let chain = read_pem_certificates(&tls.server_files().cert).unwrap();
        assert_eq!(chain.len(), 2, "server certificate and CA");
        assert_eq!(read_pem_certificates(&tls.ca_cert()).unwrap()[0], chain[1]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&tls.server_files().key)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(parse_fingerprint(&fp).unwrap().len(), 32);
        assert_eq!(
            parse_fingerprint(&fp.replace(':', "").to_lowercase()).unwrap(),
            parse_fingerprint(&fp).unwrap()
        );
        assert!(parse_fingerprint("AB:CD").is_err());
    }
}

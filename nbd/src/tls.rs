//! TLS for NBD through rustls (ring provider), set up from X.509 files the way QEMU's
//! `tls-creds-x509` objects use them: the server's certificate chain and key, and optionally a
//! CA whose certificates clients present. Clients (qemu-img, qemu-nbd, nbdinfo, nbdcopy, the
//! kernel's nbd-client through GnuTLS) upgrade with `NBD_OPT_STARTTLS`.
//!
//! With a client CA, a client certificate is asked for and, when presented, must chain to that
//! CA; exports with a certificate allow-list then also pin the certificate's SHA-256
//! ([`Fingerprint`]). Without a client CA no certificate is asked for, so such exports cannot be
//! configured (refused at start).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};

use crate::error::{NbdError, Result};

/// SHA-256 of a certificate's DER encoding.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of_der(der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(der).into())
    }

    /// The fingerprint of the first certificate in a PEM file.
    pub fn of_pem_file(path: &Path) -> Result<Fingerprint> {
        let certs = read_certs(path)?;
        Ok(Fingerprint::of_der(&certs[0]))
    }

    /// Parses 64 hex digits, with or without `:` between bytes.
    pub fn parse(text: &str) -> Result<Fingerprint> {
        let hex: String = text.chars().filter(|c| *c != ':').collect();
        let bad = || {
            NbdError::InvalidConfig(format!(
                "Certificate fingerprint '{text}': expected 64 hex digits (SHA-256)"
            ))
        };
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Fingerprint(out))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

fn tls_err(path: &Path, reason: impl fmt::Display) -> NbdError {
    NbdError::Tls {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_err(path, e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| tls_err(path, e))?;
    if certs.is_empty() {
        return Err(tls_err(path, "no certificate in the file"));
    }
    Ok(certs)
}

/// TLS settings of a server.
#[derive(Clone)]
pub struct TlsSettings {
    config: Arc<ServerConfig>,
    verifies_clients: bool,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("verifies_clients", &self.verifies_clients)
            .finish()
    }
}

impl TlsSettings {
    /// Loads the server's certificate chain and private key (PEM), and the CA that client
    /// certificates must chain to, if any.
    pub fn from_files(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<TlsSettings> {
        let chain = read_certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| tls_err(key, e))?;
        // ring, not aws-lc-rs: it builds with a C compiler alone (aws-lc-rs needs cmake and
        // minutes on two cores). Its provider is deprecated only for lacking post-quantum key
        // exchange, which the GnuTLS of QEMU and libnbd in Debian 12 do not offer either.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err(cert, e))?;
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in read_certs(ca)? {
                    roots.add(c).map_err(|e| tls_err(ca, e))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .allow_unauthenticated()
                        .build()
                        .map_err(|e| tls_err(ca, e))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(chain, key)
            .map_err(|e| tls_err(cert, e))?;
        Ok(TlsSettings {
            config: Arc::new(config),
            verifies_clients: client_ca.is_some(),
        })
    }

    /// Whether client certificates are asked for (a client CA was given).
    pub fn verifies_clients(&self) -> bool {
        self.verifies_clients
    }

    pub(crate) fn config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let f = Fingerprint::of_der(b"x");
        let text = f.to_string();
        assert_eq!(Fingerprint::parse(&text).unwrap(), f);
        let colons: Vec<String> = f.0.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(Fingerprint::parse(&colons.join(":")).unwrap(), f);
        assert!(Fingerprint::parse("abc").is_err());
        assert!(Fingerprint::parse(&"zz".repeat(32)).is_err());
        assert!(Fingerprint::parse(&"é".repeat(32)).is_err());
    }

    #[test]
    fn missing_or_empty_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = TlsSettings::from_files(&empty, &empty, None).unwrap_err();
        assert!(e.to_string().contains("empty.pem"), "{e}");
        let e = TlsSettings::from_files(&dir.path().join("none.pem"), &empty, None).unwrap_err();
        assert!(e.to_string().contains("none.pem"), "{e}");
    }
}

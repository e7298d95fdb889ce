//! Client-side encryption of a datastore: key files, AES-256-GCM for chunk blobs, keyed chunk ids
//! and keyed manifest signatures.
//!
//! A key is 32 random bytes (the master key). Everything else derives from it with BLAKE3's key
//! derivation (one context string per use), so no two uses share key material:
//! - the **chunk-id key**: a chunk's id is BLAKE3 *keyed* with it over the chunk's bytes, so the
//!   store (a bucket, a remote disk) learns nothing from ids — not even whether a known block is
//!   present, which an unkeyed hash of a public file would reveal;
//! - the **cipher key**: AES-256-GCM (RustCrypto's `aes-gcm`, a vetted AEAD; AES-NI where the
//!   CPU has it) over each blob's payload, a random 96-bit nonce per blob, the chunk id and blob
//!   header fields as associated data, so a blob moved to another id fails to open;
//! - the **signature key**: keyed BLAKE3 over a manifest (which names its index's keyed hash), so
//!   a store cannot swap indexes or edit manifests unnoticed;
//! - the **fingerprint**: the first 8 bytes of a derivation, shown as `ab:cd:…`, recorded in the
//!   datastore's marker and every manifest; it identifies a key without revealing it.
//!
//! This is the scheme of Proxmox Backup (AES-256-GCM chunks, keyed chunk digests, signed
//! manifests, a key fingerprint) and, in spirit, restic's (every blob authenticated-encrypted).
//!
//! A key file (`strata backups key create`) is JSON with a crc line. It holds the master key
//! either in the clear (for unattended backups: keep it like a password) or wrapped with
//! AES-256-GCM under a key derived from a passphrase with Argon2id (RustCrypto's `argon2`). A
//! key file is untrusted input: its Argon2 cost parameters are bounded before use.

use std::fmt;

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::Aes256Gcm;
use serde::{Deserialize, Serialize};
use strata_storage::{Result, StorageError};

use crate::digest::Digest;
use crate::manifest::{frame_json, unframe_json};

/// The key file's `format` field.
pub const KEY_FORMAT: &str = "strata-backup-key";
/// Key file version.
pub const KEY_VERSION: u32 = 1;
/// The cipher named in markers and manifests.
pub const CIPHER: &str = "aes-256-gcm";
/// Bytes a sealed payload adds: a 12-byte nonce before, a 16-byte tag after.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
/// Largest key file read.
pub const MAX_KEY_FILE: u64 = 64 << 10;

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const CTX_ID: &str = "strata-backup 2026-12 chunk-id";
const CTX_CIPHER: &str = "strata-backup 2026-12 chunk-cipher";
const CTX_SIGN: &str = "strata-backup 2026-12 manifest-signature";
const CTX_FINGERPRINT: &str = "strata-backup 2026-12 fingerprint";
/// Argon2id defaults for a new passphrase-protected key: 64 MiB, 3 passes, one lane.
const ARGON2_M_KIB: u32 = 64 << 10;
const ARGON2_T: u32 = 3;
const ARGON2_P: u32 = 1;
/// Bounds on what a key file may ask of Argon2 (1 GiB, 16 passes, 8 lanes).
const ARGON2_MAX_M_KIB: u32 = 1 << 20;
const ARGON2_MAX_T: u32 = 16;
const ARGON2_MAX_P: u32 = 8;

/// An unlocked key. See the module documentation.
#[derive(Clone)]
pub struct CryptKey {
    id_key: [u8; 32],
    sign_key: [u8; 32],
    cipher: Aes256Gcm,
    fingerprint: String,
}

impl fmt::Debug for CryptKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CryptKey({})", self.fingerprint)
    }
}

impl CryptKey {
    /// The key with master key `master`.
    pub fn from_master(master: &[u8; 32]) -> CryptKey {
        let cipher_key = blake3::derive_key(CTX_CIPHER, master);
        let fp = blake3::derive_key(CTX_FINGERPRINT, master);
        CryptKey {
            id_key: blake3::derive_key(CTX_ID, master),
            sign_key: blake3::derive_key(CTX_SIGN, master),
            cipher: Aes256Gcm::new(&cipher_key.into()),
            fingerprint: fingerprint_text(&fp[..8]),
        }
    }

    /// `ab:cd:ef:…` (8 bytes): names the key without revealing it.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The id of a chunk: BLAKE3 keyed with the chunk-id key.
    pub fn chunk_id(&self, data: &[u8]) -> Digest {
        Digest(*blake3::keyed_hash(&self.id_key, data).as_bytes())
    }

    /// A keyed signature (hex) of `data`.
    pub fn sign(&self, data: &[u8]) -> String {
        blake3::keyed_hash(&self.sign_key, data)
            .to_hex()
            .to_string()
    }

    /// Appends `nonce ‖ AES-256-GCM(plain) ‖ tag` to `out`, authenticating `aad` too.
    pub fn seal_into(&self, aad: &[u8], plain: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let mut nonce = [0u8; NONCE_LEN];
        random(&mut nonce)?;
        out.extend_from_slice(&nonce);
        let start = out.len();
        out.extend_from_slice(plain);
        let tag = self
            .cipher
            .encrypt_inout_detached(&nonce.into(), aad, (&mut out[start..]).into())
            .map_err(|_| StorageError::InvalidInput("Encrypting a blob failed".into()))?;
        out.extend_from_slice(&tag);
        Ok(())
    }

    /// Opens what [`CryptKey::seal_into`] made, in place: `sealed` becomes the plaintext.
    /// `what` names the object in errors.
    pub fn open_in_place(&self, aad: &[u8], sealed: &mut Vec<u8>, what: &str) -> Result<()> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(StorageError::corrupt(
                what.to_string(),
                "encrypted payload shorter than its nonce and tag",
            ));
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed[..NONCE_LEN]);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&sealed[sealed.len() - TAG_LEN..]);
        let end = sealed.len() - TAG_LEN;
        self.cipher
            .decrypt_inout_detached(
                &nonce.into(),
                aad,
                (&mut sealed[NONCE_LEN..end]).into(),
                &tag.into(),
            )
            .map_err(|_| {
                StorageError::corrupt(
                    what.to_string(),
                    "does not decrypt with this key (damaged, or moved from another chunk)",
                )
            })?;
        sealed.truncate(end);
        sealed.drain(..NONCE_LEN);
        Ok(())
    }
}

fn fingerprint_text(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn random(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf)
        .map_err(|e| StorageError::Unavailable(format!("No random numbers from the OS: {e}")))
}

/// Argon2id parameters in a key file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
struct Kdf {
    algorithm: String,
    salt: String,
    m_cost_kib: u32,
    t_cost: u32,
    p_cost: u32,
}

/// A key file. See the module documentation.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct KeyFile {
    format: String,
    version: u32,
    fingerprint: String,
    created: i64,
    /// The master key in hex, when not passphrase-protected.
    key: Option<String>,
    /// With a passphrase: Argon2id parameters and the wrapped master key (hex of nonce ‖
    /// ciphertext ‖ tag).
    kdf: Option<Kdf>,
    wrapped: Option<String>,
}

/// Makes a new key; returns the key file's bytes and the key. With a passphrase the master key
/// is wrapped under Argon2id(passphrase).
pub fn create_key_file(passphrase: Option<&[u8]>) -> Result<(Vec<u8>, CryptKey)> {
    let mut master = [0u8; 32];
    random(&mut master)?;
    let key = CryptKey::from_master(&master);
    let mut file = KeyFile {
        format: KEY_FORMAT.into(),
        version: KEY_VERSION,
        fingerprint: key.fingerprint().to_string(),
        created: crate::time::now(),
        key: None,
        kdf: None,
        wrapped: None,
    };
    match passphrase {
        None => file.key = Some(hex(&master)),
        Some(p) => {
            let mut salt = [0u8; 16];
            random(&mut salt)?;
            let kdf = Kdf {
                algorithm: "argon2id".into(),
                salt: hex(&salt),
                m_cost_kib: ARGON2_M_KIB,
                t_cost: ARGON2_T,
                p_cost: ARGON2_P,
            };
            let kek = derive_kek(p, &kdf)?;
            let mut sealed = Vec::new();
            kek.seal_into(KEY_FORMAT.as_bytes(), &master, &mut sealed)?;
            file.wrapped = Some(hex(&sealed));
            file.kdf = Some(kdf);
        }
    }
    Ok((frame_json(&file)?, key))
}

/// An unprotected copy of a key file (same key), unlocked with its passphrase if it has one:
/// what the appliance keeps to run jobs unattended.
pub fn unprotected_copy(bytes: &[u8], passphrase: Option<&[u8]>, what: &str) -> Result<Vec<u8>> {
    let key = open_key_file(bytes, passphrase, what)?;
    let file: KeyFile = unframe_json(bytes, what)?;
    let master = match (&file.key, &file.kdf, &file.wrapped, passphrase) {
        (Some(k), _, _, _) => unhex(k),
        (None, Some(kdf), Some(w), Some(p)) => {
            let kek = derive_kek(p, kdf)?;
            let mut sealed = unhex(w).unwrap_or_default();
            kek.open_in_place(KEY_FORMAT.as_bytes(), &mut sealed, what)?;
            Some(sealed)
        }
        _ => None,
    }
    .ok_or_else(|| StorageError::corrupt(what.to_string(), "no key"))?;
    let out = KeyFile {
        format: KEY_FORMAT.into(),
        version: KEY_VERSION,
        fingerprint: key.fingerprint().to_string(),
        created: file.created,
        key: Some(hex(&master)),
        kdf: None,
        wrapped: None,
    };
    frame_json(&out)
}

/// Whether a key file needs a passphrase. `what` names it in errors.
pub fn key_file_needs_passphrase(bytes: &[u8], what: &str) -> Result<bool> {
    let file: KeyFile = unframe_json(bytes, what)?;
    Ok(file.kdf.is_some())
}

/// Unlocks a key file (with its passphrase if it has one). `what` names it in errors.
pub fn open_key_file(bytes: &[u8], passphrase: Option<&[u8]>, what: &str) -> Result<CryptKey> {
    let corrupt = |d: &str| StorageError::corrupt(what.to_string(), d.to_string());
    let file: KeyFile = unframe_json(bytes, what)?;
    if file.format != KEY_FORMAT {
        return Err(corrupt("not a Strata backup key file"));
    }
    if file.version != KEY_VERSION {
        return Err(StorageError::Unsupported(format!(
            "key file version {} in {what}",
            file.version
        )));
    }
    let master: Vec<u8> = match (&file.key, &file.kdf, &file.wrapped) {
        (Some(k), None, None) => unhex(k).ok_or_else(|| corrupt("bad key"))?,
        (None, Some(kdf), Some(w)) => {
            let Some(p) = passphrase else {
                return Err(StorageError::InvalidInput(format!(
                    "{what} is protected by a passphrase; give it (--passphrase-file)"
                )));
            };
            let kek = derive_kek(p, kdf)?;
            let mut sealed = unhex(w).ok_or_else(|| corrupt("bad wrapped key"))?;
            kek.open_in_place(KEY_FORMAT.as_bytes(), &mut sealed, what)
                .map_err(|_| StorageError::InvalidInput(format!("Wrong passphrase for {what}")))?;
            sealed
        }
        _ => return Err(corrupt("holds neither a key nor a wrapped key")),
    };
    let master: [u8; 32] = master
        .try_into()
        .map_err(|_| corrupt("key is not 32 bytes"))?;
    let key = CryptKey::from_master(&master);
    if key.fingerprint() != file.fingerprint {
        return Err(corrupt("key does not match its recorded fingerprint"));
    }
    Ok(key)
}

fn derive_kek(passphrase: &[u8], kdf: &Kdf) -> Result<CryptKey> {
    if kdf.algorithm != "argon2id" {
        return Err(StorageError::Unsupported(format!(
            "key derivation {}",
            kdf.algorithm
        )));
    }
    if kdf.m_cost_kib > ARGON2_MAX_M_KIB || kdf.t_cost > ARGON2_MAX_T || kdf.p_cost > ARGON2_MAX_P {
        return Err(StorageError::InvalidInput(format!(
            "Key file asks Argon2 for {} KiB, {} passes, {} lanes: beyond the limits {ARGON2_MAX_M_KIB} KiB, {ARGON2_MAX_T}, {ARGON2_MAX_P}",
            kdf.m_cost_kib, kdf.t_cost, kdf.p_cost
        )));
    }
    let salt = unhex(&kdf.salt)
        .ok_or_else(|| StorageError::InvalidInput("Key file has a bad salt".into()))?;
    let params = argon2::Params::new(kdf.m_cost_kib, kdf.t_cost, kdf.p_cost, Some(32))
        .map_err(|e| StorageError::InvalidInput(format!("Key file Argon2 parameters: {e}")))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut kek = [0u8; 32];
    argon
        .hash_password_into(passphrase, &salt, &mut kek)
        .map_err(|e| StorageError::InvalidInput(format!("Argon2: {e}")))?;
    Ok(CryptKey::from_master(&kek))
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses hex; `None` if malformed.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_and_open_round_trip_and_detect_tampering() {
        let key = CryptKey::from_master(&[7u8; 32]);
        let mut sealed = Vec::new();
        key.seal_into(b"aad", b"secret data", &mut sealed).unwrap();
        assert_eq!(sealed.len(), 11 + SEAL_OVERHEAD);
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        let mut copy = sealed.clone();
        key.open_in_place(b"aad", &mut copy, "t").unwrap();
        assert_eq!(copy, b"secret data");
        let mut wrong_aad = sealed.clone();
        assert!(key.open_in_place(b"other", &mut wrong_aad, "t").is_err());
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(
                key.open_in_place(b"aad", &mut bad, "t").is_err(),
                "flip {i}"
            );
        }
        let other = CryptKey::from_master(&[8u8; 32]);
        let mut c = sealed.clone();
        assert!(other.open_in_place(b"aad", &mut c, "t").is_err());
    }

    #[test]
    fn chunk_ids_are_keyed() {
        let a = CryptKey::from_master(&[1u8; 32]);
        let b = CryptKey::from_master(&[2u8; 32]);
        assert_ne!(a.chunk_id(b"x"), b.chunk_id(b"x"));
        assert_ne!(a.chunk_id(b"x"), Digest::of(b"x"));
        assert_eq!(a.chunk_id(b"x"), a.chunk_id(b"x"));
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 8 * 3 - 1);
    }

    #[test]
    fn key_files_with_and_without_passphrase() {
        let (plain, key) = create_key_file(None).unwrap();
        assert!(!key_file_needs_passphrase(&plain, "k").unwrap());
        let opened = open_key_file(&plain, None, "k").unwrap();
        assert_eq!(opened.fingerprint(), key.fingerprint());
        assert_eq!(opened.chunk_id(b"z"), key.chunk_id(b"z"));

        let (wrapped, key) = create_key_file(Some(b"correct horse")).unwrap();
        assert!(key_file_needs_passphrase(&wrapped, "k").unwrap());
        let text = String::from_utf8_lossy(&wrapped);
        assert!(text.contains("argon2id"), "{text}");
        let e = open_key_file(&wrapped, None, "k").unwrap_err();
        assert!(e.to_string().contains("passphrase"), "{e}");
        let e = open_key_file(&wrapped, Some(b"wrong"), "k").unwrap_err();
        assert!(e.to_string().contains("Wrong passphrase"), "{e}");
        let opened = open_key_file(&wrapped, Some(b"correct horse"), "k").unwrap();
        assert_eq!(opened.fingerprint(), key.fingerprint());
        assert!(open_key_file(b"garbage", None, "k").is_err());
    }

    #[test]
    fn hostile_argon2_parameters_are_refused() {
        let (wrapped, _) = create_key_file(Some(b"p")).unwrap();
        let mut file: KeyFile = unframe_json(&wrapped, "k").unwrap();
        if let Some(kdf) = file.kdf.as_mut() {
            kdf.m_cost_kib = u32::MAX;
        }
        let bytes = frame_json(&file).unwrap();
        let e = open_key_file(&bytes, Some(b"p"), "k").unwrap_err();
        assert!(e.to_string().contains("limits"), "{e}");
    }
}

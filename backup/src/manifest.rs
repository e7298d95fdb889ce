//! A snapshot's manifest: what was backed up, when, from where, relative to which parent, with
//! which change tracking, and the figures of the run. JSON for people and tools, followed by a
//! `crc32 XXXXXXXX` line over the JSON bytes so truncation and damage are detected.

use serde::{Deserialize, Serialize};
use strata_storage::{Result, StorageError};

/// The manifest's `format` field.
pub const MANIFEST_FORMAT: &str = "strata-backup-manifest";
/// Manifest version.
pub const MANIFEST_VERSION: u32 = 1;
/// Largest manifest accepted.
pub const MAX_MANIFEST_LEN: u64 = 1 << 20;

/// How the changed data was found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ChangeTracking {
    /// `full` (every chunk read) or `incremental` (only dirty chunks read).
    pub mode: String,
    /// What supplied the dirty data (`dirty-ranges FILE`, `bitmap NAME`), if anything did.
    pub bitmap: Option<String>,
    /// Why a full read was done although a parent existed, if so.
    pub fallback_reason: Option<String>,
    /// Chunks read because they were dirty (incremental only).
    pub dirty_chunks: Option<u64>,
}

/// Figures of one backup run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BackupStats {
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Chunks in the snapshot.
    pub chunks_total: u64,
    /// Chunks that were read and found all zeros, or reported zero by the source.
    pub chunks_zero: u64,
    /// Chunks written to the store by this run.
    pub chunks_new: u64,
    /// Chunks read and found already in the store.
    pub chunks_reused: u64,
    /// Chunks taken from the parent snapshot without reading.
    pub chunks_from_parent: u64,
    /// Bytes of blobs written by this run (after compression).
    pub bytes_stored: u64,
    /// Source size divided by the stored size of the distinct chunks the snapshot references
    /// (null when it references none: an all-zero source).
    pub dedup_ratio: Option<f64>,
    /// Wall time in seconds.
    pub duration_secs: f64,
    /// Source size per second.
    pub throughput_mib_s: f64,
}

/// A snapshot's manifest. See the module documentation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// Always [`MANIFEST_VERSION`].
    pub version: u32,
    /// The snapshot's full name, `ID/TIME`.
    pub snapshot: String,
    /// What was backed up, as given (a path or `lv:VG/NAME`).
    pub source: String,
    /// The source's format (raw, qcow2, vmdk, volume).
    pub source_format: String,
    /// Source size in bytes.
    pub size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Number of chunks.
    pub chunk_count: u64,
    /// Length of the index file.
    pub index_len: u64,
    /// crc32 of the whole index file.
    pub index_crc32: u32,
    /// The snapshot this one was taken relative to (`ID/TIME`), if any.
    pub parent: Option<String>,
    /// How the data to read was chosen.
    pub change_tracking: ChangeTracking,
    /// Figures of the run.
    pub stats: BackupStats,
    /// Set when the snapshot's chunks are encrypted: the cipher and the key's fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
    /// Keyed BLAKE3 (signature key) of the index file, in an encrypted datastore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_mac: Option<String>,
    /// Keyed BLAKE3 (signature key) of this manifest encoded with `signature` absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// How a snapshot (or datastore) is encrypted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Encryption {
    /// Always `aes-256-gcm`.
    pub cipher: String,
    /// The key's fingerprint (`ab:cd:…`).
    pub key_fingerprint: String,
}

/// JSON plus a crc line.
pub fn frame_json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let mut out = serde_json::to_vec_pretty(value)
        .map_err(|e| StorageError::InvalidInput(format!("Serialising: {e}")))?;
    out.push(b'\n');
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(format!("crc32 {crc:08x}\n").as_bytes());
    Ok(out)
}

/// Checks the crc line and parses the JSON before it.
pub fn unframe_json<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T> {
    let corrupt = |d: String| StorageError::corrupt(what.to_string(), d);
    const TRAILER: usize = "crc32 00000000\n".len();
    if bytes.len() < TRAILER || !bytes.ends_with(b"\n") {
        return Err(corrupt("missing checksum line (truncated?)".into()));
    }
    let (body, trailer) = bytes.split_at(bytes.len() - TRAILER);
    let trailer = std::str::from_utf8(trailer).map_err(|_| corrupt("bad checksum line".into()))?;
    let hex = trailer
        .strip_prefix("crc32 ")
        .and_then(|t| t.strip_suffix('\n'))
        .ok_or_else(|| corrupt("missing checksum line (truncated?)".into()))?;
    let want = u32::from_str_radix(hex, 16).map_err(|_| corrupt("bad checksum line".into()))?;
    if crc32fast::hash(body) != want {
        return Err(corrupt("checksum mismatch".into()));
    }
    serde_json::from_slice(body).map_err(|e| corrupt(format!("malformed JSON: {e}")))
}

impl Manifest {
    /// Records `key` in the manifest and signs it together with `index_bytes` (the index it
    /// describes).
    pub fn sign(&mut self, key: &crate::crypt::CryptKey, index_bytes: &[u8]) -> Result<()> {
        self.encryption = Some(Encryption {
            cipher: crate::crypt::CIPHER.into(),
            key_fingerprint: key.fingerprint().to_string(),
        });
        self.index_mac = Some(key.sign(index_bytes));
        self.signature = Some(key.sign(&self.signed_text()?));
        Ok(())
    }

    /// What the signature covers: every field that says what the snapshot is and which index
    /// holds it (not the run's statistics, whose floats need not survive a JSON round trip
    /// bit for bit), as canonical JSON.
    fn signed_text(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(&serde_json::json!([
            "strata-backup-manifest-signature-v1",
            self.snapshot,
            self.source,
            self.source_format,
            self.size,
            self.chunk_size,
            self.chunk_count,
            self.index_len,
            self.index_crc32,
            self.index_mac,
            self.parent,
            self.change_tracking.mode,
            self.encryption
                .as_ref()
                .map(|e| (&e.cipher, &e.key_fingerprint)),
        ]))
        .map_err(|e| StorageError::InvalidInput(format!("Serialising: {e}")))
    }

    /// Checks the signature made by [`Manifest::sign`] and the index's keyed hash.
    pub fn check_signature(
        &self,
        key: &crate::crypt::CryptKey,
        index_bytes: &[u8],
        what: &str,
    ) -> Result<()> {
        let good = self.signature.as_deref() == Some(key.sign(&self.signed_text()?).as_str());
        if !good {
            return Err(StorageError::corrupt(
                what.to_string(),
                "manifest signature does not verify with this key (forged or damaged)",
            ));
        }
        if self.index_mac.as_deref() != Some(key.sign(index_bytes).as_str()) {
            return Err(StorageError::corrupt(
                what.to_string(),
                "index does not match the signed manifest",
            ));
        }
        Ok(())
    }

    /// Serialises the manifest.
    pub fn encode(&self) -> Result<Vec<u8>> {
        frame_json(self)
    }

    /// Parses and checks a manifest.
    pub fn decode(bytes: &[u8], what: &str) -> Result<Manifest> {
        let m: Manifest = unframe_json(bytes, what)?;
        if m.format != MANIFEST_FORMAT {
            return Err(StorageError::corrupt(what.to_string(), "not a manifest"));
        }
        if m.version != MANIFEST_VERSION {
            return Err(StorageError::Unsupported(format!(
                "manifest version {} in {what}",
                m.version
            )));
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT.into(),
            version: MANIFEST_VERSION,
            snapshot: "image/a.img/2026-11-27T05:00:00Z".into(),
            source: "a.img".into(),
            source_format: "raw".into(),
            size: 10,
            chunk_size: 4 << 20,
            chunk_count: 1,
            index_len: 112,
            index_crc32: 5,
            parent: None,
            change_tracking: ChangeTracking {
                mode: "full".into(),
                bitmap: None,
                fallback_reason: None,
                dirty_chunks: None,
            },
            stats: BackupStats::default(),
            encryption: None,
            index_mac: None,
            signature: None,
        }
    }

    #[test]
    fn round_trip_and_truncation() {
        let bytes = sample().encode().unwrap();
        assert_eq!(Manifest::decode(&bytes, "m").unwrap(), sample());
        for len in 0..bytes.len() {
            assert!(Manifest::decode(&bytes[..len], "m").is_err(), "len {len}");
        }
        let mut b = bytes.clone();
        b[10] ^= 0x20;
        assert!(Manifest::decode(&b, "m").is_err());
    }

    #[test]
    fn signed_manifests_detect_edits_and_other_indexes() {
        let key = crate::crypt::CryptKey::from_master(&[5u8; 32]);
        let mut m = sample();
        m.stats.duration_secs = 0.1 + 0.2;
        m.stats.throughput_mib_s = 1_234.567_890_123_456_7;
        m.sign(&key, b"index bytes").unwrap();
        let back = Manifest::decode(&m.encode().unwrap(), "m").unwrap();
        back.check_signature(&key, b"index bytes", "m").unwrap();
        assert!(back.check_signature(&key, b"other index", "m").is_err());
        let mut edited = back.clone();
        edited.source = "elsewhere".into();
        assert!(edited.check_signature(&key, b"index bytes", "m").is_err());
        let other = crate::crypt::CryptKey::from_master(&[6u8; 32]);
        assert!(back.check_signature(&other, b"index bytes", "m").is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = Manifest::decode(&data, "fuzz");
        }
    }
}

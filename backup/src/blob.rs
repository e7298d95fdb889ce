//! The blob format every chunk is stored in: a 32-byte header with crc32 checksums, then the
//! payload (the chunk's bytes, zstd-compressed when that saves at least an eighth; in an
//! encrypted datastore sealed with AES-256-GCM after compression, see [`crate::crypt`]).
//!
//! The payload crc lets `verify` and `restore` detect bit rot before decompressing; the digest of
//! the decompressed bytes (checked by the caller against the chunk's name) detects everything
//! else. Byte layout: docs/format-datastore.md.

use strata_storage::bytes::le32;
use strata_storage::{Result, StorageError};

use crate::crypt::{CryptKey, SEAL_OVERHEAD};
use crate::digest::Digest;

/// Magic at the start of every chunk blob.
pub const BLOB_MAGIC: [u8; 8] = *b"STRBLOB1";
/// Size of the blob header.
pub const BLOB_HEADER_LEN: usize = 32;
/// Largest uncompressed chunk a blob may hold (bounds every allocation a blob header sizes).
pub const MAX_RAW_LEN: usize = 16 << 20;
/// Largest payload: a chunk sealed without compression.
pub const MAX_PAYLOAD_LEN: usize = MAX_RAW_LEN + SEAL_OVERHEAD;

const _: () = assert!(BLOB_HEADER_LEN == 32);

/// How a blob's payload is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// The chunk's bytes as they are.
    Plain = 0,
    /// A zstd frame.
    Zstd = 1,
    /// The chunk's bytes sealed with AES-256-GCM: nonce, ciphertext, tag.
    SealedPlain = 2,
    /// A zstd frame sealed with AES-256-GCM.
    SealedZstd = 3,
}

impl Encoding {
    /// Whether the payload is encrypted.
    pub fn sealed(self) -> bool {
        matches!(self, Encoding::SealedPlain | Encoding::SealedZstd)
    }

    /// Whether the (opened) payload is a zstd frame.
    pub fn zstd(self) -> bool {
        matches!(self, Encoding::Zstd | Encoding::SealedZstd)
    }
}

/// What a sealed payload authenticates besides itself: the chunk's id and the header fields a
/// reader relies on, so a blob moved under another id or relabelled fails to open.
fn seal_aad(digest: &Digest, encoding: Encoding, raw_len: usize) -> [u8; 48] {
    let mut aad = [0u8; 48];
    aad[..11].copy_from_slice(b"strata-blob");
    aad[11] = encoding as u8;
    aad[12..16].copy_from_slice(&(raw_len as u32).to_le_bytes());
    aad[16..].copy_from_slice(&digest.0);
    aad
}

/// Encodes `data` (chunk id `digest`) as a blob, sealed with `key` when given.
pub fn encode_for(
    data: &[u8],
    level: i32,
    key: Option<&CryptKey>,
    digest: &Digest,
) -> Result<Vec<u8>> {
    let Some(key) = key else {
        return encode(data, level);
    };
    // Compress (or not) exactly as an unsealed blob would, then seal that payload.
    let inner = encode(data, level)?;
    let zstd = inner[8] == Encoding::Zstd as u8;
    let encoding = if zstd {
        Encoding::SealedZstd
    } else {
        Encoding::SealedPlain
    };
    let mut out = Vec::with_capacity(inner.len() + SEAL_OVERHEAD);
    out.resize(BLOB_HEADER_LEN, 0);
    key.seal_into(
        &seal_aad(digest, encoding, data.len()),
        &inner[BLOB_HEADER_LEN..],
        &mut out,
    )?;
    write_header(&mut out, encoding, data.len());
    Ok(out)
}

/// Fills in the header of `out` (whose payload follows the header).
fn write_header(out: &mut [u8], encoding: Encoding, raw_len: usize) {
    let payload_len = (out.len() - BLOB_HEADER_LEN) as u32;
    let payload_crc = crc32fast::hash(&out[BLOB_HEADER_LEN..]);
    let header = &mut out[..BLOB_HEADER_LEN];
    header[0..8].copy_from_slice(&BLOB_MAGIC);
    header[8] = encoding as u8;
    header[9..12].fill(0);
    header[12..16].copy_from_slice(&(raw_len as u32).to_le_bytes());
    header[16..20].copy_from_slice(&payload_len.to_le_bytes());
    header[20..24].copy_from_slice(&payload_crc.to_le_bytes());
    header[24..28].fill(0);
    let header_crc = crc32fast::hash(&header[..28]);
    header[28..32].copy_from_slice(&header_crc.to_le_bytes());
}

/// Opens a sealed payload in place (`payload` becomes the inner payload: plain bytes or a zstd
/// frame); an unsealed one is left as it is. Errors name `what`.
pub fn open_payload(
    header: &BlobHeader,
    key: Option<&CryptKey>,
    digest: &Digest,
    payload: &mut Vec<u8>,
    what: &str,
) -> Result<()> {
    if !header.encoding.sealed() {
        return Ok(());
    }
    let Some(key) = key else {
        return Err(StorageError::InvalidInput(format!(
            "{what} is encrypted; give the datastore's key (--key)"
        )));
    };
    key.open_in_place(
        &seal_aad(digest, header.encoding, header.raw_len),
        payload,
        what,
    )
}

/// Encodes `data` as a blob, compressing with zstd at `level` when that saves at least 1/8.
/// `level` 0 disables compression.
pub fn encode(data: &[u8], level: i32) -> Result<Vec<u8>> {
    if data.len() > MAX_RAW_LEN {
        return Err(StorageError::InvalidInput(format!(
            "Chunk of {} bytes exceeds the blob limit of {MAX_RAW_LEN}",
            data.len()
        )));
    }
    let compressed = if level != 0 {
        let limit = data.len() - data.len() / 8;
        let mut out = vec![0u8; BLOB_HEADER_LEN + limit];
        // A compressed result larger than `limit` fails with "destination too small": keep plain.
        match zstd::bulk::compress_to_buffer(data, &mut out[BLOB_HEADER_LEN..], level) {
            Ok(n) => {
                out.truncate(BLOB_HEADER_LEN + n);
                Some(out)
            }
            Err(_) => None,
        }
    } else {
        None
    };
    let (mut out, encoding) = match compressed {
        Some(out) => (out, Encoding::Zstd),
        None => {
            let mut out = Vec::with_capacity(BLOB_HEADER_LEN + data.len());
            out.resize(BLOB_HEADER_LEN, 0);
            out.extend_from_slice(data);
            (out, Encoding::Plain)
        }
    };
    write_header(&mut out, encoding, data.len());
    Ok(out)
}

/// What a blob header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobHeader {
    /// Payload encoding.
    pub encoding: Encoding,
    /// Uncompressed length.
    pub raw_len: usize,
    /// Stored payload length.
    pub payload_len: usize,
    /// crc32 of the payload.
    pub payload_crc: u32,
}

/// Parses and checks a blob header; `what` names the blob in errors.
pub fn parse_header(bytes: &[u8], what: &str) -> Result<BlobHeader> {
    let corrupt = |detail: String| StorageError::corrupt(what.to_string(), detail);
    if bytes.len() < BLOB_HEADER_LEN {
        return Err(corrupt(format!(
            "{} bytes is shorter than a blob header",
            bytes.len()
        )));
    }
    if bytes[0..8] != BLOB_MAGIC {
        return Err(corrupt("bad blob magic".into()));
    }
    let header_crc = le32(bytes, 28);
    if crc32fast::hash(&bytes[..28]) != header_crc {
        return Err(corrupt("blob header checksum mismatch".into()));
    }
    let encoding = match bytes[8] {
        0 => Encoding::Plain,
        1 => Encoding::Zstd,
        2 => Encoding::SealedPlain,
        3 => Encoding::SealedZstd,
        other => return Err(corrupt(format!("unknown blob encoding {other}"))),
    };
    let raw_len = le32(bytes, 12) as usize;
    let payload_len = le32(bytes, 16) as usize;
    if raw_len > MAX_RAW_LEN || payload_len > MAX_PAYLOAD_LEN {
        return Err(corrupt(format!(
            "blob lengths {raw_len}/{payload_len} exceed {MAX_RAW_LEN}"
        )));
    }
    if encoding == Encoding::Plain && raw_len != payload_len {
        return Err(corrupt("plain blob with differing lengths".into()));
    }
    if encoding == Encoding::SealedPlain && raw_len + SEAL_OVERHEAD != payload_len {
        return Err(corrupt("sealed plain blob with mismatched lengths".into()));
    }
    Ok(BlobHeader {
        encoding,
        raw_len,
        payload_len,
        payload_crc: le32(bytes, 20),
    })
}

/// Checks a whole blob's framing and payload crc without decompressing; returns its header.
pub fn check(bytes: &[u8], what: &str) -> Result<BlobHeader> {
    let header = parse_header(bytes, what)?;
    let payload = &bytes[BLOB_HEADER_LEN..];
    if payload.len() != header.payload_len {
        return Err(StorageError::corrupt(
            what.to_string(),
            format!(
                "payload is {} bytes, header says {} (truncated or extended)",
                payload.len(),
                header.payload_len
            ),
        ));
    }
    if crc32fast::hash(payload) != header.payload_crc {
        return Err(StorageError::corrupt(
            what.to_string(),
            "payload checksum mismatch",
        ));
    }
    Ok(header)
}

/// Checks a blob and decodes its payload into `out` (cleared first). A sealed blob needs the
/// datastore's key and the chunk's id.
pub fn decode_into_with(
    bytes: &[u8],
    what: &str,
    out: &mut Vec<u8>,
    key: Option<&CryptKey>,
    digest: &Digest,
) -> Result<()> {
    let header = check(bytes, what)?;
    if !header.encoding.sealed() {
        return decode_into(bytes, what, out);
    }
    let mut payload = bytes[BLOB_HEADER_LEN..].to_vec();
    open_payload(&header, key, digest, &mut payload, what)?;
    if header.encoding.zstd() {
        out.clear();
        out.resize(header.raw_len, 0);
        decompress_exact(&payload, out, header.raw_len, what)
    } else {
        *out = payload;
        Ok(())
    }
}

/// Decompresses a zstd frame into `out`, which must come out exactly `raw_len` bytes.
pub fn decompress_exact(frame: &[u8], out: &mut [u8], raw_len: usize, what: &str) -> Result<()> {
    let n = zstd::bulk::decompress_to_buffer(frame, out)
        .map_err(|e| StorageError::corrupt(what.to_string(), format!("zstd payload: {e}")))?;
    if n != raw_len {
        return Err(StorageError::corrupt(
            what.to_string(),
            format!("decompressed to {n} bytes, header says {raw_len}"),
        ));
    }
    Ok(())
}

/// Checks an unsealed blob and decodes its payload into `out` (cleared first).
pub fn decode_into(bytes: &[u8], what: &str, out: &mut Vec<u8>) -> Result<()> {
    let header = check(bytes, what)?;
    let payload = &bytes[BLOB_HEADER_LEN..];
    out.clear();
    match header.encoding {
        Encoding::SealedPlain | Encoding::SealedZstd => {
            return Err(StorageError::InvalidInput(format!(
                "{what} is encrypted; give the datastore's key (--key)"
            )))
        }
        Encoding::Plain => out.extend_from_slice(payload),
        Encoding::Zstd => {
            out.resize(header.raw_len, 0);
            decompress_exact(payload, out, header.raw_len, what)?;
        }
    }
    Ok(())
}

/// Checks and decodes a blob.
pub fn decode(bytes: &[u8], what: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    decode_into(bytes, what, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressible_data_is_compressed_and_round_trips() {
        let data = b"strata backup ".repeat(10_000);
        let blob = encode(&data, 1).unwrap();
        assert!(blob.len() < data.len() / 10);
        assert_eq!(parse_header(&blob, "t").unwrap().encoding, Encoding::Zstd);
        assert_eq!(decode(&blob, "t").unwrap(), data);
    }

    #[test]
    fn random_data_stays_plain() {
        let mut rng = fastrand::Rng::with_seed(7);
        let data: Vec<u8> = (0..100_000).map(|_| rng.u8(..)).collect();
        let blob = encode(&data, 3).unwrap();
        assert_eq!(parse_header(&blob, "t").unwrap().encoding, Encoding::Plain);
        assert_eq!(decode(&blob, "t").unwrap(), data);
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_is_detected() {
        let data = b"0123456789abcdef".repeat(64);
        for level in [0, 1] {
            let blob = encode(&data, level).unwrap();
            for i in 0..blob.len() {
                let mut bad = blob.clone();
                bad[i] ^= 0x40;
                assert!(decode(&bad, "t").is_err(), "flip at {i} not detected");
            }
            for len in 0..blob.len() {
                assert!(decode(&blob[..len], "t").is_err(), "truncation to {len}");
            }
        }
    }

    #[test]
    fn oversized_header_lengths_are_refused_before_allocating() {
        let mut blob = encode(b"abc", 0).unwrap();
        blob[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        let crc = crc32fast::hash(&blob[..28]);
        blob[28..32].copy_from_slice(&crc.to_le_bytes());
        let err = decode(&blob, "t").unwrap_err().to_string();
        assert!(err.contains("exceed"), "{err}");
    }

    #[test]
    fn sealed_blobs_round_trip_and_hide_their_contents() {
        let key = CryptKey::from_master(&[3u8; 32]);
        let text = b"plaintext pattern ".repeat(4000);
        let mut rng = fastrand::Rng::with_seed(9);
        let random: Vec<u8> = (0..50_000).map(|_| rng.u8(..)).collect();
        for (data, want) in [
            (&text, Encoding::SealedZstd),
            (&random, Encoding::SealedPlain),
        ] {
            let id = key.chunk_id(data);
            let blob = encode_for(data, 1, Some(&key), &id).unwrap();
            assert_eq!(parse_header(&blob, "t").unwrap().encoding, want);
            assert!(!blob.windows(17).any(|w| w == b"plaintext pattern"));
            let mut out = Vec::new();
            decode_into_with(&blob, "t", &mut out, Some(&key), &id).unwrap();
            assert_eq!(&out, data);
            // Without the key, or under another id, it does not open.
            let e = decode_into_with(&blob, "t", &mut out, None, &id).unwrap_err();
            assert!(e.to_string().contains("encrypted"), "{e}");
            let other = key.chunk_id(b"other");
            assert!(decode_into_with(&blob, "t", &mut out, Some(&key), &other).is_err());
            assert!(decode(&blob, "t").is_err());
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = decode(&data, "fuzz");
        }

        #[test]
        fn any_chunk_round_trips(data in proptest::collection::vec(0u8..4, 0..5000), level in 0i32..4) {
            let blob = encode(&data, level).unwrap();
            proptest::prop_assert_eq!(decode(&blob, "t").unwrap(), data);
        }
    }
}

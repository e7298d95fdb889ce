//! Fetching chunks for restores: the one interface a datastore backend implements so that a
//! restore (plain or live) can get a chunk's bytes, checked and decoded straight into the buffer
//! it will write to the target.
//!
//! [`ChunkFetcher::fetch_into`] gets the caller's output slice (usually the inside of an
//! [`strata_storage::io::IoBuf`] that goes to the target queue next) and a scratch vector the
//! caller keeps between calls. The local datastore reads a plain blob's payload directly into
//! the output and a zstd blob's payload into the scratch vector, decompressing from there into
//! the output: one read and at most one decode per chunk, no allocation once the scratch vector
//! has grown. (Before, a restore read the blob into a new vector, decoded it into another and
//! copied that into the I/O buffer.) A remote backend (S3) fetches the blob into the scratch
//! vector and decodes it with [`decode_blob_into`].
//!
//! Every fetch checks what a restore has always checked: the header crc, lengths within bounds,
//! the file length, the payload crc, the decompressed length, the length the index expects, and
//! the BLAKE3 digest against the chunk's name.

use std::fmt;
use std::io::Read;

use strata_storage::{Result, StorageError};

use crate::blob::{self, BlobHeader, Encoding, BLOB_HEADER_LEN};
use crate::digest::Digest;
use crate::fsutil::io_err;
use crate::store::Datastore;

/// Where a restore gets its chunks. See the module documentation.
pub trait ChunkFetcher: Send + Sync + fmt::Debug {
    /// Fetches chunk `digest`, checks it and decodes it into `out`, whose length is the chunk
    /// length the snapshot's index gives. `scratch` is a buffer the caller keeps between calls
    /// (for a compressed payload); its contents afterwards mean nothing.
    fn fetch_into(&self, digest: &Digest, out: &mut [u8], scratch: &mut Vec<u8>) -> Result<()>;
}

impl ChunkFetcher for Datastore {
    fn fetch_into(&self, digest: &Digest, out: &mut [u8], scratch: &mut Vec<u8>) -> Result<()> {
        if let Some(r) = self.remote() {
            let (bytes, cached) = r.read_blob(digest)?;
            let first = decode_blob_into(self, digest, &bytes, out, scratch);
            if first.is_err() && cached {
                // A damaged cache entry: drop it and fetch the chunk again.
                r.evict(digest);
                let bytes = r.fetch_blob(digest)?;
                return decode_blob_into(self, digest, &bytes, out, scratch);
            }
            return first;
        }
        let what = format!("chunk {digest}");
        let key = self.require_key()?;
        let (mut file, path) = self.open_blob(digest)?;
        let mut head = [0u8; BLOB_HEADER_LEN];
        file.read_exact(&mut head)
            .map_err(|e| short_or_io(&what, &path, e))?;
        crate::store::check_sealed_as_store(&head, key.is_some(), &what)?;
        let header = blob::parse_header(&head, &what)?;
        let file_len = file
            .metadata()
            .map_err(|e| io_err("Inspecting", &path, e))?
            .len();
        if file_len != (BLOB_HEADER_LEN + header.payload_len) as u64 {
            return Err(StorageError::corrupt(
                what,
                format!(
                    "payload is {} bytes, header says {} (truncated or extended)",
                    file_len.saturating_sub(BLOB_HEADER_LEN as u64),
                    header.payload_len
                ),
            ));
        }
        check_expected_len(&header, out.len(), &what)?;
        match header.encoding {
            Encoding::Plain => {
                file.read_exact(out)
                    .map_err(|e| short_or_io(&what, &path, e))?;
                check_payload_crc(&header, out, &what)?;
            }
            Encoding::Zstd | Encoding::SealedPlain | Encoding::SealedZstd => {
                scratch.clear();
                let got = (&mut file)
                    .take(header.payload_len as u64)
                    .read_to_end(scratch)
                    .map_err(|e| io_err("Reading", &path, e))?;
                if got != header.payload_len {
                    return Err(StorageError::corrupt(
                        what,
                        "payload shorter than its header says",
                    ));
                }
                check_payload_crc(&header, scratch, &what)?;
                blob::open_payload(&header, key, digest, scratch, &what)?;
                inner_into(&header, scratch, out, &what)?;
            }
        }
        check_digest(self, digest, out, &what)
    }
}

/// Copies or decompresses an (opened) payload into `out`.
fn inner_into(header: &BlobHeader, inner: &[u8], out: &mut [u8], what: &str) -> Result<()> {
    if header.encoding.zstd() {
        decompress(header, inner, out, what)
    } else if inner.len() == out.len() {
        out.copy_from_slice(inner);
        Ok(())
    } else {
        Err(StorageError::corrupt(
            what.to_string(),
            "payload length differs from the chunk length",
        ))
    }
}

/// Checks a whole blob held in memory (a remote backend's download) and decodes it into `out`
/// (with `store`'s key), then checks its digest: what [`ChunkFetcher::fetch_into`] guarantees.
/// `scratch` is kept by the caller between calls.
pub fn decode_blob_into(
    store: &Datastore,
    digest: &Digest,
    bytes: &[u8],
    out: &mut [u8],
    scratch: &mut Vec<u8>,
) -> Result<()> {
    let what = format!("chunk {digest}");
    let key = store.require_key()?;
    crate::store::check_sealed_as_store(bytes, key.is_some(), &what)?;
    let header = blob::check(bytes, &what)?;
    check_expected_len(&header, out.len(), &what)?;
    let payload = &bytes[BLOB_HEADER_LEN..];
    if header.encoding.sealed() {
        scratch.clear();
        scratch.extend_from_slice(payload);
        blob::open_payload(&header, key, digest, scratch, &what)?;
        inner_into(&header, scratch, out, &what)?;
    } else {
        inner_into(&header, payload, out, &what)?;
    }
    check_digest(store, digest, out, &what)
}

fn short_or_io(what: &str, path: &std::path::Path, e: std::io::Error) -> StorageError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        StorageError::corrupt(what.to_string(), "blob is shorter than its header says")
    } else {
        io_err("Reading", path, e)
    }
}

fn check_expected_len(header: &BlobHeader, expected: usize, what: &str) -> Result<()> {
    if header.raw_len != expected {
        return Err(StorageError::corrupt(
            what.to_string(),
            format!(
                "holds {} bytes, the index expects {expected}",
                header.raw_len
            ),
        ));
    }
    Ok(())
}

fn check_payload_crc(header: &BlobHeader, payload: &[u8], what: &str) -> Result<()> {
    if crc32fast::hash(payload) != header.payload_crc {
        return Err(StorageError::corrupt(
            what.to_string(),
            "payload checksum mismatch",
        ));
    }
    Ok(())
}

fn decompress(header: &BlobHeader, payload: &[u8], out: &mut [u8], what: &str) -> Result<()> {
    blob::decompress_exact(payload, out, header.raw_len, what)
}

fn check_digest(store: &Datastore, digest: &Digest, data: &[u8], what: &str) -> Result<()> {
    if store.digest_of(data) != *digest {
        return Err(StorageError::corrupt(
            what.to_string(),
            "content does not match its digest",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with(data: &[u8], level: i32) -> (tempfile::TempDir, Datastore, Digest) {
        let d = tempfile::tempdir().unwrap();
        let s = Datastore::create(&d.path().join("ds")).unwrap();
        let dg = Digest::of(data);
        s.insert_chunk(&dg, data, level).unwrap();
        (d, s, dg)
    }

    #[test]
    fn plain_and_compressed_chunks_decode_into_the_callers_buffer() {
        let mut rng = fastrand::Rng::with_seed(3);
        let random: Vec<u8> = (0..70_000).map(|_| rng.u8(..)).collect();
        let text = b"restore me ".repeat(7000);
        for (data, level) in [(&random, 1), (&text, 1), (&text, 0)] {
            let (_d, s, dg) = store_with(data, level);
            let mut out = vec![0xaa; data.len()];
            let mut scratch = Vec::new();
            s.fetch_into(&dg, &mut out, &mut scratch).unwrap();
            assert_eq!(&out, data);
            let blob = std::fs::read(s.chunk_path(&dg)).unwrap();
            let mut out2 = vec![0; data.len()];
            decode_blob_into(&s, &dg, &blob, &mut out2, &mut Vec::new()).unwrap();
            assert_eq!(&out2, data);
        }
    }

    #[test]
    fn damage_of_every_kind_is_refused() {
        let text = b"0123456789abcdef".repeat(512);
        for level in [0, 1] {
            let (_d, s, dg) = store_with(&text, level);
            let path = s.chunk_path(&dg);
            let good = std::fs::read(&path).unwrap();
            let mut out = vec![0; text.len()];
            let mut scratch = Vec::new();
            // A wrong expected length.
            let mut short = vec![0; text.len() - 1];
            let e = s.fetch_into(&dg, &mut short, &mut scratch).unwrap_err();
            assert!(e.to_string().contains("index expects"), "{e}");
            for i in (0..good.len()).step_by(97) {
                let mut bad = good.clone();
                bad[i] ^= 0x10;
                std::fs::write(&path, &bad).unwrap();
                assert!(
                    s.fetch_into(&dg, &mut out, &mut scratch).is_err(),
                    "flip at {i}"
                );
            }
            for len in [0, 10, BLOB_HEADER_LEN, good.len() - 1] {
                std::fs::write(&path, &good[..len]).unwrap();
                assert!(
                    s.fetch_into(&dg, &mut out, &mut scratch).is_err(),
                    "cut to {len}"
                );
            }
            let mut longer = good.clone();
            longer.push(0);
            std::fs::write(&path, &longer).unwrap();
            assert!(s.fetch_into(&dg, &mut out, &mut scratch).is_err());
            std::fs::remove_file(&path).unwrap();
            let e = s.fetch_into(&dg, &mut out, &mut scratch).unwrap_err();
            assert!(e.to_string().contains("missing"), "{e}");
        }
    }

    #[test]
    fn a_chunk_under_another_name_fails_its_digest() {
        let text = b"abc".repeat(1000);
        let (_d, s, dg) = store_with(&text, 1);
        let other = Digest::of(b"other");
        std::fs::copy(s.chunk_path(&dg), s.chunk_path(&other)).unwrap();
        let mut out = vec![0; text.len()];
        let e = s.fetch_into(&other, &mut out, &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("digest"), "{e}");
    }
}

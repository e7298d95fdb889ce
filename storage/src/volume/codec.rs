//! Checksums for the on-disk structures we define (PV labels, metadata areas, thin pool
//! metadata, bitmap files); their little-endian fields are read with `crate::bytes`.
//!
//! Every structure stores a crc32 (crc32fast, the IEEE polynomial) of its bytes with the
//! checksum field itself zeroed, so a structure is checked by recomputing the same sum.

/// crc32 of `buf` as if the four bytes at `crc_at` were zero.
pub(crate) fn crc_without(buf: &[u8], crc_at: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&buf[..crc_at]);
    h.update(&[0u8; 4]);
    h.update(&buf[crc_at + 4..]);
    h.finalize()
}

/// Stores the checksum of `buf` at `crc_at`.
pub(crate) fn seal(buf: &mut [u8], crc_at: usize) {
    let c = crc_without(buf, crc_at);
    crate::bytes::put_le32(buf, crc_at, c);
}

/// Whether the checksum stored at `crc_at` matches.
pub(crate) fn sealed(buf: &[u8], crc_at: usize) -> bool {
    crate::bytes::le32(buf, crc_at) == crc_without(buf, crc_at)
}

/// 16 raw bytes of a 32-hex-digit identifier (zeros if it is malformed, which callers refuse
/// earlier).
pub(crate) fn uuid_bytes(uuid: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = uuid
            .get(i * 2..i * 2 + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or(0);
    }
    out
}

/// The identifier written by [`uuid_bytes`].
pub(crate) fn uuid_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealing_detects_any_flipped_bit() {
        let mut b = vec![7u8; 512];
        seal(&mut b, 12);
        assert!(sealed(&b, 12));
        b[300] ^= 1;
        assert!(!sealed(&b, 12));
    }

    #[test]
    fn uuids_round_trip() {
        let u = crate::volume::name::new_uuid();
        assert_eq!(uuid_string(&uuid_bytes(&u)), u);
    }
}

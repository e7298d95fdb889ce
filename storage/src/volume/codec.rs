//! Little-endian field access and checksums for the on-disk structures we define (PV labels,
//! metadata areas, thin pool metadata, bitmap files).
//!
//! Every structure stores a crc32 (crc32fast, the IEEE polynomial) of its bytes with the
//! checksum field itself zeroed, so a structure is checked by recomputing the same sum.

/// Reads a little-endian `u64` at `at`.
pub(crate) fn get_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Reads a little-endian `u32` at `at`.
pub(crate) fn get_u32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

/// Writes a little-endian `u64` at `at`.
pub(crate) fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Writes a little-endian `u32` at `at`.
pub(crate) fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

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
    put_u32(buf, crc_at, c);
}

/// Whether the checksum stored at `crc_at` matches.
pub(crate) fn sealed(buf: &[u8], crc_at: usize) -> bool {
    get_u32(buf, crc_at) == crc_without(buf, crc_at)
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

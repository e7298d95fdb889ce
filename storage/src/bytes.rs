//! Fixed-width integers at byte offsets of on-disk structures: the one home for the big-endian
//! fields of qcow2 and the little-endian ones of vmdk, volume labels, thin pool metadata,
//! bitmaps and datastore files.
//!
//! Readers never panic: a field that reaches past the end of the slice reads as zero (parsers
//! check a structure's length before trusting its fields, and a short read must not become a
//! crash on untrusted bytes). Writers are for structures we build ourselves, sized for their
//! fields.
//!
//! Written by hand rather than with `zerocopy`: a dozen one-line functions over slices read
//! better at the call sites (`be64(b, 40)`) than typed overlays of structures whose fields are
//! mostly parsed one by one with checks in between.

macro_rules! readers {
    ($($(#[$doc:meta])* $name:ident: $t:ty, $from:ident;)*) => {$(
        $(#[$doc])*
        pub fn $name(b: &[u8], at: usize) -> $t {
            const N: usize = std::mem::size_of::<$t>();
            at.checked_add(N)
                .and_then(|end| b.get(at..end))
                .and_then(|s| <[u8; N]>::try_from(s).ok())
                .map_or(0, <$t>::$from)
        }
    )*};
}

macro_rules! writers {
    ($($(#[$doc:meta])* $name:ident: $t:ty, $to:ident;)*) => {$(
        $(#[$doc])*
        ///
        /// Panics if the field does not fit: the caller sized the buffer for its structure.
        pub fn $name(b: &mut [u8], at: usize, v: $t) {
            b[at..at + std::mem::size_of::<$t>()].copy_from_slice(&v.$to());
        }
    )*};
}

readers! {
    /// A big-endian `u16` at `at` (0 past the end).
    be16: u16, from_be_bytes;
    /// A big-endian `u32` at `at` (0 past the end).
    be32: u32, from_be_bytes;
    /// A big-endian `u64` at `at` (0 past the end).
    be64: u64, from_be_bytes;
    /// A little-endian `u16` at `at` (0 past the end).
    le16: u16, from_le_bytes;
    /// A little-endian `u32` at `at` (0 past the end).
    le32: u32, from_le_bytes;
    /// A little-endian `u64` at `at` (0 past the end).
    le64: u64, from_le_bytes;
}

writers! {
    /// Writes a big-endian `u16` at `at`.
    put_be16: u16, to_be_bytes;
    /// Writes a big-endian `u32` at `at`.
    put_be32: u32, to_be_bytes;
    /// Writes a big-endian `u64` at `at`.
    put_be64: u64, to_be_bytes;
    /// Writes a little-endian `u16` at `at`.
    put_le16: u16, to_le_bytes;
    /// Writes a little-endian `u32` at `at`.
    put_le32: u32, to_le_bytes;
    /// Writes a little-endian `u64` at `at`.
    put_le64: u64, to_le_bytes;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_and_short_slices_read_zero() {
        let mut b = [0u8; 16];
        put_be64(&mut b, 0, 0x0102_0304_0506_0708);
        put_le32(&mut b, 8, 0x0a0b_0c0d);
        put_le16(&mut b, 12, 0xbeef);
        put_be16(&mut b, 14, 0x1234);
        assert_eq!(b[0], 1);
        assert_eq!(be64(&b, 0), 0x0102_0304_0506_0708);
        assert_eq!(be32(&b, 4), 0x0506_0708);
        assert_eq!(le32(&b, 8), 0x0a0b_0c0d);
        assert_eq!(le16(&b, 12), 0xbeef);
        assert_eq!(be16(&b, 14), 0x1234);
        assert_eq!(
            le64(&b, 8),
            u64::from_le_bytes(b[8..16].try_into().unwrap())
        );
        assert_eq!(be64(&b, 9), 0, "past the end");
        assert_eq!(le32(&b, usize::MAX - 1), 0, "offset overflow");
    }
}

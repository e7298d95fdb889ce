//! GUIDs as VHDX stores them (Microsoft's mixed-endian layout) and the ones the format defines.

use std::fmt;

/// A GUID in its on-disk byte order: `Data1` (u32), `Data2` and `Data3` (u16) little-endian,
/// then eight bytes as they are.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// The all-zero GUID.
    pub const ZERO: Guid = Guid([0; 16]);

    /// Parses the textual form `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX` (braces allowed).
    pub fn parse(text: &str) -> Option<Guid> {
        let t = text.trim().trim_start_matches('{').trim_end_matches('}');
        let hex: String = t.chars().filter(|c| *c != '-').collect();
        if hex.len() != 32 || t.len() != 36 {
            return None;
        }
        let mut raw = [0u8; 16];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        let mut g = [0u8; 16];
        g[0..4].copy_from_slice(&[raw[3], raw[2], raw[1], raw[0]]);
        g[4..6].copy_from_slice(&[raw[5], raw[4]]);
        g[6..8].copy_from_slice(&[raw[7], raw[6]]);
        g[8..16].copy_from_slice(&raw[8..16]);
        Some(Guid(g))
    }

    /// A GUID from its textual form; for the constants below (panics at compile time on a typo).
    const fn lit(text: &str) -> Guid {
        let b = text.as_bytes();
        let mut raw = [0u8; 16];
        let mut i = 0;
        let mut j = 0;
        while i < b.len() {
            if b[i] == b'-' {
                i += 1;
                continue;
            }
            raw[j / 2] = raw[j / 2] * 16 + hexval(b[i]);
            j += 1;
            i += 1;
        }
        assert!(j == 32, "a GUID has 32 hex digits");
        Guid([
            raw[3], raw[2], raw[1], raw[0], raw[5], raw[4], raw[7], raw[6], raw[8], raw[9],
            raw[10], raw[11], raw[12], raw[13], raw[14], raw[15],
        ])
    }

    /// A random (version 4) GUID.
    pub fn random() -> Guid {
        let mut g: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
        g[7] = (g[7] & 0x0f) | 0x40;
        g[8] = (g[8] & 0x3f) | 0x80;
        Guid(g)
    }

    /// Reads a GUID at `at` of `b`.
    pub fn read(b: &[u8], at: usize) -> Guid {
        let mut g = [0u8; 16];
        g.copy_from_slice(&b[at..at + 16]);
        Guid(g)
    }

    /// Whether it is all zeros.
    pub fn is_zero(&self) -> bool {
        *self == Guid::ZERO
    }
}

const fn hexval(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => panic!("not a hex digit"),
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = &self.0;
        write!(
            f,
            "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-",
            g[3], g[2], g[1], g[0], g[5], g[4], g[7], g[6], g[8], g[9]
        )?;
        for b in &g[10..16] {
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{{self}}}")
    }
}

/// The BAT region.
pub const BAT_REGION: Guid = Guid::lit("2DC27766-F623-4200-9D64-115E9BFD4A08");
/// The metadata region.
pub const METADATA_REGION: Guid = Guid::lit("8B7CA206-4790-4B9A-B8FE-575F050F886E");
/// Metadata item: file parameters (block size, flags).
pub const FILE_PARAMETERS: Guid = Guid::lit("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
/// Metadata item: virtual disk size.
pub const VIRTUAL_DISK_SIZE: Guid = Guid::lit("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
/// Metadata item: the disk's SCSI page 83 identifier.
pub const PAGE83_DATA: Guid = Guid::lit("BECA12AB-B2E6-4523-93EF-C309E000C746");
/// Metadata item: logical sector size.
pub const LOGICAL_SECTOR_SIZE: Guid = Guid::lit("8141BF1D-A96F-4709-BA47-F233A8FAAB5F");
/// Metadata item: physical sector size.
pub const PHYSICAL_SECTOR_SIZE: Guid = Guid::lit("CDA348C7-445D-4471-9CC9-E9885251C556");
/// Metadata item: parent locator.
pub const PARENT_LOCATOR: Guid = Guid::lit("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C");
/// Parent locator type of a VHDX parent.
pub const VHDX_LOCATOR_TYPE: Guid = Guid::lit("B04AEFB7-D19E-4A81-B789-25B8E9445913");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_disk_order_matches_what_qemu_writes() {
        // The BAT region entry of a qemu-img image starts 66 77 c2 2d 23 f6 00 42.
        assert_eq!(
            &BAT_REGION.0[..8],
            &[0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42]
        );
        assert_eq!(
            BAT_REGION.to_string(),
            "2DC27766-F623-4200-9D64-115E9BFD4A08"
        );
        let g = Guid::random();
        assert_eq!(Guid::parse(&format!("{{{g}}}")), Some(g));
        assert_eq!(Guid::parse("nonsense"), None);
    }
}

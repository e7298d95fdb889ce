//! The VHD footer (512 bytes, big-endian), its checksum, the CHS geometry and the rule that picks
//! the guest-visible size from either.
//!
//! Every VHD ends with a footer; dynamic and differencing disks also keep a copy of it at offset 0.
//! The footer stores the size twice: as `current_size` and as a CHS geometry. Virtual PC used the
//! geometry (which rounds down), Hyper-V, Disk2vhd and XenServer use `current_size`. Like qemu we
//! read the creator application to choose, and use `current_size` whenever the geometry is the
//! largest one CHS can express (so images over about 127 GiB are never truncated).

use crate::bytes::{be32, be64};
use crate::error::{Result, StorageError};

/// Footer and sector size.
pub const SECTOR: u64 = 512;
/// The footer's cookie.
pub const COOKIE: &[u8; 8] = b"conectix";
/// `data_offset` of a fixed disk (no dynamic header).
pub const NO_DATA_OFFSET: u64 = u64::MAX;
/// The largest CHS geometry: 65535 cylinders, 16 heads, 255 sectors per track.
pub const MAX_CHS_SECTORS: u64 = 65535 * 16 * 255;
/// The largest disk qemu and the specification allow: 2040 GiB.
pub const MAX_SIZE: u64 = 0xff00_0000 * SECTOR;
/// Seconds from the Unix epoch to the VHD epoch (2000-01-01 00:00:00 UTC).
pub const VHD_EPOCH: u64 = 946_684_800;
/// Our creator application code.
pub const CREATOR_APP: &[u8; 4] = b"strt";
/// Creator applications whose images mean `current_size`, not the geometry (qemu's table).
const SIZE_CREATORS: [&[u8; 4]; 5] = [b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0"];

/// The kind of disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskType {
    /// Data from offset 0, footer after it.
    Fixed,
    /// Blocks allocated on demand through a BAT.
    Dynamic,
    /// A dynamic disk whose unallocated sectors come from a parent.
    Differencing,
}

impl DiskType {
    fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }

    /// The name `strata image info` shows (qemu's subformat names).
    pub fn name(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }
}

/// Cylinders, heads and sectors per track.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors: u8,
}

impl Geometry {
    /// Sectors the geometry addresses.
    pub fn total(self) -> u64 {
        self.cylinders as u64 * self.heads as u64 * self.sectors as u64
    }

    /// The largest geometry.
    pub const MAX: Geometry = Geometry {
        cylinders: 65535,
        heads: 16,
        sectors: 255,
    };

    /// The geometry of `sectors` sectors by the VHD specification's algorithm (appendix
    /// "CHS calculation"), which rounds down.
    pub fn for_sectors(sectors: u64) -> Geometry {
        let total = sectors.min(MAX_CHS_SECTORS);
        let (spt, heads, cth) = if total >= 65535 * 16 * 63 {
            (255u64, 16u64, total / 255)
        } else {
            let mut spt = 17;
            let mut cth = total / spt;
            let mut heads = cth.div_ceil(1024).max(4);
            if cth >= heads * 1024 || heads > 16 {
                spt = 31;
                heads = 16;
                cth = total / spt;
            }
            if cth >= heads * 1024 {
                spt = 63;
                heads = 16;
                cth = total / spt;
            }
            (spt, heads, cth)
        };
        Geometry {
            cylinders: (cth / heads) as u16,
            heads: heads as u8,
            sectors: spt as u8,
        }
    }

    /// The smallest geometry covering at least `sectors` sectors, and the size it gives, as qemu
    /// rounds a requested size up so that nothing is truncated. At the largest geometry the size
    /// is kept as asked.
    pub fn covering(sectors: u64) -> (Geometry, u64) {
        let want = sectors.min(MAX_CHS_SECTORS);
        let mut g = Geometry::for_sectors(want);
        // Each step past `want` raises the geometry's total by at most one track group, so this
        // ends within heads × sectors (≤ 4080) steps.
        let mut n = want;
        while g.total() < want {
            n += 1;
            g = Geometry::for_sectors(n);
        }
        if g.total() == MAX_CHS_SECTORS {
            (g, sectors)
        } else {
            (g, g.total())
        }
    }
}

/// A parsed footer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    /// Features field (bit 1 always set).
    pub features: u32,
    /// Offset of the dynamic header, or [`NO_DATA_OFFSET`].
    pub data_offset: u64,
    /// Seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    /// Creator application (four characters).
    pub creator_app: [u8; 4],
    /// Creator version.
    pub creator_version: u32,
    /// Creator host OS (four characters).
    pub creator_os: [u8; 4],
    /// Size at creation.
    pub original_size: u64,
    /// Current size in bytes.
    pub current_size: u64,
    /// CHS geometry.
    pub geometry: Geometry,
    /// Disk type.
    pub disk_type: DiskType,
    /// Unique ID (a differencing child records its parent's).
    pub unique_id: [u8; 16],
    /// Saved-state flag.
    pub saved_state: u8,
}

/// One's complement of the byte sum, skipping the 4-byte checksum field at `skip`.
pub fn checksum(bytes: &[u8], skip: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(skip..skip + 4).contains(i))
        .fold(0u32, |s, (_, &b)| s.wrapping_add(b as u32));
    !sum
}

impl Footer {
    /// Parses and verifies a footer; `what` names it in errors.
    pub fn parse(b: &[u8], what: &str) -> Result<Footer> {
        let bad = |d: String| StorageError::corrupt(what, d);
        if b.len() < SECTOR as usize || &b[..8] != COOKIE {
            return Err(bad("no VHD footer (cookie 'conectix')".into()));
        }
        let stored = be32(b, 64);
        let want = checksum(&b[..SECTOR as usize], 64);
        if stored != want {
            return Err(bad(format!(
                "VHD footer checksum is {stored:08x}, expected {want:08x}"
            )));
        }
        let version = be32(b, 12);
        if version >> 16 != 1 {
            return Err(StorageError::Unsupported(format!(
                "VHD file format version {:#x} in {what}",
                version
            )));
        }
        let disk_type = match be32(b, 60) {
            2 => DiskType::Fixed,
            3 => DiskType::Dynamic,
            4 => DiskType::Differencing,
            t => return Err(bad(format!("unknown VHD disk type {t}"))),
        };
        let mut f = Footer {
            features: be32(b, 8),
            data_offset: be64(b, 16),
            timestamp: be32(b, 24),
            creator_app: [0; 4],
            creator_version: be32(b, 32),
            creator_os: [0; 4],
            original_size: be64(b, 40),
            current_size: be64(b, 48),
            geometry: Geometry {
                cylinders: u16::from_be_bytes([b[56], b[57]]),
                heads: b[58],
                sectors: b[59],
            },
            disk_type,
            unique_id: [0; 16],
            saved_state: b[84],
        };
        f.creator_app.copy_from_slice(&b[28..32]);
        f.creator_os.copy_from_slice(&b[36..40]);
        f.unique_id.copy_from_slice(&b[68..84]);
        if disk_type == DiskType::Fixed && f.data_offset != NO_DATA_OFFSET {
            tracing::debug!(image = what, "fixed VHD with a data offset; ignored");
        }
        if disk_type != DiskType::Fixed && f.data_offset % SECTOR != 0 {
            return Err(bad(format!(
                "dynamic header offset {} is not sector-aligned",
                f.data_offset
            )));
        }
        if f.saved_state != 0 {
            return Err(StorageError::Unsupported(format!(
                "{what} is in a saved state (a Virtual PC suspend); resume and shut down the VM that owns it first"
            )));
        }
        Ok(f)
    }

    /// The footer's 512 bytes, with its checksum.
    pub fn render(&self) -> [u8; SECTOR as usize] {
        let mut b = [0u8; SECTOR as usize];
        b[..8].copy_from_slice(COOKIE);
        b[8..12].copy_from_slice(&self.features.to_be_bytes());
        b[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.timestamp.to_be_bytes());
        b[28..32].copy_from_slice(&self.creator_app);
        b[32..36].copy_from_slice(&self.creator_version.to_be_bytes());
        b[36..40].copy_from_slice(&self.creator_os);
        b[40..48].copy_from_slice(&self.original_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        b[56..58].copy_from_slice(&self.geometry.cylinders.to_be_bytes());
        b[58] = self.geometry.heads;
        b[59] = self.geometry.sectors;
        b[60..64].copy_from_slice(&self.disk_type.code().to_be_bytes());
        b[68..84].copy_from_slice(&self.unique_id);
        b[84] = self.saved_state;
        let sum = checksum(&b, 64);
        b[64..68].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// The guest-visible size: the geometry's for Virtual PC-style creators, `current_size` for
    /// Hyper-V-style ones and whenever the geometry is the largest (see the module documentation).
    pub fn guest_size(&self) -> u64 {
        let by_size = SIZE_CREATORS.iter().any(|c| **c == self.creator_app);
        let chs = self.geometry.total();
        if by_size || chs == MAX_CHS_SECTORS {
            self.current_size
        } else {
            chs * SECTOR
        }
    }

    /// Whether this footer's size rule follows `current_size`.
    pub fn sized_by_current_size(&self) -> bool {
        self.guest_size() == self.current_size
    }
}

/// Now in VHD time (seconds since 2000-01-01 UTC).
pub fn vhd_now() -> u32 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    unix.saturating_sub(VHD_EPOCH).min(u32::MAX as u64) as u32
}

/// Creator host OS code written by us (the specification's "Wi2k", as qemu writes too).
pub const CREATOR_OS: &[u8; 4] = b"Wi2k";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_what_qemu_writes() {
        // qemu-img create -f vpc a.vhd 100M: 1004/12/17 = 204816 sectors.
        let (g, n) = Geometry::covering(100 * 2048);
        assert_eq!(
            g,
            Geometry {
                cylinders: 1004,
                heads: 12,
                sectors: 17
            }
        );
        assert_eq!(n, 204816);
        // 1000 bytes: qemu makes 34816 bytes.
        assert_eq!(Geometry::covering(2).1 * SECTOR, 34816);
        // 127 GiB and beyond: the largest geometry, size kept.
        let big = 200u64 << 21;
        assert_eq!(Geometry::covering(big), (Geometry::MAX, big));
    }

    #[test]
    fn footer_round_trips_and_checks_its_sum() {
        let f = Footer {
            features: 2,
            data_offset: 512,
            timestamp: 1,
            creator_app: *b"tap\0",
            creator_version: 0x10003,
            creator_os: *b"Wi2k",
            original_size: 1 << 30,
            current_size: 1 << 30,
            geometry: Geometry::for_sectors(1 << 21),
            disk_type: DiskType::Dynamic,
            unique_id: [7; 16],
            saved_state: 0,
        };
        let mut b = f.render();
        assert_eq!(Footer::parse(&b, "t").unwrap(), f);
        assert_eq!(f.guest_size(), 1 << 30);
        b[100] ^= 1;
        let e = Footer::parse(&b, "t").unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
    }

    #[test]
    fn virtual_pc_images_use_the_geometry() {
        let mut f = Footer::parse(
            &Footer {
                features: 2,
                data_offset: NO_DATA_OFFSET,
                timestamp: 0,
                creator_app: *b"vpc ",
                creator_version: 0,
                creator_os: *b"Wi2k",
                original_size: 100 << 20,
                current_size: 100 << 20,
                geometry: Geometry::for_sectors(100 * 2048),
                disk_type: DiskType::Fixed,
                unique_id: [0; 16],
                saved_state: 0,
            }
            .render(),
            "t",
        )
        .unwrap();
        assert_eq!(
            f.guest_size(),
            Geometry::for_sectors(100 * 2048).total() * 512
        );
        f.creator_app = *b"win ";
        assert_eq!(f.guest_size(), 100 << 20);
    }
}

//! The `virtio_net_hdr` (virtio 1.2, 5.1.6) in front of every frame, as the tap also takes it
//! (`TUNSETVNETHDRSZ` 12, little-endian).
//!
//! A guest's TX header is untrusted: [`TxHeader::parse`] accepts only what the negotiated
//! features allow (checksum offload only with `CSUM`, each GSO type only with its `HOST_*`
//! feature, offsets inside the frame), and the header the tap gets is rebuilt from the checked
//! fields rather than copied.

use strata_storage::bytes::le16;

use super::{features, HDR_LEN};

/// `flags`: the checksum from `csum_start` on is to be filled in.
pub const F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum is known good (RX only).
pub const F_DATA_VALID: u8 = 2;
/// `gso_type`: not a GSO frame.
pub const GSO_NONE: u8 = 0;
/// `gso_type`: TCP over IPv4.
pub const GSO_TCPV4: u8 = 1;
/// `gso_type`: UDP (fragmentation offload).
pub const GSO_UDP: u8 = 3;
/// `gso_type`: TCP over IPv6.
pub const GSO_TCPV6: u8 = 4;
/// `gso_type`: the ECN bit.
pub const GSO_ECN: u8 = 0x80;

/// A checked TX header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxHeader {
    flags: u8,
    gso_type: u8,
    hdr_len: u16,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
}

impl TxHeader {
    /// Checks the guest's header `raw` for a frame of `frame_len` bytes under the negotiated
    /// `features`.
    pub fn parse(
        raw: &[u8; HDR_LEN],
        frame_len: usize,
        features: u64,
    ) -> Result<TxHeader, &'static str> {
        let h = TxHeader {
            flags: raw[0],
            gso_type: raw[1],
            hdr_len: le16(raw, 2),
            gso_size: le16(raw, 4),
            csum_start: le16(raw, 6),
            csum_offset: le16(raw, 8),
        };
        if h.flags & !F_NEEDS_CSUM != 0 {
            return Err("unknown or RX-only flags in a TX header");
        }
        if h.flags & F_NEEDS_CSUM != 0 {
            if features & features::CSUM == 0 {
                return Err("checksum offload without VIRTIO_NET_F_CSUM");
            }
            let end = usize::from(h.csum_start) + usize::from(h.csum_offset) + 2;
            if end > frame_len {
                return Err("checksum field outside the frame");
            }
        }
        let needed = match h.gso_type & !GSO_ECN {
            GSO_NONE if h.gso_type & GSO_ECN != 0 => return Err("ECN without a GSO type"),
            GSO_NONE => 0,
            GSO_TCPV4 => features::HOST_TSO4,
            GSO_TCPV6 => features::HOST_TSO6,
            GSO_UDP => features::HOST_UFO,
            _ => return Err("unknown GSO type"),
        };
        if features & needed != needed {
            return Err("a GSO type the device did not offer");
        }
        if h.gso_type & GSO_ECN != 0 && features & features::HOST_ECN == 0 {
            return Err("GSO with ECN without VIRTIO_NET_F_HOST_ECN");
        }
        if h.gso_type != GSO_NONE {
            if h.flags & F_NEEDS_CSUM == 0 {
                return Err("GSO without checksum offload");
            }
            if h.gso_size == 0 {
                return Err("GSO with a zero segment size");
            }
            if usize::from(h.hdr_len) > frame_len {
                return Err("GSO header length beyond the frame");
            }
        }
        Ok(h)
    }

    /// The header as the tap takes it.
    pub fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }
}

/// Fixes up the header the tap wrote in front of a received frame for the driver: flags and
/// GSO types it did not negotiate are impossible (the tap's offloads follow the negotiated
/// features) but are cleared all the same, and `num_buffers` is set.
pub fn fix_rx_header(hdr: &mut [u8], features: u64, num_buffers: u16) {
    if hdr.len() < HDR_LEN {
        return;
    }
    if features & features::GUEST_CSUM == 0 {
        hdr[0] = 0;
    } else {
        hdr[0] &= F_NEEDS_CSUM | F_DATA_VALID;
    }
    let allowed = match hdr[1] & !GSO_ECN {
        GSO_TCPV4 => features & features::GUEST_TSO4 != 0,
        GSO_TCPV6 => features & features::GUEST_TSO6 != 0,
        GSO_UDP => features & features::GUEST_UFO != 0,
        _ => hdr[1] == GSO_NONE,
    };
    let ecn_ok = hdr[1] & GSO_ECN == 0 || features & features::GUEST_ECN != 0;
    if !allowed || !ecn_ok {
        hdr[1] = GSO_NONE;
        hdr[2..6].fill(0);
    }
    hdr[10..12].copy_from_slice(&num_buffers.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(flags: u8, gso: u8, hdr_len: u16, gso_size: u16, start: u16, off: u16) -> [u8; 12] {
        TxHeader {
            flags,
            gso_type: gso,
            hdr_len,
            gso_size,
            csum_start: start,
            csum_offset: off,
        }
        .to_bytes()
    }

    #[test]
    fn tx_headers_need_their_features() {
        let all = features::CSUM | features::HOST_TSO4 | features::HOST_TSO6 | features::HOST_ECN;
        assert!(TxHeader::parse(&raw(0, 0, 0, 0, 0, 0), 60, 0).is_ok());
        let csum = raw(F_NEEDS_CSUM, 0, 0, 0, 34, 16);
        assert!(
            TxHeader::parse(&csum, 60, 0).is_err(),
            "CSUM not negotiated"
        );
        assert!(TxHeader::parse(&csum, 60, features::CSUM).is_ok());
        assert!(
            TxHeader::parse(&csum, 51, features::CSUM).is_err(),
            "field past the end"
        );
        let tso = raw(F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16);
        assert!(TxHeader::parse(&tso, 9000, features::CSUM).is_err());
        assert!(TxHeader::parse(&tso, 9000, all).is_ok());
        let ufo = raw(F_NEEDS_CSUM, GSO_UDP, 42, 1400, 34, 6);
        assert!(TxHeader::parse(&ufo, 9000, all).is_err(), "UFO not offered");
        let no_csum = raw(0, GSO_TCPV4, 54, 1448, 0, 0);
        assert!(TxHeader::parse(&no_csum, 9000, all).is_err());
        let zero_mss = raw(F_NEEDS_CSUM, GSO_TCPV6, 74, 0, 54, 16);
        assert!(TxHeader::parse(&zero_mss, 9000, all).is_err());
        assert!(TxHeader::parse(&raw(F_DATA_VALID, 0, 0, 0, 0, 0), 60, all).is_err());
        assert!(TxHeader::parse(&raw(0, 7, 0, 0, 0, 0), 60, all).is_err());
    }

    #[test]
    fn rx_headers_lose_what_was_not_negotiated() {
        let mut h = raw(F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16);
        fix_rx_header(&mut h, 0, 1);
        assert_eq!(h[0], 0);
        assert_eq!(h[1], GSO_NONE);
        assert_eq!(&h[10..12], &[1, 0]);
        let mut h = raw(F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16);
        fix_rx_header(&mut h, features::GUEST_CSUM | features::GUEST_TSO4, 3);
        assert_eq!((h[0], h[1]), (F_NEEDS_CSUM, GSO_TCPV4));
        assert_eq!(&h[10..12], &[3, 0]);
    }
}

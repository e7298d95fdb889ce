//! The control virtqueue (virtio 1.2, 5.1.6.5): RX mode, MAC filter tables, the MAC address,
//! and the number of queue pairs in use.
//!
//! A command is a chain of readable bytes (class, command, data) followed by a writable ack
//! byte. Commands are untrusted: the data is at most [`MAX_COMMAND`] bytes, tables at most
//! [`super::filter::MAX_TABLE_ENTRIES`] entries, and a command for a feature the driver did not
//! negotiate, or one we do not know, is answered with an error.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use super::filter::{SharedFilter, MAX_TABLE_ENTRIES};
use super::{features, MAX_CHAIN_DESCRIPTORS};
use crate::blk::chain::SharedMemory;

/// Ack: done.
pub const ACK_OK: u8 = 0;
/// Ack: refused.
pub const ACK_ERR: u8 = 1;

/// Class: RX mode.
pub const CLASS_RX: u8 = 0;
/// RX mode: promiscuous on/off.
pub const RX_PROMISC: u8 = 0;
/// RX mode: all-multicast on/off.
pub const RX_ALLMULTI: u8 = 1;
/// Class: MAC.
pub const CLASS_MAC: u8 = 1;
/// MAC: set the unicast and multicast tables.
pub const MAC_TABLE_SET: u8 = 0;
/// MAC: set the address.
pub const MAC_ADDR_SET: u8 = 1;
/// Class: multiqueue.
pub const CLASS_MQ: u8 = 4;
/// MQ: set the number of queue pairs in use.
pub const MQ_VQ_PAIRS_SET: u8 = 0;

/// Most bytes of one command (class and command byte, two full MAC tables).
pub const MAX_COMMAND: usize = 2 + 2 * (4 + 6 * MAX_TABLE_ENTRIES);

/// What the control queue changes, shared with the workers.
#[derive(Debug)]
pub struct CtrlState {
    /// The receive filter.
    pub filter: SharedFilter,
    /// Queue pairs in use (1 until the driver sets more with MQ).
    pub active_pairs: AtomicU16,
    /// Queue pairs offered.
    pub max_pairs: u16,
}

/// What one command asked that the caller must carry out.
#[derive(Debug, PartialEq, Eq)]
pub enum Effect {
    /// Nothing beyond the state change.
    None,
    /// The number of queue pairs changed: wake the workers to attach or detach their queues.
    PairsChanged,
}

/// Handles one chain; returns (used length, effect).
pub fn handle(
    descs: impl Iterator<Item = Descriptor>,
    mem: &SharedMemory,
    state: &Arc<CtrlState>,
    driver_features: u64,
) -> (u32, Effect) {
    let mut cmd = Vec::new();
    let mut ack: Option<GuestAddress> = None;
    let mut count = 0;
    let mut last_has_next = false;
    let mut bad = false;
    for d in descs.take(MAX_CHAIN_DESCRIPTORS + 1) {
        count += 1;
        last_has_next = d.has_next();
        if d.is_write_only() {
            if ack.is_some() || d.len() == 0 {
                bad = true; // One writable byte only.
            }
            ack = Some(d.addr());
            continue;
        }
        if ack.is_some() {
            bad = true; // Readable after writable.
        }
        let len = d.len() as usize;
        if cmd.len() + len > MAX_COMMAND {
            bad = true;
            continue;
        }
        let at = cmd.len();
        cmd.resize(at + len, 0);
        if mem.read_slice(&mut cmd[at..], d.addr()).is_err() {
            bad = true;
        }
    }
    let Some(ack) = ack else {
        return (0, Effect::None);
    };
    if count > MAX_CHAIN_DESCRIPTORS || last_has_next {
        return (0, Effect::None);
    }
    let (status, effect) = if bad {
        (ACK_ERR, Effect::None)
    } else {
        match run(&cmd, state, driver_features) {
            Ok(e) => (ACK_OK, e),
            Err(()) => (ACK_ERR, Effect::None),
        }
    };
    if mem.write_obj(status, ack).is_err() {
        return (0, Effect::None);
    }
    (1, effect)
}

fn run(cmd: &[u8], state: &CtrlState, features: u64) -> Result<Effect, ()> {
    let [class, command, data @ ..] = cmd else {
        return Err(());
    };
    let has = |f: u64| if features & f == f { Ok(()) } else { Err(()) };
    match (*class, *command) {
        (CLASS_RX, RX_PROMISC | RX_ALLMULTI) => {
            has(features::CTRL_RX)?;
            let [on] = data else { return Err(()) };
            let on = *on != 0;
            state.filter.update(|f| {
                if *command == RX_PROMISC {
                    f.promisc = on
                } else {
                    f.allmulti = on
                }
            });
            Ok(Effect::None)
        }
        (CLASS_MAC, MAC_TABLE_SET) => {
            has(features::CTRL_RX)?;
            let (unicast, rest) = table(data)?;
            let (multicast, rest) = table(rest)?;
            if !rest.is_empty() {
                return Err(());
            }
            state.filter.update(|f| {
                f.unicast = unicast;
                f.multicast = multicast;
            });
            Ok(Effect::None)
        }
        (CLASS_MAC, MAC_ADDR_SET) => {
            has(features::CTRL_MAC_ADDR)?;
            let mac: [u8; 6] = data.try_into().map_err(|_| ())?;
            if mac[0] & 1 != 0 {
                return Err(());
            }
            state.filter.update(|f| f.mac = mac);
            Ok(Effect::None)
        }
        (CLASS_MQ, MQ_VQ_PAIRS_SET) => {
            has(features::MQ)?;
            let pairs = u16::from_le_bytes(data.try_into().map_err(|_| ())?);
            if pairs == 0 || pairs > state.max_pairs {
                return Err(());
            }
            state.active_pairs.store(pairs, Ordering::SeqCst);
            Ok(Effect::PairsChanged)
        }
        _ => Err(()),
    }
}

/// One MAC table: a le32 count and that many addresses; returns it and the bytes after it.
fn table(data: &[u8]) -> Result<(Vec<[u8; 6]>, &[u8]), ()> {
    let n = data
        .get(0..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or(())?;
    if n > MAX_TABLE_ENTRIES {
        return Err(());
    }
    let body = data.get(4..4 + 6 * n).ok_or(())?;
    let macs = body
        .chunks_exact(6)
        .map(|c| [c[0], c[1], c[2], c[3], c[4], c[5]])
        .collect();
    Ok((macs, &data[4 + 6 * n..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> CtrlState {
        CtrlState {
            filter: SharedFilter::new([0x52, 0, 0, 0, 0, 1]),
            active_pairs: AtomicU16::new(1),
            max_pairs: 4,
        }
    }

    const ALL: u64 = features::CTRL_RX | features::CTRL_MAC_ADDR | features::MQ;

    #[test]
    fn commands_change_the_filter_and_the_pairs() {
        let s = state();
        assert_eq!(run(&[CLASS_RX, RX_PROMISC, 0], &s, ALL), Ok(Effect::None));
        assert!(!s.filter.snapshot().promisc);
        let mut t = vec![CLASS_MAC, MAC_TABLE_SET];
        t.extend_from_slice(&1u32.to_le_bytes());
        t.extend_from_slice(&[0x52, 0, 0, 0, 0, 9]);
        t.extend_from_slice(&1u32.to_le_bytes());
        t.extend_from_slice(&[0x01, 0, 0x5e, 0, 0, 1]);
        assert_eq!(run(&t, &s, ALL), Ok(Effect::None));
        assert_eq!(s.filter.snapshot().unicast, vec![[0x52, 0, 0, 0, 0, 9]]);
        assert_eq!(
            run(&[CLASS_MQ, MQ_VQ_PAIRS_SET, 3, 0], &s, ALL),
            Ok(Effect::PairsChanged)
        );
        assert_eq!(s.active_pairs.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn bad_commands_are_refused() {
        let s = state();
        let big = 1000u32.to_le_bytes();
        for (cmd, feats) in [
            (vec![CLASS_RX, RX_PROMISC, 0], 0),           // not negotiated
            (vec![CLASS_RX, RX_PROMISC], ALL),            // no data
            (vec![CLASS_MQ, MQ_VQ_PAIRS_SET, 9, 0], ALL), // more than offered
            (vec![CLASS_MQ, MQ_VQ_PAIRS_SET, 0, 0], ALL), // zero
            (vec![CLASS_MAC, MAC_ADDR_SET, 1, 0, 0, 0, 0, 1], ALL), // multicast MAC
            (
                vec![CLASS_MAC, MAC_TABLE_SET, big[0], big[1], big[2], big[3]],
                ALL,
            ),
            (vec![9, 9], ALL),
            (vec![], ALL),
        ] {
            assert_eq!(run(&cmd, &s, feats), Err(()), "{cmd:?}");
        }
        assert!(s.filter.snapshot().promisc);
        assert_eq!(s.active_pairs.load(Ordering::SeqCst), 1);
    }
}

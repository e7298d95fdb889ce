//! Refcount block entries of every width from 1 to 64 bits (docs/interop/qcow2.rst, "Host
//! cluster management"). Sub-byte widths count bits from the least significant one.

use crate::bytes::{be16, be32, be64, put_be16, put_be32, put_be64};

/// Reads entry `index` of a refcount block of width `1 << order` bits.
pub fn get(block: &[u8], order: u32, index: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let byte = block[index / per_byte];
            let shift = (index % per_byte) * bits;
            u64::from((byte >> shift) & ((1u16 << bits) - 1) as u8)
        }
        3 => u64::from(block[index]),
        4 => u64::from(be16(block, index * 2)),
        5 => u64::from(be32(block, index * 4)),
        _ => be64(block, index * 8),
    }
}

/// The bytes entry `index` of width `1 << order` bits lies in: offset and length.
pub fn span(order: u32, index: usize) -> (usize, usize) {
    let bits = 1usize << order.min(6);
    (index * bits / 8, bits.div_ceil(8))
}

/// Writes `value` (which must fit the width) into entry `index`.
pub fn set(block: &mut [u8], order: u32, index: usize, value: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (index % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let b = &mut block[index / per_byte];
            *b = (*b & !mask) | (((value as u8) << shift) & mask);
        }
        3 => block[index] = value as u8,
        4 => put_be16(block, index * 2, value as u16),
        5 => put_be32(block, index * 4, value as u32),
        _ => put_be64(block, index * 8, value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips_without_touching_neighbours() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let mut block = vec![0u8; 512];
            let n = 512 * 8 / bits as usize;
            for i in 0..n {
                set(&mut block, order, i, (i as u64 * 7 + 1) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get(&block, order, i),
                    (i as u64 * 7 + 1) & max,
                    "order {order} index {i}"
                );
            }
            set(&mut block, order, 5, max);
            assert_eq!(get(&block, order, 5), max);
            assert_eq!(get(&block, order, 4), (4 * 7 + 1) & max);
            assert_eq!(get(&block, order, 6), (6 * 7 + 1) & max);
        }
    }

    #[test]
    fn an_entry_changes_only_the_bytes_of_its_span() {
        for order in 0..=6u32 {
            let n = (512 * 8) >> order;
            for i in [0, 1, 7, n / 2 + 3, n - 1] {
                let mut block = vec![0u8; 512];
                set(&mut block, order, i, 1);
                let (at, len) = span(order, i);
                assert!(at + len <= 512);
                for (b, &v) in block.iter().enumerate() {
                    assert!(
                        v == 0 || (at..at + len).contains(&b),
                        "order {order} index {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn one_bit_refcounts_use_the_least_significant_bit_first() {
        let mut block = vec![0u8; 1];
        set(&mut block, 0, 0, 1);
        assert_eq!(block[0], 1);
        set(&mut block, 0, 7, 1);
        assert_eq!(block[0], 0x81);
    }
}

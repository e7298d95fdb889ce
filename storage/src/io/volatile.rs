//! Copies to and from memory that another party may change at any moment — a guest's memory,
//! which its vCPUs write while the device reads it — without ever forming a Rust reference to
//! it. A `&[u8]` over such memory would promise the compiler that the bytes do not change while
//! the reference lives, which the guest does not keep; volatile accesses make no such promise
//! (the way vm-memory reads guest memory). Accesses go a machine word at a time where the
//! external side is aligned, a byte at a time at the edges.
//!
//! Written here rather than taken from vm-memory: the block layer depends on no VMM crate, and
//! these four loops are all it needs.

use std::ptr;

const WORD: usize = std::mem::size_of::<u64>();

/// Bytes before `p` reaches word alignment, at most `n`.
fn head(p: *const u8, n: usize) -> usize {
    p.align_offset(WORD).min(n)
}

/// Copies `n` bytes from external memory at `src` into the Rust buffer at `dst`.
///
/// # Safety
/// `src` must be valid for reads of `n` bytes and `dst` valid for writes of `n` bytes, and the
/// two ranges must not overlap. Nothing else may hold a Rust reference to `dst`'s range.
pub unsafe fn read_into(src: *const u8, dst: *mut u8, n: usize) {
    let h = head(src, n);
    let words = (n - h) / WORD;
    // SAFETY: in all three loops every offset stays below `n`, inside both ranges the caller
    // vouched for; word reads are at word-aligned `src` addresses (`h` aligned it); the writes go
    // to the caller's buffer, unaligned-tolerant.
    unsafe {
        for i in 0..h {
            *dst.add(i) = ptr::read_volatile(src.add(i));
        }
        for w in 0..words {
            let at = h + w * WORD;
            let v = ptr::read_volatile(src.add(at).cast::<u64>());
            ptr::write_unaligned(dst.add(at).cast::<u64>(), v);
        }
        for i in h + words * WORD..n {
            *dst.add(i) = ptr::read_volatile(src.add(i));
        }
    }
}

/// Copies `n` bytes from the Rust buffer at `src` into external memory at `dst`.
///
/// # Safety
/// `src` must be valid for reads of `n` bytes and `dst` valid for writes of `n` bytes, and the
/// two ranges must not overlap.
pub unsafe fn write_from(src: *const u8, dst: *mut u8, n: usize) {
    let h = head(dst, n);
    let words = (n - h) / WORD;
    // SAFETY: as in `read_into`, with the roles swapped: word writes go to word-aligned `dst`
    // addresses, reads come from the caller's buffer, unaligned-tolerant.
    unsafe {
        for i in 0..h {
            ptr::write_volatile(dst.add(i), *src.add(i));
        }
        for w in 0..words {
            let at = h + w * WORD;
            let v = ptr::read_unaligned(src.add(at).cast::<u64>());
            ptr::write_volatile(dst.add(at).cast::<u64>(), v);
        }
        for i in h + words * WORD..n {
            ptr::write_volatile(dst.add(i), *src.add(i));
        }
    }
}

/// Writes `n` zero bytes into external memory at `dst`.
///
/// # Safety
/// `dst` must be valid for writes of `n` bytes.
pub unsafe fn fill_zero(dst: *mut u8, n: usize) {
    let h = head(dst, n);
    let words = (n - h) / WORD;
    // SAFETY: offsets below `n` inside the caller's range; word writes word-aligned.
    unsafe {
        for i in 0..h {
            ptr::write_volatile(dst.add(i), 0);
        }
        for w in 0..words {
            ptr::write_volatile(dst.add(h + w * WORD).cast::<u64>(), 0);
        }
        for i in h + words * WORD..n {
            ptr::write_volatile(dst.add(i), 0);
        }
    }
}

/// Whether the `n` bytes of external memory at `src` were all zero when read (each is read
/// once; the answer says nothing about later).
///
/// # Safety
/// `src` must be valid for reads of `n` bytes.
pub unsafe fn is_zero(src: *const u8, n: usize) -> bool {
    let h = head(src, n);
    let words = (n - h) / WORD;
    // SAFETY: offsets below `n` inside the caller's range; word reads word-aligned.
    unsafe {
        (0..h).all(|i| ptr::read_volatile(src.add(i)) == 0)
            && (0..words).all(|w| ptr::read_volatile(src.add(h + w * WORD).cast::<u64>()) == 0)
            && (h + words * WORD..n).all(|i| ptr::read_volatile(src.add(i)) == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_alignment_and_length_copies_exactly() {
        let src: Vec<u8> = (0..64u8).collect();
        for off in 0..9 {
            for n in 0..40 {
                let mut dst = vec![0xeeu8; 64];
                // SAFETY: in-bounds ranges of two distinct vectors.
                unsafe { read_into(src.as_ptr().add(off), dst.as_mut_ptr().add(3), n) };
                assert_eq!(&dst[3..3 + n], &src[off..off + n]);
                assert!(dst[..3].iter().chain(&dst[3 + n..]).all(|&b| b == 0xee));
                let mut ext = vec![0xeeu8; 64];
                // SAFETY: as above.
                unsafe { write_from(src.as_ptr().add(5), ext.as_mut_ptr().add(off), n) };
                assert_eq!(&ext[off..off + n], &src[5..5 + n]);
                assert!(ext[..off].iter().chain(&ext[off + n..]).all(|&b| b == 0xee));
                // SAFETY: in-bounds range of `ext`.
                unsafe { fill_zero(ext.as_mut_ptr().add(off), n) };
                // SAFETY: as above.
                assert!(unsafe { is_zero(ext.as_ptr().add(off), n) });
                if n > 0 {
                    ext[off + n - 1] = 1;
                    // SAFETY: as above.
                    assert!(!unsafe { is_zero(ext.as_ptr().add(off), n) });
                }
            }
        }
    }
}

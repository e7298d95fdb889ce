//! Comparing the guest-visible contents of two images, as `qemu-img compare` does.

use crate::device::BlockDevice;
use crate::error::Result;
use crate::io::blocking::BlockingQueue;

/// Bytes compared per step.
const CHUNK: u64 = 1 << 20;

/// The outcome of a comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Comparison {
    /// Same contents (an image's extra part, if any, reads as zeros).
    Identical,
    /// The first differing byte.
    MismatchAt(u64),
    /// Sizes differ (strict mode only).
    SizeMismatch,
}

/// Compares `a` and `b`. Without `strict`, the part of the larger image past the end of the
/// smaller must read as zeros; with it, different sizes are a mismatch.
pub fn compare(a: &dyn BlockDevice, b: &dyn BlockDevice, strict: bool) -> Result<Comparison> {
    let (sa, sb) = (a.size(), b.size());
    if strict && sa != sb {
        return Ok(Comparison::SizeMismatch);
    }
    let mut qa = BlockingQueue::open(a, 4)?;
    let mut qb = BlockingQueue::open(b, 4)?;
    let common = sa.min(sb);
    let mut at = 0;
    while at < common {
        let n = CHUNK.min(common - at) as usize;
        let x = qa.read_at(at, n)?;
        let y = qb.read_at(at, n)?;
        if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
            return Ok(Comparison::MismatchAt(at + i as u64));
        }
        at += n as u64;
    }
    let (q, end) = if sa > sb {
        (&mut qa, sa)
    } else {
        (&mut qb, sb)
    };
    while at < end {
        let n = CHUNK.min(end - at) as usize;
        let x = q.read_at(at, n)?;
        if let Some(i) = x.iter().position(|&v| v != 0) {
            return Ok(Comparison::MismatchAt(at + i as u64));
        }
        at += n as u64;
    }
    Ok(Comparison::Identical)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::HostFile;
    use crate::io::memory::MemoryDevice;

    #[test]
    fn finds_the_first_difference_and_treats_extra_zeros_as_equal() {
        let a = MemoryDevice::new(3 << 20);
        let b = MemoryDevice::new(2 << 20);
        assert_eq!(
            compare(a.as_ref(), b.as_ref(), false).unwrap(),
            Comparison::Identical
        );
        assert_eq!(
            compare(a.as_ref(), b.as_ref(), true).unwrap(),
            Comparison::SizeMismatch
        );
        b.write_all_at(1_500_000, &[1]).unwrap();
        assert_eq!(
            compare(a.as_ref(), b.as_ref(), false).unwrap(),
            Comparison::MismatchAt(1_500_000)
        );
        b.write_all_at(1_500_000, &[0]).unwrap();
        a.write_all_at(2_500_000, &[1]).unwrap();
        assert_eq!(
            compare(a.as_ref(), b.as_ref(), false).unwrap(),
            Comparison::MismatchAt(2_500_000)
        );
    }
}

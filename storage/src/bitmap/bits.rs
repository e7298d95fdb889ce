//! A dirty bitmap in memory: one bit per `granularity` bytes of a device, set by concurrent
//! writers with atomic operations, taken (read and cleared) atomically word by word.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use crate::error::{Result, StorageError};

/// Default granularity: 64 KiB.
pub const DEFAULT_GRANULARITY: u64 = 64 << 10;
/// Most bits one bitmap holds (so a bitmap of any device stays under 512 MiB of memory).
pub const MAX_BITS: u64 = 1 << 32;

/// Bits over a device. See the module documentation.
#[derive(Debug)]
pub struct Bits {
    granularity: u64,
    /// Device size and words, changed together by a resize.
    inner: RwLock<(u64, Vec<AtomicU64>)>,
}

/// Checks a granularity for a device of `size` bytes.
pub fn check_granularity(granularity: u64, size: u64) -> Result<()> {
    if !granularity.is_power_of_two() || !(512..=1 << 30).contains(&granularity) {
        return Err(StorageError::InvalidInput(format!(
            "Bitmap granularity {granularity} must be a power of two from 512 bytes to 1 GiB"
        )));
    }
    if size.div_ceil(granularity) > MAX_BITS {
        return Err(StorageError::InvalidInput(format!(
            "Bitmap granularity {granularity} is too fine for a device of {size} bytes (at most {MAX_BITS} bits)"
        )));
    }
    Ok(())
}

fn words_for(size: u64, granularity: u64) -> usize {
    size.div_ceil(granularity).div_ceil(64) as usize
}

impl Bits {
    /// Clear bits for a device of `size` bytes.
    pub fn new(size: u64, granularity: u64) -> Result<Bits> {
        check_granularity(granularity, size)?;
        let words = (0..words_for(size, granularity))
            .map(|_| AtomicU64::new(0))
            .collect();
        Ok(Bits {
            granularity,
            inner: RwLock::new((size, words)),
        })
    }

    /// Bits loaded from words saved earlier (extra words are ignored, missing ones clear).
    pub fn from_words(size: u64, granularity: u64, saved: &[u64]) -> Result<Bits> {
        check_granularity(granularity, size)?;
        // The size comes from a file: the words it stored must match it, so that the file's
        // own length bounds what is allocated here.
        if saved.len() != words_for(size, granularity) {
            return Err(StorageError::InvalidInput(format!(
                "{} bitmap words saved for a device of {size} bytes at granularity {granularity} (expected {})",
                saved.len(),
                words_for(size, granularity)
            )));
        }
        let b = Bits::new(size, granularity)?;
        {
            let g = b.read();
            for (w, v) in g.1.iter().zip(saved) {
                w.store(*v, Ordering::Relaxed);
            }
        }
        b.mask_tail();
        Ok(b)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, (u64, Vec<AtomicU64>)> {
        crate::sync::read(&self.inner)
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Size of the device covered.
    pub fn size(&self) -> u64 {
        self.read().0
    }

    /// Marks every chunk touched by `len` bytes at `offset`.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let g = self.read();
        let (size, words) = (&g.0, &g.1);
        let end = offset.saturating_add(len).min(*size);
        if offset >= end {
            return;
        }
        let first = offset / self.granularity;
        let last = (end - 1) / self.granularity;
        let mut bit = first;
        while bit <= last {
            let w = (bit / 64) as usize;
            let lo = bit % 64;
            let hi = (last - (bit - lo)).min(63);
            let mask = if hi - lo == 63 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo + 1)) - 1) << lo
            };
            if let Some(word) = words.get(w) {
                word.fetch_or(mask, Ordering::Relaxed);
            }
            bit += hi - lo + 1;
        }
    }

    /// Whether the byte at `offset` lies in a dirty chunk, and how many bytes from `offset` on
    /// (at most `max_len`, clipped to the device) share that state. Looks at no more words than
    /// the answer spans. `None` when `offset` is at or past the end.
    pub fn run_at(&self, offset: u64, max_len: u64) -> Option<(bool, u64)> {
        let g = self.read();
        let (size, words) = (g.0, &g.1);
        if offset >= size || max_len == 0 {
            return None;
        }
        let end = offset.saturating_add(max_len).min(size);
        let bit_of = |b: u64| {
            words
                .get((b / 64) as usize)
                .is_some_and(|w| w.load(Ordering::Relaxed) >> (b % 64) & 1 == 1)
        };
        let first = offset / self.granularity;
        let dirty = bit_of(first);
        let last = (end - 1) / self.granularity;
        let mut bit = first + 1;
        while bit <= last {
            let w = words
                .get((bit / 64) as usize)
                .map_or(0, |w| w.load(Ordering::Relaxed));
            // Bits that differ from the run's state, from `bit` on within this word.
            let differ = if dirty { !w } else { w } >> (bit % 64);
            if differ != 0 {
                bit += u64::from(differ.trailing_zeros());
                break;
            }
            bit += 64 - bit % 64;
        }
        let run_end = bit.saturating_mul(self.granularity).min(end);
        Some((dirty, run_end - offset))
    }

    /// A copy of the words.
    pub fn words(&self) -> Vec<u64> {
        self.read()
            .1
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .collect()
    }

    /// Reads and clears every word (each atomically): a write marked concurrently lands either
    /// in the result or in the bitmap, never nowhere.
    pub fn take(&self) -> Vec<u64> {
        self.read()
            .1
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel))
            .collect()
    }

    /// Sets every bit set in `words` (a merge).
    pub fn or_words(&self, words: &[u64]) {
        let g = self.read();
        for (w, v) in g.1.iter().zip(words) {
            w.fetch_or(*v, Ordering::Relaxed);
        }
        drop(g);
        self.mask_tail();
    }

    /// Clears every bit.
    pub fn clear(&self) {
        for w in self.read().1.iter() {
            w.store(0, Ordering::Relaxed);
        }
    }

    /// Sets every bit.
    pub fn set_all(&self) {
        for w in self.read().1.iter() {
            w.store(u64::MAX, Ordering::Relaxed);
        }
        self.mask_tail();
    }

    /// Clears bits past the end of the device in the last word.
    fn mask_tail(&self) {
        let g = self.read();
        let bits = g.0.div_ceil(self.granularity);
        if let Some(last) = g.1.last() {
            let used = bits % 64;
            if used != 0 {
                last.fetch_and((1u64 << used) - 1, Ordering::Relaxed);
            }
        }
    }

    /// Follows a device resize; a grown part is marked dirty (it was never copied anywhere).
    pub fn resize(&self, new_size: u64) -> Result<()> {
        check_granularity(self.granularity, new_size)?;
        let old = {
            let mut g = crate::sync::write(&self.inner);
            let old = g.0;
            g.1.resize_with(words_for(new_size, self.granularity), || AtomicU64::new(0));
            g.0 = new_size;
            old
        };
        self.mask_tail();
        if new_size > old {
            self.mark(old, new_size - old);
        }
        Ok(())
    }

    /// Dirty bits.
    pub fn count(&self) -> u64 {
        self.read()
            .1
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }
}

/// The byte ranges `(offset, len)` of the set bits of `words`, merged, clipped to `size`.
pub fn ranges(words: &[u64], granularity: u64, size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (wi, &w) in words.iter().enumerate() {
        let mut w = w;
        while w != 0 {
            let b = wi as u64 * 64 + u64::from(w.trailing_zeros());
            w &= w - 1;
            let start = b * granularity;
            if start >= size {
                break;
            }
            let len = granularity.min(size - start);
            match out.last_mut() {
                Some(last) if last.0 + last.1 == start => last.1 += len,
                _ => out.push((start, len)),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_cover_every_touched_chunk_and_merge_into_ranges() {
        let b = Bits::new(1 << 20, 4096).unwrap();
        b.mark(4095, 2);
        b.mark(65536, 65536 * 3);
        b.mark((1 << 20) - 1, 100);
        assert_eq!(b.count(), 2 + 48 + 1);
        let r = ranges(&b.words(), 4096, 1 << 20);
        assert_eq!(
            r,
            vec![(0, 8192), (65536, 196608), ((1 << 20) - 4096, 4096)]
        );
        let taken = b.take();
        assert_eq!(b.count(), 0);
        b.or_words(&taken);
        assert_eq!(b.count(), 51);
    }

    #[test]
    fn runs_report_state_and_length_from_an_offset() {
        let b = Bits::new(1 << 20, 4096).unwrap();
        b.mark(8192, 4096 * 100);
        assert_eq!(b.run_at(0, 1 << 20), Some((false, 8192)));
        assert_eq!(b.run_at(100, 1 << 20), Some((false, 8092)));
        assert_eq!(b.run_at(8192, 1 << 20), Some((true, 4096 * 100)));
        assert_eq!(b.run_at(9000, 10), Some((true, 10)));
        assert_eq!(
            b.run_at(8192 + 4096 * 100, 1 << 20),
            Some((false, (1 << 20) - 8192 - 4096 * 100))
        );
        assert_eq!(b.run_at(1 << 20, 1), None);
        b.set_all();
        assert_eq!(b.run_at(5, u64::MAX), Some((true, (1 << 20) - 5)));
    }

    #[test]
    fn resizing_marks_the_grown_part() {
        let b = Bits::new(100_000, 65536).unwrap();
        b.resize(300_000).unwrap();
        assert_eq!(
            ranges(&b.words(), 65536, 300_000),
            vec![(65536, 300_000 - 65536)]
        );
        b.clear();
        b.resize(70_000).unwrap();
        b.set_all();
        assert_eq!(b.count(), 2);
        assert!(Bits::new(1 << 40, 256).is_err());
        assert!(Bits::new(1 << 20, 3000).is_err());
    }
}

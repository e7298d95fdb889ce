//! A sparse byte array for the in-memory test engines: 64 KiB chunks allocated on first write,
//! so a test device can have a terabyte of virtual size and cost only what is written.

use std::collections::BTreeMap;

const CHUNK: u64 = 64 * 1024;

/// A sparse, growable byte array. Unwritten bytes read as zero.
#[derive(Clone, Debug, Default)]
pub(crate) struct SparseMem {
    chunks: BTreeMap<u64, Box<[u8]>>,
    len: u64,
}

impl SparseMem {
    pub(crate) fn with_len(len: u64) -> SparseMem {
        SparseMem {
            chunks: BTreeMap::new(),
            len,
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Copies bytes at `offset` into `buf`; bytes past the end read as zero.
    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) {
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let (idx, within) = (at / CHUNK, (at % CHUNK) as usize);
            let n = (CHUNK as usize - within).min(buf.len() - pos);
            match self.chunks.get(&idx) {
                Some(c) => buf[pos..pos + n].copy_from_slice(&c[within..within + n]),
                None => buf[pos..pos + n].fill(0),
            }
            pos += n;
        }
    }

    /// Writes `data` at `offset`, growing the length if needed.
    pub(crate) fn write(&mut self, offset: u64, data: &[u8]) {
        let mut pos = 0usize;
        while pos < data.len() {
            let at = offset + pos as u64;
            let (idx, within) = (at / CHUNK, (at % CHUNK) as usize);
            let n = (CHUNK as usize - within).min(data.len() - pos);
            let chunk = self
                .chunks
                .entry(idx)
                .or_insert_with(|| vec![0u8; CHUNK as usize].into_boxed_slice());
            chunk[within..within + n].copy_from_slice(&data[pos..pos + n]);
            pos += n;
        }
        self.len = self.len.max(offset + data.len() as u64);
    }

    /// Makes `len` bytes at `offset` read as zero, freeing whole chunks.
    pub(crate) fn zero(&mut self, offset: u64, len: u64) {
        let end = (offset + len).min(self.len);
        let mut at = offset;
        while at < end {
            let (idx, within) = (at / CHUNK, at % CHUNK);
            let n = (CHUNK - within).min(end - at);
            if n == CHUNK {
                self.chunks.remove(&idx);
            } else if let Some(c) = self.chunks.get_mut(&idx) {
                c[within as usize..(within + n) as usize].fill(0);
            }
            at += n;
        }
    }

    /// Truncates or extends.
    pub(crate) fn set_len(&mut self, len: u64) {
        if len < self.len {
            self.zero(len, self.len - len);
        }
        self.len = len;
    }

    pub(crate) fn allocated_bytes(&self) -> u64 {
        self.chunks.len() as u64 * CHUNK
    }

    /// Whether any byte of the chunk holding `offset` was ever written (for block status).
    pub(crate) fn chunk_allocated(&self, offset: u64) -> bool {
        self.chunks.contains_key(&(offset / CHUNK))
    }

    pub(crate) fn chunk_size() -> u64 {
        CHUNK
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_read_back_across_chunks_and_zero_frees() {
        let mut m = SparseMem::with_len(1 << 20);
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        m.write(1000, &data);
        let mut out = vec![0u8; data.len()];
        m.read(1000, &mut out);
        assert_eq!(out, data);
        m.zero(0, 1 << 20);
        m.read(1000, &mut out);
        assert!(out.iter().all(|&b| b == 0));
        assert_eq!(m.allocated_bytes(), 0);
    }
}

//! Replies waiting to be sent, and the connection's buffer pool.
//!
//! A [`Reply`] is a list of pieces: header bytes it owns, and ranges of one I/O buffer (the
//! buffer the storage queue read into). Replies are written with `writev` straight from those
//! pieces, several replies per system call when they are small; a structured read reply
//! describes the zero runs of its buffer as `NBD_REPLY_TYPE_OFFSET_HOLE` chunks instead of
//! sending them.

use std::io::IoSlice;

use strata_storage::io::IoBuf;
use strata_storage::util::is_zero;

use crate::proto::{self, chunk};

/// Most chunks one structured read reply is split into (the rest goes as one data chunk).
pub const MAX_READ_CHUNKS: usize = 128;
/// Zero runs are found in aligned blocks of this size.
pub const HOLE_BLOCK: u64 = 4096;

#[derive(Clone, Copy, Debug)]
enum Piece {
    Head { start: usize, len: usize },
    Data { start: usize, len: usize },
}

impl Piece {
    fn len(&self) -> usize {
        match *self {
            Piece::Head { len, .. } | Piece::Data { len, .. } => len,
        }
    }
}

/// One reply, possibly several chunks. See the module documentation.
#[derive(Debug)]
pub struct Reply {
    head: Vec<u8>,
    pieces: Vec<Piece>,
    buf: Option<IoBuf>,
    /// Next piece to send, and bytes of it already sent.
    at: (usize, usize),
}

impl Reply {
    fn new() -> Reply {
        Reply {
            head: Vec::new(),
            pieces: Vec::new(),
            buf: None,
            at: (0, 0),
        }
    }

    /// Marks the header bytes appended since `from` as one piece.
    fn head_since(&mut self, from: usize) {
        let len = self.head.len() - from;
        if len > 0 {
            self.pieces.push(Piece::Head { start: from, len });
        }
    }

    /// A simple reply header (no data).
    pub fn simple(handle: u64, error: u32) -> Reply {
        let mut r = Reply::new();
        proto::simple_reply(&mut r.head, error, handle);
        r.head_since(0);
        r
    }

    /// A simple read reply: header and the whole buffer.
    pub fn simple_read(handle: u64, buf: IoBuf) -> Reply {
        let mut r = Reply::simple(handle, 0);
        r.pieces.push(Piece::Data {
            start: 0,
            len: buf.len(),
        });
        r.buf = Some(buf);
        r
    }

    /// A structured success without payload.
    pub fn done(handle: u64) -> Reply {
        let mut r = Reply::new();
        proto::chunk_header(&mut r.head, chunk::FLAG_DONE, chunk::NONE, handle, 0);
        r.head_since(0);
        r
    }

    /// A structured error.
    pub fn error(handle: u64, error: u32, message: &str) -> Reply {
        let mut r = Reply::new();
        proto::error_chunk(&mut r.head, handle, error, message);
        r.head_since(0);
        r
    }

    /// A success or an error in whichever reply style the session uses.
    pub fn status(structured: bool, handle: u64, error: u32, message: &str) -> Reply {
        match (structured, error) {
            (false, e) => Reply::simple(handle, e),
            (true, 0) => Reply::done(handle),
            (true, e) => Reply::error(handle, e, message),
        }
    }

    /// A structured read reply for `buf`, read at `offset`: data chunks and hole chunks for
    /// whole aligned zero blocks; with `df`, one chunk (a hole only if everything is zero).
    pub fn structured_read(handle: u64, offset: u64, buf: IoBuf, df: bool) -> Reply {
        let mut r = Reply::new();
        let len = buf.len();
        if len == 0 {
            proto::chunk_header(&mut r.head, chunk::FLAG_DONE, chunk::NONE, handle, 0);
            r.head_since(0);
            return r;
        }
        let runs = zero_runs(&buf, offset, if df { 1 } else { MAX_READ_CHUNKS });
        let runs = if df && runs.len() > 1 {
            vec![(0, len, false)]
        } else {
            runs
        };
        let last = runs.len() - 1;
        for (i, &(start, n, zero)) in runs.iter().enumerate() {
            let flags = if i == last { chunk::FLAG_DONE } else { 0 };
            let from = r.head.len();
            let at = offset + start as u64;
            if zero {
                proto::chunk_header(&mut r.head, flags, chunk::OFFSET_HOLE, handle, 12);
                r.head.extend_from_slice(&at.to_be_bytes());
                r.head.extend_from_slice(&(n as u32).to_be_bytes());
                r.head_since(from);
            } else {
                let plen = 8 + n as u32;
                proto::chunk_header(&mut r.head, flags, chunk::OFFSET_DATA, handle, plen);
                r.head.extend_from_slice(&at.to_be_bytes());
                r.head_since(from);
                r.pieces.push(Piece::Data { start, len: n });
            }
        }
        r.buf = Some(buf);
        r
    }

    /// A structured block-status reply: one chunk per context, `(id, [(length, flags)])`.
    pub fn block_status(handle: u64, contexts: &[(u32, Vec<(u32, u32)>)]) -> Reply {
        let mut r = Reply::new();
        let last = contexts.len().saturating_sub(1);
        for (i, (id, extents)) in contexts.iter().enumerate() {
            let flags = if i == last { chunk::FLAG_DONE } else { 0 };
            let len = 4 + 8 * extents.len() as u32;
            proto::chunk_header(&mut r.head, flags, chunk::BLOCK_STATUS, handle, len);
            r.head.extend_from_slice(&id.to_be_bytes());
            for (l, f) in extents {
                r.head.extend_from_slice(&l.to_be_bytes());
                r.head.extend_from_slice(&f.to_be_bytes());
            }
        }
        r.head_since(0);
        r
    }

    /// Bytes of I/O buffer the reply holds.
    pub fn buffered(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.len())
    }

    /// Appends up to `max` slices of what is left to send.
    pub fn slices<'a>(&'a self, out: &mut Vec<IoSlice<'a>>, max: usize) {
        let data = self.buf.as_ref().and_then(|b| b.as_slice()).unwrap_or(&[]);
        for (i, p) in self.pieces.iter().enumerate().skip(self.at.0) {
            if out.len() >= max {
                return;
            }
            let skip = if i == self.at.0 { self.at.1 } else { 0 };
            let bytes = match *p {
                Piece::Head { start, len } => self.head.get(start + skip..start + len),
                Piece::Data { start, len } => data.get(start + skip..start + len),
            };
            // A buffer that is not one allocation of its own cannot occur (the pool makes
            // them); sending nothing for it would desynchronise the stream, so stop here.
            let Some(bytes) = bytes else { return };
            out.push(IoSlice::new(bytes));
        }
    }

    /// Marks `n` bytes as sent; returns how many of them belonged to this reply.
    pub fn advance(&mut self, mut n: usize) -> usize {
        let mut used = 0;
        while n > 0 && self.at.0 < self.pieces.len() {
            let left = self.pieces[self.at.0].len() - self.at.1;
            let k = left.min(n);
            self.at.1 += k;
            n -= k;
            used += k;
            if self.at.1 == self.pieces[self.at.0].len() {
                self.at = (self.at.0 + 1, 0);
            }
        }
        used
    }

    /// Whether everything was sent.
    pub fn is_sent(&self) -> bool {
        self.at.0 >= self.pieces.len()
    }

    /// The I/O buffer, for reuse once sent.
    pub fn take_buf(&mut self) -> Option<IoBuf> {
        self.buf.take()
    }
}

/// Runs `(start, len, zero)` covering `buf`; zero runs are whole blocks of [`HOLE_BLOCK`]
/// aligned on the device. At most `max` runs: the remainder becomes one data run.
fn zero_runs(buf: &IoBuf, offset: u64, max: usize) -> Vec<(usize, usize, bool)> {
    let len = buf.len();
    let Some(data) = buf.as_slice() else {
        return vec![(0, len, false)];
    };
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    let mut pos = 0usize;
    while pos < len {
        let abs = offset + pos as u64;
        let next = (pos + (HOLE_BLOCK - abs % HOLE_BLOCK) as usize).min(len);
        let whole = next - pos == HOLE_BLOCK as usize;
        let zero = whole && is_zero(&data[pos..next]);
        match runs.last_mut() {
            Some(last) if last.2 == zero => last.1 += next - pos,
            _ => {
                if runs.len() == max {
                    if let Some(last) = runs.last_mut() {
                        last.1 = len - last.0;
                        last.2 = false;
                    }
                    break;
                }
                runs.push((pos, next - pos, zero));
            }
        }
        pos = next;
    }
    runs
}

/// Reusable I/O buffers of one connection, and the bytes its requests and replies hold.
#[derive(Debug, Default)]
pub struct BufPool {
    free: Vec<IoBuf>,
    cached: usize,
    held: usize,
}

/// Most bytes a pool keeps for reuse.
const POOL_BYTES: usize = 16 << 20;
/// Most buffers a pool keeps.
const POOL_BUFFERS: usize = 64;

impl BufPool {
    /// A buffer of `len` bytes (contents unspecified: every user overwrites it fully).
    pub fn get(&mut self, len: usize) -> IoBuf {
        self.held += len;
        match self.free.iter().position(|b| b.len() == len) {
            Some(i) => {
                let b = self.free.swap_remove(i);
                self.cached -= b.len();
                b
            }
            None => IoBuf::new(len),
        }
    }

    /// Returns a buffer for reuse.
    pub fn put(&mut self, buf: IoBuf) {
        self.held = self.held.saturating_sub(buf.len());
        if buf.as_slice().is_some()
            && self.cached + buf.len() <= POOL_BYTES
            && self.free.len() < POOL_BUFFERS
        {
            self.cached += buf.len();
            self.free.push(buf);
        }
    }

    /// Bytes in buffers handed out and not returned.
    pub fn held(&self) -> usize {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{be16, be32, be64};

    /// Sends a reply into a vector, `step` bytes at a time.
    fn flatten(r: &mut Reply, step: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while !r.is_sent() {
            let mut v = Vec::new();
            r.slices(&mut v, 3);
            let mut bytes: Vec<u8> = v.iter().flat_map(|s| s.iter().copied()).collect();
            bytes.truncate(step);
            drop(v);
            out.extend_from_slice(&bytes);
            assert_eq!(r.advance(bytes.len()), bytes.len());
        }
        out
    }

    #[test]
    fn structured_reads_send_holes_for_aligned_zero_blocks() {
        let mut buf = IoBuf::new(5 * 4096);
        buf.copy_from_slice(0, &[1; 100]);
        buf.copy_from_slice(4 * 4096 + 5, &[2; 10]);
        // Read at device offset 4096: blocks 1..=3 of the buffer are zero.
        let mut r = Reply::structured_read(9, 4096, buf, false);
        let out = flatten(&mut r, 7);
        // data chunk (block 0), hole (blocks 1-3), data chunk (block 4)
        assert_eq!(be16(&out, 6), chunk::OFFSET_DATA);
        assert_eq!(be64(&out, 20), 4096);
        let second = 20 + 8 + 4096;
        assert_eq!(be16(&out, second + 6), chunk::OFFSET_HOLE);
        assert_eq!(be64(&out, second + 20), 8192);
        assert_eq!(be32(&out, second + 28), 3 * 4096);
        let third = second + 32;
        assert_eq!(be16(&out, third + 4), chunk::FLAG_DONE);
        assert_eq!(out.len(), third + 28 + 4096);
        assert_eq!(out[third + 28 + 5], 2);

        let mut df = Reply::structured_read(9, 4096, IoBuf::new(8192), true);
        let out = flatten(&mut df, 1000);
        assert_eq!(be16(&out, 6), chunk::OFFSET_HOLE);
        let mut mixed = IoBuf::new(8192);
        mixed.copy_from_slice(0, &[1]);
        let out = flatten(&mut Reply::structured_read(1, 0, mixed, true), 1 << 20);
        assert_eq!(out.len(), 28 + 8192);
    }

    #[test]
    fn unaligned_edges_are_data_and_chunk_count_is_bounded() {
        let r = zero_runs(&IoBuf::new(4096), 100, 8);
        assert_eq!(r, vec![(0, 4096, false)]);
        let mut alternating = IoBuf::new(1024 * 4096);
        for i in (0..1024).step_by(2) {
            alternating.copy_from_slice(i * 4096, &[1]);
        }
        let r = zero_runs(&alternating, 0, MAX_READ_CHUNKS);
        assert_eq!(r.len(), MAX_READ_CHUNKS);
        let covered: usize = r.iter().map(|x| x.1).sum();
        assert_eq!(covered, 1024 * 4096);
        assert!(!r.last().unwrap().2);
    }

    #[test]
    fn pools_reuse_and_count_buffers() {
        let mut p = BufPool::default();
        let a = p.get(4096);
        assert_eq!(p.held(), 4096);
        p.put(a);
        assert_eq!(p.held(), 0);
        let b = p.get(4096);
        assert_eq!(p.cached, 0);
        p.put(b);
        let big = p.get(POOL_BYTES + 1);
        p.put(big);
        assert_eq!(p.free.len(), 1);
    }
}

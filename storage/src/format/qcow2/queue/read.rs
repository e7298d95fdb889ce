//! The read path of a qcow2 queue: maps a guest read under the metadata lock, fills zeros,
//! sends allocated and unallocated pieces to the host or backing queue, and decompresses
//! compressed clusters (with a one-cluster cache, also used by allocating writes that copy a
//! compressed cluster in). A read whose L2 table is not in memory parks from that cluster on
//! until the table is read.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::error::{Result, StorageError};
use crate::format::qcow2::codec;
use crate::format::qcow2::entry::Mapping;
use crate::format::qcow2::meta::Await;
use crate::io::stack::ReqId;
use crate::io::{IoBuf, Op};

use super::{Blocked, Qcow2Layer, St, Sub, BACKING};

/// How far [`Qcow2Layer::map_range`] got.
enum Mapped {
    /// Every byte is in the extents.
    Done,
    /// Mapping stopped at this guest offset; what to do about it, decided under the lock.
    Stalled(u64, Await),
    /// The metadata is unusable.
    Failed(StorageError),
}

impl Qcow2Layer {
    /// The decompressed cluster whose compressed data is at `offset`.
    pub(super) fn decompressed(&mut self, offset: u64, len: u64) -> Result<&[u8]> {
        if self.zcache.as_ref().is_none_or(|(o, _)| *o != offset) {
            let file_len = self.img.file.len();
            if offset >= file_len {
                return Err(StorageError::corrupt(
                    &self.img.name,
                    format!("compressed cluster at {offset:#x} lies beyond the end of the file"),
                ));
            }
            let n = len.min(file_len - offset) as usize;
            let mut raw = vec![0u8; n];
            self.img.file.read_exact_at(offset, &mut raw)?;
            let mut out = vec![0u8; self.img.geo.cluster_size as usize];
            codec::decompress(self.img.codec, &raw, &mut out).map_err(|e| match e {
                StorageError::Corrupt { detail, .. } => StorageError::corrupt(
                    &self.img.name,
                    format!("compressed cluster at {offset:#x}: {detail}"),
                ),
                other => other,
            })?;
            self.zcache = Some((offset, out));
        }
        Ok(self
            .zcache
            .as_ref()
            .map(|(_, d)| d.as_slice())
            .unwrap_or(&[]))
    }

    /// Starts a guest read. A read that maps to one allocated extent — the common case, a read
    /// inside one cluster — goes down with its buffer and its own tag ([`Sub::Whole`]), without
    /// the fan-in bookkeeping of a split request.
    pub(super) fn start_read(&mut self, st: &mut St, tag: u64, offset: u64, buf: IoBuf) {
        let len = buf.len() as u64;
        let end = offset + len;
        let mapped = self.map_range(st.waker(), offset, end);
        if let Mapped::Done = mapped {
            if let [(_, n, Mapping::Allocated(h))] = self.extents[..] {
                if n == len {
                    st.send(
                        self.data_lower(),
                        Sub::Whole(tag),
                        Op::Read { offset: h, buf },
                    );
                    return;
                }
            }
        }
        let r = st.open(tag, Some(buf), len);
        self.read_mapped(st, r, offset, offset, end, mapped);
        st.close(r);
    }

    /// Reads guest `[g, g+len)` into request `r`, whose buffer starts at guest offset `base`.
    pub(super) fn read_range(&mut self, st: &mut St, r: ReqId, base: u64, g: u64, len: u64) {
        let end = g + len;
        let mapped = self.map_range(st.waker(), g, end);
        self.read_mapped(st, r, base, g, end, mapped);
    }

    /// Maps guest `[g, end)` into `self.extents` under the metadata lock, as far as the tables in
    /// memory allow.
    fn map_range(&mut self, waker: Option<&Arc<EventFd>>, g: u64, end: u64) -> Mapped {
        self.extents.clear();
        let mut m = match self.img.core.meta() {
            Ok(m) => m,
            Err(e) => return Mapped::Failed(e),
        };
        let mut at = g;
        let mut out = Mapped::Done;
        while at < end {
            match m.map(at, end - at) {
                Ok((mapping, run)) => {
                    push_extent(&mut self.extents, at, run, mapping, self.img.merge);
                    at += run;
                }
                Err(stall) => {
                    out = Mapped::Stalled(at, m.wait_for(stall, waker));
                    break;
                }
            }
        }
        m.end_op();
        out
    }

    /// Sends the extents [`Self::map_range`] mapped for request `r` (whose buffer starts at guest
    /// `base`; the mapping started at guest `g` and was to reach `end`), and parks or fails what
    /// it could not map.
    fn read_mapped(&mut self, st: &mut St, r: ReqId, base: u64, g: u64, end: u64, mapped: Mapped) {
        let stalled = match mapped {
            Mapped::Done => None,
            Mapped::Stalled(at, aw) => Some((at, aw)),
            Mapped::Failed(e) => {
                st.fail(r, e);
                return;
            }
        };
        let extents = std::mem::take(&mut self.extents);
        match extents.as_slice() {
            // The whole request in one piece on the host: its buffer goes down as it is.
            [(eg, n, Mapping::Allocated(h))] if *eg == base && *n == end - base && g == base => {
                // SAFETY: a whole piece takes no view.
                if let Some(buf) = unsafe { st.piece(r, true, 0, *n) } {
                    st.hold(r);
                    st.send(
                        self.data_lower(),
                        Sub::Piece(r),
                        Op::Read { offset: *h, buf },
                    );
                }
            }
            _ => {
                for &(eg, n, mapping) in &extents {
                    self.read_extent(st, r, (eg - base) as usize, eg, n, mapping);
                }
            }
        }
        self.extents = extents;
        if let Some((at, aw)) = stalled {
            if self.after_stall(st, r, aw) {
                self.park(
                    st,
                    Blocked::Read {
                        req: r,
                        base,
                        g: at,
                        len: end - at,
                    },
                );
            }
        }
    }

    fn read_extent(&mut self, st: &mut St, r: ReqId, off: usize, g: u64, n: u64, mapping: Mapping) {
        // SAFETY: planning hands each byte of a read to one extent at a time (the walk advances
        // past every extent it maps), and this extent's range is viewed again below only after
        // this view was dropped.
        let Some(mut view) = (unsafe { st.piece(r, false, off as u64, n) }) else {
            return; // The request failed (`Stack::piece`).
        };
        match mapping {
            Mapping::Zero => view.fill_zero(0, n as usize),
            Mapping::Unallocated => {
                let bsize = self.img.backing_size;
                if self.img.backing.is_none() || g >= bsize {
                    view.fill_zero(0, n as usize);
                    return;
                }
                let inside = n.min(bsize - g);
                if inside < n {
                    view.fill_zero(inside as usize, (n - inside) as usize);
                }
                drop(view);
                // SAFETY: the same extent's range again, after its first view was dropped.
                let Some(part) = (unsafe { st.piece(r, false, off as u64, inside) }) else {
                    return;
                };
                st.hold(r);
                st.send(
                    BACKING,
                    Sub::Piece(r),
                    Op::Read {
                        offset: g,
                        buf: part,
                    },
                );
            }
            Mapping::Allocated(h) => {
                st.hold(r);
                st.send(
                    self.data_lower(),
                    Sub::Piece(r),
                    Op::Read {
                        offset: h,
                        buf: view,
                    },
                );
            }
            Mapping::Compressed {
                offset,
                len,
                within,
            } => match self.decompressed(offset, len) {
                Ok(data) => {
                    let w = within as usize;
                    view.copy_from_slice(0, &data[w..w + n as usize]);
                }
                Err(e) => {
                    drop(view);
                    st.fail(r, e);
                }
            },
        }
    }
}

fn push_extent(extents: &mut Vec<(u64, u64, Mapping)>, g: u64, n: u64, m: Mapping, merge: bool) {
    if let Some(last) = extents.last_mut().filter(|_| merge) {
        let merged = match (last.2, m) {
            (Mapping::Allocated(h), Mapping::Allocated(h2)) => h + last.1 == h2,
            (Mapping::Zero, Mapping::Zero) | (Mapping::Unallocated, Mapping::Unallocated) => true,
            _ => false,
        };
        if merged && last.0 + last.1 == g {
            last.1 += n;
            return;
        }
    }
    extents.push((g, n, m));
}

//! The vmdk data plane: a queue that maps each request under the extents' short locks, splits
//! it into pieces with [`IoBuf::view`], and runs the pieces on the extent files' own queues
//! (and the parent's) outside any lock.
//!
//! Pieces that need no I/O (zeros) or that are synchronous by design (decompressing a
//! streamOptimized grain, copy-on-write of a grain over a parent, flush) complete in `submit`.
//! The queue is a layer of the stacked-queue mechanism (`crate::io::stack`), which owns the lower
//! queues and their backlogs, the fan-in of pieces, waiting and the drain on drop.

use std::fmt;
use std::io::Read;
use std::sync::Arc;

use crate::error::{Result, StorageError};
use crate::format::vmdk::header::{parse_grain_marker, GRAIN_MARKER_HEAD};
use crate::format::vmdk::image::{Inner, ReadTarget, WriteTarget, ZeroTarget};
use crate::io::blocking::BlockingQueue;
use crate::io::buf::in_order_and_disjoint;
use crate::io::stack::{Layer, Lower, ReqId, Stack, StackedQueue};
use crate::io::{check_range, Completion, IoBuf, IoQueue, Op, QueueOptions, Request};

/// The last decompressed grain, so sequential small reads inflate each grain once.
struct GrainCache {
    extent: usize,
    marker: u64,
    data: Vec<u8>,
}

/// A piece in flight: its request, and whether it is a read (whose end past the end of a file
/// reads as zeros).
type Piece = (ReqId, bool);

type St = Stack<Piece>;

/// What a vmdk queue does with requests. See the module documentation.
struct VmdkLayer {
    img: Arc<Inner>,
    grain_cache: Option<GrainCache>,
    parent_sync: Option<BlockingQueue>,
}

impl fmt::Debug for VmdkLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmdkLayer")
            .field("image", &self.img.name)
            .finish()
    }
}

/// Opens a queue on a vmdk image: lower queue `i` is extent file `i`, the one after the last
/// file is the parent's.
pub(crate) fn open_queue(img: Arc<Inner>, opts: &QueueOptions) -> Result<Box<dyn IoQueue>> {
    let files = img.files.clone();
    let parent = img.parent.clone();
    let name = img.name.clone();
    let lower = Lower {
        opener: Box::new(move |slot, o| match files.get(slot) {
            Some(f) => f.open_queue(o),
            None => match &parent {
                Some(p) => p.open_queue(o),
                None => Err(StorageError::corrupt(
                    &name,
                    "read from a parent that does not exist",
                )),
            },
        }),
        depth: opts.depth.max(32),
        own_eventfd: true,
    };
    let layer = VmdkLayer {
        img,
        grain_cache: None,
        parent_sync: None,
    };
    Ok(Box::new(StackedQueue::new(layer, opts, lower)?))
}

impl VmdkLayer {
    fn parent_slot(&self) -> usize {
        self.img.files.len()
    }

    /// Sends one piece of request `id` down.
    fn send(&mut self, st: &mut St, id: ReqId, slot: usize, op: Op) {
        let read = matches!(op, Op::Read { .. });
        st.hold(id);
        st.send(slot, (id, read), op);
    }

    fn start_read(&mut self, st: &mut St, tag: u64, offset: u64, mut buf: IoBuf) {
        let len = buf.len() as u64;
        if len == 0 {
            return st.complete_now(tag, Some(buf), Ok(0));
        }
        let pieces = match self.img.map_read(offset, len) {
            Ok(p) => p,
            Err(e) => return st.complete_now(tag, Some(buf), Err(e)),
        };
        if !in_order_and_disjoint(pieces.iter().map(|p| (p.pos, p.len)), len) {
            let e = StorageError::corrupt(&self.img.name, "a read mapped to overlapping pieces");
            return st.complete_now(tag, Some(buf), Err(e));
        }
        if let [p] = pieces.as_slice() {
            if let ReadTarget::Zero = p.target {
                buf.fill_zero(0, len as usize);
                return st.complete_now(tag, Some(buf), Ok(len));
            }
        }
        let id = st.open(tag, Some(buf), len);
        // One piece on a host file: the buffer goes down whole.
        let whole = matches!(pieces.as_slice(), [p] if matches!(p.target, ReadTarget::Host { .. }));
        let parent_size = self.img.parent.as_ref().map_or(0, |p| p.size());
        for p in pieces {
            // SAFETY: the pieces are disjoint (checked above), so no two views overlap.
            let Some(mut view) = (unsafe { st.piece(id, whole, p.pos, p.len) }) else {
                break; // The request failed (`Stack::piece`).
            };
            let r = match p.target {
                ReadTarget::Zero => {
                    view.fill_zero(0, p.len as usize);
                    Ok(())
                }
                ReadTarget::Host { file, offset: host } => {
                    self.send(
                        st,
                        id,
                        file,
                        Op::Read {
                            offset: host,
                            buf: view,
                        },
                    );
                    Ok(())
                }
                ReadTarget::Parent => {
                    let at = offset + p.pos;
                    let avail = parent_size.saturating_sub(at).min(p.len);
                    if avail < p.len {
                        view.fill_zero(avail as usize, (p.len - avail) as usize);
                    }
                    drop(view);
                    if avail > 0 {
                        // SAFETY: the same piece's range again, after its first view was dropped.
                        if let Some(v) = unsafe { st.piece(id, false, p.pos, avail) } {
                            let slot = self.parent_slot();
                            self.send(st, id, slot, Op::Read { offset: at, buf: v });
                        }
                    }
                    Ok(())
                }
                ReadTarget::Compressed {
                    extent,
                    marker,
                    within,
                } => self.read_compressed(extent, marker, within, &mut view),
            };
            if let Err(e) = r {
                st.fail(id, e);
            }
        }
        st.close(id);
    }

    fn read_compressed(
        &mut self,
        extent: usize,
        marker: u64,
        within: u64,
        view: &mut IoBuf,
    ) -> Result<()> {
        let hit = matches!(&self.grain_cache, Some(c) if c.extent == extent && c.marker == marker);
        if !hit {
            let ext = self.img.sparse(extent)?;
            let grain = ext.grain() as usize;
            let file = ext.file();
            let name = file.name().to_string();
            let mut head = [0u8; GRAIN_MARKER_HEAD];
            file.read_exact_at(marker, &mut head)?;
            let (_lba, clen) = parse_grain_marker(&head);
            let limit = 2 * grain + 4096;
            if clen == 0 || clen as usize > limit {
                return Err(StorageError::corrupt(
                    &name,
                    format!("compressed grain at byte {marker} has size {clen}"),
                ));
            }
            let mut comp = vec![0u8; clen as usize];
            file.read_exact_at(marker + GRAIN_MARKER_HEAD as u64, &mut comp)?;
            let mut data = Vec::with_capacity(grain);
            flate2::read::ZlibDecoder::new(&comp[..])
                .take(grain as u64 + 1)
                .read_to_end(&mut data)
                .map_err(|e| {
                    StorageError::corrupt(
                        &name,
                        format!("compressed grain at byte {marker} does not inflate: {e}"),
                    )
                })?;
            if data.len() > grain {
                return Err(StorageError::corrupt(
                    &name,
                    format!("compressed grain at byte {marker} inflates beyond the grain size"),
                ));
            }
            data.resize(grain, 0);
            self.grain_cache = Some(GrainCache {
                extent,
                marker,
                data,
            });
        }
        let cache = self
            .grain_cache
            .as_ref()
            .ok_or_else(|| StorageError::Unavailable("grain cache".into()))?;
        let w = within as usize;
        view.copy_from_slice(0, &cache.data[w..w + view.len()]);
        Ok(())
    }

    fn start_write(&mut self, st: &mut St, tag: u64, offset: u64, buf: IoBuf) {
        let len = buf.len() as u64;
        if len == 0 {
            return st.complete_now(tag, Some(buf), Ok(0));
        }
        if let Err(e) = self.img.touch() {
            return st.complete_now(tag, Some(buf), Err(e));
        }
        let pieces = match self.img.map_write(offset, len) {
            Ok(p) => p,
            Err(e) => return st.complete_now(tag, Some(buf), Err(e)),
        };
        let id = st.open(tag, Some(buf), len);
        // One piece on a host file: the buffer goes down whole.
        let whole =
            matches!(pieces.as_slice(), [p] if matches!(p.target, WriteTarget::Host { .. }));
        for p in pieces {
            // SAFETY: a write's views are only read by the queues they go to.
            let Some(view) = (unsafe { st.piece(id, whole, p.pos, p.len) }) else {
                break; // The request failed (`Stack::piece`).
            };
            let r = match p.target {
                WriteTarget::Host { file, offset: host } => {
                    self.send(
                        st,
                        id,
                        file,
                        Op::Write {
                            offset: host,
                            buf: view,
                        },
                    );
                    Ok(())
                }
                WriteTarget::Cow {
                    extent,
                    grain,
                    grain_start,
                } => {
                    let data = view.to_vec();
                    drop(view);
                    self.cow(extent, grain, grain_start, offset + p.pos, &data)
                }
            };
            if let Err(e) = r {
                st.fail(id, e);
            }
        }
        st.close(id);
    }

    /// Copy-on-write of one grain over the parent, synchronously: under the image's COW lock,
    /// fill a fresh grain with the parent's data and `data` at `at`, write it, then map it.
    fn cow(
        &mut self,
        extent: usize,
        grain: u64,
        grain_start: u64,
        at: u64,
        data: &[u8],
    ) -> Result<()> {
        let img = self.img.clone();
        let _guard = crate::sync::lock(&img.cow);
        let ext = img.sparse(extent)?;
        let g = ext.grain();
        let grain_len = g.min(img.size - grain_start);
        if let crate::format::vmdk::sparse::GrainMap::Data(host) = ext.lookup(grain)? {
            // Another writer filled it meanwhile.
            return ext.file().write_all_at(host + (at - grain_start), data);
        }
        let mut full = vec![0u8; g as usize];
        if let Some(parent) = &img.parent {
            let psize = parent.size();
            let avail = psize.saturating_sub(grain_start).min(grain_len);
            if avail > 0 {
                if self.parent_sync.is_none() {
                    self.parent_sync = Some(BlockingQueue::open(parent.as_ref(), 4)?);
                }
                if let Some(q) = self.parent_sync.as_mut() {
                    let got = q.read_at(grain_start, avail as usize)?;
                    full[..avail as usize].copy_from_slice(&got);
                }
            }
        }
        let within = (at - grain_start) as usize;
        full[within..within + data.len()].copy_from_slice(data);
        let host = ext.reserve_grain()?;
        ext.file().write_all_at(host, &full)?;
        ext.publish(grain, host)
    }

    fn start_zero(&mut self, st: &mut St, tag: u64, offset: u64, len: u64, unmap: bool) {
        if len == 0 {
            return st.complete_now(tag, None, Ok(0));
        }
        if let Err(e) = self.img.touch() {
            return st.complete_now(tag, None, Err(e));
        }
        let mut punch = Vec::new();
        let pieces = match self.img.map_zero(offset, len, unmap, &mut punch) {
            Ok(p) => p,
            Err(e) => return st.complete_now(tag, None, Err(e)),
        };
        let id = st.open(tag, None, 0);
        for (file, host, n) in punch {
            self.send(
                st,
                id,
                file,
                Op::Discard {
                    offset: host,
                    len: n,
                },
            );
        }
        for p in pieces {
            let r = match p.target {
                ZeroTarget::Nothing => Ok(()),
                ZeroTarget::Host {
                    file,
                    offset: host,
                    unmap,
                } => {
                    let op = if unmap && self.img.parent.is_none() {
                        Op::Discard {
                            offset: host,
                            len: p.len,
                        }
                    } else {
                        Op::WriteZeroes {
                            offset: host,
                            len: p.len,
                            unmap: false,
                        }
                    };
                    self.send(st, id, file, op);
                    Ok(())
                }
                ZeroTarget::Cow {
                    extent,
                    grain,
                    grain_start,
                } => {
                    let zeros = vec![0u8; p.len as usize];
                    self.cow(extent, grain, grain_start, offset + p.pos, &zeros)
                }
            };
            if let Err(e) = r {
                st.fail(id, e);
            }
        }
        st.close(id);
    }
}

impl Layer for VmdkLayer {
    type Sub = Piece;

    fn start(&mut self, st: &mut St, req: Request) {
        let tag = req.tag;
        if let Err(e) = check_range(&req.op, self.img.size) {
            return st.complete(Completion::of(req, Err(e)));
        }
        match req.op {
            Op::Flush => {
                let r = self.img.flush().map(|_| 0);
                st.complete_now(tag, None, r);
            }
            Op::Read { offset, buf } => self.start_read(st, tag, offset, buf),
            Op::Write { offset, buf } => self.start_write(st, tag, offset, buf),
            Op::Discard { offset, len } => self.start_zero(st, tag, offset, len, true),
            Op::WriteZeroes { offset, len, unmap } => self.start_zero(st, tag, offset, len, unmap),
        }
    }

    fn finished(&mut self, st: &mut St, (id, read): Piece, c: Completion) {
        st.release_piece(id, read, c);
    }
}

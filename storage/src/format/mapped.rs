//! A data-plane queue for formats that map each guest range onto pieces of one host file, zeros,
//! or a parent image: VHD and VHDX, whose block allocation tables do exactly that.
//!
//! The format implements [`BlockMap`]: under its own short lock it turns a request into pieces
//! (host offset / zeros / parent for reads; host offset or "done synchronously" for writes and
//! zeroing). [`MappedLayer`] runs host pieces on the host file's queue and parent pieces on the
//! parent's queue, outside any lock, with the caller's buffer (whole when the request is one
//! host piece, else [`IoBuf::view`]s of it). Pieces that need no I/O, or that the format does
//! synchronously (copy-on-write of sectors over a parent), finish in `submit`.
//!
//! The queue is a layer of the stacked-queue mechanism (`crate::io::stack`), which owns the
//! lower queues and their backlogs, the fan-in of pieces, waiting on an eventfd and the drain on
//! drop.

use std::fmt;
use std::sync::Arc;

use crate::device::{Extent, ExtentKind, SharedFile};
use crate::error::{Result, StorageError};
use crate::format::Image;
use crate::io::buf::in_order_and_disjoint;
use crate::io::stack::{Layer, Lower, ReqId, Stack, StackedQueue};
use crate::io::{check_range, Completion, IoBuf, IoQueue, Op, QueueOptions, Request};

/// Where a piece of a read comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReadTarget {
    /// Zeros.
    Zero,
    /// The parent image at the same guest offset.
    Parent,
    /// The host file at this byte offset.
    Host(u64),
}

/// Where a piece of a write goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WriteTarget {
    /// The host file at this byte offset.
    Host(u64),
    /// The format writes it itself, synchronously ([`BlockMap::write_sync`]).
    Sync,
}

/// What zeroing a piece takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ZeroTarget {
    /// Done already (it reads as zeros, or the format unmapped it).
    Nothing,
    /// Zero (or, with `unmap`, punch) this byte offset of the host file.
    Host { offset: u64, unmap: bool },
    /// The format writes zeros itself, synchronously ([`BlockMap::write_sync`]).
    Sync,
}

/// A piece of a request: `len` bytes at `pos` within it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Piece<T> {
    pub pos: u64,
    pub len: u64,
    pub target: T,
}

/// Appends `p`, merging it into the last piece when both continue each other.
pub(crate) fn push_piece<T: Copy + Mergeable>(out: &mut Vec<Piece<T>>, p: Piece<T>) {
    if let Some(last) = out.last_mut() {
        if last.pos + last.len == p.pos && last.target.continues(&p.target, last.len) {
            last.len += p.len;
            return;
        }
    }
    out.push(p);
}

/// Targets that can be merged with the next piece.
pub(crate) trait Mergeable {
    /// Whether `next` continues `self` after `len` bytes.
    fn continues(&self, next: &Self, len: u64) -> bool;
}

impl Mergeable for ReadTarget {
    fn continues(&self, next: &Self, len: u64) -> bool {
        match (self, next) {
            (ReadTarget::Host(a), ReadTarget::Host(b)) => a + len == *b,
            (a, b) => a == b,
        }
    }
}

impl Mergeable for WriteTarget {
    fn continues(&self, next: &Self, len: u64) -> bool {
        match (self, next) {
            (WriteTarget::Host(a), WriteTarget::Host(b)) => a + len == *b,
            _ => false,
        }
    }
}

impl Mergeable for ZeroTarget {
    fn continues(&self, next: &Self, len: u64) -> bool {
        match (self, next) {
            (
                ZeroTarget::Host {
                    offset: a,
                    unmap: u,
                },
                ZeroTarget::Host {
                    offset: b,
                    unmap: v,
                },
            ) => a + len == *b && u == v,
            (ZeroTarget::Nothing, ZeroTarget::Nothing) => true,
            _ => false,
        }
    }
}

/// Calls `f(block, offset within block, length)` for each block of `block_size` bytes that
/// `offset..offset + len` touches.
pub(crate) fn for_each_block(
    offset: u64,
    len: u64,
    block_size: u64,
    mut f: impl FnMut(u64, u64, u64) -> Result<()>,
) -> Result<()> {
    let mut at = offset;
    let end = offset + len;
    while at < end {
        let b = at / block_size;
        let within = at % block_size;
        let n = (block_size - within).min(end - at);
        f(b, within, n)?;
        at += n;
    }
    Ok(())
}

/// How a block of a block-table format answers block status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BlockClass {
    /// Holds data in this image, all of it at this host offset when known (then holes in the
    /// host file there read as zeros and are reported so).
    Data(Option<u64>),
    /// Reads as zeros without data.
    Zero,
    /// Not in this image: the parent's, or unallocated.
    Absent,
}

/// Most blocks one block-status answer walks.
const STATUS_SCAN_BLOCKS: u64 = 1 << 16;

/// Block status for block-table formats: the run of blocks from `offset` (within `size`) with
/// the class of the first, at most `len` bytes; absent blocks report the parent's status. A
/// block whose data lies at a known host offset reports, within that block, what the host file
/// has there (a hole is zeros), as qemu's block layer does: converting a dynamic image then
/// skips the unwritten parts of allocated blocks instead of reading them.
pub(crate) fn block_table_status(
    offset: u64,
    len: u64,
    size: u64,
    block_size: u64,
    class: impl Fn(u64) -> Result<BlockClass>,
    parent: Option<&Arc<dyn Image>>,
    host: &SharedFile,
) -> Result<Extent> {
    let end = offset.saturating_add(len).min(size);
    if offset >= end {
        return Err(StorageError::OutOfRange { offset, len, size });
    }
    let found = |kind, len| Ok(Extent { offset, len, kind });
    let first = class(offset / block_size)?;
    let in_block = (block_size - offset % block_size).min(end - offset);
    if let BlockClass::Data(Some(at)) = first {
        let pos = at + offset % block_size;
        let host_len = host.len();
        if pos >= host_len {
            // A block that runs past the end of the file reads zeros there.
            return found(ExtentKind::Zero, in_block);
        }
        let s = host.block_status(pos, in_block.min(host_len - pos))?;
        let kind = match s.kind {
            ExtentKind::Data => ExtentKind::Data,
            _ => ExtentKind::Zero,
        };
        return found(kind, s.len.clamp(1, in_block));
    }
    let mut n = in_block;
    let mut scanned = 1;
    while offset + n < end
        && scanned < STATUS_SCAN_BLOCKS
        && class((offset + n) / block_size)? == first
    {
        n = (n + block_size).min(end - offset);
        scanned += 1;
    }
    match (first, parent) {
        (BlockClass::Data(_), _) => found(ExtentKind::Data, n),
        (BlockClass::Zero, _) => found(ExtentKind::Zero, n),
        (BlockClass::Absent, Some(p)) if offset < p.size() => {
            let s = p.block_status(offset, n.min(p.size() - offset))?;
            found(s.kind, s.len)
        }
        (BlockClass::Absent, _) => found(ExtentKind::Unallocated, n),
    }
}

/// What a format gives [`MappedLayer`]. See the module documentation.
pub(crate) trait BlockMap: Send + Sync + fmt::Debug + 'static {
    /// The image's name, for messages.
    fn name(&self) -> &str;
    /// Guest-visible size.
    fn size(&self) -> u64;
    /// The host file data pieces go to.
    fn host(&self) -> &SharedFile;
    /// The parent image, for [`ReadTarget::Parent`] pieces.
    fn parent(&self) -> Option<&Arc<dyn Image>>;
    /// Maps a read of `len` bytes at `offset`.
    fn map_read(&self, offset: u64, len: u64) -> Result<Vec<Piece<ReadTarget>>>;
    /// Maps a write, allocating what it needs.
    fn map_write(&self, offset: u64, len: u64) -> Result<Vec<Piece<WriteTarget>>>;
    /// Maps zeroing (`unmap`: space may be freed).
    fn map_zero(&self, offset: u64, len: u64, unmap: bool) -> Result<Vec<Piece<ZeroTarget>>>;
    /// Writes `data` at guest `offset` synchronously (for [`WriteTarget::Sync`] and
    /// [`ZeroTarget::Sync`] pieces).
    fn write_sync(&self, offset: u64, data: &[u8]) -> Result<()>;
    /// Makes completed writes and the metadata describing them durable.
    fn flush(&self) -> Result<()>;
    /// Whether the image was opened for writing.
    fn writable(&self) -> bool;
    /// Block status (see [`crate::BlockDevice::block_status`]).
    fn status(&self, offset: u64, len: u64) -> Result<Extent>;
}

/// Implements [`crate::BlockDevice`] for an image type `$ty` whose field `inner` is an
/// `Arc` of a [`BlockMap`]: queues are [`MappedLayer`]s over a stack, and resizing is refused
/// naming `$what`.
macro_rules! mapped_block_device {
    ($ty:ty, $what:literal) => {
        impl $crate::device::BlockDevice for $ty {
            fn size(&self) -> u64 {
                $crate::format::mapped::BlockMap::size(self.inner.as_ref())
            }

            fn capabilities(&self) -> $crate::device::Capabilities {
                use $crate::device::Capabilities as C;
                let mut caps = C::FLUSH | C::BLOCK_STATUS;
                if $crate::format::mapped::BlockMap::writable(self.inner.as_ref()) {
                    caps |= C::WRITE | C::DISCARD | C::WRITE_ZEROES;
                }
                caps
            }

            fn alignment(&self) -> usize {
                $crate::format::mapped::BlockMap::host(self.inner.as_ref()).alignment()
            }

            fn open_queue(
                &self,
                opts: &$crate::io::QueueOptions,
            ) -> $crate::error::Result<Box<dyn $crate::io::IoQueue>> {
                $crate::format::mapped::open_queue(self.inner.clone(), opts)
            }

            fn flush(&self) -> $crate::error::Result<()> {
                $crate::format::mapped::BlockMap::flush(self.inner.as_ref())
            }

            fn resize(&self, _new_size: u64) -> $crate::error::Result<()> {
                Err($crate::error::StorageError::Unsupported(format!(
                    "resizing {} images",
                    $what
                )))
            }

            fn block_status(
                &self,
                offset: u64,
                len: u64,
            ) -> $crate::error::Result<$crate::device::Extent> {
                $crate::format::mapped::BlockMap::status(self.inner.as_ref(), offset, len)
            }
        }
    };
}
pub(crate) use mapped_block_device;

/// Lower queue of the host file.
const HOST: usize = 0;
/// Lower queue of the parent image.
const PARENT: usize = 1;

/// A piece in flight: its request, and whether it is a read (whose end past the end of a file
/// reads as zeros).
type Sub = (ReqId, bool);

type St = Stack<Sub>;

/// Opens a queue on a [`BlockMap`]: lower queue [`HOST`] is the host file's, [`PARENT`] the
/// parent's (opened when a read first needs it).
pub(crate) fn open_queue<M: BlockMap>(
    map: Arc<M>,
    opts: &QueueOptions,
) -> Result<Box<dyn IoQueue>> {
    let below = map.clone();
    let lower = Lower {
        opener: Box::new(move |slot, o| match (slot, below.parent()) {
            (HOST, _) => below.host().open_queue(o),
            (_, Some(p)) => p.open_queue(o),
            (_, None) => Err(StorageError::corrupt(
                below.name(),
                "read from a parent that does not exist",
            )),
        }),
        depth: opts.depth.max(32),
        own_eventfd: true,
    };
    Ok(Box::new(StackedQueue::new(
        MappedLayer { map },
        opts,
        lower,
    )?))
}

/// What a queue over a [`BlockMap`] does with requests. See the module documentation.
pub(crate) struct MappedLayer<M: BlockMap> {
    map: Arc<M>,
}

impl<M: BlockMap> fmt::Debug for MappedLayer<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MappedLayer")
            .field("image", &self.map.name())
            .finish()
    }
}

/// Sends one piece of request `id` down to lower queue `slot`.
fn send(st: &mut St, id: ReqId, slot: usize, op: Op) {
    let read = matches!(op, Op::Read { .. });
    st.hold(id);
    st.send(slot, (id, read), op);
}

impl<M: BlockMap> MappedLayer<M> {
    fn start_read(&mut self, st: &mut St, tag: u64, offset: u64, mut buf: IoBuf) {
        let len = buf.len() as u64;
        let pieces = match self.map.map_read(offset, len) {
            Ok(p) => p,
            Err(e) => return st.complete_now(tag, Some(buf), Err(e)),
        };
        if !in_order_and_disjoint(pieces.iter().map(|p| (p.pos, p.len)), len) {
            let e = StorageError::corrupt(self.map.name(), "a read mapped to overlapping pieces");
            return st.complete_now(tag, Some(buf), Err(e));
        }
        if let [Piece {
            target: ReadTarget::Zero,
            ..
        }] = pieces.as_slice()
        {
            buf.fill_zero(0, len as usize);
            return st.complete_now(tag, Some(buf), Ok(len));
        }
        let id = st.open(tag, Some(buf), len);
        let whole = matches!(pieces.as_slice(), [p] if matches!(p.target, ReadTarget::Host(_)));
        let parent_size = self.map.parent().map_or(0, |p| p.size());
        for p in pieces {
            // SAFETY: the pieces are disjoint (checked above), so no two views overlap.
            let Some(mut view) = (unsafe { st.piece(id, whole, p.pos, p.len) }) else {
                break; // The request failed (`Stack::piece`).
            };
            match p.target {
                ReadTarget::Zero => view.fill_zero(0, p.len as usize),
                ReadTarget::Host(host) => send(
                    st,
                    id,
                    HOST,
                    Op::Read {
                        offset: host,
                        buf: view,
                    },
                ),
                ReadTarget::Parent => {
                    // A parent smaller than its child reads as zeros beyond its end.
                    let at = offset + p.pos;
                    let avail = parent_size.saturating_sub(at).min(p.len);
                    if avail < p.len {
                        view.fill_zero(avail as usize, (p.len - avail) as usize);
                    }
                    drop(view);
                    if avail > 0 {
                        // SAFETY: the same piece's range again, after its first view was dropped.
                        if let Some(v) = unsafe { st.piece(id, false, p.pos, avail) } {
                            send(st, id, PARENT, Op::Read { offset: at, buf: v });
                        }
                    }
                }
            }
        }
        st.close(id);
    }

    fn start_write(&mut self, st: &mut St, tag: u64, offset: u64, buf: IoBuf) {
        let len = buf.len() as u64;
        let pieces = match self.map.map_write(offset, len) {
            Ok(p) => p,
            Err(e) => return st.complete_now(tag, Some(buf), Err(e)),
        };
        let id = st.open(tag, Some(buf), len);
        let whole = matches!(pieces.as_slice(), [p] if matches!(p.target, WriteTarget::Host(_)));
        for p in pieces {
            // SAFETY: a write's views are only read by the queues they go to.
            let Some(view) = (unsafe { st.piece(id, whole, p.pos, p.len) }) else {
                break; // The request failed (`Stack::piece`).
            };
            match p.target {
                WriteTarget::Host(host) => send(
                    st,
                    id,
                    HOST,
                    Op::Write {
                        offset: host,
                        buf: view,
                    },
                ),
                WriteTarget::Sync => {
                    let data = view.to_vec();
                    drop(view);
                    if let Err(e) = self.map.write_sync(offset + p.pos, &data) {
                        st.fail(id, e);
                    }
                }
            }
        }
        st.close(id);
    }

    fn start_zero(&mut self, st: &mut St, tag: u64, offset: u64, len: u64, unmap: bool) {
        let pieces = match self.map.map_zero(offset, len, unmap) {
            Ok(p) => p,
            Err(e) => return st.complete_now(tag, None, Err(e)),
        };
        let id = st.open(tag, None, 0);
        for p in pieces {
            match p.target {
                ZeroTarget::Nothing => {}
                ZeroTarget::Host {
                    offset: host,
                    unmap,
                } => {
                    let op = if unmap {
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
                    send(st, id, HOST, op);
                }
                ZeroTarget::Sync => {
                    let zeros = vec![0u8; p.len as usize];
                    if let Err(e) = self.map.write_sync(offset + p.pos, &zeros) {
                        st.fail(id, e);
                    }
                }
            }
        }
        st.close(id);
    }
}

impl<M: BlockMap> Layer for MappedLayer<M> {
    type Sub = Sub;

    fn start(&mut self, st: &mut St, req: Request) {
        let tag = req.tag;
        if let Err(e) = check_range(&req.op, self.map.size()) {
            return st.complete(Completion::of(req, Err(e)));
        }
        match req.op {
            Op::Flush => {
                let r = self.map.flush().map(|_| 0);
                st.complete_now(tag, None, r);
            }
            Op::Read { offset, buf } => self.start_read(st, tag, offset, buf),
            Op::Write { offset, buf } => self.start_write(st, tag, offset, buf),
            Op::Discard { offset, len } => self.start_zero(st, tag, offset, len, true),
            Op::WriteZeroes { offset, len, unmap } => self.start_zero(st, tag, offset, len, unmap),
        }
    }

    fn finished(&mut self, st: &mut St, (id, read): Sub, c: Completion) {
        st.release_piece(id, read, c);
    }
}

//! A data-plane queue for formats that map each guest range onto pieces of one host file, zeros,
//! or a parent image: VHD and VHDX, whose block allocation tables do exactly that.
//!
//! The format implements [`BlockMap`]: under its own short lock it turns a request into pieces
//! (host offset / zeros / parent for reads; host offset or "done synchronously" for writes and
//! zeroing). [`MappedQueue`] runs host pieces on the host file's queue and parent pieces on the
//! parent's queue, outside any lock, with [`IoBuf::view`]s of the caller's buffer, and completes
//! the request when its last piece completes. Pieces that need no I/O, or that the format does
//! synchronously (copy-on-write of sectors over a parent), finish in `submit`.
//!
//! This is deliberately the whole per-format plumbing: when the block layer grows one stacked-queue
//! mechanism, formats keep their [`BlockMap`] and this file is what is replaced.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{Extent, ExtentKind, SharedFile};
use crate::error::{Result, StorageError};
use crate::format::Image;
use crate::io::{
    check_range, notify, Completion, IoBuf, IoQueue, Op, QueueFull, QueueOptions, Request,
};

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
    class: impl Fn(u64) -> BlockClass,
    parent: Option<&Arc<dyn Image>>,
    host: &SharedFile,
) -> Result<Extent> {
    let end = offset.saturating_add(len).min(size);
    if offset >= end {
        return Err(StorageError::OutOfRange { offset, len, size });
    }
    let found = |kind, len| Ok(Extent { offset, len, kind });
    let first = class(offset / block_size);
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
        && class((offset + n) / block_size) == first
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

/// What a format gives [`MappedQueue`]. See the module documentation.
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
/// `Arc` of a [`BlockMap`]: queues are [`MappedQueue`]s, and resizing is refused naming `$what`.
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
                Ok(Box::new($crate::format::mapped::MappedQueue::new(
                    self.inner.clone(),
                    opts,
                )?))
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

struct Lower {
    queue: Box<dyn IoQueue>,
    backlog: VecDeque<Request>,
}

impl Lower {
    fn busy(&self) -> bool {
        self.queue.in_flight() > 0 || !self.backlog.is_empty()
    }

    fn push(&mut self, req: Request) {
        if !self.backlog.is_empty() {
            return self.backlog.push_back(req);
        }
        if let Err(QueueFull(r)) = self.queue.submit(req) {
            self.backlog.push_back(r);
        }
    }

    fn drain_backlog(&mut self) {
        while let Some(r) = self.backlog.pop_front() {
            if let Err(QueueFull(r)) = self.queue.submit(r) {
                self.backlog.push_front(r);
                break;
            }
        }
    }
}

/// A request whose pieces are still running.
struct Pending {
    tag: u64,
    remaining: usize,
    error: Option<StorageError>,
    len: u64,
    /// The caller's buffer while views of it are in flight.
    whole: Option<Arc<IoBuf>>,
    has_buf: bool,
}

const HOST: usize = 0;
const PARENT: usize = 1;

/// A queue over a [`BlockMap`]. See the module documentation.
pub(crate) struct MappedQueue<M: BlockMap> {
    map: Arc<M>,
    opts: QueueOptions,
    lowers: [Option<Lower>; 2],
    pending: HashMap<u64, Pending>,
    next_id: u64,
    accepted: usize,
    ready: VecDeque<Completion>,
    lower_efd: Arc<EventFd>,
    scratch: Vec<Completion>,
}

impl<M: BlockMap> fmt::Debug for MappedQueue<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MappedQueue")
            .field("image", &self.map.name())
            .field("accepted", &self.accepted)
            .finish()
    }
}

impl<M: BlockMap> MappedQueue<M> {
    pub(crate) fn new(map: Arc<M>, opts: &QueueOptions) -> Result<MappedQueue<M>> {
        let lower_efd = match &opts.notifier {
            Some(n) => n.clone(),
            None => Arc::new(
                EventFd::new(EFD_NONBLOCK)
                    .map_err(|e| StorageError::io("Creating an eventfd", e))?,
            ),
        };
        Ok(MappedQueue {
            map,
            opts: opts.clone(),
            lowers: [None, None],
            pending: HashMap::new(),
            next_id: 1,
            accepted: 0,
            ready: VecDeque::new(),
            lower_efd,
            scratch: Vec::new(),
        })
    }

    fn lower(&mut self, slot: usize) -> Result<&mut Lower> {
        if self.lowers[slot].is_none() {
            let opts = QueueOptions {
                depth: self.opts.depth.max(32),
                notifier: Some(self.lower_efd.clone()),
                submit_batch: self.opts.submit_batch,
            };
            let queue = if slot == PARENT {
                match self.map.parent() {
                    Some(p) => p.open_queue(&opts)?,
                    None => {
                        return Err(StorageError::corrupt(
                            self.map.name(),
                            "read from a parent that does not exist",
                        ))
                    }
                }
            } else {
                self.map.host().open_queue(&opts)?
            };
            self.lowers[slot] = Some(Lower {
                queue,
                backlog: VecDeque::new(),
            });
        }
        self.lowers[slot]
            .as_mut()
            .ok_or_else(|| StorageError::Unavailable("lower queue".into()))
    }

    fn complete_now(&mut self, tag: u64, result: Result<u64>, buf: Option<IoBuf>) {
        self.ready.push_back(Completion { tag, result, buf });
    }

    fn start(&mut self, req: Request) {
        let tag = req.tag;
        if let Err(e) = check_range(&req.op, self.map.size()) {
            self.ready.push_back(Completion::of(req, Err(e)));
            return;
        }
        match req.op {
            Op::Flush => {
                let r = self.map.flush().map(|_| 0);
                self.complete_now(tag, r, None);
            }
            Op::Read { offset, buf } => self.start_read(tag, offset, buf),
            Op::Write { offset, buf } => self.start_write(tag, offset, buf),
            Op::Discard { offset, len } => self.start_zero(tag, offset, len, true),
            Op::WriteZeroes { offset, len, unmap } => self.start_zero(tag, offset, len, unmap),
        }
    }

    fn new_pending(&mut self, tag: u64, len: u64, has_buf: bool) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(
            id,
            Pending {
                tag,
                remaining: 0,
                error: None,
                len,
                whole: None,
                has_buf,
            },
        );
        id
    }

    fn send(&mut self, id: u64, slot: usize, op: Op) {
        match self.lower(slot) {
            Ok(lower) => {
                lower.push(Request { tag: id, op });
                if let Some(p) = self.pending.get_mut(&id) {
                    p.remaining += 1;
                }
            }
            Err(e) => self.fail(id, e),
        }
    }

    fn fail(&mut self, id: u64, e: StorageError) {
        if let Some(p) = self.pending.get_mut(&id) {
            p.error.get_or_insert(e);
        }
    }

    fn start_read(&mut self, tag: u64, offset: u64, buf: IoBuf) {
        let len = buf.len() as u64;
        let pieces = match self.map.map_read(offset, len) {
            Ok(p) => p,
            Err(e) => return self.complete_now(tag, Err(e), Some(buf)),
        };
        if !crate::io::buf::in_order_and_disjoint(pieces.iter().map(|p| (p.pos, p.len)), len) {
            let e = StorageError::corrupt(self.map.name(), "a read mapped to overlapping pieces");
            return self.complete_now(tag, Err(e), Some(buf));
        }
        let id = self.new_pending(tag, len, true);
        let whole = Arc::new(buf);
        let parent_size = self.map.parent().map_or(0, |p| p.size());
        for p in pieces {
            // SAFETY: the pieces are disjoint (checked above), so no two views of `whole` overlap;
            // `whole` itself is only unwrapped in `maybe_finish`, after every view's completion.
            let mut view = unsafe { IoBuf::view(&whole, p.pos as usize, p.len as usize) };
            match p.target {
                ReadTarget::Zero => view.fill_zero(0, p.len as usize),
                ReadTarget::Host(host) => self.send(
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
                        let v = unsafe { IoBuf::view(&whole, p.pos as usize, avail as usize) };
                        self.send(id, PARENT, Op::Read { offset: at, buf: v });
                    }
                }
            }
        }
        if let Some(p) = self.pending.get_mut(&id) {
            p.whole = Some(whole);
        }
        self.maybe_finish(id);
    }

    fn start_write(&mut self, tag: u64, offset: u64, buf: IoBuf) {
        let len = buf.len() as u64;
        let pieces = match self.map.map_write(offset, len) {
            Ok(p) => p,
            Err(e) => return self.complete_now(tag, Err(e), Some(buf)),
        };
        let id = self.new_pending(tag, len, true);
        let whole = Arc::new(buf);
        for p in pieces {
            match p.target {
                WriteTarget::Host(host) => {
                    // SAFETY: a write's views are only read (by the host file's queue), and
                    // `whole` is only unwrapped in `maybe_finish`, after every view's completion.
                    let view = unsafe { IoBuf::view(&whole, p.pos as usize, p.len as usize) };
                    self.send(
                        id,
                        HOST,
                        Op::Write {
                            offset: host,
                            buf: view,
                        },
                    );
                }
                WriteTarget::Sync => {
                    let mut data = vec![0u8; p.len as usize];
                    whole.copy_to_slice(p.pos as usize, &mut data);
                    if let Err(e) = self.map.write_sync(offset + p.pos, &data) {
                        self.fail(id, e);
                    }
                }
            }
        }
        if let Some(p) = self.pending.get_mut(&id) {
            p.whole = Some(whole);
        }
        self.maybe_finish(id);
    }

    fn start_zero(&mut self, tag: u64, offset: u64, len: u64, unmap: bool) {
        let pieces = match self.map.map_zero(offset, len, unmap) {
            Ok(p) => p,
            Err(e) => return self.complete_now(tag, Err(e), None),
        };
        let id = self.new_pending(tag, 0, false);
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
                    self.send(id, HOST, op);
                }
                ZeroTarget::Sync => {
                    let zeros = vec![0u8; p.len as usize];
                    if let Err(e) = self.map.write_sync(offset + p.pos, &zeros) {
                        self.fail(id, e);
                    }
                }
            }
        }
        self.maybe_finish(id);
    }

    fn maybe_finish(&mut self, id: u64) {
        if self.pending.get(&id).is_none_or(|p| p.remaining != 0) {
            return;
        }
        let Some(mut p) = self.pending.remove(&id) else {
            return;
        };
        let buf = match p.whole.take().map(Arc::try_unwrap) {
            Some(Ok(b)) => Some(b),
            Some(Err(_)) => {
                p.error.get_or_insert(StorageError::Unavailable(
                    "a view of a request buffer outlived its piece".into(),
                ));
                None
            }
            None => None,
        };
        let result = match p.error {
            Some(e) => Err(e),
            None => Ok(p.len),
        };
        self.ready.push_back(Completion {
            tag: p.tag,
            result,
            buf: if p.has_buf { buf } else { None },
        });
    }

    /// Reaps every lower queue, accounts the completions to their requests and drains backlogs.
    fn pump(&mut self) {
        let mut finished = Vec::new();
        for slot in [HOST, PARENT] {
            let Some(lower) = self.lowers[slot].as_mut() else {
                continue;
            };
            let mut out = std::mem::take(&mut self.scratch);
            lower.queue.reap(&mut out);
            lower.drain_backlog();
            for mut c in out.drain(..) {
                let Some(p) = self.pending.get_mut(&c.tag) else {
                    continue;
                };
                p.remaining = p.remaining.saturating_sub(1);
                match c.result {
                    Err(e) => {
                        p.error.get_or_insert(e);
                    }
                    Ok(n) => {
                        // A read that ended early at the end of a file reads zeros beyond.
                        if let Some(b) = c.buf.as_mut() {
                            if (n as usize) < b.len() && p.has_buf {
                                let l = b.len();
                                b.fill_zero(n as usize, l - n as usize);
                            }
                        }
                    }
                }
                drop(c.buf.take());
                if p.remaining == 0 {
                    finished.push(c.tag);
                }
            }
            self.scratch = out;
        }
        for id in finished {
            self.maybe_finish(id);
        }
    }
}

impl<M: BlockMap> IoQueue for MappedQueue<M> {
    fn depth(&self) -> usize {
        self.opts.depth
    }

    fn in_flight(&self) -> usize {
        self.accepted
    }

    fn submit(&mut self, req: Request) -> std::result::Result<(), QueueFull> {
        if self.accepted >= self.opts.depth {
            return Err(QueueFull(req));
        }
        self.accepted += 1;
        let before = self.ready.len();
        self.start(req);
        if self.ready.len() > before {
            // Finished without lower I/O: nothing below will signal an eventfd consumer.
            notify(self.opts.notifier.as_ref());
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        for l in self.lowers.iter_mut().flatten() {
            l.queue.commit()?;
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        self.pump();
        let n = self.ready.len();
        self.accepted -= n.min(self.accepted);
        out.extend(self.ready.drain(..));
        n
    }

    fn wait(&mut self, timeout: Option<Duration>) -> Result<()> {
        self.commit()?;
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            self.pump();
            if !self.ready.is_empty() {
                return Ok(());
            }
            let busy: Vec<usize> = (0..2)
                .filter(|&i| self.lowers[i].as_ref().is_some_and(Lower::busy))
                .collect();
            if busy.is_empty() {
                return Ok(());
            }
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(l) if !l.is_zero() => Some(l),
                    _ => return Ok(()),
                },
                None => None,
            };
            if let [one] = busy.as_slice() {
                if let Some(l) = self.lowers[*one].as_mut() {
                    l.queue.wait(left)?;
                }
                continue;
            }
            let ms = left.map_or(100, |l| l.as_millis().clamp(1, 100) as i32);
            let mut fds = [libc::pollfd {
                fd: self.lower_efd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: `fds` is a valid array of one pollfd for the duration of the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
            if r > 0 {
                let _ = self.lower_efd.read();
            }
        }
    }

    fn notifier(&self) -> Option<&Arc<EventFd>> {
        self.opts.notifier.as_ref()
    }
}

//! The vmdk data plane: a queue that maps each request under the extents' short locks, splits
//! it into pieces with [`IoBuf::view`], and runs the pieces on the extent files' own queues
//! (and the parent's) outside any lock.
//!
//! Pieces that need no I/O (zeros) or that are synchronous by design (decompressing a
//! streamOptimized grain, copy-on-write of a grain over a parent, flush) complete in `submit`.
//! A lower queue that is full keeps the rest of its pieces in a backlog that is drained as
//! completions are reaped, so one large request never fails for want of queue slots.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::error::{Result, StorageError};
use crate::format::vmdk::header::{parse_grain_marker, GRAIN_MARKER_HEAD};
use crate::format::vmdk::image::{Inner, ReadTarget, WriteTarget, ZeroTarget};
use crate::io::blocking::BlockingQueue;
use crate::io::{
    check_range, notify, Completion, IoBuf, IoQueue, Op, QueueFull, QueueOptions, Request,
};

struct Lower {
    queue: Box<dyn IoQueue>,
    backlog: VecDeque<Request>,
}

impl Lower {
    fn busy(&self) -> bool {
        self.queue.in_flight() > 0 || !self.backlog.is_empty()
    }

    fn push(&mut self, req: Request) {
        if self.backlog.is_empty() {
            if let Err(QueueFull(r)) = self.queue.submit(req) {
                self.backlog.push_back(r);
            }
        } else {
            self.backlog.push_back(req);
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

/// A request split into pieces that are still running.
struct Pending {
    tag: u64,
    remaining: usize,
    error: Option<StorageError>,
    len: u64,
    /// The caller's buffer while views of it are in flight.
    whole: Option<Arc<IoBuf>>,
    /// The caller's buffer when it went down whole (one piece).
    direct: Option<IoBuf>,
    has_buf: bool,
}

/// The last decompressed grain, so sequential small reads inflate each grain once.
struct GrainCache {
    extent: usize,
    marker: u64,
    data: Vec<u8>,
}

/// A queue on a vmdk image. See the module documentation.
pub struct VmdkQueue {
    img: Arc<Inner>,
    opts: QueueOptions,
    /// One per image file, then one for the parent; opened on first use.
    lowers: Vec<Option<Lower>>,
    pending: HashMap<u64, Pending>,
    next_id: u64,
    accepted: usize,
    ready: VecDeque<Completion>,
    lower_efd: Arc<EventFd>,
    scratch: Vec<Completion>,
    grain_cache: Option<GrainCache>,
    parent_sync: Option<BlockingQueue>,
}

impl fmt::Debug for VmdkQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmdkQueue")
            .field("image", &self.img.name)
            .field("accepted", &self.accepted)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl VmdkQueue {
    pub(crate) fn new(img: Arc<Inner>, opts: &QueueOptions) -> Result<VmdkQueue> {
        let lower_efd = match &opts.notifier {
            Some(n) => n.clone(),
            None => Arc::new(
                EventFd::new(EFD_NONBLOCK)
                    .map_err(|e| StorageError::io("Creating an eventfd", e))?,
            ),
        };
        let slots = img.files.len() + 1;
        Ok(VmdkQueue {
            img,
            opts: opts.clone(),
            lowers: (0..slots).map(|_| None).collect(),
            pending: HashMap::new(),
            next_id: 1,
            accepted: 0,
            ready: VecDeque::new(),
            lower_efd,
            scratch: Vec::new(),
            grain_cache: None,
            parent_sync: None,
        })
    }

    fn parent_slot(&self) -> usize {
        self.img.files.len()
    }

    fn lower(&mut self, slot: usize) -> Result<&mut Lower> {
        if self.lowers[slot].is_none() {
            let opts = QueueOptions {
                depth: self.opts.depth.max(32),
                notifier: Some(self.lower_efd.clone()),
                submit_batch: self.opts.submit_batch,
            };
            let queue = if slot == self.img.files.len() {
                match &self.img.parent {
                    Some(p) => p.open_queue(&opts)?,
                    None => {
                        return Err(StorageError::corrupt(
                            &self.img.name,
                            "read from a parent that does not exist",
                        ))
                    }
                }
            } else {
                self.img.files[slot].open_queue(&opts)?
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
        notify(self.opts.notifier.as_ref());
    }

    fn start(&mut self, req: Request) {
        let tag = req.tag;
        if let Err(e) = check_range(&req.op, self.img.size) {
            let c = Completion::of(req, Err(e));
            self.ready.push_back(c);
            notify(self.opts.notifier.as_ref());
            return;
        }
        match req.op {
            Op::Flush => {
                let r = self.img.flush().map(|_| 0);
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
                direct: None,
                has_buf,
            },
        );
        id
    }

    fn send(&mut self, id: u64, slot: usize, op: Op) -> Result<()> {
        let lower = self.lower(slot)?;
        lower.push(Request { tag: id, op });
        if let Some(p) = self.pending.get_mut(&id) {
            p.remaining += 1;
        }
        Ok(())
    }

    fn fail(&mut self, id: u64, e: StorageError) {
        if let Some(p) = self.pending.get_mut(&id) {
            p.error.get_or_insert(e);
        }
    }

    fn start_read(&mut self, tag: u64, offset: u64, mut buf: IoBuf) {
        let len = buf.len() as u64;
        if len == 0 {
            return self.complete_now(tag, Ok(0), Some(buf));
        }
        let pieces = match self.img.map_read(offset, len) {
            Ok(p) => p,
            Err(e) => return self.complete_now(tag, Err(e), Some(buf)),
        };
        let id = self.new_pending(tag, len, true);
        if let [p] = pieces.as_slice() {
            match p.target {
                ReadTarget::Host { file, offset: host } => {
                    if let Err(e) = self.send(id, file, Op::Read { offset: host, buf }) {
                        self.pending.remove(&id);
                        return self.complete_now(tag, Err(e), None);
                    }
                    return;
                }
                ReadTarget::Zero => {
                    self.pending.remove(&id);
                    buf.fill_zero(0, len as usize);
                    return self.complete_now(tag, Ok(len), Some(buf));
                }
                _ => {}
            }
        }
        if !crate::io::buf::in_order_and_disjoint(pieces.iter().map(|p| (p.pos, p.len)), len) {
            self.pending.remove(&id);
            let e = StorageError::corrupt(&self.img.name, "a read mapped to overlapping pieces");
            return self.complete_now(tag, Err(e), Some(buf));
        }
        let whole = Arc::new(buf);
        let parent_size = self.img.parent.as_ref().map_or(0, |p| p.size());
        for p in pieces {
            // SAFETY: the pieces are disjoint (checked above), so no two views of `whole` overlap;
            // `whole` is only unwrapped when the request's last piece has completed.
            let mut view = unsafe { IoBuf::view(&whole, p.pos as usize, p.len as usize) };
            let r = match p.target {
                ReadTarget::Zero => {
                    view.fill_zero(0, p.len as usize);
                    Ok(())
                }
                ReadTarget::Host { file, offset: host } => self.send(
                    id,
                    file,
                    Op::Read {
                        offset: host,
                        buf: view,
                    },
                ),
                ReadTarget::Parent => {
                    let at = offset + p.pos;
                    let avail = parent_size.saturating_sub(at).min(p.len);
                    if avail < p.len {
                        view.fill_zero(avail as usize, (p.len - avail) as usize);
                    }
                    if avail > 0 {
                        drop(view);
                        // SAFETY: the same piece again, after its first view was dropped.
                        let v = unsafe { IoBuf::view(&whole, p.pos as usize, avail as usize) };
                        let slot = self.parent_slot();
                        self.send(id, slot, Op::Read { offset: at, buf: v })
                    } else {
                        Ok(())
                    }
                }
                ReadTarget::Compressed {
                    extent,
                    marker,
                    within,
                } => self.read_compressed(extent, marker, within, &mut view),
            };
            if let Err(e) = r {
                self.fail(id, e);
            }
        }
        if let Some(p) = self.pending.get_mut(&id) {
            p.whole = Some(whole);
        }
        self.maybe_finish(id);
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

    fn start_write(&mut self, tag: u64, offset: u64, buf: IoBuf) {
        let len = buf.len() as u64;
        if len == 0 {
            return self.complete_now(tag, Ok(0), Some(buf));
        }
        if let Err(e) = self.img.touch() {
            return self.complete_now(tag, Err(e), Some(buf));
        }
        let pieces = match self.img.map_write(offset, len) {
            Ok(p) => p,
            Err(e) => return self.complete_now(tag, Err(e), Some(buf)),
        };
        let id = self.new_pending(tag, len, true);
        if let [p] = pieces.as_slice() {
            if let WriteTarget::Host { file, offset: host } = p.target {
                if let Err(e) = self.send(id, file, Op::Write { offset: host, buf }) {
                    self.pending.remove(&id);
                    return self.complete_now(tag, Err(e), None);
                }
                return;
            }
        }
        let whole = Arc::new(buf);
        for p in pieces {
            let r = match p.target {
                WriteTarget::Host { file, offset: host } => {
                    // SAFETY: a write's views are only read by the queues they go to; `whole` is
                    // only unwrapped when the request's last piece has completed.
                    let view = unsafe { IoBuf::view(&whole, p.pos as usize, p.len as usize) };
                    self.send(
                        id,
                        file,
                        Op::Write {
                            offset: host,
                            buf: view,
                        },
                    )
                }
                WriteTarget::Cow {
                    extent,
                    grain,
                    grain_start,
                } => {
                    let mut data = vec![0u8; p.len as usize];
                    whole.copy_to_slice(p.pos as usize, &mut data);
                    self.cow(extent, grain, grain_start, offset + p.pos, &data)
                }
            };
            if let Err(e) = r {
                self.fail(id, e);
            }
        }
        if let Some(p) = self.pending.get_mut(&id) {
            p.whole = Some(whole);
        }
        self.maybe_finish(id);
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
        let _guard = img.cow.lock().unwrap_or_else(|p| p.into_inner());
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

    fn start_zero(&mut self, tag: u64, offset: u64, len: u64, unmap: bool) {
        if len == 0 {
            return self.complete_now(tag, Ok(0), None);
        }
        if let Err(e) = self.img.touch() {
            return self.complete_now(tag, Err(e), None);
        }
        let mut punch = Vec::new();
        let pieces = match self.img.map_zero(offset, len, unmap, &mut punch) {
            Ok(p) => p,
            Err(e) => return self.complete_now(tag, Err(e), None),
        };
        let id = self.new_pending(tag, 0, false);
        for (file, host, n) in punch {
            if let Err(e) = self.send(
                id,
                file,
                Op::Discard {
                    offset: host,
                    len: n,
                },
            ) {
                self.fail(id, e);
            }
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
                    self.send(id, file, op)
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
                self.fail(id, e);
            }
        }
        self.maybe_finish(id);
    }

    fn maybe_finish(&mut self, id: u64) {
        let done = self.pending.get(&id).is_some_and(|p| p.remaining == 0);
        if !done {
            return;
        }
        let Some(mut p) = self.pending.remove(&id) else {
            return;
        };
        let buf = if let Some(d) = p.direct.take() {
            Some(d)
        } else if let Some(w) = p.whole.take() {
            match Arc::try_unwrap(w) {
                Ok(b) => Some(b),
                Err(_) => {
                    p.error.get_or_insert(StorageError::Unavailable(
                        "a view of a request buffer outlived its piece".into(),
                    ));
                    None
                }
            }
        } else {
            None
        };
        let result = match p.error {
            Some(e) => Err(e),
            None => Ok(p.len),
        };
        let buf = if p.has_buf { buf } else { None };
        self.ready.push_back(Completion {
            tag: p.tag,
            result,
            buf,
        });
    }

    /// Reaps every lower queue, accounts the completions to their requests and drains backlogs.
    fn pump(&mut self) {
        let mut finished = Vec::new();
        for slot in 0..self.lowers.len() {
            let Some(lower) = self.lowers[slot].as_mut() else {
                continue;
            };
            let mut out = std::mem::take(&mut self.scratch);
            lower.queue.reap(&mut out);
            lower.drain_backlog();
            for c in out.drain(..) {
                let Some(p) = self.pending.get_mut(&c.tag) else {
                    continue;
                };
                p.remaining = p.remaining.saturating_sub(1);
                match c.result {
                    Err(e) => {
                        p.error.get_or_insert(e);
                    }
                    Ok(n) => {
                        if let Some(mut b) = c.buf {
                            // A read that ended early at the end of a file reads zeros beyond.
                            if (n as usize) < b.len() && p.has_buf {
                                let l = b.len();
                                b.fill_zero(n as usize, l - n as usize);
                            }
                            if p.whole.is_none() && p.direct.is_none() && p.has_buf {
                                p.direct = Some(b);
                            }
                        }
                    }
                }
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

    fn busy_lowers(&self) -> Vec<usize> {
        self.lowers
            .iter()
            .enumerate()
            .filter(|(_, l)| l.as_ref().is_some_and(Lower::busy))
            .map(|(i, _)| i)
            .collect()
    }
}

impl IoQueue for VmdkQueue {
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
            // Some paths finish a request at submit without lower I/O (a discard of unallocated
            // grains); nothing below will signal, so wake an eventfd-driven consumer here.
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
            let busy = self.busy_lowers();
            if busy.is_empty() {
                return Ok(());
            }
            let left = match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Ok(());
                    }
                    Some(d - now)
                }
                None => None,
            };
            if let [one] = busy.as_slice() {
                if let Some(l) = self.lowers[*one].as_mut() {
                    l.queue.wait(left)?;
                }
                continue;
            }
            let ms = left.map_or(-1, |l| l.as_millis().clamp(1, i32::MAX as u128) as i32);
            let mut fds = [libc::pollfd {
                fd: self.lower_efd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: `fds` is a valid array of one pollfd for the duration of the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 1, ms.min(100)) };
            if r > 0 {
                let _ = self.lower_efd.read();
            }
        }
    }

    fn notifier(&self) -> Option<&Arc<EventFd>> {
        self.opts.notifier.as_ref()
    }
}

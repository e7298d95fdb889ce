//! Linear (thick) logical volumes: extents allocated up front, possibly on several PVs.
//!
//! The queue maps each request under a short read lock on the volume's extent map (shared with
//! the volume group, so a resize is seen at once) and forwards the pieces to the PVs' own
//! queues. Flush goes to every PV the volume uses; discard and write-zeroes go down as they are,
//! so they free or zero the host file's space.

use std::any::Any;
use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::device::{BlockDevice, Capabilities, Extent, ExtentKind};
use crate::error::{Result, StorageError};
use crate::io::{check_range, notify, Completion, IoQueue, Op, QueueFull, QueueOptions, Request};
use crate::volume::extents::ExtentMap;
use crate::volume::stack::{pv_alignment, remaining, Lowers, Parents, PvSet};

/// Something that resizes a volume through its volume group (allocation lives there).
pub(crate) type Resizer = Arc<dyn Fn(u64) -> Result<()> + Send + Sync>;

/// A linear logical volume. See the module documentation.
pub struct LinearDevice {
    name: String,
    map: Arc<RwLock<ExtentMap>>,
    pvs: PvSet,
    read_only: bool,
    alignment: usize,
    resizer: Resizer,
    /// Keeps the volume group's lock and the "volume is open" mark alive.
    guard: Arc<dyn Any + Send + Sync>,
}

impl fmt::Debug for LinearDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinearDevice")
            .field("name", &self.name)
            .field("size", &self.size())
            .finish()
    }
}

impl LinearDevice {
    pub(crate) fn new(
        name: String,
        map: Arc<RwLock<ExtentMap>>,
        pvs: PvSet,
        read_only: bool,
        resizer: Resizer,
        guard: Arc<dyn Any + Send + Sync>,
    ) -> LinearDevice {
        let alignment = pv_alignment(&pvs);
        LinearDevice {
            name,
            map,
            pvs,
            read_only,
            alignment,
            resizer,
            guard,
        }
    }

    /// `VG/NAME`.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn map(&self) -> std::sync::RwLockReadGuard<'_, ExtentMap> {
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }
}

impl BlockDevice for LinearDevice {
    fn size(&self) -> u64 {
        self.map().size()
    }

    fn capabilities(&self) -> Capabilities {
        let base = Capabilities::FLUSH
            | Capabilities::DISCARD
            | Capabilities::WRITE_ZEROES
            | Capabilities::WRITE_ZEROES_UNMAP;
        if self.read_only {
            base
        } else {
            base | Capabilities::WRITE | Capabilities::RESIZE
        }
    }

    fn alignment(&self) -> usize {
        self.alignment
    }

    fn open_queue(&self, opts: &QueueOptions) -> Result<Box<dyn IoQueue>> {
        Ok(Box::new(LinearQueue {
            name: self.name.clone(),
            map: self.map.clone(),
            read_only: self.read_only,
            lowers: Lowers::new(self.pvs.clone(), opts)?,
            parents: Parents::default(),
            ready: VecDeque::new(),
            scratch: Vec::new(),
            depth: opts.depth.max(1),
            notifier: opts.notifier.clone(),
            _guard: self.guard.clone(),
        }))
    }

    fn flush(&self) -> Result<()> {
        let pvs = self.pvs.read().unwrap_or_else(|p| p.into_inner()).clone();
        for i in self.map().pvs() {
            if let Some(f) = pvs.get(i) {
                f.sync_data()?;
            }
        }
        Ok(())
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        if self.read_only {
            return Err(StorageError::ReadOnly(self.name.clone()));
        }
        (self.resizer)(new_size)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let size = self.size();
        if offset >= size || len == 0 {
            return Err(StorageError::OutOfRange { offset, len, size });
        }
        Ok(Extent {
            offset,
            len: len.min(size - offset),
            kind: ExtentKind::Data,
        })
    }
}

/// A queue on a linear volume. See the module documentation.
pub struct LinearQueue {
    name: String,
    map: Arc<RwLock<ExtentMap>>,
    read_only: bool,
    lowers: Lowers,
    parents: Parents,
    ready: VecDeque<Completion>,
    scratch: Vec<Completion>,
    depth: usize,
    notifier: Option<Arc<EventFd>>,
    _guard: Arc<dyn Any + Send + Sync>,
}

impl fmt::Debug for LinearQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinearQueue")
            .field("name", &self.name)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

/// One piece: PV, offset on it, offset within the request, length.
type Piece = (usize, u64, u64, u64);

impl LinearQueue {
    fn complete_now(&mut self, req: Request, result: Result<u64>) {
        self.ready.push_back(Completion::of(req, result));
        notify(Some(self.lowers.efd()));
    }

    fn plan(map: &ExtentMap, offset: u64, len: u64) -> Result<Vec<Piece>> {
        let mut pieces = Vec::new();
        let mut at = 0u64;
        while at < len {
            let m = map.map(offset + at).ok_or(StorageError::OutOfRange {
                offset,
                len,
                size: map.size(),
            })?;
            let n = m.len.min(len - at);
            pieces.push((m.pv, m.pv_offset, at, n));
            at += n;
        }
        Ok(pieces)
    }

    fn dispatch(&mut self, mut req: Request) {
        let writes = !matches!(req.op, Op::Read { .. } | Op::Flush);
        if writes && self.read_only {
            let e = StorageError::ReadOnly(self.name.clone());
            return self.complete_now(req, Err(e));
        }
        let planned = {
            let map = self.map.read().unwrap_or_else(|p| p.into_inner());
            check_range(&req.op, map.size()).and_then(|()| match req.op.range() {
                None => Ok(map.pvs().into_iter().map(|pv| (pv, 0, 0, 0)).collect()),
                Some((offset, len)) => Self::plan(&map, offset, len),
            })
        };
        let pieces = match planned {
            Ok(p) => p,
            Err(e) => return self.complete_now(req, Err(e)),
        };
        if let Op::Flush = req.op {
            if pieces.is_empty() {
                return self.complete_now(req, Ok(0));
            }
            let id = self.parents.start(req.tag, None, 0, pieces.len() as u32);
            for (pv, ..) in pieces {
                self.lowers.submit(pv, Request::flush(id as u64));
            }
            return;
        }
        let len = req.op.range().map_or(0, |r| r.1);
        if len == 0 {
            return self.complete_now(req, Ok(0));
        }
        let buf = req.op.take_buf();
        let result_len = if buf.is_some() { len } else { 0 };
        let id = self
            .parents
            .start(req.tag, buf, result_len, pieces.len() as u32);
        for (pv, pv_offset, within, n) in pieces {
            let op = match &req.op {
                Op::Read { .. } => Op::Read {
                    offset: pv_offset,
                    buf: self.parents.piece_buf(id, within as usize, n as usize),
                },
                Op::Write { .. } => Op::Write {
                    offset: pv_offset,
                    buf: self.parents.piece_buf(id, within as usize, n as usize),
                },
                Op::Discard { .. } => Op::Discard {
                    offset: pv_offset,
                    len: n,
                },
                Op::WriteZeroes { unmap, .. } => Op::WriteZeroes {
                    offset: pv_offset,
                    len: n,
                    unmap: *unmap,
                },
                Op::Flush => Op::Flush,
            };
            self.lowers.submit(pv, Request { tag: id as u64, op });
        }
    }

    fn pull(&mut self) {
        let mut done = std::mem::take(&mut self.scratch);
        self.lowers.reap(&mut done);
        for c in done.drain(..) {
            let r = c.result.map(|_| ());
            if let Some(parent) = self.parents.piece_done(c.tag as usize, r, c.buf) {
                self.ready.push_back(parent);
            }
        }
        self.scratch = done;
    }
}

impl IoQueue for LinearQueue {
    fn depth(&self) -> usize {
        self.depth
    }

    fn in_flight(&self) -> usize {
        self.parents.len() + self.ready.len()
    }

    fn submit(&mut self, req: Request) -> std::result::Result<(), QueueFull> {
        if self.in_flight() >= self.depth {
            return Err(QueueFull(req));
        }
        self.dispatch(req);
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        self.lowers.commit()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        self.pull();
        let n = self.ready.len();
        out.extend(self.ready.drain(..));
        n
    }

    fn wait(&mut self, timeout: Option<Duration>) -> Result<()> {
        self.lowers.commit()?;
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            self.pull();
            if !self.ready.is_empty() || self.parents.len() == 0 {
                return Ok(());
            }
            let Some(left) = remaining(deadline) else {
                return Ok(());
            };
            self.lowers.wait(left)?;
        }
    }

    fn notifier(&self) -> Option<&Arc<EventFd>> {
        self.notifier.as_ref()
    }
}

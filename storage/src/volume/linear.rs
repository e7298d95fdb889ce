//! Linear (thick) logical volumes: extents allocated up front, possibly on several PVs.
//!
//! The queue maps each request under a short read lock on the volume's extent map (shared with
//! the volume group, so a resize is seen at once) and forwards the pieces to the PVs' own
//! queues. Flush goes to every PV the volume uses; discard and write-zeroes go down as they are,
//! so they free or zero the host file's space.

use std::any::Any;
use std::fmt;
use std::sync::{Arc, RwLock};

use crate::device::{BlockDevice, Capabilities, Extent, ExtentKind};
use crate::error::{Result, StorageError};
use crate::io::stack::{Layer, Lower, ReqId, Stack, StackedQueue};
use crate::io::{check_range, Completion, IoQueue, Op, QueueOptions, Request};
use crate::sync::read_meta;
use crate::volume::extents::ExtentMap;
use crate::volume::pvs::{pv_alignment, pv_opener, PvSet};

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
        crate::sync::read(&self.map)
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
        let layer = LinearLayer {
            name: self.name.clone(),
            map: self.map.clone(),
            read_only: self.read_only,
            _guard: self.guard.clone(),
        };
        let lower = Lower {
            opener: pv_opener(self.pvs.clone()),
            depth: opts.depth.max(1),
            own_eventfd: true,
        };
        Ok(Box::new(StackedQueue::new(layer, opts, lower)?))
    }

    fn flush(&self) -> Result<()> {
        let pvs = read_meta(&self.pvs, &self.name)?.clone();
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

/// What a linear volume's queue does with requests (see the module documentation); the
/// stacked-queue mechanism (`io/stack`) does the rest.
struct LinearLayer {
    name: String,
    map: Arc<RwLock<ExtentMap>>,
    read_only: bool,
    _guard: Arc<dyn Any + Send + Sync>,
}

impl fmt::Debug for LinearLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinearLayer")
            .field("name", &self.name)
            .finish()
    }
}

/// One piece: PV, offset on it, offset within the request, length.
type Piece = (usize, u64, u64, u64);

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

impl Layer for LinearLayer {
    type Sub = ReqId;

    fn start(&mut self, st: &mut Stack<ReqId>, mut req: Request) {
        let writes = !matches!(req.op, Op::Read { .. } | Op::Flush);
        if writes && self.read_only {
            let e = StorageError::ReadOnly(self.name.clone());
            return st.complete(Completion::of(req, Err(e)));
        }
        let planned = read_meta(&self.map, &self.name).and_then(|map| {
            check_range(&req.op, map.size()).and_then(|()| match req.op.range() {
                None => Ok(map.pvs().into_iter().map(|pv| (pv, 0, 0, 0)).collect()),
                Some((offset, len)) => plan(&map, offset, len),
            })
        });
        let pieces = match planned {
            Ok(p) => p,
            Err(e) => return st.complete(Completion::of(req, Err(e))),
        };
        let len = req.op.range().map_or(0, |r| r.1);
        if pieces.is_empty() || (len == 0 && !matches!(req.op, Op::Flush)) {
            return st.complete(Completion::of(req, Ok(0)));
        }
        let buf = req.op.take_buf();
        let result_len = if buf.is_some() { len } else { 0 };
        let id = st.open(req.tag, buf, result_len);
        let whole = pieces.len() == 1;
        for (pv, pv_offset, within, n) in pieces {
            let op = match &req.op {
                Op::Read { .. } | Op::Write { .. } => {
                    // SAFETY: `plan` walks the request once in order (`at += n`), so the pieces'
                    // views are disjoint.
                    let Some(buf) = (unsafe { st.piece(id, whole, within, n) }) else {
                        // Not reached: the pieces lie inside the buffer. The request failed
                        // (`Stack::piece`); never send less.
                        continue;
                    };
                    if matches!(req.op, Op::Read { .. }) {
                        Op::Read {
                            offset: pv_offset,
                            buf,
                        }
                    } else {
                        Op::Write {
                            offset: pv_offset,
                            buf,
                        }
                    }
                }
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
            st.hold(id);
            st.send(pv, id, op);
        }
        st.close(id);
    }

    fn finished(&mut self, st: &mut Stack<ReqId>, id: ReqId, c: Completion) {
        st.release(id, c.result.map(|_| ()), c.buf);
    }
}

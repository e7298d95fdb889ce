//! The VHD data path: how a guest range maps onto the file, zeros or the parent
//! ([`BlockMap`]); [`crate::format::mapped::MappedQueue`] runs the pieces.

use std::sync::Arc;

use crate::device::SharedFile;
use crate::error::{Result, StorageError};
use crate::format::mapped::{push_piece, BlockMap, Piece, ReadTarget, WriteTarget, ZeroTarget};
use crate::format::vhd::footer::SECTOR;
use crate::format::vhd::image::Vhd;
use crate::format::vhd::table::{BlockState, Table};
use crate::format::Image;
use crate::io::blocking::BlockingQueue;

impl Vhd {
    /// Calls `f(pos in request, len, present)` for the byte runs of `within..within + n` of
    /// allocated differencing block `b`.
    fn runs(
        t: &Table,
        b: u64,
        within: u64,
        n: u64,
        mut f: impl FnMut(u64, u64, bool),
    ) -> Result<()> {
        let first = within / SECTOR;
        let last = (within + n).div_ceil(SECTOR);
        t.sector_runs(b, first, last - first, |s, count, present| {
            let lo = (s * SECTOR).max(within);
            let hi = ((s + count) * SECTOR).min(within + n);
            f(lo - within, hi - lo, present)
        })
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(StorageError::ReadOnly(self.name.clone()))
        }
    }

    /// Whether every sector of `within..within + n` of block `b` is in this file.
    fn all_present(t: &Table, b: u64, within: u64, n: u64) -> Result<bool> {
        let mut all = true;
        Self::runs(t, b, within, n, |_, _, p| all &= p)?;
        Ok(all)
    }

    /// Reads `len` bytes of the parent at `offset` (zeros beyond its end).
    fn parent_read(
        &self,
        q: &mut Option<BlockingQueue>,
        offset: u64,
        out: &mut [u8],
    ) -> Result<()> {
        out.fill(0);
        let Some(p) = &self.parent else {
            return Ok(());
        };
        let avail = p.size().saturating_sub(offset).min(out.len() as u64) as usize;
        if avail == 0 {
            return Ok(());
        }
        if q.is_none() {
            *q = Some(BlockingQueue::open(p.as_ref(), 4)?);
        }
        if let Some(q) = q.as_mut() {
            let got = q.read_at(offset, avail)?;
            out[..avail].copy_from_slice(&got);
        }
        Ok(())
    }
}

impl BlockMap for Vhd {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn host(&self) -> &SharedFile {
        &self.file
    }

    fn parent(&self) -> Option<&Arc<dyn Image>> {
        self.parent.as_ref()
    }

    fn map_read(&self, offset: u64, len: u64) -> Result<Vec<Piece<ReadTarget>>> {
        let mut out = Vec::new();
        let Some(t) = &self.table else {
            if len > 0 {
                out.push(Piece {
                    pos: 0,
                    len,
                    target: ReadTarget::Host(offset),
                });
            }
            return Ok(out);
        };
        let hole = if t.differencing() {
            ReadTarget::Parent
        } else {
            ReadTarget::Zero
        };
        t.blocks_of(offset, len, |b, within, n| {
            let pos = b * t.block_size() + within - offset;
            match t.lookup(b)? {
                BlockState::Unallocated => push_piece(
                    &mut out,
                    Piece {
                        pos,
                        len: n,
                        target: hole,
                    },
                ),
                BlockState::At(at) => {
                    let data = at + t.bitmap_bytes();
                    if !t.differencing() {
                        push_piece(
                            &mut out,
                            Piece {
                                pos,
                                len: n,
                                target: ReadTarget::Host(data + within),
                            },
                        );
                    } else {
                        Self::runs(t, b, within, n, |p, l, present| {
                            let target = if present {
                                ReadTarget::Host(data + within + p)
                            } else {
                                ReadTarget::Parent
                            };
                            push_piece(
                                &mut out,
                                Piece {
                                    pos: pos + p,
                                    len: l,
                                    target,
                                },
                            );
                        })?;
                    }
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    fn map_write(&self, offset: u64, len: u64) -> Result<Vec<Piece<WriteTarget>>> {
        self.check_writable()?;
        let mut out = Vec::new();
        let Some(t) = &self.table else {
            if len > 0 {
                out.push(Piece {
                    pos: 0,
                    len,
                    target: WriteTarget::Host(offset),
                });
            }
            return Ok(out);
        };
        t.blocks_of(offset, len, |b, within, n| {
            let pos = b * t.block_size() + within - offset;
            let target = if !t.differencing() {
                WriteTarget::Host(t.allocate(b)? + t.bitmap_bytes() + within)
            } else {
                match t.lookup(b)? {
                    BlockState::At(at) if Self::all_present(t, b, within, n)? => {
                        WriteTarget::Host(at + t.bitmap_bytes() + within)
                    }
                    _ => WriteTarget::Sync,
                }
            };
            push_piece(
                &mut out,
                Piece {
                    pos,
                    len: n,
                    target,
                },
            );
            Ok(())
        })?;
        Ok(out)
    }

    fn map_zero(&self, offset: u64, len: u64, unmap: bool) -> Result<Vec<Piece<ZeroTarget>>> {
        self.check_writable()?;
        let mut out = Vec::new();
        let Some(t) = &self.table else {
            if len > 0 {
                out.push(Piece {
                    pos: 0,
                    len,
                    target: ZeroTarget::Host { offset, unmap },
                });
            }
            return Ok(out);
        };
        t.blocks_of(offset, len, |b, within, n| {
            let pos = b * t.block_size() + within - offset;
            let target = match t.lookup(b)? {
                BlockState::Unallocated if !t.differencing() => ZeroTarget::Nothing,
                BlockState::At(at) if !t.differencing() || Self::all_present(t, b, within, n)? => {
                    // A discarded range of an allocated block is punched in the file: it reads
                    // as zeros and frees the space; the block stays allocated.
                    let whole_sectors = within % SECTOR == 0 && n % SECTOR == 0;
                    ZeroTarget::Host {
                        offset: at + t.bitmap_bytes() + within,
                        unmap: unmap && whole_sectors,
                    }
                }
                _ => ZeroTarget::Sync,
            };
            push_piece(
                &mut out,
                Piece {
                    pos,
                    len: n,
                    target,
                },
            );
            Ok(())
        })?;
        Ok(out)
    }

    /// Copy-on-write over the parent: under the image's lock, allocate the block, fill partial
    /// sectors that are not yet in this file from the parent, write whole sectors, then mark
    /// them present.
    fn write_sync(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        let Some(t) = &self.table else {
            return self.file.write_all_at(offset, data);
        };
        let mut guard = crate::sync::lock(&self.cow);
        let mut done = 0usize;
        t.blocks_of(offset, data.len() as u64, |b, within, n| {
            let at = t.allocate(b)?;
            let base = b * t.block_size();
            let s0 = within / SECTOR;
            let s1 = (within + n).div_ceil(SECTOR);
            let mut buf = vec![0u8; ((s1 - s0) * SECTOR) as usize];
            let host = at + t.bitmap_bytes() + s0 * SECTOR;
            for s in [s0, s1 - 1] {
                let lo = s * SECTOR;
                if lo >= within && lo + SECTOR <= within + n {
                    continue;
                }
                let i = ((s - s0) * SECTOR) as usize;
                let sector = &mut buf[i..i + SECTOR as usize];
                if Self::all_present(t, b, lo, SECTOR)? {
                    t.file().read_exact_at(at + t.bitmap_bytes() + lo, sector)?;
                } else {
                    self.parent_read(&mut guard, base + lo, sector)?;
                }
            }
            let skip = (within - s0 * SECTOR) as usize;
            buf[skip..skip + n as usize].copy_from_slice(&data[done..done + n as usize]);
            t.file().write_all_at(host, &buf)?;
            t.set_present(b, s0, s1 - s0)?;
            done += n as usize;
            Ok(())
        })
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        match &self.table {
            Some(t) => t.write_back(),
            None => self.file.sync_data(),
        }
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn status(&self, offset: u64, len: u64) -> Result<crate::device::Extent> {
        self.block_status_of(offset, len)
    }
}

//! The VHDX data path: how a guest range maps onto payload blocks, zeros or the parent
//! ([`BlockMap`]); [`crate::format::mapped::MappedQueue`] runs the pieces.

use std::sync::Arc;

use crate::device::SharedFile;
use crate::error::{Result, StorageError};
use crate::format::mapped::{push_piece, BlockMap, Piece, ReadTarget, WriteTarget, ZeroTarget};
use crate::format::vhdx::bat::Payload;
use crate::format::vhdx::image::Vhdx;
use crate::format::Image;

impl Vhdx {
    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(StorageError::ReadOnly(self.name.clone()))
        }
    }
}

impl BlockMap for Vhdx {
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
        let bat = &self.bat;
        let mut out = Vec::new();
        let absent = if bat.differencing() {
            ReadTarget::Parent
        } else {
            ReadTarget::Zero
        };
        bat.blocks_of(offset, len, |b, within, n| {
            let pos = b * bat.block_size() + within - offset;
            let mut put = |p: u64, l: u64, target| {
                push_piece(
                    &mut out,
                    Piece {
                        pos: pos + p,
                        len: l,
                        target,
                    },
                )
            };
            match bat.lookup(b)? {
                Payload::Full(at) => put(0, n, ReadTarget::Host(at + within)),
                Payload::NotPresent | Payload::Undefined => put(0, n, absent),
                Payload::Zero | Payload::Unmapped => put(0, n, ReadTarget::Zero),
                Payload::Partial(at) => bat.runs(b, within, n, |p, l, present| {
                    put(
                        p,
                        l,
                        if present {
                            ReadTarget::Host(at + within + p)
                        } else {
                            ReadTarget::Parent
                        },
                    )
                })?,
            }
            Ok(())
        })?;
        Ok(out)
    }

    fn map_write(&self, offset: u64, len: u64) -> Result<Vec<Piece<WriteTarget>>> {
        self.check_writable()?;
        self.touch()?;
        let bat = &self.bat;
        let mut out = Vec::new();
        bat.blocks_of(offset, len, |b, within, n| {
            let at = bat.allocate(b)?;
            push_piece(
                &mut out,
                Piece {
                    pos: b * bat.block_size() + within - offset,
                    len: n,
                    target: WriteTarget::Host(at + within),
                },
            );
            Ok(())
        })?;
        Ok(out)
    }

    fn map_zero(&self, offset: u64, len: u64, unmap: bool) -> Result<Vec<Piece<ZeroTarget>>> {
        self.check_writable()?;
        self.touch()?;
        let bat = &self.bat;
        let mut out = Vec::new();
        let sector = self.meta.logical_sector as u64;
        bat.blocks_of(offset, len, |b, within, n| {
            let target = match bat.lookup(b)? {
                // A discarded range of a present block is punched in the file: it reads as
                // zeros and frees the space; the block stays present.
                Payload::Full(at) => ZeroTarget::Host {
                    offset: at + within,
                    unmap: unmap && within % sector == 0 && n % sector == 0,
                },
                _ => ZeroTarget::Nothing,
            };
            push_piece(
                &mut out,
                Piece {
                    pos: b * bat.block_size() + within - offset,
                    len: n,
                    target,
                },
            );
            Ok(())
        })?;
        Ok(out)
    }

    fn write_sync(&self, _offset: u64, _data: &[u8]) -> Result<()> {
        Err(StorageError::Unsupported(format!(
            "writing into the differencing VHDX {}",
            self.name
        )))
    }

    fn flush(&self) -> Result<()> {
        self.flush_metadata()
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn status(&self, offset: u64, len: u64) -> Result<crate::device::Extent> {
        self.block_status_of(offset, len)
    }
}

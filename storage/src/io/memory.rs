//! The in-memory engine (feature `test-utils`): a sparse byte array behind the same interfaces
//! as a host file, for fast tests of formats and volumes.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::device::{BlockDevice, Capabilities, Extent, ExtentKind, HostFile};
use crate::error::{Result, StorageError};
use crate::io::sparse::SparseMem;
use crate::io::sync_queue::{SyncExecutor, SyncQueue};
use crate::io::{IoQueue, Op, QueueOptions};

/// An in-memory device. See the module documentation.
#[derive(Debug)]
pub struct MemoryDevice {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    mem: RwLock<SparseMem>,
    read_only: bool,
}

impl MemoryDevice {
    /// A zero-filled device of `size` bytes.
    pub fn new(size: u64) -> Arc<MemoryDevice> {
        Arc::new(MemoryDevice {
            inner: Arc::new(Inner {
                name: "memory".into(),
                mem: RwLock::new(SparseMem::with_len(size)),
                read_only: false,
            }),
        })
    }

    /// A read-only device holding `data`.
    pub fn read_only_with(data: &[u8]) -> Arc<MemoryDevice> {
        let mut mem = SparseMem::with_len(data.len() as u64);
        mem.write(0, data);
        Arc::new(MemoryDevice {
            inner: Arc::new(Inner {
                name: "memory (read-only)".into(),
                mem: RwLock::new(mem),
                read_only: true,
            }),
        })
    }
}

impl Inner {
    fn mem(&self) -> RwLockReadGuard<'_, SparseMem> {
        crate::sync::read(&self.mem)
    }

    fn mem_mut(&self) -> RwLockWriteGuard<'_, SparseMem> {
        crate::sync::write(&self.mem)
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            Err(StorageError::ReadOnly(self.name.clone()))
        } else {
            Ok(())
        }
    }
}

/// Runs `op` against `mem`: the shared semantics of the in-memory and fault-injecting engines.
pub(crate) fn apply(mem: &RwLock<SparseMem>, op: &mut Op) -> Result<u64> {
    match op {
        Op::Read { offset, buf } => {
            let mut tmp = vec![0u8; buf.len()];
            crate::sync::read(mem).read(*offset, &mut tmp);
            buf.copy_from_slice(0, &tmp);
            Ok(buf.len() as u64)
        }
        Op::Write { offset, buf } => {
            let data = buf.to_vec();
            crate::sync::write(mem).write(*offset, &data);
            Ok(buf.len() as u64)
        }
        Op::Flush => Ok(0),
        Op::Discard { offset, len } | Op::WriteZeroes { offset, len, .. } => {
            crate::sync::write(mem).zero(*offset, *len);
            Ok(0)
        }
    }
}

/// Refuses byte ranges whose end does not fit in a u64.
pub(crate) fn check_end(offset: u64, len: usize) -> Result<()> {
    offset
        .checked_add(len as u64)
        .map(|_| ())
        .ok_or(StorageError::OutOfRange {
            offset,
            len: len as u64,
            size: u64::MAX,
        })
}

/// Block status of a sparse array: unwritten chunks read as zeros.
pub(crate) fn sparse_status(mem: &SparseMem, offset: u64, len: u64) -> Result<Extent> {
    let size = mem.len();
    let end = offset.saturating_add(len).min(size);
    if offset >= end {
        return Err(StorageError::OutOfRange { offset, len, size });
    }
    let chunk = SparseMem::chunk_size();
    let first = mem.chunk_allocated(offset);
    let mut at = (offset / chunk + 1) * chunk;
    while at < end && mem.chunk_allocated(at) == first {
        at += chunk;
    }
    let kind = if first {
        ExtentKind::Data
    } else {
        ExtentKind::Zero
    };
    Ok(Extent {
        offset,
        len: at.min(end) - offset,
        kind,
    })
}

impl SyncExecutor for Inner {
    fn size(&self) -> u64 {
        self.mem().len()
    }

    fn execute(&self, op: &mut Op) -> Result<u64> {
        if !matches!(op, Op::Read { .. } | Op::Flush) {
            self.check_writable()?;
        }
        apply(&self.mem, op)
    }
}

impl BlockDevice for MemoryDevice {
    fn size(&self) -> u64 {
        self.inner.mem().len()
    }

    fn capabilities(&self) -> Capabilities {
        let base = Capabilities::FLUSH
            | Capabilities::DISCARD
            | Capabilities::WRITE_ZEROES
            | Capabilities::WRITE_ZEROES_UNMAP
            | Capabilities::BLOCK_STATUS;
        if self.inner.read_only {
            base
        } else {
            base | Capabilities::WRITE | Capabilities::RESIZE
        }
    }

    fn alignment(&self) -> usize {
        1
    }

    fn open_queue(&self, opts: &QueueOptions) -> Result<Box<dyn IoQueue>> {
        Ok(Box::new(SyncQueue::new(self.inner.clone(), opts)))
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.set_len(new_size)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        sparse_status(&self.inner.mem(), offset, len)
    }
}

impl HostFile for MemoryDevice {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mem = self.inner.mem();
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > mem.len())
        {
            return Err(StorageError::corrupt(
                &self.inner.name,
                format!("read at {offset} reaches past the end"),
            ));
        }
        mem.read(offset, buf);
        Ok(())
    }

    fn write_all_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.inner.check_writable()?;
        check_end(offset, buf.len())?;
        self.inner.mem_mut().write(offset, buf);
        Ok(())
    }

    fn sync_data(&self) -> Result<()> {
        Ok(())
    }

    fn len(&self) -> u64 {
        self.inner.mem().len()
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.inner.check_writable()?;
        self.inner.mem_mut().set_len(len);
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.check_writable()?;
        self.inner.mem_mut().zero(offset, len);
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        self.punch_hole(offset, len)
    }

    fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.check_writable()?;
        let mut mem = self.inner.mem_mut();
        let new_len = mem.len().max(offset + len);
        mem.set_len(new_len);
        Ok(())
    }

    fn allocated_bytes(&self) -> Result<u64> {
        Ok(self.inner.mem().allocated_bytes())
    }
}

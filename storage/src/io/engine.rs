//! Choosing an engine, and [`FileDevice`]: a host file served by it.

use std::path::Path;
use std::sync::Arc;

use crate::device::{BlockDevice, Capabilities, Extent, HostFile};
use crate::error::Result;
use crate::io::file::{FileHandle, FileOptions};
use crate::io::threads::ThreadQueue;
use crate::io::uring::{self, UringQueue};
use crate::io::{IoQueue, QueueOptions};

/// Which engine runs a file's data-plane I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// io_uring where the kernel has it, else threads (probed once per process, logged).
    #[default]
    Auto,
    /// io_uring; an error if it is unavailable.
    Uring,
    /// The thread-pool engine.
    Threads,
}

/// The engine actually in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// io_uring.
    Uring,
    /// Thread pool.
    Threads,
}

impl Engine {
    /// Resolves a choice against what this kernel offers.
    pub fn resolve(choice: EngineChoice) -> Result<Engine> {
        match (choice, uring::availability()) {
            (EngineChoice::Threads, _) => Ok(Engine::Threads),
            (EngineChoice::Uring | EngineChoice::Auto, Ok(())) => Ok(Engine::Uring),
            (EngineChoice::Uring, Err(reason)) => Err(crate::StorageError::Unsupported(format!(
                "io_uring engine: {reason}"
            ))),
            (EngineChoice::Auto, Err(reason)) => {
                static LOGGED: std::sync::Once = std::sync::Once::new();
                LOGGED.call_once(|| {
                    tracing::warn!(%reason, "io_uring is unavailable; the thread-pool engine will serve I/O");
                });
                Ok(Engine::Threads)
            }
        }
    }

    /// The engine's name.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Uring => "io_uring",
            Engine::Threads => "threads",
        }
    }
}

/// A file or block device on the host, served by an engine.
#[derive(Debug)]
pub struct FileDevice {
    handle: Arc<FileHandle>,
    engine: Engine,
}

impl FileDevice {
    /// Opens `path` with `opts`, running queues on `engine`.
    pub fn open(path: &Path, opts: FileOptions, engine: EngineChoice) -> Result<Arc<FileDevice>> {
        let engine = Engine::resolve(engine)?;
        let handle = Arc::new(FileHandle::open(path, opts)?);
        Ok(Arc::new(FileDevice { handle, engine }))
    }

    /// The engine serving this file.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The open file.
    pub fn handle(&self) -> &FileHandle {
        &self.handle
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.handle.size()
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::DISCARD
            | Capabilities::WRITE_ZEROES
            | Capabilities::WRITE_ZEROES_UNMAP
            | Capabilities::FLUSH;
        if !self.handle.is_read_only() {
            caps |= Capabilities::WRITE;
            if !self.handle.is_block_device() {
                caps |= Capabilities::RESIZE;
            }
        }
        if !self.handle.is_block_device() {
            caps |= Capabilities::BLOCK_STATUS;
        }
        caps
    }

    fn alignment(&self) -> usize {
        self.handle.alignment()
    }

    fn open_queue(&self, opts: &QueueOptions) -> Result<Box<dyn IoQueue>> {
        Ok(match self.engine {
            Engine::Uring => Box::new(UringQueue::new(self.handle.clone(), opts)?),
            Engine::Threads => Box::new(ThreadQueue::new(self.handle.clone(), opts)?),
        })
    }

    fn flush(&self) -> Result<()> {
        self.handle.sync_data()
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.handle.set_len(new_size)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.handle.block_status(offset, len)
    }
}

impl HostFile for FileDevice {
    fn name(&self) -> &str {
        self.handle.name()
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.handle.read_exact_at(offset, buf)
    }

    fn write_all_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.handle.write_all_at(offset, buf)
    }

    fn sync_data(&self) -> Result<()> {
        self.handle.sync_data()
    }

    fn len(&self) -> u64 {
        self.handle.size()
    }

    fn set_len(&self, len: u64) -> Result<()> {
        self.handle.set_len(len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        self.handle.punch_hole(offset, len)
    }

    fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        self.handle.zero_range(offset, len)
    }

    fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        self.handle.allocate(offset, len)
    }

    fn allocated_bytes(&self) -> Result<u64> {
        self.handle.allocated_bytes()
    }
}

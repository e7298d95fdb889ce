//! Image conversion, as a library: `strata image convert` and (later) the HTTP API call it.
//!
//! [`convert`] copies a source [`BlockDevice`] into a target: an open device (`-n`: an existing
//! image or volume) or a stream of compressed units ([`CompressedWriter`], `-c`). It walks the
//! source with its own [`BlockDevice::block_status`], so unallocated and zero ranges are never
//! read, and checks what it does read for zeros at the `-S` granularity, so the output stays
//! sparse. Reads and writes run with several requests in flight on [`IoQueue`]s; by default
//! writes are issued in guest order (which keeps allocating formats laid out in order), and
//! with `-W` as soon as their data is read. Progress goes to a [`ConvertProgress`] callback.
//!
//! [`convert_files`] (in `files.rs`) is the wrapper `strata image convert` uses: open the source
//! (an image file or a volume), create the target (staged under a temporary name, see
//! `staging.rs`) or open it (`-n`: an image or a volume), convert, flush. It knows nothing of
//! particular formats: a format that [`crate::format::create_image`],
//! [`crate::format::open_image`] or [`crate::format::create_compressed`] supports works here
//! without changes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::device::{BlockDevice, Capabilities, ExtentKind};
use crate::error::{Result, StorageError};
use crate::format::CompressedWriter;
use crate::io::{Completion, IoBuf, IoQueue, QueueOptions, Request};

mod files;
mod residency;
mod snapshot;
mod staging;
mod writeout;
pub use residency::auto_source_cache;
pub use snapshot::{open_snapshot, SnapshotSel};
pub use staging::Staged;

pub use files::{convert_files, convert_to_new_image, ConvertRequest, NewImage};

/// How to convert.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Zero detection granularity in bytes (`-S`; qemu-img's default 4 KiB). Zero-filled
    /// granules of this size are not written. 0 disables it and writes every byte, zeros
    /// included (a fully allocated output).
    pub sparse_size: u64,
    /// Allow writes out of guest order (`-W`).
    pub out_of_order: bool,
    /// Requests in flight on each side.
    pub in_flight: usize,
    /// Bytes per read request.
    pub chunk: u64,
    /// The target does not read as zeros where nothing is written — it was not created by this
    /// conversion (`-n`), or it has a backing file: ranges that are zero in the source are
    /// written as zeros rather than skipped.
    pub existing_target: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            sparse_size: 4096,
            out_of_order: false,
            in_flight: 16,
            chunk: 2 << 20,
            existing_target: false,
        }
    }
}

/// Receives progress: `done` of `total` guest bytes are handled (copied or skipped).
pub trait ConvertProgress {
    /// Called after each chunk.
    fn progress(&self, done: u64, total: u64);

    /// Whether the caller asked to stop; the conversion then ends with
    /// [`StorageError::Cancelled`] at the next chunk.
    fn cancelled(&self) -> bool {
        false
    }
}

fn check_cancelled(progress: &dyn ConvertProgress) -> Result<()> {
    if progress.cancelled() {
        return Err(StorageError::Cancelled);
    }
    Ok(())
}

/// Progress that goes nowhere.
#[derive(Debug)]
pub struct NoProgress;

impl ConvertProgress for NoProgress {
    fn progress(&self, _done: u64, _total: u64) {}
}

/// What a conversion did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConvertReport {
    /// Guest size converted.
    pub size: u64,
    /// Bytes read from the source.
    pub read: u64,
    /// Bytes of data written to the target.
    pub written: u64,
    /// Bytes written as zeros without data (existing targets).
    pub zeroed: u64,
    /// Bytes skipped: unallocated or zero in the source.
    pub skipped: u64,
}

/// Where a conversion writes.
pub enum ConvertTarget<'a> {
    /// A writable device of at least the source's size.
    Device(&'a dyn BlockDevice),
    /// A stream of compressed units, finished at the end.
    Compressed(Box<dyn CompressedWriter>),
}

impl std::fmt::Debug for ConvertTarget<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConvertTarget::Device(d) => f.debug_tuple("Device").field(d).finish(),
            ConvertTarget::Compressed(_) => f.write_str("Compressed"),
        }
    }
}

/// One range of the source to handle.
#[derive(Clone, Copy, Debug)]
struct Job {
    offset: u64,
    len: u64,
    /// Whether the range must be read (else it reads as zeros).
    data: bool,
}

/// Splits the source into jobs of at most `chunk` bytes that never cross a multiple of
/// `chunk`, following its allocation status. Job ends are rounded up to `align` (reading a
/// little zero data rather than splitting an aligned unit).
struct Planner<'a> {
    src: &'a dyn BlockDevice,
    at: u64,
    size: u64,
    chunk: u64,
    align: u64,
    status: bool,
}

impl Planner<'_> {
    fn next(&mut self) -> Result<Option<Job>> {
        if self.at >= self.size {
            return Ok(None);
        }
        let limit = ((self.at / self.chunk + 1) * self.chunk).min(self.size);
        let max = limit - self.at;
        let (mut len, mut data) = if self.status {
            let e = self.src.block_status(self.at, max)?;
            if e.len == 0 || e.offset != self.at {
                return Err(StorageError::corrupt(
                    "conversion source",
                    "block status answered with an empty or misplaced extent",
                ));
            }
            (e.len.min(max), e.kind == ExtentKind::Data)
        } else {
            (max, true)
        };
        let end = self.at + len;
        if end < limit && end % self.align != 0 {
            len = (end.div_ceil(self.align) * self.align).min(limit) - self.at;
            data = true;
        }
        let job = Job {
            offset: self.at,
            len,
            data,
        };
        self.at += len;
        Ok(Some(job))
    }
}

/// Submits `req`, waiting for completions (collected in `done`) while the queue is full.
fn submit(q: &mut dyn IoQueue, mut req: Request, done: &mut Vec<Completion>) -> Result<()> {
    loop {
        match q.submit(req) {
            Ok(()) => return Ok(()),
            Err(full) => {
                req = full.0;
                q.wait(Some(Duration::from_secs(60)))?;
                q.reap(done);
            }
        }
    }
}

/// Runs of zero and non-zero `granule`s in the first `len` bytes of a buffer: `(start, len,
/// zero)`. Granule 0: one non-zero run (no detection).
fn runs(buf: &IoBuf, len: usize, granule: u64) -> Vec<(u64, u64, bool)> {
    let len = len as u64;
    if granule == 0 {
        return vec![(0, len, false)];
    }
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let mut at = 0;
    while at < len {
        let n = granule.min(len - at);
        let zero = buf.is_zero_range(at as usize, n as usize);
        match out.last_mut() {
            Some(last) if last.2 == zero => last.1 += n,
            _ => out.push((at, n, zero)),
        }
        at += n;
    }
    out
}

/// The data of a chunk that was read: the first `len` bytes of a pooled buffer.
struct Chunk {
    buf: Arc<IoBuf>,
    len: usize,
}

/// Read buffers of one chunk's size, reused once every write from them completed: a fresh
/// buffer costs a zero-fill and a page fault per 4 KiB (measured: together ≈ 15% of the CPU of
/// a qcow2 → qcow2 conversion with a warm page cache), a reused one neither. Formats fill what
/// they do not read themselves (a guest's buffers are reused too), so stale bytes never leak.
struct BufferPool {
    size: usize,
    free: Vec<IoBuf>,
    keep: usize,
}

impl BufferPool {
    fn take(&mut self) -> Arc<IoBuf> {
        Arc::new(self.free.pop().unwrap_or_else(|| IoBuf::new(self.size)))
    }

    /// Returns a buffer whose views are all dropped (else it is freed when they are).
    fn give(&mut self, buf: Arc<IoBuf>) {
        if self.free.len() < self.keep {
            if let Ok(b) = Arc::try_unwrap(buf) {
                self.free.push(b);
            }
        }
    }
}

/// The read side: keeps `depth` jobs in flight and hands out their data in guest order (or,
/// with `in_order` false, as soon as it is read).
struct Reader<'a> {
    planner: Planner<'a>,
    exhausted: bool,
    q: Box<dyn IoQueue>,
    depth: usize,
    in_order: bool,
    reading: HashMap<u64, (Job, Arc<IoBuf>)>,
    done: BTreeMap<u64, (Job, Option<Chunk>)>,
    next_out: u64,
    completions: Vec<Completion>,
    read_bytes: u64,
    pool: BufferPool,
}

impl Reader<'_> {
    fn fill(&mut self) -> Result<()> {
        while !self.exhausted && self.reading.len() + self.done.len() < self.depth {
            match self.planner.next()? {
                None => self.exhausted = true,
                Some(job) if job.data => {
                    let mut done = std::mem::take(&mut self.completions);
                    let buf = self.pool.take();
                    // SAFETY: the pool hands out a buffer no write from it still reads, this
                    // read's view is its only view, and the parent is kept in `reading`
                    // untouched until the read's completion is absorbed.
                    let view = unsafe { IoBuf::view(&buf, 0, job.len as usize) };
                    let r = submit(
                        self.q.as_mut(),
                        Request::read(job.offset, job.offset, view),
                        &mut done,
                    );
                    self.completions = done;
                    r?;
                    self.reading.insert(job.offset, (job, buf));
                    self.read_bytes += job.len;
                }
                Some(job) => {
                    self.done.insert(job.offset, (job, None));
                }
            }
        }
        Ok(())
    }

    fn absorb(&mut self) -> Result<()> {
        for c in self.completions.drain(..) {
            let (job, buf) = self
                .reading
                .remove(&c.tag)
                .ok_or_else(|| StorageError::Unavailable("a read completed twice".into()))?;
            c.result?;
            if c.buf.is_none() {
                return Err(StorageError::Unavailable("a read lost its buffer".into()));
            }
            // The view the read filled is dropped here, so the chunk's buffer may be read.
            drop(c.buf);
            let len = job.len as usize;
            self.done
                .insert(job.offset, (job, Some(Chunk { buf, len })));
        }
        Ok(())
    }

    /// Takes back a chunk's buffer once nothing refers to it any more.
    fn recycle(&mut self, buf: Arc<IoBuf>) {
        self.pool.give(buf);
    }

    /// The next chunk: its job and its data (`None`: reads as zeros); `None` at the end.
    fn next(&mut self) -> Result<Option<(Job, Option<Chunk>)>> {
        loop {
            self.fill()?;
            self.q.reap(&mut self.completions);
            self.absorb()?;
            let first = self.done.first_key_value().map(|(&k, _)| k);
            if let Some(k) = first {
                if !self.in_order || k == self.next_out {
                    let Some((_, item)) = self.done.pop_first() else {
                        continue;
                    };
                    if k == self.next_out {
                        self.next_out += item.0.len;
                    }
                    return Ok(Some(item));
                }
            }
            if self.reading.is_empty() {
                if self.exhausted && self.done.is_empty() {
                    return Ok(None);
                }
                if self.exhausted || self.reading.len() + self.done.len() >= self.depth {
                    return Err(StorageError::Unavailable(
                        "the conversion pipeline stalled".into(),
                    ));
                }
                continue;
            }
            self.q.wait(Some(Duration::from_secs(60)))?;
        }
    }
}

/// Copies `src` into `target`. See the module documentation.
pub fn convert(
    src: &dyn BlockDevice,
    target: ConvertTarget<'_>,
    opts: &ConvertOptions,
    progress: &dyn ConvertProgress,
) -> Result<ConvertReport> {
    let size = src.size();
    if opts.chunk == 0 || opts.in_flight == 0 {
        return Err(StorageError::InvalidInput(
            "conversion chunk and depth must be positive".into(),
        ));
    }
    if opts.sparse_size % 512 != 0 {
        return Err(StorageError::InvalidInput(format!(
            "the sparse size (-S) must be a multiple of 512 bytes, not {}",
            opts.sparse_size
        )));
    }
    let (align, chunk) = match &target {
        ConvertTarget::Compressed(w) => {
            let unit = w.unit().max(1);
            (unit, opts.chunk.div_ceil(unit) * unit)
        }
        ConvertTarget::Device(_) => (512, opts.chunk),
    };
    let reader = Reader {
        planner: Planner {
            src,
            at: 0,
            size,
            chunk,
            align,
            status: src.capabilities().contains(Capabilities::BLOCK_STATUS),
        },
        exhausted: false,
        q: src.open_queue(&QueueOptions::with_depth(opts.in_flight))?,
        depth: opts.in_flight,
        in_order: !opts.out_of_order || matches!(target, ConvertTarget::Compressed(_)),
        reading: HashMap::new(),
        done: BTreeMap::new(),
        next_out: 0,
        completions: Vec::new(),
        read_bytes: 0,
        pool: BufferPool {
            size: chunk as usize,
            free: Vec::new(),
            keep: opts.in_flight * 2,
        },
    };
    match target {
        ConvertTarget::Device(dst) => to_device(reader, dst, opts, size, progress),
        ConvertTarget::Compressed(w) => to_compressed(reader, w, size, progress),
    }
}

fn to_compressed(
    mut reader: Reader<'_>,
    mut w: Box<dyn CompressedWriter>,
    size: u64,
    progress: &dyn ConvertProgress,
) -> Result<ConvertReport> {
    let unit = w.unit().max(1);
    let mut report = ConvertReport {
        size,
        ..ConvertReport::default()
    };
    let mut done = 0;
    while let Some((job, buf)) = reader.next()? {
        check_cancelled(progress)?;
        match buf
            .as_ref()
            .and_then(|c| c.buf.as_slice().and_then(|s| s.get(..c.len)))
        {
            None => report.skipped += job.len,
            Some(data) => {
                let mut at = 0usize;
                while at < data.len() {
                    let n = (unit as usize).min(data.len() - at);
                    let piece = &data[at..at + n];
                    if crate::util::is_zero(piece) {
                        report.skipped += n as u64;
                    } else {
                        w.write_unit(job.offset + at as u64, piece)?;
                        report.written += n as u64;
                    }
                    at += n;
                }
            }
        }
        if let Some(c) = buf {
            reader.recycle(c.buf);
        }
        done += job.len;
        progress.progress(done, size);
    }
    report.read = reader.read_bytes;
    w.finish()?;
    Ok(report)
}

/// Writes in flight for one chunk, and the chunk's buffer while views of it are out.
struct Outstanding {
    left: usize,
    len: u64,
    buf: Option<Arc<IoBuf>>,
}

fn to_device(
    mut reader: Reader<'_>,
    dst: &dyn BlockDevice,
    opts: &ConvertOptions,
    size: u64,
    progress: &dyn ConvertProgress,
) -> Result<ConvertReport> {
    if dst.read_only() {
        return Err(StorageError::ReadOnly("the conversion target".into()));
    }
    if dst.size() < size {
        return Err(StorageError::InvalidInput(format!(
            "the target ({} bytes) is smaller than the source ({size} bytes)",
            dst.size()
        )));
    }
    let zeroes = dst.capabilities().contains(Capabilities::WRITE_ZEROES);
    let mut q = dst.open_queue(&QueueOptions::with_depth(opts.in_flight * 4))?;
    let mut report = ConvertReport {
        size,
        ..ConvertReport::default()
    };
    let mut chunks: HashMap<u64, Outstanding> = HashMap::new();
    let mut completions = Vec::new();
    let mut done = 0u64;
    let settle = |completions: &mut Vec<Completion>,
                  chunks: &mut HashMap<u64, Outstanding>,
                  done: &mut u64,
                  pool: &mut BufferPool|
     -> Result<()> {
        for c in completions.drain(..) {
            let Completion { tag, buf, result } = c;
            // The write's view of the chunk goes before the chunk's buffer is recycled.
            drop(buf);
            result?;
            if let Some(o) = chunks.get_mut(&tag) {
                o.left -= 1;
                if o.left == 0 {
                    *done += o.len;
                    if let Some(b) = chunks.remove(&tag).and_then(|o| o.buf) {
                        pool.give(b);
                    }
                    progress.progress(*done, size);
                }
            }
        }
        Ok(())
    };
    let zero_buf = |len: u64| IoBuf::new(len as usize);
    loop {
        while chunks.len() >= opts.in_flight {
            q.wait(Some(Duration::from_secs(60)))?;
            q.reap(&mut completions);
            settle(&mut completions, &mut chunks, &mut done, &mut reader.pool)?;
        }
        check_cancelled(progress)?;
        let Some((job, buf)) = reader.next()? else {
            break;
        };
        let mut reqs: Vec<Request> = Vec::new();
        let tag = job.offset;
        let whole = buf.map(|c| (c.buf, c.len));
        match &whole {
            None if opts.existing_target => {
                reqs.push(if zeroes {
                    Request::write_zeroes(tag, job.offset, job.len, true)
                } else {
                    Request::write(tag, job.offset, zero_buf(job.len))
                });
                report.zeroed += job.len;
            }
            None if opts.sparse_size == 0 => {
                reqs.push(Request::write(tag, job.offset, zero_buf(job.len)));
                report.written += job.len;
            }
            None => report.skipped += job.len,
            Some((b, len)) => {
                // The views below only go into writes (the target's queue reads them), `b` is
                // only read meanwhile (`runs`), and it stays alive in `chunks` until every
                // write of the job completed.
                for (at, n, zero) in runs(b, *len, opts.sparse_size) {
                    if zero && !opts.existing_target {
                        report.skipped += n;
                    } else if zero {
                        reqs.push(if zeroes {
                            Request::write_zeroes(tag, job.offset + at, n, true)
                        } else {
                            Request::write(
                                tag,
                                job.offset + at,
                                // SAFETY: see above: a view only read, of a buffer only read.
                                unsafe { IoBuf::view(b, at as usize, n as usize) },
                            )
                        });
                        report.zeroed += n;
                    } else {
                        reqs.push(Request::write(
                            tag,
                            job.offset + at,
                            // SAFETY: see above: a view only read, of a buffer only read.
                            unsafe { IoBuf::view(b, at as usize, n as usize) },
                        ));
                        report.written += n;
                    }
                }
            }
        }
        let whole = whole.map(|(b, _)| b);
        if reqs.is_empty() {
            if let Some(b) = whole {
                reader.recycle(b);
            }
            done += job.len;
            progress.progress(done, size);
            continue;
        }
        chunks.insert(
            tag,
            Outstanding {
                left: reqs.len(),
                len: job.len,
                buf: whole,
            },
        );
        for r in reqs {
            submit(q.as_mut(), r, &mut completions)?;
        }
        q.commit()?;
        q.reap(&mut completions);
        settle(&mut completions, &mut chunks, &mut done, &mut reader.pool)?;
    }
    while !chunks.is_empty() {
        q.wait(Some(Duration::from_secs(60)))?;
        q.reap(&mut completions);
        settle(&mut completions, &mut chunks, &mut done, &mut reader.pool)?;
    }
    report.read = reader.read_bytes;
    dst.flush()?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::blocking::BlockingQueue;
    use crate::io::memory::MemoryDevice;
    use crate::HostFile;
    use std::sync::Mutex;

    fn filled(size: u64, pieces: &[(u64, u64, u8)]) -> Arc<MemoryDevice> {
        let d = MemoryDevice::new(size);
        for &(o, l, v) in pieces {
            d.write_all_at(o, &vec![v; l as usize]).unwrap();
        }
        d
    }

    struct Seen(Mutex<Vec<(u64, u64)>>);
    impl ConvertProgress for Seen {
        fn progress(&self, done: u64, total: u64) {
            self.0.lock().unwrap().push((done, total));
        }
    }

    #[test]
    fn copies_data_and_skips_zeros() {
        let size = 10 << 20;
        let src = filled(
            size,
            &[(4096, 8192, 1), (5 << 20, 1 << 20, 2), (9 << 20, 512, 3)],
        );
        // Zeros written as data inside an allocated chunk are detected too.
        src.write_all_at(3 << 20, &vec![0u8; 1 << 16]).unwrap();
        for out_of_order in [false, true] {
            let dst = MemoryDevice::new(size);
            let seen = Seen(Mutex::new(Vec::new()));
            let opts = ConvertOptions {
                out_of_order,
                chunk: 1 << 20,
                in_flight: 4,
                ..Default::default()
            };
            let r = convert(
                src.as_ref(),
                ConvertTarget::Device(dst.as_ref()),
                &opts,
                &seen,
            )
            .unwrap();
            // Granules with any data are written whole (the 512 bytes at 9 MiB take 4 KiB).
            assert_eq!(r.written, 8192 + (1 << 20) + 4096);
            let a = BlockingQueue::open(src.as_ref(), 1)
                .unwrap()
                .read_at(0, size as usize)
                .unwrap();
            let b = BlockingQueue::open(dst.as_ref(), 1)
                .unwrap()
                .read_at(0, size as usize)
                .unwrap();
            assert!(a == b);
            assert_eq!(
                dst.allocated_bytes().unwrap(),
                18 * 65536,
                "zeros were written"
            );
            let seen = seen.0.into_inner().unwrap();
            assert_eq!(seen.last(), Some(&(size, size)));
            assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0));
        }
    }

    #[test]
    fn existing_targets_get_zeros_written_and_small_targets_are_refused() {
        let size = 4 << 20;
        let src = filled(size, &[(0, 4096, 9)]);
        let dst = filled(size, &[(0, size, 0xee)]);
        let opts = ConvertOptions {
            existing_target: true,
            ..Default::default()
        };
        convert(
            src.as_ref(),
            ConvertTarget::Device(dst.as_ref()),
            &opts,
            &NoProgress,
        )
        .unwrap();
        let b = BlockingQueue::open(dst.as_ref(), 1)
            .unwrap()
            .read_at(0, size as usize)
            .unwrap();
        assert!(b[..4096].iter().all(|&x| x == 9) && b[4096..].iter().all(|&x| x == 0));
        let small = MemoryDevice::new(size / 2);
        let e = convert(
            src.as_ref(),
            ConvertTarget::Device(small.as_ref()),
            &opts,
            &NoProgress,
        )
        .unwrap_err();
        assert!(e.to_string().contains("smaller"), "{e}");
    }

    #[test]
    fn sparse_size_zero_allocates_everything() {
        let size = 2 << 20;
        let src = filled(size, &[(0, 512, 1)]);
        let dst = MemoryDevice::new(size);
        let opts = ConvertOptions {
            sparse_size: 0,
            ..Default::default()
        };
        convert(
            src.as_ref(),
            ConvertTarget::Device(dst.as_ref()),
            &opts,
            &NoProgress,
        )
        .unwrap();
        assert_eq!(dst.allocated_bytes().unwrap(), size);
    }

    #[test]
    fn planner_aligns_jobs_to_units() {
        let src = filled(1 << 20, &[(1000, 10, 1), (300_000, 10, 2)]);
        let mut p = Planner {
            src: src.as_ref(),
            at: 0,
            size: 1 << 20,
            chunk: 1 << 19,
            align: 65536,
            status: true,
        };
        let mut jobs = Vec::new();
        while let Some(j) = p.next().unwrap() {
            jobs.push(j);
        }
        assert!(jobs.iter().all(|j| j.offset % 65536 == 0));
        assert_eq!(jobs.iter().map(|j| j.len).sum::<u64>(), 1 << 20);
        assert!(jobs
            .windows(2)
            .all(|w| w[0].offset + w[0].len == w[1].offset));
    }
}

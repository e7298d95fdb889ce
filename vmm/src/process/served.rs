//! A disk the supervisor serves: the client side of an NBD connection (the NBD project's
//! doc/proto.md, transmission phase, simple replies) on a socket the VMM inherits after the
//! supervisor has done the handshake.
//!
//! Why this exists: a thin volume lives in a pool whose metadata has one owner, the
//! supervisor, and a disk with dirty-bitmap sidecar files needs file-system access the
//! sandboxed VMM no longer has. The VMM still parses the guest's descriptor chains itself (the
//! supervisor sees well-formed NBD requests from an untrusted client, which its NBD server is
//! built for) and the supervisor never maps guest memory.
//!
//! Each [`IoQueue`] sends its requests on the shared socket under a short lock; one reader
//! thread per disk takes the replies and hands each completion to its queue, signalling the
//! queue's eventfd. Requests longer than NBD allows in one message are split and complete
//! when every piece has. If the connection breaks, every request in flight and every later
//! one fails with an I/O error (the guest sees IOERR); nothing is retried.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use strata_storage::io::{
    check_range, Completion, IoBuf, IoQueue, Op, QueueFull, QueueOptions, Request,
};
use strata_storage::{BlockDevice, Capabilities, Extent, StorageError};
use vmm_sys_util::eventfd::EventFd;

use crate::sandbox::{enter, Role};

const REQUEST_MAGIC: u32 = 0x2560_9513;
const REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const FLAG_NO_HOLE: u16 = 1 << 1;
/// Largest read or write payload sent in one request (the server's maximum block size).
const MAX_PAYLOAD: u64 = 32 << 20;
/// Largest trim or write-zeroes range in one request.
const MAX_RANGE: u64 = 1 << 30;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where a queue's completions wait to be reaped.
#[derive(Debug, Default)]
struct Inbox {
    done: Mutex<Vec<Completion>>,
    ready: Condvar,
    notifier: Option<Arc<EventFd>>,
}

impl Inbox {
    fn push(&self, c: Completion) {
        lock(&self.done).push(c);
        self.ready.notify_all();
        if let Some(n) = &self.notifier {
            let _ = n.write(1);
        }
    }
}

/// A queue request split into pieces.
#[derive(Debug)]
struct Job {
    inbox: Arc<Inbox>,
    tag: u64,
    state: Mutex<JobState>,
}

#[derive(Debug)]
struct JobState {
    pieces_left: usize,
    error: Option<StorageError>,
    buf: Option<IoBuf>,
    bytes: u64,
}

impl Job {
    fn piece_done(&self, result: Result<u64, StorageError>) {
        let mut st = lock(&self.state);
        match result {
            Ok(n) => st.bytes += n,
            Err(e) => {
                st.error.get_or_insert(e);
            }
        }
        st.pieces_left = st.pieces_left.saturating_sub(1);
        if st.pieces_left > 0 {
            return;
        }
        let result = match st.error.take() {
            Some(e) => Err(e),
            None => Ok(st.bytes),
        };
        let buf = st.buf.take();
        drop(st);
        self.inbox.push(Completion {
            tag: self.tag,
            result,
            buf,
        });
    }
}

/// One NBD request in flight.
#[derive(Debug)]
struct Piece {
    job: Arc<Job>,
    /// For a read: where in the job's buffer the data goes, and how much.
    read: Option<(usize, usize)>,
    len: u64,
}

#[derive(Debug)]
struct Link {
    name: String,
    writer: Mutex<UnixStream>,
    inflight: Mutex<Inflight>,
    next_handle: AtomicU64,
}

#[derive(Debug, Default)]
struct Inflight {
    pieces: HashMap<u64, Piece>,
    failed: Option<String>,
}

impl Link {
    fn broken(&self) -> StorageError {
        let why = lock(&self.inflight)
            .failed
            .clone()
            .unwrap_or_else(|| "the connection broke".into());
        StorageError::io(
            format!("Disk {} (served by the supervisor)", self.name),
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, why),
        )
    }

    /// Fails every piece in flight and every later request.
    fn fail(&self, why: String) {
        let pieces: Vec<Piece> = {
            let mut inflight = lock(&self.inflight);
            inflight.failed.get_or_insert(why);
            inflight.pieces.drain().map(|(_, p)| p).collect()
        };
        for p in pieces {
            p.job.piece_done(Err(self.broken()));
        }
    }

    /// Sends one request (and its payload).
    fn send(&self, piece: Piece, kind: u16, flags: u16, offset: u64, payload: Option<&[u8]>) {
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let len = piece.len as u32;
        {
            let mut inflight = lock(&self.inflight);
            if inflight.failed.is_some() {
                drop(inflight);
                piece.job.piece_done(Err(self.broken()));
                return;
            }
            inflight.pieces.insert(handle, piece);
        }
        let mut msg = Vec::with_capacity(28 + payload.map_or(0, <[u8]>::len));
        msg.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        msg.extend_from_slice(&flags.to_be_bytes());
        msg.extend_from_slice(&kind.to_be_bytes());
        msg.extend_from_slice(&handle.to_be_bytes());
        msg.extend_from_slice(&offset.to_be_bytes());
        msg.extend_from_slice(&len.to_be_bytes());
        if let Some(p) = payload {
            msg.extend_from_slice(p);
        }
        let sent = lock(&self.writer).write_all(&msg);
        if let Err(e) = sent {
            self.fail(format!("sending a request failed: {e}"));
        }
    }

    /// The reader thread: takes replies until the connection ends.
    fn read_replies(&self, mut stream: UnixStream) {
        let mut head = [0u8; 16];
        loop {
            if let Err(e) = stream.read_exact(&mut head) {
                self.fail(format!("the supervisor's disk server went away ({e})"));
                return;
            }
            let magic = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
            let error = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
            let mut h = [0u8; 8];
            h.copy_from_slice(&head[8..16]);
            let handle = u64::from_be_bytes(h);
            if magic != REPLY_MAGIC {
                self.fail(format!(
                    "the disk server sent a bad reply (magic {magic:#x})"
                ));
                return;
            }
            let Some(piece) = lock(&self.inflight).pieces.remove(&handle) else {
                self.fail(format!("the disk server answered unknown request {handle}"));
                return;
            };
            let result = if error != 0 {
                Err(StorageError::io(
                    format!("Disk {} (served by the supervisor)", self.name),
                    std::io::Error::from_raw_os_error(error as i32),
                ))
            } else {
                Ok(piece.len)
            };
            if let (Ok(_), Some((at, len))) = (&result, piece.read) {
                let mut data = vec![0u8; len];
                if let Err(e) = stream.read_exact(&mut data) {
                    piece.job.piece_done(Err(self.broken()));
                    self.fail(format!("reading a reply's data failed: {e}"));
                    return;
                }
                if let Some(buf) = lock(&piece.job.state).buf.as_mut() {
                    buf.copy_from_slice(at, &data);
                }
            }
            piece.job.piece_done(result);
        }
    }
}

/// A disk served by the supervisor over NBD.
#[derive(Debug)]
pub struct ServedDisk {
    target: Target,
    reader: Mutex<Option<UnixStream>>,
}

/// Where requests go: what every queue of the disk shares.
#[derive(Clone, Debug)]
struct Target {
    size: u64,
    caps: Capabilities,
    link: Arc<Link>,
}

impl ServedDisk {
    /// A disk on `socket` (connected, past the NBD handshake) of `size` bytes. Its reader
    /// thread starts with [`ServedDisk::start_reader`], once the process is sandboxed.
    pub fn start(
        name: &str,
        socket: OwnedFd,
        size: u64,
        writable: bool,
        discard: bool,
        write_zeroes: bool,
    ) -> Result<Arc<ServedDisk>, String> {
        let stream = UnixStream::from(socket);
        let reader = stream
            .try_clone()
            .map_err(|e| format!("duplicating the disk socket: {e}"))?;
        let mut caps = Capabilities::empty();
        if writable {
            caps |= Capabilities::WRITE | Capabilities::FLUSH;
            if discard {
                caps |= Capabilities::DISCARD;
            }
            if write_zeroes {
                caps |= Capabilities::WRITE_ZEROES | Capabilities::WRITE_ZEROES_UNMAP;
            }
        }
        Ok(Arc::new(ServedDisk {
            target: Target {
                size,
                caps,
                link: Arc::new(Link {
                    name: name.to_string(),
                    writer: Mutex::new(stream),
                    inflight: Mutex::default(),
                    next_handle: AtomicU64::new(1),
                }),
            },
            reader: Mutex::new(Some(reader)),
        }))
    }

    /// Starts the thread that takes the server's replies (once).
    pub fn start_reader(&self) -> std::io::Result<()> {
        let Some(stream) = lock(&self.reader).take() else {
            return Ok(());
        };
        let link = self.target.link.clone();
        std::thread::Builder::new()
            .name("disk-client".into())
            .spawn(move || {
                enter(Role::DiskClient);
                link.read_replies(stream);
            })
            .map(drop)
    }

    /// Runs one request to completion (the control-plane calls).
    fn run_one(&self, op: Op) -> strata_storage::Result<u64> {
        let inbox = Arc::new(Inbox::default());
        self.target.submit(Request { tag: 0, op }, &inbox);
        let mut done = lock(&inbox.done);
        while done.is_empty() {
            done = inbox.ready.wait(done).unwrap_or_else(|p| p.into_inner());
        }
        done.pop().map_or(Ok(0), |c| c.result)
    }
}

impl Target {
    fn submit(&self, req: Request, inbox: &Arc<Inbox>) {
        let Request { tag, mut op } = req;
        if let Err(e) = check_range(&op, self.size) {
            inbox.push(Completion {
                tag,
                result: Err(e),
                buf: op.take_buf(),
            });
            return;
        }
        let writes = !matches!(op, Op::Read { .. });
        if writes && !self.caps.contains(Capabilities::WRITE) {
            inbox.push(Completion {
                tag,
                result: Err(StorageError::ReadOnly(format!(
                    "Disk {} is read-only",
                    self.link.name
                ))),
                buf: op.take_buf(),
            });
            return;
        }
        // (kind, flags, offset, len, piece size limit)
        let (kind, flags, offset, len, step) = match &op {
            Op::Read { offset, buf } => (CMD_READ, 0, *offset, buf.len() as u64, MAX_PAYLOAD),
            Op::Write { offset, buf } => (CMD_WRITE, 0, *offset, buf.len() as u64, MAX_PAYLOAD),
            Op::Flush => (CMD_FLUSH, 0, 0, 0, 1),
            Op::Discard { offset, len } => (CMD_TRIM, 0, *offset, *len, MAX_RANGE),
            Op::WriteZeroes { offset, len, unmap } => {
                let flags = if *unmap { 0 } else { FLAG_NO_HOLE };
                (CMD_WRITE_ZEROES, flags, *offset, *len, MAX_RANGE)
            }
        };
        let needs = match kind {
            CMD_TRIM => Some(Capabilities::DISCARD),
            CMD_WRITE_ZEROES => Some(Capabilities::WRITE_ZEROES),
            _ => None,
        };
        if let Some(cap) = needs.filter(|c| !self.caps.contains(*c)) {
            inbox.push(Completion {
                tag,
                result: Err(StorageError::Unsupported(format!(
                    "{cap:?} on disk {}",
                    self.link.name
                ))),
                buf: None,
            });
            return;
        }
        let pieces: Vec<(u64, u64)> = if len == 0 {
            vec![(offset, 0)]
        } else {
            (0..len.div_ceil(step))
                .map(|i| (offset + i * step, step.min(len - i * step)))
                .collect()
        };
        let payload = match &op {
            Op::Write { buf, .. } => Some(buf.to_vec()),
            _ => None,
        };
        let job = Arc::new(Job {
            inbox: inbox.clone(),
            tag,
            state: Mutex::new(JobState {
                pieces_left: pieces.len(),
                error: None,
                buf: op.take_buf(),
                bytes: 0,
            }),
        });
        for (at, n) in pieces {
            let rel = (at - offset) as usize;
            let piece = Piece {
                job: job.clone(),
                read: (kind == CMD_READ).then_some((rel, n as usize)),
                len: n,
            };
            let data = payload.as_deref().map(|p| &p[rel..rel + n as usize]);
            self.link.send(piece, kind, flags, at, data);
        }
    }
}

impl BlockDevice for ServedDisk {
    fn size(&self) -> u64 {
        self.target.size
    }

    fn capabilities(&self) -> Capabilities {
        self.target.caps
    }

    fn alignment(&self) -> usize {
        1
    }

    fn open_queue(&self, opts: &QueueOptions) -> strata_storage::Result<Box<dyn IoQueue>> {
        Ok(Box::new(ServedQueue {
            target: self.target.clone(),
            inbox: Arc::new(Inbox {
                notifier: opts.notifier.clone(),
                ..Inbox::default()
            }),
            depth: opts.depth.max(1),
            in_flight: 0,
        }))
    }

    fn flush(&self) -> strata_storage::Result<()> {
        if !self.target.caps.contains(Capabilities::WRITE) {
            return Ok(());
        }
        self.run_one(Op::Flush).map(drop)
    }

    fn resize(&self, _new_size: u64) -> strata_storage::Result<()> {
        Err(StorageError::Unsupported(format!(
            "resizing disk {} from the VMM",
            self.target.link.name
        )))
    }

    fn block_status(&self, offset: u64, len: u64) -> strata_storage::Result<Extent> {
        Err(StorageError::Unsupported(format!(
            "block status of disk {} at {offset}+{len}",
            self.target.link.name
        )))
    }

    fn read_only(&self) -> bool {
        !self.target.caps.contains(Capabilities::WRITE)
    }
}

/// A queue on a served disk.
#[derive(Debug)]
struct ServedQueue {
    target: Target,
    inbox: Arc<Inbox>,
    depth: usize,
    in_flight: usize,
}

impl IoQueue for ServedQueue {
    fn depth(&self) -> usize {
        self.depth
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn submit(&mut self, req: Request) -> Result<(), QueueFull> {
        if self.in_flight >= self.depth {
            return Err(QueueFull(req));
        }
        self.in_flight += 1;
        self.target.submit(req, &self.inbox);
        Ok(())
    }

    fn commit(&mut self) -> strata_storage::Result<()> {
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        let mut done = lock(&self.inbox.done);
        let n = done.len();
        out.append(&mut done);
        self.in_flight = self.in_flight.saturating_sub(n);
        n
    }

    fn wait(&mut self, timeout: Option<Duration>) -> strata_storage::Result<()> {
        let done = lock(&self.inbox.done);
        let pred = |d: &mut Vec<Completion>| d.is_empty();
        let _done = match timeout {
            Some(t) => {
                self.inbox
                    .ready
                    .wait_timeout_while(done, t, pred)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
            None => self
                .inbox
                .ready
                .wait_while(done, pred)
                .unwrap_or_else(|p| p.into_inner()),
        };
        Ok(())
    }

    fn notifier(&self) -> Option<&Arc<EventFd>> {
        self.inbox.notifier.as_ref()
    }
}

/// What the server said about the export during the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportFacts {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
}

impl ExportFacts {
    /// Whether the export takes writes.
    pub fn writable(&self) -> bool {
        self.flags & (1 << 1) == 0
    }

    /// Whether it takes trim.
    pub fn discard(&self) -> bool {
        self.flags & (1 << 5) != 0
    }

    /// Whether it takes write-zeroes.
    pub fn write_zeroes(&self) -> bool {
        self.flags & (1 << 6) != 0
    }
}

/// The client side of the NBD handshake (fixed newstyle, `NBD_OPT_GO` for `export`, no
/// structured replies): what the supervisor does before it hands the socket to a VMM.
pub fn client_handshake(stream: &mut UnixStream, export: &str) -> std::io::Result<ExportFacts> {
    const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
    const INIT_PASSWD: u64 = 0x4e42_444d_4147_4943;
    const REPLY_MAGIC_OPT: u64 = 0x0003_e889_0455_65a9;
    const OPT_GO: u32 = 7;
    const REP_ACK: u32 = 1;
    const REP_INFO: u32 = 3;
    const MAX_REPLY: u32 = 64 << 10;
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut head = [0u8; 18];
    stream.read_exact(&mut head)?;
    let u64_at = |b: &[u8]| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[..8]);
        u64::from_be_bytes(a)
    };
    if u64_at(&head[0..8]) != INIT_PASSWD || u64_at(&head[8..16]) != IHAVEOPT {
        return Err(bad("the disk server does not speak newstyle NBD".into()));
    }
    // Client flags: fixed newstyle, no zeroes.
    stream.write_all(&3u32.to_be_bytes())?;
    let mut opt = Vec::new();
    opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&OPT_GO.to_be_bytes());
    opt.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export.as_bytes());
    opt.extend_from_slice(&0u16.to_be_bytes());
    stream.write_all(&opt)?;
    let mut facts = None;
    loop {
        let mut rh = [0u8; 20];
        stream.read_exact(&mut rh)?;
        let kind = u32::from_be_bytes([rh[12], rh[13], rh[14], rh[15]]);
        let len = u32::from_be_bytes([rh[16], rh[17], rh[18], rh[19]]);
        if u64_at(&rh[0..8]) != REPLY_MAGIC_OPT || len > MAX_REPLY {
            return Err(bad("the disk server sent a bad option reply".into()));
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data)?;
        match kind {
            REP_ACK => break,
            REP_INFO if data.len() >= 12 && data[0..2] == [0, 0] => {
                facts = Some(ExportFacts {
                    size: u64_at(&data[2..10]),
                    flags: u16::from_be_bytes([data[10], data[11]]),
                });
            }
            REP_INFO => {}
            k if k & (1 << 31) != 0 => {
                return Err(bad(format!(
                    "the disk server refused export {export:?}: {}",
                    String::from_utf8_lossy(&data)
                )))
            }
            _ => {}
        }
    }
    facts.ok_or_else(|| bad("the disk server did not give the export's size".into()))
}

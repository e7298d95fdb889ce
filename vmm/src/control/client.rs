//! The supervisor side of the control socket.

use std::io::{BufReader, BufWriter};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::{read_line, write_line, Answer, ConsoleChunk, Reply, Request};

/// Why a control request failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be reached or broke.
    #[error("The VMM's control socket: {0}")]
    Io(#[from] std::io::Error),
    /// The VMM answered with an error.
    #[error("The VMM refused: {0}")]
    Refused(String),
    /// The VMM's answer was not the one the request calls for.
    #[error("The VMM answered {0:?} to {1:?}")]
    Unexpected(Box<Reply>, Box<Request>),
    /// The VMM closed the connection before answering.
    #[error("The VMM closed its control connection without answering")]
    Closed,
    /// Nothing arrived within the stream's idle time (the stream goes on).
    #[error("No console output yet")]
    Idle,
}

/// A connection to one VMM.
#[derive(Debug)]
pub struct ControlClient {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl ControlClient {
    /// Connects to the socket at `path`; each answer is awaited at most `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<ControlClient, ControlError> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(ControlClient { stream, reader })
    }

    /// The pid of the VMM process (as this process's pid namespace numbers it).
    pub fn peer_pid(&self) -> std::io::Result<u32> {
        peer_pid(&self.stream)
    }

    /// Sends `req` and returns the reply.
    pub fn call(&mut self, req: &Request) -> Result<Reply, ControlError> {
        write_line(&mut BufWriter::new(&self.stream), req)?;
        match read_line::<_, Answer>(&mut self.reader)? {
            Some(Answer::Ok(reply)) => Ok(reply),
            Some(Answer::Error(e)) => Err(ControlError::Refused(e)),
            None => Err(ControlError::Closed),
        }
    }

    /// Turns the connection into a console stream from `from` (the current end if `None`).
    /// Each chunk read waits at most `idle` for output.
    pub fn console(
        mut self,
        from: Option<u64>,
        idle: Option<Duration>,
    ) -> Result<ConsoleStream, ControlError> {
        let req = Request::Console { from };
        match self.call(&req)? {
            Reply::ConsoleStream => {}
            other => return Err(ControlError::Unexpected(Box::new(other), Box::new(req))),
        }
        self.stream.set_read_timeout(idle)?;
        Ok(ConsoleStream {
            reader: self.reader,
            _stream: self.stream,
            pending: Vec::new(),
        })
    }
}

/// A live console stream.
#[derive(Debug)]
pub struct ConsoleStream {
    reader: BufReader<UnixStream>,
    _stream: UnixStream,
    /// A line read in part before an idle timeout.
    pending: Vec<u8>,
}

impl ConsoleStream {
    /// The next chunk; `Ok(None)` when the VM has ended (the stream closed);
    /// [`ControlError::Idle`] when nothing came within the idle time (call again).
    pub fn next_chunk(&mut self) -> Result<Option<ConsoleChunk>, ControlError> {
        use std::io::BufRead;
        loop {
            let room = (super::MAX_LINE + 1).saturating_sub(self.pending.len());
            let n = match std::io::Read::take(&mut self.reader, room as u64)
                .read_until(b'\n', &mut self.pending)
            {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ControlError::Idle)
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if n == 0 && self.pending.is_empty() {
                return Ok(None);
            }
            if self.pending.last() == Some(&b'\n') {
                let line = std::mem::take(&mut self.pending);
                return read_line(&mut &line[..]).map_err(ControlError::Io);
            }
            if n == 0 || self.pending.len() > super::MAX_LINE {
                return Err(ControlError::Io(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "a console line is cut off or too long",
                )));
            }
        }
    }
}

/// The pid of the process at the other end of a Unix stream (the one that listened, for a
/// connected client), through SO_PEERCRED.
pub fn peer_pid(stream: &UnixStream) -> std::io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt(SO_PEERCRED) writes at most `len` bytes into `cred`, a local.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    u32::try_from(cred.pid).map_err(|_| std::io::Error::other("no peer process"))
}

//! The VMM side of the control socket: an accept thread and a thread per connection (at most
//! [`MAX_CONNECTIONS`]), all under the control role's seccomp filter.

use std::io::{BufReader, BufWriter};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::{read_line, write_line, Answer, ConsoleChunk, Reply, Request};
use crate::sandbox::{enter, Role};

/// Connections served at once; more are answered with an error and closed.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a console stream waits for output before it checks whether its client is gone.
const CONSOLE_WAIT: Duration = Duration::from_millis(500);

/// What the VMM does for the socket.
pub trait ControlHandler: Send + Sync + 'static {
    /// Answers a request (never [`Request::Console`], which [`serve`] streams itself).
    fn handle(&self, req: Request) -> Answer;
    /// Console output from `from` on, waiting up to `wait` for some; `None` once the VM has
    /// ended and everything was returned.
    fn console(&self, from: u64, wait: Duration) -> Option<ConsoleChunk>;
    /// The console's end offset now.
    fn console_end(&self) -> u64;
}

/// Serves `listener` on a thread of its own until the process ends.
pub fn serve(
    listener: UnixListener,
    handler: Arc<dyn ControlHandler>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            enter(Role::Control);
            let active = Arc::new(AtomicUsize::new(0));
            for conn in listener.incoming() {
                let Ok(stream) = conn else { continue };
                if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                    active.fetch_sub(1, Ordering::SeqCst);
                    let mut w = &stream;
                    let _ = write_line(
                        &mut w,
                        &Answer::Error("too many control connections".into()),
                    );
                    continue;
                }
                let (handler, slot) = (handler.clone(), active.clone());
                let spawned = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        if let Err(e) = connection(&stream, &*handler) {
                            tracing::debug!("control connection ended: {e}");
                        }
                        slot.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    active.fetch_sub(1, Ordering::SeqCst);
                }
            }
        })
}

fn connection(stream: &UnixStream, handler: &dyn ControlHandler) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut writer = BufWriter::new(stream);
    loop {
        let req: Request = match read_line(&mut reader) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e) => {
                let _ = write_line(&mut writer, &Answer::Error(format!("Bad request: {e}")));
                return Err(e);
            }
        };
        match req {
            Request::Console { from } => {
                write_line(&mut writer, &Answer::Ok(Reply::ConsoleStream))?;
                let from = from.unwrap_or_else(|| handler.console_end());
                return stream_console(stream, &mut writer, handler, from);
            }
            other => write_line(&mut writer, &handler.handle(other))?,
        }
    }
}

fn stream_console(
    stream: &UnixStream,
    writer: &mut BufWriter<&UnixStream>,
    handler: &dyn ControlHandler,
    mut at: u64,
) -> std::io::Result<()> {
    loop {
        let Some(chunk) = handler.console(at, CONSOLE_WAIT) else {
            return Ok(());
        };
        if chunk.next_offset == at && chunk.skipped == 0 {
            if peer_gone(stream) {
                return Ok(());
            }
            continue;
        }
        at = chunk.next_offset;
        write_line(writer, &chunk)?;
    }
}

/// Whether the other end has closed (or shut down its side of) the connection.
fn peer_gone(stream: &UnixStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: poll(2) on one pollfd we own, without waiting.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

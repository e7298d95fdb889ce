//! The VMM process's control socket: what the supervisor (the service layer) asks a running VM,
//! and the answers. Both sides use these types.
//!
//! # Wire format: JSON Lines over a Unix stream socket
//! Each request and each answer is one JSON object on one line (`serde_json`, UTF-8, `\n`
//! ended, at most [`MAX_LINE`] bytes). A connection carries any number of request/answer
//! pairs; a [`Request::Console`] turns it into a stream of [`ConsoleChunk`] lines until the
//! client closes it or the VM ends.
//!
//! Why not HTTP with hyper/axum, which the API already uses: the VMM is sandboxed, and
//! everything reachable from this socket runs inside its seccomp filters. Blocking reads and
//! writes on a thread per connection need a handful of system calls and no async runtime;
//! a line-delimited JSON protocol (JSON Lines) is a documented, self-describing framing that
//! any tool can speak (`socat - UNIX-CONNECT:control.sock`), and serde gives both sides the
//! same types. The socket file is made by the VMM as root, mode 0600, in the VM's folder: only
//! the supervisor reaches it.

mod client;
mod server;

use std::io::{self, BufRead, Read, Write};

use serde::{Deserialize, Serialize};

pub use client::{peer_pid, ConsoleStream, ControlClient, ControlError};
pub use server::{serve, ControlHandler};

/// The longest line either side reads.
pub const MAX_LINE: usize = 64 << 10;
/// Most bytes in one console chunk.
pub const MAX_CONSOLE_CHUNK: usize = 16 << 10;

/// What the supervisor asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// How the VM is doing.
    Status,
    /// Stop the vCPUs (devices finish the I/O in flight).
    Pause,
    /// Let paused vCPUs run again.
    Resume,
    /// Press the ACPI power button.
    PowerButton,
    /// Stop hard: the vCPUs leave KVM_RUN, the disks are flushed, the process ends with
    /// `reason` as the VM's exit reason.
    Stop {
        /// The exit reason to record.
        reason: String,
    },
    /// Each disk's counters.
    DiskStats,
    /// Stream the console from byte offset `from` (the current end when absent).
    Console {
        /// Where to start.
        from: Option<u64>,
    },
}

/// Where the VM is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// The vCPUs run (or the VM is being built for a boot).
    Running,
    /// The vCPUs are parked.
    Paused,
    /// A stop was asked for; the VM is ending.
    Stopping,
}

/// How the VMM is confined.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxInfo {
    /// The uid it runs as.
    pub uid: u32,
    /// The gid it runs as.
    pub gid: u32,
    /// Whether its threads run under seccomp filters.
    pub seccomp: bool,
    /// What the kernel would not give it (namespaces), empty when fully confined.
    pub missing: Vec<String>,
}

/// The answer to [`Request::Status`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmStatus {
    /// Running, paused or stopping.
    pub state: RunState,
    /// Guest reboots so far (the VM is built again each time).
    pub reboots: u32,
    /// Console bytes the guest has written.
    pub console_end: u64,
    /// Times the power button was pressed.
    pub power_button_presses: u32,
    /// Seconds since the VMM started.
    pub uptime_seconds: u64,
    /// The confinement.
    pub sandbox: SandboxInfo,
}

/// One disk's counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStats {
    /// The disk's source (`lv:VG/NAME`, `image:NAME`).
    pub name: String,
    /// Requests the guest made.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Bytes read and written.
    pub bytes: u64,
}

/// A piece of the console stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleChunk {
    /// Offset of the first byte.
    pub offset: u64,
    /// The bytes, as text (invalid UTF-8 replaced).
    pub data: String,
    /// Offset after the last byte.
    pub next_offset: u64,
    /// Bytes between the requested offset and `offset` that the VMM no longer holds (read
    /// them from the console log).
    pub skipped: u64,
}

/// A successful answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Reply {
    /// To [`Request::Status`].
    Status(VmmStatus),
    /// Done (pause, resume, power button, stop).
    Done,
    /// To [`Request::DiskStats`].
    DiskStats {
        /// One entry per disk, in order.
        disks: Vec<DiskStats>,
    },
    /// The stream follows (to [`Request::Console`]).
    ConsoleStream,
}

/// One answer line: the reply or an error message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Answer {
    /// It worked.
    Ok(Reply),
    /// It did not; why.
    Error(String),
}

/// Writes `value` as one line.
pub fn write_line<W: Write, T: Serialize>(w: &mut W, value: &T) -> io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)?;
    w.flush()
}

/// Reads one line and parses it; `Ok(None)` at a clean end of stream. A line longer than
/// [`MAX_LINE`] or not valid JSON for `T` is an error.
pub fn read_line<R: BufRead, T: for<'de> Deserialize<'de>>(r: &mut R) -> io::Result<Option<T>> {
    let mut line = Vec::new();
    let n = Read::take(&mut *r, MAX_LINE as u64 + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            if line.len() > MAX_LINE {
                "a control message is longer than the limit"
            } else {
                "a control message ends without a newline"
            },
        ));
    }
    serde_json::from_slice(&line)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_are_single_json_lines_and_bad_ones_are_refused() {
        let mut buf = Vec::new();
        write_line(&mut buf, &Request::Stop { reason: "x".into() }).unwrap();
        assert_eq!(buf, b"{\"op\":\"stop\",\"reason\":\"x\"}\n");
        let back: Request = read_line(&mut &buf[..]).unwrap().unwrap();
        assert_eq!(back, Request::Stop { reason: "x".into() });
        let mut answer = Vec::new();
        write_line(&mut answer, &Answer::Ok(Reply::Done)).unwrap();
        let a: Answer = read_line(&mut &answer[..]).unwrap().unwrap();
        assert_eq!(a, Answer::Ok(Reply::Done));
        let none: Option<Request> = read_line(&mut &b""[..]).unwrap();
        assert!(none.is_none());
        for bad in [
            &b"{\"op\":\"reboot\"}\n"[..],
            b"not json\n",
            b"{\"op\":\"status\"}",
        ] {
            assert!(read_line::<_, Request>(&mut &bad[..]).is_err(), "{bad:?}");
        }
        let long = vec![b' '; MAX_LINE + 10];
        assert!(read_line::<_, Request>(&mut &long[..]).is_err());
    }
}

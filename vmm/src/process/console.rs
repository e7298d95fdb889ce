//! The guest's serial console inside the VMM process: every byte goes down a pipe to the
//! monitor (which keeps the console log file) and into a bounded ring that live readers on the
//! control socket follow.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::control::{ConsoleChunk, MAX_CONSOLE_CHUNK};

/// Console bytes kept for live readers; older ones are read from the log file.
pub const RING_BYTES: usize = 1 << 20;

#[derive(Debug, Default)]
struct Ring {
    bytes: VecDeque<u8>,
    /// Stream offset after the last byte.
    end: u64,
    ended: bool,
}

/// The console of one VMM run (across guest reboots).
#[derive(Debug)]
pub struct ConsoleBuffer {
    ring: Mutex<Ring>,
    grew: Condvar,
    pipe: Mutex<File>,
}

impl ConsoleBuffer {
    /// A console whose bytes also go to `pipe` (the monitor's).
    pub fn new(pipe: File) -> Arc<ConsoleBuffer> {
        Arc::new(ConsoleBuffer {
            ring: Mutex::default(),
            grew: Condvar::new(),
            pipe: Mutex::new(pipe),
        })
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `bytes`: to the log first (so that a reader told about a byte finds it in the
    /// log or the ring), then to the ring.
    pub fn push(&self, bytes: &[u8]) {
        {
            let mut pipe = self.pipe.lock().unwrap_or_else(|p| p.into_inner());
            // A monitor that is gone takes the VMM with it (parent-death signal); until then
            // a failed write must not stop the guest.
            let _ = pipe.write_all(bytes);
        }
        let mut ring = self.ring();
        ring.bytes.extend(bytes);
        let excess = ring.bytes.len().saturating_sub(RING_BYTES);
        ring.bytes.drain(..excess);
        ring.end += bytes.len() as u64;
        drop(ring);
        self.grew.notify_all();
    }

    /// Marks the end of the run: readers get what is left, then `None`.
    pub fn finish(&self) {
        self.ring().ended = true;
        self.grew.notify_all();
    }

    /// The stream's end offset.
    pub fn end(&self) -> u64 {
        self.ring().end
    }

    /// Bytes from `from` on (at most [`MAX_CONSOLE_CHUNK`]), waiting up to `wait` for some.
    /// `None` when the run has ended and `from` is at the end.
    pub fn read(&self, from: u64, wait: Duration) -> Option<ConsoleChunk> {
        let ring = self.ring();
        let (ring, _) = self
            .grew
            .wait_timeout_while(ring, wait, |r| r.end <= from && !r.ended)
            .unwrap_or_else(|p| p.into_inner());
        if ring.ended && ring.end <= from {
            return None;
        }
        let start = ring.end - ring.bytes.len() as u64;
        let from = from.min(ring.end);
        let first = from.max(start);
        let skip = (first - start) as usize;
        let n = ((ring.end - first) as usize).min(MAX_CONSOLE_CHUNK);
        let bytes: Vec<u8> = ring.bytes.range(skip..skip + n).copied().collect();
        Some(ConsoleChunk {
            offset: first,
            data: String::from_utf8_lossy(&bytes).into_owned(),
            next_offset: first + n as u64,
            skipped: first - from,
        })
    }
}

/// The serial device's sink.
#[derive(Debug)]
pub struct ConsoleWriter(pub Arc<ConsoleBuffer>);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_follow_the_stream_and_see_its_end() {
        let pipe = tempfile::tempfile().unwrap();
        let c = ConsoleBuffer::new(pipe);
        assert_eq!(c.read(0, Duration::from_millis(1)).unwrap().data, "");
        c.push(b"hello ");
        c.push(b"world");
        let all = c.read(0, Duration::ZERO).unwrap();
        assert_eq!((all.data.as_str(), all.next_offset), ("hello world", 11));
        let rest = c.read(6, Duration::ZERO).unwrap();
        assert_eq!(rest.data, "world");
        c.finish();
        assert!(c.read(11, Duration::from_secs(5)).is_none());
    }

    #[test]
    fn old_output_falls_out_of_the_ring_and_is_reported_skipped() {
        let c = ConsoleBuffer::new(tempfile::tempfile().unwrap());
        c.push(&vec![b'a'; RING_BYTES]);
        c.push(b"tail");
        let chunk = c.read(0, Duration::ZERO).unwrap();
        assert_eq!(chunk.skipped, 4);
        assert_eq!(chunk.offset, 4);
        assert_eq!(chunk.data.len(), MAX_CONSOLE_CHUNK);
    }
}

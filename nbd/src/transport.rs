//! A connection's byte stream: a TCP or Unix socket, plain or inside a rustls session.
//!
//! The same [`Transport`] serves the handshake (blocking, with a deadline) and transmission
//! (non-blocking, driven by `poll`). Plain reads and writes go straight between the socket and
//! the caller's buffer — a write request's payload lands in the I/O buffer the storage queue
//! uses, and a read reply leaves from the buffer the queue filled. Under TLS, rustls encrypts
//! and decrypts through its own bounded record buffers, which the protocol needs anyway.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use rustls::{ServerConfig, ServerConnection};

use crate::export::Disconnect;
use crate::tls::Fingerprint;

/// Plaintext plus TLS records rustls may hold for sending.
const TLS_BUFFER_LIMIT: usize = 512 << 10;

/// A connected socket.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub(crate) fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(on),
            Stream::Unix(s) => s.set_nonblocking(on),
        }
    }

    pub(crate) fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    pub(crate) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    pub(crate) fn shutdown(&self) {
        // Errors mean the socket is already closed, which is what we want.
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

/// Shuts a connection's socket down from another thread (export removal, server stop).
pub(crate) struct SocketShutdown(pub(crate) Stream);

impl Disconnect for SocketShutdown {
    fn disconnect(&self) {
        self.0.shutdown();
    }
}

/// A connection's stream. See the module documentation.
#[derive(Debug)]
pub(crate) struct Transport {
    stream: Stream,
    tls: Option<Box<ServerConnection>>,
}

fn flush_records(tls: &mut ServerConnection, stream: &mut Stream) -> io::Result<()> {
    while tls.wants_write() {
        if tls.write_tls(stream)? == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
    }
    Ok(())
}

impl Transport {
    pub(crate) fn new(stream: Stream) -> Transport {
        Transport { stream, tls: None }
    }

    pub(crate) fn stream(&self) -> &Stream {
        &self.stream
    }

    pub(crate) fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Runs a TLS handshake as the server (blocking; the socket's timeout bounds it).
    pub(crate) fn start_tls(&mut self, config: Arc<ServerConfig>) -> io::Result<()> {
        let mut conn = ServerConnection::new(config).map_err(io::Error::other)?;
        conn.set_buffer_limit(Some(TLS_BUFFER_LIMIT));
        while conn.is_handshaking() {
            if let Err(e) = conn.complete_io(&mut self.stream) {
                // Send the alert rustls queued, if any, so the client sees why.
                let _ = flush_records(&mut conn, &mut self.stream);
                return Err(e);
            }
        }
        self.tls = Some(Box::new(conn));
        Ok(())
    }

    /// SHA-256 of the certificate the TLS client presented.
    pub(crate) fn peer_certificate(&self) -> Option<Fingerprint> {
        let tls = self.tls.as_ref()?;
        let cert = tls.peer_certificates()?.first()?;
        Some(Fingerprint::of_der(cert))
    }

    /// Reads some bytes: `Ok(0)` at the end of the stream, `WouldBlock` when a non-blocking
    /// socket has nothing (and, under TLS, no decrypted bytes are waiting).
    pub(crate) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_mut() else {
            return self.stream.read(buf);
        };
        loop {
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The peer closed the socket without close_notify: an end all the same.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if tls.read_tls(&mut self.stream)? == 0 {
                return Ok(0);
            }
            if let Err(e) = tls.process_new_packets() {
                let _ = flush_records(tls, &mut self.stream);
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            if tls.wants_write() {
                match flush_records(tls, &mut self.stream) {
                    Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                    _ => {}
                }
            }
        }
    }

    /// Writes some of `bufs`; `WouldBlock` when nothing could be taken.
    pub(crate) fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_mut() else {
            return self.stream.write_vectored(bufs);
        };
        loop {
            let n = tls.writer().write_vectored(bufs)?;
            let push = flush_records(tls, &mut self.stream);
            if n > 0 || bufs.iter().all(|b| b.is_empty()) {
                match push {
                    Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                    _ => return Ok(n),
                }
            }
            // rustls's buffer was full: we get room only by sending records.
            push?;
        }
    }

    /// Sends TLS records rustls holds; `WouldBlock` if the socket is full.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        match self.tls.as_mut() {
            Some(tls) => flush_records(tls, &mut self.stream),
            None => Ok(()),
        }
    }

    /// Whether TLS records wait to be sent.
    pub(crate) fn wants_write(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Ends the session: a TLS close_notify if possible, then the socket.
    pub(crate) fn close(&mut self) {
        if let Some(tls) = self.tls.as_mut() {
            tls.send_close_notify();
            let _ = self.stream.set_nonblocking(false);
            let _ = self.stream.set_timeout(Some(Duration::from_secs(1)));
            let _ = flush_records(tls, &mut self.stream);
        }
        self.stream.shutdown();
    }

    /// Blocking read of exactly `buf.len()` bytes (handshake).
    pub(crate) fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut have = 0;
        while have < buf.len() {
            match self.read(&mut buf[have..]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => have += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Blocking write of all of `buf` (handshake).
    pub(crate) fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.write_vectored(&[IoSlice::new(&buf[done..])]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.flush()
    }
}

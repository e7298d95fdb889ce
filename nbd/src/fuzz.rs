//! Entry points for the cargo-fuzz targets (`fuzz/fuzz_targets/nbd_*.rs`) and the tests that
//! replay their seeds in ordinary `cargo test`. No input may panic or allocate without bound.

use std::io;

use crate::conn::reply::Reply;
use crate::conn::request::{decide, View};
use crate::conn::status;
use crate::export::ExportRegistry;
use crate::handshake::{negotiate, transmission_flags, HandshakeIo, Policy, TlsMode};
use crate::proto::{RequestHeader, REQUEST_LEN};
use crate::server::Limits;
use crate::tls::{Fingerprint, TlsSettings};

/// A client stream in memory: reads come from the input, writes are counted and dropped.
struct MemIo<'a> {
    input: &'a [u8],
    written: usize,
}

impl HandshakeIo for MemIo<'_> {
    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        if self.input.len() < buf.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let (head, rest) = self.input.split_at(buf.len());
        buf.copy_from_slice(head);
        self.input = rest;
        Ok(())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.written += buf.len();
        Ok(())
    }

    fn start_tls(&mut self, _tls: &TlsSettings) -> io::Result<()> {
        Err(io::Error::other("no TLS in memory"))
    }

    fn is_tls(&self) -> bool {
        false
    }

    fn peer_certificate(&self) -> Option<Fingerprint> {
        None
    }
}

/// Runs the handshake on `data` (the client's bytes) against `registry`; if it reaches
/// transmission, decides every following 28-byte request against the chosen export and builds
/// the replies that need no I/O. Returns the bytes the server wrote.
pub fn handshake_and_requests(registry: &ExportRegistry, data: &[u8]) -> usize {
    let limits = Limits::default();
    let policy = Policy {
        registry,
        tls: None,
        mode: TlsMode::None,
        limits: &limits,
    };
    let mut io = MemIo {
        input: data,
        written: 0,
    };
    let Ok(neg) = negotiate(&mut io, &policy) else {
        return io.written;
    };
    let device = neg.export.device().clone();
    let view = View {
        size: device.size(),
        flags: transmission_flags(&neg.export, neg.structured),
        structured: neg.structured,
        contexts: neg.contexts.len(),
        max_payload: limits.max_payload,
    };
    let mut written = io.written;
    for raw in io.input.chunks_exact(REQUEST_LEN).take(1024) {
        let mut b = [0u8; REQUEST_LEN];
        b.copy_from_slice(raw);
        let Some(h) = RequestHeader::parse(&b) else {
            break;
        };
        if let crate::conn::request::Decision::BlockStatus {
            offset,
            len,
            req_one,
        } = decide(&h, &view)
        {
            if let Ok(v) = status::allocation(device.as_ref(), offset, len, req_one) {
                let total: u64 = v.iter().map(|e| u64::from(e.0)).sum();
                assert!(v.iter().all(|e| e.0 > 0));
                assert!(req_one || total <= u64::from(len));
                written += Reply::block_status(h.handle, &[(1, v)]).buffered();
            }
        }
    }
    written
}

/// Decides every 24-byte piece of `data` as a request header (flags, type, handle, offset,
/// length; the magic is supplied) for a 1 GiB export with every feature on, and builds the
/// reply of a read of its length (bounded) from zeros and the piece's bytes.
pub fn requests(data: &[u8]) {
    let view = View {
        size: 1 << 30,
        flags: !crate::proto::tflag::READ_ONLY,
        structured: true,
        contexts: 2,
        max_payload: 32 << 20,
    };
    for raw in data.chunks_exact(REQUEST_LEN - 4) {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&crate::proto::REQUEST_MAGIC.to_be_bytes());
        b[4..].copy_from_slice(raw);
        let Some(h) = RequestHeader::parse(&b) else {
            continue;
        };
        if let crate::conn::request::Decision::Read { offset, len, df } = decide(&h, &view) {
            let mut buf = strata_storage::io::IoBuf::new((len as usize).min(1 << 16));
            buf.copy_from_slice(0, &raw[..raw.len().min(buf.len())]);
            let mut r = Reply::structured_read(h.handle, offset, buf, df);
            let mut v = Vec::new();
            r.slices(&mut v, usize::MAX);
            let n: usize = v.iter().map(|s| s.len()).sum();
            drop(v);
            assert_eq!(r.advance(n), n);
            assert!(r.is_sent());
        }
    }
}

//! Wire constants and message layouts of the NBD protocol (doc/proto.md of the NBD project;
//! the `qemu:` metadata namespace from QEMU's docs/interop/nbd.rst). Everything is big-endian.
//! This module only encodes and decodes fixed layouts; what a message means is decided in
//! `handshake.rs` and `conn/`.

/// `NBDMAGIC`, the first eight bytes the server sends.
pub const INIT_PASSWD: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag matching [`FLAG_NO_ZEROES`].
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub mod tflag {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_CMD_FLAG_DF` is supported (structured replies only).
    pub const SEND_DF: u16 = 1 << 7;
    /// Flush and FUA are visible across every connection to the export.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_CMD_CACHE` is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_CMD_FLAG_FAST_ZERO` is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option types.
pub mod opt {
    /// Old way to choose an export and enter transmission.
    pub const EXPORT_NAME: u32 = 1;
    /// End the session.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types.
pub mod rep {
    /// Accepted; end of a list.
    pub const ACK: u32 = 1;
    /// One export in a list.
    pub const SERVER: u32 = 2;
    /// One piece of information about an export.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    /// Unknown option.
    pub const ERR_UNSUP: u32 = ERR + 1;
    /// Refused by policy.
    pub const ERR_POLICY: u32 = ERR + 2;
    /// Malformed option.
    pub const ERR_INVALID: u32 = ERR + 3;
    /// TLS must be negotiated first.
    pub const ERR_TLS_REQD: u32 = ERR + 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = ERR + 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR + 7;
    /// The request or reply is too large.
    pub const ERR_TOO_BIG: u32 = ERR + 9;
}

/// Information types of `NBD_REP_INFO`.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical name.
    pub const NAME: u16 = 1;
    /// Description for people.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block size.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Request types.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write (payload follows).
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Discard.
    pub const TRIM: u16 = 4;
    /// Prefetch.
    pub const CACHE: u16 = 5;
    /// Write zeroes without a payload.
    pub const WRITE_ZEROES: u16 = 6;
    /// Query metadata contexts.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cflag {
    /// Force unit access: reply only once the data is durable.
    pub const FUA: u16 = 1 << 0;
    /// Write zeroes must not deallocate.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Read reply in one content chunk.
    pub const DF: u16 = 1 << 2;
    /// Block status: one extent per context.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Write zeroes: fail fast with `ENOTSUP` unless it is faster than writing.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    /// This is the last chunk of the reply.
    pub const FLAG_DONE: u16 = 1;
    /// Success without payload.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// Zeros at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status descriptors of one context.
    pub const BLOCK_STATUS: u16 = 5;
    /// An error.
    pub const ERROR: u16 = (1 << 15) + 1;
}

/// Error values of replies.
pub mod errno {
    /// Operation not permitted (write to a read-only export).
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space (also writes past the end).
    pub const ENOSPC: u32 = 28;
    /// Too large for an unfragmented reply.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported (fast zero refused).
    pub const ENOTSUP: u32 = 95;
    /// The server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// Metadata context flags of `base:allocation`.
pub const STATE_HOLE: u32 = 1 << 0;
/// Reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;
/// Metadata context flag of `qemu:dirty-bitmap:NAME`.
pub const STATE_DIRTY: u32 = 1 << 0;

/// Longest string (export name, query, message) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Size of a request header.
pub const REQUEST_LEN: usize = 28;
/// Size of an option header after `IHAVEOPT`.
pub const OPTION_HEADER_LEN: usize = 16;

/// A transmission request header as received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// The client's cookie, echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

impl RequestHeader {
    /// Decodes a header; `None` if the magic is wrong (the stream is out of step: hang up).
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Option<RequestHeader> {
        if be32(b, 0) != REQUEST_MAGIC {
            return None;
        }
        Some(RequestHeader {
            flags: be16(b, 4),
            kind: be16(b, 6),
            handle: be64(b, 8),
            offset: be64(b, 16),
            length: be32(b, 24),
        })
    }

    /// Encodes a header (tests and fuzzing drive the server with it).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// Appends a simple reply header.
pub fn simple_reply(out: &mut Vec<u8>, error: u32, handle: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
}

/// Appends a structured reply chunk header for a payload of `len` bytes.
pub fn chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, handle: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Appends a structured error chunk (always the last chunk of its reply).
pub fn error_chunk(out: &mut Vec<u8>, handle: u64, error: u32, message: &str) {
    let msg = truncate(message, MAX_STRING);
    chunk_header(
        out,
        chunk::FLAG_DONE,
        chunk::ERROR,
        handle,
        6 + msg.len() as u32,
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
}

/// Appends an option reply.
pub fn option_reply(out: &mut Vec<u8>, option: u32, kind: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Big-endian fields at byte offsets (the block layer's readers: 0 past the end).
pub use strata_storage::bytes::{be16, be32, be64};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_headers_round_trip_and_bad_magic_is_refused() {
        let h = RequestHeader {
            flags: cflag::FUA,
            kind: cmd::WRITE,
            handle: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 4096,
        };
        let b = h.encode();
        assert_eq!(RequestHeader::parse(&b), Some(h));
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(RequestHeader::parse(&bad), None);
    }

    #[test]
    fn error_chunks_carry_a_bounded_message() {
        let mut out = Vec::new();
        error_chunk(&mut out, 7, errno::EIO, &"é".repeat(3000));
        assert_eq!(be32(&out, 0), STRUCTURED_REPLY_MAGIC);
        assert_eq!(be16(&out, 4), chunk::FLAG_DONE);
        let len = be32(&out, 16) as usize;
        assert_eq!(out.len(), 20 + len);
        let msg_len = be16(&out, 24) as usize;
        assert!(msg_len <= MAX_STRING);
        assert!(std::str::from_utf8(&out[26..26 + msg_len]).is_ok());
    }
}

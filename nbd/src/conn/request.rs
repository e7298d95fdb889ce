//! What to do with one transmission request: a pure decision from the header and the session's
//! facts, so that every check on untrusted values (type, flags, offset, length) sits in one
//! place that tests and the fuzz target drive directly.

use crate::proto::{cflag, cmd, errno, tflag, RequestHeader};

/// The session facts a decision depends on.
#[derive(Clone, Copy, Debug)]
pub struct View {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags sent to the client.
    pub flags: u16,
    /// Structured replies negotiated.
    pub structured: bool,
    /// Metadata contexts selected.
    pub contexts: usize,
    /// Largest read or write payload.
    pub max_payload: u32,
}

/// The decision for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Read `len` bytes.
    Read { offset: u64, len: u32, df: bool },
    /// Receive `len` bytes of payload and write them.
    Write { offset: u64, len: u32, fua: bool },
    /// Receive `len` bytes of payload, then answer `error` (the payload must be consumed to
    /// stay in step with the stream).
    SkipPayload {
        len: u32,
        error: u32,
        why: &'static str,
    },
    /// Flush.
    Flush,
    /// Discard.
    Trim { offset: u64, len: u32, fua: bool },
    /// Write zeroes (`unmap`: may deallocate).
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        unmap: bool,
    },
    /// Prefetch `len` bytes (clamped to the payload limit).
    Cache { offset: u64, len: u32 },
    /// Report metadata for the selected contexts.
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
    /// The client ends the session.
    Disconnect,
    /// Answer `error` without doing anything.
    Fail { error: u32, why: &'static str },
    /// The stream cannot be followed any more: close the connection.
    HangUp(&'static str),
}

const KNOWN_FLAGS: u16 =
    cflag::FUA | cflag::NO_HOLE | cflag::DF | cflag::REQ_ONE | cflag::FAST_ZERO;

fn fits(offset: u64, len: u32, size: u64) -> bool {
    offset
        .checked_add(u64::from(len))
        .is_some_and(|end| end <= size)
}

/// Decides what to do with `h`. See the module documentation.
pub fn decide(h: &RequestHeader, v: &View) -> Decision {
    let (offset, len) = (h.offset, h.length);
    let read_only = v.flags & tflag::READ_ONLY != 0;
    let fua = h.flags & cflag::FUA != 0;
    // Flags valid for this command besides FUA, which every command may carry.
    let allowed = match h.kind {
        cmd::READ if v.flags & tflag::SEND_DF != 0 => cflag::DF,
        cmd::WRITE_ZEROES => cflag::NO_HOLE | cflag::FAST_ZERO,
        cmd::BLOCK_STATUS => cflag::REQ_ONE,
        _ => 0,
    } | cflag::FUA;
    let bad_flags = h.flags & !KNOWN_FLAGS != 0 || h.flags & !allowed != 0;
    let fail = |error, why| Decision::Fail { error, why };
    match h.kind {
        cmd::WRITE => {
            if len > v.max_payload {
                return Decision::HangUp("write payload larger than the advertised maximum");
            }
            let skip = |error, why| Decision::SkipPayload { len, error, why };
            if bad_flags {
                skip(errno::EINVAL, "flag not valid for WRITE")
            } else if read_only {
                skip(errno::EPERM, "the export is read-only")
            } else if !fits(offset, len, v.size) {
                skip(errno::ENOSPC, "write past the end of the export")
            } else {
                Decision::Write { offset, len, fua }
            }
        }
        cmd::READ => {
            let df = h.flags & cflag::DF != 0;
            if bad_flags {
                fail(errno::EINVAL, "flag not valid for READ")
            } else if len > v.max_payload {
                if df {
                    fail(errno::EOVERFLOW, "read too large for one chunk")
                } else {
                    fail(errno::EINVAL, "read larger than the advertised maximum")
                }
            } else if !fits(offset, len, v.size) {
                fail(errno::EINVAL, "read past the end of the export")
            } else {
                Decision::Read { offset, len, df }
            }
        }
        cmd::DISC => Decision::Disconnect,
        cmd::FLUSH => {
            if bad_flags || offset != 0 || len != 0 {
                fail(errno::EINVAL, "FLUSH takes no flags, offset or length")
            } else {
                Decision::Flush
            }
        }
        cmd::TRIM => {
            if v.flags & tflag::SEND_TRIM == 0 && !read_only {
                fail(errno::EINVAL, "TRIM is not supported by this export")
            } else if bad_flags {
                fail(errno::EINVAL, "flag not valid for TRIM")
            } else if read_only {
                fail(errno::EPERM, "the export is read-only")
            } else if !fits(offset, len, v.size) {
                fail(errno::EINVAL, "trim past the end of the export")
            } else {
                Decision::Trim { offset, len, fua }
            }
        }
        cmd::WRITE_ZEROES => {
            if read_only {
                fail(errno::EPERM, "the export is read-only")
            } else if v.flags & tflag::SEND_WRITE_ZEROES == 0 {
                fail(
                    errno::EINVAL,
                    "WRITE_ZEROES is not supported by this export",
                )
            } else if bad_flags
                || (h.flags & cflag::FAST_ZERO != 0 && v.flags & tflag::SEND_FAST_ZERO == 0)
            {
                fail(errno::EINVAL, "flag not valid for WRITE_ZEROES")
            } else if !fits(offset, len, v.size) {
                fail(errno::ENOSPC, "write past the end of the export")
            } else {
                Decision::WriteZeroes {
                    offset,
                    len,
                    fua,
                    unmap: h.flags & cflag::NO_HOLE == 0,
                }
            }
        }
        cmd::CACHE => {
            if bad_flags {
                fail(errno::EINVAL, "flag not valid for CACHE")
            } else if !fits(offset, len, v.size) {
                fail(errno::EINVAL, "cache past the end of the export")
            } else {
                Decision::Cache {
                    offset,
                    len: len.min(v.max_payload),
                }
            }
        }
        cmd::BLOCK_STATUS => {
            if !v.structured || v.contexts == 0 {
                fail(errno::EINVAL, "no metadata context was selected")
            } else if bad_flags {
                fail(errno::EINVAL, "flag not valid for BLOCK_STATUS")
            } else if len == 0 || !fits(offset, len, v.size) {
                fail(errno::EINVAL, "block status range is empty or past the end")
            } else {
                Decision::BlockStatus {
                    offset,
                    len,
                    req_one: h.flags & cflag::REQ_ONE != 0,
                }
            }
        }
        _ => fail(errno::EINVAL, "unknown command"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(flags: u16) -> View {
        View {
            size: 1 << 20,
            flags: tflag::HAS_FLAGS | flags,
            structured: true,
            contexts: 1,
            max_payload: 1 << 16,
        }
    }

    fn h(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            handle: 1,
            offset,
            length,
        }
    }

    #[test]
    fn ranges_lengths_and_overflow_are_bounded() {
        let v = view(tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES | tflag::SEND_DF);
        assert_eq!(
            decide(&h(cmd::READ, 0, (1 << 20) - 512, 512), &v),
            Decision::Read {
                offset: (1 << 20) - 512,
                len: 512,
                df: false
            }
        );
        assert!(matches!(
            decide(&h(cmd::READ, 0, u64::MAX - 10, 512), &v),
            Decision::Fail {
                error: errno::EINVAL,
                ..
            }
        ));
        assert!(matches!(
            decide(&h(cmd::READ, cflag::DF, 0, 1 << 17), &v),
            Decision::Fail {
                error: errno::EOVERFLOW,
                ..
            }
        ));
        assert!(matches!(
            decide(&h(cmd::WRITE, 0, 1 << 20, 1), &v),
            Decision::SkipPayload {
                len: 1,
                error: errno::ENOSPC,
                ..
            }
        ));
        assert!(matches!(
            decide(&h(cmd::WRITE, 0, 0, (1 << 16) + 1), &v),
            Decision::HangUp(_)
        ));
        assert!(matches!(
            decide(&h(cmd::WRITE_ZEROES, 0, u64::MAX, u32::MAX), &v),
            Decision::Fail {
                error: errno::ENOSPC,
                ..
            }
        ));
        assert_eq!(
            decide(&h(cmd::CACHE, 0, 0, 1 << 19), &v),
            Decision::Cache {
                offset: 0,
                len: 1 << 16
            }
        );
        assert!(matches!(
            decide(&h(cmd::BLOCK_STATUS, 0, 0, 0), &v),
            Decision::Fail { .. }
        ));
    }

    #[test]
    fn flags_and_capabilities_are_enforced() {
        let v = view(tflag::SEND_WRITE_ZEROES);
        assert!(matches!(
            decide(&h(cmd::READ, cflag::DF, 0, 512), &v),
            Decision::Fail { .. }
        ));
        assert!(matches!(
            decide(&h(cmd::WRITE, cflag::NO_HOLE, 0, 512), &v),
            Decision::SkipPayload {
                error: errno::EINVAL,
                ..
            }
        ));
        assert!(matches!(
            decide(&h(cmd::WRITE, 1 << 9, 0, 512), &v),
            Decision::SkipPayload { .. }
        ));
        assert!(matches!(
            decide(&h(cmd::TRIM, 0, 0, 512), &v),
            Decision::Fail { .. }
        ));
        assert!(matches!(
            decide(&h(cmd::WRITE_ZEROES, cflag::FAST_ZERO, 0, 512), &v),
            Decision::Fail { .. }
        ));
        assert_eq!(
            decide(
                &h(cmd::WRITE_ZEROES, cflag::NO_HOLE | cflag::FUA, 0, 512),
                &v
            ),
            Decision::WriteZeroes {
                offset: 0,
                len: 512,
                fua: true,
                unmap: false
            }
        );
        assert!(matches!(
            decide(&h(cmd::FLUSH, 0, 5, 0), &v),
            Decision::Fail { .. }
        ));
        assert!(matches!(decide(&h(99, 0, 0, 0), &v), Decision::Fail { .. }));
        let ro = view(tflag::READ_ONLY);
        assert!(matches!(
            decide(&h(cmd::WRITE, 0, 0, 512), &ro),
            Decision::SkipPayload {
                error: errno::EPERM,
                ..
            }
        ));
        assert!(matches!(
            decide(&h(cmd::TRIM, 0, 0, 512), &ro),
            Decision::Fail {
                error: errno::EPERM,
                ..
            }
        ));
        let mut plain = view(0);
        plain.structured = false;
        assert!(matches!(
            decide(&h(cmd::BLOCK_STATUS, 0, 0, 512), &plain),
            Decision::Fail { .. }
        ));
        assert_eq!(decide(&h(cmd::DISC, 0, 0, 0), &plain), Decision::Disconnect);
    }
}

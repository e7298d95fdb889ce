//! The fixed newstyle handshake: greeting, client flags, and option haggling until the client
//! enters transmission (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`), aborts, or is refused.
//!
//! TLS modes (protocol document, "TLS support"): without TLS settings the server runs NOTLS
//! (STARTTLS gets `NBD_REP_ERR_POLICY`); with them, clients that are not local run FORCEDTLS
//! (every option but STARTTLS and ABORT gets `NBD_REP_ERR_TLS_REQD`, `NBD_OPT_EXPORT_NAME`
//! hangs up), and local ones (loopback, Unix socket) SELECTIVETLS, where only exports with a
//! certificate allow-list need TLS. An export the client may not use is answered exactly like
//! an unknown one, so names cannot be probed.
//!
//! Bounds: at most [`MAX_OPTIONS`] options, option payloads up to [`MAX_OPTION_LEN`] bytes
//! (bigger ones up to [`MAX_DISCARD_LEN`] are read and refused with `NBD_REP_ERR_TOO_BIG`,
//! beyond that the connection is closed); the caller bounds the time with socket timeouts.

use std::io;
use std::sync::Arc;

use crate::export::{Access, Export, ExportRegistry};
use crate::options::{
    all_contexts, list_matches, parse_info, parse_meta, parse_string, set_match, MetaContext,
    OptionError,
};
use crate::proto::{self, info, opt, rep, tflag, MAX_STRING};
use crate::server::Limits;
use crate::tls::{Fingerprint, TlsSettings};
use crate::transport::Transport;

/// Most options one handshake may send.
pub const MAX_OPTIONS: usize = 256;
/// Largest option payload read and acted on.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Largest option payload read only to be refused; beyond it the connection is closed.
pub const MAX_DISCARD_LEN: u32 = 1 << 20;

/// The handshake's view of its connection (a [`Transport`]; an in-memory stream when fuzzing).
pub trait HandshakeIo {
    /// Reads exactly `buf.len()` bytes.
    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `buf`.
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Upgrades the stream to TLS as the server.
    fn start_tls(&mut self, tls: &TlsSettings) -> io::Result<()>;
    /// Whether TLS is up.
    fn is_tls(&self) -> bool;
    /// The client certificate's fingerprint, if it presented one.
    fn peer_certificate(&self) -> Option<Fingerprint>;
}

impl HandshakeIo for Transport {
    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        Transport::read_exact(self, buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        Transport::write_all(self, buf)
    }
    fn start_tls(&mut self, tls: &TlsSettings) -> io::Result<()> {
        Transport::start_tls(self, tls.config())
    }
    fn is_tls(&self) -> bool {
        Transport::is_tls(self)
    }
    fn peer_certificate(&self) -> Option<Fingerprint> {
        Transport::peer_certificate(self)
    }
}

/// How TLS is offered to one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS (the server has no certificate; only local clients reach it).
    None,
    /// TLS available; needed only for exports with a certificate allow-list.
    Selective,
    /// TLS required before anything else.
    Forced,
}

/// What the handshake needs from the server.
#[derive(Debug)]
pub struct Policy<'a> {
    /// The exports.
    pub registry: &'a ExportRegistry,
    /// TLS settings, when the server has them.
    pub tls: Option<&'a TlsSettings>,
    /// The mode for this connection.
    pub mode: TlsMode,
    /// Limits (advertised block sizes).
    pub limits: &'a Limits,
}

/// The result of a successful negotiation.
#[derive(Debug)]
pub struct Negotiated {
    /// The export chosen.
    pub export: Arc<Export>,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// Metadata contexts selected for this export; the context ID is the index plus one.
    pub contexts: Vec<MetaContext>,
    /// Transmission flags sent.
    pub flags: u16,
}

/// Why a handshake ended without transmission.
#[derive(Debug)]
pub enum Ended {
    /// The client aborted or went away.
    Client,
    /// The client broke the protocol or was refused in a way that ends the session.
    Refused(String),
    /// The stream failed (including a timeout).
    Io(io::Error),
}

impl From<io::Error> for Ended {
    fn from(e: io::Error) -> Ended {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Ended::Client
        } else {
            Ended::Io(e)
        }
    }
}

/// The transmission flags of `export` for a session.
pub fn transmission_flags(export: &Export, structured: bool) -> u16 {
    use strata_storage::Capabilities as C;
    let caps = export.device().capabilities();
    // Every device of the block layer flushes as a whole (its host files, the format's
    // metadata) whichever queue asks, and its queues share one cache: flush and FUA on one
    // connection cover writes completed on all of them.
    let mut f = tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::SEND_FUA | tflag::CAN_MULTI_CONN;
    f |= tflag::SEND_CACHE;
    if structured {
        f |= tflag::SEND_DF;
    }
    if export.read_only() {
        f |= tflag::READ_ONLY;
    } else {
        if caps.contains(C::DISCARD) {
            f |= tflag::SEND_TRIM;
        }
        if caps.contains(C::WRITE_ZEROES) {
            f |= tflag::SEND_WRITE_ZEROES | tflag::SEND_FAST_ZERO;
        }
    }
    f
}

/// Block size constraints advertised: any alignment accepted (the block layer bounces
/// unaligned requests), the device's alignment (at least 4 KiB) preferred, payloads bounded.
pub fn block_sizes(export: &Export, limits: &Limits) -> (u32, u32, u32) {
    let preferred = export.device().alignment().clamp(4096, 1 << 20) as u32;
    (1, preferred, limits.max_payload)
}

struct Session<'a, 'b, T: HandshakeIo> {
    io: &'a mut T,
    policy: &'a Policy<'b>,
    out: Vec<u8>,
    structured: bool,
    /// Contexts selected by the last SET_META_CONTEXT, with the export they were set for.
    contexts: Option<(Arc<Export>, Vec<MetaContext>)>,
}

/// Runs the handshake on `io`.
pub fn negotiate<T: HandshakeIo>(io: &mut T, policy: &Policy<'_>) -> Result<Negotiated, Ended> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&proto::INIT_PASSWD.to_be_bytes());
    greeting.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    io.write_all(&greeting)?;
    let mut flags = [0u8; 4];
    io.read_exact(&mut flags)?;
    let flags = u32::from_be_bytes(flags);
    if flags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
        return Err(Ended::Refused(format!("unknown client flags {flags:#x}")));
    }
    if flags & proto::FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(Ended::Refused(
            "the client does not speak the fixed newstyle handshake".into(),
        ));
    }
    let no_zeroes = flags & proto::FLAG_C_NO_ZEROES != 0;
    let mut s = Session {
        io,
        policy,
        out: Vec::new(),
        structured: false,
        contexts: None,
    };
    for _ in 0..MAX_OPTIONS {
        if let Some(done) = s.option(no_zeroes)? {
            return Ok(done);
        }
    }
    Err(Ended::Refused(format!("more than {MAX_OPTIONS} options")))
}

impl<T: HandshakeIo> Session<'_, '_, T> {
    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) {
        proto::option_reply(&mut self.out, option, kind, data);
    }

    fn error(&mut self, option: u32, kind: u32, message: &str) {
        let msg = proto::truncate(message, MAX_STRING).to_string();
        self.reply(option, kind, msg.as_bytes());
    }

    fn send(&mut self) -> io::Result<()> {
        let out = std::mem::take(&mut self.out);
        self.io.write_all(&out)
    }

    /// Handles one option; `Some` when transmission starts.
    fn option(&mut self, no_zeroes: bool) -> Result<Option<Negotiated>, Ended> {
        let mut head = [0u8; proto::OPTION_HEADER_LEN];
        self.io.read_exact(&mut head)?;
        if proto::be64(&head, 0) != proto::IHAVEOPT {
            return Err(Ended::Refused("bad option magic".into()));
        }
        let option = proto::be32(&head, 8);
        let len = proto::be32(&head, 12);
        if len > MAX_OPTION_LEN {
            if len > MAX_DISCARD_LEN {
                return Err(Ended::Refused(format!("option of {len} bytes")));
            }
            let mut left = len as usize;
            let mut sink = vec![0u8; 64 << 10];
            while left > 0 {
                let n = left.min(sink.len());
                self.io.read_exact(&mut sink[..n])?;
                left -= n;
            }
            self.error(option, rep::ERR_TOO_BIG, "Option payload too large");
            self.send()?;
            return Ok(None);
        }
        let mut data = vec![0u8; len as usize];
        self.io.read_exact(&mut data)?;
        let tls_up = self.io.is_tls();
        if self.policy.mode == TlsMode::Forced && !tls_up {
            match option {
                opt::STARTTLS | opt::ABORT => {}
                opt::EXPORT_NAME => return Err(Ended::Refused("EXPORT_NAME before TLS".into())),
                _ => {
                    self.error(option, rep::ERR_TLS_REQD, "TLS is required");
                    self.send()?;
                    return Ok(None);
                }
            }
        }
        let result = match option {
            opt::ABORT => {
                self.reply(option, rep::ACK, &[]);
                // The client may already have closed: its reply is a courtesy.
                let _ = self.send();
                return Err(Ended::Client);
            }
            opt::LIST => {
                self.list(&data);
                None
            }
            opt::STARTTLS => {
                self.starttls(&data)?;
                None
            }
            opt::INFO | opt::GO => self.info_or_go(option, &data),
            opt::EXPORT_NAME => return self.export_name(&data, no_zeroes).map(Some),
            opt::STRUCTURED_REPLY => {
                if data.is_empty() {
                    self.structured = true;
                    self.reply(option, rep::ACK, &[]);
                } else {
                    self.error(option, rep::ERR_INVALID, "STRUCTURED_REPLY takes no data");
                }
                None
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                self.meta_context(option, &data);
                None
            }
            _ => {
                self.error(option, rep::ERR_UNSUP, "Option not supported");
                None
            }
        };
        self.send()?;
        Ok(result)
    }

    fn list(&mut self, data: &[u8]) {
        if !data.is_empty() {
            return self.error(opt::LIST, rep::ERR_INVALID, "LIST takes no data");
        }
        let tls = self.io.is_tls();
        let cert = self.io.peer_certificate();
        for e in self.policy.registry.all() {
            if !e.listed_for(tls, cert.as_ref()) {
                continue;
            }
            let mut d = (e.name().len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(e.name().as_bytes());
            d.extend_from_slice(proto::truncate(e.description(), 256).as_bytes());
            self.reply(opt::LIST, rep::SERVER, &d);
        }
        self.reply(opt::LIST, rep::ACK, &[]);
    }

    fn starttls(&mut self, data: &[u8]) -> Result<(), Ended> {
        if !data.is_empty() {
            self.error(opt::STARTTLS, rep::ERR_INVALID, "STARTTLS takes no data");
            return Ok(());
        }
        if self.io.is_tls() {
            self.error(opt::STARTTLS, rep::ERR_INVALID, "TLS is already on");
            return Ok(());
        }
        let Some(tls) = self
            .policy
            .tls
            .filter(|_| self.policy.mode != TlsMode::None)
        else {
            self.error(
                opt::STARTTLS,
                rep::ERR_POLICY,
                "This server has no TLS certificate",
            );
            return Ok(());
        };
        self.reply(opt::STARTTLS, rep::ACK, &[]);
        self.send()?;
        self.io
            .start_tls(tls)
            .map_err(|e| Ended::Refused(format!("TLS handshake failed: {e}")))?;
        // Nothing negotiated before TLS carries over.
        self.structured = false;
        self.contexts = None;
        Ok(())
    }

    /// The export named `name` if this client may use it, else the option error to send.
    fn find(&self, name: &str) -> Result<Arc<Export>, (u32, String)> {
        let tls = self.io.is_tls();
        let cert = self.io.peer_certificate();
        let unknown = || {
            (
                rep::ERR_UNKNOWN,
                format!(
                    "No export named '{}' is available to this client",
                    proto::truncate(name, 256)
                ),
            )
        };
        let export = self.policy.registry.lookup(name).ok_or_else(unknown)?;
        if export.is_removed() {
            return Err(unknown());
        }
        if !tls && matches!(export.access(), Access::ClientCertificates(_)) {
            return Err(if self.policy.mode == TlsMode::None {
                unknown()
            } else {
                (rep::ERR_TLS_REQD, "TLS is required".into())
            });
        }
        if !export.admits(tls, cert.as_ref()) {
            return Err(unknown());
        }
        Ok(export)
    }

    fn info_or_go(&mut self, option: u32, data: &[u8]) -> Option<Negotiated> {
        let req = match parse_info(data) {
            Ok(r) => r,
            Err(e) => {
                self.option_error(option, e);
                return None;
            }
        };
        let export = match self.find(req.name) {
            Ok(e) => e,
            Err((kind, msg)) => {
                self.error(option, kind, &msg);
                return None;
            }
        };
        let flags = transmission_flags(&export, self.structured);
        let mut d = info::EXPORT.to_be_bytes().to_vec();
        d.extend_from_slice(&export.device().size().to_be_bytes());
        d.extend_from_slice(&flags.to_be_bytes());
        self.reply(option, rep::INFO, &d);
        let (min, pref, max) = block_sizes(&export, self.policy.limits);
        let mut d = info::BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [min, pref, max] {
            d.extend_from_slice(&v.to_be_bytes());
        }
        self.reply(option, rep::INFO, &d);
        if req.infos.contains(&info::NAME) {
            let mut d = info::NAME.to_be_bytes().to_vec();
            d.extend_from_slice(export.name().as_bytes());
            self.reply(option, rep::INFO, &d);
        }
        if req.infos.contains(&info::DESCRIPTION) {
            let mut d = info::DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(proto::truncate(export.description(), MAX_STRING).as_bytes());
            self.reply(option, rep::INFO, &d);
        }
        self.reply(option, rep::ACK, &[]);
        if option != opt::GO {
            return None;
        }
        let contexts = match self.contexts.take() {
            Some((e, c)) if Arc::ptr_eq(&e, &export) => c,
            _ => Vec::new(),
        };
        Some(Negotiated {
            export,
            structured: self.structured,
            contexts,
            flags,
        })
    }

    fn export_name(&mut self, data: &[u8], no_zeroes: bool) -> Result<Negotiated, Ended> {
        let name = parse_string(data).ok_or_else(|| Ended::Refused("bad export name".into()))?;
        let export = self.find(name).map_err(|(_, msg)| Ended::Refused(msg))?;
        let flags = transmission_flags(&export, self.structured);
        let mut d = export.device().size().to_be_bytes().to_vec();
        d.extend_from_slice(&flags.to_be_bytes());
        if !no_zeroes {
            d.extend_from_slice(&[0u8; 124]);
        }
        self.io.write_all(&d)?;
        let contexts = match self.contexts.take() {
            Some((e, c)) if Arc::ptr_eq(&e, &export) => c,
            _ => Vec::new(),
        };
        Ok(Negotiated {
            export,
            structured: self.structured,
            contexts,
            flags,
        })
    }

    fn option_error(&mut self, option: u32, e: OptionError) {
        match e {
            OptionError::Invalid => self.error(option, rep::ERR_INVALID, "Malformed option"),
            OptionError::TooBig => self.error(option, rep::ERR_TOO_BIG, "Too many items"),
        }
    }

    fn meta_context(&mut self, option: u32, data: &[u8]) {
        if option == opt::SET_META_CONTEXT {
            // A SET replaces the selection even when it fails.
            self.contexts = None;
        }
        if !self.structured {
            return self.error(option, rep::ERR_INVALID, "Structured replies come first");
        }
        let req = match parse_meta(data) {
            Ok(r) => r,
            Err(e) => return self.option_error(option, e),
        };
        let export = match self.find(req.name) {
            Ok(e) => e,
            Err((kind, msg)) => return self.error(option, kind, &msg),
        };
        let bitmaps = export.bitmap_names();
        let mut found: Vec<MetaContext> = Vec::new();
        if option == opt::LIST_META_CONTEXT {
            if req.queries.is_empty() {
                found = all_contexts(&bitmaps);
            }
            for q in &req.queries {
                match list_matches(q, &bitmaps) {
                    Ok(v) => found.extend(v),
                    Err(e) => return self.option_error(option, e),
                }
            }
        } else {
            for q in &req.queries {
                if !q.contains(':') {
                    return self.option_error(option, OptionError::Invalid);
                }
                found.extend(set_match(q, &bitmaps));
            }
        }
        let mut unique: Vec<MetaContext> = Vec::new();
        for c in found {
            if !unique.contains(&c) {
                unique.push(c);
            }
        }
        for (i, c) in unique.iter().enumerate() {
            let id = if option == opt::SET_META_CONTEXT {
                i as u32 + 1
            } else {
                0
            };
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(c.name().as_bytes());
            self.reply(option, rep::META_CONTEXT, &d);
        }
        self.reply(option, rep::ACK, &[]);
        if option == opt::SET_META_CONTEXT {
            self.contexts = Some((export, unique));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::ExportConfig;
    use strata_storage::io::memory::MemoryDevice;

    struct Mem {
        input: Vec<u8>,
        at: usize,
        out: Vec<u8>,
    }

    impl HandshakeIo for Mem {
        fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
            let end = self.at + buf.len();
            let src = self
                .input
                .get(self.at..end)
                .ok_or(io::ErrorKind::UnexpectedEof)?;
            buf.copy_from_slice(src);
            self.at = end;
            Ok(())
        }
        fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
            self.out.extend_from_slice(buf);
            Ok(())
        }
        fn start_tls(&mut self, _: &TlsSettings) -> io::Result<()> {
            Err(io::Error::other("none"))
        }
        fn is_tls(&self) -> bool {
            false
        }
        fn peer_certificate(&self) -> Option<Fingerprint> {
            None
        }
    }

    fn option(o: u32, data: &[u8]) -> Vec<u8> {
        let mut v = proto::IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&o.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    /// The reply types in `out` after the 18-byte greeting.
    fn reply_types(out: &[u8]) -> Vec<u32> {
        let mut v = Vec::new();
        let mut at = 18;
        while at + 20 <= out.len() {
            v.push(proto::be32(out, at + 12));
            at += 20 + proto::be32(out, at + 16) as usize;
        }
        v
    }

    fn run(mode: TlsMode, options: &[Vec<u8>]) -> (Result<Negotiated, Ended>, Vec<u32>) {
        let reg = ExportRegistry::new();
        reg.add(ExportConfig {
            name: "disk".into(),
            description: "memory".into(),
            device: MemoryDevice::new(1 << 20),
            read_only: false,
            bitmaps: None,
            access: Access::Open,
            keep_alive: None,
        })
        .unwrap();
        let limits = Limits::default();
        let policy = Policy {
            registry: &reg,
            tls: None,
            mode,
            limits: &limits,
        };
        let mut input = 3u32.to_be_bytes().to_vec();
        for o in options {
            input.extend_from_slice(o);
        }
        let mut io = Mem {
            input,
            at: 0,
            out: Vec::new(),
        };
        let r = negotiate(&mut io, &policy);
        (r, reply_types(&io.out))
    }

    fn go(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        option(opt::GO, &d)
    }

    #[test]
    fn forced_tls_refuses_everything_but_starttls_and_abort() {
        let (r, types) = run(TlsMode::Forced, &[go("disk"), option(opt::LIST, &[])]);
        assert!(matches!(r, Err(Ended::Client)));
        assert_eq!(types, vec![rep::ERR_TLS_REQD, rep::ERR_TLS_REQD]);
        let (r, _) = run(TlsMode::Forced, &[option(opt::EXPORT_NAME, b"disk")]);
        assert!(matches!(r, Err(Ended::Refused(_))));
    }

    #[test]
    fn no_tls_mode_refuses_starttls_by_policy_and_goes() {
        let (r, types) = run(
            TlsMode::None,
            &[
                option(opt::STARTTLS, &[]),
                option(opt::STRUCTURED_REPLY, &[]),
                option(99, &[1, 2, 3]),
                go("nope"),
                go("disk"),
            ],
        );
        let n = r.unwrap();
        assert!(n.structured);
        assert_eq!(
            types,
            vec![
                rep::ERR_POLICY,
                rep::ACK,
                rep::ERR_UNSUP,
                rep::ERR_UNKNOWN,
                rep::INFO,
                rep::INFO,
                rep::ACK
            ]
        );
    }
}

//! A fault-injecting, counting HTTP proxy in front of an S3 endpoint (radosgw of the test
//! cluster), for tests of the S3 datastore: it counts requests by method, and on demand answers
//! requests with `503 SlowDown` (S3's throttling), or cuts connections once some number of
//! bytes went upstream — every connection from then on, or just the one that crossed the mark
//! (a transient network failure).
//!
//! It understands just enough HTTP/1.1 to find where each request ends: the request line, the
//! headers, and a body of `Content-Length` bytes. A request it cannot frame (chunked transfer
//! encoding) is counted in [`Counts::unframed`] and the rest of that connection is relayed
//! as it is.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Largest request head accepted (request line and headers).
const MAX_HEAD: usize = 64 << 10;

/// What the proxy saw and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// PUT requests relayed upstream.
    pub put: u64,
    /// GET requests relayed upstream.
    pub get: u64,
    /// POST requests relayed upstream (multipart create and complete).
    pub post: u64,
    /// DELETE requests relayed upstream.
    pub delete: u64,
    /// HEAD requests relayed upstream.
    pub head: u64,
    /// Requests answered with 503 SlowDown instead.
    pub throttled: u64,
    /// Connections cut.
    pub cut: u64,
    /// Requests it could not frame (relayed raw).
    pub unframed: u64,
}

#[derive(Debug, Default)]
struct Shared {
    put: AtomicU64,
    get: AtomicU64,
    post: AtomicU64,
    delete: AtomicU64,
    head: AtomicU64,
    throttled: AtomicU64,
    cut: AtomicU64,
    unframed: AtomicU64,
    /// Bytes relayed upstream so far.
    sent: AtomicU64,
    /// Cut connections once `sent` passes this.
    cut_after: AtomicU64,
    /// Cut only the first connection that passes the mark, then stop cutting.
    cut_once: AtomicBool,
    /// Requests still to answer with 503.
    throttle: AtomicU64,
}

/// A running proxy; it lives as long as the test process.
#[derive(Debug, Clone)]
pub struct S3Proxy {
    port: u16,
    shared: Arc<Shared>,
}

impl S3Proxy {
    /// Starts a proxy on a free loopback port in front of `upstream` (`http://HOST:PORT`).
    pub fn start(upstream: &str) -> anyhow::Result<S3Proxy> {
        let target = upstream
            .strip_prefix("http://")
            .ok_or_else(|| anyhow::anyhow!("the proxy relays http:// only, not {upstream}"))?
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            cut_after: AtomicU64::new(u64::MAX),
            ..Default::default()
        });
        let sh = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let sh = sh.clone();
                std::thread::spawn(move || serve(client, server, &sh));
            }
        });
        Ok(S3Proxy { port, shared })
    }

    /// The proxy's endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What it saw so far.
    pub fn counts(&self) -> Counts {
        let s = &self.shared;
        let l = |a: &AtomicU64| a.load(Ordering::SeqCst);
        Counts {
            put: l(&s.put),
            get: l(&s.get),
            post: l(&s.post),
            delete: l(&s.delete),
            head: l(&s.head),
            throttled: l(&s.throttled),
            cut: l(&s.cut),
            unframed: l(&s.unframed),
        }
    }

    /// Cuts connections once `bytes` more went upstream: every one from then on (until
    /// [`S3Proxy::heal`]), or with `once` only the one that crossed the mark.
    pub fn cut_after(&self, bytes: u64, once: bool) {
        let s = &self.shared;
        s.cut_once.store(once, Ordering::SeqCst);
        s.cut_after
            .store(s.sent.load(Ordering::SeqCst) + bytes, Ordering::SeqCst);
    }

    /// Stops cutting connections.
    pub fn heal(&self) {
        self.shared.cut_after.store(u64::MAX, Ordering::SeqCst);
    }

    /// Answers the next `n` requests with `503 SlowDown`.
    pub fn throttle(&self, n: u64) {
        self.shared.throttle.store(n, Ordering::SeqCst);
    }
}

fn serve(client: TcpStream, server: TcpStream, sh: &Shared) {
    let (Ok(client_w), Ok(server_r)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let down = std::thread::spawn(move || relay_raw(server_r, client_w));
    relay_requests(&client, server, sh);
    let _ = client.shutdown(Shutdown::Both);
    let _ = down.join();
}

/// Copies until either side ends, then closes both.
fn relay_raw(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// The client's requests, one at a time, to the server (or answered here).
fn relay_requests(client: &TcpStream, mut server: TcpStream, sh: &Shared) {
    let mut reader = BufReader::new(client);
    let mut client_w = match client.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    };
    while let Some(head) = read_head(&mut reader) {
        let text = String::from_utf8_lossy(&head).to_string();
        let method = text.split(' ').next().unwrap_or("").to_string();
        let header = |name: &str| {
            text.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        if header("transfer-encoding").is_some() {
            sh.unframed.fetch_add(1, Ordering::SeqCst);
            if server.write_all(&head).is_ok() {
                let _ = std::io::copy(&mut reader, &mut server);
            }
            break;
        }
        let body_len: u64 = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let throttled = sh
            .throttle
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if throttled {
            sh.throttled.fetch_add(1, Ordering::SeqCst);
            if std::io::copy(&mut (&mut reader).take(body_len), &mut std::io::sink()).ok()
                != Some(body_len)
            {
                break;
            }
            let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code>\
                        <Message>Please reduce your request rate.</Message></Error>";
            let body = if method == "HEAD" { "" } else { body };
            let reply = format!(
                "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n\
                 Content-Length: {}\r\nRetry-After: 1\r\n\r\n{body}",
                body.len()
            );
            if client_w.write_all(reply.as_bytes()).is_err() {
                break;
            }
            continue;
        }
        let counter = match method.as_str() {
            "PUT" => &sh.put,
            "GET" => &sh.get,
            "POST" => &sh.post,
            "DELETE" => &sh.delete,
            "HEAD" => &sh.head,
            _ => &sh.unframed,
        };
        counter.fetch_add(1, Ordering::SeqCst);
        if !forward(&head, &mut reader, body_len, &mut server, sh) {
            sh.cut.fetch_add(1, Ordering::SeqCst);
            break;
        }
    }
    let _ = server.shutdown(Shutdown::Both);
}

/// The request line and headers, through the empty line; `None` at the end of the connection.
fn read_head(reader: &mut BufReader<&TcpStream>) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    loop {
        let before = head.len();
        let n = reader.read_until(b'\n', &mut head).ok()?;
        if n == 0 || head.len() > MAX_HEAD {
            return None;
        }
        if &head[before..] == b"\r\n" || &head[before..] == b"\n" {
            return Some(head);
        }
    }
}

/// Relays one request; `false` if the connection was cut (or failed).
fn forward(
    head: &[u8],
    reader: &mut BufReader<&TcpStream>,
    body_len: u64,
    server: &mut TcpStream,
    sh: &Shared,
) -> bool {
    if !account(sh, head.len() as u64) || server.write_all(head).is_err() {
        return false;
    }
    let mut left = body_len;
    let mut buf = vec![0u8; 64 << 10];
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = match reader.read(&mut buf[..want]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        if !account(sh, n as u64) || server.write_all(&buf[..n]).is_err() {
            return false;
        }
        left -= n as u64;
    }
    true
}

/// Counts `n` bytes going upstream; `false` if the connection is to be cut now.
fn account(sh: &Shared, n: u64) -> bool {
    let total = sh.sent.fetch_add(n, Ordering::SeqCst) + n;
    if total <= sh.cut_after.load(Ordering::SeqCst) {
        return true;
    }
    if sh.cut_once.load(Ordering::SeqCst) {
        sh.cut_after.store(u64::MAX, Ordering::SeqCst);
    }
    false
}

//! Listening sockets, the accept loops and the connections' threads; [`ServerHandle`] stops
//! them all.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::conn::Connection;
use crate::error::{NbdError, Result};
use crate::export::{Access, ClientInfo, ExportRegistry};
use crate::handshake::{negotiate, Ended, Policy, TlsMode};
use crate::tls::TlsSettings;
use crate::transport::{SocketShutdown, Stream, Transport};

/// Bounds on what clients can make the server hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections at once (more are closed at accept).
    pub max_connections: usize,
    /// Time a client has for the whole handshake (and each TLS handshake step).
    pub handshake_timeout: Duration,
    /// Largest read or write payload (advertised as the maximum block size).
    pub max_payload: u32,
    /// Requests in flight per connection (the I/O queue's depth).
    pub max_requests: usize,
    /// Payload bytes a connection's requests and unsent replies may hold before it stops
    /// reading new requests.
    pub max_buffered: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 64,
            handshake_timeout: Duration::from_secs(30),
            max_payload: 32 << 20,
            max_requests: 128,
            max_buffered: 64 << 20,
        }
    }
}

/// An address to listen on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address (port 0 picks a free port).
    Tcp(SocketAddr),
    /// A Unix socket path (an existing socket file there is replaced).
    Unix(PathBuf),
}

/// How to run a server.
#[derive(Clone, Debug, Default)]
pub struct ServerConfig {
    /// Where to listen.
    pub listen: Vec<Listen>,
    /// TLS, required for clients that are not local. Without it only loopback TCP addresses
    /// and Unix sockets may be listened on.
    pub tls: Option<TlsSettings>,
    /// Bounds.
    pub limits: Limits,
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

struct Shared {
    registry: Arc<ExportRegistry>,
    tls: Option<TlsSettings>,
    limits: Limits,
    stopping: AtomicBool,
    /// Every connection's socket, to shut down at stop; the count bounds connections.
    conns: Mutex<HashMap<u64, Stream>>,
    conns_gone: Condvar,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, HashMap<u64, Stream>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running NBD server. Dropping it stops the server (see [`ServerHandle::stop`]).
pub struct ServerHandle {
    shared: Arc<Shared>,
    wake: Arc<EventFd>,
    accept_threads: Vec<JoinHandle<()>>,
    addrs: Vec<Listen>,
    unix_paths: Vec<PathBuf>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("addrs", &self.addrs)
            .finish()
    }
}

fn is_local(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(ip) => ip.is_loopback(),
        IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Starts a server for the exports of `registry`.
pub fn start(config: ServerConfig, registry: Arc<ExportRegistry>) -> Result<ServerHandle> {
    if config.listen.is_empty() {
        return Err(NbdError::InvalidConfig("No address to listen on".into()));
    }
    if config.tls.is_none() {
        if let Some(Listen::Tcp(a)) = config
            .listen
            .iter()
            .find(|l| matches!(l, Listen::Tcp(a) if !is_local(a)))
        {
            return Err(NbdError::InvalidConfig(format!(
                "Plain NBD is allowed only on loopback or a Unix socket: {a} needs TLS \
                 (a certificate and key)"
            )));
        }
    }
    let verifies = config
        .tls
        .as_ref()
        .is_some_and(TlsSettings::verifies_clients);
    if !verifies && registry.has_certificate_exports() {
        return Err(NbdError::InvalidConfig(
            "Exports with a client-certificate allow-list need TLS with a client CA".into(),
        ));
    }
    let mut listeners = Vec::new();
    let mut addrs = Vec::new();
    let mut unix_paths = Vec::new();
    for l in &config.listen {
        match l {
            Listen::Tcp(a) => {
                let t = TcpListener::bind(a)
                    .map_err(|e| NbdError::io(format!("Listening on {a}"), e))?;
                let local = t
                    .local_addr()
                    .map_err(|e| NbdError::io("Reading the bound address", e))?;
                addrs.push(Listen::Tcp(local));
                listeners.push(Listener::Tcp(t));
            }
            Listen::Unix(p) => {
                if std::fs::symlink_metadata(p)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    let _ = std::fs::remove_file(p);
                }
                let u = UnixListener::bind(p)
                    .map_err(|e| NbdError::io(format!("Listening on {}", p.display()), e))?;
                addrs.push(Listen::Unix(p.clone()));
                unix_paths.push(p.clone());
                listeners.push(Listener::Unix(u, p.clone()));
            }
        }
    }
    let shared = Arc::new(Shared {
        registry,
        tls: config.tls,
        limits: config.limits,
        stopping: AtomicBool::new(false),
        conns: Mutex::new(HashMap::new()),
        conns_gone: Condvar::new(),
    });
    let wake =
        Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| NbdError::io("Creating an eventfd", e))?);
    let mut accept_threads = Vec::new();
    for l in listeners {
        let shared = shared.clone();
        let wake = wake.clone();
        let t = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(l, &shared, &wake))
            .map_err(|e| NbdError::io("Starting the accept thread", e))?;
        accept_threads.push(t);
    }
    Ok(ServerHandle {
        shared,
        wake,
        accept_threads,
        addrs,
        unix_paths,
    })
}

fn accept_loop(l: Listener, shared: &Arc<Shared>, wake: &EventFd) {
    let fd = match &l {
        Listener::Tcp(t) => t.as_raw_fd(),
        Listener::Unix(u, _) => u.as_raw_fd(),
    };
    loop {
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structures for the call's duration.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        if r <= 0 || fds[0].revents & libc::POLLIN == 0 {
            continue;
        }
        let accepted = match &l {
            Listener::Tcp(t) => t.accept().map(|(s, a)| {
                let _ = s.set_nodelay(true);
                (Stream::Tcp(s), a.to_string(), is_local(&a))
            }),
            Listener::Unix(u, p) => u
                .accept()
                .map(|(s, _)| (Stream::Unix(s), format!("unix:{}", p.display()), true)),
        };
        match accepted {
            Ok((stream, peer, local)) => spawn_connection(shared, stream, peer, local),
            Err(e) => {
                tracing::warn!("accepting an NBD connection failed: {e}");
                // EMFILE and the like: do not spin.
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn spawn_connection(shared: &Arc<Shared>, stream: Stream, peer: String, local: bool) {
    let id = shared.registry.next_client_id();
    {
        let mut conns = shared.conns();
        if conns.len() >= shared.limits.max_connections {
            tracing::warn!(%peer, "refusing an NBD connection: {} connections already", conns.len());
            stream.shutdown();
            return;
        }
        match stream.try_clone() {
            Ok(c) => {
                conns.insert(id, c);
            }
            Err(e) => {
                tracing::warn!(%peer, "refusing an NBD connection: {e}");
                return;
            }
        }
    }
    let s = shared.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("nbd-conn-{id}"))
        .spawn(move || {
            let span = tracing::info_span!("nbd", conn = id, %peer);
            let _e = span.enter();
            serve_connection(&s, id, stream, peer.clone(), local);
            s.conns().remove(&id);
            s.conns_gone.notify_all();
        });
    if let Err(e) = spawned {
        tracing::warn!("starting an NBD connection thread failed: {e}");
        shared.conns().remove(&id);
    }
}

fn serve_connection(shared: &Shared, id: u64, stream: Stream, peer: String, local: bool) {
    let limits = shared.limits;
    let mode = match (&shared.tls, local) {
        (None, _) => TlsMode::None,
        (Some(_), true) => TlsMode::Selective,
        (Some(_), false) => TlsMode::Forced,
    };
    if mode == TlsMode::None && !local {
        // Unreachable by configuration (plain listeners are local), kept as a last guard.
        stream.shutdown();
        return;
    }
    let disconnect = match stream.try_clone() {
        Ok(s) => SocketShutdown(s),
        Err(_) => return,
    };
    if stream.set_timeout(Some(limits.handshake_timeout)).is_err() {
        return;
    }
    let mut transport = Transport::new(stream);
    let policy = Policy {
        registry: &shared.registry,
        tls: shared.tls.as_ref(),
        mode,
        limits: &limits,
    };
    let negotiated = match negotiate(&mut transport, &policy) {
        Ok(n) => n,
        Err(Ended::Refused(why)) => {
            tracing::info!("handshake refused: {why}");
            transport.close();
            return;
        }
        Err(Ended::Io(e)) => {
            tracing::info!("handshake failed: {e}");
            transport.close();
            return;
        }
        Err(Ended::Client) => {
            transport.close();
            return;
        }
    };
    if transport.stream().set_timeout(None).is_err() {
        return;
    }
    let export = negotiated.export.clone();
    let info = ClientInfo {
        id,
        peer,
        tls: transport.is_tls(),
        certificate: transport.peer_certificate(),
        since: SystemTime::now(),
    };
    if !export.attach(info, Box::new(disconnect)) {
        transport.close();
        return;
    }
    tracing::info!(
        export = export.name(),
        tls = transport.is_tls(),
        "transmission started"
    );
    match Connection::new(transport, negotiated, limits) {
        Ok(conn) => conn.run().close(),
        Err(e) => tracing::warn!(
            export = export.name(),
            "opening the export's queue failed: {e}"
        ),
    }
    export.detach(id);
}

impl ServerHandle {
    /// The addresses listened on (with the ports chosen for port 0).
    pub fn addrs(&self) -> &[Listen] {
        &self.addrs
    }

    /// The first TCP address listened on.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.addrs.iter().find_map(|l| match l {
            Listen::Tcp(a) => Some(*a),
            Listen::Unix(_) => None,
        })
    }

    /// The exports served.
    pub fn registry(&self) -> &Arc<ExportRegistry> {
        &self.shared.registry
    }

    /// Connections open now (including ones still in the handshake).
    pub fn connections(&self) -> usize {
        self.shared.conns().len()
    }

    /// Whether any export restricts access by client certificate (for callers that add
    /// exports after start: such exports need TLS with a client CA).
    pub fn verifies_clients(&self) -> bool {
        self.shared
            .tls
            .as_ref()
            .is_some_and(TlsSettings::verifies_clients)
    }

    /// Checks that an export's access rule can be enforced by this server.
    pub fn check_access(&self, access: &Access) -> Result<()> {
        if matches!(access, Access::ClientCertificates(_)) && !self.verifies_clients() {
            return Err(NbdError::InvalidConfig(
                "Exports with a client-certificate allow-list need TLS with a client CA".into(),
            ));
        }
        Ok(())
    }

    /// Stops listening, disconnects every client and waits (at most `timeout`) for their
    /// requests in flight to finish. Exports stay in the registry.
    pub fn stop(mut self, timeout: Duration) -> bool {
        self.stop_inner(timeout)
    }

    fn stop_inner(&mut self, timeout: Duration) -> bool {
        self.shared.stopping.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        for t in self.accept_threads.drain(..) {
            let _ = t.join();
        }
        for p in self.unix_paths.drain(..) {
            let _ = std::fs::remove_file(p);
        }
        let deadline = Instant::now() + timeout;
        let mut conns = self.shared.conns();
        for s in conns.values() {
            s.shutdown();
        }
        while !conns.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            conns = self
                .shared
                .conns_gone
                .wait_timeout(conns, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if !self.shared.stopping.load(Ordering::Acquire) {
            self.stop_inner(Duration::from_secs(30));
        }
    }
}

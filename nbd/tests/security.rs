//! Refusals that must not harm anyone else: unknown export names, bad TLS (untrusted CAs,
//! certificates not on an export's allow-list, plain clients for TLS-only exports) and
//! malformed requests, each while another client keeps working. TLS is checked with the real
//! clients (qemu-img with a tls-creds-x509 object, nbdinfo with tls-certificates=DIR) against
//! certificates made by openssl.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use common::*;
use strata_nbd::proto::{cmd, opt, rep, RequestHeader, IHAVEOPT, OPTION_REPLY_MAGIC};
use strata_nbd::{Access, ExportConfig, ExportRegistry, Fingerprint, TlsSettings};
use strata_storage::io::memory::MemoryDevice;
use strata_storage::HostFile;

fn memory_export(name: &str, access: Access, content: &[u8]) -> ExportConfig {
    let dev = MemoryDevice::new(content.len() as u64);
    dev.write_all_at(0, content).unwrap();
    ExportConfig {
        name: name.into(),
        description: format!("memory {name}"),
        device: dev,
        read_only: false,
        bitmaps: None,
        access,
        keep_alive: None,
    }
}

/// A hand-driven plain client, for sending what real clients never send.
struct Raw(TcpStream);

impl Raw {
    fn connect(addr: std::net::SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = Raw(s);
        let mut greeting = [0u8; 18];
        r.0.read_exact(&mut greeting).unwrap();
        r.0.write_all(&3u32.to_be_bytes()).unwrap();
        r
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.0.write_all(&m).unwrap();
    }

    /// Reads option replies up to the final one; returns its type.
    fn final_reply(&mut self) -> u32 {
        loop {
            let mut h = [0u8; 20];
            self.0.read_exact(&mut h).unwrap();
            assert_eq!(
                u64::from_be_bytes(h[0..8].try_into().unwrap()),
                OPTION_REPLY_MAGIC
            );
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut body = vec![0u8; len as usize];
            self.0.read_exact(&mut body).unwrap();
            if kind != rep::INFO && kind != rep::SERVER && kind != rep::META_CONTEXT {
                return kind;
            }
        }
    }

    fn go(&mut self, name: &str) -> u32 {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(opt::GO, &d);
        self.final_reply()
    }

    fn request(&mut self, kind: u16, offset: u64, length: u32, payload: &[u8]) {
        let h = RequestHeader {
            flags: 0,
            kind,
            handle: 42,
            offset,
            length,
        };
        self.0.write_all(&h.encode()).unwrap();
        self.0.write_all(payload).unwrap();
    }

    /// A simple reply's error and, on success of a read, its data.
    fn reply(&mut self, data_len: usize) -> (u32, Vec<u8>) {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let mut data = vec![0u8; if err == 0 { data_len } else { 0 }];
        self.0.read_exact(&mut data).unwrap();
        (err, data)
    }

    /// Whether the server closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

fn malformed_requests_and_unknown_names_close_only_their_own_connection() {
    let content = pattern(MIB as usize, 3);
    let reg = ExportRegistry::new();
    reg.add(memory_export("disk", Access::Open, &content))
        .unwrap();
    let server = serve(reg.clone(), None);
    let addr = server.tcp_addr().unwrap();

    let mut good = Raw::connect(addr);
    assert_eq!(good.go("disk"), rep::ACK);

    // Unknown names are refused, and the same handshake can go on.
    let mut c = Raw::connect(addr);
    assert_eq!(c.go("nope"), rep::ERR_UNKNOWN);
    assert_eq!(c.go("disk"), rep::ACK);
    // Out of range and unknown commands get errors; the connection stays usable.
    c.request(cmd::READ, MIB - 512, 1024, &[]);
    assert_eq!(c.reply(1024).0, 22);
    c.request(77, 0, 0, &[]);
    assert_eq!(c.reply(0).0, 22);
    c.request(cmd::WRITE, MIB, 512, &[0u8; 512]);
    assert_eq!(c.reply(0).0, 28);
    c.request(cmd::READ, 4096, 512, &[]);
    assert_eq!(c.reply(512), (0, content[4096..4608].to_vec()));

    // A bad magic and an oversized write payload end their connection.
    let mut bad = Raw::connect(addr);
    assert_eq!(bad.go("disk"), rep::ACK);
    bad.0.write_all(&[0xff; 28]).unwrap();
    assert!(bad.closed());
    let mut big = Raw::connect(addr);
    assert_eq!(big.go("disk"), rep::ACK);
    big.request(cmd::WRITE, 0, 64 << 20, &[]);
    assert!(big.closed());
    // Garbage in the handshake, a huge option, a stream cut mid-request.
    let mut junk = Raw::connect(addr);
    junk.0.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(junk.closed());
    let mut huge = Raw::connect(addr);
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&opt::GO.to_be_bytes());
    m.extend_from_slice(&u32::MAX.to_be_bytes());
    huge.0.write_all(&m).unwrap();
    assert!(huge.closed());
    let mut cut = Raw::connect(addr);
    assert_eq!(cut.go("disk"), rep::ACK);
    cut.0.write_all(&[0x25, 0x60]).unwrap();
    drop(cut);

    // The first client never noticed.
    good.request(cmd::READ, 0, 4096, &[]);
    assert_eq!(good.reply(4096), (0, content[..4096].to_vec()));
    good.request(cmd::DISC, 0, 0, &[]);
    assert!(good.closed());
    if strata_testkit::part_has_tool("nbdinfo", "libnbd-bin") {
        assert!(!run("nbdinfo", &[&uri(&server, "nope")]).status.success());
        ok("nbdinfo", &[&uri(&server, "disk")]);
    }
    drop((c, bad, big, junk, huge));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server.connections() > 0 {
        assert!(std::time::Instant::now() < deadline, "connections linger");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Makes a CA, a server certificate for 127.0.0.1, and client certificates in `dir`:
/// `server/` (server files), `good/` and `other/` (clients of the CA, in the layout QEMU and
/// libnbd read), `rogue/` (a client of another CA) and `wrongca/` (a client trusting another CA).
fn make_certs(dir: &Path) {
    let script = r#"
set -e
key="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
for ca in ca ca2; do
  openssl req -x509 $key -keyout $ca-key.pem -out $ca-cert.pem -days 2 -subj "/CN=Strata test $ca"
done
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' > server.ext
printf 'extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n' > client.ext
make() { # name ca ext role trusted
  openssl req $key -keyout $1-key.pem -out $1.csr -subj "/CN=$1"
  openssl x509 -req -in $1.csr -CA $2-cert.pem -CAkey $2-key.pem -CAcreateserial \
    -out $1-cert.pem -days 2 -extfile $3
  mkdir -p $1
  cp $5-cert.pem $1/ca-cert.pem
  cp $1-cert.pem $1/$4-cert.pem
  cp $1-key.pem $1/$4-key.pem
}
make server ca server.ext server ca
make good ca client.ext client ca
make other ca client.ext client ca
make rogue ca2 client.ext client ca
make wrongca ca client.ext client ca2
"#;
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "making certificates: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tls_clients_with_certificates_and_allow_lists() {
    strata_testkit::require_tool("openssl", "openssl");
    require_clients();
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let d = |p: &str| dir.path().join(p);
    let tls = TlsSettings::from_files(
        &d("server/server-cert.pem"),
        &d("server/server-key.pem"),
        Some(&d("ca-cert.pem")),
    )
    .unwrap();
    let content = pattern(4 * MIB as usize, 5);
    let reg = ExportRegistry::new();
    reg.add(memory_export("open", Access::Open, &content))
        .unwrap();
    let good = Fingerprint::of_pem_file(&d("good/client-cert.pem")).unwrap();
    reg.add(memory_export(
        "pinned",
        Access::ClientCertificates([good].into_iter().collect()),
        &content,
    ))
    .unwrap();
    let server = serve(reg.clone(), Some(tls));
    let port = server.tcp_addr().unwrap().port();
    let expected = d("expected.raw");
    raw_file(&expected, &content);

    // qemu-img the way QEMU's --tls-creds clients connect.
    let qemu = |creds: &str, export: &str| {
        run(
            "qemu-img",
            &[
                "compare",
                "--object",
                &format!(
                    "tls-creds-x509,id=tls0,dir={},endpoint=client",
                    d(creds).display()
                ),
                "--image-opts",
                &format!("driver=raw,file.filename={}", expected.display()),
                &format!("driver=nbd,host=127.0.0.1,port={port},export={export},tls-creds=tls0"),
            ],
        )
    };
    let q = qemu("good", "pinned");
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    assert!(qemu("good", "open").status.success());
    assert!(
        !qemu("other", "pinned").status.success(),
        "a certificate not on the list"
    );
    assert!(
        !qemu("rogue", "open").status.success(),
        "a certificate of another CA"
    );
    assert!(
        !qemu("wrongca", "open").status.success(),
        "a server it cannot verify"
    );

    let nbds = |creds: &str, export: &str| {
        run(
            "nbdinfo",
            &[&format!(
                "nbds://127.0.0.1:{port}/{export}?tls-certificates={}",
                d(creds).display()
            )],
        )
    };
    let n = nbds("good", "pinned");
    assert!(n.status.success(), "{}", String::from_utf8_lossy(&n.stderr));
    let text = String::from_utf8_lossy(&n.stdout);
    assert!(
        text.contains("TLS") && !text.contains("without TLS"),
        "{text}"
    );
    assert!(!nbds("other", "pinned").status.success());
    assert!(!nbds("rogue", "pinned").status.success());
    // Without TLS (allowed on loopback) the open export works, the pinned one does not.
    ok("nbdinfo", &[&format!("nbd://127.0.0.1:{port}/open")]);
    assert!(
        !run("nbdinfo", &[&format!("nbd://127.0.0.1:{port}/pinned")])
            .status
            .success()
    );
    // A plain client's listing does not show the pinned export.
    let list = ok("nbdinfo", &["--list", &format!("nbd://127.0.0.1:{port}/")]);
    assert!(
        list.contains("export=\"open\"") && !list.contains("pinned"),
        "{list}"
    );
    // nbdcopy both ways over TLS (several connections: the export offers multi-conn).
    let tls_uri = format!(
        "nbds://127.0.0.1:{port}/pinned?tls-certificates={}",
        d("good").display()
    );
    let out_file = d("out.raw");
    ok("nbdcopy", &[&tls_uri, out_file.to_str().unwrap()]);
    assert!(std::fs::read(&out_file).unwrap() == content);
    let input = pattern(content.len(), 77);
    let in_file = d("in.raw");
    raw_file(&in_file, &input);
    ok("nbdcopy", &["--flush", in_file.to_str().unwrap(), &tls_uri]);
    ok("nbdcopy", &[&tls_uri, out_file.to_str().unwrap()]);
    assert!(std::fs::read(&out_file).unwrap() == input);
    // And after all of that, TLS still works.
    raw_file(&expected, &input);
    assert!(qemu("good", "pinned").status.success());
}

fn plain_listeners_must_be_local() {
    let reg = ExportRegistry::new();
    let e = strata_nbd::start(
        strata_nbd::ServerConfig {
            listen: vec![strata_nbd::Listen::Tcp("0.0.0.0:0".parse().unwrap())],
            tls: None,
            limits: Default::default(),
        },
        reg,
    )
    .unwrap_err();
    assert!(e.to_string().contains("loopback"), "{e}");
}

strata_testkit::main!(
    malformed_requests_and_unknown_names_close_only_their_own_connection,
    tls_clients_with_certificates_and_allow_lists,
    plain_listeners_must_be_local,
);

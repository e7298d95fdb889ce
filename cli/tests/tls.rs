//! `strata serve` speaks HTTPS by default with the appliance's own certificate, and clients
//! reach it only by trusting it explicitly: its fingerprint pinned, or its CA file.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Output};
use std::time::Duration;

use common::Server;
use strata_api::client::{Client, Trust};

fn strata(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn the_default_server_is_https_with_a_printed_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let srv = Server::start_on(&data);
    assert!(srv.url.starts_with("https://"), "{}", srv.url);
    assert_eq!(srv.fingerprint.len(), 95, "{:?}", srv.fingerprint);
    // The certificate is the appliance's, made in DATA/tls, and the printed fingerprint is
    // the one the server presents.
    for f in ["ca.pem", "ca.key", "server.pem", "server.key"] {
        assert!(srv.data.join("tls").join(f).is_file(), "{f}");
    }
    let c = srv.client();
    assert_eq!(c.request("GET", "/api/health", None).unwrap().status, 200);

    // A wrong pin is refused before any request is sent.
    let mut wrong = srv.fingerprint.clone().into_bytes();
    wrong[0] = if wrong[0] == b'A' { b'B' } else { b'A' };
    let wrong = String::from_utf8(wrong).unwrap();
    let bad = Client::with_trust(
        &srv.url,
        Some(srv.token.clone()),
        Some(Trust::Fingerprint(wrong)),
    )
    .unwrap();
    let e = bad.request("GET", "/api/health", None).unwrap_err();
    assert!(e.to_string().contains("fingerprint"), "{e}");
    // No trust at all: refused, with what to do.
    let e = Client::with_trust(&srv.url, None, None).unwrap_err();
    assert!(e.to_string().contains("--fingerprint"), "{e}");

    // The appliance CA works as a trust anchor, for the names the certificate carries.
    let ca = srv.data.join("tls/ca.pem");
    let port = srv.url.rsplit(':').next().unwrap();
    for host in ["127.0.0.1", "localhost"] {
        let c = Client::with_trust(
            &format!("https://{host}:{port}"),
            Some(srv.token.clone()),
            Some(Trust::CaFile(ca.clone())),
        )
        .unwrap();
        assert_eq!(
            c.request("GET", "/api/volumes", None).unwrap().status,
            200,
            "{host}"
        );
    }
    // Another CA does not vouch for it.
    let other = tempfile::tempdir().unwrap();
    strata_service::tls::ApplianceTls::in_data_dir(other.path())
        .ensure(&[])
        .unwrap();
    let c = Client::with_trust(
        &srv.url,
        None,
        Some(Trust::CaFile(other.path().join("tls/ca.pem"))),
    )
    .unwrap();
    assert!(c.request("GET", "/api/health", None).is_err());

    // Plain HTTP to the HTTPS port gets no API answer.
    let addr = srv.url.trim_start_matches("https://").to_string();
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(!String::from_utf8_lossy(&out).contains("\"status\":\"ok\""));

    // The CLI reaches it with the fingerprint, or the CA file, and not without.
    let base = ["--remote", srv.url.as_str(), "--token", srv.token.as_str()];
    let o = strata(
        &[
            &base[..],
            &["--fingerprint", &srv.fingerprint, "volumes", "list"],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ca_arg = ca.display().to_string();
    let o = strata(&[&base[..], &["--ca", &ca_arg, "volumes", "list"]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = strata(&[&base[..], &["volumes", "list"]].concat());
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--fingerprint"));

    // A restarted server keeps its certificate.
    let fp = srv.fingerprint.clone();
    drop(srv);
    let again = Server::start_on(&data);
    assert_eq!(again.fingerprint, fp);
}

#[test]
fn plain_http_only_on_loopback_or_when_asked_for_insecurely() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let o = strata(&[
        "--data",
        data.to_str().unwrap(),
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--http",
        "--pv-size",
        "1G",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("loopback") && err.contains("--insecure-http"),
        "{err}"
    );
    let srv = Server::start_with_args(&["--http"]);
    assert!(srv.url.starts_with("http://127.0.0.1:"), "{}", srv.url);
    assert!(srv.fingerprint.is_empty());
    assert_eq!(
        srv.client()
            .request("GET", "/api/health", None)
            .unwrap()
            .status,
        200
    );
}

#[test]
fn a_given_certificate_replaces_the_appliances_own() {
    let dir = tempfile::tempdir().unwrap();
    let own = strata_service::tls::ApplianceTls::in_data_dir(dir.path());
    own.ensure(&["given.example".into()]).unwrap();
    let files = own.server_files();
    let want = strata_service::tls::file_fingerprint(&files.cert).unwrap();
    let srv = Server::start_with_args(&[
        "--tls-cert",
        files.cert.to_str().unwrap(),
        "--tls-key",
        files.key.to_str().unwrap(),
    ]);
    assert_eq!(srv.fingerprint, want);
    assert_eq!(
        srv.client()
            .request("GET", "/api/health", None)
            .unwrap()
            .status,
        200
    );
    assert!(!srv.data.join("tls/server.pem").exists());
}

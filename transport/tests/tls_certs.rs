//! TLS: the development CA file, PEM loading, server verification failures (wrong CA, expired,
//! wrong name) on WSS and QUIC, the insecure development verifier, and the certificate resolver
//! swap keeping open links while new links get the new certificate.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::net::{quic_client, quic_server, wss_server};
use common::setup;
use gearmesh_transport::tls::{CertResolver, ClientTls, ClientTrust, DevCa, NodeCert};
use gearmesh_transport::{AcceptConfig, Acceptor, DialError, Dialer, Frame};
use time::OffsetDateTime;

fn names() -> Vec<String> {
    common::net::names()
}

#[derive(Clone, Copy, Debug)]
enum T {
    Wss,
    Quic,
}

/// Serves `resolver` on a fresh acceptor and dials it with `trust`.
async fn dial_with(t: T, resolver: std::sync::Arc<CertResolver>, trust: ClientTrust) -> Result<(), DialError> {
    gearmesh_transport::tls::install_crypto_provider();
    let client = ClientTls::new(&trust).expect("client tls");
    let (acceptor, _incoming) = Acceptor::new(setup(2), AcceptConfig::default());
    match t {
        T::Wss => {
            let (addr, _server) = wss_server(&acceptor, resolver).await;
            let link = Dialer::new(setup(1), client).dial(&format!("wss://127.0.0.1:{}", addr.port())).await?;
            drop(link);
        }
        T::Quic => {
            let (ep, _server) = quic_server(&acceptor, resolver);
            let link = Dialer::new(setup(1), client.clone())
                .with_quic(quic_client(&client))
                .dial(&format!("quic://127.0.0.1:{}", ep.local_addr().expect("addr").port()))
                .await?;
            drop(link);
        }
    }
    Ok(())
}

fn assert_cert_rejected(r: Result<(), DialError>, what: &str) {
    match r {
        Err(DialError::Tls { reason, .. }) | Err(DialError::Quic { reason, .. }) => {
            assert!(
                reason.to_lowercase().contains("certificate")
                    || reason.contains("UnknownIssuer")
                    || reason.contains("NotValidForName")
                    || reason.contains("Expired"),
                "{what}: {reason}"
            );
        }
        other => panic!("{what}: expected a certificate failure, got {other:?}"),
    }
}

async fn rejects_bad_certificates(t: T) {
    let ca = DevCa::generate().expect("ca");
    let good = CertResolver::from_cert(&ca.issue(&names()).expect("cert")).expect("resolver");
    dial_with(t, good.clone(), ClientTrust::dev_ca(&ca)).await.expect("trusted CA works");

    let other = DevCa::generate().expect("other ca");
    assert_cert_rejected(dial_with(t, good.clone(), ClientTrust::dev_ca(&other)).await, "wrong CA");
    assert_cert_rejected(dial_with(t, good.clone(), ClientTrust::WebpkiRoots).await, "webpki roots");

    let now = OffsetDateTime::now_utc();
    let expired =
        ca.issue_valid(&names(), now - time::Duration::days(3), now - time::Duration::days(1)).expect("expired cert");
    let expired = CertResolver::from_cert(&expired).expect("resolver");
    assert_cert_rejected(dial_with(t, expired, ClientTrust::dev_ca(&ca)).await, "expired");

    let wrong_name = ca.issue(&["elsewhere.example".to_string()]).expect("cert");
    let wrong_name = CertResolver::from_cert(&wrong_name).expect("resolver");
    assert_cert_rejected(dial_with(t, wrong_name.clone(), ClientTrust::dev_ca(&ca)).await, "wrong name");

    // Only the explicitly named insecure mode accepts it.
    dial_with(t, wrong_name, ClientTrust::InsecureAcceptAnyForDevelopment)
        .await
        .expect("insecure development mode accepts any certificate");
}

#[tokio::test]
async fn wss_rejects_bad_certificates() {
    rejects_bad_certificates(T::Wss).await;
}

#[tokio::test]
async fn quic_rejects_bad_certificates() {
    rejects_bad_certificates(T::Quic).await;
}

async fn swap_keeps_links(t: T) {
    gearmesh_transport::tls::install_crypto_provider();
    let ca1 = DevCa::generate().expect("ca1");
    let ca2 = DevCa::generate().expect("ca2");
    let resolver = CertResolver::from_cert(&ca1.issue(&names()).expect("cert")).expect("resolver");
    let trust1 = ClientTls::new(&ClientTrust::dev_ca(&ca1)).expect("tls1");
    let trust2 = ClientTls::new(&ClientTrust::dev_ca(&ca2)).expect("tls2");
    let (acceptor, mut incoming) = Acceptor::new(setup(2), AcceptConfig::default());
    let (url, _guards): (String, Vec<Box<dyn std::any::Any>>) = match t {
        T::Wss => {
            let (addr, server) = wss_server(&acceptor, resolver.clone()).await;
            (format!("wss://127.0.0.1:{}", addr.port()), vec![Box::new(server)])
        }
        T::Quic => {
            let (ep, server) = quic_server(&acceptor, resolver.clone());
            (
                format!("quic://127.0.0.1:{}", ep.local_addr().expect("addr").port()),
                vec![Box::new(server), Box::new(ep)],
            )
        }
    };
    let dialer = |tls: &ClientTls| Dialer::new(setup(1), tls.clone()).with_quic(quic_client(tls));
    let old = dialer(&trust1).dial(&url).await.expect("first link");
    let mut old_server_side = incoming.accept().await.expect("accepted");

    resolver.swap(ca2.issue(&names()).expect("new cert").certified_key().expect("key"));

    // New links get the new certificate...
    let new = dialer(&trust2).dial(&url).await.expect("new link with the new certificate");
    // A fresh client (no TLS session to resume) that trusts only the old CA now fails.
    let fresh1 = ClientTls::new(&ClientTrust::dev_ca(&ca1)).expect("tls1");
    assert!(dialer(&fresh1).dial(&url).await.is_err(), "the old certificate is no longer served");
    // ...and the old link is still alive.
    let f = Frame::Gossip { payload: Bytes::from_static(b"still here") };
    old.send(&f).await.expect("send on old link");
    let got = tokio::time::timeout(Duration::from_secs(5), old_server_side.recv())
        .await
        .expect("frame on old link")
        .expect("open")
        .expect("ok");
    assert_eq!(got, f);
    assert!(old.close_reason().is_none());
    drop(new);
}

#[tokio::test]
async fn wss_resolver_swap_keeps_open_links() {
    swap_keeps_links(T::Wss).await;
}

#[tokio::test]
async fn quic_resolver_swap_keeps_open_links() {
    swap_keeps_links(T::Quic).await;
}

#[test]
fn dev_ca_is_created_once_and_private() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nested/gearmesh");
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || DevCa::load_or_create(&path).expect("load or create").cert_pem().to_owned())
        })
        .collect();
    let pems: Vec<String> = handles.into_iter().map(|h| h.join().expect("thread")).collect();
    assert!(pems.iter().all(|p| p == &pems[0]), "every node sees the same CA");
    let again = DevCa::load_or_create(&path).expect("reload");
    assert_eq!(again.cert_pem(), pems[0]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode =
            std::fs::metadata(path.join(gearmesh_transport::tls::DEV_CA_FILE)).expect("file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert_eq!(std::fs::read_dir(&path).expect("dir").count(), 1, "no temporary files left");
    // A reloaded CA still issues certificates its earlier self's clients trust.
    let cert = again.issue(&names()).expect("issue");
    assert_eq!(cert.chain.len(), 1);
}

#[tokio::test]
async fn pem_files_load_and_serve() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = DevCa::generate().expect("ca");
    let (cert_pem, key_pem) = ca.issue_pem(&names()).expect("pem");
    let (cert_path, key_path, ca_path) =
        (dir.path().join("c.pem"), dir.path().join("k.pem"), dir.path().join("ca.pem"));
    std::fs::write(&cert_path, cert_pem).expect("write");
    std::fs::write(&key_path, key_pem).expect("write");
    std::fs::write(&ca_path, ca.cert_pem()).expect("write");
    let cert = NodeCert::load_pem(&cert_path, &key_path).expect("load");
    let cas = gearmesh_transport::tls::load_certs(&ca_path).expect("ca");
    let resolver = CertResolver::from_cert(&cert).expect("resolver");
    dial_with(T::Wss, resolver, ClientTrust::Ca(cas)).await.expect("PEM-loaded certificate serves");
    assert!(NodeCert::load_pem(&ca_path, &ca_path).is_err(), "a file without a key is refused");
}

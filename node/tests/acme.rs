//! ACME against a real ACME server: Pebble on loopback, every challenge really validated through
//! pebble-challtestsrv (see `pebble/mod.rs`), nodes running in this process with `tls.mode =
//! "acme"`.
//!
//! Names: every name resolves to 127.0.0.1 in Pebble's DNS; test clients pin the name to the
//! node's address (`reqwest` `resolve`), and the renewal test uses `localhost` so mesh links
//! can dial the node by the certificate's name.

mod common;
mod pebble;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, UNIX_EPOCH},
};

use bytes::Bytes;
use gearmesh::{Node, NodeConfig, RunningNode, TlsMode};
use gearmesh_transport::{
    Dialer, Hello, LinkSetup, NodeId,
    acme::{CertInfo, ChallengeKind},
    quic::QuicEndpoint,
    tls::{ALPN_GEARMESH, ClientTls, ClientTrust},
};
use pebble::{
    Options, Pebble,
    ari::{Answer, AriFront, Asked},
    free_port, loopback,
};
use rustls_pki_types::CertificateDer;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// When a request was answered, and with which certificate serial (or why it failed).
type Observation = (Instant, Result<String, String>);

fn data_dir(test: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("acme-{test}-{:08x}", rand::random::<u32>()))
}

/// A node in `acme` mode against `pebble`, with QUIC on the same port (the restart tests restart
/// it on that port in this process: a node frees its UDP socket when it stops).
fn node_config(pebble: &Pebble, data: &Path, domain: &str, port: u16) -> NodeConfig {
    let mut c = NodeConfig { name: Some(format!("acme-{domain}")), listen: loopback(port), ..NodeConfig::default() };
    c.insecure_dev = true;
    c.tls.mode = TlsMode::Acme;
    c.tls.data_dir = Some(data.to_owned());
    c.tls.acme_domains = vec![domain.to_owned()];
    c.tls.acme_email = Some("ops@gearmesh.test".into());
    c.tls.acme_directory = Some(pebble.directory_url());
    c.tls.acme_ca_root = Some(pebble.api_ca());
    c
}

async fn start(config: NodeConfig) -> RunningNode {
    gearmesh::install_crypto_provider();
    Node::builder().config(config).build().expect("valid config").start().await.expect("node started")
}

/// Starts a node again on the port a stopped node used. The stopped node has freed it (tested
/// on its own in `mesh.rs`), but while it was down another process may briefly hold the same
/// port number, so a bind refused as "in use" is retried for up to 5 s.
async fn restart(config: NodeConfig) -> RunningNode {
    gearmesh::install_crypto_provider();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Node::builder().config(config.clone()).build().expect("valid config").start().await {
            Ok(node) => return node,
            Err(e) if e.to_string().contains("in use") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("node restarted: {e:?}"),
        }
    }
}

fn der_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut pem.as_bytes()).collect::<Result<_, _>>().expect("PEM certificates")
}

/// An HTTPS client that trusts only `root` (Pebble's), reaching `domain` at the node.
fn trusting(root: &str, domain: &str, port: u16, pooled: bool) -> reqwest::Client {
    let tls = ClientTls::new(&ClientTrust::Ca(der_certs(root))).expect("client tls").wss_config();
    let mut tls = rustls::ClientConfig::clone(&tls);
    // A resumed TLS session reports the certificate of the session it resumes: every new
    // connection here does a full handshake, so it sees what the node serves now.
    tls.resumption = rustls::client::Resumption::disabled();
    let mut b = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .tls_info(true)
        .resolve(domain, loopback(port))
        .timeout(Duration::from_secs(10));
    if !pooled {
        b = b.pool_max_idle_per_host(0);
    }
    b.build().expect("client")
}

/// A client that accepts any certificate: reads the status while only the placeholder is served.
fn insecure() -> reqwest::Client {
    let tls = ClientTls::new(&ClientTrust::InsecureAcceptAnyForDevelopment).expect("client tls").wss_config();
    let mut tls = rustls::ClientConfig::clone(&tls);
    tls.resumption = rustls::client::Resumption::disabled();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .tls_info(true)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// The serial of the certificate a request was served with.
fn serial_of(resp: &reqwest::Response) -> String {
    let der = resp
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .expect("TLS info with the peer certificate")
        .to_vec();
    CertInfo::parse(&CertificateDer::from(der)).expect("certificate parses").serial
}

/// GET `https://domain:port/healthz`: the serial served (whatever the HTTP status: the
/// transport-level test serves no `/healthz`), or why the request failed.
async fn served_serial(client: &reqwest::Client, domain: &str, port: u16) -> Result<String, String> {
    let resp = client.get(format!("https://{domain}:{port}/healthz")).send().await.map_err(|e| format!("{e:?}"))?;
    Ok(serial_of(&resp))
}

/// Polls `check` every 200 ms until it returns `Some`, failing with `what` after `limit`.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + limit;
    let mut last = String::from("never checked");
    while Instant::now() < deadline {
        match check().await {
            Ok(v) => return v,
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out after {limit:?} waiting for {what}; last: {last}");
}

/// Waits until the node serves a certificate that `client` (trusting only Pebble's root)
/// accepts; returns its serial.
async fn wait_for_trusted(client: &reqwest::Client, domain: &str, port: u16) -> String {
    wait_for("a certificate that chains to Pebble's root", Duration::from_secs(60), || {
        served_serial(client, domain, port)
    })
    .await
}

/// `/readyz`: status code and body (read through the insecure client).
async fn readyz(port: u16) -> (u16, Value) {
    let resp = insecure().get(format!("https://127.0.0.1:{port}/readyz")).send().await.expect("readyz answers");
    let code = resp.status().as_u16();
    (code, resp.json().await.expect("readyz JSON"))
}

/// One metric's value from `/metrics`.
async fn metric(port: u16, name: &str) -> Option<f64> {
    let text = insecure()
        .get(format!("https://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .expect("metrics answer")
        .text()
        .await
        .expect("metrics text");
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The serial the node serves to any client (also an expired or untrusted certificate).
async fn any_serial(port: u16) -> Result<String, String> {
    let resp =
        insecure().get(format!("https://127.0.0.1:{port}/healthz")).send().await.map_err(|e| format!("{e:?}"))?;
    Ok(serial_of(&resp))
}

/// A fresh QUIC handshake to the node (ALPN gearmesh/1, name `domain`, trusting only `root`):
/// the serial of the certificate it presents.
async fn quic_serial(root: &str, domain: &str, port: u16) -> String {
    let mut roots = rustls::RootCertStore::empty();
    for c in der_certs(root) {
        roots.add(c).expect("root");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN_GEARMESH.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).expect("QUIC TLS");
    let mut endpoint = quinn::Endpoint::client(loopback(0)).expect("QUIC client");
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn =
        tokio::time::timeout(Duration::from_secs(10), endpoint.connect(loopback(port), domain).expect("connect"))
            .await
            .expect("QUIC handshake in time")
            .expect("QUIC handshake verifies against Pebble's root");
    let certs = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .expect("the server's certificates");
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    CertInfo::parse(certs.first().expect("a leaf")).expect("parses").serial
}

/// A mesh link to the node, dialed like a peer node would (name `localhost`, trusting only
/// `root`). Returns a watch that turns true when the link closes.
async fn dial_link(root: &str, url: &str) -> tokio::sync::watch::Receiver<bool> {
    let hello = Hello {
        version: u16::from(gearmesh_transport::frame::PROTOCOL_VERSION),
        node_id: NodeId::random(),
        incarnation: 1,
        token: Bytes::new(),
        listen_addrs: Vec::new(),
        features: 0,
        mesh: gearmesh::DEFAULT_MESH_NAME.into(),
    };
    let client = ClientTls::new(&ClientTrust::Ca(der_certs(root))).expect("client tls");
    let mut dialer = Dialer::new(LinkSetup::new(hello), client.clone());
    if url.starts_with("quic://") {
        dialer = dialer.with_quic(QuicEndpoint::bind(loopback(0), None, Some(&client)).expect("QUIC endpoint"));
    }
    let link = tokio::time::timeout(Duration::from_secs(15), dialer.dial(url))
        .await
        .unwrap_or_else(|_| panic!("{url}: dial timed out"))
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let (tx, mut rx) = link.split();
    let (closed_tx, closed_rx) = tokio::sync::watch::channel(false);
    let url = url.to_owned();
    tokio::spawn(async move {
        // Keep the sender alive as long as the link: dropping every sender closes it.
        let _tx = tx;
        while let Some(item) = rx.recv().await {
            if let Err(e) = item {
                eprintln!("{url}: link closed: {e}");
                break;
            }
        }
        eprintln!("{url}: link closed: {:?}", _tx.close_reason());
        let _ignored = closed_tx.send(true);
    });
    closed_rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn_01_issues_a_certificate_that_chains_to_pebbles_root() {
    if !pebble::available() {
        return;
    }
    let port = free_port();
    let pebble = Pebble::start("alpn", Options { http_port: free_port(), tls_port: port, validity_secs: None }).await;
    let data = data_dir("alpn");
    let domain = "alpn.gearmesh.test";
    let node = start(node_config(&pebble, &data, domain, port)).await;
    let root = pebble.root_pem().await;
    // The client trusts nothing but Pebble's root: a successful handshake is the chain check.
    let serial = wait_for_trusted(&trusting(&root, domain, port, false), domain, port).await;
    assert_eq!(readyz(port).await.0, 200);
    assert_eq!(metric(port, "gearmesh_acme_certificates_issued_total").await, Some(1.0));
    assert_eq!(metric(port, "gearmesh_acme_certificate_valid").await, Some(1.0));
    let left = metric(port, "gearmesh_tls_cert_expiry_seconds").await.expect("expiry metric");
    assert!(left > 86_400.0, "Pebble's default lifetime is years: {left}");
    assert_eq!(pebble.issued(), 1, "one order");
    // The state files are private.
    #[cfg(unix)]
    for entry in walk(&data.join("acme")) {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&entry).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", entry.display());
    }
    let files = walk(&data.join("acme")).len();
    assert_eq!(files, 3, "account, certificate and key");
    node.shutdown().await;
    drop(serial);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("dir").flatten() {
        let p = e.path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_01_is_answered_by_the_plain_http_listener_which_redirects_the_rest() {
    if !pebble::available() {
        return;
    }
    let (port, http_port) = (free_port(), free_port());
    let pebble = Pebble::start("http01", Options { http_port, tls_port: port, validity_secs: None }).await;
    let data = data_dir("http01");
    let domain = "web.gearmesh.test";
    let mut config = node_config(&pebble, &data, domain, port);
    config.tls.acme_challenge = ChallengeKind::Http01;
    config.tls.acme_http_listen = Some(loopback(http_port));
    let node = start(config).await;
    let root = pebble.root_pem().await;
    wait_for_trusted(&trusting(&root, domain, port, false), domain, port).await;
    assert!(
        std::fs::read_to_string(pebble.dir().join("pebble.log")).expect("log").contains("validate w/ HTTP"),
        "Pebble validated an HTTP-01 challenge"
    );
    // The plain listener: unknown tokens are 404, everything else redirects to HTTPS.
    let plain = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client");
    let r =
        plain.get(format!("http://127.0.0.1:{http_port}/.well-known/acme-challenge/nope")).send().await.expect("ok");
    assert_eq!(r.status().as_u16(), 404);
    let r = plain.get(format!("http://{domain}:{http_port}/v1/node?x=1")).send().await;
    let r = match r {
        Ok(r) => r,
        // The name does not resolve outside Pebble's DNS: ask by address with a Host header.
        Err(_) => plain
            .get(format!("http://127.0.0.1:{http_port}/v1/node?x=1"))
            .header("host", format!("{domain}:{http_port}"))
            .send()
            .await
            .expect("plain listener answers"),
    };
    assert_eq!(r.status().as_u16(), 308);
    let location = r.headers().get("location").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    assert_eq!(location, format!("https://{domain}:{port}/v1/node?x=1"));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_swaps_the_certificate_for_new_connections_and_keeps_open_ones() {
    if !pebble::available() {
        return;
    }
    let port = free_port();
    // 15 s certificates: renewal when a third is left, about 10 s after each issue.
    let pebble =
        Pebble::start("renew", Options { http_port: free_port(), tls_port: port, validity_secs: Some(15) }).await;
    let data = data_dir("renew");
    let domain = "renew.gearmesh.test";
    let mut config = node_config(&pebble, &data, domain, port);
    config.mesh.quic = true;
    let node = start(config).await;
    let root = pebble.root_pem().await;
    let fresh = trusting(&root, domain, port, false);
    wait_for_trusted(&fresh, domain, port).await;

    // Opened before the swap: an HTTPS keep-alive connection, in use every 250 ms.
    let pooled = trusting(&root, domain, port, true);
    // The certificate this connection holds (if a renewal slipped in since, the next one is
    // the swap this test watches).
    let first = served_serial(&pooled, domain, port).await.expect("the kept-alive connection works");
    let seen: Arc<Mutex<Vec<Observation>>> = Arc::default();
    let stop = CancellationToken::new();
    let poller = {
        let (seen, stop, pooled) = (seen.clone(), stop.clone(), pooled.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let r = served_serial(&pooled, domain, port).await;
                seen.lock().expect("lock").push((Instant::now(), r));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };

    // The swap, as a new connection sees it.
    let second = wait_for("a renewed certificate on new connections", Duration::from_secs(60), || async {
        match served_serial(&fresh, domain, port).await? {
            s if s != first => Ok(s),
            s => Err(format!("still {s}")),
        }
    })
    .await;
    let swapped_at = Instant::now();
    // New QUIC handshakes get a renewed certificate too (same resolver).
    let quic_new = quic_serial(&root, domain, port).await;
    assert_ne!(quic_new, first, "a new QUIC connection sees the renewed certificate");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    poller.await.expect("poller");

    let seen = std::mem::take(&mut *seen.lock().expect("lock"));
    let after = seen.iter().filter(|(t, _)| *t > swapped_at).count();
    assert!(after > 0, "the kept-alive HTTPS connection was used after the swap");
    for (_, r) in &seen {
        assert_eq!(r.as_ref(), Ok(&first), "the kept-alive HTTPS connection keeps its certificate and works");
    }
    assert!(metric(port, "gearmesh_acme_certificates_issued_total").await.unwrap_or(0.0) >= 2.0);
    drop(second);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_reuses_the_stored_certificate_without_ordering() {
    if !pebble::available() {
        return;
    }
    let port = free_port();
    let pebble =
        Pebble::start("restart", Options { http_port: free_port(), tls_port: port, validity_secs: None }).await;
    let data = data_dir("restart");
    let domain = "again.gearmesh.test";
    let node = start(node_config(&pebble, &data, domain, port)).await;
    let root = pebble.root_pem().await;
    let client = trusting(&root, domain, port, false);
    let serial = wait_for_trusted(&client, domain, port).await;
    node.shutdown().await;

    let node = restart(node_config(&pebble, &data, domain, port)).await;
    // Served at once: no wait, no order.
    assert_eq!(served_serial(&client, domain, port).await, Ok(serial));
    assert_eq!(readyz(port).await.0, 200);
    assert_eq!(metric(port, "gearmesh_acme_certificates_issued_total").await, Some(0.0));
    assert_eq!(pebble.issued(), 1, "Pebble issued one certificate in all");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_pebble_down_the_stored_certificate_is_served_and_renewal_retries() {
    if !pebble::available() {
        return;
    }
    let port = free_port();
    let mut pebble =
        Pebble::start("down-stored", Options { http_port: free_port(), tls_port: port, validity_secs: Some(20) }).await;
    let data = data_dir("down-stored");
    let domain = "outage.gearmesh.test";
    let node = start(node_config(&pebble, &data, domain, port)).await;
    let root = pebble.root_pem().await;
    let first = wait_for_trusted(&trusting(&root, domain, port, false), domain, port).await;
    node.shutdown().await;
    pebble.stop_pebble().await;

    let node = restart(node_config(&pebble, &data, domain, port)).await;
    assert_eq!(any_serial(port).await, Ok(first.clone()), "the stored certificate is served at start");
    assert_eq!(readyz(port).await.0, 200);
    // When renewal falls due, attempts fail and are retried; the old certificate stays.
    wait_for("a failed renewal attempt", Duration::from_secs(60), || async {
        match metric(port, "gearmesh_acme_failures_total").await {
            Some(n) if n >= 1.0 => Ok(()),
            other => Err(format!("failures {other:?}")),
        }
    })
    .await;
    assert_eq!(any_serial(port).await, Ok(first.clone()), "still the stored certificate");

    // Pebble comes back (a new instance: new root, no accounts): the node registers again and
    // gets a certificate from the new root.
    pebble.start_pebble().await;
    let new_root = pebble.root_pem().await;
    let renewed = wait_for_trusted(&trusting(&new_root, domain, port, false), domain, port).await;
    assert_ne!(renewed, first);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_pebble_down_and_no_certificate_the_node_is_degraded_then_recovers() {
    if !pebble::available() {
        return;
    }
    let port = free_port();
    let mut pebble =
        Pebble::start("down-none", Options { http_port: free_port(), tls_port: port, validity_secs: None }).await;
    pebble.stop_pebble().await;
    let data = data_dir("down-none");
    let domain = "late.gearmesh.test";
    let node = start(node_config(&pebble, &data, domain, port)).await;

    // Serving (a placeholder), but not ready, and saying why.
    let (code, body) = readyz(port).await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["status"], "degraded", "{body}");
    assert!(body["reason"].as_str().unwrap_or_default().contains("no ACME certificate"), "{body}");
    assert_eq!(metric(port, "gearmesh_acme_certificate_valid").await, Some(0.0));
    let error = wait_for("a failed first attempt", Duration::from_secs(30), || async {
        let (_, body) = readyz(port).await;
        body["acme"]["last_error"].as_str().map(str::to_owned).ok_or_else(|| format!("{body}"))
    })
    .await;
    assert!(!error.is_empty());

    pebble.start_pebble().await;
    let root = pebble.root_pem().await;
    wait_for_trusted(&trusting(&root, domain, port, false), domain, port).await;
    assert_eq!(readyz(port).await.0, 200);
    node.shutdown().await;
}

/// The links a node holds are the transport's: this runs the transport's own pieces the way the
/// node wires them (one resolver for the HTTPS/WSS listener and the QUIC endpoint, the ACME
/// driver swapping into it) with an acceptor that holds the links itself, so nothing but the
/// transport could close them. (A node's mesh would drop a peer that speaks no membership.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_keeps_wss_and_quic_links_opened_before_the_swap() {
    use gearmesh_transport::{
        AcceptConfig, Acceptor,
        acme::{Acme, AcmeConfig},
        https::{self, ServeOptions},
        tls::{CertResolver, https_server_config},
    };
    if !pebble::available() {
        return;
    }
    gearmesh::install_crypto_provider();
    let port = free_port();
    let pebble =
        Pebble::start("links", Options { http_port: free_port(), tls_port: port, validity_secs: Some(15) }).await;
    // `localhost` resolves on the test machine, so the dialer reaches us by the certificate's name.
    let domain = "localhost";
    let mut config = AcmeConfig::new(vec![domain.to_owned()], data_dir("links").join("acme"));
    config.directory = pebble.directory_url();
    config.ca_root = Some(pebble.api_ca());
    let acme = Acme::new(config).expect("acme");
    let resolver = CertResolver::from_cert(acme.initial_cert()).expect("resolver");
    let hello = Hello {
        version: u16::from(gearmesh_transport::frame::PROTOCOL_VERSION),
        node_id: NodeId::random(),
        incarnation: 1,
        token: Bytes::new(),
        listen_addrs: Vec::new(),
        features: 0,
        mesh: gearmesh::DEFAULT_MESH_NAME.into(),
    };
    let (acceptor, mut incoming) = Acceptor::new(LinkSetup::new(hello), AcceptConfig::default());
    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind(loopback(port)).await.expect("bind");
    let server = https_server_config(resolver.clone()).expect("server config");
    let router = acceptor.router();
    tokio::spawn(https::serve(listener, Some(server), router, ServeOptions::default(), shutdown.clone()));
    let quic = QuicEndpoint::bind(loopback(port), Some(resolver.clone()), None).expect("QUIC endpoint");
    tokio::spawn(quic.clone().serve(acceptor.clone()));
    let mut status = acme.status();
    drop(acme.spawn(resolver, shutdown.clone()));
    // Hold the accepted links.
    let held = tokio::spawn(async move {
        let mut links = Vec::new();
        while let Some(link) = incoming.accept().await {
            links.push(link);
        }
        links.len()
    });

    let root = pebble.root_pem().await;
    wait_for_trusted(&trusting(&root, domain, port, false), domain, port).await;
    let wss = dial_link(&root, &format!("wss://{domain}:{port}")).await;
    let quic_link = dial_link(&root, &format!("quic://{domain}:{port}")).await;
    // Served when both links were up: the swap watched below comes after them.
    let first = status.borrow().serial.clone().expect("a certificate is served");
    // Wait for the swap.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if status.borrow().serial.as_ref().is_some_and(|s| *s != first) {
            break;
        }
        assert!(Instant::now() < deadline, "no renewal within 60 s: {:?}", *status.borrow());
        let _changed = tokio::time::timeout(Duration::from_secs(1), status.changed()).await;
    }
    assert_ne!(quic_serial(&root, domain, port).await, first, "new QUIC connections get the new certificate");
    // Past the links' 2.5 s heartbeat timeout: a link whose connection stopped is closed by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!*wss.borrow(), "the WSS link opened before the swap is still up");
    assert!(!*quic_link.borrow(), "the QUIC link opened before the swap is still up");
    shutdown.cancel();
    quic.close();
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_challenge_is_reported_with_the_problem_document() {
    if !pebble::available() {
        return;
    }
    // HTTP-01, but nothing listens where Pebble validates it.
    let port = free_port();
    let pebble = Pebble::start("fail", Options { http_port: free_port(), tls_port: port, validity_secs: None }).await;
    let data = data_dir("fail");
    let domain = "unreachable.gearmesh.test";
    let mut config = node_config(&pebble, &data, domain, port);
    config.tls.acme_challenge = ChallengeKind::Http01;
    let node = start(config).await;
    let error = wait_for("a failed validation", Duration::from_secs(60), || async {
        let (_, body) = readyz(port).await;
        match body["acme"]["last_error"].as_str() {
            Some(e) if e.contains("validation") => Ok(e.to_owned()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(error.contains(&format!("http-01 validation of {domain} failed")), "{error}");
    assert!(error.contains("urn:ietf:params:acme:error:"), "the problem type is reported: {error}");
    assert_eq!(readyz(port).await.0, 503, "still degraded");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_takes_the_acme_flags() {
    let (code, _out, err) =
        common::run(&["start", "--listen", "127.0.0.1:0", "--insecure-dev", "--tls", "acme"], &[]).await;
    assert_ne!(code, 0);
    assert!(err.contains("--acme-domain"), "{err}");
    if !pebble::available() {
        return;
    }
    let (port, http_port) = (free_port(), free_port());
    let pebble = Pebble::start("cli", Options { http_port, tls_port: port, validity_secs: None }).await;
    let data = data_dir("cli");
    let domain = "cli.gearmesh.test";
    let (listen, http) = (format!("127.0.0.1:{port}"), format!("127.0.0.1:{http_port}"));
    let (directory, ca_root) = (pebble.directory_url(), pebble.api_ca().display().to_string());
    let data_arg = data.display().to_string();
    let args = [
        "start",
        "--listen",
        &listen,
        "--insecure-dev",
        "--no-quic",
        "--data-dir",
        &data_arg,
        "--tls",
        "acme",
        "--acme-domain",
        domain,
        "--acme-email",
        "ops@gearmesh.test",
        "--acme-directory",
        &directory,
        "--acme-ca-root",
        &ca_root,
        "--acme-challenge",
        "http-01",
        "--acme-http-listen",
        &http,
    ];
    let node = common::spawn(&args, &[]).await;
    let root = pebble.root_pem().await;
    wait_for_trusted(&trusting(&root, domain, port, false), domain, port).await;
    assert!(data.join("acme").exists(), "state kept under --data-dir");
    drop(node);
}

// === ACME Renewal Information (RFC 9773), through the ARI front (`pebble/ari.rs`) ===

/// The ACME status the node shows under `acme` in `/v1/node`.
async fn acme_status(port: u16) -> Value {
    let resp = insecure().get(format!("https://127.0.0.1:{port}/v1/node")).send().await.expect("/v1/node answers");
    let body: Value = resp.json().await.expect("/v1/node JSON");
    body["acme"].clone()
}

/// The leaf the node serves to `client`, parsed.
async fn served_leaf(client: &reqwest::Client, domain: &str, port: u16) -> Result<CertInfo, String> {
    let resp = client.get(format!("https://{domain}:{port}/healthz")).send().await.map_err(|e| format!("{e:?}"))?;
    let der = resp.extensions().get::<reqwest::tls::TlsInfo>().and_then(|i| i.peer_certificate()).ok_or("no cert")?;
    CertInfo::parse(&CertificateDer::from(der.to_vec()))
}

fn unix(t: std::time::SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).expect("after 1970").as_secs()
}

/// Waits until the front has seen a renewalInfo request about the certificate with `serial`;
/// checks it named that certificate by its RFC 9773 identifier.
async fn asked_about(front: &AriFront, serial: &str, limit: Duration) -> Asked {
    let asked = wait_for(&format!("a renewalInfo request about {serial}"), limit, || async {
        let all = front.asked();
        all.iter().find(|a| a.served_serial.as_deref() == Some(serial)).cloned().ok_or_else(|| format!("{all:?}"))
    })
    .await;
    assert_eq!(
        asked.expected.as_deref(),
        Ok(asked.cert_id.as_str()),
        "the node asked with the RFC 9773 identifier of the certificate it serves"
    );
    asked
}

/// Waits until the node's status shows, for the certificate `serial`, the window the front
/// answered and a renewal time inside it; returns the renewal time.
async fn planned_in_window(port: u16, serial: &str, (start, end): (u64, u64)) -> u64 {
    wait_for("the ARI window in the node's status", Duration::from_secs(15), || async {
        let acme = acme_status(port).await;
        let renew_at = acme["renew_at_unix"].as_u64().ok_or_else(|| format!("{acme}"))?;
        if acme["serial"] == serial && acme["ari_window_unix"] == serde_json::json!([start, end]) {
            assert!((start..=end).contains(&renew_at), "renewal planned inside the window: {acme}");
            Ok(renew_at)
        } else {
            Err(format!("{acme}"))
        }
    })
    .await
}

/// The earliest time the lifetime rule renews `cert` at (a third of the lifetime left, minus
/// the largest jitter, 1/30).
fn lifetime_rule_earliest(cert: &CertInfo) -> u64 {
    let lifetime = cert.lifetime().as_secs_f64();
    unix(cert.not_after) - (lifetime * (1.0 / 3.0 + 1.0 / 30.0)).ceil() as u64
}

/// What an ARI test runs against: Pebble issuing `validity_secs` certificates, the ARI front in
/// front of it, and a node on `port` whose ACME directory is the front's.
struct AriSetup {
    pebble: Pebble,
    front: AriFront,
    node: RunningNode,
    port: u16,
}

async fn ari_setup(name: &str, domain: &str, validity_secs: u64, answers: Vec<Answer>) -> AriSetup {
    let port = free_port();
    let pebble =
        Pebble::start(name, Options { http_port: free_port(), tls_port: port, validity_secs: Some(validity_secs) })
            .await;
    let front = AriFront::start(&pebble, loopback(port), answers).await;
    let mut config = node_config(&pebble, &data_dir(name), domain, port);
    config.tls.acme_directory = Some(front.directory_url());
    let node = start(config).await;
    AriSetup { pebble, front, node, port }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ari_window_drives_renewal_and_is_asked_again_after_each_issue() {
    if !pebble::available() {
        return;
    }
    // One-hour certificates: the lifetime rule renews after 37 minutes at the earliest.
    let answers = vec![
        // The first certificate: renew within seconds.
        Answer::Window { start: 5, end: 10, retry_after: 3600 },
        // The renewed one: in half an hour, still before the lifetime rule.
        Answer::Window { start: 1800, end: 1900, retry_after: 3600 },
    ];
    let domain = "ari.gearmesh.test";
    let AriSetup { pebble, front, node, port } = ari_setup("ari", domain, 3600, answers).await;
    let root = pebble.root_pem().await;
    let client = trusting(&root, domain, port, false);
    let first = wait_for_trusted(&client, domain, port).await;
    let first_cert = served_leaf(&client, domain, port).await.expect("the first certificate");

    // Right after the issue, the node asked about the certificate it serves, and planned the
    // renewal inside the window the server suggested, long before the lifetime rule.
    let asked = asked_about(&front, &first, Duration::from_secs(15)).await;
    let window = asked.window.expect("a window was answered");
    let renew_at = planned_in_window(port, &first, window).await;
    assert!(renew_at < lifetime_rule_earliest(&first_cert), "ARI, not the lifetime rule, decides");

    // The renewal: a new certificate, issued inside the window (Pebble's notBefore is the
    // issue time), long before the lifetime rule.
    let second = wait_for("the renewal ARI asked for", Duration::from_secs(60), || async {
        match served_serial(&client, domain, port).await? {
            s if s != first => Ok(s),
            s => Err(format!("still {s}")),
        }
    })
    .await;
    let second_cert = served_leaf(&client, domain, port).await.expect("the renewed certificate");
    assert_eq!(second_cert.serial, second);
    let issued = unix(second_cert.not_before);
    assert!(issued >= window.0, "renewed at {issued}, not before the window {window:?}");
    assert!(issued < lifetime_rule_earliest(&first_cert), "renewed by ARI, not by lifetime");

    // The renewed certificate's plan comes from ARI again, asked right after its issue.
    let asked = asked_about(&front, &second, Duration::from_secs(15)).await;
    planned_in_window(port, &second, asked.window.expect("a window was answered")).await;
    assert_eq!(metric(port, "gearmesh_acme_certificates_issued_total").await, Some(2.0));
    assert_eq!(readyz(port).await.0, 200);
    assert_eq!(front.asked().len(), 2, "one question per certificate until Retry-After: {:?}", front.asked());
    // `replaces` (RFC 9773 §5) cannot be seen here: the order goes to Pebble directly. What
    // shows is its effect: Pebble 2.4 ignores the field and does not reflect it, so instant-acme
    // refuses that order and the node orders again without it: two orders for the renewal. (A
    // Pebble with ARI would reflect it; the front refuses to run in front of one.)
    assert_eq!(pebble.orders(), 3, "one order, then two for the renewal");
    assert_eq!(pebble.issued(), 2);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ari_is_asked_again_after_retry_after_and_a_window_now_renews_at_once() {
    if !pebble::available() {
        return;
    }
    let answers = vec![
        // Half an hour away, but ask again after 1 s (clamped to the client's minute).
        Answer::Window { start: 1800, end: 1900, retry_after: 1 },
        // Asked again: the window has moved to now (as for a certificate about to be revoked).
        Answer::Window { start: -120, end: -60, retry_after: 3600 },
        Answer::Window { start: 1800, end: 1900, retry_after: 3600 },
    ];
    let domain = "ari-again.gearmesh.test";
    let AriSetup { pebble, front, node, port } = ari_setup("ari-again", domain, 3600, answers).await;
    let root = pebble.root_pem().await;
    let client = trusting(&root, domain, port, false);
    let first = wait_for_trusted(&client, domain, port).await;
    let asked = asked_about(&front, &first, Duration::from_secs(15)).await;
    planned_in_window(port, &first, asked.window.expect("a window")).await;

    // After Retry-After (1 s, clamped to RFC 9773's suggested minute) the node asks again,
    // learns the window is now, and renews at once.
    let second = wait_for("the renewal after the second question", Duration::from_secs(150), || async {
        match served_serial(&client, domain, port).await? {
            s if s != first => Ok(s),
            s => Err(format!("still {s}")),
        }
    })
    .await;
    let all = front.asked();
    assert!(all.len() >= 2, "{all:?}");
    assert_eq!(all[1].served_serial.as_deref(), Some(first.as_str()), "asked again about the same certificate");
    assert_eq!(all[1].expected.as_deref(), Ok(all[1].cert_id.as_str()));
    let waited = all[1].at.duration_since(all[0].at).expect("in order");
    assert!(
        waited >= gearmesh_transport::acme::ARI_RECHECK_MIN - Duration::from_secs(1),
        "Retry-After: 1 is clamped to a minute, asked again after {waited:?}"
    );
    asked_about(&front, &second, Duration::from_secs(15)).await;
    assert_eq!(readyz(port).await.0, 200);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ari_errors_fall_back_to_the_lifetime_rule_and_the_node_keeps_serving() {
    if !pebble::available() {
        return;
    }
    // 30 s certificates: the lifetime rule renews 19-20 s after each issue.
    let domain = "ari-error.gearmesh.test";
    let answers = vec![Answer::Status(500), Answer::Status(404)];
    let AriSetup { pebble, front, node, port } = ari_setup("ari-error", domain, 30, answers).await;
    let root = pebble.root_pem().await;
    let client = trusting(&root, domain, port, false);
    let first = wait_for_trusted(&client, domain, port).await;
    let first_cert = served_leaf(&client, domain, port).await.expect("the first certificate");
    asked_about(&front, &first, Duration::from_secs(15)).await;

    // A 500 from renewalInfo: the plan is the lifetime rule, and no window is shown.
    let (earliest, latest) = (lifetime_rule_earliest(&first_cert), unix(first_cert.not_after) - 10);
    wait_for("a renewal planned by the lifetime rule", Duration::from_secs(15), || async {
        let acme = acme_status(port).await;
        match acme["renew_at_unix"].as_u64() {
            Some(at) if acme["serial"] == first && (earliest..=latest).contains(&at) => {
                assert!(acme["ari_window_unix"].is_null(), "{acme}");
                Ok(())
            }
            _ => Err(format!("{acme}, want renew_at_unix in {earliest}..={latest}")),
        }
    })
    .await;
    assert_eq!(readyz(port).await.0, 200);

    // The lifetime rule renews it; the node keeps serving and asks about the new certificate
    // (a 404 this time).
    let second = wait_for("the renewal by lifetime", Duration::from_secs(60), || async {
        match served_serial(&client, domain, port).await? {
            s if s != first => Ok(s),
            s => Err(format!("still {s}")),
        }
    })
    .await;
    let second_cert = served_leaf(&client, domain, port).await.expect("the renewed certificate");
    assert!(unix(second_cert.not_before) >= earliest, "not renewed before the lifetime rule");
    asked_about(&front, &second, Duration::from_secs(15)).await;
    assert_eq!(readyz(port).await.0, 200);
    assert_eq!(metric(port, "gearmesh_acme_failures_total").await, Some(0.0), "ARI errors are not renewal failures");
    node.shutdown().await;
}

//! Remote JWKS over a real HTTPS server on 127.0.0.1:0 with a self-made CA: rotation, provider
//! down (last good set kept), and a flood of unknown kids (refresh rate-limited).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use gearmesh_auth::{
    Algorithm, AuthError, Issuer, JwksError, KeySet, RemoteJwks, RemoteJwksConfig, Scopes, SigningKey, TokenRequest,
    Verifier, VerifierConfig, keygen,
};
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_rustls::{TlsAcceptor, rustls};

/// An HTTPS server serving `/jwks` from a swappable document and counting requests.
struct JwksServer {
    addr: SocketAddr,
    ca_pem: String,
    doc: Arc<Mutex<String>>,
    requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl JwksServer {
    async fn start() -> Self {
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "gearmesh test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
        let leaf_params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).expect("leaf params");
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).expect("leaf cert");

        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("tls versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            )
            .expect("server config");
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let doc = Arc::new(Mutex::new(r#"{"keys":[]}"#.to_owned()));
        let requests = Arc::new(AtomicUsize::new(0));
        let (doc2, requests2) = (Arc::clone(&doc), Arc::clone(&requests));
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else { break };
                let acceptor = acceptor.clone();
                let (doc, requests) = (Arc::clone(&doc2), Arc::clone(&requests2));
                conns.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (doc, requests) = (Arc::clone(&doc), Arc::clone(&requests));
                        async move {
                            requests.fetch_add(1, Ordering::SeqCst);
                            let resp = if req.uri().path() == "/jwks" {
                                let body = doc.lock().expect("doc lock").clone();
                                Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body)))
                            } else {
                                Response::builder().status(404).body(Full::new(Bytes::new()))
                            };
                            Ok::<_, Infallible>(resp.expect("response"))
                        }
                    });
                    let _closed =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc).await;
                });
            }
        });
        JwksServer { addr, ca_pem: ca_cert.pem(), doc, requests, task }
    }

    fn url(&self) -> String {
        format!("https://{}/jwks", self.addr)
    }

    fn publish(&self, keys: &[&SigningKey]) {
        let set: KeySet = keys.iter().map(|k| k.verify_key().clone()).collect();
        *self.doc.lock().expect("doc lock") = set.public_jwks().to_string();
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Stops accepting and drops every open connection: the provider is down.
    async fn shut_down(self) {
        self.task.abort();
        let _aborted = self.task.await;
    }
}

fn config(server: &JwksServer, min_refresh: Duration) -> RemoteJwksConfig {
    RemoteJwksConfig {
        min_refresh_interval: min_refresh,
        fetch_timeout: Duration::from_secs(5),
        webpki_roots: false,
        extra_roots_pem: Some(server.ca_pem.clone().into_bytes()),
        ..RemoteJwksConfig::default()
    }
}

fn token(key: &SigningKey) -> String {
    let req = TokenRequest::new("alice", Scopes::parse("observe"), Duration::from_secs(600));
    Issuer::new(key.clone()).issue(&req).expect("issue")
}

#[tokio::test]
async fn rotation_picks_up_new_kids_and_drops_removed_ones() {
    let server = JwksServer::start().await;
    let k1 = keygen(Algorithm::ES256).expect("k1").key;
    // A long kid with odd characters: errors show it sanitized and truncated, but lookups and
    // refreshes must use it exactly.
    let long_kid = gearmesh_auth::KeyId::new(format!("{}\"é/{}", "k".repeat(80), "x"));
    let k2 = keygen(Algorithm::EdDSA).expect("k2").key.with_kid(long_kid);
    server.publish(&[&k1]);

    let remote = RemoteJwks::new(&server.url(), config(&server, Duration::ZERO)).expect("remote");
    assert_eq!(remote.refresh().await, Ok(1));
    let verifier = Verifier::with_remotes(KeySet::new(), vec![remote.clone()], VerifierConfig::default());
    verifier.verify(&token(&k1)).expect("k1 known");

    // The provider rotates: k2 added, k1 removed.
    server.publish(&[&k2]);
    // Known-kid verification does no I/O and still uses the cached set.
    let before = server.requests();
    verifier.verify(&token(&k1)).expect("k1 still cached");
    assert_eq!(server.requests(), before);
    // The unknown kid k2 triggers a refresh and is accepted.
    assert!(matches!(verifier.verify(&token(&k2)), Err(AuthError::UnknownKey { .. })));
    verifier.verify_with_refresh(&token(&k2)).await.expect("k2 picked up");
    assert_eq!(server.requests(), before + 1);
    // k1 is gone from the new set.
    assert!(matches!(verifier.verify_with_refresh(&token(&k1)).await, Err(AuthError::UnknownKey { .. })));
    assert!(remote.keys().get(k1.kid().as_str()).is_none());
    server.shut_down().await;
}

#[tokio::test]
async fn provider_down_keeps_the_last_good_set() {
    let server = JwksServer::start().await;
    let k1 = keygen(Algorithm::ES256).expect("k1").key;
    server.publish(&[&k1]);
    let url = server.url();
    let remote = RemoteJwks::new(&url, config(&server, Duration::ZERO)).expect("remote");
    remote.refresh().await.expect("first fetch");
    let verifier = Verifier::with_remotes(KeySet::new(), vec![remote.clone()], VerifierConfig::default());

    // A bad document does not replace the set either.
    *server.doc.lock().expect("doc") = "not json".to_owned();
    assert!(matches!(remote.refresh().await, Err(JwksError::Document(_))));
    *server.doc.lock().expect("doc") = r#"{"keys":[]}"#.to_owned();
    assert_eq!(remote.refresh().await, Err(JwksError::NoUsableKeys));
    verifier.verify(&token(&k1)).expect("still valid after bad documents");

    server.shut_down().await;
    let err = remote.refresh().await.expect_err("provider is down");
    assert!(matches!(err, JwksError::Fetch { .. }), "{err}");
    verifier.verify(&token(&k1)).expect("last good set kept");
    // An unknown kid while down: refused, and the cache survives the failed refresh.
    let k2 = keygen(Algorithm::ES256).expect("k2").key;
    assert!(matches!(verifier.verify_with_refresh(&token(&k2)).await, Err(AuthError::UnknownKey { .. })));
    verifier.verify(&token(&k1)).expect("last good set kept");
    let stats = remote.stats();
    assert_eq!(stats.fetches, 5);
    assert_eq!(stats.failures, 4);
}

#[tokio::test]
async fn a_flood_of_unknown_kids_is_rate_limited() {
    let server = JwksServer::start().await;
    let k1 = keygen(Algorithm::EdDSA).expect("k1").key;
    server.publish(&[&k1]);
    // An hour between unknown-kid refreshes: nothing in this test can pass it.
    let remote = RemoteJwks::new(&server.url(), config(&server, Duration::from_secs(3600))).expect("remote");
    remote.refresh().await.expect("first fetch");
    assert_eq!(server.requests(), 1);
    let verifier = Verifier::with_remotes(KeySet::new(), vec![remote.clone()], VerifierConfig::default());

    // 200 tokens with made-up kids, concurrently and then sequentially.
    let forged: Vec<String> =
        (0..200).map(|i| token(&k1.clone().with_kid(gearmesh_auth::KeyId::new(format!("bogus-{i}"))))).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for t in &forged[..100] {
        let (v, t) = (verifier.clone(), t.clone());
        tasks.spawn(async move { v.verify_with_refresh(&t).await });
    }
    while let Some(res) = tasks.join_next().await {
        assert!(matches!(res.expect("task"), Err(AuthError::UnknownKey { .. })));
    }
    for t in forged.iter().skip(100) {
        assert!(matches!(verifier.verify_with_refresh(t).await, Err(AuthError::UnknownKey { .. })));
    }
    // The initial fetch plus exactly one refresh for the whole flood.
    assert_eq!(server.requests(), 2);
    // At least the 100 sequential ones hit the limit (concurrent waiters may instead see the
    // one refresh that happened while they waited, and re-check against the new set).
    assert!(remote.stats().rate_limited >= 100, "{:?}", remote.stats());
    // The real key is still accepted without any fetch.
    verifier.verify_with_refresh(&token(&k1)).await.expect("valid");
    assert_eq!(server.requests(), 2);
    server.shut_down().await;
}

#[tokio::test]
async fn untrusted_server_certificates_are_refused() {
    let server = JwksServer::start().await;
    let k1 = keygen(Algorithm::EdDSA).expect("k1").key;
    server.publish(&[&k1]);
    // Only the public web roots: our self-made CA is not trusted.
    let remote = RemoteJwks::new(&server.url(), RemoteJwksConfig::default()).expect("remote");
    assert!(matches!(remote.refresh().await, Err(JwksError::Fetch { .. })));
    assert!(remote.keys().is_empty());
    assert_eq!(server.requests(), 0);
    server.shut_down().await;
}

#[tokio::test]
async fn run_refreshes_until_shutdown() {
    let server = JwksServer::start().await;
    let k1 = keygen(Algorithm::ES256).expect("k1").key;
    server.publish(&[&k1]);
    let remote = RemoteJwks::new(&server.url(), config(&server, Duration::ZERO)).expect("remote");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let runner = {
        let remote = remote.clone();
        tokio::spawn(async move {
            remote
                .run(async {
                    let _stopped = stop_rx.await;
                })
                .await;
        })
    };
    // Wait (bounded) for the first fetch made by the runner.
    for _ in 0..500 {
        if !remote.keys().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(remote.keys().get(k1.kid().as_str()).is_some());
    stop_tx.send(()).expect("runner alive");
    runner.await.expect("runner stops");
    server.shut_down().await;
}

//! `ws://` (no TLS) works only when explicitly allowed, against a plain axum server.

mod common;

use std::net::SocketAddr;

use common::net::{AbortOnDrop, pki};
use common::setup;
use gearmesh_transport::{AcceptConfig, Acceptor, DialError, Dialer, TransportKind};

#[tokio::test]
async fn plaintext_needs_the_development_flag() {
    let pki = pki();
    let (acceptor, mut incoming) = Acceptor::new(setup(2), AcceptConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app: axum::Router = acceptor.router();
    let _server = AbortOnDrop(tokio::spawn(async move {
        let _stopped = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await;
    }));
    let url = format!("ws://127.0.0.1:{}", addr.port());
    let strict = Dialer::new(setup(1), pki.client.clone());
    assert!(matches!(strict.dial(&url).await, Err(DialError::NotAllowed(_))));
    let dev = strict.allow_plaintext_for_development();
    let a = dev.dial(&url).await.expect("plaintext link");
    let b = incoming.accept().await.expect("accepted");
    assert_eq!(a.peer().transport, TransportKind::Ws);
    assert!(b.peer().remote_addr.is_some(), "ConnectInfo reaches the link");
}

//! Hostile QUIC peers: a hand-driven quinn client sends garbage on a frame stream, opens a stream
//! of unknown type, or opens a second control stream; only its link closes, with a protocol
//! error.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::net::{pki, quic_client, quic_server};
use common::setup;
use gearmesh_transport::{AcceptConfig, Acceptor, CloseCode, Dialer, Frame, Hello, LinkError, tls::DevCa};

async fn raw_quic(ca: &DevCa, addr: std::net::SocketAddr) -> quinn::Connection {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der()).expect("root");
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"gearmesh/1".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(cfg)).expect("quic tls");
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    ep.connect(addr, "localhost").expect("connect").await.expect("handshake")
}

fn encoded(f: &Frame) -> Bytes {
    let mut buf = bytes::BytesMut::new();
    f.encode(&mut buf, 1 << 20).expect("encode");
    buf.freeze()
}

async fn expect_protocol_error(stream_type: u8, payload: &'static [u8]) {
    let pki = pki();
    let (acceptor, mut incoming) = Acceptor::new(setup(2), AcceptConfig::default());
    let (ep, _server) = quic_server(&acceptor, pki.resolver.clone());
    let addr = ep.local_addr().expect("addr");
    // A well-behaved link on the same endpoint.
    let good = Dialer::new(setup(1), pki.client.clone())
        .with_quic(quic_client(&pki.client))
        .dial(&format!("quic://127.0.0.1:{}", addr.port()))
        .await
        .expect("good link");
    let mut good_server_side = incoming.accept().await.expect("accepted");

    let conn = raw_quic(&pki.ca, addr).await;
    let mut control = conn.open_uni().await.expect("control");
    control.write_all(&[0]).await.expect("type");
    let hello = Frame::Hello(Hello { version: 1, ..common::hello(9) });
    control.write_all(&encoded(&hello)).await.expect("hello");
    let mut evil =
        tokio::time::timeout(Duration::from_secs(5), incoming.accept()).await.expect("hello accepted").expect("link");
    let mut s = conn.open_uni().await.expect("stream");
    s.write_all(&[stream_type]).await.expect("type");
    s.write_all(payload).await.expect("payload");
    s.finish().expect("finish");
    match tokio::time::timeout(Duration::from_secs(5), evil.recv()).await.expect("closes") {
        Some(Err(LinkError::Closed(r))) => assert_eq!(r.code, CloseCode::PROTOCOL_ERROR, "{r}"),
        other => panic!("expected a protocol error, got {other:?}"),
    }
    let f = Frame::Gossip { payload: Bytes::from_static(b"fine") };
    good.send(&f).await.expect("send");
    let got = tokio::time::timeout(Duration::from_secs(5), good_server_side.recv())
        .await
        .expect("recv")
        .expect("open")
        .expect("frame");
    assert_eq!(got, f);
}

#[tokio::test]
async fn garbage_frame_stream_closes_only_that_link() {
    expect_protocol_error(1, b"\x01\xee\x03\x00\x00\x00abc").await;
}

#[tokio::test]
async fn unknown_stream_type_closes_only_that_link() {
    expect_protocol_error(7, b"whatever").await;
}

#[tokio::test]
async fn a_second_control_stream_closes_only_that_link() {
    expect_protocol_error(0, b"").await;
}

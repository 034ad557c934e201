//! Hostile QUIC peers: a hand-driven quinn client sends garbage on a frame stream or a batch
//! stream, opens a stream of unknown type, or opens a second control stream; only its link
//! closes, with a protocol error. The same client, well-behaved, shows what batch streams carry
//! each way.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::net::{pki, quic_client, quic_server};
use common::setup;
use gearmesh_transport::frame::FEATURE_QUIC_BATCHES;
use gearmesh_transport::{AcceptConfig, Acceptor, CloseCode, Dialer, Frame, Hello, Link, LinkError, tls::DevCa};

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

/// Opens the raw client's control stream and says hello as node 9 with `features`; the stream
/// is returned to be kept open.
async fn say_hello(conn: &quinn::Connection, features: u32) -> quinn::SendStream {
    let mut control = conn.open_uni().await.expect("control");
    control.write_all(&[0]).await.expect("type");
    let hello = Frame::Hello(Hello { version: 1, features, ..common::hello(9) });
    control.write_all(&encoded(&hello)).await.expect("hello");
    control
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
    let _control = say_hello(&conn, 0).await;
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

#[tokio::test]
async fn garbage_in_a_batch_stream_closes_only_that_link() {
    expect_protocol_error(2, b"\x01\xee\x03\x00\x00\x00abc").await;
}

#[tokio::test]
async fn a_truncated_batch_stream_closes_only_that_link() {
    // A gossip frame's header announcing 9 bytes, with 3.
    expect_protocol_error(2, b"\x01\x07\x09\x00\x00\x00abc").await;
}

#[tokio::test]
async fn an_empty_batch_stream_closes_only_that_link() {
    expect_protocol_error(2, b"").await;
}

fn call(id: u64) -> Frame {
    common::call(id, Bytes::from_static(b"0123456789abcdef"))
}

/// A raw quinn client that said hello with `features`, and the acceptor's link to it.
/// The link keeps the default heartbeat timeout: the raw client never answers a ping.
async fn raw_peer(features: u32) -> (quinn::Connection, Link, Vec<Box<dyn std::any::Any>>) {
    let pki = pki();
    let setup = gearmesh_transport::LinkSetup::new(common::hello(2));
    let (acceptor, mut incoming) = Acceptor::new(setup, AcceptConfig::default());
    let (ep, server) = quic_server(&acceptor, pki.resolver.clone());
    let conn = raw_quic(&pki.ca, ep.local_addr().expect("addr")).await;
    let control = say_hello(&conn, features).await;
    let link =
        tokio::time::timeout(Duration::from_secs(5), incoming.accept()).await.expect("hello accepted").expect("link");
    (conn, link, vec![Box::new(server), Box::new(ep), Box::new(control), Box::new(acceptor)])
}

#[tokio::test]
async fn a_batch_stream_delivers_its_frames_in_order() {
    let (conn, mut link, _keep) = raw_peer(FEATURE_QUIC_BATCHES).await;
    let mut s = conn.open_uni().await.expect("stream");
    let mut bytes = vec![2u8];
    for id in 0..3 {
        bytes.extend_from_slice(&encoded(&call(id)));
    }
    s.write_all(&bytes).await.expect("batch");
    s.finish().expect("finish");
    for id in 0..3 {
        match tokio::time::timeout(Duration::from_secs(5), link.recv()).await.expect("frame") {
            Some(Ok(Frame::Call(c))) => assert_eq!(c.call_id, id),
            other => panic!("expected call {id}, got {other:?}"),
        }
    }
}

/// Counts the frames the peer receives on frame streams and on batch streams, until `want`.
async fn receive_streams(conn: &quinn::Connection, link: &Link, want: usize) -> (usize, usize, Vec<u64>) {
    let (mut singles, mut batched, mut ids) = (0, 0, Vec::new());
    // Kept: dropping the link's control stream would stop it, and the link would close.
    let mut control = Vec::new();
    while ids.len() < want {
        let mut s = tokio::time::timeout(Duration::from_secs(5), conn.accept_uni())
            .await
            .expect("a stream for every frame sent")
            .unwrap_or_else(|e| panic!("{e}: the link closed: {:?}", link.sender().close_reason()));
        let mut kind = [0u8; 1];
        s.read_exact(&mut kind).await.expect("type byte");
        if kind[0] == 0 {
            control.push(s); // the link's control stream: its hello
            continue;
        }
        let mut rest = Bytes::from(s.read_to_end(1 << 20).await.expect("stream"));
        while !rest.is_empty() {
            let len = 6 + u32::from_le_bytes(rest[2..6].try_into().expect("length")) as usize;
            match gearmesh_transport::frame::decode(&rest.split_to(len), 1 << 20).expect("frame") {
                Frame::Call(c) => ids.push(c.call_id),
                other => panic!("not a call: {other:?}"),
            }
            if kind[0] == 2 {
                batched += 1;
            } else {
                singles += 1;
            }
        }
    }
    (singles, batched, ids)
}

#[tokio::test]
async fn queued_small_frames_share_batch_streams_with_a_peer_that_reads_them() {
    let (conn, link, _keep) = raw_peer(FEATURE_QUIC_BATCHES).await;
    // Queued without waiting, so the link's writer finds them together.
    for id in 0..200 {
        link.try_send(&call(id)).expect("queued");
    }
    let (singles, batched, mut ids) = receive_streams(&conn, &link, 200).await;
    ids.sort_unstable();
    assert_eq!(ids, (0..200).collect::<Vec<_>>(), "every frame once");
    assert!(batched > 0, "{singles} frames on streams of their own, none batched");
}

#[tokio::test]
async fn a_peer_that_does_not_read_batches_gets_a_stream_per_frame() {
    let (conn, link, _keep) = raw_peer(0).await;
    for id in 0..200 {
        link.try_send(&call(id)).expect("queued");
    }
    let (singles, batched, mut ids) = receive_streams(&conn, &link, 200).await;
    ids.sort_unstable();
    assert_eq!(ids, (0..200).collect::<Vec<_>>(), "every frame once");
    assert_eq!((singles, batched), (200, 0));
}

//! On QUIC a large frame does not delay small frames sent after it, and a path that carries large
//! datagrams (loopback) gets them.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::net::{pki, quic_client, quic_server};
use common::{Transport, connect, proxy, setup};
use gearmesh_transport::quic::MAX_UDP_PAYLOAD;
use gearmesh_transport::{AcceptConfig, Acceptor, BodyKind, Call, Dialer, Frame, Route};

fn call(id: u64, len: usize) -> Frame {
    Frame::Call(Call {
        route: Route::default(),
        call_id: id,
        deadline_ms: 1000,
        trace_id: 0,
        caller: "user:a".into(),
        scopes: vec![],
        gear: "g".into(),
        port: "p".into(),
        body_kind: BodyKind::Bytes,
        body: Bytes::from(vec![0u8; len]),
    })
}

#[tokio::test]
async fn large_frame_does_not_delay_small_ones() {
    let (a, mut b, _f) = connect(Transport::Quic, setup(1), setup(2)).await.expect("connect");
    a.send(&call(0, 12 * 1024 * 1024)).await.expect("large");
    for i in 1..=20 {
        a.send(&call(i, 64)).await.expect("small");
    }
    let mut order = Vec::new();
    while order.len() < 21 {
        match tokio::time::timeout(std::time::Duration::from_secs(20), b.recv()).await {
            Ok(Some(Ok(Frame::Call(c)))) => order.push(c.call_id),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(order.last(), Some(&0), "the large frame arrives after all the small ones: {order:?}");
}

/// Links start with 1,200-byte datagrams and probe for larger ones. Loopback carries 65 KB, so
/// after a moment a 4 KiB frame travels in one datagram; seen from a UDP proxy between the ends.
#[tokio::test]
async fn on_loopback_a_4_kib_frame_comes_to_travel_in_one_datagram() {
    let pki = pki();
    let (acceptor, mut incoming) = Acceptor::new(setup(2), AcceptConfig::default());
    let (ep, _server) = quic_server(&acceptor, pki.resolver.clone());
    let proxy = proxy::udp(ep.local_addr().expect("addr")).await;
    let a = Dialer::new(setup(1), pki.client.clone())
        .with_quic(quic_client(&pki.client))
        .dial(&format!("quic://127.0.0.1:{}", proxy.addr.port()))
        .await
        .expect("dial through the proxy");
    let mut b = incoming.accept().await.expect("accepted");
    let frame_len = 4096;
    let mut sent = 0u64;
    // Bounded so that a path MTU that never grows fails the test instead of hanging it.
    while proxy.largest_datagram() <= frame_len && sent < 5_000 {
        a.send(&call(sent, frame_len)).await.expect("send");
        match tokio::time::timeout(Duration::from_secs(10), b.recv()).await {
            Ok(Some(Ok(Frame::Call(c)))) => assert_eq!(c.body.len(), frame_len),
            other => panic!("frame {sent} did not arrive: {other:?}"),
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let largest = proxy.largest_datagram();
    assert!(largest > frame_len, "after {sent} frames the largest datagram was {largest} bytes");
    assert!(largest <= usize::from(MAX_UDP_PAYLOAD), "a datagram of {largest} bytes");
    // Frames of every size still arrive at the larger datagram size, one much larger than it too.
    for (i, len) in [64, 4096, 60_000, 300_000].into_iter().enumerate() {
        a.send(&call(sent + i as u64, len)).await.expect("send");
        match tokio::time::timeout(Duration::from_secs(10), b.recv()).await {
            Ok(Some(Ok(Frame::Call(c)))) => assert_eq!(c.body.len(), len),
            other => panic!("a {len}-byte frame did not arrive: {other:?}"),
        }
    }
}

//! Heartbeats detect a frozen peer: a proxy between the nodes starts blackholing (forwarding
//! nothing, closing nothing) and both ends close the link with a heartbeat timeout.

mod common;

use std::time::Duration;

use common::net::{QuicViaProxy, pki, wss_server};
use common::{proxy, setup};
use gearmesh_transport::{AcceptConfig, Acceptor, CloseCode, Dialer, Link};

async fn assert_detects_frozen(a: Link, b: Link, proxy: proxy::Proxy) {
    // Healthy first: heartbeats flow, an RTT appears.
    tokio::time::timeout(Duration::from_secs(5), async {
        while a.rtt().is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("rtt");
    proxy.blackhole();
    for link in [&a, &b] {
        let r =
            tokio::time::timeout(Duration::from_secs(10), link.closed()).await.expect("the frozen peer is detected");
        assert_eq!(r.code, CloseCode::HEARTBEAT_TIMEOUT, "{r}");
    }
}

#[tokio::test]
async fn wss_frozen_peer_is_detected() {
    let pki = pki();
    let (acceptor, mut incoming) = Acceptor::new(setup(2), AcceptConfig::default());
    let (addr, _server) = wss_server(&acceptor, pki.resolver.clone()).await;
    let proxy = proxy::tcp(addr).await;
    let a = Dialer::new(setup(1), pki.client.clone())
        .dial(&format!("wss://127.0.0.1:{}", proxy.addr.port()))
        .await
        .expect("dial through proxy");
    let b = incoming.accept().await.expect("accepted");
    assert_detects_frozen(a, b, proxy).await;
}

#[tokio::test]
async fn quic_frozen_peer_is_detected() {
    let mut via = QuicViaProxy::new(setup(1), setup(2), None).await;
    let (a, b) = via.connect().await;
    assert_detects_frozen(a, b, via.proxy).await;
}

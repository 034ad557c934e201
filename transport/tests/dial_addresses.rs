//! A peer URL whose host names several addresses is dialed at each in turn until one answers
//! (a seed such as `wss://localhost:PORT`, or a Kubernetes headless service), and one of them
//! that turns out to be the dialing node itself is passed over.

mod common;

use std::net::{Ipv4Addr, SocketAddr};

use common::net::{pki, quic_client, quic_server, wss_server};
use gearmesh_transport::{AcceptConfig, Acceptor, Dialer, PeerUrl, resolve_all};

/// An address on loopback where nothing listens (a port that was just free).
fn closed_tcp_port() -> SocketAddr {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    l.local_addr().expect("addr")
}

#[tokio::test]
async fn names_resolve_to_every_address_and_ips_to_themselves() {
    let ip: PeerUrl = "wss://127.0.0.1:7000".parse().expect("url");
    assert_eq!(resolve_all(&ip).await.expect("ip"), vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 7000))]);
    let v6: PeerUrl = "quic://[::1]:7000".parse().expect("url");
    assert_eq!(resolve_all(&v6).await.expect("ip").len(), 1);
    let name: PeerUrl = "wss://localhost:7000".parse().expect("url");
    let addrs = resolve_all(&name).await.expect("localhost resolves");
    assert!(addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 7000), "{addrs:?}");
    let mut unique = addrs.clone();
    unique.dedup();
    assert_eq!(unique.len(), addrs.len(), "no repeats: {addrs:?}");
}

#[tokio::test]
async fn wss_tries_each_address_in_turn_until_one_answers() {
    let pki = pki();
    let (acceptor, mut incoming) = Acceptor::new(common::setup(2), AcceptConfig::default());
    let (live, _server) = wss_server(&acceptor, pki.resolver.clone()).await;
    let dialer = Dialer::new(common::setup(1), pki.client.clone());
    let url: PeerUrl = format!("wss://localhost:{}", live.port()).parse().expect("url");

    // The first address refuses the connection; the second is the node.
    let link = dialer.dial_addrs(&url, &[closed_tcp_port(), live]).await.expect("second address answers");
    assert_eq!(link.peer().node_id, common::hello(2).node_id);
    assert!(incoming.accept().await.is_some());

    // Every address dead: the error names the last one.
    let dead = closed_tcp_port();
    let e = dialer.dial_addrs(&url, &[closed_tcp_port(), dead]).await.expect_err("nobody listens");
    assert!(e.to_string().contains(&dead.to_string()), "{e}");
    assert!(dialer.dial_addrs(&url, &[]).await.is_err());

    // The name itself (whatever it resolves to here) reaches the node.
    let link = dialer.dial_url(&url).await.expect("localhost reaches the node");
    assert_eq!(link.peer().node_id, common::hello(2).node_id);
}

#[tokio::test]
async fn quic_tries_each_address_in_turn_until_one_answers() {
    let pki = pki();
    let (acceptor, mut incoming) = Acceptor::new(common::setup(2), AcceptConfig::default());
    let (server_ep, _server) = quic_server(&acceptor, pki.resolver.clone());
    let live = server_ep.local_addr().expect("addr");
    let client = quic_client(&pki.client);
    let mut setup = common::setup(1);
    // A UDP address where nobody answers times out rather than refusing: keep that short.
    setup.config.handshake_timeout = std::time::Duration::from_millis(500);
    let dialer = Dialer::new(setup, pki.client.clone()).with_quic(client);
    let url: PeerUrl = format!("quic://localhost:{}", live.port()).parse().expect("url");
    let silent = {
        let s = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        s.local_addr().expect("addr")
    };
    let link = dialer.dial_addrs(&url, &[silent, live]).await.expect("second address answers");
    assert_eq!(link.peer().node_id, common::hello(2).node_id);
    assert!(incoming.accept().await.is_some());
}

/// A name that resolves to this node as well as to others (a Kubernetes headless service, which
/// every pod also seeds from): the address that answers with this node's own hello is passed
/// over for the next one, and skipped from then on without a handshake.
#[tokio::test]
async fn an_address_that_is_the_dialing_node_itself_is_passed_over_and_remembered() {
    let pki = pki();
    let (me_acceptor, mut me_incoming) = Acceptor::new(common::setup(1), AcceptConfig::default());
    let (me, me_server) = wss_server(&me_acceptor, pki.resolver.clone()).await;
    let (acceptor, mut incoming) = Acceptor::new(common::setup(2), AcceptConfig::default());
    let (other, _server) = wss_server(&acceptor, pki.resolver.clone()).await;
    let dialer = Dialer::new(common::setup(1), pki.client.clone());
    let url: PeerUrl = format!("wss://localhost:{}", other.port()).parse().expect("url");

    let link = dialer.dial_addrs(&url, &[me, other]).await.expect("the other node answers");
    assert_eq!(link.peer().node_id, common::hello(2).node_id);
    assert!(incoming.accept().await.is_some());
    // The node's own end took no link, and counted no refusal: nothing went wrong.
    let none = tokio::time::timeout(std::time::Duration::from_millis(200), me_incoming.accept()).await;
    assert!(none.is_err(), "a link to itself was delivered");
    assert_eq!(me_acceptor.stats().refused_hello, 0);

    // Remembered: with the node's own server gone, its address is still known to be its own
    // (no connection is tried, so no "connection refused").
    drop(me_server);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while tokio::net::TcpStream::connect(me).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "the node's own server did not close");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let e = dialer.dial_addrs(&url, &[me]).await.expect_err("only itself");
    assert!(e.to_string().contains("this node's own"), "{e}");
    // A clone of the dialer (the mesh clones it) shares what was learnt.
    let e = dialer.clone().dial_addrs(&url, &[me]).await.expect_err("only itself");
    assert!(e.to_string().contains("this node's own"), "{e}");
}

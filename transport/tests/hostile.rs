//! Hostile peers: garbage frames, text messages and silence (slow-loris) are disconnected with a
//! reason while other links keep working; the link limit is enforced.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::net::{Pki, pki, wss_server};
use common::setup;
use futures::{SinkExt, StreamExt};
use gearmesh_transport::{AcceptConfig, Acceptor, CloseCode, DialError, Dialer, Frame, Hello, Incoming, Link};
use rustls_pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::Message;

type RawWs = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A hand-driven WebSocket client: TLS and the upgrade, nothing else.
async fn raw_ws(pki: &Pki, addr: SocketAddr) -> RawWs {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let name = ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(pki.client.wss_config()).connect(name, tcp).await.expect("tls");
    let url = format!("wss://localhost:{}/v1/link", addr.port());
    let (ws, _) = tokio_tungstenite::client_async(url, tls).await.expect("upgrade");
    ws
}

fn encoded(f: &Frame) -> Bytes {
    let mut buf = bytes::BytesMut::new();
    f.encode(&mut buf, 1 << 20).expect("encode");
    buf.freeze()
}

struct Server {
    pki: Pki,
    addr: SocketAddr,
    acceptor: Acceptor,
    incoming: Incoming,
    _server: common::net::AbortOnDrop,
}

async fn server(limits: AcceptConfig) -> Server {
    let pki = pki();
    let mut s = setup(2);
    s.config.handshake_timeout = Duration::from_millis(300);
    let (acceptor, incoming) = Acceptor::new(s, limits);
    let (addr, server) = wss_server(&acceptor, pki.resolver.clone()).await;
    Server { pki, addr, acceptor, incoming, _server: server }
}

async fn good_link(s: &mut Server) -> (Link, Link) {
    let a = Dialer::new(setup(1), s.pki.client.clone())
        .dial(&format!("wss://127.0.0.1:{}", s.addr.port()))
        .await
        .expect("dial");
    let b = s.incoming.accept().await.expect("accept");
    (a, b)
}

async fn still_works(a: &Link, b: &mut Link) {
    let f = Frame::Gossip { payload: Bytes::from_static(b"ok") };
    a.send(&f).await.expect("send");
    let got =
        tokio::time::timeout(Duration::from_secs(5), b.recv()).await.expect("recv").expect("open").expect("frame");
    assert_eq!(got, f);
}

/// Reads until the server ends the WebSocket; returns the frames it sent.
async fn drain(ws: &mut RawWs) -> Vec<Frame> {
    let mut frames = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Binary(b) = m
                && let Ok(f) = gearmesh_transport::frame::decode(&b, 1 << 20)
            {
                frames.push(f);
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the server must end the connection");
    frames
}

#[tokio::test]
async fn garbage_after_hello_closes_only_that_link() {
    let mut s = server(AcceptConfig::default()).await;
    let (a, mut b) = good_link(&mut s).await;

    let mut ws = raw_ws(&s.pki, s.addr).await;
    ws.send(Message::Binary(encoded(&Frame::Hello(Hello { version: 1, ..common::hello(9) })))).await.expect("hello");
    let mut evil = s.incoming.accept().await.expect("hello accepted");
    ws.send(Message::Binary(Bytes::from_static(b"\x01\xee\x07\x00\x00\x00garbage"))).await.expect("garbage");
    let frames = drain(&mut ws).await;
    let close = frames.iter().find_map(|f| match f {
        Frame::Close(c) => Some(c.clone()),
        _ => None,
    });
    assert_eq!(close.map(|c| c.code), Some(CloseCode::PROTOCOL_ERROR));
    match evil.recv().await {
        Some(Err(gearmesh_transport::LinkError::Closed(r))) => {
            assert_eq!(r.code, CloseCode::PROTOCOL_ERROR)
        }
        other => panic!("{other:?}"),
    }
    still_works(&a, &mut b).await;
}

/// Waits (up to 5 s) until `acceptor`'s stats satisfy `f`: the acceptor counts a refusal right
/// after telling the peer.
async fn counted(acceptor: &Acceptor, f: impl Fn(gearmesh_transport::AcceptStats) -> bool) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while !f(acceptor.stats()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("not counted: {:?}", acceptor.stats()));
}

#[tokio::test]
async fn garbage_or_text_instead_of_hello_is_refused() {
    let mut s = server(AcceptConfig::default()).await;
    let (a, mut b) = good_link(&mut s).await;
    let mut ws = raw_ws(&s.pki, s.addr).await;
    ws.send(Message::Binary(Bytes::from_static(&[7, 7, 7]))).await.expect("garbage");
    drain(&mut ws).await;
    let mut ws = raw_ws(&s.pki, s.addr).await;
    ws.send(Message::Text("hello?".into())).await.expect("text");
    drain(&mut ws).await;
    still_works(&a, &mut b).await;
    assert_eq!(s.acceptor.free_slots(), AcceptConfig::default().max_links - 1, "refused peers hold no slot");
    counted(&s.acceptor, |st| st.refused_hello == 2).await;
    assert_eq!((s.acceptor.stats().handshake_timeouts, s.acceptor.stats().over_limit), (0, 0));
}

#[tokio::test]
async fn slow_loris_is_cut_off() {
    let pki = pki();
    let (acceptor, _incoming) = {
        let mut st = setup(2);
        st.config.handshake_timeout = Duration::from_millis(300);
        Acceptor::new(st, AcceptConfig::default())
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let tls = gearmesh_transport::tls::https_server_config(pki.resolver.clone()).expect("tls");
    let opts = gearmesh_transport::https::ServeOptions {
        handshake_timeout: Duration::from_millis(300),
        ..gearmesh_transport::https::ServeOptions::default()
    };
    let _server = common::net::AbortOnDrop(tokio::spawn({
        let router: axum::Router = acceptor.router();
        gearmesh_transport::https::serve(listener, Some(tls), router, opts, tokio_util::sync::CancellationToken::new())
    }));
    // 1. A TCP connection that never starts TLS is closed.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await.expect("server closes").unwrap_or(0);
    assert_eq!(n, 0);
    // 2. A WebSocket that never says hello is told why, closed, and its slot freed.
    let mut ws = raw_ws(&pki, addr).await;
    let frames = drain(&mut ws).await;
    assert!(
        frames.iter().any(|f| matches!(f, Frame::Close(c) if c.code == CloseCode::HANDSHAKE_TIMEOUT)),
        "{frames:?}"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(acceptor.free_slots(), AcceptConfig::default().max_links);
    counted(&acceptor, |st| st.handshake_timeouts == 1).await;
}

#[tokio::test]
async fn link_limit_is_enforced() {
    let mut s = server(AcceptConfig { max_links: 1, backlog: 4 }).await;
    let (a, _b) = good_link(&mut s).await;
    let second = Dialer::new(setup(3), s.pki.client.clone()).dial(&format!("wss://127.0.0.1:{}", s.addr.port())).await;
    assert!(matches!(second, Err(DialError::WebSocket { .. })), "{second:?}");
    assert_eq!(s.acceptor.stats().over_limit, 1);
    a.close(CloseCode::NORMAL, "make room").await;
    tokio::time::timeout(Duration::from_secs(5), async {
        while s.acceptor.free_slots() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("slot freed");
    good_link(&mut s).await;
}

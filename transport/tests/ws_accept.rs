//! The accepting side of WSS links takes the TLS stream back from hyper after the upgrade; bytes
//! hyper had already read past the upgrade request must still reach the link.

mod common;

use std::time::Duration;

use common::net::{pki, wss_server};
use common::setup;
use futures::StreamExt;
use gearmesh_transport::{AcceptConfig, Acceptor, Frame, Hello};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

/// One masked binary WebSocket message, as a client sends it.
fn masked_binary(payload: &[u8]) -> Vec<u8> {
    let key = [0x37, 0xfa, 0x21, 0x3d];
    let mut out = vec![0x82];
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | u8::try_from(n).expect("small")),
        n => {
            out.push(0x80 | 126);
            out.extend_from_slice(&u16::try_from(n).expect("under 64 KiB").to_be_bytes());
        }
    }
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    out
}

/// A client that sends its hello right behind the upgrade request, before the server's 101
/// (pipelined in one write), is served: hyper reads the hello along with the request, and the
/// link gets it from hyper's leftover buffer.
#[tokio::test]
async fn a_hello_pipelined_behind_the_upgrade_request_is_not_lost() {
    let pki = pki();
    let mut s = setup(2);
    s.config.handshake_timeout = Duration::from_secs(5);
    let (acceptor, mut incoming) = Acceptor::new(s, AcceptConfig::default());
    let (addr, _server) = wss_server(&acceptor, pki.resolver.clone()).await;

    let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let name = ServerName::try_from("localhost").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(pki.client.wss_config()).connect(name, tcp).await.expect("tls");
    let request = format!(
        "GET /v1/link HTTP/1.1\r\nHost: localhost:{}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        addr.port()
    );
    let mut hello = bytes::BytesMut::new();
    Frame::Hello(Hello { version: 1, ..common::hello(9) }).encode(&mut hello, 1 << 20).expect("encode");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(&masked_binary(&hello));
    tls.write_all(&bytes).await.expect("request and hello in one write");

    // The 101, then whatever follows it.
    let mut head = Vec::new();
    let end = loop {
        let mut buf = [0u8; 1024];
        let n =
            tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await.expect("response").expect("read");
        assert!(n > 0, "the server closed before answering");
        head.extend_from_slice(&buf[..n]);
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    let rest = head.split_off(end);
    let mut ws = tokio_tungstenite::WebSocketStream::from_partially_read(tls, rest, Role::Client, None).await;

    let link = tokio::time::timeout(Duration::from_secs(5), incoming.accept())
        .await
        .expect("the hello reached the link in time")
        .expect("accepted");
    assert_eq!(link.peer().node_id, common::hello(9).node_id);
    let answer = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("answer").expect("message");
    let Ok(Message::Binary(b)) = answer else { panic!("a binary message: {answer:?}") };
    let frame = gearmesh_transport::frame::decode(&b, 1 << 20).expect("a frame");
    assert!(matches!(frame, Frame::Hello(h) if h.node_id == common::hello(2).node_id), "the server's hello");
}

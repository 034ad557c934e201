//! Shared test fixtures: connecting a pair of links over each transport, and node hellos.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use bytes::Bytes;
use gearmesh_transport::{BodyKind, Call, Frame, Hello, Link, LinkConfig, LinkSetup, NodeId, Route, memory};

/// The transports the conformance suite runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Memory,
    Wss,
    Quic,
}

/// Keeps servers and endpoints alive for as long as the links are used.
pub struct Fixture {
    pub guards: Vec<Box<dyn std::any::Any + Send>>,
}

pub fn hello(tag: u8) -> Hello {
    Hello {
        version: 1,
        node_id: NodeId([tag; 16]),
        incarnation: u64::from(tag),
        token: bytes::Bytes::from_static(b"secret-token"),
        listen_addrs: vec![format!("wss://node{tag}:443")],
        features: 0,
        mesh: "test".into(),
    }
}

/// Fast heartbeats so tests that wait for an RTT or a timeout finish quickly.
pub fn fast_config() -> LinkConfig {
    LinkConfig {
        heartbeat_interval: Duration::from_millis(50),
        idle_timeout: Duration::from_millis(600),
        handshake_timeout: Duration::from_secs(5),
        ..LinkConfig::default()
    }
}

pub fn setup(tag: u8) -> LinkSetup {
    LinkSetup::new(hello(tag)).with_config(fast_config())
}

/// A call frame from node 1 to node 2 with `body`.
pub fn call(id: u64, body: Bytes) -> Frame {
    Frame::Call(Call {
        route: Route { src: NodeId([1; 16]), dst: NodeId([2; 16]), hops: 0 },
        call_id: id,
        deadline_ms: 1000,
        trace_id: u128::from(id) << 64,
        caller: "user:alice".into(),
        scopes: vec!["a".into()],
        gear: "billing".into(),
        port: "charge".into(),
        body_kind: BodyKind::Bytes,
        body,
    })
}

/// Reads `link`'s calls until it ends in an orderly close, and returns their ids in arrival
/// order. Panics on any other frame, on an error, or when nothing comes for `wait`.
pub fn spawn_call_reader(link: Link, wait: Duration) -> tokio::task::JoinHandle<Vec<u64>> {
    let (tx, mut rx) = link.split();
    tokio::spawn(async move {
        let mut ids = Vec::new();
        loop {
            match tokio::time::timeout(wait, rx.recv()).await {
                Ok(Some(Ok(Frame::Call(c)))) => ids.push(c.call_id),
                Ok(Some(Ok(f))) => panic!("not a call: {f:?}"),
                Ok(Some(Err(e))) => panic!("the close is orderly: {e}"),
                Ok(None) => break,
                Err(_) => panic!("the reader waited in vain"),
            }
        }
        drop(tx);
        ids
    })
}

/// Connects `a` (dialing) to `b` (accepting) over `t`.
pub async fn connect(t: Transport, a: LinkSetup, b: LinkSetup) -> Result<(Link, Link, Fixture), String> {
    match t {
        Transport::Memory => {
            let (x, y) = memory::connect(&a, &b).await.map_err(|e| e.to_string())?;
            Ok((x, y, Fixture { guards: Vec::new() }))
        }
        Transport::Wss => crate::common::net::connect_wss(a, b).await,
        Transport::Quic => crate::common::net::connect_quic(a, b).await,
    }
}

pub mod net;
pub mod proxy;

//! Real-socket fixtures: a development CA, a TLS axum server with the link router, QUIC
//! endpoints, all on 127.0.0.1 port 0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gearmesh_transport::quic::QuicEndpoint;
use gearmesh_transport::tls::{CertResolver, ClientTls, ClientTrust, DevCa};
use gearmesh_transport::{AcceptConfig, Acceptor, Dialer, Incoming, Link, LinkSetup, https};

use super::Fixture;
use super::proxy::{self, Proxy};

/// Aborts a task when dropped.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub struct Pki {
    pub ca: DevCa,
    pub resolver: Arc<CertResolver>,
    pub client: ClientTls,
}

pub fn names() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into()]
}

pub fn pki() -> Pki {
    gearmesh_transport::tls::install_crypto_provider();
    let ca = DevCa::generate().expect("CA");
    let cert = ca.issue(&names()).expect("node cert");
    let resolver = CertResolver::from_cert(&cert).expect("resolver");
    let client = ClientTls::new(&ClientTrust::dev_ca(&ca)).expect("client tls");
    Pki { ca, resolver, client }
}

/// Starts an HTTPS server with the acceptor's link router; returns its address.
pub async fn wss_server(acceptor: &Acceptor, resolver: Arc<CertResolver>) -> (SocketAddr, AbortOnDrop) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let tls = gearmesh_transport::tls::https_server_config(resolver).expect("server config");
    let router: axum::Router = acceptor.router();
    let task = tokio::spawn(https::serve(
        listener,
        Some(tls),
        router,
        https::ServeOptions::default(),
        tokio_util::sync::CancellationToken::new(),
    ));
    (addr, AbortOnDrop(task))
}

pub fn quic_server(acceptor: &Acceptor, resolver: Arc<CertResolver>) -> (QuicEndpoint, AbortOnDrop) {
    let ep = QuicEndpoint::bind("127.0.0.1:0".parse().expect("addr"), Some(resolver), None).expect("quic endpoint");
    let task = tokio::spawn(ep.clone().serve(acceptor.clone()));
    (ep, AbortOnDrop(task))
}

pub fn quic_client(client: &ClientTls) -> QuicEndpoint {
    QuicEndpoint::bind("127.0.0.1:0".parse().expect("addr"), None, Some(client)).expect("quic client")
}

async fn accept_one(incoming: &mut Incoming) -> Result<Link, String> {
    tokio::time::timeout(Duration::from_secs(5), incoming.accept())
        .await
        .map_err(|_| "no incoming link".to_string())?
        .ok_or_else(|| "acceptor gone".to_string())
}

pub async fn connect_wss(a: LinkSetup, b: LinkSetup) -> Result<(Link, Link, Fixture), String> {
    let pki = pki();
    let (acceptor, mut incoming) = Acceptor::new(b, AcceptConfig::default());
    let (addr, server) = wss_server(&acceptor, pki.resolver.clone()).await;
    let dialer = Dialer::new(a, pki.client.clone());
    let la = dialer.dial(&format!("wss://127.0.0.1:{}", addr.port())).await.map_err(|e| e.to_string())?;
    let lb = accept_one(&mut incoming).await?;
    Ok((la, lb, Fixture { guards: vec![Box::new(server), Box::new(incoming)] }))
}

pub async fn connect_quic(a: LinkSetup, b: LinkSetup) -> Result<(Link, Link, Fixture), String> {
    let pki = pki();
    let (acceptor, mut incoming) = Acceptor::new(b, AcceptConfig::default());
    let (server_ep, server) = quic_server(&acceptor, pki.resolver.clone());
    let port = server_ep.local_addr().expect("addr").port();
    let client_ep = quic_client(&pki.client);
    let dialer = Dialer::new(a, pki.client.clone()).with_quic(client_ep.clone());
    let la = dialer.dial(&format!("quic://127.0.0.1:{port}")).await.map_err(|e| e.to_string())?;
    let lb = accept_one(&mut incoming).await?;
    Ok((
        la,
        lb,
        Fixture { guards: vec![Box::new(server), Box::new(incoming), Box::new(server_ep), Box::new(client_ep)] },
    ))
}

/// A QUIC server reached through a UDP proxy on loopback, for tests that watch or disturb the
/// datagrams between the ends.
pub struct QuicViaProxy {
    pub proxy: Proxy,
    dialer: Dialer,
    incoming: Incoming,
    _guards: Vec<Box<dyn std::any::Any + Send>>,
}

impl QuicViaProxy {
    /// `a` dials, `b` accepts; the proxy holds each datagram up to `jitter` if given (see
    /// [`proxy::udp_reordering`]).
    pub async fn new(a: LinkSetup, b: LinkSetup, jitter: Option<Duration>) -> Self {
        let pki = pki();
        let (acceptor, incoming) = Acceptor::new(b, AcceptConfig::default());
        let (ep, server) = quic_server(&acceptor, pki.resolver.clone());
        let upstream = ep.local_addr().expect("addr");
        let proxy = match jitter {
            Some(jitter) => proxy::udp_reordering(upstream, jitter).await,
            None => proxy::udp(upstream).await,
        };
        let dialer = Dialer::new(a, pki.client.clone()).with_quic(quic_client(&pki.client));
        QuicViaProxy { proxy, dialer, incoming, _guards: vec![Box::new(server), Box::new(ep), Box::new(acceptor)] }
    }

    /// A new link pair through the proxy: the dialing end, then the accepting end.
    pub async fn connect(&mut self) -> (Link, Link) {
        let a = self
            .dialer
            .dial(&format!("quic://127.0.0.1:{}", self.proxy.addr.port()))
            .await
            .expect("dial through the proxy");
        let b = accept_one(&mut self.incoming).await.expect("accepted");
        (a, b)
    }
}

//! Dialing links: [`PeerUrl`] (`wss://`, `ws://`, `quic://`) and the [`Dialer`] that connects,
//! verifies the server's certificate, runs the hello exchange and starts the link.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::link::driver::lock;
use crate::link::handshake::{self, HandshakeError, LinkSetup, Role};
use crate::link::wire::{WireRx, WireTx};
use crate::link::{Link, PeerInfo, TransportKind, driver};
use crate::quic::QuicEndpoint;
use crate::tls::ClientTls;
use crate::ws;

/// The scheme of a [`PeerUrl`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `wss://`
    Wss,
    /// `ws://` (development only)
    Ws,
    /// `quic://`
    Quic,
}

/// Where to dial a peer: `wss://host:port`, `ws://host:port` or `quic://host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerUrl {
    /// The transport.
    pub scheme: Scheme,
    /// Host name or IP address (without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
}

/// A string that is not a peer URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid peer url {0:?}: expected wss://host:port, ws://host:port or quic://host:port")]
pub struct InvalidPeerUrl(pub String);

impl FromStr for PeerUrl {
    type Err = InvalidPeerUrl;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidPeerUrl(s.to_owned());
        let (scheme, rest) = s.split_once("://").ok_or_else(bad)?;
        let scheme = match scheme {
            "wss" => Scheme::Wss,
            "ws" => Scheme::Ws,
            "quic" => Scheme::Quic,
            _ => return Err(bad()),
        };
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = authority.rsplit_once(':').ok_or_else(bad)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = port.parse().map_err(|_| bad())?;
        if host.is_empty() {
            return Err(bad());
        }
        Ok(PeerUrl { scheme, host: host.to_owned(), port })
    }
}

impl fmt::Display for PeerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.scheme {
            Scheme::Wss => "wss",
            Scheme::Ws => "ws",
            Scheme::Quic => "quic",
        };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// Why dialing failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// The URL did not parse.
    #[error(transparent)]
    InvalidUrl(#[from] InvalidPeerUrl),
    /// The host did not resolve.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        /// The host.
        host: String,
        /// The failure.
        source: std::io::Error,
    },
    /// The TCP connection failed.
    #[error("connect to {addr}: {source}")]
    Connect {
        /// The address dialled.
        addr: SocketAddr,
        /// The failure.
        source: std::io::Error,
    },
    /// The TLS handshake failed (certificate not trusted, expired, wrong name...).
    #[error("TLS with {addr}: {reason}")]
    Tls {
        /// The address dialled.
        addr: SocketAddr,
        /// What went wrong.
        reason: String,
    },
    /// The WebSocket upgrade failed.
    #[error("websocket upgrade at {addr}: {reason}")]
    WebSocket {
        /// The address dialled.
        addr: SocketAddr,
        /// What went wrong.
        reason: String,
    },
    /// The QUIC connection failed (including certificate failures).
    #[error("QUIC to {addr}: {reason}")]
    Quic {
        /// The address dialled.
        addr: SocketAddr,
        /// What went wrong.
        reason: String,
    },
    /// A `quic://` URL but this dialer has no QUIC endpoint.
    #[error("no QUIC endpoint configured")]
    NoQuicEndpoint,
    /// A `ws://` URL but plaintext was not explicitly allowed, or `wss://` without TLS config.
    #[error("{0}")]
    NotAllowed(&'static str),
    /// Connecting and the hello exchange took longer than the handshake timeout.
    #[error("timed out connecting to {0}")]
    Timeout(String),
    /// The hello exchange failed.
    #[error("hello with {url}: {source}")]
    Handshake {
        /// The peer.
        url: String,
        /// The failure.
        source: HandshakeError,
    },
}

/// Dials links to peers with one setup and one TLS trust.
#[derive(Debug, Clone)]
pub struct Dialer {
    setup: LinkSetup,
    tls: Option<ClientTls>,
    quic: Option<QuicEndpoint>,
    allow_plaintext: bool,
    /// Addresses whose hello came from this node itself ([`HandshakeError::ToSelf`]), skipped
    /// from then on: while this node runs, they stay its own. Shared by the dialer's clones.
    own: Arc<Mutex<HashSet<SocketAddr>>>,
}

/// At most this many of the node's own addresses are remembered (a node has few; past the
/// bound, a self-dial costs a hello exchange each time, as before it was learnt).
const MAX_OWN_ADDRS: usize = 64;

impl Dialer {
    /// A dialer that verifies servers with `tls`.
    pub fn new(setup: LinkSetup, tls: ClientTls) -> Self {
        Dialer { setup, tls: Some(tls), quic: None, allow_plaintext: false, own: Arc::default() }
    }

    /// Also allows `ws://` (no TLS). Development on loopback only: logs a warning.
    pub fn allow_plaintext_for_development(mut self) -> Self {
        tracing::warn!("plaintext ws:// links allowed: development only, traffic is not encrypted");
        self.allow_plaintext = true;
        self
    }

    /// Dials `quic://` URLs from this endpoint.
    pub fn with_quic(mut self, endpoint: QuicEndpoint) -> Self {
        self.quic = Some(endpoint);
        self
    }

    /// The setup used for new links.
    pub fn setup(&self) -> &LinkSetup {
        &self.setup
    }

    /// Replaces the setup (e.g. a fresh token in the hello).
    pub fn set_setup(&mut self, setup: LinkSetup) {
        self.setup = setup;
    }

    /// Dials a URL string.
    pub async fn dial(&self, url: &str) -> Result<Link, DialError> {
        self.dial_url(&url.parse()?).await
    }

    /// Dials until it succeeds (or `backoff.max_attempts` failures), sleeping per `backoff`
    /// between attempts.
    pub async fn dial_with_retry(&self, url: &PeerUrl, backoff: &crate::backoff::Backoff) -> Result<Link, DialError> {
        crate::backoff::retry(backoff, rand::random(), |_| self.dial_url(url)).await
    }

    /// Resolves the URL's host and dials its addresses in turn until one of them connects,
    /// verifies, exchanges hellos and starts the link. A name that resolves to several addresses
    /// (`localhost` to `::1` and `127.0.0.1`, a Kubernetes headless service to each pod) is thus
    /// reached through whichever of them answers. Resolving, then each address, get the
    /// handshake timeout.
    ///
    /// # Errors
    /// The resolver's error, or the last address's.
    pub async fn dial_url(&self, url: &PeerUrl) -> Result<Link, DialError> {
        let timeout = self.setup.config.handshake_timeout;
        let addrs = match tokio::time::timeout(timeout, resolve_all(url)).await {
            Ok(r) => r?,
            Err(_) => return Err(DialError::Timeout(url.to_string())),
        };
        self.dial_addrs(url, &addrs).await
    }

    /// Dials `url` at each of `addrs` in turn (each within the handshake timeout) and returns the
    /// first link that starts. The URL's host still names the server for TLS. For callers that
    /// resolve names themselves; [`Dialer::dial_url`] resolves and calls this.
    ///
    /// # Errors
    /// The last address's error (`Resolve` when `addrs` is empty).
    pub async fn dial_addrs(&self, url: &PeerUrl, addrs: &[SocketAddr]) -> Result<Link, DialError> {
        let timeout = self.setup.config.handshake_timeout;
        let mut last = None;
        for &addr in addrs {
            if lock(&self.own).contains(&addr) {
                last = Some(DialError::Handshake { url: format!("{url} at {addr}"), source: HandshakeError::ToSelf });
                continue;
            }
            let error = match tokio::time::timeout(timeout, self.dial_addr(addr, url)).await {
                Ok(Ok(link)) => return Ok(link),
                Ok(Err(e)) => e,
                Err(_) => DialError::Timeout(format!("{url} at {addr}")),
            };
            if matches!(error, DialError::Handshake { source: HandshakeError::ToSelf, .. }) {
                let mut own = lock(&self.own);
                if own.len() < MAX_OWN_ADDRS {
                    own.insert(addr);
                }
            }
            if addrs.len() > 1 {
                tracing::debug!(%url, %addr, %error, "one address of the peer failed; trying the next");
            }
            last = Some(error);
        }
        Err(last.unwrap_or_else(|| no_addresses(url)))
    }

    async fn dial_addr(&self, addr: SocketAddr, url: &PeerUrl) -> Result<Link, DialError> {
        match url.scheme {
            Scheme::Quic => {
                let quic = self.quic.as_ref().ok_or(DialError::NoQuicEndpoint)?;
                quic.dial(addr, url, self).await
            }
            Scheme::Wss | Scheme::Ws => self.dial_ws(addr, url).await,
        }
    }

    async fn dial_ws(&self, addr: SocketAddr, url: &PeerUrl) -> Result<Link, DialError> {
        let tcp = TcpStream::connect(addr).await.map_err(|source| DialError::Connect { addr, source })?;
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "set_nodelay");
        }
        let local = tcp.local_addr().ok();
        let request = format!("{}{}", url, ws::LINK_PATH)
            .into_client_request()
            .map_err(|e| DialError::WebSocket { addr, reason: e.to_string() })?;
        let cfg = Some(ws::ws_config(&self.setup.config));
        let ws_err = |e: tokio_tungstenite::tungstenite::Error| DialError::WebSocket { addr, reason: e.to_string() };
        match url.scheme {
            Scheme::Wss => {
                let tls = self.tls.as_ref().ok_or(DialError::NotAllowed("wss:// needs a TLS configuration"))?;
                let name = ServerName::try_from(url.host.clone())
                    .map_err(|e| DialError::Tls { addr, reason: e.to_string() })?;
                let stream = tokio_rustls::TlsConnector::from(tls.wss_config())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| DialError::Tls { addr, reason: e.to_string() })?;
                let (ws, _resp) =
                    tokio_tungstenite::client_async_with_config(request, stream, cfg).await.map_err(ws_err)?;
                let (tx, rx) = ws::split(ws, &self.setup.config);
                let peer = PeerInfo::connecting(TransportKind::Wss, Some(addr), local);
                self.finish(tx, rx, peer, url).await
            }
            Scheme::Ws => {
                if !self.allow_plaintext {
                    return Err(DialError::NotAllowed(
                        "ws:// (no TLS) is only allowed with the development plaintext flag",
                    ));
                }
                let (ws, _resp) =
                    tokio_tungstenite::client_async_with_config(request, tcp, cfg).await.map_err(ws_err)?;
                let (tx, rx) = ws::split(ws, &self.setup.config);
                let peer = PeerInfo::connecting(TransportKind::Ws, Some(addr), local);
                self.finish(tx, rx, peer, url).await
            }
            Scheme::Quic => Err(DialError::NoQuicEndpoint),
        }
    }

    /// The hello exchange, then the driver.
    pub(crate) async fn finish<T: WireTx, R: WireRx>(
        &self,
        mut tx: T,
        mut rx: R,
        peer: PeerInfo,
        url: &PeerUrl,
    ) -> Result<Link, DialError> {
        let peer = handshake::exchange(&mut tx, &mut rx, &self.setup, Role::Dialer, peer)
            .await
            .map_err(|source| DialError::Handshake { url: url.to_string(), source })?;
        Ok(driver::start(tx, rx, peer, &self.setup.config, None))
    }
}

/// Every address `url`'s host names, in the resolver's order without repeats (an IP address
/// names itself).
///
/// # Errors
/// `Resolve` when the name does not resolve or resolves to nothing.
pub async fn resolve_all(url: &PeerUrl) -> Result<Vec<SocketAddr>, DialError> {
    if let Ok(ip) = url.host.parse::<std::net::IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, url.port)]);
    }
    let found = tokio::net::lookup_host((url.host.as_str(), url.port))
        .await
        .map_err(|source| DialError::Resolve { host: url.host.clone(), source })?;
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for a in found {
        if !addrs.contains(&a) {
            addrs.push(a);
        }
    }
    if addrs.is_empty() {
        return Err(no_addresses(url));
    }
    Ok(addrs)
}

fn no_addresses(url: &PeerUrl) -> DialError {
    DialError::Resolve {
        host: url.host.clone(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"),
    }
}

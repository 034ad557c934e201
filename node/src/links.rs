//! The node's side of the mesh: its certificate, the TLS it serves and trusts, the link acceptor
//! (WebSocket at `/v1/link` on the HTTP port, QUIC on the same port number over UDP), the dialer,
//! and the mesh driver that ties them to the gear host.
//!
//! Choices, in the spirit of Linkerd and NATS:
//! - TLS is on by default. In `dev` mode every node sharing the development CA directory gets a
//!   certificate from that CA at start, and trusts it; nothing else is trusted. In `pem` mode the
//!   operator's certificate is served and peers are verified against `tls.ca` (or the web PKI).
//! - In `acme` mode the node serves a certificate obtained from an ACME server for
//!   `tls.acme_domains` (a self-signed placeholder until the first one, with `/readyz` not ready),
//!   renewed in the background into the same resolver; it advertises its first domain and
//!   verifies peers against the web PKI plus `tls.ca`. See `docs/acme.md`.
//! - `tls.mode = "off"` (plaintext `http://` and `ws://`) requires `insecure_dev` and is logged
//!   loudly.
//! - A node advertises `wss://HOST:PORT` and, with QUIC on, `quic://HOST:PORT`; seeds may use
//!   either.
//! - With token authentication on, a link is also authenticated: each hello carries a JWT with
//!   the `mesh:link` scope for the mesh's audience (`auth.audience`, else
//!   [`gearmesh_auth::DEFAULT_LINK_AUDIENCE`]),
//!   signed by the node's key (or the operator's `--node-token`), and a peer whose token does not
//!   verify is refused before the link starts. Certificates say "this is a node of our CA";
//!   tokens say "this node may join this mesh".

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use gearmesh_gears::host::Host;
use gearmesh_mesh::{Config as CoreConfig, Mesh, MeshConfig};
use gearmesh_transport::{
    AcceptConfig, Acceptor, Dialer, Hello, LinkSetup, NodeId,
    acme::{Acme, AcmeConfig},
    quic::{QuicEndpoint, QuicError},
    tls::{CertResolver, ClientTls, ClientTrust, DevCa, NodeCert, TlsError, load_certs},
};

use crate::config::{NodeConfig, TlsMode};

/// File name of the development CA's certificate alone (no key), written next to the CA so
/// clients (`curl --cacert`, browsers) can trust it.
pub const DEV_CA_CERT_FILE: &str = "dev-ca.crt";

/// How long a link token lives: each handshake mints its own, so it only has to outlive the
/// handshake (plus clock skew between nodes).
const LINK_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// Setting up TLS or the mesh failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinksError {
    /// No directory for the development CA (no `HOME`, no `XDG_DATA_HOME`, no `tls.data_dir`).
    #[error("no directory for the development CA: set tls.data_dir (--data-dir, GEARMESH_DATA_DIR)")]
    NoDataDir,
    /// A certificate, key or CA could not be loaded or made.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// The development CA's certificate could not be written for clients.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The ACME client could not be set up (no domain, unreadable state directory).
    #[error("ACME: {0}")]
    Acme(#[from] gearmesh_transport::acme::AcmeError),
    /// The QUIC endpoint could not be bound on the node's port number.
    #[error("QUIC on {addr}: {source}")]
    Quic {
        /// The UDP address.
        addr: SocketAddr,
        /// Why.
        source: QuicError,
    },
}

impl LinksError {
    /// Whether the UDP port with the node's TCP port number is taken by another socket (a node
    /// that picked its TCP port at random then picks another: see `Node::start`).
    pub(crate) fn udp_port_taken(&self) -> bool {
        matches!(self, LinksError::Quic { source: QuicError::Socket { source, .. }, .. }
            if source.kind() == std::io::ErrorKind::AddrInUse)
    }
}

/// The TLS a node serves and trusts.
pub(crate) struct NodeTls {
    /// Serves the current certificate (swappable for renewals).
    pub(crate) resolver: Arc<CertResolver>,
    /// The HTTPS listener's config.
    pub(crate) server: Arc<rustls::ServerConfig>,
    /// What dialed peers must present.
    pub(crate) client: ClientTls,
    /// Where the development CA's certificate is, in `dev` mode.
    pub(crate) dev_ca_cert: Option<PathBuf>,
    /// The ACME client, in `acme` mode (spawned by the node once it serves).
    pub(crate) acme: Option<Acme>,
}

/// Loads (or creates) the development CA and writes its certificate for clients.
fn load_dev_ca(dir: &Path) -> Result<(DevCa, PathBuf), LinksError> {
    let ca = DevCa::load_or_create(dir)?;
    let crt = dir.join(DEV_CA_CERT_FILE);
    let current = std::fs::read_to_string(&crt).ok();
    if current.as_deref() != Some(ca.cert_pem()) {
        // Written to a unique name first, then renamed: nodes starting at once never see half a file.
        let tmp = dir.join(format!("{DEV_CA_CERT_FILE}.{:016x}.tmp", rand::random::<u64>()));
        let write = std::fs::write(&tmp, ca.cert_pem()).and_then(|()| std::fs::rename(&tmp, &crt));
        if let Err(source) = write {
            // Best effort: a stray temporary file is harmless.
            let _removed = std::fs::remove_file(&tmp);
            return Err(LinksError::Write { path: crt, source });
        }
    }
    Ok((ca, crt))
}

/// The names a node's development certificate covers.
fn cert_names(config: &NodeConfig, local: SocketAddr) -> Vec<String> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    match local.ip() {
        ip if ip.is_unspecified() => names.extend(route_address(ip).map(|a| a.to_string())),
        ip => names.push(ip.to_string()),
    }
    if let Some(h) = &config.mesh.advertise_host {
        names.push(h.clone());
    }
    if let Some(n) = &config.name {
        names.push(n.clone());
    }
    names.sort();
    names.dedup();
    names
}

/// Builds the node's TLS, or `None` when TLS is off.
pub(crate) fn node_tls(config: &NodeConfig, local: SocketAddr) -> Result<Option<NodeTls>, LinksError> {
    let extra_ca = match &config.tls.ca {
        Some(path) => load_certs(path)?,
        None => Vec::new(),
    };
    let mut acme = None;
    let (cert, trust, dev_ca_cert) = match config.tls.mode {
        TlsMode::Off => return Ok(None),
        TlsMode::Acme => {
            let dir = config.tls.data_dir.clone().or_else(DevCa::default_dir).ok_or(LinksError::NoDataDir)?;
            let mut ac = AcmeConfig::new(config.tls.acme_domains.clone(), dir.join("acme"));
            ac.contact = config.tls.acme_email.iter().cloned().collect();
            ac.directory = config.tls.acme_directory_url();
            ac.ca_root.clone_from(&config.tls.acme_ca_root);
            ac.challenge = config.tls.acme_challenge;
            let client = Acme::new(ac)?;
            let cert = client.initial_cert().clone();
            acme = Some(client);
            let trust =
                if extra_ca.is_empty() { ClientTrust::WebpkiRoots } else { ClientTrust::WebpkiRootsAnd(extra_ca) };
            (cert, trust, None)
        }
        TlsMode::Dev => {
            let dir = config.tls.data_dir.clone().or_else(DevCa::default_dir).ok_or(LinksError::NoDataDir)?;
            let (ca, crt) = load_dev_ca(&dir)?;
            let mut cas = vec![ca.cert_der()];
            cas.extend(extra_ca);
            (ca.issue(&cert_names(config, local))?, ClientTrust::Ca(cas), Some(crt))
        }
        TlsMode::Pem => {
            let (Some(cert), Some(key)) = (&config.tls.cert, &config.tls.key) else {
                return Err(TlsError::Config("pem mode needs tls.cert and tls.key".into()).into());
            };
            let trust =
                if extra_ca.is_empty() { ClientTrust::WebpkiRoots } else { ClientTrust::WebpkiRootsAnd(extra_ca) };
            (NodeCert::load_pem(cert, key)?, trust, None)
        }
    };
    let resolver = CertResolver::from_cert(&cert)?;
    let server = gearmesh_transport::tls::https_server_config(resolver.clone())?;
    let client = ClientTls::new(&trust)?;
    Ok(Some(NodeTls { resolver, server, client, dev_ca_cert, acme }))
}

/// The host other nodes dial this one at.
fn advertise_host(config: &NodeConfig, local: SocketAddr) -> String {
    if let Some(h) = &config.mesh.advertise_host {
        return h.clone();
    }
    if config.tls.mode == TlsMode::Acme
        && let Some(domain) = config.tls.acme_domains.first()
    {
        // Peers verify the ACME certificate, which names the domains, not the address.
        return domain.clone();
    }
    let ip = match local.ip() {
        ip if ip.is_unspecified() => match route_address(ip) {
            Some(ip) => ip,
            None => return "localhost".to_owned(),
        },
        ip => ip,
    };
    match ip {
        IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    }
}

/// For a node listening on every interface (`unspecified`: `0.0.0.0`, or `[::]`, which takes
/// IPv4 too): the address its routing table sends traffic for the outside world from, which is
/// what peers on other hosts can reach (a pod's or a container's address, a host's primary
/// address). An IPv4 route is preferred; `None` when there is no route out (only loopback).
/// Connecting a UDP socket only looks the route up: nothing is sent. NATS advertises every
/// non-loopback address in this case; one address keeps records small, and `advertise_host`
/// picks another.
fn route_address(unspecified: IpAddr) -> Option<IpAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, UdpSocket};
    // Documentation addresses (RFC 5737, RFC 3849): routed like any outside address.
    let v4 = || -> std::io::Result<IpAddr> {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        s.connect((Ipv4Addr::new(192, 0, 2, 1), 9))?;
        Ok(s.local_addr()?.ip())
    };
    let v6 = || -> std::io::Result<IpAddr> {
        let s = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?;
        s.connect((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), 9))?;
        Ok(s.local_addr()?.ip())
    };
    // A link-local IPv6 address needs its interface named to be dialed: not one to advertise.
    let link_local = |ip: &IpAddr| matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
    let usable = |ip: &IpAddr| !ip.is_unspecified() && !ip.is_loopback() && !link_local(ip);
    let found = v4().ok().filter(usable);
    match unspecified {
        IpAddr::V4(_) => found,
        IpAddr::V6(_) => found.or_else(|| v6().ok().filter(usable)),
    }
}

/// A peer's hello must carry a token that verifies, holds `mesh:link` for our audience, and (if
/// it names a node) names the node presenting it.
fn check_link_token(auth: &gearmesh_auth::Auth, hello: &Hello) -> Result<(), String> {
    let token = std::str::from_utf8(&hello.token).map_err(|_| "link token is not UTF-8".to_owned())?;
    if token.is_empty() {
        return Err("unauthorized: this mesh needs a link token (mesh:link)".into());
    }
    let id = auth.verifier.verify_mesh_link(token, auth.link_audience()).map_err(|e| format!("unauthorized: {e}"))?;
    match id.subject().strip_prefix("node:") {
        Some(node) if node != hello.node_id.to_string() => {
            Err("unauthorized: the link token belongs to another node".into())
        }
        _ => Ok(()),
    }
}

/// The mesh side of a started node.
pub(crate) struct MeshParts {
    pub(crate) mesh: Mesh,
    pub(crate) link_router: axum::Router,
    pub(crate) quic: Option<QuicEndpoint>,
    pub(crate) addrs: Vec<String>,
    /// What the link acceptor turned away, for `/metrics`.
    pub(crate) acceptor: Acceptor,
}

/// Creates the acceptor, the dialer, the QUIC endpoint, and starts the mesh driver.
pub(crate) fn start_mesh(
    config: &NodeConfig,
    id: NodeId,
    name: &str,
    local: SocketAddr,
    tls: Option<&NodeTls>,
    host: Arc<Host>,
    auth: Option<&gearmesh_auth::Auth>,
) -> Result<MeshParts, LinksError> {
    let host_name = advertise_host(config, local);
    if local.ip().is_unspecified() && config.mesh.advertise_host.is_none() && !config.mesh.no_listen {
        tracing::info!(host = %host_name, "listening on every interface; advertising this host to peers (--advertise-host picks another)");
    }
    let port = local.port();
    let quic_on = tls.is_some() && config.mesh.quic;
    let mut addrs = vec![match tls {
        Some(_) => format!("wss://{host_name}:{port}"),
        None => format!("ws://{host_name}:{port}"),
    }];
    if quic_on {
        addrs.push(format!("quic://{host_name}:{port}"));
    }
    if config.mesh.no_listen {
        // Nobody dials this node; its own dials carry everything both ways.
        addrs.clear();
    }
    // The incarnation orders restarts: a later start always has a larger one.
    let incarnation =
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    // Each link's hello carries a token minted for that handshake (short-lived; a link, once
    // up, stays up). A node without a signing key presents its --node-token.
    let token = match auth.map(|a| a.link_token(&id.to_string(), LINK_TOKEN_TTL)) {
        Some(Ok(t)) => Bytes::from(t),
        Some(Err(e)) => {
            // Verifying-only nodes (a JWKS, no key) still serve the API and accept links from
            // nodes that prove themselves; peers refuse the links this node dials.
            tracing::warn!(error = %e, "this node cannot prove itself to peers: give it --node-token to link out");
            Bytes::new()
        }
        None => Bytes::new(),
    };
    let hello = Hello {
        version: u16::from(gearmesh_transport::frame::PROTOCOL_VERSION),
        node_id: id,
        incarnation,
        token,
        listen_addrs: addrs.clone(),
        features: 0,
        mesh: config.mesh.name.clone(),
    };
    let link_config = gearmesh_transport::LinkConfig { send_queue: config.mesh.send_queue, ..Default::default() };
    let mut setup = LinkSetup::new(hello).with_config(link_config);
    if let Some(a) = auth.filter(|a| a.issuer.is_some()) {
        let (auth, me) = (a.clone(), id.to_string());
        setup = setup.with_token_source(move || match auth.link_token(&me, LINK_TOKEN_TTL) {
            Ok(t) => Bytes::from(t),
            Err(e) => {
                tracing::error!(error = %e, "cannot mint a link token");
                Bytes::new()
            }
        });
    }
    if let Some(a) = auth {
        let auth = a.clone();
        setup =
            setup.with_check(move |hello: &Hello, _peer: &gearmesh_transport::PeerInfo| check_link_token(&auth, hello));
    }
    let accept = AcceptConfig { max_links: config.mesh.max_connections, ..AcceptConfig::default() };
    let (acceptor, incoming) = Acceptor::new(setup.clone(), accept);
    let (dialer, quic) = match tls {
        Some(t) => {
            let dialer = Dialer::new(setup, t.client.clone());
            if quic_on {
                // A node that does not listen still dials QUIC, from an ephemeral port.
                let (udp, server) = if config.mesh.no_listen {
                    (SocketAddr::new(local.ip(), 0), None)
                } else {
                    (SocketAddr::new(local.ip(), port), Some(t.resolver.clone()))
                };
                let serving = server.is_some();
                let endpoint = QuicEndpoint::bind(udp, server, Some(&t.client))
                    .map_err(|source| LinksError::Quic { addr: udp, source })?;
                if serving {
                    tokio::spawn(endpoint.clone().serve(acceptor.clone()));
                }
                (dialer.with_quic(endpoint.clone()), Some(endpoint))
            } else {
                (dialer, None)
            }
        }
        None => {
            // A plain dialer still needs a TLS value; it is never used for ws:// links.
            let client = ClientTls::new(&ClientTrust::Ca(Vec::new()))?;
            (Dialer::new(setup, client).allow_plaintext_for_development(), None)
        }
    };
    let core = CoreConfig {
        name: name.to_owned(),
        incarnation,
        min_links: config.mesh.min_links,
        max_links: config.mesh.max_links,
        hard_max_links: (config.mesh.max_links * 2).max(CoreConfig::default().hard_max_links),
        preferred_scheme: match config.mesh.dial {
            crate::config::DialTransport::Quic if quic_on => Some("quic://".to_owned()),
            _ => None,
        },
        ..CoreConfig::default()
    };
    let mesh_config = MeshConfig {
        core,
        default_timeout: std::time::Duration::from_millis(config.calls.default_timeout_ms),
        max_hops: config.mesh.max_hops,
        resilience: config.resilience.to_mesh(),
        shortcuts: gearmesh_mesh::ShortcutPolicy {
            calls: config.mesh.shortcut_calls,
            window: std::time::Duration::from_millis(config.mesh.shortcut_window_ms),
        },
        ..MeshConfig::default()
    };
    let mesh = Mesh::start(id, addrs.clone(), mesh_config, host, dialer, incoming, config.seeds.clone());
    let link_router = if config.mesh.no_listen { axum::Router::new() } else { acceptor.router() };
    Ok(MeshParts { mesh, link_router, quic, addrs, acceptor })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quic_error(kind: std::io::ErrorKind) -> LinksError {
        let addr: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        LinksError::Quic { addr, source: QuicError::Socket { addr, source: std::io::Error::from(kind) } }
    }

    #[test]
    fn only_a_udp_address_in_use_counts_as_a_taken_port() {
        assert!(quic_error(std::io::ErrorKind::AddrInUse).udp_port_taken());
        assert!(!quic_error(std::io::ErrorKind::PermissionDenied).udp_port_taken());
        assert!(
            !LinksError::Quic { addr: "127.0.0.1:9".parse().expect("addr"), source: QuicError::Tls("x".into()) }
                .udp_port_taken()
        );
        assert!(!LinksError::NoDataDir.udp_port_taken());
    }
}

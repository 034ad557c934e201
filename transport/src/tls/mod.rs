//! TLS for links and the node's HTTPS listener: one crypto provider (aws-lc-rs), certificate
//! sources (development CA, PEM files), a resolver whose certificate can be swapped while
//! connections stay up, and the server and client configurations built from them.
//!
//! The same [`CertResolver`] serves HTTPS, WSS and QUIC. Dialing always verifies the server
//! against a CA or the webpki roots; accepting any certificate needs
//! [`ClientTrust::InsecureAcceptAnyForDevelopment`], named to be noticed.

mod devca;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

pub use devca::{DEV_CA_FILE, DevCa, NodeCert, load_certs};

/// ALPN protocol of gearmesh over QUIC.
pub const ALPN_GEARMESH: &[u8] = b"gearmesh/1";
/// ALPN protocol of HTTP/1.1 (WebSocket upgrades).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// ALPN protocol of HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN protocol of the ACME TLS-ALPN-01 challenge (RFC 8737): a handshake offering it gets the
/// challenge certificate, and the connection is closed right after.
pub const ALPN_ACME_TLS: &[u8] = b"acme-tls/1";

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// A PEM file holds no certificate.
    #[error("{}: no certificate found", .0.display())]
    NoCertificates(PathBuf),
    /// A PEM file holds no private key.
    #[error("{}: no private key found", .0.display())]
    NoPrivateKey(PathBuf),
    /// The private key is not usable with the provider.
    #[error("unusable private key: {0}")]
    InvalidKey(String),
    /// Generating a key or certificate failed.
    #[error("certificate generation failed: {0}")]
    Generate(String),
    /// rustls refused the configuration (e.g. a CA certificate it cannot parse).
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The process-wide crypto provider (aws-lc-rs).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Installs aws-lc-rs as the process-wide default rustls provider. Idempotent: later calls (or a
/// provider installed by someone else) are fine.
pub fn install_crypto_provider() {
    if CryptoProvider::get_default().is_none()
        && rustls::crypto::aws_lc_rs::default_provider().install_default().is_err()
    {
        tracing::trace!("a crypto provider was installed concurrently");
    }
}

// === impl CertResolver ===

/// Serves the current certificate to every new TLS handshake; [`CertResolver::swap`] replaces
/// it without touching established connections (ACME renewals use this).
///
/// It also answers ACME TLS-ALPN-01 challenges: a handshake that offers only the `acme-tls/1`
/// ALPN protocol gets the challenge certificate registered for its SNI name
/// ([`CertResolver::set_acme_challenge`]), or fails when there is none.
pub struct CertResolver {
    current: RwLock<Arc<CertifiedKey>>,
    /// TLS-ALPN-01 challenge certificates by (lower-case) domain.
    acme: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertResolver").finish_non_exhaustive()
    }
}

impl CertResolver {
    /// A resolver serving `key`.
    pub fn new(key: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(CertResolver { current: RwLock::new(key), acme: RwLock::new(HashMap::new()) })
    }

    /// A resolver serving a node certificate.
    pub fn from_cert(cert: &NodeCert) -> Result<Arc<Self>, TlsError> {
        Ok(Self::new(cert.certified_key()?))
    }

    /// Serves `key` to new handshakes from now on.
    pub fn swap(&self, key: Arc<CertifiedKey>) {
        match self.current.write() {
            Ok(mut g) => *g = key,
            Err(poisoned) => *poisoned.into_inner() = key,
        }
    }

    /// The certificate currently served.
    pub fn current(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(g) => Arc::clone(&g),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Serves `key` to TLS-ALPN-01 validation handshakes for `domain` until
    /// [`CertResolver::clear_acme_challenge`].
    pub fn set_acme_challenge(&self, domain: &str, key: Arc<CertifiedKey>) {
        let domain = domain.to_ascii_lowercase();
        match self.acme.write() {
            Ok(mut g) => g.insert(domain, key),
            Err(poisoned) => poisoned.into_inner().insert(domain, key),
        };
    }

    /// Stops answering TLS-ALPN-01 validation for `domain`.
    pub fn clear_acme_challenge(&self, domain: &str) {
        let domain = domain.to_ascii_lowercase();
        match self.acme.write() {
            Ok(mut g) => g.remove(&domain),
            Err(poisoned) => poisoned.into_inner().remove(&domain),
        };
    }

    fn acme_challenge(&self, domain: &str) -> Option<Arc<CertifiedKey>> {
        let domain = domain.to_ascii_lowercase();
        match self.acme.read() {
            Ok(g) => g.get(&domain).cloned(),
            Err(poisoned) => poisoned.into_inner().get(&domain).cloned(),
        }
    }
}

/// Whether a client hello is an ACME TLS-ALPN-01 validation (it offers `acme-tls/1`).
fn is_acme_validation(hello: &ClientHello<'_>) -> bool {
    hello.alpn().is_some_and(|mut protocols| protocols.any(|p| p == ALPN_ACME_TLS))
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if is_acme_validation(&hello) {
            // RFC 8737: only the challenge certificate, never the regular one.
            return hello.server_name().and_then(|name| self.acme_challenge(name));
        }
        Some(self.current())
    }
}

/// A rustls server config using `resolver`, TLS 1.2 and 1.3, with the given ALPN protocols.
pub fn server_config(resolver: Arc<CertResolver>, alpn: &[&[u8]]) -> Result<ServerConfig, TlsError> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// The node's HTTPS listener config (ALPN h2 and http/1.1; WebSocket links use http/1.1; and
/// `acme-tls/1`, which only ACME validation servers offer: see [`CertResolver`]).
pub fn https_server_config(resolver: Arc<CertResolver>) -> Result<Arc<ServerConfig>, TlsError> {
    server_config(resolver, &[ALPN_H2, ALPN_HTTP1, ALPN_ACME_TLS]).map(Arc::new)
}

/// The QUIC server config (TLS 1.3 only, ALPN gearmesh/1).
pub(crate) fn quic_server_config(resolver: Arc<CertResolver>) -> Result<ServerConfig, TlsError> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![ALPN_GEARMESH.to_vec()];
    cfg.max_early_data_size = u32::MAX;
    Ok(cfg)
}

// === impl ClientTrust ===

/// What a dialing node trusts when it verifies the server.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ClientTrust {
    /// These CA certificates (the development CA, or `--tls-ca`).
    Ca(Vec<CertificateDer<'static>>),
    /// The public web PKI (webpki roots), for ACME-issued certificates.
    WebpkiRoots,
    /// The webpki roots and these CA certificates.
    WebpkiRootsAnd(Vec<CertificateDer<'static>>),
    /// Accept any certificate: development only, never in production.
    InsecureAcceptAnyForDevelopment,
}

impl ClientTrust {
    /// Trust the development CA.
    pub fn dev_ca(ca: &DevCa) -> Self {
        ClientTrust::Ca(vec![ca.cert_der()])
    }

    /// Builds the client config for this trust, TLS 1.2+ if `tls12` else 1.3 only.
    fn build(&self, alpn: &[u8], tls12: bool) -> Result<ClientConfig, TlsError> {
        let versions: &[&rustls::SupportedProtocolVersion] =
            if tls12 { &[&rustls::version::TLS13, &rustls::version::TLS12] } else { &[&rustls::version::TLS13] };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let roots = |extra: &[CertificateDer<'static>], web: bool| {
            let mut store = RootCertStore::empty();
            if web {
                store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            }
            for c in extra {
                store.add(c.clone()).map_err(|e| TlsError::Config(format!("CA certificate: {e}")))?;
            }
            Ok::<_, TlsError>(store)
        };
        let mut cfg = match self {
            ClientTrust::Ca(cas) => builder.with_root_certificates(roots(cas, false)?).with_no_client_auth(),
            ClientTrust::WebpkiRoots => builder.with_root_certificates(roots(&[], true)?).with_no_client_auth(),
            ClientTrust::WebpkiRootsAnd(cas) => builder.with_root_certificates(roots(cas, true)?).with_no_client_auth(),
            ClientTrust::InsecureAcceptAnyForDevelopment => {
                tracing::warn!(
                    "TLS server verification is OFF (insecure development mode): any certificate is accepted"
                );
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider())))
                    .with_no_client_auth()
            }
        };
        cfg.alpn_protocols = vec![alpn.to_vec()];
        Ok(cfg)
    }
}

/// Client TLS configurations for dialing links, built once from a [`ClientTrust`].
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub(crate) wss: Arc<ClientConfig>,
    pub(crate) quic: Arc<ClientConfig>,
}

impl ClientTls {
    /// Configs for WSS (TLS 1.2+, ALPN http/1.1) and QUIC (TLS 1.3, ALPN gearmesh/1).
    pub fn new(trust: &ClientTrust) -> Result<Self, TlsError> {
        Ok(ClientTls {
            wss: Arc::new(trust.build(ALPN_HTTP1, true)?),
            quic: Arc::new(trust.build(ALPN_GEARMESH, false)?),
        })
    }

    /// The rustls config used for WSS (also usable for plain HTTPS clients).
    pub fn wss_config(&self) -> Arc<ClientConfig> {
        Arc::clone(&self.wss)
    }
}

/// The verifier behind [`ClientTrust::InsecureAcceptAnyForDevelopment`]: checks signatures,
/// trusts any certificate.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

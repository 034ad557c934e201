//! Answering ACME challenges: the HTTP-01 token map (served at
//! `/.well-known/acme-challenge/{token}` by the node's router and by the optional plain-HTTP
//! listener) and TLS-ALPN-01 challenge certificates (served by [`crate::tls::CertResolver`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use rcgen::{CertificateParams, CustomExtension, DistinguishedName, KeyPair};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::tls::{NodeCert, TlsError};

/// The path prefix of HTTP-01 challenges.
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";
/// The route of HTTP-01 challenges, in axum's syntax.
pub const HTTP01_ROUTE: &str = "/.well-known/acme-challenge/{token}";

/// The HTTP-01 answers in progress: token to key authorization. Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct Http01Tokens(Arc<RwLock<HashMap<String, String>>>);

impl Http01Tokens {
    /// The key authorization to answer for `token`, while its challenge is in progress.
    pub fn get(&self, token: &str) -> Option<String> {
        match self.0.read() {
            Ok(g) => g.get(token).cloned(),
            Err(poisoned) => poisoned.into_inner().get(token).cloned(),
        }
    }

    pub(crate) fn insert(&self, token: String, key_authorization: String) {
        match self.0.write() {
            Ok(mut g) => g.insert(token, key_authorization),
            Err(poisoned) => poisoned.into_inner().insert(token, key_authorization),
        };
    }

    pub(crate) fn remove(&self, token: &str) {
        match self.0.write() {
            Ok(mut g) => g.remove(token),
            Err(poisoned) => poisoned.into_inner().remove(token),
        };
    }

    /// The answer to `GET /.well-known/acme-challenge/{token}`: the key authorization as
    /// `application/octet-stream`, or 404.
    pub fn respond(&self, token: &str) -> Response {
        match self.get(token) {
            Some(ka) => ([(header::CONTENT_TYPE, "application/octet-stream")], ka).into_response(),
            None => (StatusCode::NOT_FOUND, "no such ACME challenge\n").into_response(),
        }
    }
}

/// A self-signed TLS-ALPN-01 challenge certificate for `domain` carrying the SHA-256 digest of
/// the key authorization in the critical `id-pe-acmeIdentifier` extension (RFC 8737).
pub(crate) fn tls_alpn_cert(domain: &str, digest: &[u8; 32]) -> Result<Arc<CertifiedKey>, TlsError> {
    let rc = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let mut params = CertificateParams::new(vec![domain.to_owned()]).map_err(rc)?;
    params.distinguished_name = DistinguishedName::new();
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest)];
    let key = KeyPair::generate().map_err(rc)?;
    let cert = params.self_signed(&key).map_err(rc)?;
    NodeCert {
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    }
    .certified_key()
}

/// A self-signed certificate for `domains`, served until ACME issues the first real one, so
/// the port answers TLS (and TLS-ALPN-01 validations) from the start. No client trusts it.
pub(crate) fn placeholder_cert(domains: &[String]) -> Result<NodeCert, TlsError> {
    let rc = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let mut params = CertificateParams::new(domains.to_vec()).map_err(rc)?;
    let mut dn = DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, "gearmesh placeholder: waiting for an ACME certificate");
    params.distinguished_name = dn;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(90);
    let key = KeyPair::generate().map_err(rc)?;
    let cert = params.self_signed(&key).map_err(rc)?;
    Ok(NodeCert {
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    })
}

// === the plain-HTTP challenge listener ===

#[derive(Clone)]
struct Plain {
    tokens: Http01Tokens,
    https_port: u16,
}

async fn challenge(State(p): State<Plain>, Path(token): Path<String>) -> Response {
    p.tokens.respond(&token)
}

/// Everything that is not a challenge goes to the same host over HTTPS.
async fn redirect(State(p): State<Plain>, headers: HeaderMap, uri: Uri) -> Response {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
    // Strip a port (but keep IPv6 brackets whole).
    let name = match host.rsplit_once(':') {
        Some((h, port)) if !port.contains(']') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace() || b == b'/' || b == b'@') {
        return (StatusCode::BAD_REQUEST, "missing or invalid Host header\n").into_response();
    }
    let port = if p.https_port == 443 { String::new() } else { format!(":{}", p.https_port) };
    let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let location = format!("https://{name}{port}{path}");
    match axum::http::HeaderValue::from_str(&location) {
        Ok(v) => (StatusCode::PERMANENT_REDIRECT, [(header::LOCATION, v)]).into_response(),
        Err(_) => (StatusCode::BAD_REQUEST, "invalid redirect target\n").into_response(),
    }
}

/// Serves HTTP-01 challenges on a plain-HTTP `listener` (typically port 80) and redirects every
/// other request to HTTPS on `https_port`, until `shutdown` is cancelled.
#[must_use = "the listener does nothing unless awaited or spawned"]
pub async fn serve_http01(listener: TcpListener, tokens: Http01Tokens, https_port: u16, shutdown: CancellationToken) {
    let local: Option<SocketAddr> = listener.local_addr().ok();
    let router = axum::Router::new()
        .route(HTTP01_ROUTE, axum::routing::get(challenge))
        .fallback(redirect)
        .with_state(Plain { tokens, https_port });
    tracing::info!(addr = ?local, "plain-HTTP listener for ACME HTTP-01 challenges (everything else redirects to HTTPS)");
    crate::https::serve(listener, None, router, crate::https::ServeOptions::default(), shutdown).await;
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls_pki_types::ServerName;

    use super::*;
    use crate::tls::{ALPN_ACME_TLS, ALPN_H2, CertResolver, DevCa, https_server_config};

    /// One in-memory handshake: the leaf the server presented and the negotiated ALPN.
    async fn handshake(
        server: Arc<rustls::ServerConfig>,
        alpn: &[u8],
        sni: &str,
    ) -> Result<(Vec<u8>, Option<Vec<u8>>), String> {
        let mut client = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify))
            .with_no_client_auth();
        client.alpn_protocols = vec![alpn.to_vec()];
        let (c, s) = tokio::io::duplex(64 * 1024);
        let accept = tokio_rustls::TlsAcceptor::from(server).accept(s);
        let name = ServerName::try_from(sni.to_owned()).map_err(|e| e.to_string())?;
        let connect = tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, c);
        let (server_side, client_side) = tokio::join!(accept, connect);
        drop(server_side);
        let tls = client_side.map_err(|e| e.to_string())?;
        let conn = tls.get_ref().1;
        let leaf = conn.peer_certificates().and_then(|c| c.first()).ok_or("no certificate")?.to_vec();
        Ok((leaf, conn.alpn_protocol().map(<[u8]>::to_vec)))
    }

    /// Accepts everything without parsing: like an ACME validator, which checks the
    /// certificate's extension itself (webpki refuses the unknown critical extension).
    #[derive(Debug)]
    struct NoVerify;

    impl rustls::client::danger::ServerCertVerifier for NoVerify {
        fn verify_server_cert(
            &self,
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &[rustls_pki_types::CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: rustls_pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }

        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            crate::tls::provider().signature_verification_algorithms.supported_schemes()
        }
    }

    /// The `id-pe-acmeIdentifier` extension: (critical, value).
    fn acme_extension(der: &[u8]) -> Option<(bool, Vec<u8>)> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let oid = x509_parser::der_parser::oid!(1.3.6.1.5.5.7.1.31);
        cert.extensions().iter().find(|e| e.oid == oid).map(|e| (e.critical, e.value.to_vec()))
    }

    #[tokio::test]
    async fn acme_tls_alpn_handshakes_get_only_the_challenge_certificate() {
        crate::tls::install_crypto_provider();
        let regular = DevCa::generate().expect("ca").issue(&["node.example".into()]).expect("issue");
        let regular_der = regular.chain[0].to_vec();
        let resolver = CertResolver::from_cert(&regular).expect("resolver");
        let server = https_server_config(resolver.clone()).expect("config");

        // No challenge in progress: a validation handshake fails rather than get the real cert.
        assert!(handshake(server.clone(), ALPN_ACME_TLS, "node.example").await.is_err());

        let digest = [7u8; 32];
        resolver.set_acme_challenge("Node.Example", tls_alpn_cert("node.example", &digest).expect("cert"));
        let (leaf, alpn) = handshake(server.clone(), ALPN_ACME_TLS, "node.example").await.expect("validation");
        assert_eq!(alpn.as_deref(), Some(ALPN_ACME_TLS));
        let (critical, value) = acme_extension(&leaf).expect("acmeIdentifier extension");
        assert!(critical, "RFC 8737: the extension is critical");
        let mut expected = vec![0x04, 0x20];
        expected.extend_from_slice(&digest);
        assert_eq!(value, expected, "an OCTET STRING holding the key authorization digest");
        // Another name has no challenge.
        assert!(handshake(server.clone(), ALPN_ACME_TLS, "other.example").await.is_err());
        // Ordinary clients still get the regular certificate meanwhile.
        let (leaf, alpn) = handshake(server.clone(), ALPN_H2, "node.example").await.expect("h2");
        assert_eq!(leaf, regular_der);
        assert_eq!(alpn.as_deref(), Some(ALPN_H2));

        resolver.clear_acme_challenge("node.example");
        assert!(handshake(server, ALPN_ACME_TLS, "node.example").await.is_err());
    }

    #[test]
    fn http01_tokens_answer_while_installed() {
        let tokens = Http01Tokens::default();
        assert!(tokens.get("t").is_none());
        tokens.insert("t".into(), "t.thumb".into());
        assert_eq!(tokens.get("t").as_deref(), Some("t.thumb"));
        assert_eq!(tokens.respond("t").status(), StatusCode::OK);
        tokens.remove("t");
        assert_eq!(tokens.respond("t").status(), StatusCode::NOT_FOUND);
    }
}

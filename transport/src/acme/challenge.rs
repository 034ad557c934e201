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

//! An "ARI front" for Pebble 2.4, which has no ACME Renewal Information (RFC 9773) in its
//! directory: a small HTTPS server with Pebble's own API certificate (so a node trusting
//! `Pebble::api_ca` trusts it too) that serves only two things.
//!
//! - `GET /dir`: Pebble's real directory with a `renewalInfo` URL added that points here. Every
//!   other URL still points at Pebble, so every JWS-signed request (account, order, challenge,
//!   finalize) goes to Pebble itself and its `url` header matches.
//! - `GET /ari/{certID}`: checks that `certID` is RFC 9773's identifier (§4.1) of the leaf the
//!   node serves at that moment, computed here from that certificate (not by the client's code),
//!   records the request, and answers the next scripted [`Answer`]. A wrong identifier gets 404.
//!
//! Not here: anything Pebble does itself. The server is stopped when the front is dropped.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use base64::{Engine, prelude::BASE64_URL_SAFE_NO_PAD};
use gearmesh_transport::{
    acme::CertInfo,
    https::{self, ServeOptions},
    tls::{CertResolver, ClientTls, ClientTrust, NodeCert, https_server_config},
};
use rustls_pki_types::CertificateDer;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::Pebble;

/// What the front answers to one renewalInfo request (the last one repeats).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Answer {
    /// A suggested window from `start` to `end` seconds after the request (negative: in the
    /// past), with `Retry-After: retry_after`.
    Window {
        /// Start, seconds from the request.
        start: i64,
        /// End, seconds from the request.
        end: i64,
        /// The `Retry-After` header, in seconds.
        retry_after: u64,
    },
    /// This HTTP status, with no window.
    Status(u16),
}

/// One renewalInfo request, as the front saw it.
#[derive(Debug, Clone)]
pub(crate) struct Asked {
    /// When it arrived.
    pub(crate) at: SystemTime,
    /// The certID in the URL.
    pub(crate) cert_id: String,
    /// The certID of the leaf the node served when it arrived (computed here), or why there is
    /// none.
    pub(crate) expected: Result<String, String>,
    /// The serial of that leaf, as `CertInfo` shows it.
    pub(crate) served_serial: Option<String>,
    /// The window answered, in Unix seconds, if a window was answered.
    pub(crate) window: Option<(u64, u64)>,
}

struct Inner {
    directory: Value,
    answers: Vec<Answer>,
    node: SocketAddr,
    asked: Mutex<Vec<Asked>>,
}

/// A running ARI front; stops when dropped.
pub(crate) struct AriFront {
    port: u16,
    inner: Arc<Inner>,
    shutdown: CancellationToken,
}

impl AriFront {
    /// Starts a front for `pebble`, checking identifiers against the leaf served at `node`, with
    /// `answers` given in order (the last one repeats).
    pub(crate) async fn start(pebble: &Pebble, node: SocketAddr, answers: Vec<Answer>) -> AriFront {
        assert!(!answers.is_empty(), "at least one answer");
        gearmesh::install_crypto_provider();
        let listener = tokio::net::TcpListener::bind(super::loopback(0)).await.expect("bind the ARI front");
        let port = listener.local_addr().expect("address").port();
        let mut directory: Value = pebble
            .api_client()
            .get(pebble.directory_url())
            .send()
            .await
            .expect("Pebble's directory")
            .json()
            .await
            .expect("directory JSON");
        assert!(directory.get("renewalInfo").is_none(), "this Pebble offers ARI itself: the front is not needed");
        directory["renewalInfo"] = format!("https://127.0.0.1:{port}/ari").into();
        let inner = Arc::new(Inner { directory, answers, node, asked: Mutex::default() });
        let (cert, key) = pebble.api_cert();
        let cert = NodeCert::load_pem(&cert, &key).expect("Pebble's API certificate");
        let tls = https_server_config(CertResolver::from_cert(&cert).expect("resolver")).expect("server config");
        let router = Router::new()
            .route("/dir", get(directory_handler))
            .route("/ari/{id}", get(renewal_info))
            .with_state(inner.clone());
        let shutdown = CancellationToken::new();
        tokio::spawn(https::serve(listener, Some(tls), router, ServeOptions::default(), shutdown.clone()));
        AriFront { port, inner, shutdown }
    }

    /// The directory URL to give the node.
    pub(crate) fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    /// The renewalInfo requests so far.
    pub(crate) fn asked(&self) -> Vec<Asked> {
        self.inner.asked.lock().expect("lock").clone()
    }
}

impl Drop for AriFront {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn directory_handler(State(front): State<Arc<Inner>>) -> Json<Value> {
    Json(front.directory.clone())
}

async fn renewal_info(State(front): State<Arc<Inner>>, Path(cert_id): Path<String>) -> Response {
    let served = served_leaf(front.node).await;
    let expected = served.as_ref().map_err(Clone::clone).and_then(|der| cert_id_of(der));
    let served_serial = served.ok().and_then(|der| CertInfo::parse(&der).ok()).map(|i| i.serial);
    let at = SystemTime::now();
    let now = at.duration_since(UNIX_EPOCH).expect("after 1970").as_secs();
    let mut asked = front.asked.lock().expect("lock");
    let answer = front.answers[asked.len().min(front.answers.len() - 1)];
    let matches = expected.as_ref().is_ok_and(|e| *e == cert_id);
    let window = match answer {
        Answer::Window { start, end, .. } if matches => {
            Some((now.saturating_add_signed(start), now.saturating_add_signed(end)))
        }
        Answer::Window { .. } | Answer::Status(_) => None,
    };
    asked.push(Asked { at, cert_id, expected, served_serial, window });
    drop(asked);
    if !matches {
        return StatusCode::NOT_FOUND.into_response();
    }
    match (answer, window) {
        (Answer::Window { retry_after, .. }, Some((start, end))) => {
            let body = json!({ "suggestedWindow": { "start": rfc3339(start), "end": rfc3339(end) } });
            let mut resp = Json(body).into_response();
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            resp
        }
        (Answer::Status(code), _) => StatusCode::from_u16(code).expect("an HTTP status").into_response(),
        (Answer::Window { .. }, None) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn rfc3339(unix: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(i64::try_from(unix).expect("in range")).expect("a time");
    t.format(&time::format_description::well_known::Rfc3339).expect("formats")
}

/// The leaf the node serves now (whoever signed it).
async fn served_leaf(node: SocketAddr) -> Result<CertificateDer<'static>, String> {
    let tls = ClientTls::new(&ClientTrust::InsecureAcceptAnyForDevelopment).expect("client tls").wss_config();
    let mut tls = rustls::ClientConfig::clone(&tls);
    tls.resumption = rustls::client::Resumption::disabled();
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .tls_info(true)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let resp = client.get(format!("https://{node}/healthz")).send().await.map_err(|e| format!("{e:?}"))?;
    let der = resp
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .ok_or("no peer certificate")?
        .to_vec();
    Ok(CertificateDer::from(der))
}

/// RFC 9773 §4.1: base64url(the AKI extension's keyIdentifier) "." base64url(the serial's DER
/// content octets, a leading zero included), without padding.
pub(crate) fn cert_id_of(der: &CertificateDer<'_>) -> Result<String, String> {
    use x509_parser::extensions::ParsedExtension;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| e.to_string())?;
    let aki = cert
        .iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.as_ref().map(|k| k.0),
            _other => None,
        })
        .ok_or("the certificate has no authority key identifier")?;
    let serial = cert.tbs_certificate.raw_serial();
    Ok(format!("{}.{}", BASE64_URL_SAFE_NO_PAD.encode(aki), BASE64_URL_SAFE_NO_PAD.encode(serial)))
}

//! Remote JWKS ([`RemoteJwks`]): an identity provider's key set (`--auth-jwks URL`, Keycloak,
//! Auth0) fetched over HTTPS and cached.
//!
//! - Verification never waits on the network: [`RemoteJwks::keys`] returns the cached set.
//! - [`RemoteJwks::run`] (spawned by the node) refreshes every `cache_ttl`.
//! - A token with an unknown kid triggers at most one refresh per `min_refresh_interval`
//!   ([`crate::Verifier::verify_with_refresh`]), so a flood of made-up kids cannot hammer the
//!   provider.
//! - A failed fetch (provider down, bad document, no usable keys) keeps the last good set.

use std::{
    fmt,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use rustls_pki_types::{CertificateDer, pem::PemObject};
use tokio::time::Instant;

use crate::{
    KeyError, KeySet,
    jwks::{MAX_JWKS_LEN, SecretKeys},
};

/// How a [`RemoteJwks`] fetches and caches.
#[derive(Clone, PartialEq, Eq)]
pub struct RemoteJwksConfig {
    /// How long a fetched set is fresh; [`RemoteJwks::run`] refetches after this. Default 5 min.
    pub cache_ttl: Duration,
    /// Least time between two refreshes caused by unknown kids (and between retries after a
    /// failure in [`RemoteJwks::run`]). Default 10 s.
    pub min_refresh_interval: Duration,
    /// Timeout of one fetch. Default 10 s.
    pub fetch_timeout: Duration,
    /// Trust the public web PKI roots (webpki-roots). Default true.
    pub webpki_roots: bool,
    /// Extra trusted CA certificates, PEM (for a private provider, or tests).
    pub extra_roots_pem: Option<Vec<u8>>,
}

impl fmt::Debug for RemoteJwksConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteJwksConfig")
            .field("cache_ttl", &self.cache_ttl)
            .field("min_refresh_interval", &self.min_refresh_interval)
            .field("fetch_timeout", &self.fetch_timeout)
            .field("webpki_roots", &self.webpki_roots)
            .field("extra_roots", &self.extra_roots_pem.is_some())
            .finish()
    }
}

impl Default for RemoteJwksConfig {
    fn default() -> Self {
        RemoteJwksConfig {
            cache_ttl: Duration::from_secs(300),
            min_refresh_interval: Duration::from_secs(10),
            fetch_timeout: Duration::from_secs(10),
            webpki_roots: true,
            extra_roots_pem: None,
        }
    }
}

/// Why a remote JWKS could not be set up or fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwksError {
    /// The URL is not a valid `https://` URL.
    #[error("JWKS URL must be https: {0}")]
    NotHttps(String),
    /// The extra CA PEM could not be read.
    #[error("invalid CA certificates: {0}")]
    BadRoots(String),
    /// The HTTPS client could not be built.
    #[error("building the HTTPS client: {0}")]
    Client(String),
    /// The request failed (connection, TLS, timeout).
    #[error("fetching {url}: {reason}")]
    Fetch {
        /// The JWKS URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The provider answered with a non-success status.
    #[error("fetching {url}: HTTP {status}")]
    Status {
        /// The JWKS URL.
        url: String,
        /// The HTTP status.
        status: u16,
    },
    /// The document is larger than [`crate::MAX_JWKS_LEN`].
    #[error("JWKS document too large")]
    TooLarge,
    /// The document is not a JWKS.
    #[error("invalid JWKS document: {0}")]
    Document(#[from] KeyError),
    /// The document holds no key gearmesh can use; the previous set is kept.
    #[error("JWKS has no usable signing keys")]
    NoUsableKeys,
}

/// Counters of a [`RemoteJwks`], for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RemoteJwksStats {
    /// Fetch attempts.
    pub fetches: u64,
    /// Failed fetch attempts.
    pub failures: u64,
    /// Unknown-kid refreshes refused by the rate limit.
    pub rate_limited: u64,
}

/// A cached remote JWKS. Cheap to clone (shared state).
#[derive(Clone)]
pub struct RemoteJwks {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    client: reqwest::Client,
    config: RemoteJwksConfig,
    current: RwLock<Arc<KeySet>>,
    fetch: tokio::sync::Mutex<FetchState>,
    fetches: AtomicU64,
    generation: AtomicU64,
    failures: AtomicU64,
    rate_limited: AtomicU64,
}

#[derive(Debug, Default)]
struct FetchState {
    last_success: Option<Instant>,
    last_kid_refresh: Option<Instant>,
}

impl fmt::Debug for RemoteJwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteJwks")
            .field("url", &self.inner.url)
            .field("keys", &self.keys().len())
            .finish_non_exhaustive()
    }
}

fn build_client(config: &RemoteJwksConfig) -> Result<reqwest::Client, JwksError> {
    let mut roots = rustls::RootCertStore::empty();
    if config.webpki_roots {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    if let Some(pem) = &config.extra_roots_pem {
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| JwksError::BadRoots(e.to_string()))?;
            roots.add(cert).map_err(|e| JwksError::BadRoots(e.to_string()))?;
        }
    }
    if roots.is_empty() {
        return Err(JwksError::BadRoots("no trusted roots".into()));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| JwksError::Client(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .https_only(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(config.fetch_timeout)
        .build()
        .map_err(|e| JwksError::Client(e.to_string()))
}

impl RemoteJwks {
    /// A remote set for `url` (must be `https://`), empty until the first fetch. Does no I/O.
    pub fn new(url: &str, config: RemoteJwksConfig) -> Result<Self, JwksError> {
        let parsed = reqwest::Url::parse(url).map_err(|_| JwksError::NotHttps(url.to_owned()))?;
        if parsed.scheme() != "https" || parsed.host_str().is_none() {
            return Err(JwksError::NotHttps(url.to_owned()));
        }
        let client = build_client(&config)?;
        Ok(RemoteJwks {
            inner: Arc::new(Inner {
                url: parsed.to_string(),
                client,
                config,
                current: RwLock::new(Arc::new(KeySet::new())),
                fetch: tokio::sync::Mutex::new(FetchState::default()),
                fetches: AtomicU64::new(0),
                generation: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                rate_limited: AtomicU64::new(0),
            }),
        })
    }

    /// The URL.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// The cached key set (the last good one; empty before the first successful fetch).
    pub fn keys(&self) -> Arc<KeySet> {
        match self.inner.current.read() {
            Ok(g) => Arc::clone(&g),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// The counters.
    pub fn stats(&self) -> RemoteJwksStats {
        RemoteJwksStats {
            fetches: self.inner.fetches.load(Ordering::Relaxed),
            failures: self.inner.failures.load(Ordering::Relaxed),
            rate_limited: self.inner.rate_limited.load(Ordering::Relaxed),
        }
    }

    /// Fetches the set now. On success it replaces the cache and returns the number of usable
    /// keys; on failure the last good set stays.
    ///
    /// # Cancel safety
    /// Cancel-safe: the cache is replaced only after a complete, valid document.
    pub async fn refresh(&self) -> Result<usize, JwksError> {
        let mut state = self.inner.fetch.lock().await;
        self.fetch_locked(&mut state).await
    }

    async fn fetch_locked(&self, state: &mut FetchState) -> Result<usize, JwksError> {
        self.inner.fetches.fetch_add(1, Ordering::Relaxed);
        match self.fetch_once().await {
            Ok(set) => {
                let n = set.len();
                match self.inner.current.write() {
                    Ok(mut g) => *g = Arc::new(set),
                    Err(poisoned) => *poisoned.into_inner() = Arc::new(set),
                }
                state.last_success = Some(Instant::now());
                self.inner.generation.fetch_add(1, Ordering::Release);
                tracing::debug!(url = %self.inner.url, keys = n, "JWKS refreshed");
                Ok(n)
            }
            Err(e) => {
                self.inner.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(url = %self.inner.url, error = %e, "JWKS refresh failed; keeping the last good key set");
                Err(e)
            }
        }
    }

    async fn fetch_once(&self) -> Result<KeySet, JwksError> {
        let url = &self.inner.url;
        let fetch_err = |e: reqwest::Error| JwksError::Fetch { url: url.clone(), reason: e.to_string() };
        let mut resp =
            self.inner.client.get(url).header("accept", "application/json").send().await.map_err(fetch_err)?;
        if !resp.status().is_success() {
            return Err(JwksError::Status { url: url.clone(), status: resp.status().as_u16() });
        }
        if resp.content_length().is_some_and(|l| l > MAX_JWKS_LEN as u64) {
            return Err(JwksError::TooLarge);
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(fetch_err)? {
            if body.len() + chunk.len() > MAX_JWKS_LEN {
                return Err(JwksError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        let (set, skipped) = KeySet::from_jwks(&body, SecretKeys::Refuse)?;
        if skipped > 0 {
            tracing::debug!(url = %url, skipped, "JWKS keys skipped (unsupported)");
        }
        if set.is_empty() {
            return Err(JwksError::NoUsableKeys);
        }
        Ok(set)
    }

    /// Refreshes if the cache is older than `cache_ttl` (or was never fetched). Returns whether
    /// a fetch happened and succeeded.
    pub async fn refresh_if_stale(&self) -> Result<bool, JwksError> {
        let mut state = self.inner.fetch.lock().await;
        let fresh = state.last_success.is_some_and(|t| t.elapsed() < self.inner.config.cache_ttl);
        if fresh {
            return Ok(false);
        }
        self.fetch_locked(&mut state).await.map(|_| true)
    }

    /// How many successful fetches have replaced the cache so far.
    pub(crate) fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// Called when a token names a kid that no set knows. `seen` is [`RemoteJwks::generation`]
    /// from before the failed lookup. Returns true if the cache changed since then (by this call
    /// or a concurrent one), so verifying again may succeed. At most one fetch per
    /// `min_refresh_interval` is made for unknown kids.
    pub(crate) async fn refresh_for_unknown_kid(&self, seen: u64) -> bool {
        let mut state = self.inner.fetch.lock().await;
        if self.generation() != seen {
            return true;
        }
        let limited = state.last_kid_refresh.is_some_and(|t| t.elapsed() < self.inner.config.min_refresh_interval);
        if limited {
            self.inner.rate_limited.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        state.last_kid_refresh = Some(Instant::now());
        // A failure is logged inside and the last good set stays.
        self.fetch_locked(&mut state).await.is_ok()
    }

    /// Fetches if the cache is stale; returns how long until the next fetch is due (the rest of
    /// the TTL, or `min_refresh_interval` after a failure).
    async fn refresh_when_due(&self) -> Duration {
        let mut state = self.inner.fetch.lock().await;
        let ttl = self.inner.config.cache_ttl;
        if let Some(age) = state.last_success.map(|t| t.elapsed())
            && age < ttl
        {
            return ttl - age;
        }
        match self.fetch_locked(&mut state).await {
            Ok(_) => ttl,
            Err(_) => self.inner.config.min_refresh_interval,
        }
    }

    /// Keeps the cache fresh until `shutdown` completes: fetches when stale, retries failures
    /// every `min_refresh_interval`. Spawn it once per remote set.
    ///
    /// # Cancel safety
    /// Cancel-safe; dropping it stops the refreshing.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let wait = self.refresh_when_due().await;
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(wait.max(Duration::from_millis(100))) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_urls() {
        assert!(matches!(
            RemoteJwks::new("http://idp.example/jwks", RemoteJwksConfig::default()),
            Err(JwksError::NotHttps(_))
        ));
        assert!(RemoteJwks::new("not a url", RemoteJwksConfig::default()).is_err());
        let r = RemoteJwks::new("https://idp.example/jwks", RemoteJwksConfig::default()).expect("https url");
        assert!(r.keys().is_empty());
    }
}

//! ACME (RFC 8555): a node on a public name obtains a trusted certificate by itself and keeps it
//! fresh, swapping each new certificate into the node's [`CertResolver`] (HTTPS, WSS and QUIC
//! all serve from it), so new handshakes get the new certificate and open connections are never
//! touched.
//!
//! - Challenges: TLS-ALPN-01 (RFC 8737), answered by the resolver on the node's own port, or
//!   HTTP-01, answered from [`Http01Tokens`] at `/.well-known/acme-challenge/{token}` by the
//!   node's router and by the optional plain-HTTP listener ([`serve_http01`]).
//! - State (account key, certificate, key) is kept under [`AcmeConfig::state_dir`] (see
//!   `store.rs`), files 0600, written atomically; a stored certificate that is valid, covers the
//!   domains and is not due is served at start without contacting the server (rate limits).
//! - Renewal: when a third of the lifetime remains, minus a random jitter, or inside the
//!   server's ACME Renewal Information window when it offers one (`policy.rs`), asked right
//!   after each issue (and at start for a stored certificate) and again after the server's
//!   `Retry-After`; a renewal order then names the certificate it `replaces`. Failures are
//!   retried with capped exponential backoff while the old certificate keeps being served; the
//!   status ([`AcmeStatus`]) carries the expiry for metrics and the last error (with the ACME
//!   problem document) for logs and readiness.
//!
//! Not here: the node's flags and its readiness and metrics (the `gearmesh` crate), DNS-01.

mod challenge;
mod order;
mod policy;
mod store;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use challenge::{HTTP01_PREFIX, HTTP01_ROUTE, Http01Tokens, serve_http01};
pub use policy::{ARI_RECHECK_AFTER_ERROR, ARI_RECHECK_MAX, ARI_RECHECK_MIN, CertInfo, RenewPolicy};
pub use store::{ACCOUNT_FILE, CERT_FILE, KEY_FILE};

use crate::backoff::Backoff;
use crate::tls::{CertResolver, NodeCert, TlsError};
use store::{Store, StoredCert};

/// Let's Encrypt's production directory (the default).
pub const LETS_ENCRYPT_PRODUCTION: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory (untrusted certificates, generous rate limits).
pub const LETS_ENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

/// The challenge the node answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChallengeKind {
    /// TLS-ALPN-01 on the node's own port (which must be reachable on 443). The default.
    #[default]
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    /// HTTP-01 (the validation server connects to port 80: see [`serve_http01`]).
    #[serde(rename = "http-01")]
    Http01,
}

impl ChallengeKind {
    /// The RFC name (`tls-alpn-01`, `http-01`).
    pub fn as_str(self) -> &'static str {
        match self {
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
            ChallengeKind::Http01 => "http-01",
        }
    }
}

/// What the ACME client needs.
#[derive(Debug, Clone)]
pub struct AcmeConfig {
    /// The names to put in the certificate (the first one names its files).
    pub domains: Vec<String>,
    /// Contact addresses (`ops@example.com` becomes `mailto:ops@example.com`).
    pub contact: Vec<String>,
    /// The directory URL (default [`LETS_ENCRYPT_PRODUCTION`]).
    pub directory: String,
    /// A PEM root certificate trusted for the directory's own TLS (a private ACME server such as
    /// step-ca or Pebble); only its first certificate is used. Without it, the platform's roots.
    pub ca_root: Option<PathBuf>,
    /// The challenge to answer.
    pub challenge: ChallengeKind,
    /// Where the account and certificates are kept.
    pub state_dir: PathBuf,
    /// When to renew.
    pub renew: RenewPolicy,
    /// Delays between failed attempts (default 5 s doubling up to 1 h, half jittered).
    pub retry: Backoff,
    /// The longest one attempt (account, order, validation, download) may take.
    pub attempt_timeout: Duration,
}

impl AcmeConfig {
    /// A configuration with the defaults for `domains`, keeping state in `state_dir`.
    pub fn new(domains: Vec<String>, state_dir: PathBuf) -> Self {
        AcmeConfig {
            domains,
            contact: Vec::new(),
            directory: LETS_ENCRYPT_PRODUCTION.to_owned(),
            ca_root: None,
            challenge: ChallengeKind::default(),
            state_dir,
            renew: RenewPolicy::default(),
            retry: Backoff {
                initial: Duration::from_secs(5),
                max: Duration::from_secs(3600),
                multiplier: 2.0,
                jitter: 0.5,
                max_attempts: None,
            },
            attempt_timeout: Duration::from_secs(180),
        }
    }
}

// === errors ===

/// An ACME problem document (RFC 7807) as the server sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProblemDocument {
    /// The problem type, e.g. `urn:ietf:params:acme:error:rateLimited`.
    pub kind: Option<String>,
    /// The server's explanation.
    pub detail: Option<String>,
    /// The HTTP status.
    pub status: Option<u16>,
    /// Per-identifier problems, as text.
    pub subproblems: Vec<String>,
}

impl ProblemDocument {
    /// Whether the server says we are rate limited.
    pub fn is_rate_limited(&self) -> bool {
        self.kind.as_deref().is_some_and(|k| k.ends_with(":rateLimited"))
    }
}

impl From<instant_acme::Problem> for ProblemDocument {
    fn from(p: instant_acme::Problem) -> Self {
        ProblemDocument {
            kind: p.r#type.clone(),
            detail: p.detail.clone(),
            status: p.status,
            subproblems: p.subproblems.iter().map(ToString::to_string).collect(),
        }
    }
}

impl std::fmt::Display for ProblemDocument {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.detail.as_deref().unwrap_or("(no detail)"))?;
        if let Some(k) = &self.kind {
            write!(f, " [type {k}]")?;
        }
        if let Some(s) = self.status {
            write!(f, " [status {s}]")?;
        }
        for sub in &self.subproblems {
            write!(f, "; {sub}")?;
        }
        Ok(())
    }
}

/// Why an ACME attempt failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcmeError {
    /// The server refused, with a problem document (bad challenge answer, rate limit, ...).
    #[error("{during}: the ACME server said: {problem}")]
    Problem {
        /// The step.
        during: &'static str,
        /// What the server said.
        problem: ProblemDocument,
    },
    /// The server could not be reached, or answered something unusable.
    #[error("{during}: {reason}")]
    Protocol {
        /// The step.
        during: &'static str,
        /// Why.
        reason: String,
    },
    /// The server could not validate a domain (it could not connect, or got the wrong answer).
    #[error("{} validation of {domain} failed: {problem}", kind.as_str())]
    ChallengeFailed {
        /// The domain.
        domain: String,
        /// The challenge.
        kind: ChallengeKind,
        /// What the validation server said.
        problem: ProblemDocument,
    },
    /// The server offers no challenge of the configured kind for a domain.
    #[error("the ACME server offers no {} challenge for {domain}", kind.as_str())]
    NoChallenge {
        /// The domain.
        domain: String,
        /// The configured challenge.
        kind: ChallengeKind,
    },
    /// The attempt took longer than [`AcmeConfig::attempt_timeout`].
    #[error("the ACME attempt took longer than {}s", .0.as_secs())]
    Timeout(Duration),
    /// A state file could not be read or written.
    #[error("ACME state {}: {source}", path.display())]
    Storage {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A certificate (stored or issued) is unusable.
    #[error("certificate: {0}")]
    Certificate(String),
    /// A key or certificate could not be made or loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The configuration cannot work (no domain, ...).
    #[error("ACME configuration: {0}")]
    Config(String),
}

impl AcmeError {
    fn from_acme(during: &'static str, e: instant_acme::Error) -> Self {
        match e {
            instant_acme::Error::Api(p) => AcmeError::Problem { during, problem: p.into() },
            other => AcmeError::Protocol { during, reason: other.to_string() },
        }
    }

    /// The problem document, when the server sent one.
    pub fn problem(&self) -> Option<&ProblemDocument> {
        match self {
            AcmeError::Problem { problem, .. } | AcmeError::ChallengeFailed { problem, .. } => Some(problem),
            AcmeError::Protocol { .. }
            | AcmeError::NoChallenge { .. }
            | AcmeError::Timeout(_)
            | AcmeError::Storage { .. }
            | AcmeError::Certificate(_)
            | AcmeError::Tls(_)
            | AcmeError::Config(_) => None,
        }
    }
}

// === status ===

/// Where the certificate stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AcmeState {
    /// No certificate yet: a self-signed placeholder is served and the node is not ready.
    Waiting,
    /// A valid certificate is served.
    Valid,
    /// The served certificate has expired (renewal kept failing).
    Expired,
}

/// The ACME client's status, for readiness, metrics and `/v1/node`.
#[derive(Debug, Clone, Serialize)]
pub struct AcmeStatus {
    /// Where the certificate stands.
    pub state: AcmeState,
    /// The domains.
    pub domains: Vec<String>,
    /// The served certificate's serial (hex), if any.
    pub serial: Option<String>,
    /// Its end of validity, in Unix seconds.
    pub not_after_unix: Option<u64>,
    /// When the next renewal is planned, in Unix seconds.
    pub renew_at_unix: Option<u64>,
    /// The server's suggested renewal window for the served certificate (ACME Renewal
    /// Information, RFC 9773), `[start, end]` in Unix seconds, when it offers one; a renewal
    /// that is not a retry is then planned inside it.
    pub ari_window_unix: Option<[u64; 2]>,
    /// Certificates issued by this process (0 after a restart that reused the stored one).
    pub issued: u64,
    /// Failed attempts by this process.
    pub failures: u64,
    /// The last failure, with the problem document when the server sent one; cleared on success.
    pub last_error: Option<String>,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl AcmeStatus {
    /// Seconds until the served certificate expires (negative once expired), if there is one.
    pub fn expiry_seconds(&self, now: SystemTime) -> Option<i64> {
        let end = self.not_after_unix?;
        let now = unix(now);
        Some(i64::try_from(end).unwrap_or(i64::MAX).saturating_sub(i64::try_from(now).unwrap_or(0)))
    }
}

// === the renewal plan ===

/// The longest one renewal information request may take.
const ARI_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// When to renew the served certificate, and when to ask the server's renewal information
/// (ARI) again.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Uniform in `[0, 1)`, drawn once per certificate: where in the lifetime rule's jitter or in
    /// the ARI window to renew (the same window asked twice gives the same time).
    draw: f64,
    /// The lifetime rule's time (`None` when there is no certificate: order now).
    by_lifetime: Option<SystemTime>,
    /// The server's last suggested window for this certificate.
    window: Option<(SystemTime, SystemTime)>,
    /// Whether the server offers ARI (`renewalInfo` in its directory): decides `replaces`.
    ari_offered: bool,
    /// When to ask ARI again; `None` while retrying, or when the server offers no ARI.
    ari_check: Option<SystemTime>,
}

impl Plan {
    fn new(current: Option<&StoredCert>, policy: &RenewPolicy) -> Self {
        let draw = rand::random::<f64>();
        Plan {
            draw,
            by_lifetime: current.map(|c| policy.renew_at(&c.info, draw)),
            window: None,
            ari_offered: false,
            ari_check: None,
        }
    }

    /// Inside the server's window when there is one, else by lifetime; never before `now`
    /// for a window (a window in the past means "now").
    fn renew_at(&self, now: SystemTime) -> SystemTime {
        match (self.window, self.by_lifetime) {
            (Some((start, end)), _) => RenewPolicy::in_window(start, end, self.draw, now),
            (None, Some(at)) => at,
            (None, None) => now,
        }
    }
}

// === the manager ===

/// The ACME client of one node: created at start (it loads the stored certificate), then
/// [`Acme::spawn`]ed to keep the certificate fresh.
#[derive(Debug)]
pub struct Acme {
    config: AcmeConfig,
    store: Store,
    current: Option<StoredCert>,
    initial: NodeCert,
    http01: Http01Tokens,
    status: watch::Sender<AcmeStatus>,
}

impl Acme {
    /// Loads the stored certificate if it is still valid and covers the domains; otherwise the
    /// node starts with a self-signed placeholder (see [`Acme::initial_cert`]).
    ///
    /// # Errors
    /// No domain, an unreadable state directory, or a placeholder that cannot be made.
    pub fn new(config: AcmeConfig) -> Result<Self, AcmeError> {
        let Some(first) = config.domains.first() else {
            return Err(AcmeError::Config("at least one domain is needed (--acme-domain)".into()));
        };
        let store = Store::new(&config.state_dir, &config.directory, first);
        let now = SystemTime::now();
        let current = match store.read_cert() {
            Ok(Some(c)) if !c.info.covers(&config.domains) => {
                tracing::info!(have = ?c.info.names, want = ?config.domains, "the stored certificate does not cover the configured domains; ordering a new one");
                None
            }
            Ok(Some(c)) if c.info.expired_at(now) => {
                tracing::warn!(serial = %c.info.serial, "the stored certificate has expired; ordering a new one");
                None
            }
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "the stored certificate is unusable; ordering a new one");
                None
            }
        };
        let initial = match &current {
            Some(c) => {
                tracing::info!(serial = %c.info.serial, path = %store.cert_path().display(), expires_in_s = c.info.remaining_secs(now), "serving the stored ACME certificate");
                c.cert.clone()
            }
            None => {
                tracing::warn!(
                    domains = ?config.domains,
                    directory = %config.directory,
                    "DEGRADED: no ACME certificate yet; serving a self-signed placeholder (untrusted) until one is issued; /readyz reports not ready"
                );
                challenge::placeholder_cert(&config.domains)?
            }
        };
        let status = AcmeStatus {
            state: if current.is_some() { AcmeState::Valid } else { AcmeState::Waiting },
            domains: config.domains.clone(),
            serial: current.as_ref().map(|c| c.info.serial.clone()),
            not_after_unix: current.as_ref().map(|c| unix(c.info.not_after)),
            renew_at_unix: None,
            ari_window_unix: None,
            issued: 0,
            failures: 0,
            last_error: None,
        };
        let (status, _) = watch::channel(status);
        Ok(Acme { config, store, current, initial, http01: Http01Tokens::default(), status })
    }

    /// The certificate to serve from the start: the stored one, or the placeholder.
    pub fn initial_cert(&self) -> &NodeCert {
        &self.initial
    }

    /// The HTTP-01 answers, for the node's router and the plain-HTTP listener.
    pub fn http01(&self) -> Http01Tokens {
        self.http01.clone()
    }

    /// The live status.
    pub fn status(&self) -> watch::Receiver<AcmeStatus> {
        self.status.subscribe()
    }

    /// Where the certificate chain is stored.
    pub fn cert_path(&self) -> PathBuf {
        self.store.cert_path()
    }

    /// Keeps the certificate fresh until `shutdown`: orders now if there is none, else sleeps
    /// until renewal is due; swaps every new certificate into `resolver`.
    #[must_use = "the ACME driver does nothing unless spawned"]
    pub fn spawn(self, resolver: Arc<CertResolver>, shutdown: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(self.run(resolver, shutdown))
    }

    fn update(&self, f: impl FnOnce(&mut AcmeStatus)) {
        self.status.send_modify(f);
    }

    /// Asks the server's renewal information (ARI) for the served certificate and plans from
    /// it: inside the suggested window when there is one, else by lifetime. Returns when to
    /// renew; sets when to ask again.
    async fn ask_ari(&self, account: Option<&instant_acme::Account>, plan: &mut Plan) -> SystemTime {
        let now = SystemTime::now();
        plan.ari_check = None;
        let Some(cur) = &self.current else { return now };
        if cur.info.expired_at(now) {
            // RFC 9773 §4.3: no more questions about an expired certificate; renew by lifetime.
            return plan.renew_at(now);
        }
        let Some(account) = account else {
            // No account to ask with (the server was down at start, or none is stored): try
            // again later.
            plan.ari_check = Some(now + ARI_RECHECK_AFTER_ERROR);
            return plan.renew_at(now);
        };
        let answer = tokio::time::timeout(ARI_REQUEST_TIMEOUT, order::renewal_info(account, cur)).await;
        let answer = answer.unwrap_or_else(|_| order::Ari::Failed(format!("no answer within {ARI_REQUEST_TIMEOUT:?}")));
        match answer {
            order::Ari::Unsupported => {
                tracing::debug!("the ACME server offers no renewal information (ARI); renewing by lifetime");
                plan.ari_offered = false;
            }
            order::Ari::Window { start, end, retry_after } => {
                plan.ari_offered = true;
                plan.window = Some((start, end));
                let recheck = RenewPolicy::ari_recheck(retry_after);
                plan.ari_check = Some(now + recheck);
                let at = plan.renew_at(now);
                tracing::info!(
                    serial = %cur.info.serial,
                    window_start_unix = unix(start),
                    window_end_unix = unix(end),
                    renew_in_s = at.duration_since(now).unwrap_or_default().as_secs(),
                    ask_again_in_s = recheck.as_secs(),
                    "renewal planned in the ACME server's suggested window (ARI)"
                );
            }
            order::Ari::Failed(e) => {
                tracing::info!(error = %e, "ACME renewal information unavailable; keeping the last plan");
                plan.ari_offered = true;
                plan.ari_check = Some(now + ARI_RECHECK_AFTER_ERROR);
            }
        }
        let window = plan.window.map(|(s, e)| [unix(s), unix(e)]);
        self.update(|s| s.ari_window_unix = window);
        plan.renew_at(now)
    }

    /// The stored account, for asking ARI without an order (never creates one). Best effort: a
    /// server that is down or slow gives `None`.
    async fn load_account(&self) -> Option<instant_acme::Account> {
        // Only a stored one: no account is created just to ask.
        self.store.read_account().ok().flatten()?;
        let loaded = tokio::time::timeout(Duration::from_secs(30), order::account(&self.config, &self.store, false));
        match loaded.await {
            Ok(Ok(acc)) => Some(acc),
            Ok(Err(e)) => {
                tracing::info!(error = %e, "ACME server not reachable for renewal information; renewing by lifetime");
                None
            }
            Err(_) => {
                tracing::info!("ACME server slow for renewal information; renewing by lifetime");
                None
            }
        }
    }

    async fn run(mut self, resolver: Arc<CertResolver>, shutdown: CancellationToken) {
        let mut delays = self.config.retry.delays(rand::random());
        let mut account: Option<instant_acme::Account> = None;
        // Set when the server no longer knows the stored account (a reset test server, a
        // deactivated account): the next attempt registers a new one.
        let mut fresh_account = false;
        let mut plan = Plan::new(self.current.as_ref(), &self.config.renew);
        // With a stored certificate, ask the server for its renewal window (ARI) if it offers
        // one: that costs the directory and the stored account, never an order.
        if self.current.is_some() {
            account = self.load_account().await;
        }
        let mut renew_at = self.ask_ari(account.as_ref(), &mut plan).await;
        loop {
            self.update(|s| s.renew_at_unix = Some(unix(renew_at)));
            let now = SystemTime::now();
            if let Some(cur) = &self.current
                && cur.info.expired_at(now)
            {
                self.update(|s| s.state = AcmeState::Expired);
            }
            if renew_at > now {
                if plan.ari_check.is_some_and(|at| at <= now) {
                    // RFC 9773 §4.3: ask again after the server's Retry-After (clamped).
                    if account.is_none() {
                        account = self.load_account().await;
                    }
                    renew_at = self.ask_ari(account.as_ref(), &mut plan).await;
                    continue;
                }
                let wake = plan.ari_check.map_or(renew_at, |at| at.min(renew_at));
                let wait = wake.duration_since(now).unwrap_or_default().min(Duration::from_secs(3600));
                tokio::select! {
                    () = tokio::time::sleep(wait) => continue,
                    () = shutdown.cancelled() => return,
                }
            }
            let replaces = order::replaces(self.current.as_ref(), plan.ari_offered);
            let attempt = async {
                if account.is_none() {
                    account = Some(order::account(&self.config, &self.store, fresh_account).await?);
                }
                let Some(acc) = account.as_ref() else {
                    return Err(AcmeError::Config("no ACME account".into()));
                };
                order::issue(&self.config, acc, &resolver, &self.http01, replaces).await
            };
            let result = tokio::select! {
                r = tokio::time::timeout(self.config.attempt_timeout, attempt) => match r {
                    Ok(r) => r,
                    Err(_) => Err(AcmeError::Timeout(self.config.attempt_timeout)),
                },
                () = shutdown.cancelled() => return,
            };
            match result.and_then(|(chain, key, stored)| {
                self.store.write_cert(&chain, &key)?;
                Ok(stored)
            }) {
                Ok(stored) => {
                    fresh_account = false;
                    match stored.cert.certified_key() {
                        Ok(k) => resolver.swap(k),
                        Err(e) => {
                            tracing::error!(error = %e, "the issued certificate cannot be served");
                        }
                    }
                    tracing::info!(
                        serial = %stored.info.serial,
                        domains = ?self.config.domains,
                        expires_in_s = stored.info.remaining_secs(SystemTime::now()),
                        "ACME certificate issued and now served to new connections"
                    );
                    self.update(|s| {
                        s.state = AcmeState::Valid;
                        s.serial = Some(stored.info.serial.clone());
                        s.not_after_unix = Some(unix(stored.info.not_after));
                        s.ari_window_unix = None;
                        s.issued += 1;
                        s.last_error = None;
                    });
                    self.current = Some(stored);
                    delays = self.config.retry.delays(rand::random());
                    // RFC 9773 §4.3: ask the new certificate's renewal information right away.
                    let offered = plan.ari_offered;
                    plan = Plan::new(self.current.as_ref(), &self.config.renew);
                    plan.ari_offered = offered;
                    renew_at = self.ask_ari(account.as_ref(), &mut plan).await;
                }
                Err(e) => {
                    let rate_limited = e.problem().is_some_and(ProblemDocument::is_rate_limited);
                    let mut delay = delays.next().unwrap_or(self.config.retry.max);
                    if rate_limited {
                        delay = self.config.retry.max;
                    }
                    self.log_failure(&e, delay);
                    let text = e.to_string();
                    self.update(|s| {
                        s.failures += 1;
                        s.last_error = Some(text);
                    });
                    // Retry after the delay (the loop sees renewal is still due); ARI is not
                    // asked while retrying.
                    renew_at = SystemTime::now() + delay;
                    plan.ari_check = None;
                    if let Some(p) = e.problem() {
                        // A refused account or order may be stale state on the server: start over.
                        account = None;
                        fresh_account = p.kind.as_deref().is_some_and(|k| k.ends_with(":accountDoesNotExist"));
                    }
                }
            }
        }
    }

    fn log_failure(&self, e: &AcmeError, retry_in: Duration) {
        let retry_in_s = retry_in.as_secs();
        match &self.current {
            None => tracing::error!(
                error = %e,
                retry_in_s,
                "DEGRADED: could not obtain an ACME certificate; still serving the placeholder"
            ),
            Some(cur) => {
                let now = SystemTime::now();
                let left = cur.info.remaining_secs(now);
                let warn_at = RenewPolicy::warn_at(self.config.renew.renew_at(&cur.info, 0.0), &cur.info);
                if cur.info.expired_at(now) {
                    tracing::error!(error = %e, retry_in_s, serial = %cur.info.serial, "ACME renewal failed and the served certificate has EXPIRED");
                } else if now >= warn_at {
                    tracing::error!(error = %e, retry_in_s, expires_in_s = left, "ACME renewal keeps failing and the certificate expires soon");
                } else {
                    tracing::warn!(error = %e, retry_in_s, expires_in_s = left, "ACME renewal failed; the current certificate is still served");
                }
            }
        }
    }
}

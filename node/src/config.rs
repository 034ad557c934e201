//! Node configuration: one plain struct with defaults, loadable from TOML.
//!
//! Precedence, highest first: command-line flags, `GEARMESH_*` environment variables (handled by
//! the CLI, one per flag), the `--config` TOML file, then the defaults below. Every flag has a key
//! here; unknown keys are errors, so a typo never silently falls back to a default.

use std::{
    net::SocketAddr,
    num::NonZeroUsize,
    path::{Path, PathBuf},
    time::Duration,
};

use gearmesh_transport::acme::ChallengeKind;
use serde::{Deserialize, Serialize};

/// How logs are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, for terminals.
    #[default]
    Pretty,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The whole configuration of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// The node's human-readable name (defaults to `node-<short id>`).
    pub name: Option<String>,
    /// The one address the node listens on (HTTP API, WebSocket interface, mesh links).
    pub listen: SocketAddr,
    /// Seed URLs of an existing mesh to join (`wss://host:port`, `quic://host:port`).
    pub seeds: Vec<String>,
    /// Built-in gears to host (see `docs/gears.md`).
    pub gears: Vec<String>,
    /// Log format.
    pub log_format: LogFormat,
    /// Run without authentication (development only; logged loudly).
    pub insecure_dev: bool,
    /// HTTP limits.
    pub http: HttpConfig,
    /// Call deadlines and queues.
    pub calls: CallsConfig,
    /// TLS for the listening port and for links to other nodes.
    pub tls: TlsConfig,
    /// Mesh links and membership.
    pub mesh: MeshLinksConfig,
    /// Token authentication: key sources, audience, issuers, gear permissions (`[auth]`).
    pub auth: gearmesh_auth::AuthConfig,
    /// The WebSocket interface at `/v1/mesh` (observers, drivers, external gears).
    pub interface: InterfaceConfig,
    /// The default strategy of calls to a gear that name none, by gear (`[strategies]`, e.g.
    /// `kv = "shard"`, the built-in default for `kv`; see `docs/strategies.md`).
    pub strategies: std::collections::BTreeMap<String, String>,
    /// Pipeline definitions (TOML or JSON files) defined at start (see `docs/pipelines.md`).
    pub pipelines: Vec<PathBuf>,
    /// Retries, the retry budget and circuit breakers (`[resilience]`, see `docs/strategies.md`).
    pub resilience: ResilienceSettings,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            name: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            seeds: Vec::new(),
            gears: Vec::new(),
            log_format: LogFormat::Pretty,
            insecure_dev: false,
            http: HttpConfig::default(),
            calls: CallsConfig::default(),
            tls: TlsConfig::default(),
            mesh: MeshLinksConfig::default(),
            auth: gearmesh_auth::AuthConfig::default(),
            strategies: std::collections::BTreeMap::new(),
            pipelines: Vec::new(),
            resilience: ResilienceSettings::default(),
            interface: InterfaceConfig::default(),
        }
    }
}

/// Retries, the retry budget and circuit breakers (`[resilience]`; the defaults are the mesh's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResilienceSettings {
    /// Attempts per call at most, the first included (1: never retry).
    pub max_attempts: u32,
    /// The first retry waits up to this long (full jitter), doubling for each further retry.
    pub backoff_base_ms: u64,
    /// A retry never waits longer than this.
    pub backoff_cap_ms: u64,
    /// Retries allowed per call, node-wide (0.1: retries add at most 10% load, plus the floor).
    pub retry_budget_ratio: f64,
    /// Retries allowed per second whatever the traffic.
    pub retry_budget_per_second: f64,
    /// The window a breaker measures failures over.
    pub breaker_window_ms: u64,
    /// A breaker never opens on fewer calls than this in its window.
    pub breaker_min_calls: u32,
    /// A breaker opens when at least this share (0 to 1) of its window's calls failed.
    pub breaker_failure_ratio: f64,
    /// How long an open breaker waits before letting probes through.
    pub breaker_open_ms: u64,
    /// Probe calls let through while half-open.
    pub breaker_probes: u32,
    /// How long one attempt of a remote call may take before it is given up and, where a
    /// retry is allowed, made again on another replica (0: no bound but the call's deadline).
    /// A call's own `per_try_timeout_ms` wins.
    pub per_try_timeout_ms: u64,
    /// How long a spread call to a port that may be retried waits for its first attempt
    /// before it sends a second to another replica, keeping both (0: no hedging). A call's
    /// own `hedge_ms` wins.
    pub hedge_ms: u64,
}

impl Default for ResilienceSettings {
    fn default() -> Self {
        let r = gearmesh_mesh::ResilienceConfig::default();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self {
            max_attempts: r.max_attempts,
            backoff_base_ms: ms(r.backoff_base),
            backoff_cap_ms: ms(r.backoff_cap),
            retry_budget_ratio: r.budget.ratio,
            retry_budget_per_second: r.budget.min_per_sec,
            breaker_window_ms: ms(r.breaker.window),
            breaker_min_calls: r.breaker.min_calls,
            breaker_failure_ratio: r.breaker.failure_ratio,
            breaker_open_ms: ms(r.breaker.open_for),
            breaker_probes: r.breaker.probes,
            per_try_timeout_ms: r.per_try_timeout.map_or(0, ms),
            hedge_ms: r.hedge_after.map_or(0, ms),
        }
    }
}

impl ResilienceSettings {
    /// The mesh driver's settings with these applied.
    pub fn to_mesh(&self) -> gearmesh_mesh::ResilienceConfig {
        let d = gearmesh_mesh::ResilienceConfig::default();
        gearmesh_mesh::ResilienceConfig {
            max_attempts: self.max_attempts,
            backoff_base: Duration::from_millis(self.backoff_base_ms),
            backoff_cap: Duration::from_millis(self.backoff_cap_ms),
            budget: gearmesh_mesh::breaker::BudgetConfig {
                ratio: self.retry_budget_ratio,
                min_per_sec: self.retry_budget_per_second,
                ..d.budget
            },
            breaker: gearmesh_mesh::breaker::BreakerConfig {
                window: Duration::from_millis(self.breaker_window_ms),
                min_calls: self.breaker_min_calls,
                failure_ratio: self.breaker_failure_ratio,
                open_for: Duration::from_millis(self.breaker_open_ms),
                probes: self.breaker_probes,
                ..d.breaker
            },
            per_try_timeout: (self.per_try_timeout_ms > 0).then(|| Duration::from_millis(self.per_try_timeout_ms)),
            hedge_after: (self.hedge_ms > 0).then(|| Duration::from_millis(self.hedge_ms)),
            ..d
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| Err(ConfigError::Invalid { key, reason: reason.into() });
        if self.max_attempts == 0 {
            return invalid("resilience.max_attempts", "must be at least 1 (1: never retry)");
        }
        if !(0.0..=1.0).contains(&self.breaker_failure_ratio) {
            return invalid("resilience.breaker_failure_ratio", "must be between 0 and 1");
        }
        if !(self.retry_budget_ratio >= 0.0 && self.retry_budget_per_second >= 0.0) {
            return invalid("resilience.retry_budget_ratio", "budgets must not be negative");
        }
        if self.breaker_window_ms == 0 || self.breaker_open_ms == 0 || self.breaker_probes == 0 {
            return invalid("resilience.breaker_window_ms", "breaker window, open time and probes must be > 0");
        }
        if self.backoff_base_ms > self.backoff_cap_ms {
            return invalid("resilience.backoff_base_ms", "must not exceed resilience.backoff_cap_ms");
        }
        Ok(())
    }
}

/// Limits and rates of the WebSocket interface (`docs/interface.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InterfaceConfig {
    /// Clients connected at once, at most; one more gets `503` before the upgrade.
    pub max_clients: usize,
    /// Stream messages a client may fall behind before it is sent `lagged` and a fresh snapshot.
    pub buffer: usize,
    /// The largest message a client may send; a larger one closes the connection (1009).
    pub max_message_bytes: usize,
    /// How long a client that did not authenticate in the upgrade request has to send `auth`.
    pub auth_timeout_ms: u64,
    /// How often every node publishes its stats to nodes with observers, in milliseconds.
    pub stats_interval_ms: u64,
    /// Call traces each node samples per second, at most, while some observer wants them.
    pub traces_per_second: u32,
    /// Requests (calls, publishes) one client may have in flight; more are refused `overloaded`.
    pub max_requests: usize,
    /// Calls to one client's gears in flight at once; more are refused `overloaded`.
    pub max_served_calls: usize,
    /// Topics one client may subscribe to.
    pub max_topics: usize,
}

impl Default for InterfaceConfig {
    fn default() -> Self {
        Self {
            max_clients: 16_384,
            buffer: 1024,
            max_message_bytes: 1024 * 1024,
            auth_timeout_ms: 10_000,
            stats_interval_ms: 2_000,
            traces_per_second: 50,
            max_requests: 256,
            max_served_calls: 1024,
            max_topics: 64,
        }
    }
}

/// Where the node's certificate comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// A certificate issued at start by the development CA kept in `tls.data_dir` (created on
    /// first use); nodes sharing that directory trust each other. The default.
    #[default]
    Dev,
    /// The PEM certificate chain and key in `tls.cert` and `tls.key`.
    Pem,
    /// No TLS at all: plain `http://` and `ws://` links. Only with `insecure_dev`.
    Off,
    /// A certificate obtained and renewed from an ACME server (Let's Encrypt by default) for
    /// `tls.acme_domains`, kept in `tls.data_dir` (see `docs/acme.md`).
    Acme,
}

/// TLS settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Where the certificate comes from.
    pub mode: TlsMode,
    /// The certificate chain (PEM), for `mode = "pem"`.
    pub cert: Option<PathBuf>,
    /// The private key (PEM), for `mode = "pem"`.
    pub key: Option<PathBuf>,
    /// CA certificates (PEM) trusted when dialing other nodes, besides the development CA in
    /// `dev` mode; in `pem` mode without it, the public web PKI is trusted.
    pub ca: Option<PathBuf>,
    /// The node's state directory: the development CA, and in `acme` mode the ACME account and
    /// certificates under `acme/` (default `$XDG_DATA_HOME/gearmesh`, else
    /// `~/.local/share/gearmesh`).
    pub data_dir: Option<PathBuf>,
    /// `acme` mode: the names to obtain a certificate for (at least one).
    pub acme_domains: Vec<String>,
    /// `acme` mode: the contact address given to the ACME server.
    pub acme_email: Option<String>,
    /// `acme` mode: the directory URL (default: Let's Encrypt production, or staging with
    /// `acme_staging`).
    pub acme_directory: Option<String>,
    /// `acme` mode: use Let's Encrypt's staging directory (untrusted certificates, for trials).
    pub acme_staging: bool,
    /// `acme` mode: a PEM root certificate to trust for the ACME server's own TLS (a private ACME
    /// server such as step-ca or Pebble).
    pub acme_ca_root: Option<PathBuf>,
    /// `acme` mode: the challenge answered, `tls-alpn-01` (on the listening port, the default)
    /// or `http-01`.
    pub acme_challenge: ChallengeKind,
    /// `acme` mode: a plain-HTTP address (e.g. `0.0.0.0:80`) that answers HTTP-01 challenges and
    /// redirects everything else to HTTPS.
    pub acme_http_listen: Option<SocketAddr>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            mode: TlsMode::Dev,
            cert: None,
            key: None,
            ca: None,
            data_dir: None,
            acme_domains: Vec::new(),
            acme_email: None,
            acme_directory: None,
            acme_staging: false,
            acme_ca_root: None,
            acme_challenge: ChallengeKind::TlsAlpn01,
            acme_http_listen: None,
        }
    }
}

impl TlsConfig {
    /// The ACME directory URL this configuration uses.
    pub fn acme_directory_url(&self) -> String {
        match (&self.acme_directory, self.acme_staging) {
            (Some(url), _) => url.clone(),
            (None, true) => gearmesh_transport::acme::LETS_ENCRYPT_STAGING.to_owned(),
            (None, false) => gearmesh_transport::acme::LETS_ENCRYPT_PRODUCTION.to_owned(),
        }
    }
}

/// The transport a node prefers for the links it dials ([`MeshLinksConfig::dial`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DialTransport {
    /// WebSocket over TLS (TCP): works wherever HTTPS does.
    #[default]
    Wss,
    /// QUIC (UDP): no head-of-line blocking between calls; needs `mesh.quic` and TLS.
    Quic,
}

/// The name of a mesh whose nodes set none (`[mesh] name`, `--mesh-name`).
pub const DEFAULT_MESH_NAME: &str = "default";

/// Whether `name` may name a mesh: 1 to 64 ASCII letters, digits, `-`, `_` and `.`.
fn is_mesh_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Mesh link settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeshLinksConfig {
    /// The mesh's name (default [`DEFAULT_MESH_NAME`]): a node links only to nodes of the same
    /// name (checked in the hello, before the link starts), so two meshes that trust one CA (a
    /// development CA, a company CA) never merge through an address one of them still redials.
    /// Up to 64 letters, digits, `-`, `_` and `.`.
    pub name: String,
    /// The host name or address other nodes dial this node at (default: the listening address,
    /// or `localhost` when that is unspecified).
    pub advertise_host: Option<String>,
    /// Also accept and dial QUIC links on the same port number over UDP (needs TLS).
    pub quic: bool,
    /// The transport this node dials other nodes over when they offer both (`wss`, the
    /// default, or `quic`); the other is tried when a dial fails. Seeds are dialed as written.
    pub dial: DialTransport,
    /// Accept no links and advertise no address: for a node behind NAT or a firewall. It joins by
    /// dialing its seeds and is reached through the nodes it links to.
    pub no_listen: bool,
    /// A node dials out until it has this many direct links (or links to every node when the
    /// mesh is no bigger than `max_links + 1`); the rest are reached through others.
    pub min_links: usize,
    /// Most direct links kept after pruning; more are closed, and the mesh routes around them.
    pub max_links: usize,
    /// Link connections (handshaking or established) accepted at once; more are refused.
    pub max_connections: usize,
    /// Frames queued per link for sending. When full, a call or a reply waits for room (a reply
    /// at most until its caller's deadline, a reply switched for another node up to 2 s) and a
    /// best-effort frame (an event, another frame switched for other nodes) is dropped and
    /// counted.
    pub send_queue: usize,
    /// Calls within `shortcut_window_ms` to a node reached through switches that make this node
    /// open a direct shortcut link to it (kept while used, not counted in `max_links`); 0 never.
    pub shortcut_calls: u32,
    /// The window `shortcut_calls` are counted in.
    pub shortcut_window_ms: u64,
    /// A call, reply or event this node would switch after it has crossed this many links is
    /// not passed on (a call is answered `unavailable`): loops while routes settle end there.
    /// 0: this node switches nothing for other nodes.
    pub max_hops: u8,
}

impl Default for MeshLinksConfig {
    fn default() -> Self {
        Self {
            name: DEFAULT_MESH_NAME.to_owned(),
            advertise_host: None,
            quic: true,
            dial: DialTransport::Wss,
            no_listen: false,
            min_links: 6,
            max_links: 8,
            max_connections: 1024,
            send_queue: gearmesh_transport::LinkConfig::default().send_queue,
            shortcut_calls: gearmesh_mesh::ShortcutPolicy::default().calls,
            shortcut_window_ms: u64::try_from(gearmesh_mesh::ShortcutPolicy::default().window.as_millis())
                .unwrap_or(u64::MAX),
            max_hops: gearmesh_mesh::MeshConfig::default().max_hops,
        }
    }
}

/// HTTP limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// The largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// The most HTTP connections served at once; more wait in the kernel's accept backlog.
    pub max_connections: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self { max_body_bytes: 1024 * 1024, max_connections: 10_000 }
    }
}

/// Call deadlines and queue bounds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallsConfig {
    /// The deadline of a call when neither the caller nor the port sets one, in milliseconds.
    pub default_timeout_ms: u64,
    /// The cap on every call's deadline, in milliseconds.
    pub max_timeout_ms: u64,
    /// How long a shutdown waits for calls in flight, in milliseconds.
    pub drain_timeout_ms: u64,
    /// Events queued per local listener before new ones are dropped for it.
    pub listener_queue: NonZeroUsize,
}

impl Default for CallsConfig {
    fn default() -> Self {
        Self {
            default_timeout_ms: 30_000,
            max_timeout_ms: 300_000,
            drain_timeout_ms: 10_000,
            listener_queue: NonZeroUsize::new(1024).unwrap_or(NonZeroUsize::MIN),
        }
    }
}

impl CallsConfig {
    /// The drain timeout as a duration.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}

/// A configuration file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has a wrong or unknown key (the message names it).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message, naming the key and line.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid config: {key}: {reason}")]
    Invalid {
        /// The key at fault.
        key: &'static str,
        /// Why.
        reason: String,
    },
}

impl NodeConfig {
    /// Reads a TOML file.
    ///
    /// # Errors
    /// The file is unreadable, not TOML, has an unknown key, or a value out of range.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse { path: path.display().to_string(), message },
            other => other,
        })
    }

    /// Parses TOML text.
    ///
    /// # Errors
    /// Not TOML, an unknown key, or a value out of range.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let c: Self = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: "<text>".into(), message: e.to_string().trim().to_owned() })?;
        c.validate()?;
        Ok(c)
    }

    /// Checks value ranges.
    ///
    /// # Errors
    /// The first key out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = |key, v: u64| {
            if v == 0 { Err(ConfigError::Invalid { key, reason: "must be greater than 0".into() }) } else { Ok(()) }
        };
        positive("calls.default_timeout_ms", self.calls.default_timeout_ms)?;
        positive("calls.max_timeout_ms", self.calls.max_timeout_ms)?;
        positive("http.max_body_bytes", self.http.max_body_bytes as u64)?;
        positive("http.max_connections", self.http.max_connections as u64)?;
        positive("mesh.max_links", self.mesh.max_links as u64)?;
        positive("mesh.send_queue", self.mesh.send_queue as u64)?;
        positive("mesh.min_links", self.mesh.min_links as u64)?;
        positive("mesh.shortcut_window_ms", self.mesh.shortcut_window_ms)?;
        positive("mesh.max_connections", self.mesh.max_connections as u64)?;
        positive("interface.max_clients", self.interface.max_clients as u64)?;
        positive("interface.buffer", self.interface.buffer as u64)?;
        positive("interface.max_message_bytes", self.interface.max_message_bytes as u64)?;
        positive("interface.auth_timeout_ms", self.interface.auth_timeout_ms)?;
        positive("interface.stats_interval_ms", self.interface.stats_interval_ms)?;
        positive("interface.max_requests", self.interface.max_requests as u64)?;
        positive("interface.max_served_calls", self.interface.max_served_calls as u64)?;
        if self.mesh.dial == DialTransport::Quic && (!self.mesh.quic || self.tls.mode == TlsMode::Off) {
            return Err(ConfigError::Invalid {
                key: "mesh.dial",
                reason: "\"quic\" needs mesh.quic on and TLS (QUIC is always encrypted)".into(),
            });
        }
        if !is_mesh_name(&self.mesh.name) {
            return Err(ConfigError::Invalid {
                key: "mesh.name",
                reason: format!("{:?}: 1 to 64 letters, digits, '-', '_' and '.'", self.mesh.name),
            });
        }
        if self.mesh.min_links > self.mesh.max_links {
            return Err(ConfigError::Invalid {
                key: "mesh.min_links",
                reason: format!("must not exceed mesh.max_links ({})", self.mesh.max_links),
            });
        }
        self.resilience.validate()?;
        if self.tls.mode == TlsMode::Off && !self.insecure_dev {
            return Err(ConfigError::Invalid {
                key: "tls.mode",
                reason: "\"off\" (plaintext) is allowed only together with insecure_dev".into(),
            });
        }
        if self.tls.mode == TlsMode::Off && !self.listen.ip().is_loopback() {
            return Err(ConfigError::Invalid {
                key: "tls.mode",
                reason: format!(
                    "\"off\" (plaintext) serves only on loopback, and listen is {}: keep TLS (\"dev\" needs no setup) \
                     or listen on 127.0.0.1 or [::1]",
                    self.listen
                ),
            });
        }
        if self.tls.mode == TlsMode::Pem && (self.tls.cert.is_none() || self.tls.key.is_none()) {
            return Err(ConfigError::Invalid {
                key: "tls.cert",
                reason: "\"pem\" mode needs tls.cert and tls.key".into(),
            });
        }
        if self.tls.mode == TlsMode::Acme {
            if self.tls.acme_domains.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "tls.acme_domains",
                    reason: "\"acme\" mode needs at least one domain (--acme-domain)".into(),
                });
            }
            if let Some(bad) = self.tls.acme_domains.iter().find(|d| !is_dns_name(d)) {
                return Err(ConfigError::Invalid {
                    key: "tls.acme_domains",
                    reason: format!("{bad:?} is not a DNS name (ACME certificates here are for names, not addresses)"),
                });
            }
            if self.tls.acme_challenge == ChallengeKind::Http01 && self.tls.acme_http_listen.is_none() {
                tracing::info!(
                    "ACME HTTP-01 without tls.acme_http_listen: port 80 must reach this node some other way (a proxy)"
                );
            }
        }
        if self.calls.default_timeout_ms > self.calls.max_timeout_ms {
            return Err(ConfigError::Invalid {
                key: "calls.default_timeout_ms",
                reason: format!("must not exceed calls.max_timeout_ms ({})", self.calls.max_timeout_ms),
            });
        }
        for (gear, s) in &self.strategies {
            if let Err(e) = s.parse::<gearmesh_gears::Strategy>() {
                return Err(ConfigError::Invalid { key: "strategies", reason: format!("{gear}: {}", e.message()) });
            }
        }
        Ok(())
    }
}

/// A plausible DNS name: letters, digits, hyphens and dots, no empty label, not an IP address.
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.parse::<std::net::IpAddr>().is_err()
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_partial_files_keep_them() {
        NodeConfig::default().validate().expect("defaults are valid");
        let c = NodeConfig::from_toml("name = \"a\"\n[http]\nmax_body_bytes = 10\n").expect("valid");
        assert_eq!(c.name.as_deref(), Some("a"));
        assert_eq!(c.http.max_body_bytes, 10);
        assert_eq!(c.calls, CallsConfig::default());
    }

    #[test]
    fn resilience_settings_reach_the_mesh_and_bad_ones_name_their_key() {
        let c = NodeConfig::from_toml("[resilience]\nmax_attempts = 1\nbreaker_min_calls = 5\nbreaker_open_ms = 250\n")
            .expect("valid");
        let r = c.resilience.to_mesh();
        assert_eq!((r.max_attempts, r.breaker.min_calls), (1, 5));
        assert_eq!(r.breaker.open_for, Duration::from_millis(250));
        assert_eq!(ResilienceSettings::default().to_mesh(), gearmesh_mesh::ResilienceConfig::default());
        assert_eq!(r.per_try_timeout, None, "no per-try bound unless set");
        let c = NodeConfig::from_toml("[resilience]\nper_try_timeout_ms = 750\n").expect("valid");
        assert_eq!(c.resilience.to_mesh().per_try_timeout, Some(Duration::from_millis(750)));
        assert_eq!(r.hedge_after, None, "no hedging unless set");
        let c = NodeConfig::from_toml("[resilience]\nhedge_ms = 40\n").expect("valid");
        assert_eq!(c.resilience.to_mesh().hedge_after, Some(Duration::from_millis(40)));
        let e = NodeConfig::from_toml("[resilience]\nbreaker_failure_ratio = 1.5\n").expect_err("ratio");
        assert!(e.to_string().contains("resilience.breaker_failure_ratio"), "{e}");
        let e = NodeConfig::from_toml("[resilience]\nmax_attempts = 0\n").expect_err("attempts");
        assert!(e.to_string().contains("resilience.max_attempts"), "{e}");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = NodeConfig::from_toml("lisen = \"1.2.3.4:5\"").expect_err("typo");
        assert!(e.to_string().contains("lisen"), "{e}");
        let e = NodeConfig::from_toml("[calls]\ndefault_timeout_ms = \"soon\"").expect_err("type");
        assert!(e.to_string().contains("default_timeout_ms"), "{e}");
        let e = NodeConfig::from_toml("[calls]\nmax_timeout_ms = 0").expect_err("range");
        assert!(e.to_string().contains("calls.max_timeout_ms"), "{e}");
    }

    #[test]
    fn a_mesh_name_is_a_short_plain_word() {
        assert_eq!(NodeConfig::default().mesh.name, DEFAULT_MESH_NAME);
        let c = NodeConfig::from_toml("[mesh]\nname = \"prod-eu.1_b\"").expect("valid");
        assert_eq!(c.mesh.name, "prod-eu.1_b");
        for bad in ["", "two words", "naïve", &"x".repeat(65)] {
            let e = NodeConfig::from_toml(&format!("[mesh]\nname = {bad:?}")).expect_err("invalid");
            assert!(e.to_string().contains("mesh.name"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn plaintext_is_for_development_on_loopback_only() {
        let off = |listen: &str| format!("insecure_dev = true\nlisten = {listen:?}\n[tls]\nmode = \"off\"");
        for listen in ["127.0.0.1:7070", "127.0.0.2:0", "[::1]:7070"] {
            NodeConfig::from_toml(&off(listen)).unwrap_or_else(|e| panic!("{listen}: {e}"));
        }
        for listen in ["0.0.0.0:7070", "[::]:7070", "192.0.2.7:7070"] {
            let e = NodeConfig::from_toml(&off(listen)).expect_err("not loopback");
            assert!(e.to_string().contains("tls.mode") && e.to_string().contains("loopback"), "{listen}: {e}");
        }
        let e = NodeConfig::from_toml("[tls]\nmode = \"off\"").expect_err("no insecure_dev");
        assert!(e.to_string().contains("insecure_dev"), "{e}");
    }

    #[test]
    fn dialing_over_quic_needs_quic_and_tls() {
        assert_eq!(NodeConfig::default().mesh.dial, DialTransport::Wss);
        let c = NodeConfig::from_toml("[mesh]\ndial = \"quic\"").expect("valid");
        assert_eq!(c.mesh.dial, DialTransport::Quic);
        let e = NodeConfig::from_toml("[mesh]\ndial = \"quic\"\nquic = false").expect_err("no quic");
        assert!(e.to_string().contains("mesh.dial"), "{e}");
        let e = NodeConfig::from_toml("[mesh]\ndial = \"tcp\"").expect_err("unknown");
        assert!(e.to_string().contains("dial"), "{e}");
    }

    #[test]
    fn acme_needs_domains_that_are_names() {
        let e = NodeConfig::from_toml("[tls]\nmode = \"acme\"").expect_err("no domain");
        assert!(e.to_string().contains("tls.acme_domains"), "{e}");
        let e = NodeConfig::from_toml("[tls]\nmode = \"acme\"\nacme_domains = [\"10.0.0.1\"]").expect_err("ip");
        assert!(e.to_string().contains("not a DNS name"), "{e}");
        let c = NodeConfig::from_toml(
            "[tls]\nmode = \"acme\"\nacme_domains = [\"a.example\"]\nacme_challenge = \"http-01\"\nacme_staging = true",
        )
        .expect("valid");
        assert_eq!(c.tls.acme_challenge, ChallengeKind::Http01);
        assert_eq!(c.tls.acme_directory_url(), gearmesh_transport::acme::LETS_ENCRYPT_STAGING);
        assert_eq!(TlsConfig::default().acme_directory_url(), gearmesh_transport::acme::LETS_ENCRYPT_PRODUCTION);
    }
}

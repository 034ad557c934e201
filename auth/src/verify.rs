//! Token verification: [`Verifier`] checks a compact JWS against the configured keys and claims
//! rules and yields an [`Identity`].
//!
//! Order of checks, cheapest and most hostile first: size limit (before any parsing), structure
//! and base64url, header JSON, `alg` (`none` and unknown algorithms refused before any crypto),
//! key selection by `kid` with the key's pinned algorithm, signature, then claims (`exp`
//! required; `nbf` and `iat` with leeway; `iss` and `aud` when configured).
//!
//! [`Verifier::verify`] is synchronous and does no I/O: keys from a [`crate::RemoteJwks`] are
//! read from its cache. [`Verifier::verify_with_refresh`] additionally refreshes remote key sets
//! (rate-limited) when a token names an unknown kid, then retries once.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use serde::Deserialize;

use crate::{Algorithm, AuthError, Claims, Identity, KeySet, Permission, RemoteJwks, VerifyKey, error::sanitize};

/// The default limit on a token's length, in bytes.
pub const DEFAULT_MAX_TOKEN_LEN: usize = 8 * 1024;

/// How tokens are checked beyond their signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifierConfig {
    /// Clock skew tolerated on `exp`, `nbf` and `iat`. Default 30 s.
    pub leeway: Duration,
    /// When set, `iss` must equal one of these.
    pub issuers: Vec<String>,
    /// When set, `aud` must contain this value (the mesh's audience).
    pub audience: Option<String>,
    /// Tokens longer than this are refused before parsing. Default [`DEFAULT_MAX_TOKEN_LEN`].
    pub max_token_len: usize,
}

impl Default for VerifierConfig {
    fn default() -> Self {
        VerifierConfig {
            leeway: Duration::from_secs(30),
            issuers: Vec::new(),
            audience: None,
            max_token_len: DEFAULT_MAX_TOKEN_LEN,
        }
    }
}

impl VerifierConfig {
    /// Requires `aud` to contain `audience`.
    pub fn with_audience(mut self, audience: impl Into<String>) -> Self {
        self.audience = Some(audience.into());
        self
    }

    /// Requires `iss` to be `issuer` (may be called several times to allow several).
    pub fn with_issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuers.push(issuer.into());
        self
    }
}

/// Verifies tokens. Cheap to clone (shared state behind an `Arc`); share one per node.
#[derive(Debug, Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    keys: KeySet,
    remotes: Vec<RemoteJwks>,
    config: VerifierConfig,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

/// Seconds since the Unix epoch, from the system clock.
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn is_b64url(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Verifier {
    /// A verifier over static keys (key files, local JWKS).
    pub fn new(keys: KeySet, config: VerifierConfig) -> Self {
        Self::with_remotes(keys, Vec::new(), config)
    }

    /// A verifier over static keys plus remote JWKS sources.
    pub fn with_remotes(keys: KeySet, remotes: Vec<RemoteJwks>, config: VerifierConfig) -> Self {
        Verifier { inner: Arc::new(Inner { keys, remotes, config }) }
    }

    /// The configuration.
    pub fn config(&self) -> &VerifierConfig {
        &self.inner.config
    }

    /// The static keys (for `/.well-known/jwks.json`: `verifier.keys().public_jwks()`).
    pub fn keys(&self) -> &KeySet {
        &self.inner.keys
    }

    /// Verifies `token` now (system clock). No I/O.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        self.verify_at(token, unix_now())
    }

    /// Verifies `token` at `now` (seconds since the Unix epoch). No I/O.
    pub fn verify_at(&self, token: &str, now: i64) -> Result<Identity, AuthError> {
        let remote_sets: Vec<Arc<KeySet>> = self.inner.remotes.iter().map(RemoteJwks::keys).collect();
        let sets: Vec<&KeySet> = std::iter::once(&self.inner.keys).chain(remote_sets.iter().map(|s| &**s)).collect();
        verify_with_sets(token, now, &sets, &self.inner.config)
    }

    /// Verifies `token` and checks that it grants `needed` (401 or 403 errors). No I/O.
    pub fn verify_for(&self, token: &str, needed: &Permission) -> Result<Identity, AuthError> {
        let id = self.verify(token)?;
        id.check(needed)?;
        Ok(id)
    }

    /// Checks a peer node's link token (the `Hello` frame): valid, `aud` contains
    /// `mesh_audience` (whatever [`VerifierConfig::audience`] says), and scope `mesh:link`.
    /// An empty token is [`AuthError::Missing`]. No I/O.
    pub fn verify_mesh_link(&self, token: &str, mesh_audience: &str) -> Result<Identity, AuthError> {
        let id = self.verify(token)?;
        let aud = id.claims().aud.as_ref().ok_or(AuthError::MissingClaim("aud"))?;
        if !aud.contains(mesh_audience) {
            return Err(AuthError::WrongAudience);
        }
        id.check(&Permission::MeshLink)?;
        Ok(id)
    }

    /// Like [`Verifier::verify`], but when the token names a kid that no key set knows, refreshes
    /// the remote JWKS sources (each rate-limited, see [`crate::RemoteJwksConfig`]) and tries
    /// once more. Without remote sources this is [`Verifier::verify`].
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping the future at worst abandons a refresh, leaving the last good set.
    pub async fn verify_with_refresh(&self, token: &str) -> Result<Identity, AuthError> {
        let seen: Vec<u64> = self.inner.remotes.iter().map(RemoteJwks::generation).collect();
        match self.verify(token) {
            Err(AuthError::UnknownKey { kid: Some(kid) }) if !self.inner.remotes.is_empty() => {
                let mut changed = false;
                for (remote, seen) in self.inner.remotes.iter().zip(seen) {
                    changed |= remote.refresh_for_unknown_kid(seen).await;
                }
                if changed { self.verify(token) } else { Err(AuthError::UnknownKey { kid: Some(kid) }) }
            }
            other => other,
        }
    }
}

/// The whole check, over a list of key sets (static first).
fn verify_with_sets(token: &str, now: i64, sets: &[&KeySet], config: &VerifierConfig) -> Result<Identity, AuthError> {
    if token.len() > config.max_token_len {
        return Err(AuthError::TooLarge { len: token.len(), limit: config.max_token_len });
    }
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    let mut parts = token.split('.');
    let (Some(h64), Some(p64), Some(s64), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(AuthError::Malformed("not three dot-separated parts"));
    };
    if !(is_b64url(h64) && is_b64url(p64) && is_b64url(s64)) || h64.is_empty() {
        return Err(AuthError::Malformed("not base64url"));
    }
    let header_bytes = B64.decode(h64).map_err(|_| AuthError::Malformed("header is not base64url"))?;
    let header: Header = serde_json::from_slice(&header_bytes)
        .map_err(|_| AuthError::Malformed("header is not a JSON object with alg"))?;
    let alg: Algorithm = header.alg.parse().map_err(|_| AuthError::AlgorithmNotAllowed(sanitize(&header.alg)))?;
    if header.crit.is_some() {
        return Err(AuthError::Malformed("unsupported crit header"));
    }
    if s64.is_empty() {
        return Err(AuthError::Malformed("empty signature"));
    }

    let signing_input = &token[..h64.len() + 1 + p64.len()];
    let key = select_key(sets, header.kid.as_deref(), alg, signing_input, s64)?;

    let payload = B64.decode(p64).map_err(|_| AuthError::Malformed("payload is not base64url"))?;
    let claims: Claims =
        serde_json::from_slice(&payload).map_err(|_| AuthError::Malformed("claims are not a valid JSON object"))?;
    tracing::trace!(kid = %key.kid(), alg = %alg, "token signature verified");
    check_claims(claims, now, config)
}

/// Picks the key for the token and checks the signature with it.
fn select_key<'a>(
    sets: &[&'a KeySet],
    kid: Option<&str>,
    alg: Algorithm,
    signing_input: &str,
    signature: &str,
) -> Result<&'a VerifyKey, AuthError> {
    let signature = B64.decode(signature).map_err(|_| AuthError::Malformed("signature is not base64url"))?;
    let check = |key: &VerifyKey| key.verify_signature(signing_input.as_bytes(), &signature);
    if let Some(kid) = kid {
        let key =
            sets.iter().find_map(|s| s.get(kid)).ok_or_else(|| AuthError::UnknownKey { kid: Some(sanitize(kid)) })?;
        if key.alg != alg {
            return Err(AuthError::AlgorithmNotAllowed(alg.to_string()));
        }
        return if check(key) { Ok(key) } else { Err(AuthError::BadSignature) };
    }
    // No kid: try the keys pinned to this algorithm (a node usually has one).
    let mut candidates = sets.iter().flat_map(|s| s.iter()).filter(|k| k.alg == alg).peekable();
    if candidates.peek().is_none() {
        let any_keys = sets.iter().any(|s| !s.is_empty());
        return Err(if any_keys {
            AuthError::AlgorithmNotAllowed(alg.to_string())
        } else {
            AuthError::UnknownKey { kid: None }
        });
    }
    candidates.take(16).find(|k| check(k)).ok_or(AuthError::BadSignature)
}

fn check_claims(claims: Claims, now: i64, config: &VerifierConfig) -> Result<Identity, AuthError> {
    let leeway = i64::try_from(config.leeway.as_secs()).unwrap_or(i64::MAX);
    let exp = claims.exp.ok_or(AuthError::MissingClaim("exp"))?;
    if now > exp.saturating_add(leeway) {
        return Err(AuthError::Expired);
    }
    if let Some(nbf) = claims.nbf
        && nbf > now.saturating_add(leeway)
    {
        return Err(AuthError::NotYetValid);
    }
    if let Some(iat) = claims.iat
        && iat > now.saturating_add(leeway)
    {
        return Err(AuthError::NotYetValid);
    }
    if !config.issuers.is_empty() {
        let iss = claims.iss.as_deref().ok_or(AuthError::MissingClaim("iss"))?;
        if !config.issuers.iter().any(|i| i == iss) {
            return Err(AuthError::WrongIssuer);
        }
    }
    if let Some(audience) = &config.audience {
        let aud = claims.aud.as_ref().ok_or(AuthError::MissingClaim("aud"))?;
        if !aud.contains(audience) {
            return Err(AuthError::WrongAudience);
        }
    }
    let scopes = claims.scopes();
    Ok(Identity::new(claims, scopes, exp))
}

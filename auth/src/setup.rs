//! From configuration to a ready [`Auth`]: the node's key sources (`--auth-key`, `--auth-jwks`,
//! `--node-token`, audience, issuers, gear permissions) loaded into a [`Verifier`], an optional
//! [`Issuer`] and the remote JWKS refreshers, so the node's wiring is a few lines.
//!
//! ```toml
//! [auth]
//! keys = ["/etc/gearmesh/mesh.key"]          # --auth-key (repeatable)
//! jwks = ["https://idp.example/certs"]       # --auth-jwks FILE or URL (repeatable)
//! audience = "mesh-a"                        # the mesh's audience
//! issuers = ["https://idp.example/realms/x"] # accepted iss (empty: not checked)
//! leeway_secs = 30
//!
//! [auth.gears]
//! orders = ["call:billing/charge"]
//! ```

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    Algorithm, DEFAULT_MAX_TOKEN_LEN, GearPolicy, IssueError, Issuer, JwksError, KeyError, KeySet, LoadedKey,
    NodeToken, RemoteJwks, RemoteJwksConfig, Verifier, VerifierConfig, load_key_file,
};

/// The `iss` of tokens a node signs with its own key (link tokens, `gearmesh token issue`).
/// When `issuers` are configured and the node has a signing key, this issuer is accepted too.
pub const LOCAL_ISSUER: &str = "gearmesh";

/// The `[auth]` section of the node's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Key files (`--auth-key`): secrets or PEM keys. The first secret or private key signs the
    /// node's own tokens.
    pub keys: Vec<PathBuf>,
    /// Forces the algorithm of secret key files (HS384/HS512); PEM keys must fit it.
    pub key_alg: Option<Algorithm>,
    /// JWKS sources (`--auth-jwks`): local files, or `https://` URLs of identity providers.
    pub jwks: Vec<String>,
    /// Extra CA certificates (PEM file) trusted for remote JWKS, besides the web PKI.
    pub jwks_ca: Option<PathBuf>,
    /// A token for this node when it has no signing key (`--node-token`).
    pub node_token: Option<PathBuf>,
    /// The mesh's audience: required in tokens when set, and always in link tokens.
    pub audience: Option<String>,
    /// Accepted issuers (empty: `iss` not checked).
    pub issuers: Vec<String>,
    /// Clock-skew leeway in seconds (default 30).
    pub leeway_secs: u64,
    /// Longest accepted token in bytes (default 8192).
    pub max_token_len: usize,
    /// Permissions of gears calling other gears.
    pub gears: GearPolicy,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            keys: Vec::new(),
            key_alg: None,
            jwks: Vec::new(),
            jwks_ca: None,
            node_token: None,
            audience: None,
            issuers: Vec::new(),
            leeway_secs: 30,
            max_token_len: DEFAULT_MAX_TOKEN_LEN,
            gears: GearPolicy::default(),
        }
    }
}

impl AuthConfig {
    /// Whether any key source is configured (if not, the node needs `--insecure-dev`).
    pub fn has_key_source(&self) -> bool {
        !self.keys.is_empty() || !self.jwks.is_empty()
    }
}

/// Why the auth configuration could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// No key file and no JWKS: nothing could verify a token.
    #[error("no key source configured (--auth-key or --auth-jwks)")]
    NoKeySource,
    /// A key file or local JWKS could not be loaded.
    #[error("auth key source {source_name}: {error}")]
    Key {
        /// The file or URL.
        source_name: String,
        /// What went wrong.
        error: KeyError,
    },
    /// A remote JWKS could not be set up.
    #[error("auth JWKS {0}")]
    Jwks(#[from] JwksError),
    /// A link token was needed but the node has neither a signing key nor a node token.
    #[error("no signing key and no --node-token: cannot prove this node to its peers")]
    NoLinkCredential,
    /// Minting a token failed.
    #[error("issuing a token: {0}")]
    Issue(#[from] IssueError),
}

/// The audience of link tokens in a mesh with no `audience` configured.
pub const DEFAULT_LINK_AUDIENCE: &str = "gearmesh-mesh";

/// Everything the node needs for authentication, loaded from an [`AuthConfig`].
#[derive(Debug, Clone)]
pub struct Auth {
    /// Verifies tokens on every interface.
    pub verifier: Verifier,
    /// Signs the node's own tokens, when it has a secret or private key.
    pub issuer: Option<Issuer>,
    /// The node's given token (`--node-token`), when it has one.
    pub node_token: Option<NodeToken>,
    /// The remote JWKS sources (spawn [`Auth::run_refreshers`]).
    pub remotes: Vec<RemoteJwks>,
    /// Permissions of gears calling gears.
    pub gears: GearPolicy,
    audience: Option<String>,
}

impl Auth {
    /// Loads every key source. Reads local files; does no network I/O (remote sets start empty:
    /// call [`Auth::refresh_remotes`] at start-up).
    pub fn load(config: &AuthConfig) -> Result<Self, SetupError> {
        if !config.has_key_source() {
            return Err(SetupError::NoKeySource);
        }
        let key_err =
            |source: &dyn std::fmt::Display, error| SetupError::Key { source_name: source.to_string(), error };
        let mut keys = KeySet::new();
        let mut issuer = None;
        for path in &config.keys {
            let loaded = load_key_file(path, config.key_alg).map_err(|e| key_err(&path.display(), e))?;
            keys.insert(loaded.verify_key().clone());
            if let (LoadedKey::Signing(key), None) = (&loaded, &issuer) {
                issuer = Some(Issuer::new(key.clone()).with_issuer(LOCAL_ISSUER));
            }
        }
        let extra_roots_pem = match &config.jwks_ca {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                key_err(&path.display(), KeyError::Io { path: path.display().to_string(), reason: e.to_string() })
            })?),
            None => None,
        };
        let mut remotes = Vec::new();
        for source in &config.jwks {
            if source.starts_with("https://") || source.starts_with("http://") {
                let remote_config =
                    RemoteJwksConfig { extra_roots_pem: extra_roots_pem.clone(), ..RemoteJwksConfig::default() };
                remotes.push(RemoteJwks::new(source, remote_config)?);
            } else {
                let set = KeySet::from_jwks_file(source).map_err(|e| key_err(source, e))?;
                for key in set.iter() {
                    keys.insert(key.clone());
                }
            }
        }
        let node_token = match &config.node_token {
            Some(path) => Some(NodeToken::from_file(path).map_err(|e| key_err(&path.display(), e))?),
            None => None,
        };
        // The node's own tokens carry `iss: gearmesh`; when issuers are checked (for an identity
        // provider), the node's own must still pass.
        let mut issuers = config.issuers.clone();
        if issuer.is_some() && !issuers.is_empty() && !issuers.iter().any(|i| i == LOCAL_ISSUER) {
            issuers.push(LOCAL_ISSUER.to_owned());
        }
        let verifier_config = VerifierConfig {
            leeway: Duration::from_secs(config.leeway_secs),
            issuers,
            audience: config.audience.clone(),
            max_token_len: config.max_token_len,
        };
        Ok(Auth {
            verifier: Verifier::with_remotes(keys, remotes.clone(), verifier_config),
            issuer,
            node_token,
            remotes,
            gears: config.gears.clone(),
            audience: config.audience.clone(),
        })
    }

    /// The document for `/.well-known/jwks.json`: the public keys, or `None` when the node has
    /// only secrets (then the endpoint should answer 404).
    pub fn jwks_document(&self) -> Option<serde_json::Value> {
        self.verifier.keys().has_public_keys().then(|| self.verifier.keys().public_jwks())
    }

    /// The token this node presents in its link `Hello`: freshly minted (subject `node:<id>`,
    /// scope `mesh:link`, [`Auth::link_audience`], living `ttl`) when it has a signing key, else
    /// the given `--node-token`.
    pub fn link_token(&self, node_id: &str, ttl: Duration) -> Result<String, SetupError> {
        match (&self.issuer, &self.node_token) {
            (Some(issuer), _) => Ok(issuer.mesh_link_token(node_id, self.link_audience(), ttl)?),
            (None, Some(token)) => Ok(token.as_str().to_owned()),
            (None, None) => Err(SetupError::NoLinkCredential),
        }
    }

    /// The mesh's audience, if configured.
    pub fn audience(&self) -> Option<&str> {
        self.audience.as_deref()
    }

    /// The audience link tokens are minted for and checked against: the mesh's audience, else
    /// [`DEFAULT_LINK_AUDIENCE`].
    pub fn link_audience(&self) -> &str {
        self.audience.as_deref().unwrap_or(DEFAULT_LINK_AUDIENCE)
    }

    /// Fetches every remote JWKS once (start-up). Failures are returned but are not fatal: the
    /// refreshers retry.
    pub async fn refresh_remotes(&self) -> Vec<JwksError> {
        let mut errors = Vec::new();
        for remote in &self.remotes {
            if let Err(e) = remote.refresh().await {
                errors.push(e);
            }
        }
        errors
    }

    /// Keeps every remote JWKS fresh until `shutdown` completes (spawn once).
    ///
    /// # Cancel safety
    /// Cancel-safe; dropping it stops the refreshing.
    pub async fn run_refreshers(&self, shutdown: impl Future<Output = ()>) {
        if self.remotes.is_empty() {
            return shutdown.await;
        }
        let runs = self.remotes.iter().map(|r| r.run(std::future::pending::<()>()));
        tokio::select! {
            () = shutdown => {}
            _ = futures_join_all(runs) => {}
        }
    }
}

/// Runs the futures concurrently to completion (without pulling in the `futures` crate).
async fn futures_join_all<F: Future<Output = ()>>(futs: impl Iterator<Item = F>) {
    let mut set = Vec::new();
    for f in futs {
        set.push(Box::pin(f));
    }
    std::future::poll_fn(|cx| {
        set.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if set.is_empty() { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Permission, keygen};

    #[test]
    fn load_from_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ed = keygen(Algorithm::EdDSA).expect("keygen");
        let hs = keygen(Algorithm::HS256).expect("keygen");
        let ed_path = dir.path().join("ed.pem");
        let hs_path = dir.path().join("hs.key");
        std::fs::write(&ed_path, &ed.contents).expect("write");
        std::fs::write(&hs_path, &hs.contents).expect("write");
        let toml_like = serde_json::json!({
            "keys": [ed_path, hs_path],
            "audience": "mesh-a",
            "gears": {"orders": ["call:billing/charge"]},
        });
        let config: AuthConfig = serde_json::from_value(toml_like).expect("config");
        let auth = Auth::load(&config).expect("load");
        assert_eq!(auth.verifier.keys().len(), 2);
        let jwks = auth.jwks_document().expect("public keys");
        assert_eq!(jwks["keys"].as_array().map(Vec::len), Some(1));
        let token = auth.link_token("n1", Duration::from_secs(60)).expect("link token");
        auth.verifier.verify_mesh_link(&token, "mesh-a").expect("valid link token");
        assert!(auth.gears.scopes_for("orders").allows(&Permission::call("billing", "charge")));

        // With an identity provider's issuer configured, the node's own link tokens still pass.
        let with_idp = AuthConfig { issuers: vec!["https://idp.example".into()], ..config.clone() };
        let auth = Auth::load(&with_idp).expect("load");
        let token = auth.link_token("n1", Duration::from_secs(60)).expect("link token");
        let id = auth.verifier.verify_mesh_link(&token, "mesh-a").expect("own token passes the iss check");
        assert_eq!(id.issuer(), Some(LOCAL_ISSUER));

        assert_eq!(Auth::load(&AuthConfig::default()).map(|_| ()), Err(SetupError::NoKeySource));
        let bad: Result<AuthConfig, _> = serde_json::from_value(serde_json::json!({"kyes": []}));
        assert!(bad.is_err(), "unknown keys are errors");
        let missing = AuthConfig { keys: vec![dir.path().join("nope")], ..AuthConfig::default() };
        assert!(matches!(Auth::load(&missing), Err(SetupError::Key { .. })));
    }
}

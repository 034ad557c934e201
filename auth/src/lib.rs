//! gearmesh authentication: JWT keys pinned to one algorithm, local and remote JWKS, claims
//! validation, and the scope model (`call:`, `publish:`, `observe`, `serve:`, `admin`,
//! `mesh:link`).
//!
//! This crate is a library with no server in it: the node wires [`Verifier`] into its HTTP
//! middleware, WebSocket upgrade and link handshake, and [`Issuer`] into `gearmesh token issue`.
//! The whole model is described in `docs/security.md`.
//!
//! # Wiring it into the node
//!
//! - Start-up: `let auth = Auth::load(&config.auth)?;` (no key source and no `--insecure-dev`:
//!   refuse to start), then `auth.refresh_remotes().await` (log failures) and spawn
//!   `auth.run_refreshers(shutdown)`.
//! - HTTP middleware: refuse `query_has_token(uri.query())`; then
//!   `bearer_from_authorization(headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()))` and
//!   `auth.verifier.verify_with_refresh(token).await`. On `Err(e)`: status
//!   `e.status().http_status()`, header `WWW-Authenticate: e.www_authenticate(None)`. Put the
//!   [`Identity`] in the request extensions; handlers call `identity.check(&Permission::call(gear,
//!   port))?` (403 on `Forbidden`).
//! - WebSocket: `WsProtocolOffer::parse(headers.get_all(SEC_WEBSOCKET_PROTOCOL))`; answer with
//!   `offer.selected_protocol()`; token from `offer.token`, else the first message through
//!   [`token_from_auth_message`]; close with `e.status().ws_close_code()` (4401/4403).
//! - Links: send `auth.link_token(node_id, ttl)?` in `Hello`; check the peer's with
//!   `auth.verifier.verify_mesh_link(token, auth.link_audience())`.
//! - Calls across the mesh: the `Call` frame carries `identity.subject()` and
//!   `identity.scopes().to_strings()`; the node running the port rebuilds them with
//!   [`Scopes::from_strs`] and checks [`Scopes::check`]. A gear calling a gear acts as
//!   `GearPolicy::principal(gear)` with `auth.gears.scopes_for(gear)`.
//! - `/.well-known/jwks.json`: `auth.jwks_document()` (404 when `None`).
//! - CLI: `keygen(alg)` writes `GeneratedKey::contents`; `token issue` is
//!   `load_key_file` + `Scopes::parse_strict` + `parse_ttl` +
//!   `Issuer::new(key).with_issuer(LOCAL_ISSUER).issue(..)`.
//!
//! ```
//! use std::time::Duration;
//! use gearmesh_auth::*;
//!
//! let key = keygen(Algorithm::EdDSA)?.key;            // or load_key_file("key.pem", None)?
//! let mut keys = KeySet::new();
//! keys.insert_signing(&key);
//! let verifier = Verifier::new(keys, VerifierConfig::default().with_audience("mesh-a"));
//!
//! let issuer = Issuer::new(key);
//! let req = TokenRequest::new("alice", Scopes::parse("call:billing/*"), Duration::from_secs(3600))
//!     .audience("mesh-a");
//! let token = issuer.issue(&req)?;
//!
//! let header = format!("Bearer {token}");
//! let id = verifier.verify(bearer_from_authorization(Some(&header))?)?;
//! assert_eq!(id.subject(), "alice");
//! id.check(&Permission::call("billing", "charge"))?;
//! assert!(id.check(&Permission::Admin).is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod algorithm;
mod bearer;
mod claims;
mod der;
mod error;
mod issue;
mod jwks;
mod key;
mod node_token;
mod policy;
mod remote;
mod scope;
mod setup;
mod verify;

pub use algorithm::{Algorithm, UnsupportedAlgorithm};
pub use bearer::{
    WS_BEARER_PREFIX, WS_PROTOCOL, WsProtocolOffer, bearer_from_authorization, query_has_token, token_from_auth_message,
};
pub use claims::{Audience, Claims, Identity, ScpClaim};
pub use error::{AuthError, AuthStatus, KeyError};
pub use issue::{IssueError, Issuer, TokenRequest, parse_ttl};
pub use jwks::{KeySet, MAX_JWKS_KEYS, MAX_JWKS_LEN, SecretKeys};
pub use key::{GeneratedKey, KeyId, LoadedKey, MIN_SECRET_LEN, SigningKey, VerifyKey, keygen, load_key, load_key_file};
pub use node_token::NodeToken;
pub use policy::{GearPolicy, InvalidScope};
pub use remote::{JwksError, RemoteJwks, RemoteJwksConfig, RemoteJwksStats};
pub use scope::{NamePattern, Permission, Scope, Scopes};
pub use setup::{Auth, AuthConfig, DEFAULT_LINK_AUDIENCE, LOCAL_ISSUER, SetupError};
pub use verify::{DEFAULT_MAX_TOKEN_LEN, Verifier, VerifierConfig, unix_now};

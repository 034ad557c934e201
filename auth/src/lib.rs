//! gearmesh authentication: JWT keys pinned to one algorithm, local and remote JWKS, claims
//! validation, and the scope model (`call:`, `publish:`, `observe`, `serve:`, `admin`,
//! `mesh:link`).
//!
//! This crate is a library with no server in it: the node wires [`Verifier`] into its HTTP
//! middleware, WebSocket upgrade and link handshake, and [`Issuer`] into `gearmesh token issue`.
//! The whole model is described in `docs/security.md`.
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
pub use issue::{IssueError, Issuer, TokenRequest};
pub use jwks::{KeySet, MAX_JWKS_KEYS, MAX_JWKS_LEN, SecretKeys};
pub use key::{GeneratedKey, KeyId, LoadedKey, MIN_SECRET_LEN, SigningKey, VerifyKey, keygen, load_key, load_key_file};
pub use node_token::NodeToken;
pub use policy::{GearPolicy, InvalidScope};
pub use remote::{JwksError, RemoteJwks, RemoteJwksConfig, RemoteJwksStats};
pub use scope::{NamePattern, Permission, Scope, Scopes};
pub use setup::{Auth, AuthConfig, SetupError};
pub use verify::{DEFAULT_MAX_TOKEN_LEN, Verifier, VerifierConfig, unix_now};

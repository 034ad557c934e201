//! Errors: why a token was refused ([`AuthError`]) and why a key could not be loaded ([`KeyError`]).
//!
//! No error message or `Debug` output ever contains a token or secret bytes: the variants carry
//! only short, sanitized facts (an algorithm name, a key id, the missing scope).

use crate::scope::Permission;

/// The HTTP status class of an [`AuthError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthStatus {
    /// 401: no usable credentials; the caller should obtain a (new) token.
    Unauthorized,
    /// 403: the credentials are fine but do not grant the operation.
    Forbidden,
}

impl AuthStatus {
    /// The HTTP status code (401 or 403).
    pub const fn http_status(self) -> u16 {
        match self {
            AuthStatus::Unauthorized => 401,
            AuthStatus::Forbidden => 403,
        }
    }

    /// The WebSocket close code for the gearmesh interface (4401 or 4403).
    pub const fn ws_close_code(self) -> u16 {
        match self {
            AuthStatus::Unauthorized => 4401,
            AuthStatus::Forbidden => 4403,
        }
    }
}

/// Why a request was not authenticated or not authorized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No token was presented.
    #[error("no bearer token")]
    Missing,
    /// The token is not a well-formed compact JWS (or its header/claims are not valid JSON).
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The token is larger than the configured limit; it was not parsed.
    #[error("token too large ({len} bytes, limit {limit})")]
    TooLarge {
        /// The token's length in bytes.
        len: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The header's `alg` is `none`, unknown, or not the algorithm the key is pinned to.
    #[error("algorithm {0:?} not allowed")]
    AlgorithmNotAllowed(String),
    /// No configured key matches the token's `kid` (or, without `kid`, its algorithm).
    #[error("unknown signing key {kid:?}")]
    UnknownKey {
        /// The `kid` from the header (sanitized, truncated), if any.
        kid: Option<String>,
    },
    /// The signature does not verify with the selected key.
    #[error("bad signature")]
    BadSignature,
    /// A required claim is absent (`exp` always; `iss`/`aud` when configured).
    #[error("missing claim {0}")]
    MissingClaim(&'static str),
    /// The token's `exp` is in the past (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// The token's `nbf` (or `iat`) is in the future (beyond the leeway).
    #[error("token not yet valid")]
    NotYetValid,
    /// The token's `aud` does not include this mesh's audience.
    #[error("wrong audience")]
    WrongAudience,
    /// The token's `iss` is not the configured issuer.
    #[error("wrong issuer")]
    WrongIssuer,
    /// The token is valid but its scopes do not grant the operation.
    #[error("missing scope for {needed}")]
    Forbidden {
        /// What the operation needed, in scope syntax (e.g. `call:billing/charge`).
        needed: Permission,
    },
}

impl AuthError {
    /// 401 (bad or missing token) or 403 (missing scope).
    pub fn status(&self) -> AuthStatus {
        match self {
            AuthError::Forbidden { .. } => AuthStatus::Forbidden,
            AuthError::Missing
            | AuthError::Malformed(_)
            | AuthError::TooLarge { .. }
            | AuthError::AlgorithmNotAllowed(_)
            | AuthError::UnknownKey { .. }
            | AuthError::BadSignature
            | AuthError::MissingClaim(_)
            | AuthError::Expired
            | AuthError::NotYetValid
            | AuthError::WrongAudience
            | AuthError::WrongIssuer => AuthStatus::Unauthorized,
        }
    }

    /// The RFC 6750 `error` code: `None` for a missing token (RFC 6750 §3.1 says to send no error
    /// code then), `invalid_token` for a bad one, `insufficient_scope` for a missing scope.
    pub fn oauth_error(&self) -> Option<&'static str> {
        match self {
            AuthError::Missing => None,
            AuthError::Forbidden { .. } => Some("insufficient_scope"),
            AuthError::Malformed(_)
            | AuthError::TooLarge { .. }
            | AuthError::AlgorithmNotAllowed(_)
            | AuthError::UnknownKey { .. }
            | AuthError::BadSignature
            | AuthError::MissingClaim(_)
            | AuthError::Expired
            | AuthError::NotYetValid
            | AuthError::WrongAudience
            | AuthError::WrongIssuer => Some("invalid_token"),
        }
    }

    /// The human-readable `error_description` (the `Display` text; never contains the token).
    pub fn description(&self) -> String {
        self.to_string()
    }

    /// The value of a `WWW-Authenticate` response header for this error, e.g.
    /// `Bearer error="invalid_token", error_description="token expired"`.
    ///
    /// `realm` is added when given. Quotes and backslashes in the description are escaped.
    pub fn www_authenticate(&self, realm: Option<&str>) -> String {
        let mut out = String::from("Bearer");
        let mut sep = " ";
        if let Some(realm) = realm {
            out.push_str(&format!("{sep}realm=\"{}\"", quote(realm)));
            sep = ", ";
        }
        if let Some(code) = self.oauth_error() {
            out.push_str(&format!("{sep}error=\"{code}\""));
            out.push_str(&format!(", error_description=\"{}\"", quote(&self.description())));
            if let AuthError::Forbidden { needed } = self {
                out.push_str(&format!(", scope=\"{}\"", quote(&needed.to_string())));
            }
        }
        out
    }
}

/// Escapes a string for an RFC 7230 quoted-string, dropping control characters.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() || !c.is_ascii() => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

/// Makes an attacker-controlled header string (a `kid`, an `alg`) safe to show in errors and logs.
pub(crate) fn sanitize(s: &str) -> String {
    s.chars().take(64).map(|c| if c.is_ascii_graphic() { c } else { '?' }).collect()
}

/// Why a key (file, PEM, JWK) could not be loaded or generated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key file could not be read.
    #[error("reading key file {path}: {reason}")]
    Io {
        /// The file's path.
        path: String,
        /// The I/O error text.
        reason: String,
    },
    /// A shared secret is shorter than [`crate::MIN_SECRET_LEN`] bytes.
    #[error("shared secret too short ({len} bytes, need at least {min})")]
    SecretTooShort {
        /// The secret's length.
        len: usize,
        /// The minimum.
        min: usize,
    },
    /// The PEM block or DER structure could not be parsed.
    #[error("invalid key encoding: {0}")]
    Encoding(&'static str),
    /// The key's type is not one gearmesh supports (e.g. a P-384 or Ed448 key).
    #[error("unsupported key type: {0}")]
    Unsupported(&'static str),
    /// The requested algorithm does not fit the key (e.g. HS512 for an EC key).
    #[error("algorithm {alg} does not fit a {kind} key")]
    AlgorithmMismatch {
        /// The requested algorithm.
        alg: crate::Algorithm,
        /// The key's kind.
        kind: &'static str,
    },
    /// The key is public only, but signing was asked for.
    #[error("a public key cannot sign")]
    NotASigningKey,
    /// A JWK or JWKS document is invalid.
    #[error("invalid JWK: {0}")]
    Jwk(String),
    /// The crypto library rejected the key material.
    #[error("key rejected by the crypto library: {0}")]
    Rejected(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn www_authenticate_forms() {
        assert_eq!(AuthError::Missing.www_authenticate(None), "Bearer");
        assert_eq!(
            AuthError::Expired.www_authenticate(Some("gearmesh")),
            "Bearer realm=\"gearmesh\", error=\"invalid_token\", error_description=\"token expired\""
        );
        let e = AuthError::UnknownKey { kid: Some(sanitize("a\"b\nc")) };
        let h = e.www_authenticate(None);
        assert!(h.contains("\\\"b?c"), "{h}");
        assert_eq!(e.status().http_status(), 401);
        assert_eq!(e.status().ws_close_code(), 4401);
    }
}

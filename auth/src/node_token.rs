//! A token given to a node instead of a key (`--node-token FILE`): the node presents it in its
//! link `Hello` frames but cannot mint tokens itself.

use std::{fmt, path::Path};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};

use crate::{Claims, DEFAULT_MAX_TOKEN_LEN, KeyError};

/// A token read from a file. `Debug` never shows the token.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeToken {
    token: String,
    subject: Option<String>,
    expires_at: Option<i64>,
}

impl fmt::Debug for NodeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeToken")
            .field("subject", &self.subject)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl NodeToken {
    /// Reads a token file (surrounding whitespace trimmed).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, KeyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| KeyError::Io { path: path.display().to_string(), reason: e.to_string() })?;
        Self::parse(text.trim())
    }

    /// Checks the token's shape and reads (without verifying: that is the peers' job) its `sub`
    /// and `exp`, so the node can report who it is and warn before it expires.
    pub fn parse(token: &str) -> Result<Self, KeyError> {
        if token.is_empty() || token.len() > DEFAULT_MAX_TOKEN_LEN {
            return Err(KeyError::Encoding("token is empty or too large"));
        }
        let mut parts = token.split('.');
        let (Some(_), Some(payload), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(KeyError::Encoding("token is not a compact JWS"));
        };
        let claims: Claims = B64
            .decode(payload)
            .ok()
            .and_then(|p| serde_json::from_slice(&p).ok())
            .ok_or(KeyError::Encoding("token claims are not JSON"))?;
        Ok(NodeToken { token: token.to_owned(), subject: claims.sub, expires_at: claims.exp })
    }

    /// The token text, to put in a `Hello` frame.
    pub fn as_str(&self) -> &str {
        &self.token
    }

    /// The unverified `sub` claim.
    pub fn subject(&self) -> Option<&str> {
        self.subject.as_deref()
    }

    /// The unverified `exp` claim.
    pub fn expires_at(&self) -> Option<i64> {
        self.expires_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_redact() {
        let payload = B64.encode(r#"{"sub":"node:a","exp":99}"#);
        let token = format!("eyJhbGciOiJIUzI1NiJ9.{payload}.c2ln");
        let t = NodeToken::parse(&token).expect("token");
        assert_eq!(t.subject(), Some("node:a"));
        assert_eq!(t.expires_at(), Some(99));
        assert!(!format!("{t:?}").contains(&payload));
        assert!(NodeToken::parse("a.b").is_err());
        assert!(NodeToken::parse("").is_err());
    }
}

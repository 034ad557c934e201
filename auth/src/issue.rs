//! Token issuing: [`Issuer`] signs tokens with a [`SigningKey`] (`gearmesh token issue`, and a
//! node's own short-lived `mesh:link` tokens).

use std::time::Duration;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};

use crate::{Audience, Claims, KeyError, Scopes, SigningKey, verify::unix_now};

/// Why a token could not be issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// The time-to-live is zero or does not fit a timestamp.
    #[error("invalid ttl")]
    InvalidTtl,
    /// The claims have no `exp`; gearmesh never issues tokens that do not expire.
    #[error("claims without exp")]
    NoExpiry,
    /// The signing operation failed.
    #[error("signing: {0}")]
    Signing(#[from] KeyError),
}

/// Parses a time-to-live such as `90s`, `15m`, `1h`, `7d` (or plain seconds, `3600`).
pub fn parse_ttl(text: &str) -> Result<Duration, IssueError> {
    let text = text.trim();
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = digits.parse().map_err(|_| IssueError::InvalidTtl)?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60).ok_or(IssueError::InvalidTtl)?,
        "h" => n.checked_mul(3600).ok_or(IssueError::InvalidTtl)?,
        "d" => n.checked_mul(86_400).ok_or(IssueError::InvalidTtl)?,
        _ => return Err(IssueError::InvalidTtl),
    };
    if secs == 0 {
        return Err(IssueError::InvalidTtl);
    }
    Ok(Duration::from_secs(secs))
}

/// What to put in a token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRequest {
    /// The subject (`sub`).
    pub subject: String,
    /// The scopes (written as the space-separated `scope` claim).
    pub scopes: Scopes,
    /// How long the token lives.
    pub ttl: Duration,
    /// The audience (`aud`), e.g. the mesh's name.
    pub audience: Option<String>,
}

impl TokenRequest {
    /// A request for `subject` with `scopes`, living `ttl`, no audience.
    pub fn new(subject: impl Into<String>, scopes: Scopes, ttl: Duration) -> Self {
        TokenRequest { subject: subject.into(), scopes, ttl, audience: None }
    }

    /// Sets the audience.
    pub fn audience(mut self, aud: impl Into<String>) -> Self {
        self.audience = Some(aud.into());
        self
    }
}

/// Signs tokens with one key; the header carries the key's `kid` and pinned `alg`.
#[derive(Debug, Clone)]
pub struct Issuer {
    key: SigningKey,
    issuer: Option<String>,
}

impl Issuer {
    /// An issuer signing with `key`, with no `iss` claim.
    pub fn new(key: SigningKey) -> Self {
        Issuer { key, issuer: None }
    }

    /// Sets the `iss` claim written into every token.
    pub fn with_issuer(mut self, iss: impl Into<String>) -> Self {
        self.issuer = Some(iss.into());
        self
    }

    /// The signing key.
    pub fn key(&self) -> &SigningKey {
        &self.key
    }

    /// Issues a token now (system clock).
    pub fn issue(&self, req: &TokenRequest) -> Result<String, IssueError> {
        self.issue_at(req, unix_now())
    }

    /// Issues a token as of `now` (seconds since the Unix epoch): `iat` = `now`, `exp` = `now +
    /// ttl`, a random `jti`.
    pub fn issue_at(&self, req: &TokenRequest, now: i64) -> Result<String, IssueError> {
        let ttl = i64::try_from(req.ttl.as_secs()).map_err(|_| IssueError::InvalidTtl)?;
        if ttl == 0 {
            return Err(IssueError::InvalidTtl);
        }
        let exp = now.checked_add(ttl).ok_or(IssueError::InvalidTtl)?;
        let claims = Claims {
            sub: Some(req.subject.clone()),
            exp: Some(exp),
            iat: Some(now),
            iss: self.issuer.clone(),
            aud: req.audience.clone().map(Audience::One),
            scope: Some(req.scopes.to_string()),
            jti: Some(random_jti()?),
            ..Claims::default()
        };
        self.sign_claims(&claims)
    }

    /// Signs arbitrary claims as they are (`exp` required; `iss` is not added).
    pub fn sign_claims(&self, claims: &Claims) -> Result<String, IssueError> {
        if claims.exp.is_none() {
            return Err(IssueError::NoExpiry);
        }
        let header = serde_json::json!({
            "alg": self.key.algorithm().as_str(),
            "typ": "JWT",
            "kid": self.key.kid().as_str(),
        });
        let payload = serde_json::to_vec(claims).map_err(|_| KeyError::Rejected("claims serialization"))?;
        let mut token = B64.encode(header.to_string());
        token.push('.');
        token.push_str(&B64.encode(payload));
        let signature = self.key.sign(token.as_bytes())?;
        token.push('.');
        token.push_str(&signature);
        Ok(token)
    }

    /// A node's own link token: subject `node:<node_id>`, scope `mesh:link`, audience `mesh`.
    pub fn mesh_link_token(&self, node_id: &str, mesh_audience: &str, ttl: Duration) -> Result<String, IssueError> {
        let req = TokenRequest::new(format!("node:{node_id}"), Scopes::from_iter([crate::Scope::MeshLink]), ttl)
            .audience(mesh_audience);
        self.issue(&req)
    }
}

fn random_jti() -> Result<String, KeyError> {
    use aws_lc_rs::rand::SecureRandom;
    let mut raw = [0u8; 16];
    aws_lc_rs::rand::SystemRandom::new().fill(&mut raw).map_err(|_| KeyError::Rejected("random source"))?;
    Ok(B64.encode(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_forms() {
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("7d"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_ttl("3600"), Ok(Duration::from_secs(3600)));
        for bad in ["", "0", "0h", "h", "1w", "-1h", "1.5h", "99999999999999999999d"] {
            assert_eq!(parse_ttl(bad), Err(IssueError::InvalidTtl), "{bad}");
        }
    }
}

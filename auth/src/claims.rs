//! Token claims ([`Claims`]) and the verified principal a request carries ([`Identity`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::scope::Scopes;

/// The `aud` claim: one string or an array of strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    /// `"aud": "mesh-a"`.
    One(String),
    /// `"aud": ["mesh-a", "api"]`.
    Many(Vec<String>),
}

impl Audience {
    /// Whether `aud` is (one of) the audience(s).
    pub fn contains(&self, aud: &str) -> bool {
        match self {
            Audience::One(a) => a == aud,
            Audience::Many(v) => v.iter().any(|a| a == aud),
        }
    }
}

/// The `scp` claim: an array (the usual form) or, leniently, a space-separated string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ScpClaim {
    /// `"scp": ["call:a", "observe"]`.
    List(Vec<String>),
    /// `"scp": "call:a observe"`.
    Text(String),
}

/// The claims of a token, as gearmesh reads and writes them.
///
/// Times are seconds since the Unix epoch. Claims gearmesh does not know are kept in `extra`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Claims {
    /// Subject: who the token is for (user, service, `node:<id>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Expiry (required on verification).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "numeric_date")]
    pub exp: Option<i64>,
    /// Not before.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "numeric_date")]
    pub nbf: Option<i64>,
    /// Issued at.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "numeric_date")]
    pub iat: Option<i64>,
    /// Issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Audience(s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
    /// Space-separated scopes (OAuth 2 style).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Scopes as an array (Azure AD / some providers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scp: Option<ScpClaim>,
    /// Token id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// Every other claim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// A NumericDate (RFC 7519 §2): an integer or, as some libraries write it, a float (truncated).
fn numeric_date<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    match Option::<serde_json::Number>::deserialize(d)? {
        None => Ok(None),
        Some(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Ok(Some(i)),
            (None, Some(f)) if f.is_finite() && f.abs() < 1e15 => Ok(Some(f as i64)),
            _ => Err(serde::de::Error::custom("invalid NumericDate")),
        },
    }
}

impl Claims {
    /// The scopes from `scope` and `scp` together (unknown ones skipped).
    pub fn scopes(&self) -> Scopes {
        let mut scopes = self.scope.as_deref().map(Scopes::parse).unwrap_or_default();
        match &self.scp {
            Some(ScpClaim::List(list)) => {
                scopes.extend(&Scopes::from_strs(list.iter().map(String::as_str)));
            }
            Some(ScpClaim::Text(text)) => scopes.extend(&Scopes::parse(text)),
            None => {}
        }
        scopes
    }
}

/// A verified caller: who it is and what it may do. Produced only by [`crate::Verifier`].
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    subject: String,
    scopes: Scopes,
    expires_at: i64,
    issuer: Option<String>,
    claims: Claims,
}

impl Identity {
    pub(crate) fn new(claims: Claims, scopes: Scopes, expires_at: i64) -> Self {
        Identity {
            subject: claims.sub.clone().unwrap_or_default(),
            scopes,
            expires_at,
            issuer: claims.iss.clone(),
            claims,
        }
    }

    /// The `sub` claim (empty if the token had none).
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The granted scopes.
    pub fn scopes(&self) -> &Scopes {
        &self.scopes
    }

    /// The `exp` claim, in seconds since the Unix epoch.
    pub fn expires_at(&self) -> i64 {
        self.expires_at
    }

    /// The `iss` claim, if any.
    pub fn issuer(&self) -> Option<&str> {
        self.issuer.as_deref()
    }

    /// All claims of the token.
    pub fn claims(&self) -> &Claims {
        &self.claims
    }

    /// `Ok` if the scopes grant `needed`, else [`crate::AuthError::Forbidden`].
    pub fn check(&self, needed: &crate::Permission) -> Result<(), crate::AuthError> {
        self.scopes.check(needed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_from_scope_and_scp() {
        let c: Claims = serde_json::from_str(
            r#"{"sub":"a","exp":1,"scope":"observe openid","scp":["call:x","admin"],"tenant":"t"}"#,
        )
        .expect("claims");
        assert_eq!(c.scopes().to_string(), "observe call:x admin");
        assert_eq!(c.extra.get("tenant"), Some(&serde_json::json!("t")));
        let c: Claims = serde_json::from_str(r#"{"aud":["a","b"],"scp":"observe"}"#).expect("claims");
        assert!(c.aud.as_ref().is_some_and(|a| a.contains("b")));
        assert_eq!(c.scopes().to_string(), "observe");
    }
}

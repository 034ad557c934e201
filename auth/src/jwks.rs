//! A set of verification keys by kid ([`KeySet`]), and JWK / JWKS documents (RFC 7517) in and out.
//!
//! Public keys are published at `/.well-known/jwks.json` with [`KeySet::public_jwks`]; shared
//! secrets are never published. JWKS documents from identity providers are read with
//! [`KeySet::from_jwks`]: keys gearmesh does not support (P-384, encryption keys) are skipped.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use serde::Deserialize;

use crate::{
    Algorithm, KeyError,
    key::{KeyId, PublicParams, SigningKey, VerifyKey},
};

/// The largest JWKS document accepted, in bytes.
pub const MAX_JWKS_LEN: usize = 256 * 1024;

/// The largest number of keys kept from one JWKS document.
pub const MAX_JWKS_KEYS: usize = 64;

/// Verification keys, looked up by kid. Cheap to clone behind an `Arc`.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: Vec<VerifyKey>,
}

/// One JWK's members, as far as gearmesh reads them.
#[derive(Debug, Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    k: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawJwks {
    keys: Vec<serde_json::Value>,
}

fn b64(field: &'static str, v: Option<&String>) -> Result<Vec<u8>, KeyError> {
    let v = v.ok_or_else(|| KeyError::Jwk(format!("missing {field}")))?;
    B64.decode(v.trim_end_matches('=')).map_err(|_| KeyError::Jwk(format!("{field} is not base64url")))
}

/// Whether JWK parsing may accept `oct` (shared-secret) keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretKeys {
    /// Accept `oct` keys (a local JWKS file the operator controls).
    Allow,
    /// Refuse them (a remote JWKS: a provider must never publish secrets).
    Refuse,
}

impl VerifyKey {
    /// Reads one JWK. The key is pinned to its `alg` member, or, when absent, to the only
    /// algorithm gearmesh uses with its type (EC P-256: ES256, OKP Ed25519: EdDSA, RSA: RS256).
    /// `oct` keys need an explicit `alg` and [`SecretKeys::Allow`]. Without `kid`, the kid is
    /// the RFC 7638 thumbprint.
    pub fn from_jwk(jwk: &serde_json::Value, secrets: SecretKeys) -> Result<Self, KeyError> {
        let raw: RawJwk = serde_json::from_value(jwk.clone()).map_err(|e| KeyError::Jwk(e.to_string()))?;
        if raw.use_.as_deref().is_some_and(|u| u != "sig") {
            return Err(KeyError::Unsupported("JWK not for signatures"));
        }
        let alg = match raw.alg.as_deref() {
            Some(a) => Some(a.parse::<Algorithm>().map_err(|_| KeyError::Unsupported("JWK alg"))?),
            None => None,
        };
        let kid = raw.kid.as_deref().map(KeyId::new);
        let (public, default_alg) = match (raw.kty.as_str(), raw.crv.as_deref()) {
            ("EC", Some("P-256")) => {
                (PublicParams::ec(&b64("x", raw.x.as_ref())?, &b64("y", raw.y.as_ref())?)?, Algorithm::ES256)
            }
            ("OKP", Some("Ed25519")) => (PublicParams::ed(&b64("x", raw.x.as_ref())?)?, Algorithm::EdDSA),
            ("RSA", _) => {
                (PublicParams::rsa(&b64("n", raw.n.as_ref())?, &b64("e", raw.e.as_ref())?)?, Algorithm::RS256)
            }
            ("oct", _) => {
                if secrets == SecretKeys::Refuse {
                    return Err(KeyError::Unsupported("shared secret in a remote JWKS"));
                }
                let alg = alg.ok_or(KeyError::Jwk("oct key without alg".into()))?;
                let secret = b64("k", raw.k.as_ref())?;
                let key = VerifyKey::from_secret(&secret, alg)?;
                return Ok(match kid {
                    Some(kid) => key.with_kid(kid),
                    None => key,
                });
            }
            _ => return Err(KeyError::Unsupported("JWK key type or curve")),
        };
        VerifyKey::from_public(alg.unwrap_or(default_alg), public, kid)
    }
}

impl KeySet {
    /// An empty set.
    pub fn new() -> Self {
        KeySet::default()
    }

    /// Adds a key, replacing any key with the same kid.
    pub fn insert(&mut self, key: VerifyKey) {
        self.keys.retain(|k| k.kid != key.kid);
        self.keys.push(key);
    }

    /// Adds the verification half of a signing key.
    pub fn insert_signing(&mut self, key: &SigningKey) {
        self.insert(key.verify_key().clone());
    }

    /// The key with this kid.
    pub fn get(&self, kid: &str) -> Option<&VerifyKey> {
        self.keys.iter().find(|k| k.kid.as_str() == kid)
    }

    /// All keys.
    pub fn iter(&self) -> impl Iterator<Item = &VerifyKey> {
        self.keys.iter()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Reads a JWKS document (`{"keys":[...]}`). Unsupported keys are skipped (their count is
    /// returned); at most [`MAX_JWKS_KEYS`] keys are kept.
    pub fn from_jwks(json: &[u8], secrets: SecretKeys) -> Result<(Self, usize), KeyError> {
        if json.len() > MAX_JWKS_LEN {
            return Err(KeyError::Jwk(format!("document larger than {MAX_JWKS_LEN} bytes")));
        }
        let raw: RawJwks = serde_json::from_slice(json).map_err(|e| KeyError::Jwk(e.to_string()))?;
        let mut set = KeySet::new();
        let mut skipped = 0;
        for jwk in &raw.keys {
            match VerifyKey::from_jwk(jwk, secrets) {
                Ok(key) if set.len() < MAX_JWKS_KEYS => set.insert(key),
                Ok(_) | Err(_) => skipped += 1,
            }
        }
        Ok((set, skipped))
    }

    /// Reads a local JWKS file (secrets allowed: the operator controls it).
    pub fn from_jwks_file(path: impl AsRef<std::path::Path>) -> Result<Self, KeyError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .map_err(|e| KeyError::Io { path: path.display().to_string(), reason: e.to_string() })?;
        Ok(KeySet::from_jwks(&bytes, SecretKeys::Allow)?.0)
    }

    /// The JWKS document of the public keys, for `/.well-known/jwks.json`. Shared secrets are
    /// never included.
    pub fn public_jwks(&self) -> serde_json::Value {
        let keys: Vec<_> = self.keys.iter().filter_map(VerifyKey::public_jwk).collect();
        serde_json::json!({ "keys": keys })
    }

    /// Whether any key is a key pair (so a JWKS endpoint is worth serving).
    pub fn has_public_keys(&self) -> bool {
        self.keys.iter().any(|k| !k.is_secret())
    }
}

impl FromIterator<VerifyKey> for KeySet {
    fn from_iter<T: IntoIterator<Item = VerifyKey>>(iter: T) -> Self {
        let mut set = KeySet::new();
        for k in iter {
            set.insert(k);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keygen;

    #[test]
    fn public_jwks_round_trip_without_secrets() {
        let es = keygen(Algorithm::ES256).expect("es");
        let ed = keygen(Algorithm::EdDSA).expect("ed");
        let hs = keygen(Algorithm::HS256).expect("hs");
        let set: KeySet = [&es, &ed, &hs].iter().map(|g| g.key.verify_key().clone()).collect();
        let jwks = set.public_jwks();
        let text = jwks.to_string();
        assert!(!text.contains(hs.contents.trim()));
        assert!(!text.contains("\"oct\""));
        let (back, skipped) = KeySet::from_jwks(text.as_bytes(), SecretKeys::Refuse).expect("parse");
        assert_eq!(skipped, 0);
        assert_eq!(back.len(), 2);
        for k in back.iter() {
            let orig = set.get(k.kid().as_str()).expect("same kid");
            assert_eq!(orig.algorithm(), k.algorithm());
        }
    }

    #[test]
    fn unsupported_keys_are_skipped() {
        let doc = br#"{"keys":[
            {"kty":"EC","crv":"P-384","x":"AA","y":"AA"},
            {"kty":"oct","alg":"HS256","k":"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY"},
            {"kty":"RSA","use":"enc","n":"AQAB","e":"AQAB"},
            {"kty":"OKP","crv":"Ed25519","alg":"ES256","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty":"OKP","crv":"Ed25519","kid":"ed1","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
        ]}"#;
        let (set, skipped) = KeySet::from_jwks(doc, SecretKeys::Refuse).expect("parse");
        assert_eq!((set.len(), skipped), (1, 4));
        assert_eq!(set.get("ed1").map(VerifyKey::algorithm), Some(Algorithm::EdDSA));
        let (set, skipped) = KeySet::from_jwks(doc, SecretKeys::Allow).expect("parse");
        assert_eq!((set.len(), skipped), (2, 3));
        assert!(KeySet::from_jwks(b"{", SecretKeys::Allow).is_err());
        // A point that is not on the curve is refused when the key is loaded, not at first use.
        let zero = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        let jwk = serde_json::json!({"kty": "EC", "crv": "P-256", "x": zero, "y": zero});
        assert!(matches!(VerifyKey::from_jwk(&jwk, SecretKeys::Refuse), Err(KeyError::Rejected(_))));
    }
}

//! Helpers shared by the auth integration tests: hand-made tokens for the hostile cases.

#![allow(dead_code, unreachable_pub)]

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};

/// A fixed "now" for deterministic tests (2026-11-01T00:00:00Z).
pub const NOW: i64 = 1_793_491_200;

/// `base64url(header).base64url(claims)`.
pub fn signing_input(header: &serde_json::Value, claims: &serde_json::Value) -> String {
    format!("{}.{}", B64.encode(header.to_string()), B64.encode(claims.to_string()))
}

/// A token with the given header and claims, HMAC-SHA256-signed with `secret` (any bytes: this
/// is how the confusion attack is made).
pub fn hs256_token(header: &serde_json::Value, claims: &serde_json::Value, secret: &[u8]) -> String {
    let input = signing_input(header, claims);
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    let tag = aws_lc_rs::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", B64.encode(tag.as_ref()))
}

/// A token with the given header and claims and an arbitrary (possibly empty) signature part.
pub fn unsigned_token(header: &serde_json::Value, claims: &serde_json::Value, sig: &str) -> String {
    format!("{}.{sig}", signing_input(header, claims))
}

/// Claims valid at [`NOW`] for an hour.
pub fn good_claims(scope: &str) -> serde_json::Value {
    serde_json::json!({"sub": "alice", "iat": NOW, "exp": NOW + 3600, "scope": scope})
}

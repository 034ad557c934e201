//! Fuzz target: every parser of untrusted input (key files, JWKS documents, node tokens, bearer
//! headers, WebSocket offers and auth messages, scopes) never panics.
#![no_main]

use gearmesh_auth::{
    KeySet, NodeToken, Scopes, SecretKeys, WsProtocolOffer, bearer_from_authorization, load_key, query_has_token,
    token_from_auth_message,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = load_key(data, None);
    let _ = KeySet::from_jwks(data, SecretKeys::Refuse);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = NodeToken::parse(text);
        let _ = bearer_from_authorization(Some(text));
        let _ = WsProtocolOffer::parse([text]);
        let _ = token_from_auth_message(text);
        let _ = query_has_token(text);
        let scopes = Scopes::parse(text);
        // Canonical forms re-parse to the same scopes.
        assert_eq!(Scopes::parse(&scopes.to_string()), scopes);
        let _ = Scopes::parse_strict(text);
    }
});

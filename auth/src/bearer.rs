//! Getting the token out of a request: the `Authorization: Bearer` header, the WebSocket
//! `Sec-WebSocket-Protocol` offer, or a first auth message; and spotting tokens put in a URL.
//!
//! WebSocket convention (browsers cannot set headers on a WebSocket): the client offers
//! `Sec-WebSocket-Protocol: gearmesh.v1, bearer.<jwt>`; the server answers with `gearmesh.v1`
//! only (never echoing the token). Or the client connects offering `gearmesh.v1` alone and sends
//! `{"type":"auth","token":"<jwt>"}` as its first text message. Tokens in the URL query are
//! refused: they end up in logs and browser history.

use serde::Deserialize;

use crate::AuthError;

/// The WebSocket subprotocol the gearmesh interface speaks (and the server selects).
pub const WS_PROTOCOL: &str = "gearmesh.v1";

/// Prefix of the subprotocol entry that carries a token: `bearer.<jwt>`.
pub const WS_BEARER_PREFIX: &str = "bearer.";

/// The token from an `Authorization` header value: `Bearer <token>` (scheme case-insensitive).
///
/// `None` (no header) gives [`AuthError::Missing`]; another scheme or an empty/garbled token gives
/// [`AuthError::Malformed`].
pub fn bearer_from_authorization(value: Option<&str>) -> Result<&str, AuthError> {
    let value = value.ok_or(AuthError::Missing)?.trim();
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::Malformed("authorization is not a Bearer token"))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Malformed("authorization is not a Bearer token"));
    }
    let token = token.trim_start();
    if token.is_empty() || token.contains(char::is_whitespace) {
        return Err(AuthError::Malformed("bearer token is empty or has spaces"));
    }
    Ok(token)
}

/// What a client offered in `Sec-WebSocket-Protocol`.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct WsProtocolOffer<'a> {
    /// The token from a `bearer.<jwt>` entry, if any.
    pub token: Option<&'a str>,
    /// Whether `gearmesh.v1` was offered (then the server must select it).
    pub gearmesh: bool,
}

impl std::fmt::Debug for WsProtocolOffer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsProtocolOffer")
            .field("token", &self.token.map(|_| "<redacted>"))
            .field("gearmesh", &self.gearmesh)
            .finish()
    }
}

impl<'a> WsProtocolOffer<'a> {
    /// Parses every `Sec-WebSocket-Protocol` header value of the upgrade request (each a
    /// comma-separated list).
    pub fn parse(header_values: impl IntoIterator<Item = &'a str>) -> Self {
        let mut offer = WsProtocolOffer::default();
        for entry in header_values.into_iter().flat_map(|v| v.split(',')).map(str::trim) {
            if entry == WS_PROTOCOL {
                offer.gearmesh = true;
            } else if let Some(token) = entry.strip_prefix(WS_BEARER_PREFIX)
                && !token.is_empty()
                && offer.token.is_none()
            {
                offer.token = Some(token);
            }
        }
        offer
    }

    /// The subprotocol the server should select in its answer (never the bearer entry).
    pub fn selected_protocol(&self) -> Option<&'static str> {
        self.gearmesh.then_some(WS_PROTOCOL)
    }
}

/// The first message of the WebSocket interface when the token is not in the offer:
/// `{"type":"auth","token":"<jwt>"}`.
#[derive(Deserialize)]
struct AuthMessage {
    #[serde(rename = "type")]
    kind: String,
    token: String,
}

/// The token from a first `{"type":"auth","token":"..."}` text message. `Err(Missing)` if the
/// message is some other message, `Malformed` if it is an auth message without a usable token.
pub fn token_from_auth_message(text: &str) -> Result<String, AuthError> {
    #[derive(Deserialize)]
    struct Kind {
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    let kind: Kind = serde_json::from_str(text).map_err(|_| AuthError::Missing)?;
    if kind.kind.as_deref() != Some("auth") {
        return Err(AuthError::Missing);
    }
    let msg: AuthMessage = serde_json::from_str(text).map_err(|_| AuthError::Malformed("auth message"))?;
    if msg.kind != "auth" || msg.token.is_empty() {
        return Err(AuthError::Malformed("auth message"));
    }
    Ok(msg.token)
}

/// Query parameter names that look like a credential; requests carrying one are refused.
const QUERY_TOKEN_NAMES: [&str; 5] = ["access_token", "token", "jwt", "id_token", "bearer"];

/// Whether a URL query string (without `?`) carries something that looks like a token. The node
/// refuses such requests (401) without logging the URL.
pub fn query_has_token(query: &str) -> bool {
    query.split('&').any(|pair| {
        let name = pair.split_once('=').map_or(pair, |(n, _)| n);
        QUERY_TOKEN_NAMES.iter().any(|t| name.eq_ignore_ascii_case(t))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorization_header() {
        assert_eq!(bearer_from_authorization(Some("Bearer abc.def.ghi")), Ok("abc.def.ghi"));
        assert_eq!(bearer_from_authorization(Some("bearer   abc")), Ok("abc"));
        assert_eq!(bearer_from_authorization(None), Err(AuthError::Missing));
        for bad in ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "Bearer a b", "abc"] {
            assert!(matches!(bearer_from_authorization(Some(bad)), Err(AuthError::Malformed(_))), "{bad}");
        }
    }

    #[test]
    fn websocket_offer() {
        let offer = WsProtocolOffer::parse(["gearmesh.v1, bearer.aaa.bbb.ccc"]);
        assert_eq!(offer.token, Some("aaa.bbb.ccc"));
        assert_eq!(offer.selected_protocol(), Some("gearmesh.v1"));
        assert!(!format!("{offer:?}").contains("aaa"));
        let offer = WsProtocolOffer::parse(["chat", "gearmesh.v1"]);
        assert_eq!(offer.token, None);
        assert!(offer.gearmesh);
        let offer = WsProtocolOffer::parse(["bearer."]);
        assert_eq!(offer.token, None);
        assert_eq!(offer.selected_protocol(), None);
    }

    #[test]
    fn auth_message() {
        assert_eq!(token_from_auth_message(r#"{"type":"auth","token":"t.u.v"}"#), Ok("t.u.v".to_owned()));
        assert_eq!(token_from_auth_message(r#"{"type":"call"}"#), Err(AuthError::Missing));
        assert_eq!(token_from_auth_message("nope"), Err(AuthError::Missing));
        assert!(matches!(token_from_auth_message(r#"{"type":"auth"}"#), Err(AuthError::Malformed(_))));
    }

    #[test]
    fn tokens_in_query() {
        assert!(query_has_token("a=1&access_token=xyz"));
        assert!(query_has_token("TOKEN=1"));
        assert!(!query_has_token("timeout_ms=100&tokens_used=3"));
        assert!(!query_has_token(""));
    }
}

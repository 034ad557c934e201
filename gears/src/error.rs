//! The one error type of every call, local or remote, with a stable machine-readable code.
//!
//! A [`CallError`] serializes the same way over every interface (HTTP, the WebSocket interface,
//! mesh frames): `{"code":"timeout","message":"..."}`, plus `"app_code"` for [`ErrorCode::App`].

use std::fmt;

use serde::{Deserialize, Serialize};

/// The stable, machine-readable class of a [`CallError`].
///
/// The string forms (`not_found`, `bad_request`, ...) are part of the wire protocol and never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The gear, port or topic does not exist anywhere reachable.
    NotFound,
    /// The request could not be decoded or is invalid for the port.
    BadRequest,
    /// The call's deadline passed before a reply arrived.
    Timeout,
    /// The gear exists but none of its replicas can be reached right now.
    Unavailable,
    /// A concurrency limit or a queue bound was hit; retry later or elsewhere.
    Overloaded,
    /// The caller's credentials are missing or invalid.
    Unauthorized,
    /// The caller is known but lacks the needed permission.
    Forbidden,
    /// A bug or an unexpected failure inside the callee (a panic, an unserializable reply).
    Internal,
    /// A port's own, application-level error; see [`CallError::app_code`].
    App,
}

impl ErrorCode {
    /// All codes, in declaration order.
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::NotFound,
        ErrorCode::BadRequest,
        ErrorCode::Timeout,
        ErrorCode::Unavailable,
        ErrorCode::Overloaded,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::Internal,
        ErrorCode::App,
    ];

    /// The wire form of the code, e.g. `"not_found"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Internal => "internal",
            ErrorCode::App => "app",
        }
    }

    /// Parses the wire form of a code.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// The HTTP status that fits the code (documented in `docs/api.md`).
    pub const fn http_status(self) -> u16 {
        match self {
            ErrorCode::NotFound => 404,
            ErrorCode::BadRequest => 400,
            ErrorCode::Timeout => 504,
            ErrorCode::Unavailable => 503,
            ErrorCode::Overloaded => 429,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::Internal => 500,
            ErrorCode::App => 422,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of a call: a stable [`ErrorCode`], a human-readable message, for
/// [`ErrorCode::App`] the port's own code, and whether the port surely did not run
/// ([`CallError::not_run`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallError {
    code: ErrorCode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    app_code: Option<String>,
    message: String,
    #[serde(default, skip_serializing_if = "is_false")]
    not_run: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

macro_rules! constructors {
    ($($(#[$doc:meta])* $name:ident => $code:ident,)*) => {
        $(
            $(#[$doc])*
            pub fn $name(message: impl Into<String>) -> Self {
                Self::new(ErrorCode::$code, message)
            }
        )*
    };
}

impl CallError {
    /// An error with the given code and message. For [`ErrorCode::App`] prefer [`CallError::app`].
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, app_code: None, message: message.into(), not_run: false }
    }

    /// A port's own error: `code` is the application's stable code, e.g. `"insufficient_funds"`.
    pub fn app(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self { code: ErrorCode::App, app_code: Some(code.into()), message: message.into(), not_run: false }
    }

    constructors! {
        /// [`ErrorCode::NotFound`].
        not_found => NotFound,
        /// [`ErrorCode::BadRequest`].
        bad_request => BadRequest,
        /// [`ErrorCode::Timeout`].
        timeout => Timeout,
        /// [`ErrorCode::Unavailable`].
        unavailable => Unavailable,
        /// [`ErrorCode::Overloaded`].
        overloaded => Overloaded,
        /// [`ErrorCode::Unauthorized`].
        unauthorized => Unauthorized,
        /// [`ErrorCode::Forbidden`].
        forbidden => Forbidden,
        /// [`ErrorCode::Internal`].
        internal => Internal,
    }

    /// The stable code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The port's own code, for [`ErrorCode::App`] errors.
    pub fn app_code(&self) -> Option<&str> {
        self.app_code.as_deref()
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether the port surely did not run: the call was refused before any port saw it (no
    /// route to a replica, a switch's hop limit, a full queue on the way or at the replica, a
    /// link that closed before the call was written). Such a call may be sent again, to any
    /// replica, whatever the port; the mesh does so itself within the call's retry budget, as
    /// gRPC retries a call the server never saw. `false` says nothing: the port may have run.
    ///
    /// Only the mesh and the host set it. An error a port returns never carries it, even one the
    /// port got from a call of its own (the host clears it): that port did run.
    pub fn not_run(&self) -> bool {
        self.not_run
    }

    /// Marks the error as one from a call that surely did not run (see [`CallError::not_run`]).
    /// For the mesh and hosts, which refuse calls before they run.
    #[must_use]
    pub fn mark_not_run(mut self) -> Self {
        self.not_run = true;
        self
    }

    /// The error as a port returns it: [`CallError::not_run`] cleared, since the port ran.
    #[must_use]
    pub(crate) fn returned_by_a_port(mut self) -> Self {
        self.not_run = false;
        self
    }

    /// Adds context in front of the message, keeping the code.
    #[must_use]
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.message = format!("{ctx}: {}", self.message);
        self
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.app_code {
            Some(app) => write!(f, "{} ({app}): {}", self.code, self.message),
            None => write!(f, "{}: {}", self.code, self.message),
        }
    }
}

impl std::error::Error for CallError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_their_wire_form() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
            let json = serde_json::to_string(&code).expect("serialize");
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
        assert_eq!(ErrorCode::parse("nope"), None);
    }

    #[test]
    fn error_serializes_with_a_stable_shape() {
        let e = CallError::timeout("deadline passed");
        assert_eq!(
            serde_json::to_value(&e).expect("serialize"),
            serde_json::json!({"code": "timeout", "message": "deadline passed"})
        );
        let a = CallError::app("insufficient_funds", "mallory is broke");
        let v = serde_json::to_value(&a).expect("serialize");
        assert_eq!(v["code"], "app");
        assert_eq!(v["app_code"], "insufficient_funds");
        let back: CallError = serde_json::from_value(v).expect("deserialize");
        assert_eq!(back, a);
        // The not-run mark travels when set, and is absent (false) otherwise.
        let refused = CallError::unavailable("no route").mark_not_run();
        let v = serde_json::to_value(&refused).expect("serialize");
        assert_eq!(v["not_run"], true);
        let back: CallError = serde_json::from_value(v).expect("deserialize");
        assert!(back.not_run());
        assert!(
            !serde_json::from_value::<CallError>(serde_json::json!({"code": "unavailable", "message": "m"}))
                .expect("deserialize")
                .not_run()
        );
    }

    #[test]
    fn every_code_has_a_distinct_fitting_status() {
        let statuses: std::collections::HashSet<u16> = ErrorCode::ALL.iter().map(|c| c.http_status()).collect();
        assert_eq!(statuses.len(), ErrorCode::ALL.len());
        assert_eq!(ErrorCode::Overloaded.http_status(), 429);
        assert_eq!(ErrorCode::Timeout.http_status(), 504);
    }
}

//! Validated names (gears, ports, topics), caller identities and trace ids.
//!
//! Names are cheap to clone (`Arc<str>`) and are checked once, where they enter the system, so the
//! rest of the code never sees an empty or oversized name.

use std::{borrow::Borrow, fmt, sync::Arc};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest gear, port or topic name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// A name was empty, too long, or used a character outside its allowed set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} name {name:?}: {reason}")]
pub struct InvalidName {
    /// What kind of name it was (`gear`, `port`, `topic`).
    pub kind: &'static str,
    /// The rejected name (truncated to [`MAX_NAME_LEN`] bytes).
    pub name: String,
    /// Why it was rejected.
    pub reason: &'static str,
}

fn validate(kind: &'static str, s: &str, allow_dot: bool) -> Result<(), InvalidName> {
    let fail = |reason| InvalidName { kind, name: s.chars().take(MAX_NAME_LEN).collect(), reason };
    if s.is_empty() {
        return Err(fail("must not be empty"));
    }
    if s.len() > MAX_NAME_LEN {
        return Err(fail("longer than 128 bytes"));
    }
    let ok = s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (allow_dot && b == b'.'));
    if !ok {
        return Err(fail(if allow_dot {
            "only ASCII letters, digits, '_', '-' and '.' are allowed"
        } else {
            "only ASCII letters, digits, '_' and '-' are allowed"
        }));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $kind:literal, $dot:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $ty(Arc<str>);

        impl $ty {
            /// Validates and wraps a name.
            pub fn new(s: impl AsRef<str>) -> Result<Self, InvalidName> {
                let s = s.as_ref();
                validate($kind, s, $dot)?;
                Ok(Self(Arc::from(s)))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Borrow<str> for $ty {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<&str> for $ty {
            type Error = InvalidName;
            fn try_from(s: &str) -> Result<Self, InvalidName> {
                Self::new(s)
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::new(&*s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// The name of a gear, e.g. `billing`: ASCII letters, digits, `_` and `-`.
    GearName, "gear", false
);
name_type!(
    /// The name of a port within a gear, e.g. `charge`: ASCII letters, digits, `_` and `-`.
    PortName, "port", false
);
name_type!(
    /// An event topic, e.g. `billing.charged`: ASCII letters, digits, `_`, `-` and `.`.
    Topic, "topic", true
);

/// What kind of party a [`Principal`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum PrincipalKind {
    /// No credentials were presented (only possible on a node running with `--insecure-dev`).
    Anonymous,
    /// A user or service authenticated by a token; the id is the token's subject.
    User,
    /// A gear calling another gear; the id is the calling gear's name.
    Gear,
    /// A gearmesh node acting for itself; the id is the node id.
    Node,
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct PrincipalInner {
    kind: PrincipalKind,
    id: String,
    scopes: Vec<String>,
}

/// Who is making a call: travels with the call, across the mesh, to the node that runs the port.
///
/// Cheap to clone. Displayed as `kind:id`, e.g. `user:alice` or `gear:orders`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Principal(Arc<PrincipalInner>);

impl Principal {
    fn make(kind: PrincipalKind, id: impl Into<String>, scopes: Vec<String>) -> Self {
        Self(Arc::new(PrincipalInner { kind, id: id.into(), scopes }))
    }

    /// The caller that presented no credentials.
    pub fn anonymous() -> Self {
        Self::make(PrincipalKind::Anonymous, "", Vec::new())
    }

    /// A user or service authenticated by a token with the given subject and scopes.
    pub fn user(subject: impl Into<String>, scopes: Vec<String>) -> Self {
        Self::make(PrincipalKind::User, subject, scopes)
    }

    /// A gear acting on its own behalf.
    pub fn gear(name: &GearName) -> Self {
        Self::make(PrincipalKind::Gear, name.as_str(), Vec::new())
    }

    /// A node acting on its own behalf.
    pub fn node(id: impl Into<String>) -> Self {
        Self::make(PrincipalKind::Node, id, Vec::new())
    }

    /// The kind of party.
    pub fn kind(&self) -> PrincipalKind {
        self.0.kind
    }

    /// The subject, gear name or node id (empty for anonymous).
    pub fn id(&self) -> &str {
        &self.0.id
    }

    /// The scopes granted by the caller's token (empty for gears, nodes and anonymous callers).
    pub fn scopes(&self) -> &[String] {
        &self.0.scopes
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.kind {
            PrincipalKind::Anonymous => f.write_str("anonymous"),
            PrincipalKind::User => write!(f, "user:{}", self.0.id),
            PrincipalKind::Gear => write!(f, "gear:{}", self.0.id),
            PrincipalKind::Node => write!(f, "node:{}", self.0.id),
        }
    }
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A 128-bit trace id shared by every call of one request tree; shown as 32 hex digits
/// (the W3C trace-context form).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(u128);

impl TraceId {
    /// A fresh random, non-zero trace id.
    pub fn random() -> Self {
        Self(rand::random::<u128>() | 1)
    }

    /// Wraps a raw value (e.g. one parsed from a `traceparent` header or a frame).
    pub const fn from_u128(v: u128) -> Self {
        Self(v)
    }

    /// The raw value.
    pub const fn as_u128(self) -> u128 {
        self.0
    }

    /// Parses 32 hex digits.
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() != 32 {
            return None;
        }
        u128::from_str_radix(s, 16).ok().filter(|v| *v != 0).map(Self)
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for TraceId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TraceId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        TraceId::parse(&s).ok_or_else(|| serde::de::Error::custom("trace id must be 32 hex digits"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(GearName::new("billing").is_ok());
        assert!(GearName::new("my-gear_2").is_ok());
        assert!(GearName::new("").is_err());
        assert!(GearName::new("a.b").is_err());
        assert!(GearName::new("a b").is_err());
        assert!(GearName::new("x".repeat(129)).is_err());
        assert!(Topic::new("billing.charged").is_ok());
        let e = PortName::new("bad/port").expect_err("slash is invalid");
        assert_eq!(e.kind, "port");
    }

    #[test]
    fn names_deserialize_with_validation() {
        let ok: GearName = serde_json::from_str("\"echo\"").expect("valid");
        assert_eq!(ok.as_str(), "echo");
        assert!(serde_json::from_str::<GearName>("\"no way\"").is_err());
    }

    #[test]
    fn principals_display_kind_and_id() {
        let g = GearName::new("orders").expect("valid");
        assert_eq!(Principal::gear(&g).to_string(), "gear:orders");
        assert_eq!(Principal::user("alice", vec![]).to_string(), "user:alice");
        assert_eq!(Principal::anonymous().to_string(), "anonymous");
    }

    #[test]
    fn trace_ids_round_trip() {
        let t = TraceId::random();
        assert_eq!(TraceId::parse(&t.to_string()), Some(t));
        assert_eq!(TraceId::parse("zz"), None);
        assert_eq!(TraceId::parse(&"0".repeat(32)), None);
    }
}

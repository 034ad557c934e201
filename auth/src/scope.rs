//! The scope model: what a token allows ([`Scope`], [`Scopes`]) and what an operation needs
//! ([`Permission`]).
//!
//! Scope strings (as they appear in a token's `scope` or `scp` claim):
//!
//! | scope | allows |
//! |---|---|
//! | `call:<gear>` | calling every port of the gear |
//! | `call:<gear>/<port>` | calling one port |
//! | `publish:<topic>` | publishing to a topic |
//! | `observe` | reading mesh state (gears, nodes, metrics) and subscribing to topics |
//! | `serve:<gear>` | hosting (registering) replicas of the gear |
//! | `admin` | mesh control (drain, config, membership changes) |
//! | `mesh:link` | being a node in the mesh (link handshake) |
//!
//! Any name may be a pattern: `*` alone matches any name, and a trailing `*` matches any
//! non-empty remainder (`call:*`, `call:billing/*`, `call:bill*`, `publish:orders.*`). `*` is
//! allowed nowhere else. Unknown or invalid scope strings are ignored, never errors, so an identity
//! provider may put its own scopes (`openid`, `profile`) in the same claim.
//!
//! No scope implies another: `admin` does not grant `call:*`.

use std::fmt;

/// A name pattern inside a scope: exact, `*`, or `prefix*`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NamePattern {
    /// Exactly this name.
    Exact(String),
    /// Any name that starts with this prefix and is longer than it (`orders.*`, `bill*`).
    Prefix(String),
    /// Any name (`*`).
    Any,
}

impl NamePattern {
    /// Parses a pattern; `None` if it is empty, has a misplaced `*`, or a character outside
    /// `[A-Za-z0-9_.-]`.
    pub fn parse(s: &str) -> Option<Self> {
        if s == "*" {
            return Some(NamePattern::Any);
        }
        let (body, prefix) = match s.strip_suffix('*') {
            Some(body) => (body, true),
            None => (s, false),
        };
        let valid = !body.is_empty()
            && body.len() <= 256
            && body.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !valid {
            return None;
        }
        Some(if prefix { NamePattern::Prefix(body.to_owned()) } else { NamePattern::Exact(body.to_owned()) })
    }

    /// Whether `name` matches the pattern.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            NamePattern::Exact(n) => n == name,
            NamePattern::Prefix(p) => name.len() > p.len() && name.starts_with(p.as_str()),
            NamePattern::Any => true,
        }
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NamePattern::Exact(n) => f.write_str(n),
            NamePattern::Prefix(p) => write!(f, "{p}*"),
            NamePattern::Any => f.write_str("*"),
        }
    }
}

/// One parsed, valid scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Scope {
    /// `call:<gear>` (`port: None`, every port) or `call:<gear>/<port>`.
    Call {
        /// Which gears.
        gear: NamePattern,
        /// Which ports; `None` means every port.
        port: Option<NamePattern>,
    },
    /// `publish:<topic>`.
    Publish(NamePattern),
    /// `observe`.
    Observe,
    /// `serve:<gear>`.
    Serve(NamePattern),
    /// `admin`.
    Admin,
    /// `mesh:link`.
    MeshLink,
}

impl Scope {
    /// Parses one scope string; `None` for unknown or invalid ones (which callers ignore).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "observe" => return Some(Scope::Observe),
            "admin" => return Some(Scope::Admin),
            "mesh:link" => return Some(Scope::MeshLink),
            _ => {}
        }
        let (kind, rest) = s.split_once(':')?;
        match kind {
            "call" => {
                let (gear, port) = match rest.split_once('/') {
                    Some((gear, port)) => (gear, Some(NamePattern::parse(port)?)),
                    None => (rest, None),
                };
                Some(Scope::Call { gear: NamePattern::parse(gear)?, port })
            }
            "publish" => Some(Scope::Publish(NamePattern::parse(rest)?)),
            "serve" => Some(Scope::Serve(NamePattern::parse(rest)?)),
            _ => None,
        }
    }

    /// Whether this scope grants `needed`.
    pub fn allows(&self, needed: &Permission) -> bool {
        match (self, needed) {
            (Scope::Call { gear, port }, Permission::Call { gear: g, port: p }) => {
                gear.matches(g) && port.as_ref().is_none_or(|port| port.matches(p))
            }
            (Scope::Publish(t), Permission::Publish { topic }) => t.matches(topic),
            (Scope::Serve(g), Permission::Serve { gear }) => g.matches(gear),
            (Scope::Observe, Permission::Observe)
            | (Scope::Admin, Permission::Admin)
            | (Scope::MeshLink, Permission::MeshLink) => true,
            _ => false,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Call { gear, port: None } => write!(f, "call:{gear}"),
            Scope::Call { gear, port: Some(port) } => write!(f, "call:{gear}/{port}"),
            Scope::Publish(t) => write!(f, "publish:{t}"),
            Scope::Observe => f.write_str("observe"),
            Scope::Serve(g) => write!(f, "serve:{g}"),
            Scope::Admin => f.write_str("admin"),
            Scope::MeshLink => f.write_str("mesh:link"),
        }
    }
}

/// What one operation needs; checked with [`Scopes::allows`] / [`Scopes::check`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Permission {
    /// Calling `port` of `gear`.
    Call {
        /// The gear's name.
        gear: String,
        /// The port's name.
        port: String,
    },
    /// Publishing to `topic`.
    Publish {
        /// The topic.
        topic: String,
    },
    /// Reading mesh state or subscribing.
    Observe,
    /// Hosting replicas of `gear`.
    Serve {
        /// The gear's name.
        gear: String,
    },
    /// Mesh control.
    Admin,
    /// Joining the mesh as a node.
    MeshLink,
}

impl Permission {
    /// `Permission::Call` from borrowed names.
    pub fn call(gear: &str, port: &str) -> Self {
        Permission::Call { gear: gear.to_owned(), port: port.to_owned() }
    }

    /// `Permission::Publish` from a borrowed topic.
    pub fn publish(topic: &str) -> Self {
        Permission::Publish { topic: topic.to_owned() }
    }

    /// `Permission::Serve` from a borrowed gear name.
    pub fn serve(gear: &str) -> Self {
        Permission::Serve { gear: gear.to_owned() }
    }
}

/// Shown in scope syntax: the narrowest scope that would grant it (`call:billing/charge`).
impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Permission::Call { gear, port } => write!(f, "call:{gear}/{port}"),
            Permission::Publish { topic } => write!(f, "publish:{topic}"),
            Permission::Observe => f.write_str("observe"),
            Permission::Serve { gear } => write!(f, "serve:{gear}"),
            Permission::Admin => f.write_str("admin"),
            Permission::MeshLink => f.write_str("mesh:link"),
        }
    }
}

/// The set of scopes a principal holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes {
    scopes: Vec<Scope>,
}

impl Scopes {
    /// No scopes at all.
    pub fn empty() -> Self {
        Scopes::default()
    }

    /// Parses a space-separated `scope` claim; unknown entries are skipped.
    pub fn parse(space_separated: &str) -> Self {
        Self::from_strs(space_separated.split_ascii_whitespace())
    }

    /// Parses a list of scope strings (an `scp` claim); unknown entries are skipped.
    pub fn from_strs<'a>(items: impl IntoIterator<Item = &'a str>) -> Self {
        let mut scopes: Vec<Scope> = Vec::new();
        for scope in items.into_iter().filter_map(Scope::parse) {
            if !scopes.contains(&scope) {
                scopes.push(scope);
            }
        }
        Scopes { scopes }
    }

    /// Whether any scope grants `needed`.
    pub fn allows(&self, needed: &Permission) -> bool {
        self.scopes.iter().any(|s| s.allows(needed))
    }

    /// Whether a call to `gear`/`port` is allowed, without building a [`Permission`] (hot path).
    pub fn allows_call(&self, gear: &str, port: &str) -> bool {
        self.scopes.iter().any(|s| match s {
            Scope::Call { gear: g, port: p } => g.matches(gear) && p.as_ref().is_none_or(|p| p.matches(port)),
            _ => false,
        })
    }

    /// Whether publishing to `topic` is allowed, without building a [`Permission`].
    pub fn allows_publish(&self, topic: &str) -> bool {
        self.scopes.iter().any(|s| matches!(s, Scope::Publish(t) if t.matches(topic)))
    }

    /// `Ok` if allowed, else [`crate::AuthError::Forbidden`] naming what was needed.
    pub fn check(&self, needed: &Permission) -> Result<(), crate::AuthError> {
        if self.allows(needed) { Ok(()) } else { Err(crate::AuthError::Forbidden { needed: needed.clone() }) }
    }

    /// The parsed scopes.
    pub fn iter(&self) -> impl Iterator<Item = &Scope> {
        self.scopes.iter()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty()
    }

    /// The scopes as strings (canonical form), e.g. to carry a principal across the mesh.
    pub fn to_strings(&self) -> Vec<String> {
        self.scopes.iter().map(Scope::to_string).collect()
    }

    /// Adds the scopes of `other` (deduplicated).
    pub fn extend(&mut self, other: &Scopes) {
        for s in &other.scopes {
            if !self.scopes.contains(s) {
                self.scopes.push(s.clone());
            }
        }
    }
}

/// Space-separated canonical form, suitable for a `scope` claim.
impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.scopes.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{s}")?;
        }
        Ok(())
    }
}

impl FromIterator<Scope> for Scopes {
    fn from_iter<T: IntoIterator<Item = Scope>>(iter: T) -> Self {
        let mut out = Scopes::empty();
        for s in iter {
            if !out.scopes.contains(&s) {
                out.scopes.push(s);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        for s in [
            "call:billing",
            "call:billing/charge",
            "call:*",
            "call:billing/*",
            "call:bill*/ch*",
            "publish:orders.*",
            "publish:orders.created",
            "observe",
            "serve:orders",
            "admin",
            "mesh:link",
        ] {
            let scope = Scope::parse(s).expect(s);
            assert_eq!(scope.to_string(), s);
        }
    }

    #[test]
    fn unknown_and_invalid_are_ignored() {
        for s in [
            "openid",
            "profile",
            "call:",
            "call:a*b",
            "call:/x",
            "call:a/",
            "publish:",
            "call:a b",
            "serve:*x",
            "call:a/b/c",
            "mesh:other",
            "",
            "call:ä",
        ] {
            assert_eq!(Scope::parse(s), None, "{s}");
        }
        let scopes = Scopes::parse("openid call:billing/charge  email observe");
        assert_eq!(scopes.to_string(), "call:billing/charge observe");
    }

    #[test]
    fn call_matching() {
        let s = Scopes::parse("call:billing/charge call:inventory publish:orders.*");
        assert!(s.allows(&Permission::call("billing", "charge")));
        assert!(!s.allows(&Permission::call("billing", "refund")));
        assert!(s.allows(&Permission::call("inventory", "anything")));
        assert!(!s.allows(&Permission::call("billingx", "charge")));
        assert!(s.allows(&Permission::publish("orders.created")));
        assert!(s.allows(&Permission::publish("orders.eu.created")));
        assert!(!s.allows(&Permission::publish("orders")));
        assert!(!s.allows(&Permission::publish("ordersx")));
        assert!(!s.allows(&Permission::Admin));
        assert!(!s.allows(&Permission::Observe));

        for (gear, port) in [("billing", "charge"), ("billing", "refund"), ("inventory", "x"), ("b", "c")] {
            assert_eq!(s.allows_call(gear, port), s.allows(&Permission::call(gear, port)));
        }
        for topic in ["orders.created", "orders", "x"] {
            assert_eq!(s.allows_publish(topic), s.allows(&Permission::publish(topic)));
        }

        let all = Scopes::parse("call:*");
        assert!(all.allows(&Permission::call("x", "y")));
        assert!(!all.allows(&Permission::serve("x")));
        let ports = Scopes::parse("call:billing/*");
        assert!(ports.allows(&Permission::call("billing", "y")));
        assert!(!ports.allows(&Permission::call("orders", "y")));
    }

    #[test]
    fn admin_implies_nothing_else() {
        let s = Scopes::parse("admin");
        assert!(s.allows(&Permission::Admin));
        assert!(!s.allows(&Permission::MeshLink));
        assert!(!s.allows(&Permission::call("a", "b")));
        let err = s.check(&Permission::call("a", "b")).expect_err("forbidden");
        assert_eq!(err.to_string(), "missing scope for call:a/b");
    }
}

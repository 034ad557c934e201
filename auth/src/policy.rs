//! Gear permissions from config ([`GearPolicy`]): a gear calling another gear acts as
//! `gear:<name>` with the scopes configured for it, e.g. in TOML:
//!
//! ```toml
//! [auth.gears]
//! orders = ["call:billing/charge", "publish:orders.*"]
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{AuthError, Permission, Scope, Scopes};

/// A scope string in configuration that is not a valid gearmesh scope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid scope {scope:?}{}", gear.as_ref().map(|g| format!(" for gear {g}")).unwrap_or_default())]
pub struct InvalidScope {
    /// The offending scope string (truncated).
    pub scope: String,
    /// The gear it was configured for, if any.
    pub gear: Option<String>,
}

impl Scopes {
    /// Parses space-separated scopes strictly: every entry must be a valid gearmesh scope. For
    /// configuration and `gearmesh token issue`, where a typo must not pass silently.
    pub fn parse_strict(space_separated: &str) -> Result<Scopes, InvalidScope> {
        space_separated
            .split_ascii_whitespace()
            .map(|s| Scope::parse(s).ok_or_else(|| InvalidScope { scope: s.chars().take(128).collect(), gear: None }))
            .collect()
    }
}

/// The scopes each gear holds when it calls other gears (principal `gear:<name>`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "BTreeMap<String, Vec<String>>", into = "BTreeMap<String, Vec<String>>")]
pub struct GearPolicy {
    gears: BTreeMap<String, Scopes>,
}

impl TryFrom<BTreeMap<String, Vec<String>>> for GearPolicy {
    type Error = InvalidScope;

    fn try_from(map: BTreeMap<String, Vec<String>>) -> Result<Self, Self::Error> {
        let mut gears = BTreeMap::new();
        for (gear, scopes) in map {
            let parsed = Scopes::parse_strict(&scopes.join(" ")).map_err(|mut e| {
                e.gear = Some(gear.clone());
                e
            })?;
            gears.insert(gear, parsed);
        }
        Ok(GearPolicy { gears })
    }
}

impl From<GearPolicy> for BTreeMap<String, Vec<String>> {
    fn from(policy: GearPolicy) -> Self {
        policy.gears.into_iter().map(|(gear, scopes)| (gear, scopes.to_strings())).collect()
    }
}

impl GearPolicy {
    /// No gear holds any scope.
    pub fn new() -> Self {
        GearPolicy::default()
    }

    /// Grants `scopes` to `gear` (adding to what it has).
    pub fn grant(&mut self, gear: impl Into<String>, scopes: &Scopes) {
        self.gears.entry(gear.into()).or_default().extend(scopes);
    }

    /// The scopes of `gear` (empty if it has none configured).
    pub fn scopes_for(&self, gear: &str) -> Scopes {
        self.gears.get(gear).cloned().unwrap_or_default()
    }

    /// `Ok` if `gear` holds `needed`, else [`AuthError::Forbidden`] (without copying its scopes:
    /// the check of every call a gear makes).
    pub fn check(&self, gear: &str, needed: &Permission) -> Result<(), AuthError> {
        match self.gears.get(gear) {
            Some(scopes) => scopes.check(needed),
            None => Err(AuthError::Forbidden { needed: needed.clone() }),
        }
    }

    /// The principal name a gear acts as: `gear:<name>`.
    pub fn principal(gear: &str) -> String {
        format!("gear:{gear}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_config_map() {
        let json = r#"{"orders": ["call:billing/charge", "publish:orders.*"], "billing": []}"#;
        let policy: GearPolicy = serde_json::from_str(json).expect("policy");
        let orders = policy.scopes_for("orders");
        assert!(orders.allows(&Permission::call("billing", "charge")));
        assert!(!orders.allows(&Permission::call("billing", "refund")));
        assert!(policy.scopes_for("billing").is_empty());
        assert!(policy.scopes_for("unknown").is_empty());
        assert_eq!(policy.check("orders", &Permission::call("billing", "charge")), Ok(()));
        let refund = Permission::call("billing", "refund");
        assert_eq!(policy.check("orders", &refund), Err(AuthError::Forbidden { needed: refund.clone() }));
        assert_eq!(policy.check("unknown", &refund), Err(AuthError::Forbidden { needed: refund.clone() }));
        let bad: Result<GearPolicy, _> = serde_json::from_str(r#"{"orders": ["cal:billing"]}"#);
        let err = bad.expect_err("typo refused").to_string();
        assert!(err.contains("cal:billing") && err.contains("orders"), "{err}");
        assert_eq!(GearPolicy::principal("orders"), "gear:orders");
        let round_trip: GearPolicy =
            serde_json::from_value(serde_json::to_value(&policy).expect("serialize")).expect("deserialize");
        assert_eq!(round_trip, policy);
    }
}

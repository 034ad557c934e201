//! How a call picks the replica(s) of a gear that run it ([`Strategy`]), whether it may be
//! retried ([`Retry`]), and the shape of a scatter's gathered replies ([`Gathered`]).
//!
//! This file only holds the vocabulary (types, parsing, the wire form of a gathered reply); the
//! node and the mesh driver carry strategies out (see `docs/strategies.md`).

use std::{fmt, num::NonZeroU16, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::CallError;

/// A caller-given key for [`Strategy::Shard`]: the same key reaches the same replica.
pub type ShardKey = String;

/// How a call is routed among the replicas of its gear.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Strategy {
    /// The replica on this node when there is one, else one elsewhere picked as by
    /// [`Strategy::Spread`]. The default.
    #[default]
    LocalFirst,
    /// The least-loaded of two replicas picked at random (this node included), weighted by the
    /// latency each has shown: a slow replica gets less traffic.
    Spread,
    /// The replica that wins rendezvous hashing of the key over the gear's replicas. With `None`
    /// the key is taken from the input's `"key"` field (JSON objects only).
    Shard(Option<ShardKey>),
    /// Every replica runs the call; the replies are gathered as a [`Gathered`] document.
    Scatter(Gather),
    /// Every replica gets the call; nobody waits for the replies (the caller gets
    /// `{"sent": n, "nodes": [...]}` at once).
    Broadcast,
}

/// When a [`Strategy::Scatter`] stops waiting (it always stops at the deadline).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Gather {
    /// Every replica replied (successfully or not).
    #[default]
    All,
    /// This many replicas replied successfully.
    First(NonZeroU16),
    /// A majority of the replicas replied successfully.
    Quorum,
}

/// Whether a failed call may be tried again (see `docs/strategies.md` for what is retried).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Retry {
    /// Retry `unavailable` and `timeout` failures only when the port is marked idempotent.
    #[default]
    IfIdempotent,
    /// The caller knows the call is safe to repeat: retry like an idempotent port.
    Yes,
    /// Never retry (a call that surely did not run, shed as `overloaded` or refused on the way
    /// with [`CallError::not_run`](crate::CallError::not_run), is still sent again: no port
    /// runs twice).
    No,
}

impl Strategy {
    /// The short name (`local-first`, `spread`, `shard`, `scatter`, `broadcast`).
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::LocalFirst => "local-first",
            Strategy::Spread => "spread",
            Strategy::Shard(_) => "shard",
            Strategy::Scatter(_) => "scatter",
            Strategy::Broadcast => "broadcast",
        }
    }

    /// Builds a strategy from its name and the optional `key` (for `shard`) and `gather`
    /// (for `scatter`: `all`, `quorum`, or a number K for the first K successes), as given in
    /// the HTTP query or the WebSocket call message.
    ///
    /// # Errors
    /// `bad_request` naming what is wrong.
    pub fn from_parts(name: &str, key: Option<&str>, gather: Option<&str>) -> Result<Self, CallError> {
        let s = match name {
            "local-first" => Strategy::LocalFirst,
            "spread" => Strategy::Spread,
            "shard" => Strategy::Shard(key.map(str::to_owned)),
            "scatter" => Strategy::Scatter(gather.map(str::parse).transpose()?.unwrap_or_default()),
            "broadcast" => Strategy::Broadcast,
            other => {
                return Err(CallError::bad_request(format!(
                    "unknown strategy {other:?} (known: local-first, spread, shard, scatter, broadcast)"
                )));
            }
        };
        if key.is_some() && !matches!(s, Strategy::Shard(_)) {
            return Err(CallError::bad_request("key is only for strategy=shard"));
        }
        if gather.is_some() && !matches!(s, Strategy::Scatter(_)) {
            return Err(CallError::bad_request("gather is only for strategy=scatter"));
        }
        Ok(s)
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Strategy {
    type Err = CallError;

    /// Parses a name alone (as in the node's `[strategies]` configuration).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_parts(s, None, None)
    }
}

impl FromStr for Gather {
    type Err = CallError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "all" => Ok(Gather::All),
            "quorum" => Ok(Gather::Quorum),
            n => n.parse::<NonZeroU16>().map(Gather::First).map_err(|_| {
                CallError::bad_request(format!("gather must be all, quorum or a number from 1 to 65535, not {n:?}"))
            }),
        }
    }
}

impl Gather {
    /// How many successes end the gathering early among `replicas` (`None`: wait for all).
    pub fn goal(self, replicas: usize) -> Option<usize> {
        match self {
            Gather::All => None,
            Gather::First(k) => Some(usize::from(k.get()).min(replicas)),
            Gather::Quorum => Some(replicas / 2 + 1),
        }
    }
}

impl FromStr for Retry {
    type Err = CallError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Retry::IfIdempotent),
            "yes" | "true" => Ok(Retry::Yes),
            "no" | "false" => Ok(Retry::No),
            other => Err(CallError::bad_request(format!("retry must be auto, yes or no, not {other:?}"))),
        }
    }
}

/// The reply of a [`Strategy::Scatter`] call: one entry per replica, with its result or error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gathered<T> {
    /// Whether the gather goal (all, first K, quorum) was reached before the deadline.
    pub complete: bool,
    /// How many replicas replied successfully.
    pub ok: usize,
    /// One entry per replica the call was sent to, in the order the replies arrived (replicas
    /// that never replied come last, with a `timeout` error).
    pub replies: Vec<Reply<T>>,
}

/// One replica's part of a [`Gathered`] reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply<T> {
    /// The node that ran it.
    pub node: String,
    /// Its reply, when it succeeded.
    #[serde(default = "none", skip_serializing_if = "Option::is_none")]
    pub ok: Option<T>,
    /// Its error, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<CallError>,
}

fn none<T>() -> Option<T> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategies_parse_from_their_query_form() {
        assert_eq!(Strategy::from_parts("spread", None, None).expect("ok"), Strategy::Spread);
        assert_eq!(Strategy::from_parts("shard", Some("k"), None).expect("ok"), Strategy::Shard(Some("k".into())));
        assert_eq!(
            Strategy::from_parts("scatter", None, Some("2")).expect("ok"),
            Strategy::Scatter(Gather::First(NonZeroU16::new(2).expect("non-zero")))
        );
        assert_eq!(
            Strategy::from_parts("scatter", None, Some("quorum")).expect("ok"),
            Strategy::Scatter(Gather::Quorum)
        );
        assert!(Strategy::from_parts("nearest", None, None).expect_err("unknown").message().contains("nearest"));
        assert!(Strategy::from_parts("spread", Some("k"), None).is_err(), "key only with shard");
        assert!(Strategy::from_parts("scatter", None, Some("0")).is_err(), "gather 0 is invalid");
        assert_eq!("local-first".parse::<Strategy>().expect("ok"), Strategy::LocalFirst);
    }

    #[test]
    fn gather_goals() {
        assert_eq!(Gather::All.goal(3), None);
        assert_eq!(Gather::Quorum.goal(3), Some(2));
        assert_eq!(Gather::Quorum.goal(4), Some(3));
        assert_eq!(Gather::First(NonZeroU16::new(5).expect("non-zero")).goal(3), Some(3));
    }
}

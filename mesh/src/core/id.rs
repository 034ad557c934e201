//! The 16-byte node identity used by the mesh core.
//!
//! Kept deliberately minimal (bytes, hex display, ordering, serde) so it can later be unified with
//! the transport's frame-level id by a re-export.

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// A node's identity: 16 opaque bytes, displayed as 32 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct NodeId([u8; 16]);

impl NodeId {
    /// The length of an id in bytes.
    pub const LEN: usize = 16;

    /// Wraps raw bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// A random id drawn from `rng` (seed it for reproducible ids).
    pub fn random<R: Rng + ?Sized>(rng: &mut R) -> Self {
        let mut b = [0u8; 16];
        rng.fill(&mut b);
        Self(b)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The first 8 hex characters are enough to tell nodes apart in logs.
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The error of [`NodeId::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a node id is 32 hex characters")]
pub struct ParseNodeIdError;

impl FromStr for NodeId {
    type Err = ParseNodeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.as_bytes();
        if s.len() != 32 {
            return Err(ParseNodeIdError);
        }
        let mut out = [0u8; 16];
        for (i, pair) in s.chunks_exact(2).enumerate() {
            let hi = hex_val(pair[0]).ok_or(ParseNodeIdError)?;
            let lo = hex_val(pair[1]).ok_or(ParseNodeIdError)?;
            out[i] = (hi << 4) | lo;
        }
        Ok(Self(out))
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn hex_round_trip() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let id = NodeId::random(&mut rng);
        let s = id.to_string();
        assert_eq!(s.len(), 32);
        assert_eq!(s.parse::<NodeId>(), Ok(id));
        assert!("xyz".parse::<NodeId>().is_err());
    }
}

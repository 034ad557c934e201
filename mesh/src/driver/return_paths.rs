//! Return paths a switch learns from the calls it passes on, the way a learning switch learns
//! where a station is from the frames it sends.
//!
//! Routes spread through the mesh by gossip, one link at a time, so for a moment after a node
//! joins, or after a link on the way is pruned, a switch in the middle of a path may pass a call
//! towards its callee but know no route back to the caller when the reply comes. Without help it
//! would drop the reply, and the caller would wait for its deadline. So a switch remembers the
//! link the calls from each caller came in on, and sends frames for a caller that find no route
//! (the reply, first of all) back over it. The callee answers on the link a call came in on
//! (see `Inner::reply_frame`).
//!
//! Pure data, driven with explicit instants: the driver tells it of switched calls (see
//! `LinkFrames::note_switched_call`) and asks it only when neither a link nor the core has a
//! route.

use std::time::Duration;

use tokio::time::Instant;

use super::FastMap;
use crate::core::NodeId;

/// Return paths learned from calls, by the node that sent them: the peer whose link the calls
/// came in on. At most [`ReturnPaths::CAP`] nodes; an entry lapses [`ReturnPaths::TTL`] after
/// the last call that taught it.
#[derive(Debug, Default)]
pub(crate) struct ReturnPaths {
    by_src: FastMap<NodeId, Learned>,
}

#[derive(Debug, Clone, Copy)]
struct Learned {
    via: NodeId,
    seen: Instant,
}

impl ReturnPaths {
    /// Nodes remembered at most. At the bound, lapsed entries go first, then the one heard
    /// from longest ago (a scan, at most once per new caller while the table is full).
    pub(crate) const CAP: usize = 1024;
    /// How long a return path is used after the last call that taught it. Far longer than
    /// gossip takes to bring a route of the core's own; long enough for a slow call's reply.
    pub(crate) const TTL: Duration = Duration::from_secs(120);

    /// Notes that a call from `src` came in on the link to `via` at `now`. True when this
    /// changed where frames for `src` would go (a new entry, or another link); false when it
    /// only refreshed one.
    pub(crate) fn learn(&mut self, src: NodeId, via: NodeId, now: Instant) -> bool {
        if let Some(known) = self.by_src.get_mut(&src) {
            let changed = known.via != via;
            *known = Learned { via, seen: now };
            return changed;
        }
        if self.by_src.len() >= Self::CAP {
            self.by_src.retain(|_, l| now.saturating_duration_since(l.seen) < Self::TTL);
            if self.by_src.len() >= Self::CAP
                && let Some(oldest) = self.by_src.iter().min_by_key(|(_, l)| l.seen).map(|(id, _)| *id)
            {
                self.by_src.remove(&oldest);
            }
        }
        self.by_src.insert(src, Learned { via, seen: now });
        true
    }

    /// The peer to send frames for `dst` to, if a call from `dst` taught one within
    /// [`ReturnPaths::TTL`] of `now`.
    pub(crate) fn via(&self, dst: NodeId, now: Instant) -> Option<NodeId> {
        self.by_src.get(&dst).filter(|l| now.saturating_duration_since(l.seen) < Self::TTL).map(|l| l.via)
    }

    /// Forgets the paths over the link to `peer` (it closed).
    pub(crate) fn forget_link(&mut self, peer: NodeId) {
        self.by_src.retain(|_, l| l.via != peer);
    }

    /// How many nodes are remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_src.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> NodeId {
        NodeId::from_bytes(n.to_le_bytes())
    }

    #[test]
    fn a_learned_path_is_used_until_it_lapses_and_a_later_call_refreshes_it() {
        let t0 = Instant::now();
        let mut paths = ReturnPaths::default();
        assert_eq!(paths.via(id(1), t0), None);
        assert!(paths.learn(id(1), id(7), t0), "new");
        assert_eq!(paths.via(id(1), t0 + ReturnPaths::TTL / 2), Some(id(7)));
        assert!(!paths.learn(id(1), id(7), t0 + ReturnPaths::TTL / 2), "only refreshed");
        assert_eq!(paths.via(id(1), t0 + ReturnPaths::TTL), Some(id(7)), "refreshed at TTL/2");
        assert_eq!(paths.via(id(1), t0 + ReturnPaths::TTL * 2), None, "lapsed");
    }

    #[test]
    fn a_call_over_another_link_moves_the_path_and_a_closed_link_takes_its_paths_along() {
        let t0 = Instant::now();
        let mut paths = ReturnPaths::default();
        paths.learn(id(1), id(7), t0);
        paths.learn(id(2), id(7), t0);
        paths.learn(id(3), id(8), t0);
        assert!(paths.learn(id(1), id(8), t0), "moved to another link");
        assert_eq!(paths.via(id(1), t0), Some(id(8)));
        paths.forget_link(id(8));
        assert_eq!((paths.via(id(1), t0), paths.via(id(2), t0), paths.via(id(3), t0)), (None, Some(id(7)), None));
    }

    #[test]
    fn at_the_bound_lapsed_paths_go_first_then_the_oldest() {
        let t0 = Instant::now();
        let mut paths = ReturnPaths::default();
        // One old entry (lapsed by the end), the rest fresh, at one-millisecond steps.
        paths.learn(id(0), id(9), t0);
        let fresh = t0 + ReturnPaths::TTL;
        for n in 1..ReturnPaths::CAP as u128 {
            paths.learn(id(n), id(9), fresh + Duration::from_millis(n as u64));
        }
        assert_eq!(paths.len(), ReturnPaths::CAP);
        let now = fresh + Duration::from_secs(1);
        paths.learn(id(5000), id(9), now);
        assert_eq!(paths.len(), ReturnPaths::CAP);
        assert_eq!(paths.via(id(0), now), None, "the lapsed one went");
        assert_eq!(paths.via(id(1), now), Some(id(9)));
        // Now none has lapsed: the one heard from longest ago (id 1) makes room.
        paths.learn(id(5001), id(9), now);
        assert_eq!(paths.len(), ReturnPaths::CAP);
        assert_eq!((paths.via(id(1), now), paths.via(id(2), now)), (None, Some(id(9))));
        assert_eq!((paths.via(id(5000), now), paths.via(id(5001), now)), (Some(id(9)), Some(id(9))));
    }
}

//! Shortcut links on demand: a node that sends many calls to another node through switches asks
//! its core for a direct link to it (`Core::add_shortcut`), and gives the shortcut up again when
//! those calls stop. The core dials the shortcut, never prunes it and does not count it towards
//! `max_links` (at most `hard_max_links - max_links` of them).
//!
//! The policy counts calls per destination in fixed windows: a destination reached through a
//! switch that gets [`ShortcutPolicy::calls`] calls within one window earns a shortcut; a
//! shortcut that gets fewer than a quarter of that in a later window is given up (it becomes an
//! ordinary link, which the core may prune). Counting is bounded: at most [`MAX_COUNTED`]
//! destinations per window; calls to others are not counted until the next window.

use std::collections::HashSet;
use std::time::Duration;

use tokio::time::Instant;

use super::FastMap;
use crate::core::NodeId;

/// Destinations counted per window, at most.
pub(crate) const MAX_COUNTED: usize = 256;

/// When a node opens a shortcut link (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShortcutPolicy {
    /// Calls within one window, through switches, that earn a destination a shortcut; 0 turns
    /// shortcuts off.
    pub calls: u32,
    /// The counting window.
    pub window: Duration,
}

impl Default for ShortcutPolicy {
    /// 500 calls within 5 s (100 calls/s on average).
    fn default() -> Self {
        Self { calls: 500, window: Duration::from_secs(5) }
    }
}

/// What the core should be told after a call was counted.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Changes {
    /// Ask for a shortcut to this node.
    pub(crate) add: Option<NodeId>,
    /// Give these shortcuts up.
    pub(crate) remove: Vec<NodeId>,
}

/// The counts of the current window and the shortcuts this policy asked for.
#[derive(Debug, Default)]
pub(crate) struct Shortcuts {
    window_start: Option<Instant>,
    counts: FastMap<NodeId, u32>,
    active: HashSet<NodeId, foldhash::fast::RandomState>,
}

impl Shortcuts {
    /// Whether a call to `dst` must be counted: it goes through a switch, or `dst` is a shortcut
    /// (whose use decides whether it is kept).
    pub(crate) fn wants(&self, dst: NodeId, switched: bool) -> bool {
        switched || self.active.contains(&dst)
    }

    /// Counts one call to `dst` made at `now` and says what changes.
    pub(crate) fn count(&mut self, policy: &ShortcutPolicy, dst: NodeId, switched: bool, now: Instant) -> Changes {
        let mut changes = Changes::default();
        if policy.calls == 0 {
            return changes;
        }
        changes.remove = self.roll(policy, now);
        if !self.wants(dst, switched) || (self.counts.len() >= MAX_COUNTED && !self.counts.contains_key(&dst)) {
            return changes;
        }
        let n = self.counts.entry(dst).or_insert(0);
        *n = n.saturating_add(1);
        if *n >= policy.calls && self.active.insert(dst) {
            changes.add = Some(dst);
        }
        changes
    }

    /// Starts a new window if the current one is over (also called on the driver's timer, so a
    /// node that stops calling altogether still gives its shortcuts up); returns the shortcuts
    /// to give up: those used less than a quarter of the threshold in the window that ended.
    pub(crate) fn roll(&mut self, policy: &ShortcutPolicy, now: Instant) -> Vec<NodeId> {
        let start = *self.window_start.get_or_insert(now);
        if now.saturating_duration_since(start) < policy.window {
            return Vec::new();
        }
        let keep = (policy.calls / 4).max(1);
        let idle: Vec<NodeId> =
            self.active.iter().filter(|p| self.counts.get(p).copied().unwrap_or(0) < keep).copied().collect();
        for p in &idle {
            self.active.remove(p);
        }
        self.counts.clear();
        self.window_start = Some(now);
        idle
    }

    /// Forgets a shortcut the core refused (too many already).
    pub(crate) fn refused(&mut self, dst: NodeId) {
        self.active.remove(&dst);
    }

    /// Whether any shortcut is active (calls over direct links need counting only then).
    pub(crate) fn any_active(&self) -> bool {
        !self.active.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> NodeId {
        NodeId::from_bytes([b; 16])
    }

    const POLICY: ShortcutPolicy = ShortcutPolicy { calls: 8, window: Duration::from_secs(1) };

    /// Enough switched calls to `dst` at `at` to earn it a shortcut.
    fn earn(s: &mut Shortcuts, dst: NodeId, at: Instant) {
        for _ in 0..POLICY.calls {
            s.count(&POLICY, dst, true, at);
        }
    }

    #[test]
    fn a_busy_switched_destination_earns_a_shortcut_once() {
        let mut s = Shortcuts::default();
        let t0 = Instant::now();
        for i in 0..7 {
            assert_eq!(s.count(&POLICY, id(1), true, t0), Changes::default(), "call {i}");
        }
        assert_eq!(s.count(&POLICY, id(1), true, t0).add, Some(id(1)), "the 8th call within the window");
        assert_eq!(s.count(&POLICY, id(1), true, t0).add, None, "asked for once");
        // Calls over direct links to other nodes are not counted.
        for _ in 0..20 {
            assert_eq!(s.count(&POLICY, id(2), false, t0), Changes::default());
        }
    }

    #[test]
    fn calls_spread_over_windows_earn_nothing() {
        let mut s = Shortcuts::default();
        let t0 = Instant::now();
        for w in 0..5u64 {
            for _ in 0..7 {
                let c = s.count(&POLICY, id(1), true, t0 + Duration::from_millis(1_000 * w));
                assert_eq!(c.add, None);
            }
        }
    }

    #[test]
    fn a_shortcut_that_goes_quiet_is_given_up_and_a_busy_one_kept() {
        let mut s = Shortcuts::default();
        let t0 = Instant::now();
        earn(&mut s, id(1), t0);
        earn(&mut s, id(2), t0);
        assert!(s.any_active());
        // Next window: node 1's shortcut is still used (over the direct link now), node 2's not.
        let t1 = t0 + Duration::from_secs(1);
        for _ in 0..4 {
            assert!(s.count(&POLICY, id(1), false, t1).remove.is_empty());
        }
        let c = s.count(&POLICY, id(1), false, t0 + Duration::from_secs(2));
        assert_eq!(c.remove, vec![id(2)], "node 2 got no call last window");
        assert!(s.wants(id(1), false) && !s.wants(id(2), false));
    }

    #[test]
    fn counting_is_bounded_and_zero_turns_it_off() {
        let mut s = Shortcuts::default();
        let t0 = Instant::now();
        for b in 0..=255u8 {
            s.count(&POLICY, NodeId::from_bytes([b, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), true, t0);
        }
        assert_eq!(s.counts.len(), MAX_COUNTED);
        for _ in 0..20 {
            assert_eq!(s.count(&POLICY, id(9), true, t0).add, None, "not counted once full");
        }
        let off = ShortcutPolicy { calls: 0, ..POLICY };
        let mut s = Shortcuts::default();
        for _ in 0..100 {
            assert_eq!(s.count(&off, id(1), true, t0), Changes::default());
        }
    }

    #[test]
    fn a_node_that_stops_calling_gives_its_shortcuts_up_on_the_timer() {
        let mut s = Shortcuts::default();
        let t0 = Instant::now();
        earn(&mut s, id(1), t0);
        assert!(s.roll(&POLICY, t0 + Duration::from_millis(500)).is_empty(), "the window is not over");
        // The window with the calls ends; the next, with none, ends too.
        assert!(s.roll(&POLICY, t0 + Duration::from_secs(1)).is_empty(), "used in the window that ended");
        assert_eq!(s.roll(&POLICY, t0 + Duration::from_secs(2)), vec![id(1)]);
        assert!(!s.any_active());
    }

    #[test]
    fn a_refused_shortcut_is_forgotten() {
        let mut s = Shortcuts::default();
        let t0 = Instant::now();
        earn(&mut s, id(1), t0);
        s.refused(id(1));
        assert!(!s.any_active());
    }
}

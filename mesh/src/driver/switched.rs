//! The calls a switch passed on and has not seen answered, by the link each went out on, so that
//! when that link breaks the switch can tell their callers at once.
//!
//! A caller knows the link its own call went out on and fails the call when that link breaks
//! (`Calls::fail_via`). A call that crosses a switch also crosses the switch's link towards the
//! callee, which the caller does not see: if that link breaks, the call or its reply may be lost
//! while the callee stays reachable some other way, and the caller would wait for its deadline.
//! An HTTP proxy keeps a request's state on every hop for the same reason; a switch here keeps
//! just this: the caller, the call id and the link, from the call until its reply (or cancel)
//! passes back through it.
//!
//! Pure data, driven with explicit instants by the driver (`Inner::note_switched`,
//! `Inner::settle_switched`, `Inner::fail_switched`).

use std::time::Duration;

use gearmesh_transport::LinkId;
use tokio::time::Instant;

use super::FastMap;
use crate::core::NodeId;

/// A call this node switched on: who is waiting for it, over which link it went, until when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Switched {
    /// The node that made the call (where an error reply goes).
    pub(crate) caller: NodeId,
    /// The node it was made to.
    pub(crate) callee: NodeId,
    pub(crate) call_id: u64,
    link: LinkId,
    /// The caller's deadline as this node saw it; nobody waits for the call after it.
    expires: Instant,
}

/// Switched calls not yet answered. At most [`SwitchedCalls::CAP`]; when full, calls past their
/// deadline are let go of, and if none is, a new call is not tracked (it then behaves as before
/// tracking: its caller waits for the deadline if its path breaks).
#[derive(Debug, Default)]
pub(crate) struct SwitchedCalls {
    by_call: FastMap<(NodeId, u64), Switched>,
}

impl SwitchedCalls {
    /// Calls tracked at most (about 64 bytes each).
    pub(crate) const CAP: usize = 65_536;
    /// The longest a call is tracked, whatever its deadline.
    pub(crate) const MAX_TRACKED: Duration = Duration::from_secs(600);

    /// Notes that the call `call_id` from `caller` to `callee`, with `deadline` left, went out on
    /// `link` at `now`. A call sent on again (its first link closed before writing it) moves to
    /// the new link. False if it could not be tracked (the table is full).
    pub(crate) fn note(
        &mut self,
        caller: NodeId,
        callee: NodeId,
        call_id: u64,
        link: LinkId,
        deadline: Duration,
        now: Instant,
    ) -> bool {
        let key = (caller, call_id);
        if self.by_call.len() >= Self::CAP && !self.by_call.contains_key(&key) {
            self.by_call.retain(|_, s| s.expires > now);
            if self.by_call.len() >= Self::CAP {
                return false;
            }
        }
        let expires = now + deadline.min(Self::MAX_TRACKED);
        self.by_call.insert(key, Switched { caller, callee, call_id, link, expires });
        true
    }

    /// The call `call_id` from `caller` was answered or cancelled: it is no longer waited for.
    pub(crate) fn settle(&mut self, caller: NodeId, call_id: u64) {
        self.by_call.remove(&(caller, call_id));
    }

    /// Takes the calls that went out on `link` (it closed) and are still waited for at `now`.
    pub(crate) fn take_link(&mut self, link: LinkId, now: Instant) -> Vec<Switched> {
        let mut taken = Vec::new();
        self.by_call.retain(|_, s| {
            if s.link != link {
                return true;
            }
            if s.expires > now {
                taken.push(*s);
            }
            false
        });
        taken
    }

    /// How many calls are tracked.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_call.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> NodeId {
        NodeId::from_bytes(n.to_le_bytes())
    }

    /// Two distinct link ids (they come only from links, so two in-memory links give them).
    fn two_links() -> (LinkId, LinkId) {
        let (a, _) = gearmesh_transport::Link::pair();
        let (b, _) = gearmesh_transport::Link::pair();
        (a.sender().id(), b.sender().id())
    }

    #[tokio::test]
    async fn a_broken_link_gives_back_its_unanswered_calls_and_only_those() {
        let t0 = Instant::now();
        let (l1, l2) = two_links();
        let mut calls = SwitchedCalls::default();
        let long = Duration::from_secs(30);
        assert!(calls.note(id(1), id(9), 10, l1, long, t0));
        assert!(calls.note(id(2), id(9), 10, l1, long, t0), "the same id from another caller is another call");
        assert!(calls.note(id(1), id(9), 11, l1, long, t0));
        assert!(calls.note(id(1), id(8), 12, l2, long, t0));
        calls.settle(id(1), 11);
        let mut taken: Vec<_> = calls.take_link(l1, t0).iter().map(|s| (s.caller, s.call_id, s.callee)).collect();
        taken.sort_by_key(|(caller, id, _)| (caller.to_string(), *id));
        let mut want = vec![(id(1), 10, id(9)), (id(2), 10, id(9))];
        want.sort_by_key(|(caller, id, _)| (caller.to_string(), *id));
        assert_eq!(taken, want);
        assert_eq!(calls.len(), 1, "the other link's call stays");
        assert!(calls.take_link(l1, t0).is_empty(), "taken once");
    }

    #[tokio::test]
    async fn a_call_sent_on_again_moves_and_one_past_its_deadline_is_not_given_back() {
        let t0 = Instant::now();
        let (l1, l2) = two_links();
        let mut calls = SwitchedCalls::default();
        calls.note(id(1), id(9), 1, l1, Duration::from_secs(5), t0);
        calls.note(id(1), id(9), 1, l2, Duration::from_secs(5), t0);
        assert!(calls.take_link(l1, t0).is_empty());
        calls.note(id(1), id(9), 2, l2, Duration::from_secs(1), t0);
        let taken = calls.take_link(l2, t0 + Duration::from_secs(2));
        assert_eq!(taken.iter().map(|s| s.call_id).collect::<Vec<_>>(), vec![1], "call 2's caller gave up");
        assert_eq!(calls.len(), 0);
    }

    #[tokio::test]
    async fn at_the_bound_calls_past_their_deadline_make_room_and_otherwise_new_calls_go_untracked() {
        let t0 = Instant::now();
        let (l1, _) = two_links();
        let mut calls = SwitchedCalls::default();
        calls.note(id(1), id(9), 0, l1, Duration::from_secs(1), t0);
        for n in 1..SwitchedCalls::CAP as u64 {
            assert!(calls.note(id(1), id(9), n, l1, Duration::from_secs(60), t0));
        }
        let later = t0 + Duration::from_secs(2);
        assert!(calls.note(id(2), id(9), 0, l1, Duration::from_secs(60), later), "the lapsed call made room");
        assert_eq!(calls.len(), SwitchedCalls::CAP);
        assert!(!calls.note(id(3), id(9), 0, l1, Duration::from_secs(60), later), "full of live calls");
        assert!(calls.note(id(2), id(9), 0, l1, Duration::from_secs(60), later), "a tracked call may move");
        assert_eq!(calls.len(), SwitchedCalls::CAP);
    }
}

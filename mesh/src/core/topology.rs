//! Topology and routing: which peers to link to (a bounded random graph, a full mesh while the mesh
//! is small), pruning above the bound, dialing with backoff (seeds, referrals, dead nodes' addresses
//! to heal partitions), and shortest-path routes over the link graph known from records.

use std::collections::VecDeque;

use rand::Rng;
use rand::seq::SliceRandom;
use rustc_hash::FxHashMap;

use super::id::NodeId;
use super::types::{Action, MeshEvent, NodeState, Route, Time};
use super::{Core, DisconnectReason, wire};

impl Core {
    /// Link maintenance, once per tick.
    pub(super) fn maintain(&mut self, now: Time) {
        let timeout = self.config.dial_timeout;
        let stale: Vec<String> = self
            .dials
            .iter()
            .filter(|(_, d)| d.pending.is_some_and(|t| now.since(t) > timeout))
            .map(|(a, _)| a.clone())
            .collect();
        for a in stale {
            self.dial_failed(now, &a);
        }
        let pending = self.dials.values().filter(|d| d.pending.is_some()).count();

        // How many links we want: everyone while the mesh is small, else `min_links`.
        let max = self.config.max_links;
        let mut up = 0;
        for e in self.others.values() {
            if e.rec.state.is_up() && !e.rec.addrs.is_empty() {
                up += 1;
                if up > max {
                    break;
                }
            }
        }
        let small = up <= max;
        let target = if small { up } else { self.config.min_links };
        let have = self.links.len() + pending;
        if have < target {
            let want = (target - have).min(2);
            let picks = self.pick_candidates(now, want, small);
            for addr in picks {
                self.dial(now, addr);
            }
        }
        if self.links.is_empty() && pending == 0 {
            let mut addrs: Vec<String> = self.seeds.clone();
            addrs.extend(self.referrals.drain(..));
            for a in addrs {
                if self.dialable(now, &a) {
                    self.dial(now, a);
                }
            }
        } else if self.links.len() < target
            && pending == 0
            && let Some(a) = self.referrals.pop_front()
            && self.dialable(now, &a)
        {
            self.dial(now, a);
        }
        let linked_shortcuts = self.shortcuts.iter().filter(|p| self.links.contains_key(p)).count();
        if self.links.len() - linked_shortcuts > max {
            self.prune_one(now);
        }
        let wanted: Vec<NodeId> = self.shortcuts.iter().filter(|p| !self.links.contains_key(p)).copied().collect();
        for peer in wanted {
            if let Some(a) = self.candidate_addr(now, peer) {
                self.dial(now, a);
            }
        }
        if now >= self.next_dead_retry {
            self.next_dead_retry = now + self.config.dead_retry_interval;
            self.retry_dead(now);
        }
    }

    fn dialable(&self, now: Time, addr: &str) -> bool {
        if self.me.addrs.iter().any(|a| a == addr) {
            return false;
        }
        self.dials.get(addr).is_none_or(|d| d.pending.is_none() && d.not_before <= now)
    }

    /// The first address of `addrs` to dial now: the preferred scheme first, then the others in
    /// advertised order (so a node reached over one transport is tried over the other when that
    /// fails and backs off).
    fn dial_addr(&self, now: Time, addrs: &[String]) -> Option<String> {
        let preferred = |a: &String| self.config.preferred_scheme.as_deref().is_some_and(|p| a.starts_with(p));
        let mut first = addrs.iter().filter(|a| preferred(a)).chain(addrs.iter().filter(|a| !preferred(a)));
        first.find(|a| self.dialable(now, a)).cloned()
    }

    fn dial(&mut self, now: Time, addr: String) {
        self.dials.entry(addr.clone()).or_default().pending = Some(now);
        self.push_action(Action::Dial { addr });
    }

    /// The address to dial for a node, if it is a candidate for a new link.
    fn candidate_addr(&self, now: Time, id: NodeId) -> Option<String> {
        let e = self.others.get(&id)?;
        if e.rec.state != NodeState::Alive || self.links.contains_key(&id) {
            return None;
        }
        if self.cooldown.get(&id).is_some_and(|t| *t > now) {
            return None;
        }
        self.dial_addr(now, &e.rec.addrs)
    }

    /// Up to `want` addresses of nodes to link to: random ones, or all in order while small.
    fn pick_candidates(&mut self, now: Time, want: usize, small: bool) -> Vec<String> {
        let mut out = Vec::new();
        if small {
            let ids: Vec<NodeId> = self.others.keys().copied().collect();
            for id in ids {
                if out.len() >= want {
                    break;
                }
                if let Some(a) = self.candidate_addr(now, id) {
                    out.push(a);
                }
            }
            return out;
        }
        for _ in 0..16 {
            if out.len() >= want || self.order.is_empty() {
                break;
            }
            let id = self.order[self.rng.random_range(0..self.order.len())];
            if let Some(a) = self.candidate_addr(now, id)
                && !out.contains(&a)
            {
                out.push(a);
            }
        }
        out
    }

    /// Redials one random dead node's address (partition healing), with per-address backoff.
    fn retry_dead(&mut self, now: Time) {
        for _ in 0..8 {
            if self.order.is_empty() {
                return;
            }
            let id = self.order[self.rng.random_range(0..self.order.len())];
            let Some(e) = self.others.get(&id) else {
                continue;
            };
            if e.rec.state != NodeState::Dead || self.links.contains_key(&id) {
                continue;
            }
            if let Some(a) = self.dial_addr(now, &e.rec.addrs) {
                self.dial(now, a);
                return;
            }
        }
    }

    /// Addresses of a few random alive nodes, for a peer we push away.
    pub(super) fn referral_addrs(&mut self, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        for _ in 0..n * 4 {
            if out.len() >= n || self.order.is_empty() {
                break;
            }
            let id = self.order[self.rng.random_range(0..self.order.len())];
            if let Some(e) = self.others.get(&id)
                && e.rec.state == NodeState::Alive
                && let Some(a) = e.rec.addrs.first()
                && !out.contains(a)
            {
                out.push(a.clone());
            }
        }
        out
    }

    /// Drops one link past its grace period, preferring the peer with the most links (it stays
    /// best connected without us).
    fn prune_one(&mut self, now: Time) {
        let grace = self.config.link_grace;
        let mut victims: Vec<(usize, NodeId)> = self
            .links
            .iter()
            .filter(|(p, l)| now.since(l.since) >= grace && !self.shortcuts.contains(p))
            .map(|(p, _)| (self.others.get(p).map_or(0, |e| e.rec.links.len()), *p))
            .collect();
        if victims.is_empty() {
            return;
        }
        victims.shuffle(&mut self.rng);
        victims.sort_by_key(|(deg, _)| std::cmp::Reverse(*deg));
        let peer = victims[0].1;
        let referrals = self.referral_addrs(4);
        self.push_transmit(peer, wire::encode_prune(&referrals));
        self.push_action(Action::Disconnect { peer, reason: DisconnectReason::Pruned });
        self.links.remove(&peer);
        self.cooldown.insert(peer, now + self.config.prune_cooldown);
        self.push_event(MeshEvent::LinkDown(peer));
        self.links_changed();
    }

    /// Breadth-first shortest paths from this node. An edge between two other nodes counts only if
    /// both are up and both list it (so a dead node's stale record cannot attract traffic); our own
    /// edges are our live links.
    ///
    /// Alive nodes that stay unreachable for `link_timeout + suspicion_min` are suspected: nobody
    /// may be linked to them any more (a partition, or a crash no linked peer saw).
    pub(super) fn recompute_routes(&mut self, now: Time) {
        self.routes_dirty = false;
        self.routes_urgent = false;
        // Links of every node that can be reached, in a hash map: the search does one lookup per
        // edge. A node that left gracefully is still reached while a path of links to it stays
        // up (it finishes the calls it runs and its answers to them, and cancels reach it), but
        // never passed through; new calls choose among up nodes only.
        // Each node's links, and whether paths may pass through it.
        let reachable = |s: NodeState| s.is_up() || s == NodeState::Left;
        let mut up: FxHashMap<NodeId, (&[NodeId], bool)> = FxHashMap::default();
        up.reserve(self.others.len());
        for (id, e) in &self.others {
            if reachable(e.rec.state) {
                up.insert(*id, (e.rec.links.as_slice(), e.rec.state.is_up()));
            }
        }
        let mut routes: FxHashMap<NodeId, Route> = FxHashMap::default();
        routes.reserve(up.len());
        let mut queue: VecDeque<(NodeId, Route)> = VecDeque::new();
        for peer in self.links.keys() {
            if self.others.get(peer).is_some_and(|e| !reachable(e.rec.state)) {
                continue;
            }
            let r = Route { next_hop: *peer, hops: 1 };
            routes.insert(*peer, r);
            queue.push_back((*peer, r));
        }
        while let Some((u, r)) = queue.pop_front() {
            let Some(&(ulinks, transit)) = up.get(&u) else {
                continue;
            };
            if !transit {
                continue;
            }
            for v in ulinks {
                if *v == self.id || routes.contains_key(v) {
                    continue;
                }
                let Some(&(vlinks, _)) = up.get(v) else {
                    continue;
                };
                if !vlinks.contains(&u) {
                    continue;
                }
                let rv = Route { next_hop: r.next_hop, hops: r.hops + 1 };
                routes.insert(*v, rv);
                queue.push_back((*v, rv));
            }
        }
        if routes != self.routes {
            self.routes = routes;
            self.push_event(MeshEvent::RoutesChanged);
        }
        let grace = self.config.link_timeout + self.config.suspicion_min;
        let mut lost = Vec::new();
        for (id, e) in &self.others {
            if e.rec.state != NodeState::Alive || self.routes.contains_key(id) {
                self.unreachable.remove(id);
                continue;
            }
            let since = *self.unreachable.entry(*id).or_insert(now);
            if now.since(since) >= grace {
                lost.push(*id);
            }
        }
        for id in lost {
            self.unreachable.remove(&id);
            self.suspect(now, id);
        }
    }
}

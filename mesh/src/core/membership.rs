//! Membership: merging gossiped node records, suspicion and refutation (SWIM with Lifeguard-style
//! confirmations), flooding new versions to links, and digest-based anti-entropy.

use std::time::Duration;

use rand::Rng;

use super::id::NodeId;
use super::types::{Key, MeshEvent, NodeRecord, NodeState, Time};
use super::wire::{self, DIGEST_ENTRY_LEN, DigestEntry, HEADER_LEN};
use super::{Core, DisconnectReason, Entry};

/// An order-independent hash of one record version, summed per bucket in summaries.
fn record_hash(rec: &NodeRecord) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = rustc_hash::FxHasher::default();
    rec.id.hash(&mut h);
    rec.key().hash(&mut h);
    // Fx is weak on its own; finish with a 64-bit mix so sums of hashes rarely collide.
    let mut x = h.finish();
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x
}

/// The id just before `id` in byte order (saturating at zero).
fn pred(id: NodeId) -> NodeId {
    let mut b = *id.as_bytes();
    for x in b.iter_mut().rev() {
        if *x == 0 {
            *x = 0xff;
        } else {
            *x -= 1;
            return NodeId::from_bytes(b);
        }
    }
    NodeId::from_bytes([0; 16])
}

impl Core {
    /// Merges a record heard from a peer.
    pub(super) fn merge(&mut self, now: Time, rec: NodeRecord) {
        if rec.id == self.id {
            self.merge_self(rec);
            return;
        }
        if let Some((tkey, _)) = self.tombstones.get(&rec.id) {
            if rec.key() <= *tkey {
                return;
            }
            self.tombstones.remove(&rec.id);
        }
        let id = rec.id;
        let Some(entry) = self.others.get_mut(&id) else {
            if rec.state.is_up() {
                self.push_event(MeshEvent::NodeJoined(id));
                for g in &rec.gears {
                    self.push_event(MeshEvent::GearAdded { node: id, gear: g.clone() });
                }
                // A new node is reachable only once routes include it: do not make it wait for
                // the route interval (bursts of joins coalesce by URGENT_ROUTE_GAP).
                self.routes_dirty = true;
                self.routes_urgent = true;
            }
            if rec.state == NodeState::Suspect {
                self.suspicions.insert(id, now);
            }
            let rec_up_alive = rec.state == NodeState::Alive;
            self.others.insert(id, Entry { rec, since: now });
            self.order.push(id);
            if rec_up_alive {
                self.lazy.insert(id);
            } else {
                self.urgent.insert(id);
            }
            return;
        };
        let old = &mut entry.rec;
        if rec.key() == old.key() {
            // Same claim: only suspicion confirmations can grow (a set union, capped).
            if rec.state != NodeState::Suspect {
                return;
            }
            let cap = self.config.suspicion_confirmations + 1;
            let mut grew = false;
            for s in rec.suspecters {
                if old.suspecters.len() < cap && !old.suspecters.contains(&s) {
                    old.suspecters.push(s);
                    grew = true;
                }
            }
            if grew {
                self.urgent.insert(id);
            }
            return;
        }
        if rec.key() < old.key() {
            return;
        }
        let mut rec = rec;
        if rec.state == NodeState::Suspect && old.state == NodeState::Suspect && rec.incarnation == old.incarnation {
            // A newer content version of the same suspicion: keep the confirmations we had.
            let cap = self.config.suspicion_confirmations + 1;
            for s in &old.suspecters {
                if rec.suspecters.len() < cap && !rec.suspecters.contains(s) {
                    rec.suspecters.push(*s);
                }
            }
        }
        let prev = std::mem::replace(old, rec);
        if prev.state != entry.rec.state {
            entry.since = now;
        }
        let new = entry.rec.clone();
        if prev.state != new.state || prev.incarnation != new.incarnation {
            self.urgent.insert(id);
        } else {
            self.lazy.insert(id);
        }
        self.record_changed(now, &prev, &new);
    }

    /// Events, suspicion timers and routing after a node's record changed from `prev` to `new`.
    fn record_changed(&mut self, now: Time, prev: &NodeRecord, new: &NodeRecord) {
        let id = new.id;
        match (prev.state.is_up(), new.state.is_up()) {
            (true, false) => {
                let graceful = new.state == NodeState::Left;
                self.push_event(MeshEvent::NodeLeft { id, graceful });
                for g in &prev.gears {
                    self.push_event(MeshEvent::GearRemoved { node: id, gear: g.clone() });
                }
                self.routes_dirty = true;
                self.routes_urgent = true;
            }
            (false, true) => {
                self.push_event(MeshEvent::NodeAlive(id));
                for g in &new.gears {
                    self.push_event(MeshEvent::GearAdded { node: id, gear: g.clone() });
                }
                self.routes_dirty = true;
                self.routes_urgent = true;
            }
            (true, true) => {
                if prev.state == NodeState::Alive && new.state == NodeState::Suspect {
                    self.push_event(MeshEvent::NodeSuspected(id));
                } else if prev.state == NodeState::Suspect && new.state == NodeState::Alive {
                    self.push_event(MeshEvent::NodeAlive(id));
                }
                for g in &prev.gears {
                    if !new.gears.contains(g) {
                        self.push_event(MeshEvent::GearRemoved { node: id, gear: g.clone() });
                    }
                }
                for g in &new.gears {
                    if !prev.gears.contains(g) {
                        self.push_event(MeshEvent::GearAdded { node: id, gear: g.clone() });
                    }
                }
                if prev.gears != new.gears || prev.topics != new.topics || prev.addrs != new.addrs {
                    self.push_event(MeshEvent::NodeUpdated(id));
                }
                if prev.links != new.links {
                    self.routes_dirty = true;
                }
            }
            (false, false) => {}
        }
        if new.state == NodeState::Suspect {
            if prev.state != NodeState::Suspect || prev.incarnation != new.incarnation {
                self.suspicions.insert(id, now);
            }
        } else {
            self.suspicions.remove(&id);
        }
    }

    /// A claim about this node: refute anything newer than what we publish.
    fn merge_self(&mut self, rec: NodeRecord) {
        if self.leaving.is_some() || rec.key() <= self.me.key() {
            return;
        }
        self.me.incarnation = self.me.incarnation.max(rec.incarnation) + 1;
        self.me.version += 1;
        self.me.state = NodeState::Alive;
        self.me.suspecters.clear();
        self.urgent.insert(self.id);
    }

    /// We suspect `id` (its link failed or went silent).
    pub(super) fn suspect(&mut self, now: Time, id: NodeId) {
        let me = self.id;
        let cap = self.config.suspicion_confirmations + 1;
        let Some(entry) = self.others.get_mut(&id) else {
            return;
        };
        match entry.rec.state {
            NodeState::Alive => {
                let prev = entry.rec.clone();
                entry.rec.state = NodeState::Suspect;
                entry.rec.suspecters = vec![me];
                entry.since = now;
                let new = entry.rec.clone();
                self.urgent.insert(id);
                self.record_changed(now, &prev, &new);
            }
            NodeState::Suspect => {
                if entry.rec.suspecters.len() < cap && !entry.rec.suspecters.contains(&me) {
                    entry.rec.suspecters.push(me);
                    self.urgent.insert(id);
                }
            }
            NodeState::Dead | NodeState::Left => {}
        }
    }

    /// The suspicion timeout for a node with `n` distinct suspecters (Lifeguard: shrinks
    /// logarithmically from `suspicion_max` to `suspicion_min` as confirmations arrive).
    fn suspicion_timeout(&self, n: usize) -> Duration {
        let k = self.config.suspicion_confirmations as f64;
        let c = n.saturating_sub(1) as f64;
        let (min, max) = (self.config.suspicion_min.as_secs_f64(), self.config.suspicion_max.as_secs_f64());
        let frac = ((c + 1.0).ln() / (k + 1.0).ln()).min(1.0);
        Duration::from_secs_f64((max - (max - min) * frac).max(min))
    }

    /// When the earliest suspicion times out.
    pub(super) fn next_suspicion_deadline(&self) -> Option<Time> {
        self.suspicions
            .iter()
            .map(|(id, since)| {
                let n = self.others.get(id).map_or(1, |e| e.rec.suspecters.len());
                *since + self.suspicion_timeout(n)
            })
            .min()
    }

    /// Declares dead every suspect whose suspicion timed out.
    pub(super) fn check_suspicions(&mut self, now: Time) {
        let mut expired = Vec::new();
        for (id, since) in &self.suspicions {
            let n = self.others.get(id).map_or(1, |e| e.rec.suspecters.len());
            if now >= *since + self.suspicion_timeout(n) {
                expired.push(*id);
            }
        }
        for id in expired {
            self.suspicions.remove(&id);
            let Some(entry) = self.others.get_mut(&id) else {
                continue;
            };
            if entry.rec.state != NodeState::Suspect {
                continue;
            }
            let prev = entry.rec.clone();
            entry.rec.state = NodeState::Dead;
            entry.rec.suspecters.clear();
            entry.since = now;
            let new = entry.rec.clone();
            self.urgent.insert(id);
            self.record_changed(now, &prev, &new);
        }
    }

    /// Whether the link to `peer` is held to `link_timeout`. A node that left gracefully gossips
    /// no more once its news has spread, yet keeps its links while it finishes its calls: its
    /// links are watched by the transport's heartbeats alone.
    fn link_watched(&self, peer: &NodeId) -> bool {
        self.others.get(peer).is_none_or(|e| e.rec.state != NodeState::Left)
    }

    /// When the first link still open will have been silent for longer than `link_timeout`.
    pub(super) fn next_link_deadline(&self) -> Option<Time> {
        let after = self.config.link_timeout + std::time::Duration::from_millis(1);
        self.links.iter().filter(|(p, _)| self.link_watched(p)).map(|(_, l)| l.last_heard + after).min()
    }

    /// Closes links that were silent for `link_timeout` and suspects their peers.
    pub(super) fn check_links(&mut self, now: Time) {
        let timeout = self.config.link_timeout;
        let silent: Vec<NodeId> = self
            .links
            .iter()
            .filter(|(p, l)| self.link_watched(p) && now.since(l.last_heard) > timeout)
            .map(|(p, _)| *p)
            .collect();
        for peer in silent {
            self.links.remove(&peer);
            self.push_action(super::Action::Disconnect { peer, reason: DisconnectReason::Timeout });
            self.push_event(MeshEvent::LinkDown(peer));
            self.links_changed();
            self.suspect(now, peer);
        }
    }

    /// Publishes a new version of our own record (current links included).
    pub(super) fn publish_own(&mut self) {
        self.own_dirty = false;
        self.me.links = self.links.keys().copied().collect();
        self.me.version += 1;
        self.lazy.insert(self.id);
    }

    /// Sends urgent changes (state changes: suspicion, death, leave, refutation) now and, with
    /// `lazy`, the batched content changes too, to every link that does not have them yet.
    pub(super) fn flush(&mut self, lazy: bool) {
        let mut ids: Vec<NodeId> = std::mem::take(&mut self.urgent).into_iter().collect();
        if lazy {
            ids.extend(std::mem::take(&mut self.lazy));
            ids.sort();
            ids.dedup();
        }
        if ids.is_empty() {
            return;
        }
        let mut encoded: Vec<(NodeId, Key, Vec<u8>)> = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(rec) = self.node(id) {
                let mut b = Vec::new();
                wire::encode_record(&mut b, rec);
                encoded.push((id, rec.key(), b));
            }
        }
        let peers: Vec<NodeId> = self.links.keys().copied().collect();
        for peer in peers {
            let Some(link) = self.links.get_mut(&peer) else {
                continue;
            };
            let mut items: Vec<&[u8]> = Vec::new();
            for (id, key, b) in &encoded {
                if link.known.get(id).is_some_and(|k| k >= key) {
                    continue;
                }
                link.known.insert(*id, *key);
                items.push(b.as_slice());
            }
            if items.is_empty() {
                continue;
            }
            let msgs = self.pack_records(&items);
            for m in msgs {
                self.push_transmit(peer, m);
            }
        }
    }

    /// Packs encoded records into messages no larger than `max_message_size`.
    fn pack_records(&self, items: &[&[u8]]) -> Vec<Vec<u8>> {
        let budget = self.config.max_message_size - HEADER_LEN - 2;
        let mut out = Vec::new();
        let mut start = 0;
        while start < items.len() {
            let mut size = 0;
            let mut end = start;
            while end < items.len() && (end == start || size + items[end].len() <= budget) {
                size += items[end].len();
                end += 1;
            }
            out.push(wire::encode_records(items[start..end].iter().copied()));
            start = end;
        }
        out
    }

    /// Per-bucket hashes of every record version we hold (see [`wire::SUMMARY_BUCKETS`]).
    fn summary(&self) -> Vec<u64> {
        let mut h = vec![0u64; wire::SUMMARY_BUCKETS];
        for rec in self.nodes() {
            h[wire::bucket_of(rec.id)] = h[wire::bucket_of(rec.id)].wrapping_add(record_hash(rec));
        }
        h
    }

    /// Starts an anti-entropy exchange with `peer`: our bucket hashes.
    pub(super) fn send_summary(&mut self, peer: NodeId) {
        let h = self.summary();
        self.push_transmit(peer, wire::encode_summary(&h));
    }

    /// The peer's bucket hashes: for each bucket that differs, send our digest of it (asking for
    /// the peer's in return, so both sides end up with the newest of everything).
    pub(super) fn on_summary(&mut self, from: NodeId, hashes: &[u64]) {
        let mine = self.summary();
        for (b, (m, t)) in mine.iter().zip(hashes).enumerate() {
            if m != t {
                let (lo, hi) = wire::bucket_range(b);
                self.send_digest(from, lo, hi, true);
            }
        }
    }

    /// Sends our digest of ids in `lo..=hi` to `peer`, chunked into sub-ranges that fit a message.
    pub(super) fn send_digest(&mut self, peer: NodeId, lo: NodeId, hi: NodeId, want_reply: bool) {
        let per_msg = ((self.config.max_message_size - HEADER_LEN - 35) / DIGEST_ENTRY_LEN).max(1);
        let mut all: Vec<DigestEntry> =
            self.others.range(lo..=hi).map(|(_, e)| DigestEntry { id: e.rec.id, key: e.rec.key() }).collect();
        if self.id >= lo && self.id <= hi {
            let pos = all.partition_point(|e| e.id < self.id);
            all.insert(pos, DigestEntry { id: self.id, key: self.me.key() });
        }
        if all.is_empty() {
            self.push_transmit(peer, wire::encode_digest(lo, hi, &[], want_reply));
            return;
        }
        let chunks: Vec<&[DigestEntry]> = all.chunks(per_msg).collect();
        let mut msgs = Vec::with_capacity(chunks.len());
        for (i, chunk) in chunks.iter().enumerate() {
            let clo = if i == 0 { lo } else { chunk[0].id };
            let chi = match chunks.get(i + 1) {
                Some(next) => pred(next[0].id),
                None => hi,
            };
            msgs.push(wire::encode_digest(clo, chi, chunk, want_reply));
        }
        for m in msgs {
            self.push_transmit(peer, m);
        }
    }

    /// A digest from `from`: send it every record in `lo..=hi` it lacks or holds older, and our own
    /// digest of the range if it asks (then it sends us what we lack).
    pub(super) fn on_digest(
        &mut self,
        from: NodeId,
        lo: NodeId,
        hi: NodeId,
        entries: &[DigestEntry],
        want_reply: bool,
    ) {
        let theirs: rustc_hash::FxHashMap<NodeId, Key> = entries.iter().map(|e| (e.id, e.key)).collect();
        let mut items: Vec<Vec<u8>> = Vec::new();
        let mut they_have_newer = false;
        for rec in self.nodes() {
            if rec.id < lo || rec.id > hi {
                continue;
            }
            match theirs.get(&rec.id) {
                Some(k) if *k >= rec.key() => they_have_newer |= *k > rec.key(),
                _ => {
                    let mut b = Vec::new();
                    wire::encode_record(&mut b, rec);
                    items.push(b);
                }
            }
        }
        let refs: Vec<&[u8]> = items.iter().map(Vec::as_slice).collect();
        for m in self.pack_records(&refs) {
            self.push_transmit(from, m);
        }
        let unknown = entries.iter().any(|e| e.id != self.id && !self.others.contains_key(&e.id));
        if want_reply && (they_have_newer || unknown) {
            self.send_digest(from, lo, hi, false);
        }
    }

    /// Periodic push-pull with one random link.
    pub(super) fn anti_entropy(&mut self) {
        if self.links.is_empty() {
            return;
        }
        let i = self.rng.random_range(0..self.links.len());
        if let Some(peer) = self.links.keys().nth(i).copied() {
            self.send_summary(peer);
        }
    }

    /// Forgets dead records older than `dead_gc` (keeping a tombstone) and expired tombstones.
    pub(super) fn gc(&mut self, now: Time) {
        let ttl = self.config.dead_gc;
        let old: Vec<NodeId> = self
            .others
            .values()
            .filter(|e| !e.rec.state.is_up() && now.since(e.since) > ttl)
            .map(|e| e.rec.id)
            .collect();
        if !old.is_empty() {
            for id in &old {
                if let Some(e) = self.others.remove(id) {
                    self.tombstones.insert(*id, (e.rec.key(), now));
                }
            }
            self.order = self.others.keys().copied().collect();
        }
        self.tombstones.retain(|_, (_, t)| now.since(*t) <= ttl * 6);
        self.cooldown.retain(|_, t| *t > now);
    }
}

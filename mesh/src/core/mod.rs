//! The sans-IO mesh core: membership gossip, failure detection, topology and routing.
//!
//! A [`Core`] is a pure state machine. The driver feeds it inputs (`handle_*`, each taking the
//! current virtual [`Time`]) and drains its outputs (`poll_*`). It never reads a clock, never does
//! I/O and draws randomness only from an RNG seeded by [`Config::rng_seed`], so a simulation with
//! the same seed and inputs replays exactly.
//!
//! Driver contract:
//! - Call `handle_timeout(now)` no later than `poll_timeout()`.
//! - After every `handle_*` call, drain `poll_transmit` (send the bytes to that linked peer in a
//!   gossip frame) **before** `poll_action` (a `Prune` message precedes its `Disconnect`), then
//!   `poll_event`.
//! - Output queues are bounded by [`Config::max_queue`]: a consumer that does not drain them loses
//!   the newest outputs (counted by [`Core::dropped_outputs`]); gossip repairs itself through
//!   anti-entropy, and events are hints (the queries are authoritative).
//!
//! What is not here: sockets, links, frame switching and call bookkeeping (the transport and the
//! node), and the async driver.

mod id;
mod membership;
mod topology;
mod types;
mod wire;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rustc_hash::FxHashMap;

pub use id::{NodeId, ParseNodeIdError};
pub use types::{
    Action, Config, DisconnectReason, GearAd, LinkDownReason, LinkInfo, MeshEvent, NodeRecord, NodeState, Route, Time,
};
pub use wire::{DecodeError, WIRE_VERSION};

/// Shortest gap between two urgent route recomputations (a burst of deaths reroutes once).
const URGENT_ROUTE_GAP: std::time::Duration = std::time::Duration::from_millis(100);

/// The error of [`Core::set_local`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SetLocalError {
    /// The encoded record would exceed [`Config::max_record_size`]; nothing changed.
    #[error("node record of {size} bytes exceeds the limit of {limit} bytes")]
    RecordTooLarge {
        /// The encoded size.
        size: usize,
        /// The limit.
        limit: usize,
    },
}

/// A record we hold about another node, with when its state last changed.
#[derive(Debug, Clone)]
struct Entry {
    rec: NodeRecord,
    since: Time,
}

/// A direct link.
#[derive(Debug, Clone)]
struct Link {
    /// The newest version of each record the peer is known to hold (sent by us or to us).
    known: FxHashMap<NodeId, types::Key>,
    since: Time,
    last_heard: Time,
    sent_this_tick: bool,
}

/// Dial bookkeeping for one address.
#[derive(Debug, Clone, Default)]
struct DialState {
    pending: Option<Time>,
    failures: u32,
    not_before: Time,
}

/// The mesh core of one node. See the module docs for the driver contract.
#[derive(Debug)]
pub struct Core {
    id: NodeId,
    config: Config,
    rng: StdRng,
    me: NodeRecord,
    others: BTreeMap<NodeId, Entry>,
    /// Ids in `others`, for random sampling (rebuilt on GC).
    order: Vec<NodeId>,
    /// Version keys of garbage-collected dead nodes, so old gossip cannot resurrect them.
    tombstones: FxHashMap<NodeId, (types::Key, Time)>,
    links: BTreeMap<NodeId, Link>,
    /// Suspected nodes and when we learned of the suspicion.
    suspicions: BTreeMap<NodeId, Time>,
    dials: BTreeMap<String, DialState>,
    seeds: Vec<String>,
    referrals: VecDeque<String>,
    cooldown: FxHashMap<NodeId, Time>,
    /// Peers we keep a direct shortcut link to (not pruned, not counted in `max_links`).
    shortcuts: BTreeSet<NodeId>,
    /// Records whose state changed: forwarded at the end of the current input.
    urgent: BTreeSet<NodeId>,
    /// Records whose content changed: forwarded at the next tick, batched.
    lazy: BTreeSet<NodeId>,
    own_dirty: bool,
    routes: FxHashMap<NodeId, Route>,
    routes_dirty: bool,
    /// Alive nodes missing from the routes, and since when.
    unreachable: FxHashMap<NodeId, Time>,
    routes_urgent: bool,
    /// Urgent reroutes are coalesced: at most one per `URGENT_ROUTE_GAP`.
    next_urgent_route: Time,
    transmits: VecDeque<(NodeId, Bytes)>,
    actions: VecDeque<Action>,
    events: VecDeque<MeshEvent>,
    dropped: u64,
    next_tick: Time,
    next_sync: Time,
    next_dead_retry: Time,
    next_gc: Time,
    next_publish: Time,
    next_route: Time,
    leaving: Option<Time>,
    stopped: bool,
}

// === impl Core: construction and inputs ===

impl Core {
    /// A core for node `id` advertising `addrs` (empty for a node that does not listen).
    pub fn new(now: Time, id: NodeId, addrs: Vec<String>, config: Config) -> Self {
        let mut config = config;
        config.max_links = config.max_links.max(1);
        config.min_links = config.min_links.clamp(1, config.max_links);
        config.hard_max_links = config.hard_max_links.max(config.max_links);
        config.suspicion_confirmations = config.suspicion_confirmations.max(1);
        config.max_message_size = config.max_message_size.max(1024);
        config.max_record_size = config.max_record_size.clamp(256, config.max_message_size - 64);
        let rng = StdRng::seed_from_u64(config.rng_seed);
        let me = NodeRecord {
            id,
            incarnation: config.incarnation,
            version: 1,
            state: NodeState::Alive,
            suspecters: Vec::new(),
            addrs,
            gears: Vec::new(),
            topics: Vec::new(),
            links: Vec::new(),
            name: config.name.clone(),
        };
        Self {
            id,
            rng,
            me,
            others: BTreeMap::new(),
            order: Vec::new(),
            tombstones: FxHashMap::default(),
            links: BTreeMap::new(),
            suspicions: BTreeMap::new(),
            dials: BTreeMap::new(),
            seeds: Vec::new(),
            referrals: VecDeque::new(),
            cooldown: FxHashMap::default(),
            shortcuts: BTreeSet::new(),
            urgent: BTreeSet::new(),
            lazy: BTreeSet::new(),
            own_dirty: false,
            routes: FxHashMap::default(),
            routes_dirty: false,
            unreachable: FxHashMap::default(),
            routes_urgent: false,
            next_urgent_route: now,
            transmits: VecDeque::new(),
            actions: VecDeque::new(),
            events: VecDeque::new(),
            dropped: 0,
            next_tick: now,
            next_sync: now + config.sync_interval,
            next_dead_retry: now + config.dead_retry_interval,
            next_gc: now + config.dead_gc,
            next_publish: now,
            next_route: now,
            leaving: None,
            stopped: false,
            config,
        }
    }

    /// The transport finished a handshake with `peer`.
    pub fn handle_link_up(&mut self, now: Time, peer: NodeId, info: LinkInfo) {
        if let Some(addr) = &info.dialed {
            self.dials.remove(addr);
        }
        if peer == self.id {
            return;
        }
        if self.leaving.is_some() {
            self.push_action(Action::Disconnect { peer, reason: DisconnectReason::Leaving });
            return;
        }
        if self.links.contains_key(&peer) {
            return;
        }
        if self.links.len() >= self.config.hard_max_links {
            let referrals = self.referral_addrs(4);
            self.push_transmit(peer, wire::encode_prune(&referrals));
            self.push_action(Action::Disconnect { peer, reason: DisconnectReason::Full });
            return;
        }
        let link = Link { known: FxHashMap::default(), since: now, last_heard: now, sent_this_tick: false };
        self.links.insert(peer, link);
        self.push_event(MeshEvent::LinkUp(peer));
        // A new link of ours reroutes at once (coalesced by URGENT_ROUTE_GAP): until then the peer,
        // though linked, has no route and calls to it would fail.
        self.links_changed();
        if self.id < peer {
            self.send_summary(peer);
        }
        self.finish(now);
    }

    /// The link to `peer` is gone.
    pub fn handle_link_down(&mut self, now: Time, peer: NodeId, reason: LinkDownReason) {
        if self.links.remove(&peer).is_none() {
            return;
        }
        self.push_event(MeshEvent::LinkDown(peer));
        self.links_changed();
        if reason != LinkDownReason::Closed {
            self.suspect(now, peer);
        }
        self.finish(now);
    }

    /// Gossip bytes arrived from linked peer `from`. Bytes from a peer that is not linked are
    /// ignored. On error nothing changed; the driver should close the link (it is misbehaving).
    pub fn handle_message(&mut self, now: Time, from: NodeId, bytes: &[u8]) -> Result<(), DecodeError> {
        let Some(link) = self.links.get_mut(&from) else {
            return Ok(());
        };
        link.last_heard = now;
        let msg = wire::decode(bytes, self.config.max_message_size)?;
        match msg {
            wire::Msg::Heartbeat => {}
            wire::Msg::Records(records) => {
                for rec in &records {
                    let k = link.known.entry(rec.id).or_insert(rec.key());
                    *k = (*k).max(rec.key());
                }
                for rec in records {
                    self.merge(now, rec);
                }
            }
            wire::Msg::Digest { lo, hi, entries, want_reply } => self.on_digest(from, lo, hi, &entries, want_reply),
            wire::Msg::Summary { hashes } => self.on_summary(from, &hashes),
            wire::Msg::Prune { referrals } => {
                self.links.remove(&from);
                self.cooldown.insert(from, now + self.config.prune_cooldown);
                // The driver stops sending on the link now, while the peer still reads it:
                // sending until the peer closes it would lose what is in flight then.
                self.push_action(Action::Disconnect { peer: from, reason: DisconnectReason::PrunedByPeer });
                self.push_event(MeshEvent::LinkDown(from));
                self.links_changed();
                for r in referrals {
                    if self.referrals.len() >= 16 {
                        self.referrals.pop_front();
                    }
                    self.referrals.push_back(r);
                }
            }
        }
        self.finish(now);
        Ok(())
    }

    /// Timers: call at or after `poll_timeout()`.
    pub fn handle_timeout(&mut self, now: Time) {
        if self.stopped {
            return;
        }
        if let Some(deadline) = self.leaving {
            if now >= deadline {
                // The news has spread: gossip and link upkeep stop. The links stay, and with
                // them the routes: calls still running here answer over them and make calls of
                // their own; the driver closes them when its node has finished those calls.
                self.stopped = true;
            }
            return;
        }
        self.check_suspicions(now);
        // At its own deadline, not the next tick's: a silent link is given up `link_timeout`
        // after it fell silent, and suspicion starts up to one gossip interval sooner.
        self.check_links(now);
        if now < self.next_tick {
            self.finish(now);
            return;
        }
        self.next_tick = now + self.config.gossip_interval;
        if self.own_dirty && now >= self.next_publish {
            self.next_publish = now + self.config.publish_interval;
            self.publish_own();
        }
        self.maintain(now);
        if now >= self.next_sync {
            self.next_sync = now + self.config.sync_interval;
            self.anti_entropy();
        }
        if now >= self.next_gc {
            self.next_gc = now + self.config.dead_gc.min(std::time::Duration::from_secs(10));
            self.gc(now);
        }
        self.flush(true);
        let idle: Vec<NodeId> = self.links.iter().filter(|(_, l)| !l.sent_this_tick).map(|(p, _)| *p).collect();
        for peer in idle {
            self.push_transmit(peer, wire::encode_heartbeat());
        }
        for l in self.links.values_mut() {
            l.sent_this_tick = false;
        }
        self.finish(now);
        if self.routes_dirty && now >= self.next_route {
            self.next_route = now + self.config.route_interval;
            self.recompute_routes(now);
        }
    }

    /// Sets what this node hosts and listens to; spreads at once.
    pub fn set_local(&mut self, gears: Vec<GearAd>, topics: Vec<String>) -> Result<(), SetLocalError> {
        let mut candidate = self.me.clone();
        candidate.gears = gears;
        candidate.gears.sort();
        candidate.gears.dedup();
        candidate.topics = topics;
        candidate.topics.sort();
        candidate.topics.dedup();
        let mut buf = Vec::new();
        wire::encode_record(&mut buf, &candidate);
        if buf.len() > self.config.max_record_size {
            return Err(SetLocalError::RecordTooLarge { size: buf.len(), limit: self.config.max_record_size });
        }
        self.me = candidate;
        self.publish_own();
        self.urgent.insert(self.id);
        self.flush(false);
        Ok(())
    }

    /// Changes the addresses this node advertises; spreads at the next tick.
    pub fn set_addrs(&mut self, addrs: Vec<String>) {
        self.me.addrs = addrs;
        self.own_dirty = true;
    }

    /// Asks for a direct shortcut link to `peer` (e.g. a node this one calls often). The core dials
    /// it and never prunes it; the link does not count towards `max_links`. At most
    /// `hard_max_links - max_links` shortcuts; returns false beyond that, and for a node that
    /// advertises no address (a `--no-listen` node cannot be dialed). The peer may still prune
    /// its side if it has too many links; the core redials after `prune_cooldown`.
    pub fn add_shortcut(&mut self, peer: NodeId) -> bool {
        if peer == self.id || self.others.get(&peer).is_none_or(|e| e.rec.addrs.is_empty()) {
            return false;
        }
        if !self.shortcuts.contains(&peer) && self.shortcuts.len() >= self.config.hard_max_links - self.config.max_links
        {
            return false;
        }
        self.shortcuts.insert(peer);
        true
    }

    /// Drops a shortcut: the link becomes an ordinary one (and may be pruned).
    pub fn remove_shortcut(&mut self, peer: NodeId) {
        self.shortcuts.remove(&peer);
    }

    /// Adds seed addresses, dialed (with backoff) whenever this node has no link.
    pub fn add_seeds(&mut self, addrs: Vec<String>) {
        for a in addrs {
            if !self.seeds.contains(&a) {
                self.seeds.push(a);
            }
        }
    }

    /// A `Dial` failed (or was refused); the address is retried with backoff.
    pub fn dial_failed(&mut self, now: Time, addr: &str) {
        let base = self.config.dial_backoff_base.as_millis() as u64;
        let cap = self.config.dial_backoff_cap.as_millis() as u64;
        let jitter: f64 = rand::Rng::random_range(&mut self.rng, 0.5..1.0);
        let d = self.dials.entry(addr.to_string()).or_default();
        d.pending = None;
        d.failures = d.failures.saturating_add(1);
        let exp = base.saturating_mul(1u64 << d.failures.min(20).saturating_sub(1));
        let delay = (exp.min(cap) as f64 * jitter) as u64;
        d.not_before = Time::from_millis(now.as_millis().saturating_add(delay));
    }

    /// Graceful leave: announce `Left` to every link, and after `leave_linger` (time for the news
    /// to spread) stop gossip and link upkeep. The links stay up, for the calls still running
    /// here, until the driver closes them (once its node has finished those calls); a link that
    /// comes up meanwhile is refused (`Disconnect { reason: Leaving }`).
    pub fn leave(&mut self, now: Time) {
        if self.leaving.is_some() {
            return;
        }
        self.me.state = NodeState::Left;
        self.me.version += 1;
        self.urgent.insert(self.id);
        self.flush(false);
        self.leaving = Some(now + self.config.leave_linger);
    }

    /// End of every input: forward what is new, and reroute now if it cannot wait for the tick.
    fn finish(&mut self, now: Time) {
        self.flush(false);
        if self.routes_urgent && now >= self.next_urgent_route {
            self.next_urgent_route = now + URGENT_ROUTE_GAP;
            self.recompute_routes(now);
        } else if self.leaving.is_some() && self.routes_dirty {
            // A leaving node has no ticks any more, yet the calls it still runs call others:
            // what it hears keeps its routes current.
            self.recompute_routes(now);
        }
    }

    /// Our links changed (gained or lost): reroute at once rather than at the next route interval.
    fn links_changed(&mut self) {
        self.own_dirty = true;
        self.routes_dirty = true;
        self.routes_urgent = true;
    }
}

// === impl Core: outputs ===

impl Core {
    /// Gossip bytes to send to a linked peer.
    pub fn poll_transmit(&mut self) -> Option<(NodeId, Bytes)> {
        self.transmits.pop_front()
    }

    /// The next thing the driver must do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next mesh event.
    pub fn poll_event(&mut self) -> Option<MeshEvent> {
        self.events.pop_front()
    }

    /// When to call `handle_timeout` next (`None` once stopped after a leave).
    pub fn poll_timeout(&self) -> Option<Time> {
        if self.stopped {
            return None;
        }
        if let Some(t) = self.leaving {
            return Some(t);
        }
        let mut t = self.next_tick;
        if self.routes_urgent {
            t = t.min(self.next_urgent_route);
        }
        if let Some(silent) = self.next_link_deadline() {
            t = t.min(silent);
        }
        Some(self.next_suspicion_deadline().map_or(t, |d| d.min(t)))
    }

    /// Outputs dropped because a queue was full (the consumer did not drain it).
    pub fn dropped_outputs(&self) -> u64 {
        self.dropped
    }

    fn push_transmit(&mut self, peer: NodeId, bytes: Vec<u8>) {
        if self.transmits.len() >= self.config.max_queue {
            self.dropped += 1;
            return;
        }
        if let Some(l) = self.links.get_mut(&peer) {
            l.sent_this_tick = true;
        }
        self.transmits.push_back((peer, Bytes::from(bytes)));
    }

    fn push_action(&mut self, a: Action) {
        if self.actions.len() >= self.config.max_queue {
            self.dropped += 1;
            return;
        }
        self.actions.push_back(a);
    }

    fn push_event(&mut self, e: MeshEvent) {
        if self.events.len() >= self.config.max_queue {
            self.dropped += 1;
            return;
        }
        self.events.push_back(e);
    }
}

// === impl Core: queries ===

impl Core {
    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The configuration in use (after clamping).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The linked peer to send a frame for `dst` through: `dst` itself when linked, else the first
    /// hop of a shortest path over the link graph known from records. `None` if unreachable.
    pub fn next_hop(&self, dst: NodeId) -> Option<NodeId> {
        if self.links.contains_key(&dst) && self.others.get(&dst).is_none_or(|e| e.rec.state.is_up()) {
            return Some(dst);
        }
        self.routes.get(&dst).map(|r| r.next_hop).filter(|h| self.links.contains_key(h))
    }

    /// Every record this node holds, its own first (dead and left ones included, until GC).
    pub fn nodes(&self) -> impl Iterator<Item = &NodeRecord> {
        std::iter::once(&self.me).chain(self.others.values().map(|e| &e.rec))
    }

    /// The record of one node.
    pub fn node(&self, id: NodeId) -> Option<&NodeRecord> {
        if id == self.id { Some(&self.me) } else { self.others.get(&id).map(|e| &e.rec) }
    }

    /// What this node believes about `id`'s state.
    pub fn state_of(&self, id: NodeId) -> Option<NodeState> {
        self.node(id).map(|r| r.state)
    }

    /// Up (alive or suspect) nodes hosting a gear of that name, this node included.
    pub fn replicas_of(&self, gear: &str) -> Vec<NodeId> {
        self.replicas(gear).collect()
    }

    /// [`Self::replicas_of`] without collecting.
    pub fn replicas<'a>(&'a self, gear: &'a str) -> impl Iterator<Item = NodeId> + 'a {
        self.nodes().filter(move |r| r.state.is_up() && r.gears.iter().any(|g| g.name == gear)).map(|r| r.id)
    }

    /// Up nodes with listeners for `topic`, this node included.
    pub fn interested_in(&self, topic: &str) -> Vec<NodeId> {
        self.nodes().filter(|r| r.state.is_up() && r.topics.iter().any(|t| t == topic)).map(|r| r.id).collect()
    }

    /// The current direct peers.
    pub fn links(&self) -> Vec<NodeId> {
        self.links.keys().copied().collect()
    }

    /// The routing table: destination, next hop and hop count, sorted by destination.
    pub fn routes(&self) -> Vec<(NodeId, Route)> {
        let mut v: Vec<(NodeId, Route)> = self.routes.iter().map(|(k, r)| (*k, *r)).collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }

    /// Whether this node has left (or is leaving) the mesh.
    pub fn is_leaving(&self) -> bool {
        self.leaving.is_some()
    }
}

//! A deterministic network simulation for mesh cores: many `Core`s in one process on a virtual
//! clock, with latency and jitter, loss, partitions, killed and paused nodes, and dialing by address.
//! Time jumps to the next scheduled event; nothing sleeps. Everything is seeded.

#![allow(dead_code, unreachable_pub)]

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};

use bytes::Bytes;
use gearmesh_mesh::{Action, Config, Core, LinkDownReason, LinkInfo, MeshEvent, NodeId, NodeState, Time};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Network parameters of a simulation.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Fixed one-way latency, ms.
    pub latency_ms: u64,
    /// Extra random one-way latency, 0..=jitter ms.
    pub jitter_ms: u64,
    /// Probability that a gossip message is lost.
    pub loss: f64,
    /// The transport's heartbeat timeout: a link to a dead, paused or partitioned peer goes down
    /// this long after the fault.
    pub heartbeat_timeout_ms: u64,
    /// How long a dial to an unreachable address takes to fail.
    pub connect_timeout_ms: u64,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self { latency_ms: 5, jitter_ms: 5, loss: 0.0, heartbeat_timeout_ms: 1000, connect_timeout_ms: 1000 }
    }
}

/// One simulated node.
#[derive(Debug)]
pub struct SimNode {
    pub core: Core,
    pub addr: String,
    pub alive: bool,
    pub paused_until: Option<Time>,
    pub group: u32,
    timer_at: Option<Time>,
}

#[derive(Debug)]
enum Ev {
    Deliver { from: usize, to: usize, gen_: u64, bytes: Bytes },
    LinkUp { a: usize, b: usize, addr: String },
    LinkDown { node: usize, peer: usize, reason: LinkDownReason },
    Close { a: usize, b: usize, gen_: u64 },
    DialFailed { node: usize, addr: String },
    Timer { node: usize },
    FaultCheck { node: usize },
    PartitionCheck,
}

impl Ev {
    fn target(&self) -> Option<usize> {
        match self {
            Ev::Deliver { to, .. } => Some(*to),
            Ev::LinkUp { a, .. } => Some(*a),
            Ev::LinkDown { node, .. } | Ev::DialFailed { node, .. } | Ev::Timer { node } => Some(*node),
            Ev::Close { .. } | Ev::FaultCheck { .. } | Ev::PartitionCheck => None,
        }
    }
}

#[derive(Debug)]
struct Sched {
    at: Time,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Sched {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Sched {}
impl PartialOrd for Sched {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Sched {
    fn cmp(&self, o: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// Counters of what happened on the simulated network.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub messages: u64,
    pub bytes: u64,
    pub lost: u64,
    pub decode_errors: u64,
    /// How many times some node emitted `NodeSuspected` about each node.
    pub suspected: HashMap<NodeId, u64>,
    /// How many times some node emitted a non-graceful `NodeLeft` about each node.
    pub declared_dead: HashMap<NodeId, u64>,
}

/// The simulation.
#[derive(Debug)]
pub struct Sim {
    pub now: Time,
    pub nodes: Vec<SimNode>,
    pub net: NetConfig,
    pub stats: Stats,
    addr_idx: HashMap<String, usize>,
    id_idx: HashMap<NodeId, usize>,
    links: BTreeMap<(usize, usize), u64>,
    next_gen: u64,
    queue: BinaryHeap<Reverse<Sched>>,
    seq: u64,
    rng: StdRng,
    seed: u64,
}

fn key(a: usize, b: usize) -> (usize, usize) {
    if a < b { (a, b) } else { (b, a) }
}

fn ms(t: u64) -> std::time::Duration {
    std::time::Duration::from_millis(t)
}

impl Sim {
    pub fn new(seed: u64, net: NetConfig) -> Self {
        Self {
            now: Time::ZERO,
            nodes: Vec::new(),
            net,
            stats: Stats::default(),
            addr_idx: HashMap::new(),
            id_idx: HashMap::new(),
            links: BTreeMap::new(),
            next_gen: 0,
            queue: BinaryHeap::new(),
            seq: 0,
            rng: StdRng::seed_from_u64(seed),
            seed,
        }
    }

    /// Adds a node now, with `seeds` (addresses of other nodes) to join through. A node that does
    /// not listen advertises no address and cannot be dialed.
    pub fn add_node(&mut self, config: Config, listen: bool, seeds: Vec<String>) -> usize {
        let idx = self.nodes.len();
        let id = NodeId::random(&mut self.rng);
        let addr = format!("wss://n{idx}.sim:443");
        let mut config = config;
        config.rng_seed = self.seed.wrapping_mul(1_000_003).wrapping_add(idx as u64);
        let addrs = if listen { vec![addr.clone()] } else { Vec::new() };
        let mut core = Core::new(self.now, id, addrs, config);
        core.add_seeds(seeds);
        if listen {
            self.addr_idx.insert(addr.clone(), idx);
        }
        self.id_idx.insert(id, idx);
        self.nodes.push(SimNode { core, addr, alive: true, paused_until: None, group: 0, timer_at: None });
        self.schedule(self.now, Ev::Timer { node: idx });
        idx
    }

    pub fn id(&self, i: usize) -> NodeId {
        self.nodes[i].core.id()
    }

    pub fn index_of(&self, id: NodeId) -> Option<usize> {
        self.id_idx.get(&id).copied()
    }

    fn schedule(&mut self, at: Time, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Sched { at, seq: self.seq, ev }));
    }

    fn latency(&mut self) -> Time {
        let j = if self.net.jitter_ms > 0 { self.rng.random_range(0..=self.net.jitter_ms) } else { 0 };
        self.now + ms(self.net.latency_ms + j)
    }

    fn max_latency(&self) -> std::time::Duration {
        ms(self.net.latency_ms + self.net.jitter_ms + 1)
    }

    /// Kills a node (like `kill -9`): it stops answering; its links go down at the peers after
    /// the heartbeat timeout.
    pub fn kill(&mut self, i: usize) {
        let at = self.now + ms(self.net.heartbeat_timeout_ms);
        self.take_down(i, at, LinkDownReason::Timeout);
    }

    /// Stops a node that left, as its driver does once the calls it ran have finished: each of
    /// its links closes in order (seen at the peer after the network's latency), and the node is
    /// gone.
    pub fn stop_after_leave(&mut self, i: usize) {
        let at = self.now + self.max_latency();
        self.take_down(i, at, LinkDownReason::Closed);
    }

    /// Node `i` is gone; each of its peers sees its link go down at `at`, for `reason`.
    fn take_down(&mut self, i: usize, at: Time, reason: LinkDownReason) {
        self.nodes[i].alive = false;
        let peers: Vec<(usize, usize)> = self.links.keys().filter(|(a, b)| *a == i || *b == i).copied().collect();
        for (a, b) in peers {
            let peer = if a == i { b } else { a };
            let gen_ = self.links[&(a, b)];
            self.schedule(at, Ev::Close { a, b, gen_ });
            self.schedule(at, Ev::LinkDown { node: peer, peer: i, reason });
        }
    }

    /// Freezes a node for `dur_ms`: inputs wait until it resumes; links time out meanwhile if the
    /// pause is longer than the heartbeat timeout.
    pub fn pause(&mut self, i: usize, dur_ms: u64) {
        self.nodes[i].paused_until = Some(self.now + ms(dur_ms));
        let at = self.now + ms(self.net.heartbeat_timeout_ms);
        self.schedule(at, Ev::FaultCheck { node: i });
    }

    /// Splits the network: nodes in different groups cannot exchange anything. Links across groups
    /// go down after the heartbeat timeout.
    pub fn partition(&mut self, groups: &[u32]) {
        for (n, g) in self.nodes.iter_mut().zip(groups) {
            n.group = *g;
        }
        let at = self.now + ms(self.net.heartbeat_timeout_ms);
        self.schedule(at, Ev::PartitionCheck);
    }

    /// Removes every partition.
    pub fn heal(&mut self) {
        for n in &mut self.nodes {
            n.group = 0;
        }
    }

    fn tear_down(&mut self, a: usize, b: usize) {
        if self.links.remove(&key(a, b)).is_some() {
            let now = self.now;
            self.schedule(now, Ev::LinkDown { node: a, peer: b, reason: LinkDownReason::Timeout });
            self.schedule(now, Ev::LinkDown { node: b, peer: a, reason: LinkDownReason::Timeout });
        }
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        self.nodes[a].group == self.nodes[b].group
    }

    /// Runs until `until`, processing every event due by then.
    pub fn run_until(&mut self, until: Time) {
        while let Some(Reverse(top)) = self.queue.peek() {
            if top.at > until {
                break;
            }
            let Some(Reverse(s)) = self.queue.pop() else { break };
            self.now = s.at;
            self.process(s.ev);
        }
        self.now = until;
    }

    /// Runs for `dur_ms` more.
    pub fn run_for(&mut self, dur_ms: u64) {
        let until = self.now + ms(dur_ms);
        self.run_until(until);
    }

    /// Runs in steps of `step_ms` until `pred` holds or `max_ms` passed; returns the time it took.
    pub fn run_until_pred(&mut self, step_ms: u64, max_ms: u64, mut pred: impl FnMut(&Sim) -> bool) -> Option<u64> {
        let start = self.now;
        loop {
            if pred(self) {
                return Some(self.now.as_millis() - start.as_millis());
            }
            if self.now.as_millis() - start.as_millis() >= max_ms {
                return None;
            }
            self.run_for(step_ms);
        }
    }

    fn process(&mut self, ev: Ev) {
        if let Some(t) = ev.target() {
            if !self.nodes[t].alive {
                return;
            }
            if let Some(until) = self.nodes[t].paused_until {
                if self.now < until {
                    self.schedule(until, ev);
                    return;
                }
                self.nodes[t].paused_until = None;
            }
        }
        match ev {
            Ev::Deliver { from, to, gen_, bytes } => {
                if self.links.get(&key(from, to)) != Some(&gen_) || !self.reachable(from, to) {
                    return;
                }
                let id = self.nodes[from].core.id();
                let now = self.now;
                if self.nodes[to].core.handle_message(now, id, &bytes).is_err() {
                    self.stats.decode_errors += 1;
                }
                self.drain(to);
            }
            Ev::LinkUp { a, b, addr } => {
                let ok = self.nodes[b].alive
                    && self.nodes[b].paused_until.is_none_or(|t| t <= self.now)
                    && self.reachable(a, b);
                let now = self.now;
                if !ok {
                    self.nodes[a].core.dial_failed(now, &addr);
                    self.drain(a);
                    return;
                }
                let (ida, idb) = (self.id(a), self.id(b));
                let k = key(a, b);
                let fresh = !self.links.contains_key(&k);
                if fresh {
                    self.next_gen += 1;
                    self.links.insert(k, self.next_gen);
                }
                let info_b = LinkInfo {
                    addrs: self.nodes[b].core.node(idb).map(|r| r.addrs.clone()).unwrap_or_default(),
                    dialed: Some(addr),
                };
                self.nodes[a].core.handle_link_up(now, idb, info_b);
                if fresh {
                    let info_a = LinkInfo {
                        addrs: self.nodes[a].core.node(ida).map(|r| r.addrs.clone()).unwrap_or_default(),
                        dialed: None,
                    };
                    self.nodes[b].core.handle_link_up(now, ida, info_a);
                    self.drain(b);
                }
                self.drain(a);
            }
            Ev::LinkDown { node, peer, reason } => {
                let id = self.id(peer);
                let now = self.now;
                self.nodes[node].core.handle_link_down(now, id, reason);
                self.drain(node);
            }
            Ev::Close { a, b, gen_ } => {
                if self.links.get(&key(a, b)) == Some(&gen_) {
                    self.links.remove(&key(a, b));
                }
            }
            Ev::DialFailed { node, addr } => {
                let now = self.now;
                self.nodes[node].core.dial_failed(now, &addr);
                self.drain(node);
            }
            Ev::Timer { node } => {
                self.nodes[node].timer_at = None;
                let now = self.now;
                if self.nodes[node].core.poll_timeout().is_some_and(|t| t <= now) {
                    self.nodes[node].core.handle_timeout(now);
                }
                self.drain(node);
            }
            Ev::FaultCheck { node } => {
                if self.nodes[node].paused_until.is_some_and(|t| t > self.now) {
                    let peers: Vec<usize> = self
                        .links
                        .keys()
                        .filter(|(a, b)| *a == node || *b == node)
                        .map(|(a, b)| if *a == node { *b } else { *a })
                        .collect();
                    for p in peers {
                        self.tear_down(node, p);
                    }
                }
            }
            Ev::PartitionCheck => {
                let crossing: Vec<(usize, usize)> =
                    self.links.keys().filter(|(a, b)| !self.reachable(*a, *b)).copied().collect();
                for (a, b) in crossing {
                    self.tear_down(a, b);
                }
            }
        }
    }

    /// Collects a core's outputs and turns them into scheduled network events.
    fn drain(&mut self, i: usize) {
        while let Some((peer, bytes)) = self.nodes[i].core.poll_transmit() {
            let Some(&p) = self.id_idx.get(&peer) else { continue };
            let Some(&gen_) = self.links.get(&key(i, p)) else { continue };
            self.stats.messages += 1;
            self.stats.bytes += bytes.len() as u64;
            if self.net.loss > 0.0 && self.rng.random_bool(self.net.loss) {
                self.stats.lost += 1;
                continue;
            }
            let at = self.latency();
            self.schedule(at, Ev::Deliver { from: i, to: p, gen_, bytes });
        }
        while let Some(a) = self.nodes[i].core.poll_action() {
            match a {
                Action::Dial { addr } => {
                    let target = self.addr_idx.get(&addr).copied();
                    match target {
                        Some(t) if t != i && self.nodes[t].alive && self.reachable(i, t) => {
                            let at = self.latency() + ms(self.net.latency_ms);
                            self.schedule(at, Ev::LinkUp { a: i, b: t, addr });
                        }
                        Some(t) if self.nodes[t].alive || !self.reachable(i, t) => {
                            let at = self.now + ms(self.net.connect_timeout_ms);
                            self.schedule(at, Ev::DialFailed { node: i, addr });
                        }
                        _ => {
                            let at = self.latency() + ms(self.net.latency_ms);
                            self.schedule(at, Ev::DialFailed { node: i, addr });
                        }
                    }
                }
                Action::Disconnect { peer, .. } => {
                    let Some(&p) = self.id_idx.get(&peer) else { continue };
                    if let Some(&gen_) = self.links.get(&key(i, p)) {
                        let at = self.now + self.max_latency();
                        self.schedule(at, Ev::Close { a: i, b: p, gen_ });
                        self.schedule(at, Ev::LinkDown { node: p, peer: i, reason: LinkDownReason::Closed });
                    }
                }
                _ => {}
            }
        }
        while let Some(e) = self.nodes[i].core.poll_event() {
            match e {
                MeshEvent::NodeSuspected(id) => *self.stats.suspected.entry(id).or_default() += 1,
                MeshEvent::NodeLeft { id, graceful: false } => *self.stats.declared_dead.entry(id).or_default() += 1,
                _ => {}
            }
        }
        if let Some(t) = self.nodes[i].core.poll_timeout() {
            let t = t.max(self.now);
            if self.nodes[i].timer_at.is_none_or(|cur| t < cur) {
                self.nodes[i].timer_at = Some(t);
                self.schedule(t, Ev::Timer { node: i });
            }
        }
    }

    // === checks ===

    /// Nodes that are running (not killed, not left).
    pub fn live(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&i| self.nodes[i].alive && !self.nodes[i].core.is_leaving()).collect()
    }

    /// Whether every node in `group` sees exactly the nodes of `group` as up.
    pub fn converged_among(&self, group: &[usize]) -> bool {
        let ids: HashSet<NodeId> = group.iter().map(|&i| self.id(i)).collect();
        group.iter().all(|&i| {
            let mut up = 0;
            for r in self.nodes[i].core.nodes() {
                if r.state.is_up() {
                    if !ids.contains(&r.id) {
                        return false;
                    }
                    up += 1;
                }
            }
            up == ids.len()
        })
    }

    /// Whether all live nodes agree on the set of live nodes.
    pub fn converged(&self) -> bool {
        self.converged_among(&self.live())
    }

    /// How many live nodes see `id` as up.
    pub fn seen_up_by(&self, id: NodeId) -> usize {
        self.live().iter().filter(|&&i| self.nodes[i].core.state_of(id).is_some_and(NodeState::is_up)).count()
    }

    /// How many live nodes see `id` as alive (not even suspected).
    pub fn seen_alive_by(&self, id: NodeId) -> usize {
        self.live().iter().filter(|&&i| self.nodes[i].core.state_of(id) == Some(NodeState::Alive)).count()
    }

    /// Largest number of links any node holds (from the network's view).
    pub fn max_degree(&self) -> usize {
        let mut deg = vec![0usize; self.nodes.len()];
        for (a, b) in self.links.keys() {
            deg[*a] += 1;
            deg[*b] += 1;
        }
        deg.into_iter().max().unwrap_or(0)
    }

    /// Largest number of links any core believes it has.
    pub fn max_core_links(&self) -> usize {
        self.live().iter().map(|&i| self.nodes[i].core.links().len()).max().unwrap_or(0)
    }

    /// Whether the link graph among `group` is connected.
    pub fn connected_among(&self, group: &[usize]) -> bool {
        if group.is_empty() {
            return true;
        }
        let set: HashSet<usize> = group.iter().copied().collect();
        let mut adj: HashMap<usize, Vec<usize>> = HashMap::new();
        for (a, b) in self.links.keys() {
            if set.contains(a) && set.contains(b) {
                adj.entry(*a).or_default().push(*b);
                adj.entry(*b).or_default().push(*a);
            }
        }
        let mut seen = HashSet::from([group[0]]);
        let mut q = VecDeque::from([group[0]]);
        while let Some(u) = q.pop_front() {
            for v in adj.get(&u).into_iter().flatten() {
                if seen.insert(*v) {
                    q.push_back(*v);
                }
            }
        }
        seen.len() == group.len()
    }

    /// Follows `next_hop` from `src` to `dst` over the live network; the hop count if it arrives.
    pub fn route(&self, src: usize, dst: usize) -> Option<u32> {
        let target = self.id(dst);
        let mut cur = src;
        for hops in 0..64u32 {
            if cur == dst {
                return Some(hops);
            }
            let next = self.nodes[cur].core.next_hop(target)?;
            let n = self.index_of(next)?;
            if !self.links.contains_key(&key(cur, n)) || !self.nodes[n].alive {
                return None;
            }
            cur = n;
        }
        None
    }

    /// Checks `samples` random (src, dst) pairs among `group`; returns (delivered, max hops).
    pub fn check_routes(&mut self, group: &[usize], samples: usize) -> (usize, u32) {
        let mut ok = 0;
        let mut max = 0;
        for _ in 0..samples {
            let s = group[self.rng.random_range(0..group.len())];
            let d = group[self.rng.random_range(0..group.len())];
            if let Some(h) = self.route(s, d) {
                ok += 1;
                max = max.max(h);
            }
        }
        (ok, max)
    }
}

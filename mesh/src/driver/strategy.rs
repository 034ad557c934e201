//! Call strategies and resilience around the remote call path: which replica(s) run a call
//! (local-first, spread, shard, scatter, broadcast), retries within a budget, a circuit breaker
//! per (gear, node), latency-aware spreading, and routing around replicas that shed load.
//!
//! The decisions that need no I/O are plain functions ([`rendezvous`], [`p2c`], [`classify`])
//! and the state machines of [`crate::breaker`]; this file owns the clock and the RNG and makes
//! the calls (through `calls.rs` for other nodes, the host for this one). See
//! `docs/strategies.md` for the choices.

use std::{
    pin::{Pin, pin},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::{StreamExt, stream::FuturesUnordered};
use gearmesh_gears::{
    Arg, Call as GearCall, CallError, ErrorCode, Gather, Payload, Retry, Strategy, WireBody, host::Start,
};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::{sync::futures::Notified, time::Instant};

use super::{FastMap, Mesh, Replicas, calls::RemoteError, lock};
use crate::{
    breaker::{Breaker, BreakerConfig, BreakerState, BudgetConfig, Ewma, RetryBudget, backoff},
    core::{MeshEvent, NodeId, Time},
};

/// How long a call waits for a route to a node that hosts its gear but is not routable yet
/// (it joined a moment ago); past it the call fails `unavailable`.
const ROUTE_WAIT: Duration = Duration::from_secs(2);

/// Settings of retries, breakers and latency tracking.
#[derive(Debug, Clone, PartialEq)]
pub struct ResilienceConfig {
    /// The circuit breaker of each (gear, node).
    pub breaker: BreakerConfig,
    /// The node-wide retry budget.
    pub budget: BudgetConfig,
    /// Attempts per call at most, the first included.
    pub max_attempts: u32,
    /// The first retry waits up to this long (full jitter), doubling for each further retry.
    pub backoff_base: Duration,
    /// A retry never waits longer than this.
    pub backoff_cap: Duration,
    /// (gear, node) pairs tracked at most (breaker and latency). At the bound, the pair used
    /// longest ago is forgotten (a closed breaker with no history is what a new pair starts as).
    pub max_tracked: usize,
    /// A latency sample older than this no longer counts: the replica is tried again as if new.
    pub latency_ttl: Duration,
    /// How long one attempt may take before it is given up and, where a retry is allowed, made
    /// again on another replica (a call's own `per_try_timeout` wins); `None`: attempts run to
    /// the call's deadline.
    pub per_try_timeout: Option<Duration>,
    /// How long a spread call to a port that may be retried waits for its first attempt
    /// before it sends a second one to another replica, keeping the first (a hedged request:
    /// the first reply wins, the other attempt is cancelled); a call's own `hedge_after` wins.
    /// `None`: no hedging.
    pub hedge_after: Option<Duration>,
}

impl Default for ResilienceConfig {
    fn default() -> Self {
        Self {
            breaker: BreakerConfig::default(),
            budget: BudgetConfig::default(),
            max_attempts: 3,
            backoff_base: Duration::from_millis(20),
            backoff_cap: Duration::from_millis(500),
            max_tracked: 4096,
            latency_ttl: Duration::from_secs(10),
            per_try_timeout: None,
            hedge_after: None,
        }
    }
}

/// What a node knows about one (gear, node) pair.
#[derive(Debug)]
struct Health {
    breaker: Breaker,
    latency: Ewma,
    last_sample: Time,
    last_used: Time,
}

/// The breaker of one (gear, node), as shown in `/v1/nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BreakerView {
    /// The gear.
    pub gear: String,
    /// `closed`, `open` or `half_open`.
    pub state: BreakerState,
    /// Calls in the breaker's window.
    pub calls: u32,
    /// Failures among them.
    pub failures: u32,
    /// The average latency seen, in microseconds.
    pub latency_us: Option<u64>,
}

/// Counters of the strategy layer since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ResilienceStats {
    /// Attempts made (first attempts, retries and re-routes).
    pub attempts: u64,
    /// Retries and re-routes made (within the budget).
    pub retries: u64,
    /// Retries the budget refused.
    pub retries_refused: u64,
    /// Attempts not made because the replica's breaker was open.
    pub breaker_rejections: u64,
    /// Hedged attempts: second attempts started while the first still ran (also counted in
    /// `retries`, as each takes a token of the retry budget).
    pub hedges: u64,
}

/// The live state: breakers and latencies per (gear, node), in-flight counts per node, the
/// retry budget.
#[derive(Debug)]
pub(crate) struct Resilience {
    config: ResilienceConfig,
    health: Mutex<HealthMap>,
    /// Calls in flight per node from this layer; removed at zero (so bounded by the nodes).
    inflight: Mutex<FastMap<NodeId, usize>>,
    budget: Mutex<RetryBudget>,
    attempts: AtomicU64,
    breaker_rejections: AtomicU64,
    hedges: AtomicU64,
}

/// The health of every (gear, node) tracked, keyed by gear first so that a call looks its gear
/// up by `&str` without allocating.
#[derive(Debug, Default)]
struct HealthMap {
    by_gear: FastMap<String, FastMap<NodeId, Health>>,
    /// Entries over all gears (bounded by `max_tracked`).
    len: usize,
}

impl HealthMap {
    fn get(&self, gear: &str, node: NodeId) -> Option<&Health> {
        self.by_gear.get(gear).and_then(|m| m.get(&node))
    }

    fn get_mut(&mut self, gear: &str, node: NodeId) -> Option<&mut Health> {
        self.by_gear.get_mut(gear).and_then(|m| m.get_mut(&node))
    }

    /// Forgets the least recently used entry.
    fn evict_oldest(&mut self) {
        let oldest = self
            .by_gear
            .iter()
            .flat_map(|(g, m)| m.iter().map(move |(n, h)| (h.last_used, g, *n)))
            .min_by_key(|(used, _, _)| *used)
            .map(|(_, g, n)| (g.clone(), n));
        if let Some((gear, node)) = oldest
            && let Some(m) = self.by_gear.get_mut(&gear)
            && m.remove(&node).is_some()
        {
            self.len -= 1;
            if m.is_empty() {
                self.by_gear.remove(&gear);
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&String, NodeId, &Health)> {
        self.by_gear.iter().flat_map(|(g, m)| m.iter().map(move |(n, h)| (g, *n, h)))
    }
}

impl Resilience {
    pub(crate) fn new(config: ResilienceConfig) -> Self {
        Self {
            budget: Mutex::new(RetryBudget::new(config.budget.clone(), Time::ZERO)),
            config,
            health: Mutex::default(),
            inflight: Mutex::default(),
            attempts: AtomicU64::new(0),
            breaker_rejections: AtomicU64::new(0),
            hedges: AtomicU64::new(0),
        }
    }

    fn entry<'a>(&self, map: &'a mut HealthMap, gear: &str, node: NodeId, now: Time) -> &'a mut Health {
        if map.get(gear, node).is_none() {
            if map.len >= self.config.max_tracked.max(1) {
                map.evict_oldest();
            }
            if !map.by_gear.contains_key(gear) {
                map.by_gear.insert(gear.to_owned(), FastMap::default());
            }
            let fresh = Health {
                breaker: Breaker::new(self.config.breaker.clone()),
                latency: Ewma::new(),
                last_sample: Time::ZERO,
                last_used: now,
            };
            if let Some(m) = map.by_gear.get_mut(gear) {
                m.insert(node, fresh);
                map.len += 1;
            }
        }
        match map.get_mut(gear, node) {
            Some(h) => {
                h.last_used = now;
                h
            }
            // Inserted just above.
            None => unreachable!("a health entry was just inserted"),
        }
    }

    /// Asks the breaker of (gear, node) for a permit; returns whether the call may go, and the
    /// breaker's new state when it changed.
    fn acquire(&self, gear: &str, node: NodeId, now: Time) -> (bool, Option<BreakerState>) {
        let mut map = lock(&self.health);
        let (ok, changed) = self.entry(&mut map, gear, node, now).breaker.try_acquire(now);
        if !ok {
            self.breaker_rejections.fetch_add(1, Ordering::Relaxed);
        }
        (ok, changed)
    }

    /// Records an attempt's outcome; returns the breaker's new state when it changed.
    fn record(&self, gear: &str, node: NodeId, now: Time, failed: bool, took: Duration) -> Option<BreakerState> {
        let mut map = lock(&self.health);
        let h = self.entry(&mut map, gear, node, now);
        if !failed {
            h.latency.observe(took);
            h.last_sample = now;
        }
        h.breaker.record(now, failed)
    }

    /// The score of each candidate for spreading: calls in flight (plus one) times its recent
    /// latency; a replica without a recent sample takes the best latency among the others, so
    /// new and recovered replicas get traffic.
    fn scores(&self, gear: &str, nodes: &[NodeId], now: Time) -> Vec<f64> {
        let map = lock(&self.health);
        let inflight = lock(&self.inflight);
        let fresh = |n: &NodeId| {
            map.get(gear, *n)
                .filter(|h| now.since(h.last_sample) <= self.config.latency_ttl)
                .and_then(|h| h.latency.get())
        };
        let lat: Vec<Option<f64>> = nodes.iter().map(fresh).collect();
        let best = lat.iter().flatten().copied().fold(f64::INFINITY, f64::min);
        let best = if best.is_finite() { best } else { 1.0 };
        nodes
            .iter()
            .zip(lat)
            .map(|(n, l)| (inflight.get(n).copied().unwrap_or(0) as f64 + 1.0) * l.unwrap_or(best).max(1.0))
            .collect()
    }

    fn begin(&self, node: NodeId) {
        *lock(&self.inflight).entry(node).or_default() += 1;
    }

    fn end(&self, node: NodeId) {
        let mut m = lock(&self.inflight);
        if let Some(n) = m.get_mut(&node) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&node);
            }
        }
    }

    fn release(&self, gear: &str, node: NodeId) {
        if let Some(h) = lock(&self.health).get_mut(gear, node) {
            h.breaker.release();
        }
    }

    pub(crate) fn breakers_of(&self, node: NodeId, now: Time) -> Vec<BreakerView> {
        let map = lock(&self.health);
        let mut v: Vec<BreakerView> = map
            .iter()
            .filter(|(_, n, _)| *n == node)
            .map(|(gear, _, h)| {
                let (calls, failures) = h.breaker.window(now);
                BreakerView {
                    gear: gear.clone(),
                    state: h.breaker.state(now),
                    calls,
                    failures,
                    latency_us: h.latency.get().map(|l| l as u64),
                }
            })
            .collect();
        v.sort_by(|a, b| a.gear.cmp(&b.gear));
        v
    }

    pub(crate) fn stats(&self) -> ResilienceStats {
        let (retries, retries_refused) = lock(&self.budget).counts();
        ResilienceStats {
            attempts: self.attempts.load(Ordering::Relaxed),
            retries,
            retries_refused,
            breaker_rejections: self.breaker_rejections.load(Ordering::Relaxed),
            hedges: self.hedges.load(Ordering::Relaxed),
        }
    }
}

// === pure decisions ===

/// A stable 64-bit hash (FNV-1a, then a SplitMix64 finalizer for spread): the same on every
/// node and every build, unlike `std`'s hasher.
fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in *p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Rendezvous (highest random weight) hashing: `nodes` ordered by their weight for `key`,
/// best first. The first is the key's owner; when it goes away, the key moves to the second,
/// and keys owned by other nodes do not move. A node joining takes about 1/N of the keys.
pub fn rendezvous(key: &str, nodes: &[NodeId]) -> Vec<NodeId> {
    let mut weighted: Vec<(u64, NodeId)> =
        nodes.iter().map(|n| (stable_hash(&[n.as_bytes().as_slice(), key.as_bytes()]), *n)).collect();
    weighted.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    weighted.into_iter().map(|(_, n)| n).collect()
}

/// Power of two choices: of the candidates at indexes `a` and `b` (drawn at random by the
/// caller), the one with the lower score (ties: `a`).
pub fn p2c(scores: &[f64], a: usize, b: usize) -> usize {
    match (scores.get(a), scores.get(b)) {
        (Some(sa), Some(sb)) if sb < sa => b,
        (Some(_), _) => a,
        (None, _) => b,
    }
}

/// What a failed attempt allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The replica refused the call before running it (`overloaded`): another replica may take
    /// it, whatever the port.
    Shed,
    /// The replica could not be reached or did not answer in time (`unavailable`, a `timeout`
    /// before the caller's deadline): the port may or may not have run; retried only for
    /// idempotent ports (or when the caller asks).
    Transient,
    /// The call surely did not run ([`CallError::not_run`]: no route yet, a switch's hop limit,
    /// a link that closed before the call was written, a replica the gear just left): retried
    /// after a backoff, whatever the port, as gRPC retries a call the server never saw. Routes
    /// that are still forming get the backoff's time to settle.
    NotRun,
    /// Anything else (the port's own error, a bad request, not found, forbidden, internal):
    /// never retried.
    Final,
}

/// Classifies an attempt's error; `caller_deadline_passed` turns every failure final.
pub fn classify(e: &CallError, caller_deadline_passed: bool) -> Failure {
    if caller_deadline_passed {
        return Failure::Final;
    }
    match e.code() {
        ErrorCode::Overloaded => Failure::Shed,
        ErrorCode::Unavailable | ErrorCode::Timeout | ErrorCode::NotFound if e.not_run() => Failure::NotRun,
        ErrorCode::Unavailable | ErrorCode::Timeout => Failure::Transient,
        _ => Failure::Final,
    }
}

/// Whether an error counts against the replica's breaker (the replica is unhealthy, not the
/// request).
fn is_replica_failure(e: &CallError) -> bool {
    matches!(e.code(), ErrorCode::Unavailable | ErrorCode::Timeout | ErrorCode::Overloaded | ErrorCode::Internal)
}

/// The shard key in a JSON input's `"key"` field (a string, or any number or boolean as text).
fn key_of(arg: &Arg<'_>) -> Result<String, CallError> {
    let missing = || CallError::bad_request("strategy shard needs a key: ?key=, CallOptions, or a \"key\" field");
    let WireBody::Json(json) = arg.to_wire()? else { return Err(missing()) };
    let v: Value = serde_json::from_slice(&json).map_err(|_| missing())?;
    match v.get("key") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v @ (Value::Number(_) | Value::Bool(_))) => Ok(v.to_string()),
        _ => Err(missing()),
    }
}

// === impl Mesh ===

/// How a unary call orders its candidates.
enum Order {
    /// Power of two choices over load x latency.
    Spread,
    /// Rendezvous order for the key.
    Shard(String),
}

impl Mesh {
    /// Runs a call with its strategy (`call.meta.strategy`, local-first when `None`), retries
    /// and breakers. The caller has already checked the caller's permission.
    ///
    /// # Errors
    /// As [`Mesh::call`]; `bad_request` for a shard call without a key.
    ///
    /// # Cancel safety
    /// Dropping the future cancels the attempts in flight (remote ones get a `Cancel`) and gives
    /// a half-open breaker its probe slot back; retries not yet made are not made. A broadcast's
    /// calls, once started, run on.
    pub async fn call_with_strategy(&self, call: GearCall<'_>) -> Result<Payload, CallError> {
        let strategy = call.meta.strategy.clone().unwrap_or_default();
        match strategy {
            Strategy::LocalFirst => {
                if self.inner.host.has_gear(call.gear) {
                    let retry = call.clone_parts();
                    let local = self.run_here(call).await;
                    match local {
                        Err(e)
                            if (e.code() == ErrorCode::Overloaded || e.not_run())
                                && self.gear_is_remote(retry.gear) =>
                        {
                            // Shed or refused here (the port did not run): another replica may
                            // take it.
                            self.unary(retry, Order::Spread, false).await
                        }
                        other => other,
                    }
                } else {
                    self.unary(call, Order::Spread, false).await
                }
            }
            Strategy::Spread => self.unary(call, Order::Spread, true).await,
            Strategy::Shard(key) => {
                let key = match key {
                    Some(k) => k,
                    None => key_of(&call.arg)?,
                };
                self.unary(call, Order::Shard(key), true).await
            }
            Strategy::Scatter(gather) => self.scatter(call, gather).await,
            Strategy::Broadcast => self.broadcast(call).await,
            // A strategy added to the SDK after this driver was written.
            other => Err(CallError::bad_request(format!("strategy {other} is not supported by this node"))),
        }
    }

    /// Calls a gear on another node (the local-first path once the gear is not hosted here):
    /// the least-loaded, fastest of two random replicas, with retries and breakers.
    ///
    /// # Errors
    /// `not_found` when no node hosts the gear, `unavailable` when none that does can be reached
    /// (or it goes away during the call, or every replica's breaker is open), `timeout`,
    /// `overloaded`, or the callee's own error.
    pub async fn call(&self, call: GearCall<'_>) -> Result<Payload, CallError> {
        self.unary(call, Order::Spread, false).await
    }

    /// The strategy layer's counters.
    pub fn resilience_stats(&self) -> ResilienceStats {
        self.inner.resilience.stats()
    }

    /// The breakers this node keeps for `node`'s gears.
    pub fn breakers_of(&self, node: &str) -> Vec<BreakerView> {
        match self.view().nodes.iter().find(|n| n.id == node) {
            Some(n) => n.breakers.clone(),
            None => Vec::new(),
        }
    }

    /// Runs a call on this node's host.
    async fn run_here(&self, call: GearCall<'_>) -> Result<Payload, CallError> {
        match self.inner.host.start(call) {
            Start::Running(fut) => fut.await,
            Start::Busy(_, e) => Err(e),
            Start::NotHosted(call) => {
                Err(CallError::unavailable(format!("gear {:?} left this node", call.gear)).mark_not_run())
            }
        }
    }

    /// Runs one attempt on `dst` (this node or another).
    async fn attempt(&self, dst: NodeId, call: GearCall<'_>, deadline: Instant) -> Result<Payload, RemoteError> {
        self.inner.resilience.attempts.fetch_add(1, Ordering::Relaxed);
        if dst == self.inner.id { Ok(self.run_here(call).await?) } else { self.call_node(dst, call, deadline).await }
    }

    /// The nodes that can run `gear` now: every routable replica, and this node when
    /// `include_here` and it hosts the gear. Waits up to [`ROUTE_WAIT`] for a route to replicas
    /// that just joined.
    async fn candidates(&self, gear: &str, include_here: bool, deadline: Instant) -> Result<Vec<NodeId>, CallError> {
        let inner = &self.inner;
        let here = include_here && inner.host.has_gear(gear);
        let unreachable = || CallError::unavailable(format!("no node hosting {gear:?} can be reached")).mark_not_run();
        // Only a call that finds no route yet reads the clock or waits for a route change.
        let mut route_wait: Option<Instant> = None;
        let mut waiter: Option<Pin<Box<Notified<'_>>>> = None;
        loop {
            let mut nodes = match inner.replicas_of(gear) {
                Replicas::NoRouteYet
                    if !here
                        && Instant::now()
                            < *route_wait.get_or_insert_with(|| deadline.min(Instant::now() + ROUTE_WAIT)) =>
                {
                    match waiter.take() {
                        // Registered before looking again, so a change in between is not missed.
                        None => {
                            let mut w = Box::pin(inner.routes_changed.notified());
                            w.as_mut().enable();
                            waiter = Some(w);
                        }
                        // Woken by the next route change, or give up at `route_wait`.
                        Some(w) => {
                            let until = route_wait.unwrap_or(deadline);
                            let _woken = tokio::time::timeout_at(until, w).await;
                        }
                    }
                    continue;
                }
                Replicas::Routable(nodes) => nodes,
                Replicas::NoRouteYet | Replicas::Down if !here => return Err(unreachable()),
                Replicas::Unknown if !here => {
                    return Err(CallError::not_found(format!("no gear named {gear:?} in the mesh")));
                }
                _ => Vec::new(),
            };
            if here {
                nodes.push(inner.id);
            }
            nodes.sort_unstable();
            return Ok(nodes);
        }
    }

    /// Whether `port` of `gear` is advertised idempotent by a node hosting it.
    fn is_idempotent(&self, gear: &str, port: &str) -> bool {
        self.inner
            .core()
            .nodes()
            .any(|r| r.gears.iter().any(|g| g.name == gear && g.idempotent.iter().any(|p| p == port)))
    }

    fn breaker_changed(&self, gear: &str, node: NodeId, state: Option<BreakerState>) {
        if let Some(state) = state {
            tracing::info!(gear, %node, state = state.as_str(), "circuit breaker");
            // Nobody listening is fine: observers come and go.
            let _receivers = self.inner.events.send(MeshEvent::BreakerChanged { gear: gear.to_owned(), node, state });
        }
    }

    /// One reply from one replica, with retries (within the budget) and re-routes.
    async fn unary(&self, call: GearCall<'_>, order: Order, include_here: bool) -> Result<Payload, CallError> {
        let inner = &self.inner;
        let res = &inner.resilience;
        // The clock is read once before each attempt and once after it.
        let mut clock = Instant::now();
        let deadline = call.meta.deadline.unwrap_or(clock + inner.config.default_timeout);
        let per_try = call.meta.per_try_timeout.or(res.config.per_try_timeout);
        let hedge_after = call.meta.hedge_after.or(res.config.hedge_after).filter(|_| matches!(order, Order::Spread));
        let (gear, port) = (call.gear, call.port);
        let mut idempotent: Option<bool> = match call.meta.retry {
            Retry::Yes => Some(true),
            Retry::No => Some(false),
            _ => None,
        };
        lock(&res.budget).deposit(inner.time_at(clock));
        // Replicas that failed this call, to try others first.
        let mut failed: Vec<NodeId> = Vec::new();
        let mut last_error: Option<CallError> = None;
        for attempt in 1..=res.config.max_attempts.max(1) {
            let nodes = self.candidates(gear, include_here, deadline).await?;
            let now = inner.time_at(clock);
            let ordered: Vec<NodeId> = match &order {
                Order::Shard(key) => rendezvous(key, &nodes),
                // One candidate: nothing to choose, so no scores to look up.
                Order::Spread if nodes.len() == 1 => nodes,
                Order::Spread => {
                    let fresh: Vec<NodeId> = nodes.iter().copied().filter(|n| !failed.contains(n)).collect();
                    let pool = if fresh.is_empty() { nodes.clone() } else { fresh };
                    spread_order(&pool, &res.scores(gear, &pool, now))
                }
            };
            // The first candidate whose breaker lets the call through; the rest, in order, for
            // a hedge.
            let mut ordered = ordered.into_iter();
            let Some(dst) = self.first_open(gear, &mut ordered, now) else {
                return Err(last_error.unwrap_or_else(|| {
                    CallError::unavailable(format!("every replica of {gear:?} is failing (circuit breakers open)"))
                        .mark_not_run()
                }));
            };
            let first = self.measured_attempt(dst, call.clone_parts(), clock, deadline, per_try);
            let hedge = hedge_after.filter(|_| *idempotent.get_or_insert_with(|| self.is_idempotent(gear, port)));
            let result = match hedge {
                None => first.await,
                Some(after) => self.hedged(first, after, &call, &mut ordered, deadline, per_try, &mut failed).await,
            };
            clock = Instant::now();
            let e = match result {
                Ok(p) => return Ok(p),
                Err(f) => f.error,
            };
            let may_retry = match classify(&e, clock >= deadline) {
                Failure::Final => false,
                // A shard's key belongs to its owner: do not move it elsewhere while it sheds load.
                Failure::Shed => !matches!(order, Order::Shard(_)),
                Failure::Transient => *idempotent.get_or_insert_with(|| self.is_idempotent(gear, port)),
                // Like a shed call: the port did not run, so no port runs twice.
                Failure::NotRun => true,
            };
            if !may_retry || attempt == res.config.max_attempts || !lock(&res.budget).withdraw(inner.time_at(clock)) {
                return Err(e);
            }
            if !failed.contains(&dst) {
                failed.push(dst);
            }
            if matches!(classify(&e, false), Failure::Transient | Failure::NotRun) {
                let wait = backoff(attempt, res.config.backoff_base, res.config.backoff_cap, rand::random::<f64>());
                if clock + wait >= deadline {
                    return Err(e);
                }
                tokio::time::sleep(wait).await;
                clock = Instant::now();
            }
            tracing::debug!(gear, port, node = %dst, attempt, error = %e, "retrying");
            last_error = Some(e);
        }
        Err(last_error.unwrap_or_else(|| CallError::unavailable("no attempt was made")))
    }

    /// The first of `ordered` whose breaker lets a call through (its slot taken).
    fn first_open(&self, gear: &str, ordered: &mut impl Iterator<Item = NodeId>, now: Time) -> Option<NodeId> {
        let res = &self.inner.resilience;
        ordered.find(|&n| {
            let (ok, changed) = res.acquire(gear, n, now);
            self.breaker_changed(gear, n, changed);
            ok
        })
    }

    /// One attempt on `dst` (whose breaker slot is taken), `started` now, within its per-try
    /// timeout, counted in the node's load while it runs and recorded in `dst`'s breaker and
    /// latency when it ends. Dropped before it ends (a hedge's loser), it records nothing.
    async fn measured_attempt(
        &self,
        dst: NodeId,
        mut call: GearCall<'_>,
        started: Instant,
        deadline: Instant,
        per_try: Option<Duration>,
    ) -> Result<Payload, RemoteError> {
        let inner = &self.inner;
        let res = &inner.resilience;
        let mut guard = InFlight::begin(res, call.gear, dst);
        let gear = call.gear;
        // An attempt given up at its per-try timeout fails `timeout` before the call's deadline:
        // a transient failure, retried where a retry is allowed.
        let try_deadline = per_try.map_or(deadline, |t| deadline.min(started + t));
        if per_try.is_some() {
            call.meta.deadline = Some(try_deadline);
        }
        let result = self.attempt(dst, call, try_deadline).await;
        // A failure on the way (no route, a switch's error) says nothing of the replica: its
        // breaker does not count it (a half-open probe slot goes back unused).
        let on_the_way = matches!(&result, Err(f) if f.on_the_way);
        guard.recorded = !on_the_way;
        drop(guard);
        if !on_the_way {
            let now = Instant::now();
            let failure = result.as_ref().err().filter(|f| is_replica_failure(&f.error));
            let took = now.saturating_duration_since(started);
            let changed = res.record(gear, dst, inner.time_at(now), failure.is_some(), took);
            self.breaker_changed(gear, dst, changed);
        }
        result
    }

    /// Runs `first`; if it has not ended `after` it started, sends a second attempt to the next
    /// replica of `ordered` whose breaker lets it through (a token of the retry budget taken,
    /// like a retry) and keeps both: the first success wins and the other attempt is dropped,
    /// which cancels it on its replica. A failure waits for the other attempt. The second
    /// replica joins `failed` when the call fails.
    #[allow(clippy::too_many_arguments)]
    async fn hedged(
        &self,
        first: impl Future<Output = Result<Payload, RemoteError>>,
        after: Duration,
        call: &GearCall<'_>,
        ordered: &mut impl Iterator<Item = NodeId>,
        deadline: Instant,
        per_try: Option<Duration>,
        failed: &mut Vec<NodeId>,
    ) -> Result<Payload, RemoteError> {
        let inner = &self.inner;
        let res = &inner.resilience;
        let mut first = pin!(first);
        let hedge_at = Instant::now() + after;
        if hedge_at >= deadline {
            return first.await;
        }
        tokio::select! {
            r = &mut first => return r,
            () = tokio::time::sleep_until(hedge_at) => {}
        }
        let started = Instant::now();
        let now = inner.time_at(started);
        let second = match self.first_open(call.gear, ordered, now) {
            Some(n) if lock(&res.budget).withdraw(now) => n,
            Some(n) => {
                // No budget: give the breaker slot back and wait for the first.
                res.release(call.gear, n);
                return first.await;
            }
            None => return first.await,
        };
        res.hedges.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(gear = call.gear, port = call.port, node = %second, "hedging");
        let mut second_try = pin!(self.measured_attempt(second, call.clone_parts(), started, deadline, per_try));
        let result = tokio::select! {
            r = &mut first => match r {
                Ok(p) => Ok(p),
                Err(_) => second_try.await,
            },
            r = &mut second_try => match r {
                Ok(p) => Ok(p),
                Err(_) => first.await,
            },
        };
        if result.is_err() && !failed.contains(&second) {
            failed.push(second);
        }
        result
    }

    /// Every replica runs the call; replies are gathered until the goal or the deadline.
    async fn scatter(&self, call: GearCall<'_>, gather: Gather) -> Result<Payload, CallError> {
        let deadline = call.meta.deadline.unwrap_or_else(|| Instant::now() + self.inner.config.default_timeout);
        let nodes = self.candidates(call.gear, true, deadline).await?;
        let goal = gather.goal(nodes.len());
        let mut pending: FuturesUnordered<_> = nodes
            .iter()
            .map(|&n| {
                let c = call.clone_parts();
                async move { (n, self.attempt(n, c, deadline).await) }
            })
            .collect();
        let mut replies = Vec::with_capacity(nodes.len());
        let mut answered = Vec::with_capacity(nodes.len());
        let mut ok = 0;
        while goal.is_none_or(|g| ok < g) {
            let next = tokio::time::timeout_at(deadline, pending.next()).await;
            let Ok(Some((node, result))) = next else { break };
            answered.push(node);
            let entry = match result.map_err(|f| f.error).and_then(Payload::into_wire) {
                Ok(WireBody::Json(b)) => match serde_json::from_slice::<Value>(&b) {
                    Ok(v) => {
                        ok += 1;
                        json!({ "node": node.to_string(), "ok": v })
                    }
                    Err(e) => {
                        json!({ "node": node.to_string(), "error": CallError::internal(format!("reply is not JSON: {e}")) })
                    }
                },
                Ok(WireBody::Bytes(_)) => json!({
                    "node": node.to_string(),
                    "error": CallError::internal("a raw-bytes reply cannot be gathered"),
                }),
                Err(e) => json!({ "node": node.to_string(), "error": e }),
            };
            replies.push(entry);
        }
        // Stop the rest: dropping their futures cancels them where they run.
        drop(pending);
        let complete = goal.map_or(answered.len() == nodes.len(), |g| ok >= g);
        for n in nodes.iter().filter(|n| !answered.contains(n)) {
            let e = if complete {
                CallError::new(ErrorCode::Unavailable, "not waited for: the gather goal was reached")
            } else {
                CallError::timeout("no reply before the deadline")
            };
            replies.push(json!({ "node": n.to_string(), "error": e }));
        }
        Ok(Payload::typed(json!({ "complete": complete, "ok": ok, "replies": replies })))
    }

    /// Every replica gets the call in the background; nobody waits for the replies.
    async fn broadcast(&self, call: GearCall<'_>) -> Result<Payload, CallError> {
        let deadline = call.meta.deadline.unwrap_or_else(|| Instant::now() + self.inner.config.default_timeout);
        let nodes = self.candidates(call.gear, true, deadline).await?;
        let body = call.arg.to_wire()?;
        for &n in &nodes {
            let mesh = self.clone();
            let (gear, port, body, mut meta) =
                (call.gear.to_owned(), call.port.to_owned(), body.clone(), call.meta.clone());
            meta.strategy = None;
            tokio::spawn(async move {
                let arg = match body {
                    WireBody::Json(b) => Arg::json(b),
                    WireBody::Bytes(b) => Arg::bytes(b),
                };
                let c = GearCall { gear: &gear, port: &port, arg, meta };
                if let Err(f) = mesh.attempt(n, c, deadline).await {
                    tracing::debug!(gear, port, node = %n, error = %f.error, "broadcast call failed");
                }
            });
        }
        let ids: Vec<String> = nodes.iter().map(ToString::to_string).collect();
        Ok(Payload::typed(json!({ "sent": nodes.len(), "nodes": ids })))
    }
}

/// Candidates in the order a spread call tries them: the power-of-two-choices winner first,
/// then the rest by score.
fn spread_order(nodes: &[NodeId], scores: &[f64]) -> Vec<NodeId> {
    let mut idx: Vec<usize> = (0..nodes.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    if nodes.len() >= 2 {
        let a = rand::random_range(0..nodes.len());
        let mut b = rand::random_range(0..nodes.len() - 1);
        if b >= a {
            b += 1;
        }
        let first = p2c(scores, a, b);
        idx.retain(|&i| i != first);
        idx.insert(0, first);
    }
    idx.into_iter().map(|i| nodes[i]).collect()
}

/// One attempt in flight: counted in the node's load until it ends; if the caller drops the
/// call before the outcome is recorded, a half-open breaker gets its probe slot back.
struct InFlight<'a> {
    res: &'a Resilience,
    gear: &'a str,
    node: NodeId,
    recorded: bool,
}

impl<'a> InFlight<'a> {
    fn begin(res: &'a Resilience, gear: &'a str, node: NodeId) -> Self {
        res.begin(node);
        Self { res, gear, node, recorded: false }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.res.end(self.node);
        if !self.recorded {
            self.res.release(self.gear, self.node);
        }
    }
}

/// A call's parts, lent again for another attempt.
trait CloneParts<'a> {
    fn clone_parts(&self) -> GearCall<'a>;
}

impl<'a> CloneParts<'a> for GearCall<'a> {
    fn clone_parts(&self) -> GearCall<'a> {
        let mut meta = self.meta.clone();
        // The strategy was this hop's; the replica runs the call where it lands.
        meta.strategy = None;
        GearCall { gear: self.gear, port: self.port, arg: self.arg.clone(), meta }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize, salt: u8) -> Vec<NodeId> {
        (0..n)
            .map(|i| {
                let mut b = [0u8; 16];
                b[0] = salt;
                b[1..9].copy_from_slice(&(i as u64).to_be_bytes());
                b[15] = 7;
                NodeId::from_bytes(b)
            })
            .collect()
    }

    /// Keys owned by each node before and after a change in the replica set.
    fn moved(keys: usize, before: &[NodeId], after: &[NodeId]) -> usize {
        (0..keys)
            .filter(|k| {
                let key = format!("key-{k}");
                rendezvous(&key, before)[0] != rendezvous(&key, after)[0]
            })
            .count()
    }

    #[test]
    fn shard_keys_move_about_one_nth_when_a_replica_joins_or_leaves() {
        const KEYS: usize = 10_000;
        for n in [3usize, 5, 10] {
            let all = ids(n + 1, 1);
            let (before, after) = (&all[..n], &all[..]);
            let joined = moved(KEYS, before, after);
            let left = moved(KEYS, after, before);
            // Ideal: KEYS / (n + 1) move, all of them to (or from) the node that changed.
            let ideal = KEYS / (n + 1);
            println!("SHARD n={n}: a join moved {joined} of {KEYS} keys, a leave {left} (ideal {ideal})");
            assert_eq!(joined, left, "the same keys move back");
            assert!(joined.abs_diff(ideal) < ideal / 4, "n={n}: {joined} keys moved, ideal {ideal}");
            for k in 0..KEYS {
                let key = format!("key-{k}");
                let (b, a) = (rendezvous(&key, before)[0], rendezvous(&key, after)[0]);
                assert!(b == a || a == all[n], "a key moved between two nodes that stayed");
            }
        }
    }

    #[test]
    fn shard_spreads_keys_evenly_and_the_same_on_every_node() {
        let nodes = ids(4, 2);
        let mut counts = std::collections::HashMap::new();
        for k in 0..8_000 {
            *counts.entry(rendezvous(&format!("k{k}"), &nodes)[0]).or_insert(0usize) += 1;
        }
        for (_, c) in counts {
            assert!((1_600..2_400).contains(&c), "{c} keys on one of 4 nodes");
        }
        // The order does not depend on the order the nodes are listed in.
        let mut reversed = nodes.clone();
        reversed.reverse();
        assert_eq!(rendezvous("abc", &nodes), rendezvous("abc", &reversed));
    }

    #[test]
    fn p2c_prefers_the_lower_score() {
        let scores = [5.0, 1.0, 3.0];
        assert_eq!(p2c(&scores, 0, 1), 1);
        assert_eq!(p2c(&scores, 2, 0), 2);
        assert_eq!(p2c(&scores, 1, 1), 1);
        let order = spread_order(&ids(3, 3), &scores);
        assert_eq!(order.len(), 3);
        assert_ne!(order[0], ids(3, 3)[0], "the slowest never wins a pair");
    }

    #[test]
    fn only_shed_transient_and_not_run_failures_are_retryable() {
        assert_eq!(classify(&CallError::overloaded("x"), false), Failure::Shed);
        assert_eq!(classify(&CallError::overloaded("x").mark_not_run(), false), Failure::Shed);
        assert_eq!(classify(&CallError::unavailable("x"), false), Failure::Transient);
        assert_eq!(classify(&CallError::unavailable("x").mark_not_run(), false), Failure::NotRun);
        assert_eq!(classify(&CallError::not_found("x").mark_not_run(), false), Failure::NotRun);
        assert_eq!(classify(&CallError::not_found("x"), false), Failure::Final);
        assert_eq!(classify(&CallError::unavailable("x").mark_not_run(), true), Failure::Final);
        assert_eq!(classify(&CallError::timeout("x"), false), Failure::Transient);
        assert_eq!(classify(&CallError::timeout("x"), true), Failure::Final, "never past the deadline");
        assert_eq!(classify(&CallError::bad_request("x"), false), Failure::Final);
        assert_eq!(classify(&CallError::app("insufficient_funds", "x"), false), Failure::Final);
        assert_eq!(classify(&CallError::forbidden("x"), false), Failure::Final);
        assert_eq!(classify(&CallError::internal("x"), false), Failure::Final);
    }

    #[test]
    fn shard_keys_come_from_the_input() {
        let v = serde_json::json!({"key": "alice", "value": 1});
        assert_eq!(key_of(&Arg::typed(&v)).expect("key"), "alice");
        let n = serde_json::json!({"key": 42});
        assert_eq!(key_of(&Arg::typed(&n)).expect("key"), "42");
        assert!(key_of(&Arg::typed(&serde_json::json!([1]))).is_err());
    }
}

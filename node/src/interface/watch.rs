//! What observers see: one stream per node, shared by all its clients.
//!
//! - **Mesh changes.** A watcher task follows the mesh driver's events, re-reads the mesh view and
//!   turns the difference from the last view into messages (`node_joined`, `link_up`,
//!   `gear_added`, ...), each with a sequence number. A snapshot is that last view with the
//!   sequence number of the last message folded into it, taken under the same lock, so a client
//!   that applies the messages numbered after its snapshot holds exactly the watcher's view.
//! - **Events, traces and stats** arrive through host [`Tap`]s, one per topic however many clients
//!   want it. A tap makes this node advertise the topic, so the mesh sends it the topic's events.
//!   Every node publishes its call traces and stats as events on system topics, only while some
//!   node advertises them: attached to any node, an observer sees the whole mesh, and a mesh
//!   without observers pays nothing.
//!
//! Everything goes into one `broadcast` ring of `interface.buffer` messages, serialized once. A
//! client that falls further behind than the ring is told `lagged` and sent a fresh snapshot; the
//! ring never blocks the watcher, the taps or the other clients.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    num::NonZeroUsize,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use gearmesh_gears::{CallError, Event, Principal, Publish, TraceId, WireBody, host::Host};
use gearmesh_mesh::{LinkView, Mesh, MeshView, NodeView};
use serde_json::{Value, json};
use tokio::{
    sync::broadcast::{self, error::RecvError},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use super::proto::{SYSTEM_TOPIC_PREFIX, VERSION};

/// Where nodes publish sampled call traces.
pub(crate) const TRACES_TOPIC: &str = "gearmesh.traces";
/// Where nodes publish their periodic stats.
pub(crate) const STATS_TOPIC: &str = "gearmesh.stats";
/// Where nodes publish their pipeline runs' starts and ends.
pub(crate) const RUNS_TOPIC: &str = "gearmesh.runs";

/// What a stream message is about (clients filter on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Mesh,
    Event,
    Trace,
    Stats,
    Run,
}

/// One message of the shared stream, serialized once for every client.
#[derive(Debug)]
pub(crate) struct StreamMsg {
    pub(crate) kind: Kind,
    /// The event's topic, for `Kind::Event`.
    pub(crate) topic: Option<String>,
    pub(crate) text: Utf8Bytes,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each critical section leaves its data consistent: a poisoned lock is still usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct MeshState {
    seq: u64,
    view: MeshView,
}

struct TapEntry {
    users: usize,
    stop: CancellationToken,
}

/// The node's shared stream and the state behind snapshots.
pub(crate) struct Watch {
    host: Arc<Host>,
    mesh: Mesh,
    stream: broadcast::Sender<Arc<StreamMsg>>,
    state: Mutex<MeshState>,
    taps: Mutex<HashMap<String, TapEntry>>,
    tap_queue: NonZeroUsize,
    pub(crate) telemetry: Arc<Telemetry>,
}

impl Watch {
    /// `buffer`: the shared ring's size; `tap_queue`: events queued per topic before the ring.
    pub(crate) fn new(
        host: Arc<Host>,
        mesh: Mesh,
        buffer: usize,
        tap_queue: NonZeroUsize,
        telemetry: Arc<Telemetry>,
    ) -> Arc<Self> {
        let (stream, _) = broadcast::channel(buffer.max(1));
        let view = mesh.view();
        Arc::new(Self {
            host,
            state: Mutex::new(MeshState { seq: 0, view }),
            mesh,
            stream,
            taps: Mutex::default(),
            tap_queue,
            telemetry,
        })
    }

    /// A receiver of the stream from now on, and a snapshot consistent with it: the messages the
    /// receiver gets with `seq` greater than the snapshot's apply on top of it.
    pub(crate) fn subscribe(&self) -> (broadcast::Receiver<Arc<StreamMsg>>, Value) {
        self.refresh();
        let state = lock(&self.state);
        let rx = self.stream.subscribe();
        (rx, snapshot_json(state.seq, &state.view))
    }

    /// A fresh snapshot (after a client lagged).
    pub(crate) fn snapshot(&self) -> Value {
        let state = lock(&self.state);
        snapshot_json(state.seq, &state.view)
    }

    fn send(&self, kind: Kind, topic: Option<String>, value: &Value) {
        let msg = StreamMsg { kind, topic, text: Utf8Bytes::from(value.to_string()) };
        // No receivers is fine: nobody is watching.
        let _nobody = self.stream.send(Arc::new(msg));
    }

    /// Re-reads the mesh view and streams what changed.
    pub(crate) fn refresh(&self) {
        // Read under the lock, so concurrent refreshes apply views in the order they were read.
        let mut state = lock(&self.state);
        let view = self.mesh.view();
        self.telemetry.update_wanted(&view);
        for mut m in diff(&state.view, &view) {
            state.seq += 1;
            m["seq"] = json!(state.seq);
            self.send(Kind::Mesh, None, &m);
        }
        state.view = view;
    }

    /// Follows mesh events until `shutdown`; a burst of events makes one refresh.
    pub(crate) async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut events = self.mesh.subscribe();
        // RTTs and routes also change without an event worth a message; a slow tick catches them.
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                r = events.recv() => if let Err(RecvError::Closed) = r { return },
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            // Let a burst (a node joining brings several events) settle into one diff.
            tokio::time::sleep(Duration::from_millis(20)).await;
            while events.try_recv().is_ok() {}
            self.refresh();
        }
    }

    /// Starts delivering `topic` to the stream (shared by every client that wants it).
    pub(crate) fn acquire(self: &Arc<Self>, topic: &str) -> Result<(), CallError> {
        let mut taps = lock(&self.taps);
        if let Some(e) = taps.get_mut(topic) {
            e.users += 1;
            return Ok(());
        }
        let tap = self.host.tap(topic, self.tap_queue)?;
        let stop = CancellationToken::new();
        taps.insert(topic.to_owned(), TapEntry { users: 1, stop: stop.clone() });
        drop(taps);
        tokio::spawn(self.clone().forward(tap, stop));
        self.mesh.refresh_local();
        self.refresh();
        Ok(())
    }

    /// One client less wants `topic`; the last one stops its tap.
    pub(crate) fn release(&self, topic: &str) {
        let mut taps = lock(&self.taps);
        if let Some(e) = taps.get_mut(topic) {
            e.users -= 1;
            if e.users == 0
                && let Some(e) = taps.remove(topic)
            {
                e.stop.cancel();
            }
        }
    }

    async fn forward(self: Arc<Self>, mut tap: gearmesh_gears::host::Tap, stop: CancellationToken) {
        let topic = tap.topic().as_str().to_owned();
        loop {
            let (event, publisher, trace_id) = tokio::select! {
                e = tap.recv() => match e { Some(e) => e, None => break },
                () = stop.cancelled() => break,
            };
            let body = event_json(&event);
            match topic.as_str() {
                // System topics carry ready-made objects from trusted publishers (nodes).
                TRACES_TOPIC | STATS_TOPIC | RUNS_TOPIC => {
                    let (kind, name) = match topic.as_str() {
                        TRACES_TOPIC => (Kind::Trace, "trace"),
                        STATS_TOPIC => (Kind::Stats, "stats"),
                        _ => (Kind::Run, "pipeline"),
                    };
                    if let Value::Object(mut m) = body {
                        m.insert("v".into(), json!(VERSION));
                        m.insert("type".into(), json!(name));
                        self.send(kind, None, &Value::Object(m));
                    }
                }
                _ => {
                    let m = json!({
                        "v": VERSION, "type": "event", "topic": topic, "event": body,
                        "publisher": publisher.to_string(), "trace_id": trace_id.to_string(),
                    });
                    self.send(Kind::Event, Some(topic.clone()), &m);
                }
            }
        }
        drop(tap);
        self.mesh.refresh_local();
        self.refresh();
    }
}

/// An event's body as JSON (`null` for raw bytes, which the interface does not carry).
fn event_json(event: &Event) -> Value {
    match event.as_arg().to_wire() {
        Ok(WireBody::Json(b)) => serde_json::from_slice(&b).unwrap_or(Value::Null),
        Ok(WireBody::Bytes(_)) | Err(_) => Value::Null,
    }
}

fn snapshot_json(seq: u64, view: &MeshView) -> Value {
    json!({ "v": VERSION, "type": "snapshot", "seq": seq, "me": view.me, "nodes": view.nodes })
}

/// Undirected links: a pair is linked when either end lists the other.
fn edges(view: &MeshView) -> BTreeSet<(&str, &str)> {
    let mut set = BTreeSet::new();
    for n in &view.nodes {
        for l in &n.links {
            let (a, b) = (n.id.as_str(), l.peer.as_str());
            set.insert(if a < b { (a, b) } else { (b, a) });
        }
    }
    set
}

fn own_link<'v>(view: &'v MeshView, a: &str, b: &str) -> Option<&'v LinkView> {
    let me = view.nodes.iter().find(|n| n.id == view.me)?;
    let peer = if a == view.me {
        b
    } else if b == view.me {
        a
    } else {
        return None;
    };
    me.links.iter().find(|l| l.peer == peer)
}

fn routes_of(view: &MeshView) -> BTreeMap<&str, (&str, u32)> {
    view.nodes
        .iter()
        .filter(|n| n.id != view.me)
        .filter_map(|n| n.route.as_ref().map(|r| (n.id.as_str(), (r.next_hop.as_str(), r.hops))))
        .collect()
}

/// The messages that turn `old` into `new` (without sequence numbers).
pub(crate) fn diff(old: &MeshView, new: &MeshView) -> Vec<Value> {
    let msg = |kind: &str, body: Value| {
        let mut m = json!({ "v": VERSION, "type": kind });
        if let (Value::Object(m), Value::Object(b)) = (&mut m, body) {
            m.extend(b);
        }
        m
    };
    let mut out = Vec::new();
    let before: HashMap<&str, &NodeView> = old.nodes.iter().map(|n| (n.id.as_str(), n)).collect();
    let after: HashMap<&str, &NodeView> = new.nodes.iter().map(|n| (n.id.as_str(), n)).collect();
    for n in &new.nodes {
        let Some(o) = before.get(n.id.as_str()) else {
            out.push(msg("node_joined", json!({ "node": n })));
            continue;
        };
        if o.state != n.state {
            let m = match n.state {
                "suspect" => msg("node_suspected", json!({ "node": n.id, "name": n.name })),
                "alive" => msg("node_alive", json!({ "node": n.id, "name": n.name, "incarnation": n.incarnation })),
                state => msg("node_left", json!({ "node": n.id, "name": n.name, "graceful": state == "left" })),
            };
            out.push(m);
        }
        if o.addrs != n.addrs || o.topics != n.topics || o.name != n.name || o.incarnation != n.incarnation {
            out.push(msg("node_updated", json!({ "node": n })));
        }
        for g in n.gears.iter().filter(|g| !o.gears.contains(g)) {
            out.push(msg("gear_added", json!({ "node": n.id, "gear": g })));
        }
        for g in o.gears.iter().filter(|g| !n.gears.contains(g)) {
            out.push(msg("gear_removed", json!({ "node": n.id, "gear": g })));
        }
    }
    for o in old.nodes.iter().filter(|o| !after.contains_key(o.id.as_str())) {
        out.push(msg("node_removed", json!({ "node": o.id, "name": o.name })));
    }
    let (e_old, e_new) = (edges(old), edges(new));
    for (a, b) in e_new.difference(&e_old) {
        let own = own_link(new, a, b);
        let (rtt_us, transport) = (own.and_then(|l| l.rtt_us), own.and_then(|l| l.transport.as_deref()));
        out.push(msg("link_up", json!({ "a": a, "b": b, "rtt_us": rtt_us, "transport": transport })));
    }
    for (a, b) in e_old.difference(&e_new) {
        out.push(msg("link_down", json!({ "a": a, "b": b })));
    }
    // The attached node's circuit breakers (for calls from it to each node's gears).
    for n in &new.nodes {
        let before = before.get(n.id.as_str());
        for b in &n.breakers {
            let was = before.and_then(|o| o.breakers.iter().find(|x| x.gear == b.gear)).map(|x| x.state);
            // A breaker appears closed; it is news only when it is not.
            if was != Some(b.state) && !(was.is_none() && b.state == gearmesh_mesh::breaker::BreakerState::Closed) {
                out.push(msg("breaker", json!({ "node": n.id, "gear": b.gear, "state": b.state })));
            }
        }
    }
    if routes_of(old) != routes_of(new) {
        let routes: Vec<Value> = routes_of(new)
            .into_iter()
            .map(|(node, (next_hop, hops))| json!({ "node": node, "next_hop": next_hop, "hops": hops }))
            .collect();
        out.push(msg("routes", json!({ "node": new.me, "routes": routes })));
    }
    out
}

// === traces and stats, published by every node ===

/// Samples call traces and publishes them, and this node's stats, on the system topics while
/// some node listens to them.
pub(crate) struct Telemetry {
    me: String,
    name: String,
    host: Arc<Host>,
    mesh: Mesh,
    traces_wanted: AtomicBool,
    stats_wanted: AtomicBool,
    runs_wanted: AtomicBool,
    per_second: f64,
    bucket: Mutex<(f64, Instant)>,
}

impl Telemetry {
    pub(crate) fn new(me: String, name: String, host: Arc<Host>, mesh: Mesh, per_second: u32) -> Arc<Self> {
        let per_second = f64::from(per_second);
        Arc::new(Self {
            me,
            name,
            host,
            mesh,
            traces_wanted: AtomicBool::new(false),
            stats_wanted: AtomicBool::new(false),
            runs_wanted: AtomicBool::new(false),
            per_second,
            bucket: Mutex::new((per_second, Instant::now())),
        })
    }

    fn update_wanted(&self, view: &MeshView) {
        let wanted = |topic: &str| view.nodes.iter().any(|n| n.state == "alive" && n.topics.iter().any(|t| t == topic));
        self.traces_wanted.store(wanted(TRACES_TOPIC), Ordering::Relaxed);
        self.stats_wanted.store(wanted(STATS_TOPIC), Ordering::Relaxed);
        self.runs_wanted.store(wanted(RUNS_TOPIC), Ordering::Relaxed);
    }

    /// Publishes this node's pipeline runs (starts and ends) while someone wants them.
    pub(crate) async fn run_pipelines(
        self: Arc<Self>,
        mut runs: broadcast::Receiver<crate::pipeline::PipelineEvent>,
        shutdown: CancellationToken,
    ) {
        loop {
            let event = tokio::select! {
                e = runs.recv() => match e {
                    Ok(e) => e,
                    // Missed runs are missed for observers too; carry on with the next.
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return,
                },
                () = shutdown.cancelled() => return,
            };
            if !self.runs_wanted.load(Ordering::Relaxed) {
                continue;
            }
            let mut body = serde_json::to_value(&event).unwrap_or(Value::Null);
            if let Value::Object(m) = &mut body {
                m.insert("node".into(), json!(self.me));
                m.insert("name".into(), json!(self.name));
                m.insert("at_ms".into(), json!(unix_ms()));
            }
            self.publish(RUNS_TOPIC, &body);
        }
    }

    /// This node's id.
    pub(crate) fn me(&self) -> &str {
        &self.me
    }

    /// Whether to trace the call about to run: someone wants traces and the rate allows it. One
    /// relaxed load when nobody watches.
    pub(crate) fn sample(&self) -> bool {
        if !self.traces_wanted.load(Ordering::Relaxed) || self.per_second <= 0.0 {
            return false;
        }
        let mut b = lock(&self.bucket);
        let now = Instant::now();
        let refill = now.saturating_duration_since(b.1).as_secs_f64() * self.per_second;
        b.0 = (b.0 + refill).min(self.per_second);
        b.1 = now;
        if b.0 >= 1.0 {
            b.0 -= 1.0;
            true
        } else {
            false
        }
    }

    /// Publishes one trace: `from` called `gear/port`, which ran here.
    pub(crate) fn trace(
        &self,
        from: &str,
        gear: &str,
        port: &str,
        latency: Duration,
        outcome: Result<(), &CallError>,
        trace_id: Option<TraceId>,
    ) {
        let outcome = match outcome {
            Ok(()) => "ok".to_owned(),
            Err(e) => e.code().as_str().to_owned(),
        };
        let body = json!({
            "from": from, "to": self.me, "gear": gear, "port": port,
            "latency_us": u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
            "outcome": outcome, "trace_id": trace_id.map(|t| t.to_string()),
            "at_ms": unix_ms(),
        });
        self.publish(TRACES_TOPIC, &body);
    }

    fn publish(&self, topic: &str, body: &Value) {
        let p = Publish {
            topic: topic.to_owned(),
            event: Event::json(Bytes::from(body.to_string())),
            publisher: Principal::node(&self.me),
            trace_id: TraceId::random(),
        };
        if let Err(e) = self.host.publish_local(&p) {
            tracing::debug!(error = %e, topic, "telemetry not published");
        }
        self.mesh.publish(&p);
    }

    /// Publishes this node's stats every `interval` while someone wants them, until `shutdown`.
    pub(crate) async fn run_stats(
        self: Arc<Self>,
        interval: Duration,
        clients: Arc<super::Clients>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            if !self.stats_wanted.load(Ordering::Relaxed) {
                continue;
            }
            let view = self.mesh.view();
            let links: Vec<Value> = view
                .nodes
                .iter()
                .find(|n| n.id == view.me)
                .map(|n| {
                    n.links
                        .iter()
                        .map(|l| json!({ "peer": l.peer, "rtt_us": l.rtt_us, "transport": l.transport }))
                        .collect()
                })
                .unwrap_or_default();
            let body = json!({
                "node": self.me, "name": self.name, "at_ms": unix_ms(),
                "in_flight": self.host.in_flight(),
                "gears": self.host.gears().len(),
                "clients": clients.count(),
                "mesh": self.mesh.stats(),
                "links": links,
            });
            self.publish(STATS_TOPIC, &body);
        }
    }
}

impl gearmesh_mesh::CallObserver for Telemetry {
    fn served(
        &self,
        from: gearmesh_transport::NodeId,
        gear: &str,
        port: &str,
        started: tokio::time::Instant,
        outcome: Result<(), &CallError>,
    ) {
        if self.sample() {
            self.trace(&from.to_string(), gear, port, started.elapsed(), outcome, None);
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}

/// Whether clients may name `topic` (system topics are reached through `traces`/`stats`).
pub(crate) fn is_system_topic(topic: &str) -> bool {
    topic.starts_with(SYSTEM_TOPIC_PREFIX)
}

#[cfg(test)]
mod tests {
    use gearmesh_mesh::RouteView;

    use super::*;

    fn node(id: &str, state: &'static str, links: &[&str], gears: &[&str]) -> NodeView {
        NodeView {
            id: id.into(),
            name: format!("n-{id}"),
            state,
            incarnation: 1,
            addrs: vec![],
            gears: gears
                .iter()
                .map(|g| gearmesh_mesh::GearAd {
                    name: (*g).into(),
                    version: "1.0.0".into(),
                    ports: vec![],
                    idempotent: vec![],
                })
                .collect(),
            topics: vec![],
            links: links.iter().map(|p| LinkView { peer: (*p).into(), rtt_us: None, transport: None }).collect(),
            route: (id != "a").then(|| RouteView { next_hop: id.into(), hops: 1 }),
            breakers: vec![],
        }
    }

    fn types(msgs: &[Value]) -> Vec<&str> {
        msgs.iter().filter_map(|m| m["type"].as_str()).collect()
    }

    #[test]
    fn diff_names_every_change_and_nothing_else() {
        let a = MeshView {
            me: "a".into(),
            nodes: vec![node("a", "alive", &["b"], &["echo"]), node("b", "alive", &["a"], &[])],
        };
        assert!(diff(&a, &a).is_empty());

        let b = MeshView {
            me: "a".into(),
            nodes: vec![
                node("a", "alive", &["b", "c"], &["echo", "kv"]),
                node("b", "suspect", &["a"], &[]),
                node("c", "alive", &["a"], &["billing"]),
            ],
        };
        let m = diff(&a, &b);
        assert_eq!(types(&m), ["gear_added", "node_suspected", "node_joined", "link_up", "routes"], "{m:?}");
        assert_eq!(m[3]["a"], "a");
        assert_eq!(m[3]["b"], "c");

        let c = MeshView { me: "a".into(), nodes: vec![node("a", "alive", &[], &["kv"]), node("b", "left", &[], &[])] };
        let m = diff(&b, &c);
        assert_eq!(
            types(&m),
            ["gear_removed", "node_left", "node_removed", "link_down", "link_down", "routes"],
            "{m:?}"
        );
        assert_eq!(m[1]["graceful"], true);
    }

    #[test]
    fn breaker_changes_are_news_but_a_new_closed_breaker_is_not() {
        use gearmesh_mesh::{BreakerView, breaker::BreakerState};
        let breaker = |state| BreakerView { gear: "billing".into(), state, calls: 20, failures: 12, latency_us: None };
        let with = |b: Vec<BreakerView>| {
            let mut n = node("b", "alive", &[], &["billing"]);
            n.breakers = b;
            MeshView { me: "a".into(), nodes: vec![node("a", "alive", &[], &[]), n] }
        };
        let (none, closed, open) =
            (with(vec![]), with(vec![breaker(BreakerState::Closed)]), with(vec![breaker(BreakerState::Open)]));
        assert!(diff(&none, &closed).is_empty());
        let m = diff(&closed, &open);
        assert_eq!(types(&m), ["breaker"]);
        assert_eq!(
            (m[0]["node"].as_str(), m[0]["gear"].as_str(), m[0]["state"].as_str()),
            (Some("b"), Some("billing"), Some("open"))
        );
        assert_eq!(diff(&none, &open)[0]["state"], "open");
        assert_eq!(diff(&open, &closed)[0]["state"], "closed");
    }
}

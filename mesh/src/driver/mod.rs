//! The async driver: connects the sans-IO [`Core`] to transport links and to the node's gear
//! host, and carries remote calls and events.
//!
//! Tasks: one driver loop (the core's timers), one reader per link (frames in), one task per
//! dial, and one per inbound call. The core sits behind a `std::sync::Mutex` that is never held
//! across an `.await`; after every input the driver drains the core's outputs at once
//! ([`Inner::flush`]): gossip to send, links to dial or drop, and mesh events.
//!
//! What is bounded, and what happens at the bound:
//! - outgoing remote calls waiting for a reply (`max_pending_calls`): one more fails at once
//!   with `overloaded`;
//! - calls from other nodes running here or waiting to send their reply
//!   (`max_inbound_calls`): one more is answered `overloaded`;
//! - a link's send queue (the transport's): calls, and replies of calls run here, wait for room
//!   until their deadline; a switched reply (or an error answered at once) waits in a task of its
//!   own for up to 2 s, within 64 MiB of held replies per node, then is dropped; gossip, events
//!   and other switched frames are dropped when it is full (gossip repairs itself, events are
//!   at-most-once, a call a switch cannot pass on is answered `overloaded`);
//! - switching: a routed frame that has crossed `max_hops` links is answered `unavailable` (a
//!   call) or dropped, and a call with no route onwards is answered `unavailable`.

mod calls;
mod return_paths;
mod shortcuts;
mod strategy;
mod switched;

pub use shortcuts::ShortcutPolicy;

pub use strategy::{BreakerView, Failure, ResilienceConfig, ResilienceStats, classify, p2c, rendezvous};

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, MutexGuard, RwLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use gearmesh_gears::host::Host;
use gearmesh_transport::{
    CloseCode, CloseReason, Dialer, Frame, FrameHandler, FrameKind, Incoming, Link, LinkSender, NodeId as LinkNodeId,
    Route, frame,
};
use serde::Serialize;
use tokio::{
    sync::{Notify, broadcast},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::core::{
    Action, Config as CoreConfig, Core, DisconnectReason, GearAd, LinkDownReason, LinkInfo, MeshEvent, NodeId,
    NodeState, Time,
};

/// Decides, on the node that runs a port, whether a call from another node may run. (Events are
/// checked where they are published: their frames carry the publisher but not its scopes.)
pub trait Authorizer: Send + Sync + 'static {
    /// `Err` (`unauthorized` or `forbidden`) refuses the call; the error goes back to the caller.
    fn authorize_call(&self, call: &gearmesh_gears::Call<'_>) -> Result<(), gearmesh_gears::CallError>;
}

/// Told about each call from another node that ran here, once it finished (the node samples
/// these into call traces for observers). Called on the call's task: keep it cheap.
pub trait CallObserver: Send + Sync + 'static {
    /// `from` called `gear/port` here; it started at `started` (the observer reads the clock
    /// only if it wants the latency) and ended with `outcome`.
    fn served(
        &self,
        from: LinkNodeId,
        gear: &str,
        port: &str,
        started: Instant,
        outcome: Result<(), &gearmesh_gears::CallError>,
    );
}

/// Driver settings around the core's own [`CoreConfig`].
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// The membership and topology core's settings.
    pub core: CoreConfig,
    /// Remote calls from this node waiting for a reply, at most.
    pub max_pending_calls: usize,
    /// Calls from other nodes running here at once, at most.
    pub max_inbound_calls: usize,
    /// A routed frame is dropped after crossing this many links.
    pub max_hops: u8,
    /// The deadline of a remote call whose caller set none.
    pub default_timeout: Duration,
    /// Mesh events buffered per observer before it lags.
    pub event_buffer: usize,
    /// Retries, circuit breakers and latency tracking of calls from this node.
    pub resilience: ResilienceConfig,
    /// When this node opens a direct shortcut link to a node it calls often through switches.
    pub shortcuts: ShortcutPolicy,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            core: CoreConfig::default(),
            max_pending_calls: 100_000,
            max_inbound_calls: 100_000,
            max_hops: 16,
            default_timeout: Duration::from_secs(30),
            event_buffer: 1024,
            resilience: ResilienceConfig::default(),
            shortcuts: ShortcutPolicy::default(),
        }
    }
}

/// Counters of the traffic this node's mesh driver carried since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MeshStats {
    /// Calls this node sent to gears on other nodes.
    pub calls_sent: u64,
    /// Calls from other nodes run here.
    pub calls_received: u64,
    /// Calls refused here with `overloaded` (too many inbound calls, or a congested switch).
    pub calls_refused: u64,
    /// Events sent to other nodes (one per interested node).
    pub events_sent: u64,
    /// Events from other nodes delivered to listeners here.
    pub events_received: u64,
    /// Routed frames (calls, replies, cancels, events) this node switched on to another node.
    pub frames_forwarded: u64,
    /// Frames dropped: no route, too many hops, or a full link queue.
    pub frames_dropped: u64,
    /// Calls this node switched for others that it failed `unavailable` because the link they
    /// went out on broke (see `docs/mesh.md`, "A link that breaks").
    pub switched_calls_failed: u64,
    /// Calls this node switched without keeping track of them, its table of switched calls
    /// being full of calls still waited for: a break of their link leaves their callers waiting.
    pub switched_calls_untracked: u64,
    /// Links this node dialed that the peer refused in the hello: a node of another mesh, a
    /// link token it did not accept, another protocol version. A configuration error, not a
    /// network one: the first refusal by each address is logged as a warning.
    pub dials_refused: u64,
    /// Direct links of this node now.
    pub links: usize,
    /// Known nodes (this one included) by state now: alive, suspect, dead, left.
    pub nodes: [usize; 4],
}

/// Addresses whose hello refusals are remembered, so each is warned of once.
const MAX_WARNED_REFUSALS: usize = 1024;

/// Whether a dial failed because the peer refused our hello (a configuration error: another
/// mesh, a token it does not accept, another protocol version), not for a network reason or
/// because it has no room for another link.
fn refused_in_hello(e: &gearmesh_transport::DialError) -> bool {
    use gearmesh_transport::{CloseCode, DialError, HandshakeError};
    matches!(e, DialError::Handshake { source: HandshakeError::RefusedByPeer(c), .. } if c.code == CloseCode::REJECTED)
}

/// The live counters behind [`MeshStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) calls_sent: AtomicU64,
    pub(crate) calls_received: AtomicU64,
    pub(crate) calls_refused: AtomicU64,
    pub(crate) events_sent: AtomicU64,
    pub(crate) events_received: AtomicU64,
    pub(crate) frames_forwarded: AtomicU64,
    pub(crate) frames_dropped: AtomicU64,
    pub(crate) switched_calls_failed: AtomicU64,
    pub(crate) switched_calls_untracked: AtomicU64,
    pub(crate) dials_refused: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self, core: &Core) -> MeshStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut nodes = [0; 4];
        for r in core.nodes() {
            nodes[match r.state {
                NodeState::Alive => 0,
                NodeState::Suspect => 1,
                NodeState::Dead => 2,
                NodeState::Left => 3,
            }] += 1;
        }
        MeshStats {
            links: core.links().len(),
            nodes,
            calls_sent: get(&self.calls_sent),
            calls_received: get(&self.calls_received),
            calls_refused: get(&self.calls_refused),
            events_sent: get(&self.events_sent),
            events_received: get(&self.events_received),
            frames_forwarded: get(&self.frames_forwarded),
            frames_dropped: get(&self.frames_dropped),
            switched_calls_failed: get(&self.switched_calls_failed),
            switched_calls_untracked: get(&self.switched_calls_untracked),
            dials_refused: get(&self.dials_refused),
        }
    }
}

/// The mesh as one node sees it (for `/v1/nodes` and observers).
#[derive(Debug, Clone, Serialize)]
pub struct MeshView {
    /// This node.
    pub me: String,
    /// Every known node, this one included.
    pub nodes: Vec<NodeView>,
}

/// One node in a [`MeshView`].
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    /// The node id (32 hex digits).
    pub id: String,
    /// Its human-readable name (not unique).
    pub name: String,
    /// `alive`, `suspect`, `dead` or `left`.
    pub state: &'static str,
    /// Its incarnation.
    pub incarnation: u64,
    /// Addresses it can be dialed at.
    pub addrs: Vec<String>,
    /// The gears it hosts.
    pub gears: Vec<GearAd>,
    /// The topics it listens to.
    pub topics: Vec<String>,
    /// Its direct links.
    pub links: Vec<LinkView>,
    /// How this node reaches it: `self`, `direct`, or `via <next hop>`, and the hop count.
    pub route: Option<RouteView>,
    /// The circuit breakers this node keeps for the node's gears (calls from here to there).
    pub breakers: Vec<BreakerView>,
}

/// A link in a [`NodeView`].
#[derive(Debug, Clone, Serialize)]
pub struct LinkView {
    /// The peer.
    pub peer: String,
    /// The round-trip time in microseconds, when this node holds the link and has measured it.
    pub rtt_us: Option<u64>,
    /// `wss`, `ws`, `quic` or `memory`, when this node holds the link.
    pub transport: Option<String>,
}

/// A route in a [`NodeView`].
#[derive(Debug, Clone, Serialize)]
pub struct RouteView {
    /// The linked peer to send through.
    pub next_hop: String,
    /// Links on the path.
    pub hops: u32,
}

fn state_name(s: NodeState) -> &'static str {
    match s {
        NodeState::Alive => "alive",
        NodeState::Suspect => "suspect",
        NodeState::Dead => "dead",
        NodeState::Left => "left",
    }
}

pub(crate) fn to_core(id: LinkNodeId) -> NodeId {
    NodeId::from_bytes(id.0)
}

pub(crate) fn to_link(id: NodeId) -> LinkNodeId {
    LinkNodeId(*id.as_bytes())
}

/// Where a gear runs, for a call.
pub(crate) enum Replicas {
    /// Nodes that are up, host the gear, and have a route.
    Routable(Vec<NodeId>),
    /// Nodes that are up and host the gear, but no route reaches them yet (they just joined).
    NoRouteYet,
    /// Only nodes that are down (suspect, dead, left) host the gear.
    Down,
    /// No node is known to host the gear.
    Unknown,
}

/// An established link in the link table; `generation` tells a stale reader from the current one.
struct LinkEntry {
    generation: u64,
    tx: LinkSender,
    /// Whether this node dialed the link (else the peer did).
    dialed_here: bool,
}

pub(crate) struct Inner {
    pub(crate) id: NodeId,
    pub(crate) config: MeshConfig,
    core: Mutex<Core>,
    epoch: Instant,
    pub(crate) host: Arc<Host>,
    dialer: Dialer,
    links: RwLock<FastMap<NodeId, LinkEntry>>,
    link_generation: AtomicU64,
    /// Raised whenever the links or the core's routes may have changed: next hops looked up
    /// before are then looked up again (see [`NextHops`]).
    routes_epoch: AtomicU64,
    dialing: Mutex<HashSet<String>>,
    /// Addresses whose refusal of our hello was logged as a warning (at most
    /// [`MAX_WARNED_REFUSALS`]; an address leaves when a link to it is made).
    refused_warned: Mutex<HashSet<String>>,
    pub(crate) calls: calls::CallTable,
    pub(crate) counters: Counters,
    pub(crate) resilience: strategy::Resilience,
    /// Calls counted towards shortcut links, and the shortcuts asked for.
    shortcuts: Mutex<shortcuts::Shortcuts>,
    /// Some shortcut is active (calls over direct links are counted only then).
    shortcuts_active: AtomicBool,
    /// The links the calls from each caller came in on, learned from the calls this node
    /// switched: the way back to a caller no route leads to (yet, or any more).
    return_paths: Mutex<return_paths::ReturnPaths>,
    /// Calls this node switched on and has not seen answered, by the link each went out on: a
    /// link that breaks fails them at once (see [`switched`]).
    switched: Mutex<switched::SwitchedCalls>,
    /// Links let go of (pruned, refused as full, or replaced) while they linger open: their
    /// peers still read them, so a reply for a peer that has no other way goes on one as a last
    /// resort instead of being dropped. At most one per peer; each leaves after
    /// [`RETIRE_LINGER`].
    lingering: Mutex<FastMap<NodeId, (u64, LinkSender)>>,
    /// Bytes of replies held for congested links now (see `calls::MAX_HELD_REPLY_BYTES`).
    held_reply_bytes: AtomicUsize,
    /// Checks each call from another node before it runs here (set by the node when
    /// authentication is on).
    pub(crate) authorizer: std::sync::OnceLock<Arc<dyn Authorizer>>,
    /// Told about each call from another node that ran here (set by the node; cleared by
    /// [`Mesh::stop`], since an observer may hold the mesh and so keep it alive).
    pub(crate) call_observer: RwLock<Option<Arc<dyn CallObserver>>>,
    /// Woken whenever routes change (calls waiting for a route to a joining node).
    pub(crate) routes_changed: Notify,
    wake: Notify,
    events: broadcast::Sender<MeshEvent>,
    shutdown: CancellationToken,
}

/// A running mesh membership: cheap to clone; stops with [`Mesh::leave`] or when its
/// shutdown token is cancelled.
#[derive(Clone)]
pub struct Mesh {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh").field("id", &self.inner.id).finish_non_exhaustive()
    }
}

/// A hash map with a fast hasher, seeded per map (so keys a peer chooses, such as call ids,
/// cannot be aimed at one bucket): these maps sit on every call's path.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a few map operations that leave the data consistent even if a
    // panic interrupted the holder, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Mesh {
    /// Starts the driver: our id and advertised addresses, the host whose gears we advertise and
    /// run, a dialer (carrying our hello) and the incoming links of our acceptor, and the seeds.
    pub fn start(
        id: LinkNodeId,
        addrs: Vec<String>,
        config: MeshConfig,
        host: Arc<Host>,
        dialer: Dialer,
        incoming: Incoming,
        seeds: Vec<String>,
    ) -> Mesh {
        let epoch = Instant::now();
        let mut core = Core::new(Time::ZERO, to_core(id), addrs, config.core.clone());
        core.add_seeds(seeds);
        let (events, _) = broadcast::channel(config.event_buffer.max(1));
        let inner = Arc::new(Inner {
            id: to_core(id),
            calls: calls::CallTable::default(),
            counters: Counters::default(),
            resilience: strategy::Resilience::new(config.resilience.clone()),
            shortcuts: Mutex::default(),
            shortcuts_active: AtomicBool::new(false),
            return_paths: Mutex::default(),
            switched: Mutex::default(),
            lingering: Mutex::default(),
            held_reply_bytes: AtomicUsize::new(0),
            authorizer: std::sync::OnceLock::new(),
            call_observer: RwLock::new(None),
            routes_changed: Notify::new(),
            config,
            core: Mutex::new(core),
            epoch,
            host,
            dialer,
            links: RwLock::default(),
            link_generation: AtomicU64::new(0),
            routes_epoch: AtomicU64::new(0),
            dialing: Mutex::default(),
            refused_warned: Mutex::default(),
            wake: Notify::new(),
            events,
            shutdown: CancellationToken::new(),
        });
        let mesh = Mesh { inner };
        mesh.refresh_local();
        tokio::spawn(drive(mesh.inner.clone()));
        tokio::spawn(accept(mesh.inner.clone(), incoming));
        mesh
    }

    /// This node's id.
    pub fn id(&self) -> LinkNodeId {
        to_link(self.inner.id)
    }

    /// Re-reads the host's gears and topics and advertises them (call after adding or removing a
    /// gear).
    pub fn refresh_local(&self) {
        let gears = self
            .inner
            .host
            .gears()
            .into_iter()
            .map(|g| GearAd {
                name: g.name.to_string(),
                version: g.version.to_string(),
                ports: g.ports.iter().map(|p| p.name.to_string()).collect(),
                idempotent: g.ports.iter().filter(|p| p.options.idempotent).map(|p| p.name.to_string()).collect(),
            })
            .collect();
        let topics = self.inner.host.topics().into_iter().map(|t| t.to_string()).collect();
        let result = self.inner.core().set_local(gears, topics);
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot advertise this node's gears");
        }
        self.inner.flush();
        // Observers of this node learn of its own changes too (nobody listening is fine).
        let _nobody = self.inner.events.send(MeshEvent::NodeUpdated(self.inner.id));
    }

    /// Mesh events as they happen (joins, leaves, suspicions, gears, links, routes). A receiver
    /// that falls more than `event_buffer` behind gets a `Lagged` error and skips ahead.
    pub fn subscribe(&self) -> broadcast::Receiver<MeshEvent> {
        self.inner.events.subscribe()
    }

    /// Makes this node check every call arriving from other nodes with `authorizer`,
    /// as the node that runs the port (so an entry node cannot launder a call). Set once.
    pub fn set_authorizer(&self, authorizer: Arc<dyn Authorizer>) {
        if self.inner.authorizer.set(authorizer).is_err() {
            tracing::warn!("the mesh authorizer is already set; keeping the first");
        }
    }

    /// Makes this node report each call from another node that ran here to `observer`. Set once.
    pub fn set_call_observer(&self, observer: Arc<dyn CallObserver>) {
        let mut slot = self.inner.call_observer.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.is_some() {
            tracing::warn!("the mesh call observer is already set; keeping the first");
        } else {
            *slot = Some(observer);
        }
    }

    /// Traffic counters since start, and the current link and node counts.
    pub fn stats(&self) -> MeshStats {
        self.inner.counters.snapshot(&self.inner.core())
    }

    /// Whether some node that is up (this one excluded) hosts `gear`.
    pub fn gear_is_remote(&self, gear: &str) -> bool {
        let core = self.inner.core();
        core.replicas_of(gear).into_iter().any(|n| n != self.inner.id)
    }

    /// The mesh as this node sees it.
    pub fn view(&self) -> MeshView {
        let core = self.inner.core();
        let routes: HashMap<NodeId, crate::core::Route> = core.routes().into_iter().collect();
        let links = self.inner.links.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = self.inner.now();
        let mut nodes: Vec<NodeView> = core
            .nodes()
            .map(|r| NodeView {
                id: r.id.to_string(),
                name: r.name.clone(),
                state: state_name(r.state),
                incarnation: r.incarnation,
                addrs: r.addrs.clone(),
                gears: r.gears.clone(),
                topics: r.topics.clone(),
                links: r
                    .links
                    .iter()
                    .map(|p| {
                        let held = links.get(p).filter(|_| r.id == self.inner.id);
                        LinkView {
                            peer: p.to_string(),
                            rtt_us: held.and_then(|l| l.tx.rtt()).map(|d| d.as_micros() as u64),
                            transport: held.map(|l| l.tx.peer().transport.to_string()),
                        }
                    })
                    .collect(),
                route: if r.id == self.inner.id {
                    Some(RouteView { next_hop: "self".into(), hops: 0 })
                } else {
                    routes.get(&r.id).map(|route| RouteView { next_hop: route.next_hop.to_string(), hops: route.hops })
                },
                breakers: self.inner.resilience.breakers_of(r.id, now),
            })
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        MeshView { me: self.inner.id.to_string(), nodes }
    }

    /// Announces a graceful leave (others reroute at once), then closes every link. Calls
    /// already in flight here should be drained by the caller between the two steps; see
    /// [`Mesh::announce_leave`] and [`Mesh::stop`].
    pub async fn leave(&self) {
        self.announce_leave().await;
        self.stop().await;
    }

    /// Tells the mesh this node is leaving and gives the announcement a moment to go out.
    pub async fn announce_leave(&self) {
        let now = self.inner.now();
        self.inner.core().leave(now);
        self.inner.flush();
        // The leave travels as gossip on our links; give their send queues a moment to drain.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    /// Closes every link and stops the driver.
    pub async fn stop(&self) {
        self.inner.shutdown.cancel();
        // The observer may hold this mesh (a cycle): let go of it so everything can be dropped.
        self.inner.call_observer.write().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        let senders: Vec<LinkSender> = {
            let mut links = self.inner.links.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            links.drain().map(|(_, e)| e.tx).collect()
        };
        self.inner.routes_touched();
        for tx in senders {
            tx.close(CloseCode::GOING_AWAY, "node leaving").await;
        }
        self.inner.calls.fail_all("this node is shutting down");
    }
}

impl Inner {
    fn core(&self) -> MutexGuard<'_, Core> {
        lock(&self.core)
    }

    pub(crate) fn now(&self) -> Time {
        self.time_at(Instant::now())
    }

    /// The core's time at `at` (a clock read the caller already made).
    pub(crate) fn time_at(&self, at: Instant) -> Time {
        Time::from_millis(u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX))
    }

    fn instant_of(&self, t: Time) -> Instant {
        self.epoch + Duration::from_millis(t.as_millis())
    }

    /// The sender for the next hop towards `dst`.
    pub(crate) fn route_to(&self, dst: NodeId) -> Option<LinkSender> {
        // A link of our own to `dst` is the shortest path whatever the records say. The core
        // counts only links both ends already advertise, so for a moment after a link change its
        // route can lead away from a linked destination while other nodes send the frame back:
        // a loop until the hop limit drops it.
        if let Some(tx) = self.sender(dst) {
            return Some(tx);
        }
        let hop = self.core().next_hop(dst);
        // No route of the core's own yet (gossip has not brought one): back the way a call
        // from `dst` came, if one did.
        let hop = hop.or_else(|| lock(&self.return_paths).via(dst, Instant::now()))?;
        self.sender(hop)
    }

    /// The link for an answer (a reply or a cancel) to `dst`, whose loss would leave a caller
    /// waiting for its deadline: a link of ours to `dst`; else a lingering one (see
    /// [`Inner::lingering`]) straight to `dst`; else the next hop towards `dst`; else a lingering
    /// link to the node a call from `dst` came through. New calls never take a lingering link,
    /// which closes soon (they fail `unavailable` at once instead).
    ///
    /// The lingering link to `dst` comes before the route: just after this node let that link
    /// go, the other nodes still route to `dst` through this node (their records say the link
    /// is there) while this node's own route now leads away from it, so a frame would go round
    /// until the hop limit dropped it. A lost reply, which the forming-mesh test caught.
    ///
    /// `came_from`: the peer the answer came from, when it is switched here. A route that sends
    /// it straight back there (split horizon) is such a loop for a node beyond the one let go
    /// of; the most recently lingering link, the way such frames went until a moment ago, is
    /// taken instead.
    pub(crate) fn route_or_lingering(&self, dst: NodeId, came_from: Option<NodeId>) -> Option<LinkSender> {
        if let Some(tx) = self.sender(dst) {
            return Some(tx);
        }
        if let Some(tx) = self.lingering_to(dst) {
            return Some(tx);
        }
        if let Some(tx) = self.route_to(dst) {
            if let Some(from) = came_from
                && from != dst
                && to_core(tx.peer().node_id) == from
            {
                let lingering = lock(&self.lingering);
                let newest = lingering
                    .iter()
                    .filter(|(peer, (_, t))| **peer != from && !t.is_closed())
                    .max_by_key(|(_, (token, _))| *token);
                if let Some((_, (_, other))) = newest {
                    tracing::debug!(node = %dst, back = %from, via = %other.peer().node_id, "an answer that would go back the way it came takes a lingering link");
                    return Some(other.clone());
                }
            }
            return Some(tx);
        }
        let via = lock(&self.return_paths).via(dst, Instant::now())?;
        let tx = self.lingering_to(via);
        if tx.is_some() {
            tracing::debug!(node = %dst, %via, "an answer with no route takes a lingering link");
        }
        tx
    }

    /// The lingering link to `peer`, if there is one that still takes frames.
    fn lingering_to(&self, peer: NodeId) -> Option<LinkSender> {
        lock(&self.lingering).get(&peer).filter(|(_, tx)| !tx.is_closed()).map(|(_, tx)| tx.clone())
    }

    /// Notes that a call from `src` came in on the link to `via`: frames for `src` that find no
    /// route (its reply first of all) go back that way (see [`return_paths`]). `in_use`: there is
    /// no route to `src` now, so cached next hops must see the new path at once.
    fn learn_return_path(&self, src: NodeId, via: NodeId, now: Instant, in_use: bool) {
        if lock(&self.return_paths).learn(src, via, now) && in_use {
            tracing::debug!(node = %src, %via, "return path learned from a call, with no route to its caller");
            self.routes_touched();
        }
    }

    /// Whether `tx` is the link in the table for its peer (not one being let go of).
    pub(crate) fn is_current(&self, tx: &LinkSender) -> bool {
        let links = self.links.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        links.get(&to_core(tx.peer().node_id)).is_some_and(|e| e.tx.id() == tx.id())
    }

    pub(crate) fn sender(&self, peer: NodeId) -> Option<LinkSender> {
        let links = self.links.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        links.get(&peer).map(|e| e.tx.clone())
    }

    /// Where `gear` runs, as far as this node can tell.
    pub(crate) fn replicas_of(&self, gear: &str) -> Replicas {
        let core = self.core();
        let mut routable = Vec::new();
        let mut unroutable = false;
        for n in core.replicas(gear).filter(|n| *n != self.id) {
            if core.next_hop(n).is_some() {
                routable.push(n);
            } else {
                unroutable = true;
            }
        }
        if !routable.is_empty() {
            return Replicas::Routable(routable);
        }
        if unroutable {
            return Replicas::NoRouteYet;
        }
        if core.nodes().any(|r| r.gears.iter().any(|g| g.name == gear)) { Replicas::Down } else { Replicas::Unknown }
    }

    pub(crate) fn interested_in(&self, topic: &str) -> Vec<NodeId> {
        self.core().interested_in(topic).into_iter().filter(|n| *n != self.id).collect()
    }

    /// Counts a call to `dst` sent at `now` towards a shortcut link (`switched`: it goes through
    /// a switch), and tells the core of any shortcut to open or give up.
    pub(crate) fn count_for_shortcut(self: &Arc<Self>, dst: NodeId, switched: bool, now: Instant) {
        if !switched && !self.shortcuts_active.load(Ordering::Relaxed) {
            return;
        }
        let changes = lock(&self.shortcuts).count(&self.config.shortcuts, dst, switched, now);
        self.apply_shortcuts(changes);
    }

    /// Gives up shortcuts that went quiet, on the driver's timer: a node that stops calling
    /// altogether counts no more calls that would do it.
    fn expire_shortcuts(self: &Arc<Self>, now: Instant) {
        if !self.shortcuts_active.load(Ordering::Relaxed) {
            return;
        }
        let remove = lock(&self.shortcuts).roll(&self.config.shortcuts, now);
        self.apply_shortcuts(shortcuts::Changes { add: None, remove });
    }

    fn apply_shortcuts(self: &Arc<Self>, changes: shortcuts::Changes) {
        if changes.add.is_none() && changes.remove.is_empty() {
            return;
        }
        {
            let mut core = self.core();
            for p in &changes.remove {
                tracing::debug!(peer = %p, "shortcut link given up: few calls");
                core.remove_shortcut(*p);
            }
            if let Some(p) = changes.add {
                if core.add_shortcut(p) {
                    tracing::debug!(peer = %p, "shortcut link asked for: many calls through switches");
                } else {
                    lock(&self.shortcuts).refused(p);
                }
            }
        }
        let active = lock(&self.shortcuts).any_active();
        self.shortcuts_active.store(active, Ordering::Relaxed);
        self.flush();
    }

    /// Says that the links or the routes may have changed: cached next hops are dropped.
    fn routes_touched(&self) {
        self.routes_epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Drains the core's outputs and acts on them. Never blocks.
    pub(crate) fn flush(self: &Arc<Self>) {
        // Whatever the core just handled (a link, gossip, a timeout) may have moved routes.
        self.routes_touched();
        let (transmits, actions, events) = {
            let mut core = self.core();
            let mut t = Vec::new();
            while let Some(x) = core.poll_transmit() {
                t.push(x);
            }
            let mut a = Vec::new();
            while let Some(x) = core.poll_action() {
                a.push(x);
            }
            let mut e = Vec::new();
            while let Some(x) = core.poll_event() {
                e.push(x);
            }
            (t, a, e)
        };
        for (peer, payload) in transmits {
            if let Some(tx) = self.sender(peer)
                && let Err(e) = tx.try_send(&Frame::Gossip { payload })
            {
                tracing::debug!(%peer, error = %e, "gossip dropped");
            }
        }
        for action in actions {
            match action {
                Action::Dial { addr } => self.dial(addr),
                Action::Disconnect { peer, reason } => {
                    let entry = self.links.write().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&peer);
                    self.routes_touched();
                    if let Some(e) = entry {
                        tracing::debug!(%peer, ?reason, "closing link");
                        match reason {
                            // A healthy link dropped for the topology's sake: the peer still
                            // routes calls and replies over it until our `Prune` message reaches
                            // it, so keep reading them for a while, as for a duplicate link.
                            // Closing at once lost them (the caller waited for its deadline).
                            DisconnectReason::Pruned => self.retire(peer, e.tx, "pruned"),
                            DisconnectReason::Full => self.retire(peer, e.tx, "too many links"),
                            // The peer dropped it and reads it for a while yet: sending on
                            // until its close would lose the frames in flight at that moment.
                            DisconnectReason::PrunedByPeer => self.retire(peer, e.tx, "pruned by the peer"),
                            DisconnectReason::Timeout
                            | DisconnectReason::PeerGone
                            | DisconnectReason::Leaving
                            | DisconnectReason::Protocol => {
                                // A link refused while this node leaves carried nothing yet;
                                // the others are given up on as broken: see
                                // `LinkFrames::on_closed`.
                                if reason != DisconnectReason::Leaving {
                                    self.fail_calls_over(e.tx.id(), peer);
                                }
                                tokio::spawn(async move {
                                    e.tx.close(CloseCode::NORMAL, &format!("{reason:?}")).await;
                                });
                            }
                        }
                    }
                }
            }
        }
        for event in events {
            match &event {
                // A node that left gracefully finishes the calls it runs and answers them; calls
                // to it fail only if the links to it go before their answers came
                // (`fail_unroutable`: the core routes to such a node while a path stays up).
                MeshEvent::NodeLeft { id, graceful: false } => self.calls.fail_to(*id, "the node is dead"),
                MeshEvent::RoutesChanged => {
                    let core = self.core();
                    self.calls.fail_unroutable(|dst| core.next_hop(dst).is_some());
                    drop(core);
                    self.routes_changed.notify_waiters();
                }
                _ => {}
            }
            // Nobody listening is fine: observers come and go.
            let _receivers = self.events.send(event);
        }
        self.wake.notify_one();
    }

    fn dial(self: &Arc<Self>, addr: String) {
        if self.shutdown.is_cancelled() || !lock(&self.dialing).insert(addr.clone()) {
            return;
        }
        let inner = self.clone();
        tokio::spawn(async move {
            let result = inner.dialer.dial(&addr).await;
            lock(&inner.dialing).remove(&addr);
            match result {
                Ok(link) => {
                    lock(&inner.refused_warned).remove(&addr);
                    inner.on_link(link, Some(addr));
                }
                Err(e) => {
                    if refused_in_hello(&e) {
                        Counters::bump(&inner.counters.dials_refused);
                        let first = {
                            let mut warned = lock(&inner.refused_warned);
                            warned.len() < MAX_WARNED_REFUSALS && warned.insert(addr.clone())
                        };
                        if first {
                            tracing::warn!(%addr, error = %e, "a node refused this node's hello (another mesh name, or a link token it does not accept?)");
                        } else {
                            tracing::debug!(%addr, error = %e, "dial refused");
                        }
                    } else {
                        tracing::debug!(%addr, error = %e, "dial failed");
                    }
                    let now = inner.now();
                    inner.core().dial_failed(now, &addr);
                    inner.flush();
                }
            }
        });
    }

    fn on_link(self: &Arc<Self>, link: Link, dialed: Option<String>) {
        let peer_info = link.peer().clone();
        let peer = to_core(peer_info.node_id);
        let (tx, rx) = link.split();
        if peer == self.id || self.shutdown.is_cancelled() {
            tokio::spawn(async move {
                tx.close(CloseCode::REJECTED, "link to self or while shutting down").await;
            });
            return;
        }
        let generation = self.link_generation.fetch_add(1, Ordering::Relaxed);
        let dialed_here = dialed.is_some();
        // Two nodes dialing each other at once end up with two links. Both sides keep the same
        // one (the link dialed by the node with the smaller id) and close the other; keeping "the
        // newest" instead lets each side close the link the other kept, and both go down.
        let preferred = |dialed_here: bool| dialed_here == (self.id < peer);
        let kept_old = {
            let mut links = self.links.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            match links.get(&peer) {
                Some(existing) if preferred(existing.dialed_here) && !preferred(dialed_here) => None,
                _ => Some(links.insert(peer, LinkEntry { generation, tx: tx.clone(), dialed_here })),
            }
        };
        self.routes_touched();
        let now = self.now();
        // For a duplicate this only tells the core that our dial (if it was ours) reached the peer.
        self.core().handle_link_up(now, peer, LinkInfo { addrs: peer_info.listen_addrs, dialed });
        self.flush();
        match kept_old {
            // Not in the table, so its reader's end is not a link loss.
            None => {
                tracing::debug!(%peer, "duplicate link; keeping the preferred one");
                self.retire(peer, tx.clone(), "duplicate link");
            }
            Some(Some(replaced)) => self.retire(peer, replaced.tx, "duplicate link"),
            Some(None) => {}
        }
        let (next_hops, learned) = (NextHops::default(), FastMap::default());
        let answer_hops = NextHops { answers_from: Some(peer), ..NextHops::default() };
        rx.into_handler(Box::new(LinkFrames {
            inner: self.clone(),
            peer,
            generation,
            tx,
            next_hops,
            answer_hops,
            learned,
        }));
    }

    /// Closes a link that lost its place in the table after [`RETIRE_LINGER`]: nothing new is
    /// sent on it, but frames the peer sent before it switched over (calls, replies) are still
    /// read and handled, so a duplicate or pruned link never swallows a call.
    fn retire(self: &Arc<Self>, peer: NodeId, tx: LinkSender, why: &'static str) {
        let token = self.link_generation.fetch_add(1, Ordering::Relaxed);
        lock(&self.lingering).insert(peer, (token, tx.clone()));
        // Answers for `peer` take this link now (`route_or_lingering`): cached hops must see it.
        self.routes_touched();
        let inner = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(RETIRE_LINGER) => {}
                () = inner.shutdown.cancelled() => {}
            }
            {
                let mut lingering = lock(&inner.lingering);
                if lingering.get(&peer).is_some_and(|(t, _)| *t == token) {
                    lingering.remove(&peer);
                }
            }
            inner.routes_touched();
            tx.close(CloseCode::NORMAL, why).await;
        });
    }
}

/// Why a call that went out on a link that broke (a transport error, or the transport's
/// heartbeats or the core's `link_timeout` gave up on it) fails: the link may have lost the call or its reply, and a reply
/// coming some other way is not to be counted on, so the call fails now, as a broken connection
/// fails its requests, instead of waiting for its deadline.
const LINK_BROKE: &str = "the link the call went out on broke; the call may or may not have run";

/// How long a link replaced by another to the same peer, or pruned, stays open for frames
/// already on it or sent before the peer heard.
const RETIRE_LINGER: Duration = Duration::from_secs(2);

/// Takes one link's frames inside the link's own task (no queue and no task switch per frame:
/// `on_frame` only decides and spawns), and tells the core when the link is gone.
struct LinkFrames {
    inner: Arc<Inner>,
    peer: NodeId,
    generation: u64,
    tx: LinkSender,
    next_hops: NextHops,
    /// The same for replies and cancels, which may take lingering links.
    answer_hops: NextHops,
    /// Callers whose calls this link brought, and when [`Inner::return_paths`] last heard of it
    /// (at most [`NextHops::CAP`], then it starts again).
    learned: FastMap<NodeId, Instant>,
}

/// The next hops a link's handler switched frames to, kept while [`Inner::routes_epoch`] stays
/// the same: a switch then passes a frame on without taking the link table's and the core's
/// locks, and without cloning a sender, for every frame. At most [`NextHops::CAP`] entries
/// (then it starts again). An entry that went stale in between (a link just closed) costs only
/// the frame's fallback to the decoding path, which looks the route up afresh.
#[derive(Default)]
struct NextHops {
    /// `Some(peer)`: the hops of answers (replies, cancels: [`Inner::route_or_lingering`]) that
    /// came from `peer`; `None`: of calls and events ([`Inner::route_to`]).
    answers_from: Option<NodeId>,
    epoch: u64,
    next: FastMap<NodeId, Option<LinkSender>>,
}

impl NextHops {
    const CAP: usize = 64;

    /// The sender towards `dst`'s next hop, if there is a route.
    fn get(&mut self, inner: &Inner, dst: NodeId) -> Option<&LinkSender> {
        let epoch = inner.routes_epoch.load(Ordering::Acquire);
        if epoch != self.epoch || (self.next.len() >= Self::CAP && !self.next.contains_key(&dst)) {
            self.next.clear();
            self.epoch = epoch;
        }
        let answers_from = self.answers_from;
        self.next
            .entry(dst)
            .or_insert_with(|| match answers_from {
                Some(_) => inner.route_or_lingering(dst, answers_from),
                None => inner.route_to(dst),
            })
            .as_ref()
    }
}

impl LinkFrames {
    /// A call from `src` that this node switches on: frames for `src` that find no route (its
    /// reply, first of all) will go back over this link. Learned at the first call from `src`
    /// on this link, then again at most every [`RELEARN`]; at once, and with the cached next hops
    /// dropped, when no route leads back to `src` now.
    fn note_switched_call(&mut self, src: NodeId) {
        // A caller at the other end of this link has a route: the link itself. A call of our
        // own that comes back round needs no path to us.
        if src == self.peer || src == self.inner.id {
            return;
        }
        let now = Instant::now();
        let unroutable = self.next_hops.get(&self.inner, src).is_none();
        let due = self.learned.get(&src).is_none_or(|at| now.saturating_duration_since(*at) >= RELEARN);
        if unroutable || due {
            if self.learned.len() >= NextHops::CAP && !self.learned.contains_key(&src) {
                self.learned.clear();
            }
            self.learned.insert(src, now);
            self.inner.learn_return_path(src, self.peer, now, unroutable);
        }
    }
}

/// How often a link's handler tells [`Inner::return_paths`] again about a caller whose calls
/// keep coming over it (far below [`return_paths::ReturnPaths::TTL`]).
const RELEARN: Duration = Duration::from_secs(10);

impl FrameHandler for LinkFrames {
    fn on_frame(&mut self, frame: Frame) {
        if let Frame::Call(c) = &frame
            && to_core(c.route.dst) != self.inner.id
        {
            self.note_switched_call(to_core(c.route.src));
        }
        self.inner.on_frame(self.peer, &self.tx, frame);
    }

    /// Frames for other nodes: this node switches them on as they came, undecoded.
    fn wants_raw(&mut self, route: &Route) -> bool {
        to_core(route.dst) != self.inner.id
    }

    fn on_raw(&mut self, route: Route, raw: Bytes) {
        // Calls, replies and cancels; `None` for events.
        let call = frame::peek_call(&raw);
        let kind = call.map(|c| c.kind);
        if kind == Some(FrameKind::Call) {
            self.note_switched_call(to_core(route.src));
        }
        let next = if matches!(kind, Some(FrameKind::Reply | FrameKind::Cancel)) {
            self.answer_hops.get(&self.inner, to_core(route.dst))
        } else {
            self.next_hops.get(&self.inner, to_core(route.dst))
        };
        self.inner.switch_raw(self.peer, &self.tx, next, route, call, raw);
    }

    fn on_closed(&mut self, close: &CloseReason) {
        let (inner, peer) = (&self.inner, self.peer);
        tracing::debug!(%peer, reason = %close, "link down");
        let reason = match close.code {
            CloseCode::HEARTBEAT_TIMEOUT => LinkDownReason::Timeout,
            // Only an orderly close (ours or the peer's) is not a sign of failure. A connection
            // that just ended (a killed process: no close frame) or broke is, whoever noticed it.
            code if code.is_orderly() => LinkDownReason::Closed,
            _ => LinkDownReason::Error,
        };
        let current = {
            let mut links = inner.links.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            match links.get(&peer) {
                Some(e) if e.generation == self.generation => {
                    links.remove(&peer);
                    lock(&inner.return_paths).forget_link(peer);
                    inner.routes_touched();
                    true
                }
                _ => false,
            }
        };
        if current && !inner.shutdown.is_cancelled() {
            let now = inner.now();
            inner.core().handle_link_down(now, peer, reason);
            inner.flush();
        }
        if inner.shutdown.is_cancelled() {
            return;
        }
        // Frames still queued were never written: they go out on the routes there are now.
        let unsent = self.tx.take_unsent();
        if !unsent.is_empty() {
            tracing::debug!(%peer, frames = unsent.len(), "sending on what the closed link never wrote");
            inner.send_unsent(unsent);
        }
        // A link that broke may have lost what it had written (see `LINK_BROKE`): the calls
        // that went out on it fail now, this node's own and those it switched for others.
        if reason == LinkDownReason::Closed {
            inner.forget_switched(self.tx.id());
        } else {
            inner.fail_calls_over(self.tx.id(), peer);
        }
    }
}

impl Inner {
    fn on_frame(self: &Arc<Self>, peer: NodeId, from: &LinkSender, frame: Frame) {
        match frame {
            Frame::Gossip { payload } => {
                let now = self.now();
                let result = self.core().handle_message(now, peer, &payload);
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "undecodable gossip");
                }
                self.flush();
            }
            Frame::Call(c) => self.on_call(from, c),
            Frame::Reply(r) => self.on_reply(peer, r),
            Frame::Cancel(c) => self.on_cancel(peer, c),
            Frame::Event(e) => self.on_event(e),
            other => tracing::debug!(%peer, kind = ?other.kind(), "unexpected frame on a mesh link"),
        }
    }
}

/// The core's timers.
async fn drive(inner: Arc<Inner>) {
    loop {
        let next = inner.core().poll_timeout();
        let sleep = async {
            match next {
                Some(t) => tokio::time::sleep_until(inner.instant_of(t)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => {
                let now = inner.now();
                inner.core().handle_timeout(now);
                inner.flush();
                inner.expire_shortcuts(Instant::now());
            }
            () = inner.wake.notified() => {}
            () = inner.shutdown.cancelled() => return,
        }
    }
}

/// Links accepted by the node's acceptor.
async fn accept(inner: Arc<Inner>, mut incoming: Incoming) {
    loop {
        tokio::select! {
            link = incoming.accept() => match link {
                Some(link) => inner.on_link(link, None),
                None => return,
            },
            () = inner.shutdown.cancelled() => return,
        }
    }
}

//! The plain data types of the mesh core: virtual time, configuration, node records, and the
//! inputs and outputs exchanged with the driver. No logic beyond small helpers lives here.

use std::ops::Add;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::id::NodeId;

/// Virtual time: milliseconds since an arbitrary epoch chosen by the driver (or the simulation).
///
/// The core never reads a clock; every `handle_*` call takes the current `Time`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Time(u64);

impl Time {
    /// The epoch.
    pub const ZERO: Time = Time(0);

    /// A time `ms` milliseconds after the epoch.
    pub const fn from_millis(ms: u64) -> Self {
        Self(ms)
    }

    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// How long after `earlier` this time is (zero if it is not later).
    pub fn since(self, earlier: Time) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Time {
    type Output = Time;

    fn add(self, d: Duration) -> Time {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Time(self.0.saturating_add(ms))
    }
}

/// Configuration of a mesh core: plain public fields, [`Default`] for production, presets for tests.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's human-readable name, carried in its record (may be empty).
    pub name: String,
    /// The incarnation this process starts with. A restarted node must start higher than its previous
    /// life (the driver passes e.g. the Unix time in milliseconds); the core also bumps it whenever
    /// it hears a newer claim about itself.
    pub incarnation: u64,
    /// Most direct links a node keeps after pruning (default 8).
    pub max_links: usize,
    /// A node dials out until it has this many links (default 6), or links to everyone if the mesh
    /// has at most `max_links` other nodes.
    pub min_links: usize,
    /// Links beyond this are refused at once with a referral (default 16), bounding link count even
    /// while many nodes join through one seed.
    pub hard_max_links: usize,
    /// Period of the core's tick: heartbeats, own-record publication, link maintenance (default 200 ms).
    pub gossip_interval: Duration,
    /// A link silent for this long is closed and its peer suspected (default 1 s).
    pub link_timeout: Duration,
    /// A new link is not pruned before it is this old, so the state exchange can finish (default 1 s).
    pub link_grace: Duration,
    /// Shortest suspicion, reached with `suspicion_confirmations` independent suspecters (default 1.4 s).
    pub suspicion_min: Duration,
    /// Longest suspicion, with a single suspecter (default 2.5 s).
    pub suspicion_max: Duration,
    /// Independent suspecters needed to shrink suspicion to `suspicion_min` (default 3).
    pub suspicion_confirmations: usize,
    /// Period of the anti-entropy exchange with one random linked peer (default 2 s).
    pub sync_interval: Duration,
    /// Changes of this node's own links are published at most this often (default 1 s); gear,
    /// topic and state changes go out at once.
    pub publish_interval: Duration,
    /// Routes are recomputed at most this often for remote link changes (default 1 s); a node
    /// that joins or dies, and a link of ours that comes up or goes down, reroute at once.
    pub route_interval: Duration,
    /// How long a dead node's record (and address, for reconnection) is kept (default 10 min).
    pub dead_gc: Duration,
    /// Period of redials of dead nodes' addresses, to heal partitions (default 1 s, one dial a time).
    pub dead_retry_interval: Duration,
    /// First delay before redialing an address that failed (default 250 ms), doubled per failure.
    pub dial_backoff_base: Duration,
    /// Longest delay between redials of one address (default 10 s).
    pub dial_backoff_cap: Duration,
    /// A dial with no outcome after this long counts as failed (default 5 s).
    pub dial_timeout: Duration,
    /// After a peer pruned our link, we do not redial it for this long (default 10 s).
    pub prune_cooldown: Duration,
    /// How long a leaving node keeps its links open so its `Left` record spreads (default 400 ms).
    pub leave_linger: Duration,
    /// Largest gossip message the core sends or accepts, in bytes (default 64 KiB).
    pub max_message_size: usize,
    /// Largest encoded node record, in bytes (default 16 KiB); `set_local` refuses bigger catalogues.
    pub max_record_size: usize,
    /// Bound of each output queue (transmits, actions, events; default 8192). See `Core` docs.
    pub max_queue: usize,
    /// Seed of the core's RNG (peer choice, jitter). Same seed and inputs, same outputs.
    pub rng_seed: u64,
    /// Of the addresses a node advertises, those starting with this prefix (a scheme such as
    /// `quic://`) are dialed first; the others, in advertised order, when they fail. `None`
    /// (default): advertised order.
    pub preferred_scheme: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: String::new(),
            incarnation: 0,
            max_links: 8,
            min_links: 6,
            hard_max_links: 16,
            gossip_interval: Duration::from_millis(200),
            link_timeout: Duration::from_secs(1),
            link_grace: Duration::from_secs(1),
            suspicion_min: Duration::from_millis(1400),
            suspicion_max: Duration::from_millis(2500),
            suspicion_confirmations: 3,
            sync_interval: Duration::from_secs(2),
            publish_interval: Duration::from_secs(1),
            route_interval: Duration::from_secs(1),
            dead_gc: Duration::from_secs(600),
            dead_retry_interval: Duration::from_secs(1),
            dial_backoff_base: Duration::from_millis(250),
            dial_backoff_cap: Duration::from_secs(10),
            dial_timeout: Duration::from_secs(5),
            prune_cooldown: Duration::from_secs(10),
            leave_linger: Duration::from_millis(400),
            max_message_size: 64 * 1024,
            max_record_size: 16 * 1024,
            max_queue: 8192,
            rng_seed: 0,
            preferred_scheme: None,
        }
    }
}

impl Config {
    /// The default configuration with the given RNG seed (what simulations use).
    pub fn with_seed(rng_seed: u64) -> Self {
        Self { rng_seed, ..Self::default() }
    }
}

/// A gear as advertised in a node record: name, version and port names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GearAd {
    /// The gear's name.
    pub name: String,
    /// The gear's version (semver text).
    pub version: String,
    /// The names of its ports.
    pub ports: Vec<String>,
    /// The names of its ports marked idempotent (safe to retry), a subset of `ports`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub idempotent: Vec<String>,
}

/// What the mesh believes about a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeState {
    /// Answering.
    Alive,
    /// Suspected dead; it has until the suspicion times out to refute.
    Suspect,
    /// Declared dead; removed from routing, its address still retried to heal partitions.
    Dead,
    /// Announced a graceful leave.
    Left,
}

impl NodeState {
    /// Whether the node takes part in routing and hosting (alive or merely suspected).
    pub fn is_up(self) -> bool {
        matches!(self, NodeState::Alive | NodeState::Suspect)
    }

    pub(crate) fn rank(self) -> u8 {
        match self {
            NodeState::Alive => 0,
            NodeState::Suspect => 1,
            NodeState::Dead => 2,
            NodeState::Left => 3,
        }
    }
}

/// A node record as gossiped: identity, versions, and what the node advertises.
///
/// Ordering of versions: higher `incarnation` wins; at equal incarnation the stronger state wins
/// (`Left` > `Dead` > `Suspect` > `Alive`); then the higher `version`. Only the node itself raises
/// its incarnation (to refute suspicion, or after a restart) and its version (to change content).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// The node.
    pub id: NodeId,
    /// The node's incarnation (its life counter).
    pub incarnation: u64,
    /// The content version within the incarnation.
    pub version: u64,
    /// The node's state as claimed by this record.
    pub state: NodeState,
    /// For `Suspect`: the distinct nodes that suspect it (at most a few).
    pub suspecters: Vec<NodeId>,
    /// Addresses others can dial (empty for a node that does not listen).
    pub addrs: Vec<String>,
    /// The gears it hosts.
    pub gears: Vec<GearAd>,
    /// The event topics it has listeners for.
    pub topics: Vec<String>,
    /// Its current direct links (sorted).
    pub links: Vec<NodeId>,
    /// Its human-readable name (not unique; for people and dashboards, never for routing).
    pub name: String,
}

/// The version key records are ordered by: (incarnation, state rank, version).
pub(crate) type Key = (u64, u8, u64);

impl NodeRecord {
    /// The version key records are ordered by.
    pub(crate) fn key(&self) -> Key {
        (self.incarnation, self.state.rank(), self.version)
    }
}

/// What the transport tells the core about a link that came up.
#[derive(Debug, Clone, Default)]
pub struct LinkInfo {
    /// The peer's advertised addresses, if it sent any in the handshake.
    pub addrs: Vec<String>,
    /// The address we dialed, if this link came from our `Dial` action (`None` for inbound links).
    pub dialed: Option<String>,
}

/// Why a link went down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkDownReason {
    /// Orderly close by the peer (it pruned the link or is leaving): no suspicion.
    Closed,
    /// The transport's heartbeats went unanswered.
    Timeout,
    /// The connection broke (reset, I/O error, protocol error).
    Error,
}

/// Why the core asks the driver to close a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// Topology maintenance: more links than `max_links`.
    Pruned,
    /// More links than `hard_max_links`: refused.
    Full,
    /// The peer pruned the link, or refused it as full (its `Prune` message came over it). It
    /// still reads the link for a while: stop sending on it, and close it after frames already
    /// on their way have arrived.
    PrunedByPeer,
    /// The peer was silent for `link_timeout`.
    Timeout,
    /// The peer is dead or left.
    PeerGone,
    /// This node is leaving.
    Leaving,
    /// The peer sent bytes that do not decode.
    Protocol,
}

/// Something the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// Open a link to this address (a DNS name may resolve to several: try them). Report the
    /// outcome with `handle_link_up` (with `LinkInfo::dialed` set) or `dial_failed`.
    Dial {
        /// The address to dial.
        addr: String,
    },
    /// Close the link to this peer. The core already forgot the link; no `handle_link_down` needed.
    Disconnect {
        /// The peer.
        peer: NodeId,
        /// Why.
        reason: DisconnectReason,
    },
}

/// Something that changed in the mesh (hints for the node; queries are authoritative).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MeshEvent {
    /// A node became known.
    NodeJoined(NodeId),
    /// A node is suspected dead.
    NodeSuspected(NodeId),
    /// A suspected (or dead) node proved alive.
    NodeAlive(NodeId),
    /// A node's record changed (gears, topics, addresses).
    NodeUpdated(NodeId),
    /// A node was declared dead (`graceful: false`) or announced its leave (`graceful: true`).
    NodeLeft {
        /// The node.
        id: NodeId,
        /// Whether it left on purpose.
        graceful: bool,
    },
    /// A gear became available on a node.
    GearAdded {
        /// The node hosting it.
        node: NodeId,
        /// The gear.
        gear: GearAd,
    },
    /// A gear is no longer available on a node (removed, or the node is gone).
    GearRemoved {
        /// The node that hosted it.
        node: NodeId,
        /// The gear.
        gear: GearAd,
    },
    /// A direct link came up.
    LinkUp(NodeId),
    /// A direct link went down.
    LinkDown(NodeId),
    /// The routing table changed.
    RoutesChanged,
    /// This node's circuit breaker for calls to a gear on a node changed state (emitted by the
    /// driver, never by the core).
    BreakerChanged {
        /// The gear.
        gear: String,
        /// The node running it.
        node: NodeId,
        /// The new state.
        state: crate::breaker::BreakerState,
    },
}

/// One entry of the routing table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The linked peer to send through.
    pub next_hop: NodeId,
    /// Links on the shortest known path (1 = direct).
    pub hops: u32,
}

//! gearmesh membership, routing and switching.
//!
//! - [`core`]: the sans-IO mesh core ([`Core`]): versioned node records spread over the link graph,
//!   SWIM-style failure detection with Lifeguard suspicion, a bounded random topology and
//!   shortest-path routing. No I/O, no clock, seeded randomness; see `docs/mesh.md`.
//! - The async driver that connects the core to transport links and to the node.

pub mod breaker;
pub mod core;
mod driver;

pub use driver::{
    Authorizer, BreakerView, CallObserver, Failure, LinkView, Mesh, MeshConfig, MeshStats, MeshView, NodeView,
    ResilienceConfig, ResilienceStats, RouteView, ShortcutPolicy, classify, p2c, rendezvous,
};

pub use crate::core::{
    Action, Config, Core, DecodeError, DisconnectReason, GearAd, LinkDownReason, LinkInfo, MeshEvent, NodeId,
    NodeRecord, NodeState, Route, SetLocalError, Time,
};

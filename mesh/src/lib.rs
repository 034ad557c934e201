//! gearmesh membership, routing and switching.
//!
//! This crate will hold the sans-IO mesh core (membership gossip, failure detection, topology and
//! routing decisions, call bookkeeping) and the async driver that connects it to transport links and
//! to the node. It is empty until the mesh work lands.

pub mod core;
mod driver;

pub use driver::{LinkView, Mesh, MeshConfig, MeshView, NodeView, RouteView};

pub use crate::core::{
    Action, Config, Core, DecodeError, DisconnectReason, GearAd, LinkDownReason, LinkInfo, MeshEvent, NodeId,
    NodeRecord, NodeState, Route, SetLocalError, Time,
};

//! gearmesh links: an authenticated, encrypted, bidirectional pipe of frames between two nodes.
//!
//! What this crate holds:
//! - [`frame`]: the versioned binary frame format (specified in `docs/protocol.md`) and its
//!   pure, panic-free codec.
//! - [`NodeId`]: the 16-byte node identity the mesh re-uses.

pub mod frame;
mod node_id;

pub use frame::{
    BodyKind, Call, Cancel, Close, CloseCode, DecodeError, EncodeError, Event, Frame, FrameKind,
    Hello, Reply, ReplyResult, Route,
};
pub use node_id::{InvalidNodeId, NodeId};

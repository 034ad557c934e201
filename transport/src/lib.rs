//! gearmesh links: an authenticated, encrypted, bidirectional pipe of frames between two nodes.
//!
//! What this crate holds:
//! - [`frame`]: the versioned binary frame format (specified in `docs/protocol.md`) and its
//!   pure, panic-free codec.
//! - [`NodeId`]: the 16-byte node identity the mesh re-uses.
//! - [`Link`]: one API over every transport: send (with back-pressure), receive, close with a
//!   reason, peer info, RTT. Heartbeats and limits live in the link driver.
//! - [`memory`]: in-memory links for tests of the layers above.
//! - [`Dialer`] and [`Acceptor`]: establishing links over WSS ([`ws`], accepted through an
//!   axum router) and QUIC ([`quic::QuicEndpoint`]).
//! - [`https`]: the server loop of the node's listening port (TLS, slow-loris deadlines, a
//!   connection bound, graceful drain) for its axum router.
//! - [`backoff`]: capped exponential backoff with jitter for reconnecting.
//! - [`tls`]: development CA, PEM loading, the swappable certificate resolver, rustls configs.
//! - [`acme`]: certificates obtained and renewed from an ACME server (Let's Encrypt), swapped
//!   into the resolver.

mod accept;
pub mod acme;
pub mod backoff;
mod dial;
pub mod frame;
pub mod https;
mod link;
pub mod memory;
mod node_id;
pub mod quic;
pub mod tls;
pub mod ws;

pub use accept::{AcceptConfig, AcceptStats, Acceptor, Incoming};
pub use dial::{DialError, Dialer, InvalidPeerUrl, PeerUrl, Scheme, resolve_all};
pub use frame::{
    BodyKind, Call, CallRef, Cancel, Close, CloseCode, DecodeError, EncodeError, Event, Frame, FrameKind, Hello, Reply,
    ReplyResult, Route,
};
pub use link::{
    CloseReason, FrameHandler, HandshakeError, HelloCheck, Initiator, Link, LinkConfig, LinkError, LinkId,
    LinkReceiver, LinkSender, LinkSetup, PeerInfo, SendError, TransportKind, TrySendError,
};
pub use node_id::{InvalidNodeId, NodeId};

//! The frame: the unit every link carries, and its versioned binary codec.
//!
//! The layout is specified in `docs/protocol.md`. This module is pure: no IO, no clock. Encoding
//! appends to a caller-owned [`BytesMut`] (reuse it); decoding is [`decode`], a function over
//! [`Bytes`] that never panics and returns bodies as zero-copy slices of its input. Switches read
//! the routing fields of a routed frame with [`peek_route`] and forward its bytes unchanged
//! (after [`set_hops`]) without decoding the body.

mod decode;
mod encode;
#[cfg(test)]
mod tests;

use std::fmt;

use bytes::Bytes;

pub use decode::{
    DecodeError, Header, PeekedCall, decode, decode_slice, peek_call, peek_header, peek_route, set_hops,
    validate_routed,
};
pub(crate) use encode::encode_raw_kind;
pub use encode::{CallRef, EncodeError};

use crate::NodeId;

/// The version byte this crate writes and the only one it accepts.
pub const PROTOCOL_VERSION: u8 = 1;
/// Bytes before the payload: version (1), kind (1), payload length (4, little-endian).
pub const HEADER_LEN: usize = 6;
/// Feature bit in [`Hello::features`]: the sender reads QUIC batch streams (small routed frames
/// that were queued together, sharing one stream; see `docs/protocol.md`). Links set it
/// themselves and send batches only to a peer that set it.
pub const FEATURE_QUIC_BATCHES: u32 = 1;
/// Default limit on a frame's total length (header included): 16 MiB.
pub const DEFAULT_MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

/// The kind byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum FrameKind {
    /// [`Hello`]: the first frame each side sends.
    Hello = 1,
    /// Heartbeat request.
    Ping = 2,
    /// Heartbeat answer.
    Pong = 3,
    /// [`Call`]: a request to a gear's port.
    Call = 4,
    /// [`Reply`]: the answer to a call.
    Reply = 5,
    /// [`Cancel`]: the caller gave up on a call.
    Cancel = 6,
    /// [`Event`]: a published event.
    Event = 7,
    /// [`Gossip`]: opaque membership bytes of the mesh core.
    Gossip = 8,
    /// [`Close`]: the sender is closing the link.
    Close = 9,
}

impl FrameKind {
    /// The kind for a kind byte, if known.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => FrameKind::Hello,
            2 => FrameKind::Ping,
            3 => FrameKind::Pong,
            4 => FrameKind::Call,
            5 => FrameKind::Reply,
            6 => FrameKind::Cancel,
            7 => FrameKind::Event,
            8 => FrameKind::Gossip,
            9 => FrameKind::Close,
            _ => return None,
        })
    }

    /// Whether frames of this kind start with a [`Route`] (call, reply, cancel, event).
    pub fn is_routed(self) -> bool {
        matches!(self, FrameKind::Call | FrameKind::Reply | FrameKind::Cancel | FrameKind::Event)
    }

    /// Whether the link itself owns this kind (hello, ping, pong, close): applications neither
    /// send nor receive it.
    pub fn is_link_control(self) -> bool {
        matches!(self, FrameKind::Hello | FrameKind::Ping | FrameKind::Pong | FrameKind::Close)
    }
}

/// The switching fields that open every routed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Route {
    /// The node that originated the frame.
    pub src: NodeId,
    /// The node the frame is for ([`NodeId::ZERO`] for "everyone interested", events only).
    pub dst: NodeId,
    /// How many switches the frame crossed so far.
    pub hops: u8,
}

/// How a body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum BodyKind {
    /// UTF-8 JSON.
    #[default]
    Json = 0,
    /// Opaque bytes.
    Bytes = 1,
}

/// The first frame each side of a link sends.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Hello {
    /// The protocol version the sender speaks (currently [`PROTOCOL_VERSION`]).
    pub version: u16,
    /// The sender's node id.
    pub node_id: NodeId,
    /// Changes every time the sender's process restarts.
    pub incarnation: u64,
    /// A bearer token (a JWT) proving the sender may join; may be empty. Never logged.
    pub token: Bytes,
    /// Addresses the sender can be dialled at (`wss://...`, `quic://...`).
    pub listen_addrs: Vec<String>,
    /// Feature bits the sender supports.
    pub features: u32,
    /// The name of the mesh the sender belongs to. A link between nodes of two meshes is refused
    /// in the handshake, even when both trust the same CA (an address one mesh knew and another
    /// mesh's node now holds).
    pub mesh: String,
}

impl fmt::Debug for Hello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hello")
            .field("version", &self.version)
            .field("node_id", &self.node_id)
            .field("incarnation", &self.incarnation)
            .field("token", &format_args!("<{} bytes redacted>", self.token.len()))
            .field("listen_addrs", &self.listen_addrs)
            .field("features", &self.features)
            .field("mesh", &self.mesh)
            .finish()
    }
}

/// A request to a port of a gear on `route.dst`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Call {
    /// Switching fields.
    pub route: Route,
    /// Chosen by the caller's node, unique among its open calls.
    pub call_id: u64,
    /// Milliseconds left before the caller gives up.
    pub deadline_ms: u32,
    /// The trace this call belongs to.
    pub trace_id: u128,
    /// The calling principal, e.g. `user:alice`.
    pub caller: String,
    /// Scopes granted to the caller.
    pub scopes: Vec<String>,
    /// The gear called.
    pub gear: String,
    /// The port called.
    pub port: String,
    /// How `body` is encoded.
    pub body_kind: BodyKind,
    /// The argument.
    pub body: Bytes,
}

/// The outcome carried by a [`Reply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyResult {
    /// The port returned a value.
    Ok {
        /// How `body` is encoded.
        kind: BodyKind,
        /// The value.
        body: Bytes,
    },
    /// The call failed; the bytes are the error as JSON.
    Err(Bytes),
}

/// The answer to a [`Call`], routed back to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Switching fields.
    pub route: Route,
    /// The call answered.
    pub call_id: u64,
    /// What the call produced.
    pub result: ReplyResult,
}

/// The caller no longer wants the answer to a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancel {
    /// Switching fields.
    pub route: Route,
    /// The call cancelled.
    pub call_id: u64,
}

/// A published event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    /// Switching fields (`dst` may be [`NodeId::ZERO`]: the mesh decides).
    pub route: Route,
    /// The topic.
    pub topic: String,
    /// The publishing principal or gear.
    pub publisher: String,
    /// The trace this event belongs to.
    pub trace_id: u128,
    /// How `body` is encoded.
    pub body_kind: BodyKind,
    /// The event's payload.
    pub body: Bytes,
}

/// The reason a link closes, as carried by a [`Close`] frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    /// A [`CloseCode`].
    pub code: CloseCode,
    /// Human-readable detail.
    pub reason: String,
}

/// Why a link closed; the numeric values are on the wire (see `docs/protocol.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// An orderly close.
    pub const NORMAL: CloseCode = CloseCode(0);
    /// The node is shutting down.
    pub const GOING_AWAY: CloseCode = CloseCode(1);
    /// The peer sent something that is not a valid frame, or a frame out of place.
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(2);
    /// The peer sent a frame over the size limit.
    pub const FRAME_TOO_LARGE: CloseCode = CloseCode(3);
    /// No frame arrived within the idle timeout.
    pub const HEARTBEAT_TIMEOUT: CloseCode = CloseCode(4);
    /// The hello was rejected (bad token, wrong version, ...).
    pub const REJECTED: CloseCode = CloseCode(5);
    /// The hello exchange did not finish in time.
    pub const HANDSHAKE_TIMEOUT: CloseCode = CloseCode(6);
    /// The accepting node has too many links.
    pub const TOO_MANY_LINKS: CloseCode = CloseCode(7);
    /// The underlying connection failed.
    pub const TRANSPORT_ERROR: CloseCode = CloseCode(8);
    /// This node failed handling the link's frames (a bug: its frame handler panicked).
    pub const INTERNAL_ERROR: CloseCode = CloseCode(9);

    /// Whether this is [`CloseCode::NORMAL`] or [`CloseCode::GOING_AWAY`].
    pub fn is_orderly(self) -> bool {
        self == CloseCode::NORMAL || self == CloseCode::GOING_AWAY
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match *self {
            CloseCode::NORMAL => "normal",
            CloseCode::GOING_AWAY => "going away",
            CloseCode::PROTOCOL_ERROR => "protocol error",
            CloseCode::FRAME_TOO_LARGE => "frame too large",
            CloseCode::HEARTBEAT_TIMEOUT => "heartbeat timeout",
            CloseCode::REJECTED => "rejected",
            CloseCode::HANDSHAKE_TIMEOUT => "handshake timeout",
            CloseCode::TOO_MANY_LINKS => "too many links",
            CloseCode::TRANSPORT_ERROR => "transport error",
            CloseCode::INTERNAL_ERROR => "internal error",
            CloseCode(other) => return write!(f, "code {other}"),
        };
        f.write_str(name)
    }
}

/// One frame of any kind.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Frame {
    /// See [`Hello`].
    Hello(Hello),
    /// Heartbeat request.
    Ping {
        /// Sequence number, echoed in the pong.
        seq: u64,
        /// The sender's clock in microseconds, echoed in the pong.
        sent_at_micros: u64,
    },
    /// Heartbeat answer.
    Pong {
        /// The ping's sequence number.
        seq: u64,
        /// The ping's `sent_at_micros`.
        echo: u64,
    },
    /// See [`Call`].
    Call(Call),
    /// See [`Reply`].
    Reply(Reply),
    /// See [`Cancel`].
    Cancel(Cancel),
    /// See [`Event`].
    Event(Event),
    /// Opaque membership bytes of the mesh core.
    Gossip {
        /// The mesh core's bytes.
        payload: Bytes,
    },
    /// See [`Close`].
    Close(Close),
}

impl Frame {
    /// This frame's kind.
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Hello(_) => FrameKind::Hello,
            Frame::Ping { .. } => FrameKind::Ping,
            Frame::Pong { .. } => FrameKind::Pong,
            Frame::Call(_) => FrameKind::Call,
            Frame::Reply(_) => FrameKind::Reply,
            Frame::Cancel(_) => FrameKind::Cancel,
            Frame::Event(_) => FrameKind::Event,
            Frame::Gossip { .. } => FrameKind::Gossip,
            Frame::Close(_) => FrameKind::Close,
        }
    }

    /// The routing fields, for routed kinds.
    pub fn route(&self) -> Option<&Route> {
        match self {
            Frame::Call(c) => Some(&c.route),
            Frame::Reply(r) => Some(&r.route),
            Frame::Cancel(c) => Some(&c.route),
            Frame::Event(e) => Some(&e.route),
            Frame::Hello(_) | Frame::Ping { .. } | Frame::Pong { .. } | Frame::Gossip { .. } | Frame::Close(_) => None,
        }
    }
}

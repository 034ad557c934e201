//! Decoding: a pure, panic-free function from bytes to a [`Frame`].

use bytes::Bytes;

use super::encode::ROUTE_LEN;
use super::{
    BodyKind, Call, Cancel, Close, CloseCode, Event, Frame, FrameKind, HEADER_LEN, Hello, PROTOCOL_VERSION, Reply,
    ReplyResult, Route,
};
use crate::NodeId;

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ends before the frame does.
    #[error("truncated frame: needed {needed} bytes, have {have}")]
    Truncated {
        /// Bytes needed at least.
        needed: usize,
        /// Bytes present.
        have: usize,
    },
    /// The version byte is not one this crate speaks.
    #[error("unknown protocol version {0}")]
    UnknownVersion(u8),
    /// The kind byte is not a known frame kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The frame is longer than the configured limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    Oversized {
        /// The frame's total length, from its header.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Bytes follow the end of the frame.
    #[error("{0} unexpected bytes after the frame")]
    TrailingBytes(usize),
    /// A field runs past the end of the payload.
    #[error("field {0} runs past the end of the frame")]
    FieldOverrun(&'static str),
    /// A string field is not UTF-8.
    #[error("field {0} is not valid UTF-8")]
    InvalidUtf8(&'static str),
    /// A body-kind or reply-status byte has an unknown value.
    #[error("field {field} has unknown value {value}")]
    InvalidEnum {
        /// The field.
        field: &'static str,
        /// The value found.
        value: u8,
    },
}

/// The fixed header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The frame's kind.
    pub kind: FrameKind,
    /// Length of the payload after the header.
    pub payload_len: usize,
}

impl Header {
    /// Total frame length, header included.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len
    }
}

/// Reads and validates a frame header from the start of `buf` (for stream framing):
/// `Ok(None)` if fewer than [`HEADER_LEN`] bytes are present.
pub fn peek_header(buf: &[u8], max_len: usize) -> Result<Option<Header>, DecodeError> {
    let Some(h) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    if h[0] != PROTOCOL_VERSION {
        return Err(DecodeError::UnknownVersion(h[0]));
    }
    let kind = FrameKind::from_u8(h[1]).ok_or(DecodeError::UnknownKind(h[1]))?;
    let payload_len = u32::from_le_bytes([h[2], h[3], h[4], h[5]]) as usize;
    let len = HEADER_LEN.saturating_add(payload_len);
    if len > max_len {
        return Err(DecodeError::Oversized { len, max: max_len });
    }
    Ok(Some(Header { kind, payload_len }))
}

/// The route of an encoded routed frame, without decoding the rest; `Ok(None)` for kinds that
/// have no route.
pub fn peek_route(buf: &[u8]) -> Result<Option<Route>, DecodeError> {
    let header = peek_header(buf, usize::MAX)?.ok_or(DecodeError::Truncated { needed: HEADER_LEN, have: buf.len() })?;
    if !header.kind.is_routed() {
        return Ok(None);
    }
    let r = buf
        .get(HEADER_LEN..HEADER_LEN + ROUTE_LEN)
        .ok_or(DecodeError::Truncated { needed: HEADER_LEN + ROUTE_LEN, have: buf.len() })?;
    if header.payload_len < ROUTE_LEN {
        return Err(DecodeError::FieldOverrun("route"));
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&r[..16]);
    dst.copy_from_slice(&r[16..32]);
    Ok(Some(Route { src: NodeId(src), dst: NodeId(dst), hops: r[32] }))
}

/// The call an encoded call, reply or cancel is about, without decoding the rest: its call id,
/// and for a call also its remaining deadline in milliseconds. `None` for other kinds and for
/// bytes too short to hold those fields (a frame checked by [`validate_routed`] never is). A
/// switch uses it to keep track of the calls it passes on. Never panics.
pub fn peek_call(buf: &[u8]) -> Option<PeekedCall> {
    let header = peek_header(buf, usize::MAX).ok().flatten()?;
    let at = HEADER_LEN + ROUTE_LEN;
    let call_id = u64::from_le_bytes(buf.get(at..at + 8)?.try_into().ok()?);
    let deadline_ms = match header.kind {
        FrameKind::Call => Some(u32::from_le_bytes(buf.get(at + 8..at + 12)?.try_into().ok()?)),
        FrameKind::Reply | FrameKind::Cancel => None,
        _ => return None,
    };
    Some(PeekedCall { kind: header.kind, call_id, deadline_ms })
}

/// What [`peek_call`] reads from a call, reply or cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeekedCall {
    /// [`FrameKind::Call`], [`FrameKind::Reply`] or [`FrameKind::Cancel`].
    pub kind: FrameKind,
    /// The call's id (unique per calling node).
    pub call_id: u64,
    /// A call's remaining deadline in milliseconds; `None` for a reply or a cancel.
    pub deadline_ms: Option<u32>,
}

/// Rewrites the hop count of an encoded routed frame in place; returns false (and changes
/// nothing) if `buf` is not a routed frame.
pub fn set_hops(buf: &mut [u8], hops: u8) -> bool {
    match peek_route(buf) {
        Ok(Some(_)) => match buf.get_mut(HEADER_LEN + ROUTE_LEN - 1) {
            Some(b) => {
                *b = hops;
                true
            }
            None => false,
        },
        Ok(None) | Err(_) => false,
    }
}

/// The header of the one frame that occupies exactly all of `buf`.
fn whole_frame(buf: &[u8], max_len: usize) -> Result<Header, DecodeError> {
    let header = peek_header(buf, max_len)?.ok_or(DecodeError::Truncated { needed: HEADER_LEN, have: buf.len() })?;
    let len = header.frame_len();
    if buf.len() < len {
        return Err(DecodeError::Truncated { needed: len, have: buf.len() });
    }
    if buf.len() > len {
        return Err(DecodeError::TrailingBytes(buf.len() - len));
    }
    Ok(header)
}

/// Decodes one complete frame occupying all of `buf`. Never panics. Byte bodies are slices of
/// `buf` (no copy).
pub fn decode(buf: &Bytes, max_len: usize) -> Result<Frame, DecodeError> {
    let header = whole_frame(buf, max_len)?;
    let len = header.frame_len();
    let mut r = Reader { buf, pos: HEADER_LEN };
    let frame = match header.kind {
        FrameKind::Hello => Frame::Hello(Hello {
            version: r.u16("version")?,
            node_id: r.node_id("node_id")?,
            incarnation: r.u64("incarnation")?,
            features: r.u32("features")?,
            token: {
                let n = r.u32("token")? as usize;
                buf.slice(r.range("token", n)?)
            },
            listen_addrs: r.list("listen_addrs")?,
            mesh: r.string("mesh")?,
        }),
        FrameKind::Ping => Frame::Ping { seq: r.u64("seq")?, sent_at_micros: r.u64("sent_at_micros")? },
        FrameKind::Pong => Frame::Pong { seq: r.u64("seq")?, echo: r.u64("echo")? },
        FrameKind::Call => Frame::Call(Call {
            route: r.route()?,
            call_id: r.u64("call_id")?,
            deadline_ms: r.u32("deadline_ms")?,
            trace_id: r.u128("trace_id")?,
            caller: r.string("caller")?,
            scopes: r.list("scopes")?,
            gear: r.string("gear")?,
            port: r.string("port")?,
            body_kind: r.body_kind()?,
            body: buf.slice(r.rest()),
        }),
        FrameKind::Reply => {
            let route = r.route()?;
            let call_id = r.u64("call_id")?;
            let result = match r.u8("status")? {
                0 => ReplyResult::Ok { kind: BodyKind::Json, body: buf.slice(r.rest()) },
                1 => ReplyResult::Ok { kind: BodyKind::Bytes, body: buf.slice(r.rest()) },
                2 => ReplyResult::Err(buf.slice(r.rest())),
                value => {
                    return Err(DecodeError::InvalidEnum { field: "status", value });
                }
            };
            Frame::Reply(Reply { route, call_id, result })
        }
        FrameKind::Cancel => Frame::Cancel(Cancel { route: r.route()?, call_id: r.u64("call_id")? }),
        FrameKind::Event => Frame::Event(Event {
            route: r.route()?,
            trace_id: r.u128("trace_id")?,
            topic: r.string("topic")?,
            publisher: r.string("publisher")?,
            body_kind: r.body_kind()?,
            body: buf.slice(r.rest()),
        }),
        FrameKind::Gossip => Frame::Gossip { payload: buf.slice(r.rest()) },
        FrameKind::Close => Frame::Close(Close { code: CloseCode(r.u16("code")?), reason: r.string("reason")? }),
    };
    if r.pos != len {
        return Err(DecodeError::TrailingBytes(len - r.pos));
    }
    Ok(frame)
}

/// Checks that a routed frame (call, reply, cancel or event) occupying all of `buf` is valid,
/// exactly as [`decode`] would, without building it: no allocation, no copy. Returns its route.
/// A switch checks a frame it passes on this way, so that a malformed frame is refused on the
/// link it came in on and never reaches (and closes) a link further on. Never panics.
///
/// # Errors
/// What [`decode`] would return for `buf`, or [`DecodeError::UnknownKind`] for a valid kind
/// that is not routed.
pub fn validate_routed(buf: &[u8], max_len: usize) -> Result<Route, DecodeError> {
    let header = whole_frame(buf, max_len)?;
    let len = header.frame_len();
    if !header.kind.is_routed() {
        return Err(DecodeError::UnknownKind(header.kind as u8));
    }
    let mut r = Reader { buf, pos: HEADER_LEN };
    let route = r.route()?;
    match header.kind {
        FrameKind::Call => {
            r.take("call_id", 8)?;
            r.take("deadline_ms", 4)?;
            r.take("trace_id", 16)?;
            r.str("caller")?;
            r.check_list("scopes")?;
            r.str("gear")?;
            r.str("port")?;
            r.body_kind()?;
            r.rest();
        }
        FrameKind::Reply => {
            r.take("call_id", 8)?;
            match r.u8("status")? {
                0..=2 => r.rest(),
                value => return Err(DecodeError::InvalidEnum { field: "status", value }),
            };
        }
        FrameKind::Cancel => {
            r.take("call_id", 8)?;
        }
        FrameKind::Event => {
            r.take("trace_id", 16)?;
            r.str("topic")?;
            r.str("publisher")?;
            r.body_kind()?;
            r.rest();
        }
        other => return Err(DecodeError::UnknownKind(other as u8)),
    }
    if r.pos != len {
        return Err(DecodeError::TrailingBytes(len - r.pos));
    }
    Ok(route)
}

/// [`decode`] over a borrowed slice (copies it once); convenient for fuzzing and tests.
pub fn decode_slice(buf: &[u8], max_len: usize) -> Result<Frame, DecodeError> {
    decode(&Bytes::copy_from_slice(buf), max_len)
}

/// A cursor over the payload.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::FieldOverrun(field))?;
        let s = self.buf.get(self.pos..end).ok_or(DecodeError::FieldOverrun(field))?;
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(field, N)?);
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    fn u128(&mut self, field: &'static str) -> Result<u128, DecodeError> {
        Ok(u128::from_le_bytes(self.array(field)?))
    }

    fn node_id(&mut self, field: &'static str) -> Result<NodeId, DecodeError> {
        Ok(NodeId(self.array(field)?))
    }

    fn route(&mut self) -> Result<Route, DecodeError> {
        Ok(Route { src: self.node_id("src")?, dst: self.node_id("dst")?, hops: self.u8("hops")? })
    }

    /// The range of the next `n` bytes (to slice the frame's `Bytes` with: no copy).
    fn range(&mut self, field: &'static str, n: usize) -> Result<std::ops::Range<usize>, DecodeError> {
        let start = self.pos;
        self.take(field, n)?;
        Ok(start..self.pos)
    }

    fn str(&mut self, field: &'static str) -> Result<&'a str, DecodeError> {
        let n = self.u16(field)? as usize;
        let s = self.take(field, n)?;
        std::str::from_utf8(s).map_err(|_| DecodeError::InvalidUtf8(field))
    }

    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        self.str(field).map(str::to_owned)
    }

    /// A list's item count, refused if the payload cannot hold that many items before
    /// anything is allocated (each takes at least two bytes).
    fn list_len(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let n = self.u16(field)? as usize;
        if n.saturating_mul(2) > self.buf.len().saturating_sub(self.pos) {
            return Err(DecodeError::FieldOverrun(field));
        }
        Ok(n)
    }

    fn list(&mut self, field: &'static str) -> Result<Vec<String>, DecodeError> {
        let n = self.list_len(field)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.string(field)?);
        }
        Ok(out)
    }

    /// Checks a list without building it.
    fn check_list(&mut self, field: &'static str) -> Result<(), DecodeError> {
        for _ in 0..self.list_len(field)? {
            self.str(field)?;
        }
        Ok(())
    }

    fn body_kind(&mut self) -> Result<BodyKind, DecodeError> {
        match self.u8("body_kind")? {
            0 => Ok(BodyKind::Json),
            1 => Ok(BodyKind::Bytes),
            value => Err(DecodeError::InvalidEnum { field: "body_kind", value }),
        }
    }

    /// The range of the remaining bytes (a body).
    fn rest(&mut self) -> std::ops::RangeFrom<usize> {
        let start = self.pos.min(self.buf.len());
        self.pos = self.buf.len();
        start..
    }
}

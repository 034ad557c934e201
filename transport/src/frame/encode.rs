//! Encoding frames into a caller-owned, reusable [`BytesMut`].

use bytes::{BufMut, BytesMut};

use super::{BodyKind, Call, Frame, FrameKind, HEADER_LEN, Hello, PROTOCOL_VERSION, ReplyResult, Route};

/// Length in bytes of an encoded [`Route`].
pub(crate) const ROUTE_LEN: usize = 33;

/// A frame that cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// A string field is longer than 65535 bytes.
    #[error("field {field} is {len} bytes, over the 65535 limit")]
    StringTooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// A list has more than 65535 items.
    #[error("list {field} has {len} items, over the 65535 limit")]
    TooManyItems {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// The frame would exceed the frame size limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The encoded length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

fn str_len(s: &str) -> usize {
    2 + s.len()
}

fn check_str(field: &'static str, s: &str) -> Result<(), EncodeError> {
    if s.len() > u16::MAX as usize {
        return Err(EncodeError::StringTooLong { field, len: s.len() });
    }
    Ok(())
}

fn check_list(field: &'static str, items: &[String]) -> Result<(), EncodeError> {
    if items.len() > u16::MAX as usize {
        return Err(EncodeError::TooManyItems { field, len: items.len() });
    }
    items.iter().try_for_each(|s| check_str(field, s))
}

fn put_str(buf: &mut BytesMut, s: &str) {
    // Lengths were checked by `check`.
    buf.put_u16_le(s.len() as u16);
    buf.put_slice(s.as_bytes());
}

fn put_list(buf: &mut BytesMut, items: &[String]) {
    buf.put_u16_le(items.len() as u16);
    for s in items {
        put_str(buf, s);
    }
}

fn put_route(buf: &mut BytesMut, r: &Route) {
    buf.put_slice(&r.src.0);
    buf.put_slice(&r.dst.0);
    buf.put_u8(r.hops);
}

impl Frame {
    /// The payload length (without the header) this frame encodes to.
    fn payload_len(&self) -> usize {
        match self {
            Frame::Hello(h) => hello_len(h),
            Frame::Ping { .. } | Frame::Pong { .. } => 16,
            Frame::Call(c) => c.borrowed().payload_len(),
            Frame::Reply(r) => {
                ROUTE_LEN
                    + 8
                    + 1
                    + match &r.result {
                        ReplyResult::Ok { body, .. } => body.len(),
                        ReplyResult::Err(e) => e.len(),
                    }
            }
            Frame::Cancel(_) => ROUTE_LEN + 8,
            Frame::Event(e) => ROUTE_LEN + 16 + str_len(&e.topic) + str_len(&e.publisher) + 1 + e.body.len(),
            Frame::Gossip { payload } => payload.len(),
            Frame::Close(c) => 2 + str_len(&c.reason),
        }
    }

    /// The total length (header included) this frame encodes to.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload_len()
    }

    /// Checks that every field fits its length prefix.
    fn check(&self) -> Result<(), EncodeError> {
        match self {
            Frame::Hello(h) => {
                check_list("listen_addrs", &h.listen_addrs)?;
                check_str("mesh", &h.mesh)
            }
            Frame::Call(c) => c.borrowed().check(),
            Frame::Event(e) => {
                check_str("topic", &e.topic)?;
                check_str("publisher", &e.publisher)
            }
            Frame::Close(c) => check_str("reason", &c.reason),
            Frame::Ping { .. } | Frame::Pong { .. } | Frame::Reply(_) | Frame::Cancel(_) | Frame::Gossip { .. } => {
                Ok(())
            }
        }
    }

    /// Appends this frame's encoding to `buf`, refusing frames longer than `max_len` bytes
    /// (header included). On error nothing is written.
    pub fn encode(&self, buf: &mut BytesMut, max_len: usize) -> Result<(), EncodeError> {
        self.check()?;
        put_header(buf, self.kind(), self.payload_len(), max_len)?;
        match self {
            Frame::Hello(h) => {
                buf.put_u16_le(h.version);
                buf.put_slice(&h.node_id.0);
                buf.put_u64_le(h.incarnation);
                buf.put_u32_le(h.features);
                buf.put_u32_le(h.token.len() as u32);
                buf.put_slice(&h.token);
                put_list(buf, &h.listen_addrs);
                put_str(buf, &h.mesh);
            }
            Frame::Ping { seq, sent_at_micros } => {
                buf.put_u64_le(*seq);
                buf.put_u64_le(*sent_at_micros);
            }
            Frame::Pong { seq, echo } => {
                buf.put_u64_le(*seq);
                buf.put_u64_le(*echo);
            }
            Frame::Call(c) => c.borrowed().put_payload(buf),
            Frame::Reply(r) => {
                put_route(buf, &r.route);
                buf.put_u64_le(r.call_id);
                match &r.result {
                    ReplyResult::Ok { kind, body } => {
                        buf.put_u8(match kind {
                            BodyKind::Json => 0,
                            BodyKind::Bytes => 1,
                        });
                        buf.put_slice(body);
                    }
                    ReplyResult::Err(e) => {
                        buf.put_u8(2);
                        buf.put_slice(e);
                    }
                }
            }
            Frame::Cancel(c) => {
                put_route(buf, &c.route);
                buf.put_u64_le(c.call_id);
            }
            Frame::Event(e) => {
                put_route(buf, &e.route);
                buf.put_u128_le(e.trace_id);
                put_str(buf, &e.topic);
                put_str(buf, &e.publisher);
                buf.put_u8(e.body_kind as u8);
                buf.put_slice(&e.body);
            }
            Frame::Gossip { payload } => buf.put_slice(payload),
            Frame::Close(c) => {
                buf.put_u16_le(c.code.0);
                put_str(buf, &c.reason);
            }
        }
        Ok(())
    }
}

/// Writes a frame header after checking the frame's length against `max_len` (room for the
/// whole frame is reserved); on error nothing is written.
fn put_header(buf: &mut BytesMut, kind: FrameKind, payload: usize, max_len: usize) -> Result<(), EncodeError> {
    let len = HEADER_LEN + payload;
    if len > max_len || payload > u32::MAX as usize {
        return Err(EncodeError::TooLarge { len, max: max_len });
    }
    buf.reserve(len);
    buf.put_u8(PROTOCOL_VERSION);
    buf.put_u8(kind as u8);
    buf.put_u32_le(payload as u32);
    Ok(())
}

/// A [`Call`] whose text and body are borrowed: a caller encodes a call from the parts it
/// already holds, with nothing copied into owned strings first. Encodes exactly as
/// `Frame::Call` with the same fields does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallRef<'a> {
    /// Switching fields.
    pub route: Route,
    /// See [`Call::call_id`].
    pub call_id: u64,
    /// See [`Call::deadline_ms`].
    pub deadline_ms: u32,
    /// See [`Call::trace_id`].
    pub trace_id: u128,
    /// See [`Call::caller`].
    pub caller: &'a str,
    /// See [`Call::scopes`].
    pub scopes: &'a [String],
    /// See [`Call::gear`].
    pub gear: &'a str,
    /// See [`Call::port`].
    pub port: &'a str,
    /// See [`Call::body_kind`].
    pub body_kind: BodyKind,
    /// See [`Call::body`].
    pub body: &'a [u8],
}

impl Call {
    /// This call, borrowed.
    pub fn borrowed(&self) -> CallRef<'_> {
        CallRef {
            route: self.route,
            call_id: self.call_id,
            deadline_ms: self.deadline_ms,
            trace_id: self.trace_id,
            caller: &self.caller,
            scopes: &self.scopes,
            gear: &self.gear,
            port: &self.port,
            body_kind: self.body_kind,
            body: &self.body,
        }
    }
}

impl CallRef<'_> {
    fn payload_len(&self) -> usize {
        ROUTE_LEN
            + 8
            + 4
            + 16
            + str_len(self.caller)
            + 2
            + self.scopes.iter().map(|s| str_len(s)).sum::<usize>()
            + str_len(self.gear)
            + str_len(self.port)
            + 1
            + self.body.len()
    }

    /// The total length (header included) this call encodes to.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload_len()
    }

    fn check(&self) -> Result<(), EncodeError> {
        check_str("caller", self.caller)?;
        check_list("scopes", self.scopes)?;
        check_str("gear", self.gear)?;
        check_str("port", self.port)
    }

    fn put_payload(&self, buf: &mut BytesMut) {
        put_route(buf, &self.route);
        buf.put_u64_le(self.call_id);
        buf.put_u32_le(self.deadline_ms);
        buf.put_u128_le(self.trace_id);
        put_str(buf, self.caller);
        put_list(buf, self.scopes);
        put_str(buf, self.gear);
        put_str(buf, self.port);
        buf.put_u8(self.body_kind as u8);
        buf.put_slice(self.body);
    }

    /// Appends this call's encoding to `buf`, as [`Frame::encode`] does for a `Frame::Call`.
    ///
    /// # Errors
    /// As [`Frame::encode`]; on error nothing is written.
    pub fn encode(&self, buf: &mut BytesMut, max_len: usize) -> Result<(), EncodeError> {
        self.check()?;
        put_header(buf, FrameKind::Call, self.payload_len(), max_len)?;
        self.put_payload(buf);
        Ok(())
    }
}

fn hello_len(h: &Hello) -> usize {
    2 + 16 + 8 + 4 + 4 + h.token.len() + 2 + h.listen_addrs.iter().map(|s| str_len(s)).sum::<usize>() + str_len(&h.mesh)
}

/// The kind of an already-encoded, already-validated frame (gossip if unreadable).
pub(crate) fn encode_raw_kind(buf: &[u8]) -> FrameKind {
    buf.get(1).copied().and_then(FrameKind::from_u8).unwrap_or(FrameKind::Gossip)
}

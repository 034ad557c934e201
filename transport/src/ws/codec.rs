//! The WebSocket framing (RFC 6455, section 5) that links use once the upgrade handshake is done:
//! a pure, sans-IO encoder and parser over byte buffers. Public for the fuzz target
//! (`transport/fuzz`) and for tools that speak the link protocol by hand.
//!
//! Links carry one binary message per link frame, so this is the subset a link needs, done with
//! no copies beyond the (client) masking: binary messages, possibly fragmented; close, ping and
//! pong control frames; no extensions. Text messages and anything malformed are errors the link
//! closes on. The parser checks a frame's declared length against the link's limit before it
//! buffers the payload, so a peer cannot make a link hold more than one maximal frame.

use bytes::{BufMut, Bytes, BytesMut};

/// Which end of the connection this is: a client masks what it sends and must receive unmasked
/// frames; a server the reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The dialing side.
    Client,
    /// The accepting side.
    Server,
}

/// A frame's opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    /// A later fragment of a message.
    Continuation,
    /// A text message (never valid on a link).
    Text,
    /// A binary message.
    Binary,
    /// The closing handshake.
    Close,
    /// A ping, to be answered by a pong.
    Ping,
    /// A pong.
    Pong,
}

impl Opcode {
    fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            Opcode::Continuation => 0x0,
            Opcode::Text => 0x1,
            Opcode::Binary => 0x2,
            Opcode::Close => 0x8,
            Opcode::Ping => 0x9,
            Opcode::Pong => 0xA,
        }
    }

    fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

/// One parsed frame, its payload unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsFrame {
    /// The last fragment of its message.
    pub fin: bool,
    /// What it carries.
    pub opcode: Opcode,
    /// The payload (a slice of the read buffer: no copy).
    pub payload: Bytes,
}

/// Why the bytes received are not valid WebSocket framing for a link.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A reserved bit is set (no extension was negotiated).
    #[error("reserved bits set")]
    Reserved,
    /// An opcode RFC 6455 does not define.
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    /// A control frame that is fragmented or longer than 125 bytes.
    #[error("invalid control frame")]
    BadControl,
    /// A client frame without a mask, or a server frame with one.
    #[error("frame masking does not match the sender's role")]
    Masking,
    /// A payload length that uses more than 63 bits or is not minimally encoded.
    #[error("invalid payload length")]
    BadLength,
    /// A payload longer than the link's limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    Oversized {
        /// The declared length.
        len: u64,
        /// The limit.
        max: usize,
    },
}

/// The largest header: 2 bytes, an 8-byte length and a 4-byte mask.
pub const MAX_HEADER_LEN: usize = 14;

/// Parses one frame from the front of `buf`, received by `side`, removing it from `buf`.
/// `Ok(None)` when `buf` does not yet hold a whole frame (nothing is removed); `max` bounds the
/// payload of one frame.
///
/// # Errors
/// A [`ParseError`] for framing a link does not accept; the connection must then be closed.
pub fn parse(buf: &mut BytesMut, side: Side, max: usize) -> Result<Option<WsFrame>, ParseError> {
    let Some(&[b0, b1]) = buf.get(..2) else { return Ok(None) };
    if b0 & 0x70 != 0 {
        return Err(ParseError::Reserved);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = Opcode::from_bits(b0 & 0x0F).ok_or(ParseError::UnknownOpcode(b0 & 0x0F))?;
    let masked = b1 & 0x80 != 0;
    if masked != (side == Side::Server) {
        return Err(ParseError::Masking);
    }
    let (len, mut at) = match b1 & 0x7F {
        126 => {
            let Some(&[a, b]) = buf.get(2..4) else { return Ok(None) };
            let len = u64::from(u16::from_be_bytes([a, b]));
            if len < 126 {
                return Err(ParseError::BadLength);
            }
            (len, 4)
        }
        127 => {
            let Some(bytes) = buf.get(2..10) else { return Ok(None) };
            let mut b = [0u8; 8];
            b.copy_from_slice(bytes);
            let len = u64::from_be_bytes(b);
            if len >> 63 != 0 || len <= 0xFFFF {
                return Err(ParseError::BadLength);
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };
    if opcode.is_control() && (!fin || len > 125) {
        return Err(ParseError::BadControl);
    }
    let payload_len = usize::try_from(len).ok().filter(|l| *l <= max).ok_or(ParseError::Oversized { len, max })?;
    let mask = if masked {
        let Some(bytes) = buf.get(at..at + 4) else { return Ok(None) };
        at += 4;
        Some([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        None
    };
    if buf.len() - at < payload_len {
        // Make room for the rest of this frame now, so the reads that follow fill it.
        buf.reserve(at + payload_len - buf.len());
        return Ok(None);
    }
    let _header = buf.split_to(at);
    let mut payload = buf.split_to(payload_len);
    if let Some(mask) = mask {
        apply_mask(&mut payload, mask);
    }
    Ok(Some(WsFrame { fin, opcode, payload: payload.freeze() }))
}

/// Appends one unfragmented frame to `out`; `mask` is given on the client side (a fresh random
/// key per frame) and `None` on the server side.
pub fn encode(out: &mut BytesMut, opcode: Opcode, payload: &[u8], mask: Option<[u8; 4]>) {
    out.reserve(MAX_HEADER_LEN + payload.len());
    out.put_u8(0x80 | opcode.bits());
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => out.put_u8(mask_bit | n as u8),
        n @ 126..=0xFFFF => {
            out.put_u8(mask_bit | 126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(mask_bit | 127);
            out.put_u64(n as u64);
        }
    }
    let start = out.len();
    match mask {
        Some(mask) => {
            out.put_slice(&mask);
            let start = start + 4;
            out.put_slice(payload);
            apply_mask(&mut out[start..], mask);
        }
        None => out.put_slice(payload),
    }
}

/// XORs `data` with the repeating 4-byte `mask` (masking and unmasking are the same operation).
pub fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3]]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(w) ^ wide).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

/// The payload of a close frame: a status code and a reason (RFC 6455, section 5.5.1).
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(2 + reason.len().min(123));
    p.extend_from_slice(&code.to_be_bytes());
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    p.extend_from_slice(&reason.as_bytes()[..end]);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    fn roundtrip(sender: Side, opcode: Opcode, payload: &[u8]) -> WsFrame {
        let mut out = BytesMut::new();
        let mask = (sender == Side::Client).then_some([0x12, 0x34, 0x56, 0x78]);
        encode(&mut out, opcode, payload, mask);
        let receiver = if sender == Side::Client { Side::Server } else { Side::Client };
        let frame = parse(&mut out, receiver, MAX).expect("valid").expect("whole");
        assert!(out.is_empty(), "the frame is consumed whole");
        frame
    }

    #[test]
    fn every_length_form_round_trips_both_ways() {
        for len in [0usize, 1, 7, 8, 9, 125, 126, 127, 0xFFFF, 0x10000, 300_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            for side in [Side::Client, Side::Server] {
                let f = roundtrip(side, Opcode::Binary, &payload);
                assert!(f.fin);
                assert_eq!(f.opcode, Opcode::Binary);
                assert_eq!(&f.payload[..], &payload[..], "len {len} from {side:?}");
            }
        }
    }

    #[test]
    fn client_frames_are_masked_on_the_wire() {
        let mut out = BytesMut::new();
        encode(&mut out, Opcode::Binary, b"abcdefgh", Some([1, 2, 3, 4]));
        assert_eq!(out[1] & 0x80, 0x80);
        assert_ne!(&out[6..], b"abcdefgh");
    }

    #[test]
    fn partial_input_waits_for_more_at_every_cut() {
        let mut whole = BytesMut::new();
        encode(&mut whole, Opcode::Binary, &[9u8; 300], Some([5, 6, 7, 8]));
        for cut in 0..whole.len() {
            let mut part = BytesMut::from(&whole[..cut]);
            assert_eq!(parse(&mut part, Side::Server, MAX), Ok(None), "cut at {cut}");
            assert_eq!(part.len(), cut, "nothing consumed at {cut}");
        }
    }

    #[test]
    fn two_frames_in_one_buffer_parse_in_order() {
        let mut buf = BytesMut::new();
        encode(&mut buf, Opcode::Binary, b"one", None);
        encode(&mut buf, Opcode::Ping, b"two", None);
        let a = parse(&mut buf, Side::Client, MAX).expect("ok").expect("first");
        let b = parse(&mut buf, Side::Client, MAX).expect("ok").expect("second");
        assert_eq!((&a.payload[..], a.opcode), (&b"one"[..], Opcode::Binary));
        assert_eq!((&b.payload[..], b.opcode), (&b"two"[..], Opcode::Ping));
        assert!(buf.is_empty());
    }

    #[test]
    fn malformed_framing_is_rejected() {
        let cases: [(&[u8], Side, ParseError); 7] = [
            (&[0xC2, 0x00], Side::Client, ParseError::Reserved),
            (&[0x83, 0x00], Side::Client, ParseError::UnknownOpcode(3)),
            (&[0x09, 0x00], Side::Client, ParseError::BadControl),
            (&[0x89, 0x7E, 0x00, 0x7E], Side::Client, ParseError::BadControl),
            (&[0x82, 0x01, 0x00], Side::Server, ParseError::Masking),
            (&[0x82, 0x81, 0, 0, 0, 0, 0], Side::Client, ParseError::Masking),
            (&[0x82, 0x7E, 0x00, 0x10], Side::Client, ParseError::BadLength),
        ];
        for (bytes, side, want) in cases {
            assert_eq!(parse(&mut BytesMut::from(bytes), side, MAX), Err(want), "{bytes:02x?}");
        }
        let mut huge = BytesMut::from(&[0x82u8, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 0][..]);
        assert_eq!(parse(&mut huge, Side::Client, MAX), Err(ParseError::BadLength));
    }

    #[test]
    fn an_oversized_frame_is_refused_from_its_header_alone() {
        let mut buf = BytesMut::from(&[0x82u8, 0x7F, 0, 0, 0, 0, 0x10, 0, 0, 0][..]);
        assert_eq!(parse(&mut buf, Side::Client, MAX), Err(ParseError::Oversized { len: 0x1000_0000, max: MAX }));
    }

    #[test]
    fn the_parser_never_panics_on_arbitrary_bytes() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 40) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (seed >> (i % 8 * 8)) as u8).collect();
            for side in [Side::Client, Side::Server] {
                let mut buf = BytesMut::from(&bytes[..]);
                while let Ok(Some(_)) = parse(&mut buf, side, 64) {}
            }
        }
    }

    #[test]
    fn close_payload_is_code_then_a_bounded_reason() {
        let p = close_payload(1000, "bye");
        assert_eq!(p, [0x03, 0xE8, b'b', b'y', b'e']);
        let long = "é".repeat(100);
        let p = close_payload(1001, &long);
        assert!(p.len() <= 125);
        assert!(std::str::from_utf8(&p[2..]).is_ok(), "cut on a character boundary");
    }
}

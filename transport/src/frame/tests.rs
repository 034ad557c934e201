//! Codec tests: round trips, truncation, limits and seeded random garbage.

use bytes::{Bytes, BytesMut};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

const MAX: usize = DEFAULT_MAX_FRAME_LEN;

pub(crate) fn samples() -> Vec<Frame> {
    let route = Route { src: NodeId([1; 16]), dst: NodeId([2; 16]), hops: 3 };
    vec![
        Frame::Hello(Hello {
            version: 1,
            node_id: NodeId([7; 16]),
            incarnation: 42,
            token: Bytes::from_static(b"eyJhbGciOi.x.y"),
            listen_addrs: vec!["wss://a:1".into(), "quic://a:1".into()],
            features: 0b101,
            mesh: "prod-eu".into(),
        }),
        Frame::Hello(Hello::default()),
        Frame::Ping { seq: 1, sent_at_micros: u64::MAX },
        Frame::Pong { seq: 9, echo: 10 },
        Frame::Call(Call {
            route,
            call_id: 77,
            deadline_ms: 5000,
            trace_id: u128::MAX - 5,
            caller: "user:alice".into(),
            scopes: vec!["billing:charge".into(), "ünïcode".into()],
            gear: "billing".into(),
            port: "charge".into(),
            body_kind: BodyKind::Json,
            body: Bytes::from_static(br#"{"cents":100}"#),
        }),
        Frame::Call(Call::default()),
        Frame::Reply(Reply {
            route,
            call_id: 77,
            result: ReplyResult::Ok { kind: BodyKind::Bytes, body: Bytes::from_static(&[0, 1, 2]) },
        }),
        Frame::Reply(Reply {
            route,
            call_id: 78,
            result: ReplyResult::Ok { kind: BodyKind::Json, body: Bytes::new() },
        }),
        Frame::Reply(Reply {
            route,
            call_id: 79,
            result: ReplyResult::Err(Bytes::from_static(br#"{"code":"not_found"}"#)),
        }),
        Frame::Cancel(Cancel { route, call_id: 5 }),
        Frame::Event(Event {
            route,
            topic: "orders.cancelled".into(),
            publisher: "gear:orders".into(),
            trace_id: 12,
            body_kind: BodyKind::Json,
            body: Bytes::from_static(b"{}"),
        }),
        Frame::Gossip { payload: Bytes::from_static(b"opaque") },
        Frame::Gossip { payload: Bytes::new() },
        Frame::Close(Close { code: CloseCode::GOING_AWAY, reason: "bye".into() }),
    ]
}

fn enc(f: &Frame) -> Bytes {
    let mut buf = BytesMut::new();
    f.encode(&mut buf, MAX).expect("encodes");
    assert_eq!(buf.len(), f.encoded_len());
    buf.freeze()
}

#[test]
fn every_kind_round_trips() {
    for f in samples() {
        let b = enc(&f);
        assert_eq!(decode(&b, MAX).expect("decodes"), f);
    }
}

#[test]
fn encode_appends_and_reuses_buffer() {
    let mut buf = BytesMut::with_capacity(1024);
    for f in samples() {
        f.encode(&mut buf, MAX).expect("encodes");
        let one = buf.split().freeze();
        assert_eq!(decode(&one, MAX).expect("decodes"), f);
    }
}

#[test]
fn bodies_are_zero_copy_slices() {
    let f = &samples()[4];
    let b = enc(f);
    let Frame::Call(c) = decode(&b, MAX).expect("decodes") else { panic!("not a call") };
    let base = b.as_ptr() as usize;
    let body = c.body.as_ptr() as usize;
    assert!(body >= base && body < base + b.len(), "body points into the input");
}

#[test]
fn truncation_at_every_byte_is_rejected() {
    for f in samples() {
        let b = enc(&f);
        for cut in 0..b.len() {
            let err = decode(&b.slice(..cut), MAX).expect_err("truncated must fail");
            assert!(matches!(err, DecodeError::Truncated { .. }), "{:?} cut at {cut}: {err:?}", f.kind());
        }
    }
}

#[test]
fn lying_length_fields_are_rejected() {
    // Shrink the header's payload length: the fields now overrun the payload or bytes trail.
    for f in samples() {
        let b = enc(&f);
        let mut v = b.to_vec();
        let payload = (v.len() - HEADER_LEN) as u32;
        if payload == 0 {
            continue;
        }
        v[2..6].copy_from_slice(&(payload - 1).to_le_bytes());
        v.pop();
        let r = decode_slice(&v, MAX);
        let body_tail_kind =
            matches!(f.kind(), FrameKind::Call | FrameKind::Reply | FrameKind::Event | FrameKind::Gossip);
        if !body_tail_kind {
            assert!(r.is_err(), "{:?}", f.kind());
        }
    }
}

#[test]
fn unknown_version_and_kind() {
    let mut v = enc(&samples()[2]).to_vec();
    v[0] = 2;
    assert_eq!(decode_slice(&v, MAX), Err(DecodeError::UnknownVersion(2)));
    v[0] = PROTOCOL_VERSION;
    v[1] = 200;
    assert_eq!(decode_slice(&v, MAX), Err(DecodeError::UnknownKind(200)));
}

#[test]
fn oversized_is_rejected_on_both_sides() {
    let f = Frame::Gossip { payload: Bytes::from(vec![0u8; 1000]) };
    let b = enc(&f);
    assert_eq!(decode(&b, 500), Err(DecodeError::Oversized { len: 1006, max: 500 }));
    // The header alone is enough to refuse it.
    assert!(matches!(peek_header(&b[..HEADER_LEN], 500), Err(DecodeError::Oversized { .. })));
    let mut buf = BytesMut::new();
    assert!(matches!(f.encode(&mut buf, 500), Err(EncodeError::TooLarge { .. })));
    assert!(buf.is_empty());
}

#[test]
fn trailing_bytes_are_rejected() {
    let mut v = enc(&samples()[2]).to_vec();
    v.push(0);
    assert_eq!(decode_slice(&v, MAX), Err(DecodeError::TrailingBytes(1)));
}

#[test]
fn bad_utf8_and_enums_are_rejected() {
    let f = Frame::Close(Close { code: CloseCode::NORMAL, reason: "ab".into() });
    let mut v = enc(&f).to_vec();
    let n = v.len();
    v[n - 1] = 0xff;
    assert_eq!(decode_slice(&v, MAX), Err(DecodeError::InvalidUtf8("reason")));

    let mut v = enc(&samples()[6]).to_vec();
    v[HEADER_LEN + 33 + 8] = 9;
    assert!(matches!(decode_slice(&v, MAX), Err(DecodeError::InvalidEnum { field: "status", .. })));
}

#[test]
fn huge_list_count_does_not_allocate() {
    // A hello claiming 65535 listen addresses in a tiny payload.
    let f = Frame::Hello(Hello::default());
    let mut v = enc(&f).to_vec();
    let n = v.len();
    // The count comes before the (empty) mesh name's two length bytes.
    v[n - 4..n - 2].copy_from_slice(&u16::MAX.to_le_bytes());
    assert_eq!(decode_slice(&v, MAX), Err(DecodeError::FieldOverrun("listen_addrs")));
}

#[test]
fn peek_route_and_set_hops() {
    let f = &samples()[4];
    let mut v = enc(f).to_vec();
    let r = peek_route(&v).expect("valid").expect("routed");
    assert_eq!(r, *f.route().expect("routed"));
    assert!(set_hops(&mut v, 9));
    let Frame::Call(c) = decode_slice(&v, MAX).expect("decodes") else { panic!("not a call") };
    assert_eq!(c.route.hops, 9);
    let mut ping = enc(&samples()[2]).to_vec();
    assert_eq!(peek_route(&ping), Ok(None));
    assert!(!set_hops(&mut ping, 1));
    assert!(peek_route(&v[..20]).is_err());
}

#[test]
fn peek_call_reads_the_call_id_and_a_calls_deadline_of_every_sample() {
    for f in samples() {
        let b = enc(&f);
        let expected = match &f {
            Frame::Call(c) => {
                Some(PeekedCall { kind: FrameKind::Call, call_id: c.call_id, deadline_ms: Some(c.deadline_ms) })
            }
            Frame::Reply(r) => Some(PeekedCall { kind: FrameKind::Reply, call_id: r.call_id, deadline_ms: None }),
            Frame::Cancel(c) => Some(PeekedCall { kind: FrameKind::Cancel, call_id: c.call_id, deadline_ms: None }),
            _ => None,
        };
        assert_eq!(peek_call(&b), expected, "{:?}", f.kind());
        // Every prefix too short for the fields reads as nothing, without a panic.
        if expected.is_some() {
            let need = HEADER_LEN + encode::ROUTE_LEN + if f.kind() == FrameKind::Call { 12 } else { 8 };
            for cut in 0..need {
                assert_eq!(peek_call(&b[..cut]), None, "{:?} cut at {cut}", f.kind());
            }
        }
    }
}

#[test]
fn validate_routed_accepts_routed_frames_only() {
    for f in samples() {
        let b = enc(&f);
        match f.route() {
            Some(route) => assert_eq!(validate_routed(&b, MAX), Ok(*route)),
            None => assert_eq!(validate_routed(&b, MAX), Err(DecodeError::UnknownKind(f.kind() as u8))),
        }
    }
    // A call whose gear name is not UTF-8 is refused, as the decoder refuses it.
    let mut v = enc(&samples()[4]).to_vec();
    let Frame::Call(c) = &samples()[4] else { panic!("sample 4 is a call") };
    // The gear field: its length (u16, little-endian) then its bytes, after the scopes.
    let mut field = (c.gear.len() as u16).to_le_bytes().to_vec();
    field.extend_from_slice(c.gear.as_bytes());
    let at = v.windows(field.len()).rposition(|w| w == field.as_slice()).expect("gear field in the frame");
    v[at + 2] = 0xff;
    assert_eq!(validate_routed(&v, MAX), Err(DecodeError::InvalidUtf8("gear")));
    assert_eq!(decode_slice(&v, MAX), Err(DecodeError::InvalidUtf8("gear")));
}

#[test]
fn a_borrowed_call_encodes_as_the_owned_one() {
    for f in samples() {
        let Frame::Call(c) = &f else { continue };
        let mut owned = BytesMut::new();
        f.encode(&mut owned, MAX).expect("encodes");
        let mut borrowed = BytesMut::new();
        c.borrowed().encode(&mut borrowed, MAX).expect("encodes");
        assert_eq!(owned, borrowed);
        assert_eq!(c.borrowed().encoded_len(), f.encoded_len());
        assert!(matches!(c.borrowed().encode(&mut BytesMut::new(), 10), Err(EncodeError::TooLarge { .. })));
    }
}

#[test]
fn too_long_fields_fail_to_encode() {
    let f = Frame::Close(Close { code: CloseCode::NORMAL, reason: "x".repeat(70_000) });
    assert!(matches!(f.encode(&mut BytesMut::new(), MAX), Err(EncodeError::StringTooLong { field: "reason", .. })));
}

/// A property test standing in for the fuzzer where nightly is not available: seeded random
/// bytes and mutations of valid frames must never panic, and whatever decodes re-encodes to a
/// frame that decodes to the same value.
#[test]
fn random_and_mutated_inputs_never_panic() {
    let mut rng = StdRng::seed_from_u64(0x6765_6172);
    let valid: Vec<Vec<u8>> = samples().iter().map(|f| enc(f).to_vec()).collect();
    let mut decoded = 0;
    for i in 0..200_000u32 {
        let input: Vec<u8> = if i % 4 == 0 {
            let n = rng.random_range(0..64);
            (0..n).map(|_| rng.random()).collect()
        } else {
            let mut v = valid[rng.random_range(0..valid.len())].clone();
            for _ in 0..rng.random_range(1..4) {
                match rng.random_range(0..4) {
                    0 if !v.is_empty() => {
                        let at = rng.random_range(0..v.len());
                        v[at] = rng.random();
                    }
                    1 if !v.is_empty() => {
                        let at = rng.random_range(0..v.len());
                        v.truncate(at);
                    }
                    2 => v.push(rng.random()),
                    _ if v.len() > HEADER_LEN => {
                        let at = rng.random_range(HEADER_LEN..v.len());
                        v.remove(at);
                    }
                    _ => {}
                }
            }
            v
        };
        let full = decode_slice(&input, 4096);
        if let Ok(f) = &full {
            decoded += 1;
            let again = enc(f);
            assert_eq!(decode(&again, MAX).expect("re-decodes"), *f);
        }
        // The switch's check agrees with the decoder on every routed frame, errors included.
        let checked = validate_routed(&input, 4096);
        match (&full, peek_header(&input, usize::MAX)) {
            (Ok(f), _) if f.kind().is_routed() => assert_eq!(checked.as_ref().ok(), f.route(), "{input:?}"),
            (Err(e), Ok(Some(h))) if h.kind.is_routed() => assert_eq!(checked.as_ref().err(), Some(e), "{input:?}"),
            _ => assert!(checked.is_err(), "{input:?}"),
        }
        let _route = peek_route(&input);
    }
    assert!(decoded > 1000, "mutations should often stay valid: {decoded}");
}

/// Writes one encoded frame of each sample into the fuzz seed corpus. Run by hand:
/// `cargo test -p gearmesh-transport write_fuzz_seeds -- --ignored`.
#[test]
#[ignore = "writes files; run by hand to refresh fuzz seeds"]
fn write_fuzz_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode");
    std::fs::create_dir_all(&dir).expect("corpus dir");
    for (i, f) in samples().iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:02}")), enc(f)).expect("write seed");
    }
}

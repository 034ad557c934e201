//! Fuzz target: the frame decoder must never panic, whatever it accepts must re-encode to bytes
//! that decode to the same frame, and the switch's check (`validate_routed`) must accept exactly
//! the routed frames the decoder accepts, with the same route, and its call peek
//! (`peek_call`) must read what the decoder reads from every call, reply and cancel.
#![no_main]

use bytes::BytesMut;
use gearmesh_transport::Frame;
use gearmesh_transport::frame::{DEFAULT_MAX_FRAME_LEN, decode_slice, peek_call, peek_route, validate_routed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = peek_route(data);
    let peeked = peek_call(data);
    let decoded = decode_slice(data, 1 << 20);
    let ids = match &decoded {
        Ok(Frame::Call(c)) => Some((c.call_id, Some(c.deadline_ms))),
        Ok(Frame::Reply(r)) => Some((r.call_id, None)),
        Ok(Frame::Cancel(c)) => Some((c.call_id, None)),
        _ => None,
    };
    if let Some(ids) = ids {
        assert_eq!(peeked.map(|p| (p.call_id, p.deadline_ms)), Some(ids), "peek_call and the decoder disagree");
    }
    match (&decoded, validate_routed(data, 1 << 20)) {
        (Ok(frame), Ok(route)) => assert_eq!(frame.route(), Some(&route)),
        (Ok(frame), Err(_)) => assert!(frame.route().is_none(), "a routed frame the check refused"),
        (Err(e), Ok(_)) => panic!("the check accepted a frame the decoder refuses: {e}"),
        (Err(_), Err(_)) => {}
    }
    if let Ok(frame) = decoded {
        let mut buf = BytesMut::new();
        frame
            .encode(&mut buf, DEFAULT_MAX_FRAME_LEN)
            .expect("a decoded frame re-encodes");
        let again = decode_slice(&buf, DEFAULT_MAX_FRAME_LEN).expect("re-encoded frame decodes");
        assert_eq!(again, frame);
    }
});

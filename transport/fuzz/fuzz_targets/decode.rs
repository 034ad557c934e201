//! Fuzz target: the frame decoder must never panic, whatever it accepts must re-encode to bytes
//! that decode to the same frame, and the switch's check (`validate_routed`) must accept exactly
//! the routed frames the decoder accepts, with the same route.
#![no_main]

use bytes::BytesMut;
use gearmesh_transport::frame::{DEFAULT_MAX_FRAME_LEN, decode_slice, peek_route, validate_routed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = peek_route(data);
    let decoded = decode_slice(data, 1 << 20);
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

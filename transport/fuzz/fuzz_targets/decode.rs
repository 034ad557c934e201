//! Fuzz target: the frame decoder must never panic, and whatever it accepts must re-encode to
//! bytes that decode to the same frame.
#![no_main]

use bytes::BytesMut;
use gearmesh_transport::frame::{DEFAULT_MAX_FRAME_LEN, decode_slice, peek_route};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = peek_route(data);
    if let Ok(frame) = decode_slice(data, 1 << 20) {
        let mut buf = BytesMut::new();
        frame
            .encode(&mut buf, DEFAULT_MAX_FRAME_LEN)
            .expect("a decoded frame re-encodes");
        let again = decode_slice(&buf, DEFAULT_MAX_FRAME_LEN).expect("re-encoded frame decodes");
        assert_eq!(again, frame);
    }
});

//! Fuzzes the WebSocket framing parser links use: arbitrary bytes, read as either side, with a
//! small frame limit. It must never panic, never return a payload above the limit, and every
//! frame it accepts must encode back to a frame that parses the same.
#![no_main]

use bytes::BytesMut;
use gearmesh_transport::ws::codec::{self, Side};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    for side in [Side::Client, Side::Server] {
        let mut buf = BytesMut::from(data);
        while let Ok(Some(frame)) = codec::parse(&mut buf, side, MAX) {
            assert!(frame.payload.len() <= MAX);
            let mut again = BytesMut::new();
            let mask = (side == Side::Server).then_some([1, 2, 3, 4]);
            codec::encode(&mut again, frame.opcode, &frame.payload, mask);
            let back = codec::parse(&mut again, side, MAX).expect("re-encoded frame parses").expect("whole");
            assert_eq!(back.opcode, frame.opcode);
            assert_eq!(back.payload, frame.payload);
            assert!(again.is_empty());
        }
    }
});

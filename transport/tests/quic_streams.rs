//! On QUIC a large frame does not delay small frames sent after it.

mod common;

use bytes::Bytes;
use common::{Transport, connect, setup};
use gearmesh_transport::{BodyKind, Call, Frame, Route};

fn call(id: u64, len: usize) -> Frame {
    Frame::Call(Call {
        route: Route::default(),
        call_id: id,
        deadline_ms: 1000,
        trace_id: 0,
        caller: "user:a".into(),
        scopes: vec![],
        gear: "g".into(),
        port: "p".into(),
        body_kind: BodyKind::Bytes,
        body: Bytes::from(vec![0u8; len]),
    })
}

#[tokio::test]
async fn large_frame_does_not_delay_small_ones() {
    let (a, mut b, _f) = connect(Transport::Quic, setup(1), setup(2)).await.expect("connect");
    a.send(&call(0, 12 * 1024 * 1024)).await.expect("large");
    for i in 1..=20 {
        a.send(&call(i, 64)).await.expect("small");
    }
    let mut order = Vec::new();
    while order.len() < 21 {
        match tokio::time::timeout(std::time::Duration::from_secs(20), b.recv()).await {
            Ok(Some(Ok(Frame::Call(c)))) => order.push(c.call_id),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(order.last(), Some(&0), "the large frame arrives after all the small ones: {order:?}");
}

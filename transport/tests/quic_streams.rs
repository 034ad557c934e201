//! On QUIC a large frame does not delay small frames sent after it, a path that carries large
//! datagrams (loopback) gets them, and a close does not overtake the frames sent before it even
//! where datagrams overtake one another.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::net::QuicViaProxy;
use common::{Transport, connect, setup, spawn_call_reader};
use gearmesh_transport::quic::MAX_UDP_PAYLOAD;
use gearmesh_transport::{CloseCode, Frame};

fn call(id: u64, len: usize) -> Frame {
    common::call(id, Bytes::from(vec![0u8; len]))
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

/// Links start with 1,200-byte datagrams and probe for larger ones, up to [`MAX_UDP_PAYLOAD`].
/// Loopback carries 65 KB, so after a moment a 4 KiB frame travels in one datagram; seen from a
/// UDP proxy between the ends.
#[tokio::test]
async fn on_loopback_a_4_kib_frame_comes_to_travel_in_one_datagram() {
    let mut via = QuicViaProxy::new(setup(1), setup(2), None).await;
    let (a, mut b) = via.connect().await;
    let proxy = &via.proxy;
    let frame_len = 4096;
    let mut sent = 0u64;
    // Bounded so that a path MTU that never grows fails the test instead of hanging it.
    while proxy.largest_datagram() <= frame_len && sent < 5_000 {
        a.send(&call(sent, frame_len)).await.expect("send");
        match tokio::time::timeout(Duration::from_secs(10), b.recv()).await {
            Ok(Some(Ok(Frame::Call(c)))) => assert_eq!(c.body.len(), frame_len),
            other => panic!("frame {sent} did not arrive: {other:?}"),
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let largest = proxy.largest_datagram();
    assert!(largest > frame_len, "after {sent} frames the largest datagram was {largest} bytes");
    assert!(largest <= usize::from(MAX_UDP_PAYLOAD), "a datagram of {largest} bytes");
    // Frames of every size still arrive at the larger datagram size, one much larger than it too.
    for (i, len) in [64, 4096, 60_000, 300_000].into_iter().enumerate() {
        a.send(&call(sent + i as u64, len)).await.expect("send");
        match tokio::time::timeout(Duration::from_secs(10), b.recv()).await {
            Ok(Some(Ok(Frame::Call(c)))) => assert_eq!(c.body.len(), len),
            other => panic!("a {len}-byte frame did not arrive: {other:?}"),
        }
    }
}

/// The frame written last before an orderly close arrives even when its datagram is lost and
/// the close's is not. The close travels on the control stream and the frame on a stream of
/// its own; the receiver, holding the close back until no stream of the peer's waits to be
/// accepted, cannot know of a stream none of whose bytes arrived, and nothing opened after it
/// tells. So the sender writes the close only once the peer has acknowledged every frame
/// stream it opened.
#[tokio::test]
async fn the_last_frame_before_a_close_arrives_when_its_datagram_is_lost() {
    let mut via = QuicViaProxy::new(setup(1), setup(2), None).await;
    for round in 0..5 {
        let (a, b) = via.connect().await;
        let reader = spawn_call_reader(b, Duration::from_secs(10));
        a.send(&call(0, 16)).await.expect("send");
        // Settled: the next large datagram from a is the frame's.
        tokio::time::sleep(Duration::from_millis(100)).await;
        via.proxy.drop_next_datagrams_over(1_000, 2);
        a.send(&call(1, 2_000)).await.expect("send");
        // Long enough for the frame's datagram to leave (and be lost) before the close is
        // written, so that the close travels in a datagram of its own; far shorter than
        // quinn's probe timeout, after which it would send the frame again first anyway.
        tokio::time::sleep(Duration::from_millis(3)).await;
        a.close(CloseCode::NORMAL, "done").await;
        let ids =
            tokio::time::timeout(Duration::from_secs(20), reader).await.expect("the reader ends").expect("reader");
        assert_eq!(via.proxy.dropped_datagrams(), 2 * (round + 1), "round {round}: the frame's datagrams were lost");
        assert!(ids.contains(&1), "round {round}: the frame written before the close was lost: {ids:?}");
    }
}

/// Each call travels on a stream of its own and the close on the control stream, so on a path
/// that reorders datagrams the close can arrive before the first datagram of a call's stream.
/// The peer must still read every call sent before the close (or the sender gets it back
/// unsent). Several rounds, as the reordering is random.
#[tokio::test]
async fn frames_written_before_a_close_arrive_before_it_on_a_path_that_reorders() {
    let mut via = QuicViaProxy::new(setup(1), setup(2), Some(Duration::from_millis(3))).await;
    for round in 0..10 {
        let (a, b) = via.connect().await;
        let reader = spawn_call_reader(b, Duration::from_secs(10));
        let sent = 200u64;
        for id in 0..sent {
            a.send(&call(id, 16)).await.expect("send");
        }
        a.close(CloseCode::NORMAL, "done").await;
        let unsent = a.sender().take_unsent().len() as u64;
        let mut ids =
            tokio::time::timeout(Duration::from_secs(20), reader).await.expect("the reader ends").expect("reader");
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len() as u64 + unsent, sent, "round {round}: {} delivered, {unsent} handed back", ids.len());
    }
}

//! The shared link suite: every test runs over memory, WSS (real TLS, real axum server) and
//! QUIC (real TLS) on loopback.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Transport, call, connect, setup, spawn_call_reader};
use gearmesh_transport::{
    BodyKind, CloseCode, Event, Frame, FrameHandler, Initiator, LinkError, NodeId, Reply, ReplyResult, Route,
    SendError, TrySendError,
};

const WAIT: Duration = Duration::from_secs(10);

async fn recv(link: &mut gearmesh_transport::Link) -> Frame {
    match tokio::time::timeout(WAIT, link.recv()).await {
        Ok(Some(Ok(f))) => f,
        other => panic!("expected a frame, got {other:?}"),
    }
}

async fn frames_flow_both_ways(t: Transport) {
    let (mut a, mut b, _f) = connect(t, setup(1), setup(2)).await.expect("connect");
    let c = call(7, Bytes::from_static(b"hello"));
    a.send(&c).await.expect("send call");
    assert_eq!(recv(&mut b).await, c);
    let r = Frame::Reply(Reply {
        route: Route::default(),
        call_id: 7,
        result: ReplyResult::Ok { kind: BodyKind::Json, body: Bytes::from_static(b"{}") },
    });
    b.send(&r).await.expect("send reply");
    assert_eq!(recv(&mut a).await, r);
    let e = Frame::Event(Event { topic: "t".into(), body: Bytes::from_static(b"[]"), ..Event::default() });
    b.send(&e).await.expect("send event");
    assert_eq!(recv(&mut a).await, e);
    // Gossip keeps its order.
    for i in 0..50u8 {
        a.send(&Frame::Gossip { payload: Bytes::from(vec![i]) }).await.expect("gossip");
    }
    for i in 0..50u8 {
        assert_eq!(recv(&mut b).await, Frame::Gossip { payload: Bytes::from(vec![i]) });
    }
    // Many calls all arrive (order across calls is not promised on QUIC).
    for i in 0..200 {
        a.send(&call(i, Bytes::from(vec![0u8; 100]))).await.expect("call");
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let Frame::Call(c) = recv(&mut b).await else { panic!("not a call") };
        seen.insert(c.call_id);
    }
    assert_eq!(seen.len(), 200);
}

async fn peer_info_after_hello(t: Transport) {
    let (a, b, _f) = connect(t, setup(1), setup(2)).await.expect("connect");
    assert_eq!(a.peer().node_id, NodeId([2; 16]));
    assert_eq!(b.peer().node_id, NodeId([1; 16]));
    assert_eq!(a.peer().incarnation, 2);
    assert_eq!(b.peer().listen_addrs, vec!["wss://node1:443".to_string()]);
    if t != Transport::Memory {
        assert!(a.peer().remote_addr.is_some());
        assert!(b.peer().remote_addr.is_some());
    }
}

async fn link_frames_are_refused(t: Transport) {
    let (a, _b, _f) = connect(t, setup(1), setup(2)).await.expect("connect");
    let ping = Frame::Ping { seq: 1, sent_at_micros: 0 };
    assert!(matches!(a.send(&ping).await, Err(SendError::NotAllowed(_))));
}

async fn close_with_reason_reaches_peer(t: Transport) {
    let (a, mut b, _f) = connect(t, setup(1), setup(2)).await.expect("connect");
    let mine = a.close(CloseCode::GOING_AWAY, "shutting down").await;
    assert_eq!(mine.initiator, Initiator::Local);
    let theirs = tokio::time::timeout(WAIT, b.closed()).await.expect("peer sees close");
    assert_eq!(theirs.code, CloseCode::GOING_AWAY);
    assert_eq!(theirs.reason, "shutting down");
    assert_eq!(theirs.initiator, Initiator::Remote);
    // Orderly: no error, just the end.
    assert!(tokio::time::timeout(WAIT, b.recv()).await.expect("ends").is_none());
    assert!(matches!(a.send(&call(1, Bytes::new())).await, Err(SendError::Closed)));
}

async fn abnormal_close_is_reported_once(t: Transport) {
    let (a, mut b, _f) = connect(t, setup(1), setup(2)).await.expect("connect");
    a.close(CloseCode::PROTOCOL_ERROR, "bad").await;
    match tokio::time::timeout(WAIT, b.recv()).await.expect("ends") {
        Some(Err(LinkError::Closed(r))) => assert_eq!(r.code, CloseCode::PROTOCOL_ERROR),
        other => panic!("expected the close reason, got {other:?}"),
    }
    assert!(b.recv().await.is_none());
}

async fn dropping_a_link_closes_the_peer(t: Transport) {
    let (a, b, _f) = connect(t, setup(1), setup(2)).await.expect("connect");
    drop(a);
    let r = tokio::time::timeout(WAIT, b.closed()).await.expect("peer sees close");
    assert_eq!(r.code, CloseCode::NORMAL);
    assert_eq!(r.initiator, Initiator::Remote);
}

async fn hello_check_can_refuse(t: Transport) {
    let picky = setup(2).with_check(
        |h: &gearmesh_transport::Hello, _: &gearmesh_transport::PeerInfo| {
            if h.token.as_ref() == b"good" { Ok(()) } else { Err("bad token".to_string()) }
        },
    );
    let err = connect(t, setup(1), picky.clone()).await.err().expect("refused");
    assert!(err.contains("bad token"), "{err}");
    let mut good = setup(1);
    good.hello.token = Bytes::from_static(b"good");
    connect(t, good, picky).await.expect("accepted");
}

/// A node that dials one of its own addresses learns so from the hello, and no link starts at
/// either end (the accepting end delivers none: `connect` would fail waiting for it).
async fn a_node_that_dials_itself_starts_no_link(t: Transport) {
    let err = connect(t, setup(1), setup(1)).await.err().expect("no link to itself");
    assert!(err.contains("this node's own"), "{err}");
    // Its other peers are unaffected.
    connect(t, setup(1), setup(2)).await.expect("another node links");
}

async fn nodes_of_two_meshes_do_not_link(t: Transport) {
    let mut other = setup(2);
    other.hello.mesh = "staging".into();
    let err = connect(t, setup(1), other.clone()).await.err().expect("refused");
    assert!(err.contains("mesh \"test\"") && err.contains("mesh \"staging\""), "{err}");
    // Either side refuses: the dialer of the other mesh too.
    let mut other3 = setup(3);
    other3.hello.mesh = "staging".into();
    let err = connect(t, other3, setup(2)).await.err().expect("refused");
    assert!(err.contains("staging"), "{err}");
    // A mesh's own nodes link.
    let mut same = setup(1);
    same.hello.mesh = "staging".into();
    let mut peer = setup(2);
    peer.hello.mesh = "staging".into();
    connect(t, same, peer).await.expect("one mesh");
}

async fn a_token_source_mints_a_fresh_token_for_every_handshake(t: Transport) {
    use std::sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    };
    let minted = Arc::new(AtomicU32::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let counter = minted.clone();
    let dialer = setup(1).with_token_source(move || {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        Bytes::from(format!("token-{n}"))
    });
    let record = seen.clone();
    let acceptor = setup(2).with_check(move |h: &gearmesh_transport::Hello, _: &gearmesh_transport::PeerInfo| {
        record.lock().map_err(|e| e.to_string())?.push(h.token.clone());
        Ok(())
    });
    for _ in 0..2 {
        let (_a, _b, _f) = connect(t, dialer.clone(), acceptor.clone()).await.expect("connect");
    }
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen, [Bytes::from_static(b"token-0"), Bytes::from_static(b"token-1")], "one new token per link");
}

async fn rtt_is_estimated(t: Transport) {
    let (a, b, _f) = connect(t, setup(1), setup(2)).await.expect("connect");
    tokio::time::timeout(WAIT, async {
        while a.rtt().is_none() || b.rtt().is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("an RTT estimate appears");
    assert!(a.rtt().expect("rtt") < WAIT);
}

async fn back_pressure_then_try_send_full(t: Transport) {
    let mut small = setup(1);
    small.config.send_queue = 4;
    let mut peer = setup(2);
    peer.config.recv_queue = 4;
    let (a, mut b, _f) = connect(t, small, peer).await.expect("connect");
    let big = call(0, Bytes::from(vec![7u8; 256 * 1024]));
    let mut full = false;
    for _ in 0..2000 {
        match a.try_send(&big) {
            Ok(()) => tokio::task::yield_now().await,
            Err(TrySendError::Full) => {
                full = true;
                break;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(
        full,
        "an unread peer must eventually fill the send queue (closed: {:?}, b: {:?})",
        a.close_reason(),
        b.close_reason()
    );
    // The link is still healthy: the peer drains and frames arrive.
    assert!(matches!(recv(&mut b).await, Frame::Call(_)));
    assert!(a.close_reason().is_none());
}

async fn oversized_frame_closes_link(t: Transport) {
    let sender = setup(1);
    let mut receiver = setup(2);
    receiver.config.max_frame_len = 64 * 1024;
    let (a, mut b, _f) = connect(t, sender, receiver).await.expect("connect");
    a.send(&call(1, Bytes::from(vec![1u8; 100 * 1024]))).await.expect("queued");
    match tokio::time::timeout(WAIT, b.recv()).await.expect("closes") {
        Some(Err(LinkError::Closed(r))) => {
            assert_eq!(r.code, CloseCode::FRAME_TOO_LARGE, "{r}");
            assert_eq!(r.initiator, Initiator::Local);
        }
        other => panic!("expected a close, got {other:?}"),
    }
    let theirs = tokio::time::timeout(WAIT, a.closed()).await.expect("sender sees close");
    assert!(!theirs.code.is_orderly());
}

/// Records what a [`FrameHandler`] is given, for the tests below.
struct Recorder {
    frames: tokio::sync::mpsc::UnboundedSender<Frame>,
    closed: Option<tokio::sync::oneshot::Sender<gearmesh_transport::CloseReason>>,
}

impl FrameHandler for Recorder {
    fn on_frame(&mut self, frame: Frame) {
        assert!(self.closed.is_some(), "no frame after on_closed");
        self.frames.send(frame).expect("test listening");
    }

    fn on_closed(&mut self, reason: &gearmesh_transport::CloseReason) {
        let tx = self.closed.take().expect("on_closed once");
        tx.send(reason.clone()).expect("test listening");
    }
}

fn recorder() -> (
    Box<Recorder>,
    tokio::sync::mpsc::UnboundedReceiver<Frame>,
    tokio::sync::oneshot::Receiver<gearmesh_transport::CloseReason>,
) {
    let (frames, rx) = tokio::sync::mpsc::unbounded_channel();
    let (closed, closed_rx) = tokio::sync::oneshot::channel();
    (Box::new(Recorder { frames, closed: Some(closed) }), rx, closed_rx)
}

async fn a_handler_gets_queued_then_later_frames_in_order_then_the_close(t: Transport) {
    let (a, b, _f) = connect(t, setup(1), setup(2)).await.expect("connect");
    let gossip = |i: u16| Frame::Gossip { payload: Bytes::from(i.to_be_bytes().to_vec()) };
    // Some frames wait in the receiving queue before the handler is given.
    for i in 0..20 {
        a.send(&gossip(i)).await.expect("send");
    }
    let (b_tx, b_rx) = b.split();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (handler, mut frames, closed) = recorder();
    b_rx.into_handler(handler);
    for i in 20..200 {
        a.send(&gossip(i)).await.expect("send");
    }
    for i in 0..200 {
        let got = tokio::time::timeout(WAIT, frames.recv()).await.expect("in time").expect("frame");
        assert_eq!(got, gossip(i), "frame {i} in order");
    }
    a.close(CloseCode::PROTOCOL_ERROR, "bye").await;
    let reason = tokio::time::timeout(WAIT, closed).await.expect("in time").expect("on_closed");
    assert_eq!((reason.code, reason.initiator), (CloseCode::PROTOCOL_ERROR, Initiator::Remote));
    assert!(b_tx.close_reason().is_some(), "the link is closed when on_closed runs");
}

async fn a_handler_given_after_the_close_gets_the_frames_and_the_close_at_once(t: Transport) {
    let (a, b, _f) = connect(t, setup(1), setup(2)).await.expect("connect");
    // Gossip: on QUIC it shares the ordered control stream with the close (a call has a
    // stream of its own, which the close may overtake).
    let gossip = Frame::Gossip { payload: Bytes::from_static(b"x") };
    a.send(&gossip).await.expect("send");
    a.close(CloseCode::NORMAL, "done").await;
    let (b_tx, b_rx) = b.split();
    tokio::time::timeout(WAIT, b_tx.closed()).await.expect("closed");
    let (handler, mut frames, closed) = recorder();
    b_rx.into_handler(handler);
    assert_eq!(frames.try_recv().expect("the queued frame, at once"), gossip);
    let reason = closed.await.expect("on_closed at once");
    assert_eq!(reason.code, CloseCode::NORMAL);
}

/// A handler that asks for routed frames raw gets exactly the bytes sent, undecoded, for the
/// routes it asks for, and decoded frames for the others; a routed frame that would not decode
/// never reaches it raw: the link closes with a protocol error, as it does for the decoding path.
async fn a_handler_takes_the_routed_frames_it_asks_for_raw_and_a_malformed_one_closes_the_link(t: Transport) {
    /// Takes frames for node 2 raw (a switch's frames, had it a route), the rest decoded.
    struct Switch {
        raw: tokio::sync::mpsc::UnboundedSender<(Route, Bytes)>,
        decoded: tokio::sync::mpsc::UnboundedSender<Frame>,
        closed: Option<tokio::sync::oneshot::Sender<gearmesh_transport::CloseReason>>,
    }
    impl FrameHandler for Switch {
        fn on_frame(&mut self, frame: Frame) {
            self.decoded.send(frame).expect("test listening");
        }
        fn wants_raw(&mut self, route: &Route) -> bool {
            route.dst == NodeId([2; 16])
        }
        fn on_raw(&mut self, route: Route, raw: Bytes) {
            self.raw.send((route, raw)).expect("test listening");
        }
        fn on_closed(&mut self, reason: &gearmesh_transport::CloseReason) {
            if let Some(tx) = self.closed.take() {
                tx.send(reason.clone()).expect("test listening");
            }
        }
    }
    let (a, b, _f) = connect(t, setup(1), setup(2)).await.expect("connect");
    let (raw_tx, mut raw) = tokio::sync::mpsc::unbounded_channel();
    let (decoded_tx, mut decoded) = tokio::sync::mpsc::unbounded_channel();
    let (closed_tx, closed) = tokio::sync::oneshot::channel();
    let (_b_tx, b_rx) = b.split();
    b_rx.into_handler(Box::new(Switch { raw: raw_tx, decoded: decoded_tx, closed: Some(closed_tx) }));

    let for_two = call(7, Bytes::from_static(b"raw please"));
    let Frame::Call(mut c) = call(8, Bytes::from_static(b"decode me")) else { unreachable!("a call") };
    c.route.dst = NodeId([3; 16]);
    let for_three = Frame::Call(c);
    let gossip = Frame::Gossip { payload: Bytes::from_static(b"g") };
    for f in [&for_two, &for_three, &gossip] {
        a.send(f).await.expect("send");
    }
    let (route, bytes) = tokio::time::timeout(WAIT, raw.recv()).await.expect("in time").expect("raw frame");
    assert_eq!(route, *for_two.route().expect("routed"));
    let mut sent = bytes::BytesMut::new();
    for_two.encode(&mut sent, gearmesh_transport::frame::DEFAULT_MAX_FRAME_LEN).expect("encodes");
    assert_eq!(bytes, sent.freeze(), "the bytes as sent");
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(tokio::time::timeout(WAIT, decoded.recv()).await.expect("in time").expect("decoded frame"));
    }
    assert!(got.contains(&for_three) && got.contains(&gossip), "{got:?}");

    // A call for node 2 whose gear name is not UTF-8: its header is fine, its body is not.
    let mut bad = bytes::BytesMut::new();
    for_two.encode(&mut bad, gearmesh_transport::frame::DEFAULT_MAX_FRAME_LEN).expect("encodes");
    let at = bad.windows(7).rposition(|w| w == b"billing").expect("gear name");
    bad[at] = 0xff;
    a.sender().send_raw(bad.freeze()).await.expect("the header passes the sender's check");
    let reason = tokio::time::timeout(WAIT, closed).await.expect("in time").expect("on_closed");
    assert_eq!((reason.code, reason.initiator), (CloseCode::PROTOCOL_ERROR, Initiator::Local), "{reason}");
    assert!(raw.try_recv().is_err(), "the malformed frame never reached on_raw");
}

/// A handler that panics closes its link with `INTERNAL_ERROR` (and still hears `on_closed`)
/// instead of killing the link's task silently; the peer sees the close.
async fn a_panicking_handler_closes_its_link_and_hears_on_closed(t: Transport) {
    struct Panics(Option<tokio::sync::oneshot::Sender<gearmesh_transport::CloseReason>>);
    impl FrameHandler for Panics {
        fn on_frame(&mut self, _frame: Frame) {
            panic!("a bug in the handler");
        }
        fn on_closed(&mut self, reason: &gearmesh_transport::CloseReason) {
            if let Some(tx) = self.0.take() {
                tx.send(reason.clone()).expect("test listening");
            }
        }
    }
    let (a, b, _f) = connect(t, setup(1), setup(2)).await.expect("connect");
    let (closed_tx, closed) = tokio::sync::oneshot::channel();
    let (_b_tx, b_rx) = b.split();
    b_rx.into_handler(Box::new(Panics(Some(closed_tx))));
    a.send(&Frame::Gossip { payload: Bytes::from_static(b"boom") }).await.expect("send");
    let reason = tokio::time::timeout(WAIT, closed).await.expect("in time").expect("on_closed");
    assert_eq!((reason.code, reason.initiator), (CloseCode::INTERNAL_ERROR, Initiator::Local));
    let theirs = tokio::time::timeout(WAIT, a.closed()).await.expect("the peer sees the close");
    assert_eq!(theirs.code, CloseCode::INTERNAL_ERROR);
}

/// A sender stuck because the peer stopped reading (its receiving queue is full and the
/// transport's buffers with it) gets `Closed` once the link is closed, and `close` returns:
/// nothing waits forever on a dead link, whether the stuck write is the driver's or a sender's
/// own direct write.
async fn a_sender_stuck_on_a_peer_that_stopped_reading_returns_when_the_link_closes(t: Transport) {
    let mut deaf = setup(2);
    deaf.config.recv_queue = 1;
    // Frequent heartbeats: a's driver runs (reading b's pings) between two sends, so on WSS
    // each send finds the link idle and writes directly; the one that sticks is a sender's.
    deaf.config.heartbeat_interval = Duration::from_millis(10);
    let mut a_setup = setup(1);
    a_setup.config.heartbeat_interval = Duration::from_millis(10);
    let (a, b, _f) = connect(t, a_setup, deaf).await.expect("connect");
    let tx = a.sender().clone();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sender = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let big = Frame::Gossip { payload: Bytes::from(vec![1u8; 1 << 20]) };
            loop {
                if let Err(e) = tx.send(&big).await {
                    return e;
                }
                sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // Until the sender makes no more progress: b never reads.
    let mut last = usize::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = sent.load(std::sync::atomic::Ordering::SeqCst);
        if now == last {
            break;
        }
        last = now;
    }
    assert!(!sender.is_finished(), "the sender is held up by the peer");
    let reason = tokio::time::timeout(WAIT, a.close(CloseCode::NORMAL, "bye")).await.expect("close returns");
    assert_eq!(reason.code, CloseCode::NORMAL);
    let err = tokio::time::timeout(WAIT, sender).await.expect("the stuck sender returns").expect("task");
    assert_eq!(err, SendError::Closed);
    drop(b);
}

/// Sends given up part-way, while the peer is not reading and the transport's buffers are full
/// (a caller that times out), leave the stream whole: the peer later reads only complete frames,
/// each sent frame at most once and in order, then the frame sent after them, and the link
/// stays open. A frame whose send was dropped may still arrive (it was queued whole) or not.
async fn sends_dropped_part_way_leave_only_whole_frames(t: Transport) {
    let mut slow = setup(2);
    slow.config.recv_queue = 1;
    // A short send queue, so that sends wait once the transport's buffers are full; frequent
    // heartbeats and a pause between sends, so that each send finds the link idle and, where
    // the transport allows it, writes directly (the write that is dropped is then the sender's).
    let mut fast = setup(1);
    fast.config.send_queue = 2;
    for s in [&mut fast, &mut slow] {
        s.config.heartbeat_interval = Duration::from_millis(10);
    }
    let (mut a, mut b, _f) = connect(t, fast, slow).await.expect("connect");
    const BIG: usize = 1 << 20;
    let mut dropped = 0;
    let mut sent = 0u8;
    while dropped < 4 && sent < 200 {
        let frame = Frame::Gossip { payload: Bytes::from(vec![sent; BIG]) };
        sent += 1;
        if tokio::time::timeout(Duration::from_millis(50), a.send(&frame)).await.is_err() {
            dropped += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(dropped, 4, "the peer's buffers never filled");
    let tx = a.sender().clone();
    let last = tokio::spawn(async move { tx.send(&Frame::Gossip { payload: Bytes::from_static(b"last") }).await });
    let mut next = 0u8;
    loop {
        let Frame::Gossip { payload } = recv(&mut b).await else { panic!("a gossip frame") };
        if payload.as_ref() == b"last" {
            break;
        }
        assert_eq!(payload.len(), BIG, "a whole frame");
        let n = payload[0];
        assert!(payload.iter().all(|&x| x == n), "frame {n} is not mixed with another");
        assert!(n >= next && n < sent, "frame {n} after {next}: in order, once");
        next = n + 1;
    }
    last.await.expect("task").expect("the last frame was sent");
    b.send(&Frame::Gossip { payload: Bytes::from_static(b"still open") }).await.expect("send back");
    let Frame::Gossip { payload } = recv(&mut a).await else { panic!("gossip") };
    assert_eq!(payload.as_ref(), b"still open");
}

/// Several tasks sending at once, some frames written directly by the sender and some queued
/// for the driver: each sender's frames arrive in the order it sent them.
async fn each_senders_frames_keep_their_order_under_concurrency(t: Transport) {
    let (a, mut b, _f) = connect(t, setup(1), setup(2)).await.expect("connect");
    const TASKS: u8 = 8;
    const EACH: u16 = 300;
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let tx = a.sender().clone();
        tasks.push(tokio::spawn(async move {
            for seq in 0..EACH {
                let mut payload = vec![task];
                payload.extend_from_slice(&seq.to_be_bytes());
                tx.send(&Frame::Gossip { payload: Bytes::from(payload) }).await.expect("send");
                if seq % 7 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    let mut next = [0u16; TASKS as usize];
    for _ in 0..u32::from(TASKS) * u32::from(EACH) {
        let Frame::Gossip { payload } = recv(&mut b).await else { panic!("a gossip frame") };
        let task = usize::from(payload[0]);
        let seq = u16::from_be_bytes([payload[1], payload[2]]);
        assert_eq!(seq, next[task], "sender {task} in order");
        next[task] += 1;
    }
    for t in tasks {
        t.await.expect("sender");
    }
}

/// Frames still in a link's send queue when it closes were never written: `take_unsent` hands
/// them back, whole and in the order they were queued, once, so that a caller can send them
/// elsewhere instead of losing them. Here the peer reads nothing, the queue fills, and then the
/// peer closes the link.
async fn frames_queued_when_the_link_closes_are_handed_back_unsent(t: Transport) {
    const QUEUE: usize = 8;
    let mut a_setup = setup(1);
    a_setup.config.send_queue = QUEUE;
    let mut deaf = setup(2);
    deaf.config.recv_queue = 1;
    let (a, b, _f) = connect(t, a_setup, deaf).await.expect("connect");
    let big = |i: u64| call(i, Bytes::from(vec![u8::try_from(i % 251).expect("small"); 256 * 1024]));
    let mut queued = 0u64;
    let mut full = false;
    while !full && queued < 2000 {
        match a.try_send(&big(queued)) {
            Ok(()) => {
                queued += 1;
                tokio::task::yield_now().await;
            }
            Err(TrySendError::Full) => full = true,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(full, "the send queue never filled");
    assert!(a.sender().take_unsent().is_empty(), "nothing is handed back while the link is open");
    let id = a.sender().id();
    assert_eq!(a.sender().clone().id(), id, "one link, one id");
    assert_ne!(b.sender().id(), id, "each end its own id");

    b.close(CloseCode::NORMAL, "going away").await;
    tokio::time::timeout(WAIT, a.closed()).await.expect("a sees the close");
    assert!(a.sender().is_closed());
    let unsent = a.sender().take_unsent();
    assert!(!unsent.is_empty() && unsent.len() <= QUEUE, "{} frames handed back", unsent.len());
    let first = queued - unsent.len() as u64;
    for (k, raw) in (0u64..).zip(&unsent) {
        let frame = gearmesh_transport::frame::decode(raw, usize::MAX).expect("a whole frame");
        assert!(frame == big(first + k), "frame {} is the one queued {}th", first + k, first + k);
    }
    assert!(a.sender().take_unsent().is_empty(), "handed back once");
    assert_eq!(a.try_send(&big(0)), Err(TrySendError::Send(SendError::Closed)));
}

/// Frames the peer writes until it hears our close are still read and delivered (the close is a
/// handshake, as WebSocket's and TCP's are): a link closed in an orderly way while the peer
/// sends loses nothing. Each frame the peer sent is delivered here or handed back to it unsent.
async fn an_orderly_close_loses_nothing_the_peer_sent_before_hearing_it(t: Transport) {
    let (a, b, _f) = connect(t, setup(1), setup(2)).await.expect("connect");
    let (a_tx, mut a_rx) = a.split();
    let b_tx = b.sender().clone();
    // The peer sends numbered calls until its link closes.
    let sender = tokio::spawn(async move {
        let mut sent = 0u64;
        while b_tx.send(&call(sent, Bytes::from_static(b"0123456789abcdef"))).await.is_ok() {
            sent += 1;
            if sent.is_multiple_of(8) {
                tokio::task::yield_now().await;
            }
        }
        // A link that takes no more frames says it is closed, even while it still reads.
        assert!(b_tx.is_closed(), "a send failed, so the link is closed");
        (sent, b_tx.take_unsent().len() as u64)
    });
    let read_so_far = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = read_so_far.clone();
    let reader = tokio::spawn(async move {
        let mut ids = Vec::new();
        while let Ok(Some(Ok(f))) = tokio::time::timeout(WAIT, a_rx.recv()).await {
            let Frame::Call(c) = f else { panic!("not a call: {f:?}") };
            ids.push(c.call_id);
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        ids
    });
    // Close while the peer is in full flow (once some frames have arrived, however slow the
    // machine).
    let flowing = async {
        while read_so_far.load(std::sync::atomic::Ordering::Relaxed) <= 10 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(WAIT, flowing).await.expect("frames flow");
    let reason = tokio::time::timeout(WAIT, a_tx.close(CloseCode::NORMAL, "done")).await.expect("closes");
    assert_eq!(reason.initiator, Initiator::Local);
    let (sent, unsent) = tokio::time::timeout(WAIT, sender).await.expect("the peer's sender ends").expect("sender");
    let mut ids = tokio::time::timeout(WAIT, reader).await.expect("the reader ends").expect("reader");
    assert!(ids.len() > 10, "frames flowed before the close ({} read)", ids.len());
    // QUIC does not keep calls in order across streams; each arrives once.
    ids.sort_unstable();
    let read = ids.len() as u64;
    ids.dedup();
    assert_eq!(ids.len() as u64, read, "no frame twice");
    assert_eq!(
        read + unsent,
        sent,
        "{sent} frames sent: {read} delivered and {unsent} handed back unsent; the rest were lost in the close"
    );
    assert!(ids.iter().copied().eq(0..read), "the frames delivered are the first {read} sent");
}

/// Frames written before a close arrive before it: the side that closes sends calls without
/// pause and then closes, and the peer reads every frame sent that was not handed back unsent,
/// and then the close. Over QUIC each call has a stream of its own and the close travels on the
/// control stream, so the close must not overtake them.
async fn frames_written_before_a_close_arrive_before_it(t: Transport) {
    let (a, b, _f) = connect(t, setup(1), setup(2)).await.expect("connect");
    let reader = spawn_call_reader(b, WAIT);
    let mut sent = 0u64;
    for round in 0..20u64 {
        for _ in 0..(5 + round * 3) {
            a.send(&call(sent, Bytes::from_static(b"0123456789abcdef"))).await.expect("open");
            sent += 1;
        }
        tokio::task::yield_now().await;
    }
    // The last burst right before the close.
    for _ in 0..50 {
        a.send(&call(sent, Bytes::from_static(b"0123456789abcdef"))).await.expect("open");
        sent += 1;
    }
    let reason = tokio::time::timeout(WAIT, a.close(CloseCode::NORMAL, "done")).await.expect("closes");
    assert_eq!(reason.initiator, Initiator::Local);
    let unsent = a.sender().take_unsent().len() as u64;
    let mut ids = tokio::time::timeout(WAIT, reader).await.expect("the reader ends").expect("reader");
    ids.sort_unstable();
    let read = ids.len() as u64;
    ids.dedup();
    assert_eq!(ids.len() as u64, read, "no frame twice");
    assert_eq!(read + unsent, sent, "{sent} sent: {read} delivered before the close and {unsent} handed back");
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $( #[tokio::test] async fn $name() { super::$name(super::Transport::Memory).await } )*
        }
        mod wss {
            $( #[tokio::test] async fn $name() { super::$name(super::Transport::Wss).await } )*
        }
        mod quic {
            $( #[tokio::test] async fn $name() { super::$name(super::Transport::Quic).await } )*
        }
    };
}

suite!(
    frames_flow_both_ways,
    frames_queued_when_the_link_closes_are_handed_back_unsent,
    an_orderly_close_loses_nothing_the_peer_sent_before_hearing_it,
    frames_written_before_a_close_arrive_before_it,
    a_sender_stuck_on_a_peer_that_stopped_reading_returns_when_the_link_closes,
    a_panicking_handler_closes_its_link_and_hears_on_closed,
    a_handler_takes_the_routed_frames_it_asks_for_raw_and_a_malformed_one_closes_the_link,
    each_senders_frames_keep_their_order_under_concurrency,
    sends_dropped_part_way_leave_only_whole_frames,
    a_handler_gets_queued_then_later_frames_in_order_then_the_close,
    a_handler_given_after_the_close_gets_the_frames_and_the_close_at_once,
    peer_info_after_hello,
    link_frames_are_refused,
    close_with_reason_reaches_peer,
    abnormal_close_is_reported_once,
    dropping_a_link_closes_the_peer,
    hello_check_can_refuse,
    nodes_of_two_meshes_do_not_link,
    a_node_that_dials_itself_starts_no_link,
    a_token_source_mints_a_fresh_token_for_every_handshake,
    rtt_is_estimated,
    back_pressure_then_try_send_full,
    oversized_frame_closes_link,
);

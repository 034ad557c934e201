//! The transport-independent link driver: one task per link that writes queued frames, reads
//! and dispatches incoming ones, sends heartbeats, measures RTT, detects a frozen peer, and
//! closes the link with a reason.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};

use super::wire::{WireError, WireRx, WireTx};
use super::{CloseReason, Initiator, Link, LinkConfig, LinkError, LinkReceiver, LinkSender, PeerInfo, Shared};
use crate::frame::{self, Close, CloseCode, DecodeError, Frame, FrameKind};

/// How a link ended, and whether the peer should be told.
struct Outcome {
    reason: CloseReason,
    tell_peer: bool,
}

impl Outcome {
    fn local(code: CloseCode, reason: impl Into<String>) -> Self {
        Outcome { reason: CloseReason { code, reason: reason.into(), initiator: Initiator::Local }, tell_peer: true }
    }

    fn transport(e: &WireError) -> Self {
        match e {
            WireError::Decode(d) => Self::invalid(d),
            WireError::Protocol(p) => Self::local(CloseCode::PROTOCOL_ERROR, p.clone()),
            WireError::Io(io) => Outcome {
                reason: CloseReason {
                    code: CloseCode::TRANSPORT_ERROR,
                    reason: io.clone(),
                    initiator: Initiator::Local,
                },
                tell_peer: false,
            },
        }
    }

    fn invalid(d: &DecodeError) -> Self {
        let code = match d {
            DecodeError::Oversized { .. } => CloseCode::FRAME_TOO_LARGE,
            _ => CloseCode::PROTOCOL_ERROR,
        };
        Self::local(code, format!("invalid frame: {d}"))
    }
}

/// Starts the driver task for an established connection and returns the link.
pub(crate) fn start<T: WireTx, R: WireRx>(
    tx: T,
    rx: R,
    peer: PeerInfo,
    config: &LinkConfig,
    permit: Option<OwnedSemaphorePermit>,
) -> Link {
    let (out_tx, out_rx) = mpsc::channel(config.send_queue.max(1));
    let (in_tx, in_rx) = mpsc::channel(config.recv_queue.max(1));
    let shared = Arc::new(Shared {
        peer,
        rtt_micros: AtomicU64::new(0),
        closed: watch::Sender::new(None),
        close_req: watch::Sender::new(None),
        max_frame_len: config.max_frame_len,
    });
    tokio::spawn(run(tx, rx, Arc::clone(&shared), out_rx, in_tx, config.clone(), permit));
    Link {
        sender: LinkSender { out: out_tx, shared: Arc::clone(&shared) },
        receiver: LinkReceiver { inbound: in_rx, shared },
    }
}

/// Clocks shared by the reader, writer and watchdog of one link. The reader never reads the
/// clock for a frame: it raises `heard`, and the watchdog, which wakes every quarter heartbeat,
/// turns that into a time. Silence is therefore measured to within one watchdog step.
struct Clock {
    start: Instant,
    /// Something arrived since the watchdog last looked.
    heard: AtomicBool,
    /// The reader is waiting for the application, not the network.
    reader_blocked: AtomicBool,
}

impl Clock {
    fn now_micros(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        self.heard.store(true, Ordering::Relaxed);
    }
}

async fn run<T: WireTx, R: WireRx>(
    mut tx: T,
    mut rx: R,
    shared: Arc<Shared>,
    mut out_rx: mpsc::Receiver<Bytes>,
    in_tx: mpsc::Sender<Result<Frame, LinkError>>,
    config: LinkConfig,
    permit: Option<OwnedSemaphorePermit>,
) {
    let clock = Clock { start: Instant::now(), heard: AtomicBool::new(false), reader_blocked: AtomicBool::new(false) };
    let (ctrl_tx, mut ctrl_rx) = mpsc::channel::<Frame>(32);
    let mut close_rx = shared.close_req.subscribe();
    let outcome = tokio::select! {
        o = read_loop(&mut rx, &in_tx, ctrl_tx, &shared, &config, &clock) => o,
        o = write_loop(&mut tx, &mut out_rx, &mut ctrl_rx, &config, &clock) => o,
        o = watchdog(&config, &clock) => o,
        o = close_requested(&mut close_rx) => o,
    };
    let peer = shared.peer.node_id;
    if outcome.reason.code.is_orderly() {
        tracing::debug!(%peer, reason = %outcome.reason, "link closed");
    } else {
        tracing::warn!(%peer, transport = %shared.peer.transport, reason = %outcome.reason, "link closed");
    }
    if outcome.tell_peer {
        let close = Frame::Close(Close { code: outcome.reason.code, reason: outcome.reason.reason.clone() });
        let mut buf = BytesMut::new();
        if close.encode(&mut buf, config.max_frame_len).is_ok() {
            let sent = tokio::time::timeout(config.close_timeout, tx.send(buf.freeze(), FrameKind::Close)).await;
            if !matches!(sent, Ok(Ok(()))) {
                tracing::debug!(%peer, "could not send the close frame");
            }
        }
    }
    if tokio::time::timeout(config.close_timeout, tx.shutdown()).await.is_err() {
        tracing::debug!(%peer, "transport shutdown timed out");
    }
    shared.closed.send_replace(Some(outcome.reason.clone()));
    if !outcome.reason.code.is_orderly() && in_tx.try_send(Err(LinkError::Closed(outcome.reason))).is_err() {
        tracing::trace!(%peer, "receiver gone or full; close reason not queued");
    }
    drop(permit);
}

async fn close_requested(rx: &mut watch::Receiver<Option<Close>>) -> Outcome {
    let req = match rx.wait_for(Option::is_some).await {
        Ok(req) => req.clone(),
        // The sender lives in `Shared`, which outlives this future.
        Err(_) => None,
    };
    match req {
        Some(c) => Outcome::local(c.code, c.reason),
        None => std::future::pending().await,
    }
}

async fn watchdog(config: &LinkConfig, clock: &Clock) -> Outcome {
    let idle = u64::try_from(config.idle_timeout.as_micros()).unwrap_or(u64::MAX);
    let step = (config.heartbeat_interval / 4).max(std::time::Duration::from_millis(5));
    let mut last_heard = clock.now_micros();
    loop {
        tokio::time::sleep(step).await;
        let now = clock.now_micros();
        if clock.heard.swap(false, Ordering::Relaxed) || clock.reader_blocked.load(Ordering::Relaxed) {
            last_heard = now;
            continue;
        }
        let silent = now.saturating_sub(last_heard);
        if silent > idle {
            return Outcome::local(CloseCode::HEARTBEAT_TIMEOUT, format!("nothing received for {} ms", silent / 1000));
        }
    }
}

async fn write_loop<T: WireTx>(
    tx: &mut T,
    out_rx: &mut mpsc::Receiver<Bytes>,
    ctrl_rx: &mut mpsc::Receiver<Frame>,
    config: &LinkConfig,
    clock: &Clock,
) -> Outcome {
    // A zero interval would panic in tokio: treat it as 1 ms.
    let mut ticker = tokio::time::interval(config.heartbeat_interval.max(std::time::Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut buf = BytesMut::with_capacity(256);
    loop {
        let control = tokio::select! {
            biased;
            Some(f) = ctrl_rx.recv() => Some(f),
            _ = ticker.tick() => {
                seq += 1;
                Some(Frame::Ping { seq, sent_at_micros: clock.now_micros() })
            }
            out = out_rx.recv() => match out {
                Some(bytes) => {
                    if let Err(e) = write_batch(tx, out_rx, bytes).await {
                        return Outcome::transport(&e);
                    }
                    None
                }
                None => return Outcome::local(CloseCode::NORMAL, "link dropped"),
            },
        };
        if let Some(f) = control {
            if f.encode(&mut buf, config.max_frame_len).is_err() {
                continue;
            }
            if let Err(e) = tx.send(buf.split().freeze(), f.kind()).await {
                return Outcome::transport(&e);
            }
        }
    }
}

/// Frames written before one flush when the send queue has a backlog.
const MAX_BATCH: usize = 64;

/// Writes `first` and whatever else is already queued (up to [`MAX_BATCH`]), then flushes once.
async fn write_batch<T: WireTx>(tx: &mut T, out_rx: &mut mpsc::Receiver<Bytes>, first: Bytes) -> Result<(), WireError> {
    let kind = frame::encode_raw_kind(&first);
    tx.feed(first, kind).await?;
    for _ in 1..MAX_BATCH {
        let Ok(next) = out_rx.try_recv() else { break };
        let kind = frame::encode_raw_kind(&next);
        tx.feed(next, kind).await?;
    }
    tx.flush().await
}

async fn read_loop<R: WireRx>(
    rx: &mut R,
    in_tx: &mpsc::Sender<Result<Frame, LinkError>>,
    ctrl_tx: mpsc::Sender<Frame>,
    shared: &Shared,
    config: &LinkConfig,
    clock: &Clock,
) -> Outcome {
    loop {
        let bytes = match rx.recv().await {
            Ok(Some(b)) => b,
            Ok(None) => {
                return Outcome {
                    reason: CloseReason {
                        code: CloseCode::TRANSPORT_ERROR,
                        reason: "connection ended without a close frame".into(),
                        initiator: Initiator::Remote,
                    },
                    tell_peer: false,
                };
            }
            Err(e) => return Outcome::transport(&e),
        };
        clock.touch();
        let frame = match frame::decode(&bytes, config.max_frame_len) {
            Ok(f) => f,
            Err(e) => return Outcome::invalid(&e),
        };
        match frame {
            Frame::Ping { seq, sent_at_micros } => {
                if ctrl_tx.try_send(Frame::Pong { seq, echo: sent_at_micros }).is_err() {
                    tracing::trace!("pong dropped: control queue full");
                }
            }
            Frame::Pong { echo, .. } => {
                let sample = clock.now_micros().saturating_sub(echo).max(1);
                let old = shared.rtt_micros.load(Ordering::Relaxed);
                let srtt = if old == 0 { sample } else { (old * 7 + sample) / 8 };
                shared.rtt_micros.store(srtt.max(1), Ordering::Relaxed);
            }
            Frame::Close(c) => {
                return Outcome {
                    reason: CloseReason { code: c.code, reason: c.reason, initiator: Initiator::Remote },
                    tell_peer: false,
                };
            }
            Frame::Hello(_) => {
                return Outcome::local(CloseCode::PROTOCOL_ERROR, "unexpected second hello");
            }
            app => {
                clock.reader_blocked.store(true, Ordering::Relaxed);
                let delivered = in_tx.send(Ok(app)).await;
                clock.reader_blocked.store(false, Ordering::Relaxed);
                clock.touch();
                if delivered.is_err() {
                    return Outcome::local(CloseCode::NORMAL, "receiver dropped");
                }
            }
        }
    }
}

//! The transport-independent link driver: one task per link that writes queued frames, reads
//! and dispatches incoming ones, sends heartbeats, measures RTT, detects a frozen peer, and
//! closes the link with a reason.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};
use tokio::time::Instant;

use super::wire::{WireError, WireRx, WireTx};
use super::{
    CloseReason, Handled, Handoff, Initiator, Link, LinkConfig, LinkError, LinkReceiver, LinkSender, PeerInfo, Shared,
};
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

/// A message for the driver's writer that is not an application frame.
#[derive(Debug)]
pub(crate) enum Ctrl {
    /// A heartbeat to send.
    Ping { seq: u64, sent_at_micros: u64 },
    /// The answer to the peer's heartbeat.
    Pong { seq: u64, echo: u64 },
    /// `close` was called: the request is in [`Shared::close_req`].
    CloseRequested,
    /// A [`crate::FrameHandler`] waits in [`Shared::handoff`].
    HandlerGiven,
}

/// Control messages queued at most; a pong beyond that is dropped (the peer's next ping gets
/// one), and a close request is still seen at the next check.
const CTRL_QUEUE: usize = 32;

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
    let (ctrl_tx, ctrl_rx) = mpsc::channel(CTRL_QUEUE);
    let tx: SharedTx<T> = Arc::new(tokio::sync::Mutex::new(Some(tx)));
    let direct: Option<Arc<dyn DirectWrite>> = if T::DIRECT { Some(Arc::new(Direct(Arc::clone(&tx)))) } else { None };
    let shared = Arc::new(Shared {
        id: super::LinkId::next(),
        peer,
        rtt_micros: AtomicU64::new(0),
        closed: watch::Sender::new(None),
        close_req: watch::Sender::new(None),
        ctrl: ctrl_tx,
        max_frame_len: config.max_frame_len,
        handoff: Mutex::new(Handoff::default()),
        handoff_pending: AtomicBool::new(false),
        direct,
        queued: AtomicUsize::new(0),
        direct_used: AtomicBool::new(false),
        direct_ok: AtomicBool::new(true),
        unsent: Mutex::new(Vec::new()),
    });
    tokio::spawn(run(tx, rx, Arc::clone(&shared), out_rx, ctrl_rx, in_tx, config.clone(), permit));
    Link {
        sender: LinkSender { out: out_tx, shared: Arc::clone(&shared) },
        receiver: LinkReceiver { inbound: in_rx, shared },
    }
}

/// Clocks shared by the reader, writer and timer of one link. The reader never reads the clock
/// for a frame: it raises `heard`, and the timer, which wakes every quarter heartbeat, turns
/// that into a time. Silence is therefore measured to within one watchdog step.
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

/// The driver: three futures polled by one task (reading, writing, and one timer for heartbeats,
/// the watchdog and close requests), so a wake-up polls as few wakers as possible.
#[allow(clippy::too_many_arguments)]
async fn run<T: WireTx, R: WireRx>(
    tx: SharedTx<T>,
    mut rx: R,
    shared: Arc<Shared>,
    mut out_rx: mpsc::Receiver<Bytes>,
    mut ctrl_rx: mpsc::Receiver<Ctrl>,
    in_tx: mpsc::Sender<Result<Frame, LinkError>>,
    config: LinkConfig,
    permit: Option<OwnedSemaphorePermit>,
) {
    let clock = Clock { start: Instant::now(), heard: AtomicBool::new(false), reader_blocked: AtomicBool::new(false) };
    let handler = Mutex::new(None);
    let outcome = tokio::select! {
        biased;
        o = read_loop(&mut rx, &in_tx, &handler, &shared, &config, &clock) => o,
        o = write_loop(&tx, &mut out_rx, &mut ctrl_rx, &handler, &shared, &config) => o,
        o = timer(&shared, &config, &clock) => o,
    };
    let peer = shared.peer.node_id;
    // Nothing is queued from now on; what is queued was never written, and goes back to the
    // senders' side (`LinkSender::take_unsent`) instead of being lost with the queue.
    out_rx.close();
    let mut unsent = Vec::new();
    while let Ok(bytes) = out_rx.try_recv() {
        unsent.push(bytes);
    }
    shared.queued.fetch_sub(unsent.len(), Ordering::AcqRel);
    if !unsent.is_empty() {
        tracing::debug!(%peer, frames = unsent.len(), "frames queued but not written at the close");
    }
    *lock(&shared.unsent) = unsent;
    if outcome.reason.code.is_orderly() {
        tracing::debug!(%peer, reason = %outcome.reason, "link closed");
    } else {
        tracing::warn!(%peer, transport = %shared.peer.transport, reason = %outcome.reason, "link closed");
    }
    // The writer leaves the shared slot: no sender writes directly from now on. A sender's
    // direct write stuck on a peer that does not read is waited for no longer than the close
    // timeout; then the connection ends without a close frame.
    let writer = match tokio::time::timeout(config.close_timeout, tx.lock()).await {
        Ok(mut slot) => slot.take(),
        Err(_) => {
            tracing::debug!(%peer, "a sender's write is stuck; no close frame");
            None
        }
    };
    if let Some(mut tx) = writer {
        if outcome.tell_peer {
            let close = Frame::Close(Close { code: outcome.reason.code, reason: outcome.reason.reason.clone() });
            let mut buf = BytesMut::new();
            let mut told = false;
            if close.encode(&mut buf, config.max_frame_len).is_ok() {
                let sent = tokio::time::timeout(config.close_timeout, tx.send(buf.freeze(), FrameKind::Close)).await;
                told = matches!(sent, Ok(Ok(())));
                if !told {
                    tracing::debug!(%peer, "could not send the close frame");
                }
            }
            // An orderly close is a handshake: the peer may have written frames before it read
            // ours, and they are read and delivered until its side ends (its close, or the
            // connection's end), for at most the close timeout. Stopping at once lost them.
            if told && outcome.reason.code.is_orderly() {
                let drain = read_loop(&mut rx, &in_tx, &handler, &shared, &config, &clock);
                if tokio::time::timeout(config.close_timeout, drain).await.is_err() {
                    tracing::debug!(%peer, "the peer did not end its side within the close timeout");
                }
            }
        }
        if tokio::time::timeout(config.close_timeout, tx.shutdown()).await.is_err() {
            tracing::debug!(%peer, "transport shutdown timed out");
        }
    }
    // Under the hand-over lock, so that a handler given from now on sees the link closed.
    let waiting = {
        let mut handoff = lock(&shared.handoff);
        shared.closed.send_replace(Some(outcome.reason.clone()));
        handoff.done = true;
        handoff.waiting.take()
    };
    let handled = waiting.or_else(|| handler.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner));
    if let Some(mut handled) = handled {
        handled.drain();
        handled.handler.on_closed(&outcome.reason);
    } else if !outcome.reason.code.is_orderly() && in_tx.try_send(Err(LinkError::Closed(outcome.reason))).is_err() {
        tracing::trace!(%peer, "receiver gone or full; close reason not queued");
    }
    drop(permit);
}

/// Locks `m`, ignoring poisoning (the data stays consistent: no guard is held across a panic
/// in this crate's code).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Takes a handler given by [`crate::LinkReceiver::into_handler`], if one waits, and hands it
/// what was queued before it.
fn adopt(shared: &Shared, handler: &Mutex<Option<Handled>>) {
    if !shared.handoff_pending.load(Ordering::Acquire) {
        return;
    }
    shared.handoff_pending.store(false, Ordering::Relaxed);
    if let Some(mut handled) = lock(&shared.handoff).waiting.take() {
        handled.drain();
        *lock(handler) = Some(handled);
    }
}

/// The close `close` asked for, if any.
fn close_requested(shared: &Shared) -> Option<Outcome> {
    shared.close_req.borrow().as_ref().map(|c| Outcome::local(c.code, c.reason.clone()))
}

/// One timer for the link: sends a ping every heartbeat interval, closes the link when nothing
/// has been heard for the idle timeout (checked every quarter heartbeat), and notices a close
/// request even when the writer is stuck on a peer that does not read.
async fn timer(shared: &Shared, config: &LinkConfig, clock: &Clock) -> Outcome {
    let idle = u64::try_from(config.idle_timeout.as_micros()).unwrap_or(u64::MAX);
    // A zero interval would spin: treat it as 1 ms.
    let heartbeat = config.heartbeat_interval.max(std::time::Duration::from_millis(1));
    let step = (config.heartbeat_interval / 4).max(std::time::Duration::from_millis(5));
    let mut last_heard = clock.now_micros();
    let mut seq = 0u64;
    let start = Instant::now();
    let (mut next_ping, mut next_watch) = (start, start + step);
    let sleep = tokio::time::sleep_until(start);
    tokio::pin!(sleep);
    loop {
        sleep.as_mut().await;
        let now = Instant::now();
        if now >= next_ping {
            seq += 1;
            let ping = Ctrl::Ping { seq, sent_at_micros: clock.now_micros() };
            if shared.ctrl.try_send(ping).is_err() {
                tracing::trace!("ping dropped: control queue full");
            }
            next_ping = (next_ping + heartbeat).max(now);
        }
        if now >= next_watch {
            if let Some(o) = close_requested(shared) {
                return o;
            }
            let now_us = clock.now_micros();
            if clock.heard.swap(false, Ordering::Relaxed) || clock.reader_blocked.load(Ordering::Relaxed) {
                last_heard = now_us;
            } else {
                let silent = now_us.saturating_sub(last_heard);
                if silent > idle {
                    return Outcome::local(
                        CloseCode::HEARTBEAT_TIMEOUT,
                        format!("nothing received for {} ms", silent / 1000),
                    );
                }
            }
            next_watch = (next_watch + step).max(now);
        }
        sleep.as_mut().reset(next_ping.min(next_watch));
    }
}

/// Why the writer slot is empty while the driver still runs: it never is (only the driver's
/// end empties it), but a write must not assume it.
fn writer_gone() -> WireError {
    WireError::Io("the link's writer is closed".into())
}

async fn write_loop<T: WireTx>(
    tx: &tokio::sync::Mutex<Option<T>>,
    out_rx: &mut mpsc::Receiver<Bytes>,
    ctrl_rx: &mut mpsc::Receiver<Ctrl>,
    handler: &Mutex<Option<Handled>>,
    shared: &Shared,
    config: &LinkConfig,
) -> Outcome {
    let mut buf = BytesMut::with_capacity(256);
    loop {
        tokio::select! {
            biased;
            Some(c) = ctrl_rx.recv() => {
                shared.direct_used.store(false, Ordering::Relaxed);
                if let Some(o) = close_requested(shared) {
                    // Frames queued before the close go first (a stuck write is cut short by
                    // the timer's own close check).
                    while let Ok(bytes) = out_rx.try_recv() {
                        if let Err(e) = write_batch(tx, out_rx, bytes, shared).await {
                            return Outcome::transport(&e);
                        }
                    }
                    return o;
                }
                let f = match c {
                    Ctrl::Ping { seq, sent_at_micros } => Frame::Ping { seq, sent_at_micros },
                    Ctrl::Pong { seq, echo } => Frame::Pong { seq, echo },
                    Ctrl::CloseRequested => continue,
                    Ctrl::HandlerGiven => {
                        adopt(shared, handler);
                        continue;
                    }
                };
                if f.encode(&mut buf, config.max_frame_len).is_err() {
                    continue;
                }
                let sent = match tx.lock().await.as_mut() {
                    Some(w) => w.send(buf.split().freeze(), f.kind()).await,
                    None => Err(writer_gone()),
                };
                if let Err(e) = sent {
                    return Outcome::transport(&e);
                }
            }
            out = out_rx.recv() => match out {
                Some(bytes) => {
                    shared.direct_used.store(false, Ordering::Relaxed);
                    if let Err(e) = write_batch(tx, out_rx, bytes, shared).await {
                        return Outcome::transport(&e);
                    }
                }
                None => return Outcome::local(CloseCode::NORMAL, "link dropped"),
            },
        }
    }
}

/// Frames written before one flush when the send queue has a backlog.
const MAX_BATCH: usize = 64;

/// Writes `first` and whatever else is already queued (up to [`MAX_BATCH`]), then flushes once.
/// The frames are counted out of [`Shared::queued`] once written, so that senders write
/// directly only when nothing queued before them is still to be written.
async fn write_batch<T: WireTx>(
    tx: &tokio::sync::Mutex<Option<T>>,
    out_rx: &mut mpsc::Receiver<Bytes>,
    first: Bytes,
    shared: &Shared,
) -> Result<(), WireError> {
    let mut slot = tx.lock().await;
    let tx = slot.as_mut().ok_or_else(writer_gone)?;
    let kind = frame::encode_raw_kind(&first);
    tx.feed(first, kind).await?;
    let mut n = 1;
    while n < MAX_BATCH {
        let Ok(next) = out_rx.try_recv() else { break };
        let kind = frame::encode_raw_kind(&next);
        tx.feed(next, kind).await?;
        n += 1;
    }
    let flushed = tx.flush().await;
    shared.queued.fetch_sub(n, Ordering::Release);
    shared.direct_ok.store(n == 1, Ordering::Relaxed);
    flushed
}

/// A link's writer, for senders that find the link idle: they write and flush themselves,
/// saving the switch to the driver's task. Only for transports whose writes are cancel-safe
/// ([`WireTx::DIRECT`]).
pub(crate) trait DirectWrite: Send + Sync + std::fmt::Debug + 'static {
    /// A future writing `frame` and flushing, if no one else is writing; `None` otherwise.
    /// It ends with an error once `closed` says the link has closed, even if the peer stopped
    /// reading and the write is stuck (the writer is then dropped, closing the connection).
    fn try_write(
        &self,
        frame: Bytes,
        kind: FrameKind,
        closed: watch::Receiver<Option<CloseReason>>,
    ) -> Option<DirectFuture>;
}

/// See [`DirectWrite::try_write`].
pub(crate) type DirectFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), WireError>> + Send>>;

/// The writer, shared by the driver and direct senders; `None` once the driver has closed it.
type SharedTx<T> = Arc<tokio::sync::Mutex<Option<T>>>;

/// [`DirectWrite`] over a link's shared writer.
struct Direct<T>(SharedTx<T>);

impl<T> std::fmt::Debug for Direct<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Direct")
    }
}

impl<T: WireTx> DirectWrite for Direct<T> {
    fn try_write(
        &self,
        frame: Bytes,
        kind: FrameKind,
        mut closed: watch::Receiver<Option<CloseReason>>,
    ) -> Option<DirectFuture> {
        let mut slot = Arc::clone(&self.0).try_lock_owned().ok()?;
        Some(Box::pin(async move {
            let written = {
                let tx = slot.as_mut().ok_or_else(writer_gone)?;
                let write = async {
                    tx.feed(frame, kind).await?;
                    tx.flush().await
                };
                tokio::select! {
                    biased;
                    r = write => Some(r),
                    _ = closed.wait_for(Option::is_some) => None,
                }
            };
            match written {
                Some(r) => r,
                None => {
                    // The driver has ended without the writer (this write held it): drop it
                    // here, which ends the connection.
                    drop(slot.take());
                    Err(writer_gone())
                }
            }
        }))
    }
}

/// Hands a routed frame to the handler as it arrived, undecoded, if the handler wants it so
/// ([`crate::FrameHandler::wants_raw`]); `None` when the frame takes the decoding path instead.
fn pass_raw(
    bytes: &Bytes,
    handler: &Mutex<Option<Handled>>,
    shared: &Shared,
    config: &LinkConfig,
) -> Option<Result<(), Outcome>> {
    // Unrouted frames (gossip, heartbeats) never take the lock here.
    let route = frame::peek_route(bytes).ok()??;
    adopt(shared, handler);
    let mut slot = lock(handler);
    let handled = slot.as_mut()?;
    // As for `on_frame`: a handler that panics closes the link.
    let wanted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handled.handler.wants_raw(&route)));
    match wanted {
        Ok(false) => return None,
        Ok(true) => {}
        Err(_) => return Some(Err(Outcome::local(CloseCode::INTERNAL_ERROR, "the frame handler panicked"))),
    }
    if let Err(e) = frame::validate_routed(bytes, config.max_frame_len) {
        return Some(Err(Outcome::invalid(&e)));
    }
    let raw = bytes.clone();
    let handled_ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handled.handler.on_raw(route, raw)));
    if handled_ok.is_err() {
        return Some(Err(Outcome::local(CloseCode::INTERNAL_ERROR, "the frame handler panicked")));
    }
    Some(Ok(()))
}

async fn read_loop<R: WireRx>(
    rx: &mut R,
    in_tx: &mpsc::Sender<Result<Frame, LinkError>>,
    handler: &Mutex<Option<Handled>>,
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
        shared.direct_used.store(false, Ordering::Relaxed);
        if let Some(passed) = pass_raw(&bytes, handler, shared, config) {
            match passed {
                Ok(()) => continue,
                Err(o) => return o,
            }
        }
        let frame = match frame::decode(&bytes, config.max_frame_len) {
            Ok(f) => f,
            Err(e) => return Outcome::invalid(&e),
        };
        match frame {
            Frame::Ping { seq, sent_at_micros } => {
                if shared.ctrl.try_send(Ctrl::Pong { seq, echo: sent_at_micros }).is_err() {
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
                adopt(shared, handler);
                if let Some(handled) = lock(handler).as_mut() {
                    // A handler that panics is a bug on this node: the link closes (and the
                    // handler hears `on_closed`) instead of the driver dying silently.
                    let handled_ok =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handled.handler.on_frame(app)));
                    if handled_ok.is_err() {
                        return Outcome::local(CloseCode::INTERNAL_ERROR, "the frame handler panicked");
                    }
                    continue;
                }
                clock.reader_blocked.store(true, Ordering::Relaxed);
                let delivered = in_tx.send(Ok(app)).await;
                clock.reader_blocked.store(false, Ordering::Relaxed);
                clock.touch();
                if delivered.is_err() {
                    return Outcome::local(CloseCode::NORMAL, "receiver dropped");
                }
                // A handler given while this frame waited for room takes it from the queue.
                adopt(shared, handler);
                if let Some(handled) = lock(handler).as_mut() {
                    handled.drain();
                }
            }
        }
    }
}

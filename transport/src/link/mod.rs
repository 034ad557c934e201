//! The [`Link`]: one API for a framed, authenticated pipe to a peer node, whatever carries it
//! (WebSocket over TLS, QUIC, or memory).
//!
//! A link is established by a transport (see [`crate::ws`], [`crate::quic`], [`crate::memory`]),
//! which performs the hello exchange ([`handshake`]) and then hands the connection to the
//! transport-independent driver ([`driver`]) that owns heartbeats, limits and closing. This file
//! holds the public types only.

pub(crate) mod driver;
pub(crate) mod handshake;
pub(crate) mod wire;

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, watch};

pub use handshake::{HandshakeError, HelloCheck, LinkSetup};

use crate::NodeId;
use crate::frame::{self, Close, CloseCode, EncodeError, Frame, FrameKind, HEADER_LEN, Route};

/// Tunables of a link. Plain fields; [`LinkConfig::default`] suits a LAN.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Largest frame accepted or sent, header included (default 16 MiB).
    pub max_frame_len: usize,
    /// Frames queued for sending before `send` waits (back-pressure) and `try_send` fails.
    pub send_queue: usize,
    /// Frames received and not yet taken by `recv` before the link stops reading.
    pub recv_queue: usize,
    /// How often a ping is sent (default 500 ms).
    pub heartbeat_interval: Duration,
    /// How long the link may receive nothing before it is closed as frozen (default 2.5 s, so a
    /// frozen peer is detected within 3 s).
    pub idle_timeout: Duration,
    /// Limit on connecting plus the hello exchange (default 10 s).
    pub handshake_timeout: Duration,
    /// How long closing may spend telling the peer why (default 1 s).
    pub close_timeout: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            max_frame_len: frame::DEFAULT_MAX_FRAME_LEN,
            send_queue: 256,
            recv_queue: 256,
            heartbeat_interval: Duration::from_millis(500),
            idle_timeout: Duration::from_millis(2500),
            handshake_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(1),
        }
    }
}

/// Which transport carries a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransportKind {
    /// WebSocket over TLS.
    Wss,
    /// WebSocket without TLS (development only).
    Ws,
    /// QUIC.
    Quic,
    /// In-process channels.
    Memory,
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TransportKind::Wss => "wss",
            TransportKind::Ws => "ws",
            TransportKind::Quic => "quic",
            TransportKind::Memory => "memory",
        })
    }
}

/// What a link knows about its peer, learned from its hello and the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's node id.
    pub node_id: NodeId,
    /// The peer's incarnation.
    pub incarnation: u64,
    /// Where the peer says it can be dialled.
    pub listen_addrs: Vec<String>,
    /// The peer's feature bits.
    pub features: u32,
    /// The transport.
    pub transport: TransportKind,
    /// The peer's socket address (none in memory).
    pub remote_addr: Option<SocketAddr>,
    /// Our socket address (none in memory).
    pub local_addr: Option<SocketAddr>,
}

/// Which side ended a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initiator {
    /// This node (a `close` call, a timeout, or a bad frame from the peer).
    Local,
    /// The peer (it sent a close frame).
    Remote,
}

/// Why a link closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    /// The code.
    pub code: CloseCode,
    /// Human-readable detail.
    pub reason: String,
    /// Which side decided.
    pub initiator: Initiator,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let by = match self.initiator {
            Initiator::Local => "locally",
            Initiator::Remote => "by the peer",
        };
        write!(f, "closed {by}: {} ({})", self.code, self.reason)
    }
}

/// The link is closed; received from [`LinkReceiver::recv`] once, when it closed abnormally.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The link closed for this reason.
    #[error("link {0}")]
    Closed(CloseReason),
}

/// Why a frame was not queued by [`LinkSender::send`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The link is closed.
    #[error("link closed")]
    Closed,
    /// The frame cannot be encoded (too large, or a field too long).
    #[error("cannot send frame: {0}")]
    Encode(#[from] EncodeError),
    /// Hello, ping, pong and close frames belong to the link itself.
    #[error("{0:?} frames are sent by the link itself")]
    NotAllowed(FrameKind),
    /// Raw bytes given to `send_raw` are not a valid frame header.
    #[error("raw frame is invalid: {0}")]
    InvalidRaw(#[from] frame::DecodeError),
}

/// Why a frame was not queued by [`LinkSender::try_send`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrySendError {
    /// The send queue is full; the frame was not sent.
    #[error("send queue full")]
    Full,
    /// Any other reason, as for `send`.
    #[error(transparent)]
    Send(#[from] SendError),
}

/// Identifies one link among all the links this process opened: two senders with the same id
/// send on the same connection. Ids are never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId(u64);

impl LinkId {
    fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        LinkId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl fmt::Display for LinkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "link#{}", self.0)
    }
}

/// State shared by the halves of a link and its driver.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) id: LinkId,
    pub(crate) peer: PeerInfo,
    /// Smoothed RTT in microseconds; 0 until the first pong.
    pub(crate) rtt_micros: AtomicU64,
    /// Set once, by the driver, when the link has closed.
    pub(crate) closed: watch::Sender<Option<CloseReason>>,
    /// Set by `close`: asks the driver to close with this frame.
    pub(crate) close_req: watch::Sender<Option<Close>>,
    /// The driver's control queue: pongs to send, and the nudges that a close was asked for or
    /// a handler given.
    pub(crate) ctrl: mpsc::Sender<driver::Ctrl>,
    pub(crate) max_frame_len: usize,
    /// A [`FrameHandler`] given by [`LinkReceiver::into_handler`], until the driver takes it.
    pub(crate) handoff: Mutex<Handoff>,
    /// `handoff` holds a handler the driver has not taken yet.
    pub(crate) handoff_pending: AtomicBool,
    /// The writer, for senders that find the link idle (transports with cancel-safe writes).
    pub(crate) direct: Option<Arc<dyn driver::DirectWrite>>,
    /// Frames queued for the driver and not yet written: a sender writes directly only when
    /// this is zero, so it never overtakes a frame queued before it.
    pub(crate) queued: AtomicUsize,
    /// A sender wrote directly since the driver last ran. Further sends until then go through
    /// the queue, so a burst of sends still becomes one batch (one write) in the driver: only
    /// the first frame of a burst is written on its own.
    pub(crate) direct_used: AtomicBool,
    /// The driver's last batch was a single frame: the link is not under a pipelined load.
    /// Under load (batches of several frames) senders queue, so every write stays a batch.
    pub(crate) direct_ok: AtomicBool,
    /// Frames still queued when the link closed, never written: set by the driver before it
    /// reports the close, taken by [`LinkSender::take_unsent`].
    pub(crate) unsent: Mutex<Vec<Bytes>>,
}

/// The hand-over of a [`FrameHandler`] from [`LinkReceiver::into_handler`] to the driver.
#[derive(Default)]
pub(crate) struct Handoff {
    /// The driver has stopped: it will take nothing more.
    pub(crate) done: bool,
    /// The handler, with the receiving queue whose frames it must get first.
    pub(crate) waiting: Option<Handled>,
}

impl fmt::Debug for Handoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handoff").field("done", &self.done).field("waiting", &self.waiting.is_some()).finish()
    }
}

/// A handler and the queue it takes over from.
pub(crate) struct Handled {
    pub(crate) handler: Box<dyn FrameHandler>,
    pub(crate) queued: mpsc::Receiver<Result<Frame, LinkError>>,
}

impl Handled {
    /// Hands the handler every frame still queued, in order.
    pub(crate) fn drain(&mut self) {
        while let Ok(item) = self.queued.try_recv() {
            // A queued `Err` is the close reason, which `on_closed` gives.
            if let Ok(frame) = item {
                self.handler.on_frame(frame);
            }
        }
    }
}

/// Takes a link's frames inside the link's own task, as they are decoded, instead of through
/// [`LinkReceiver::recv`]: no queue and no task switch per frame. See
/// [`LinkReceiver::into_handler`].
///
/// Every method runs on the link's driver task and must not block: a handler that has slow work
/// to do spawns it. While a method runs the link reads nothing more, so a handler is the link's
/// back-pressure, as a slow `recv` loop is.
pub trait FrameHandler: Send + 'static {
    /// One frame from the peer (an application frame: call, reply, cancel, event or gossip).
    fn on_frame(&mut self, frame: Frame);

    /// Whether a routed frame (call, reply, cancel, event) with `route` should come to
    /// [`FrameHandler::on_raw`] as the bytes it arrived in, instead of decoded to
    /// [`FrameHandler::on_frame`]: a switch passes such frames on without decoding and encoding
    /// them again. Asked before the frame is decoded. The default: never.
    fn wants_raw(&mut self, route: &Route) -> bool {
        let _ = route;
        false
    }

    /// A routed frame [`FrameHandler::wants_raw`] asked for, as it arrived (header included),
    /// already checked to be one [`frame::decode`] accepts ([`frame::validate_routed`]): a
    /// malformed frame closes the link it came on and never reaches this method. The default
    /// drops it (a handler that asks for raw frames implements this).
    fn on_raw(&mut self, route: Route, raw: Bytes) {
        let _ = (route, raw);
    }

    /// The link has closed, for `reason`; called once, after the last `on_frame`.
    fn on_closed(&mut self, reason: &CloseReason);
}

impl Shared {
    fn rtt(&self) -> Option<Duration> {
        match self.rtt_micros.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    fn request_close(&self, code: CloseCode, reason: &str) {
        self.close_req.send_if_modified(|req| {
            if req.is_some() {
                return false;
            }
            *req = Some(Close { code, reason: reason.to_owned() });
            true
        });
        // If the queue is full the driver still sees the request: it checks after every control
        // message and at every watchdog step.
        if self.ctrl.try_send(driver::Ctrl::CloseRequested).is_err() {
            tracing::trace!("close nudge not queued; the driver's next check sees the request");
        }
    }

    async fn closed(&self) -> CloseReason {
        let mut rx = self.closed.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(r) => r.clone().unwrap_or_else(lost),
            Err(_) => lost(),
        }
    }
}

fn lost() -> CloseReason {
    CloseReason { code: CloseCode::TRANSPORT_ERROR, reason: "link driver stopped".into(), initiator: Initiator::Local }
}

/// The sending half of a link: cheap to clone, shared by every task that sends to the peer.
#[derive(Debug, Clone)]
pub struct LinkSender {
    out: mpsc::Sender<Bytes>,
    shared: Arc<Shared>,
}

impl LinkSender {
    fn encode(&self, frame: &Frame) -> Result<Bytes, SendError> {
        if frame.kind().is_link_control() {
            return Err(SendError::NotAllowed(frame.kind()));
        }
        let mut buf = BytesMut::with_capacity(frame.encoded_len());
        frame.encode(&mut buf, self.shared.max_frame_len)?;
        Ok(buf.freeze())
    }

    fn check_raw(&self, raw: &[u8]) -> Result<(), SendError> {
        let header = frame::peek_header(raw, self.shared.max_frame_len)?
            .ok_or(frame::DecodeError::Truncated { needed: HEADER_LEN, have: raw.len() })?;
        if header.frame_len() != raw.len() {
            return Err(frame::DecodeError::Truncated { needed: header.frame_len(), have: raw.len() }.into());
        }
        if header.kind.is_link_control() {
            return Err(SendError::NotAllowed(header.kind));
        }
        Ok(())
    }

    /// Sends a frame, waiting while the send queue is full (back-pressure). When the link is
    /// idle (nothing queued, nobody writing) and its transport allows it, the frame is
    /// written and flushed from this task, saving the switch to the link's driver; otherwise
    /// it is queued for the driver.
    ///
    /// # Cancel safety
    /// Cancel-safe: if the future is dropped the frame was either sent or queued whole, or not
    /// at all; a direct write cut short leaves the rest buffered for the next write.
    pub async fn send(&self, frame: &Frame) -> Result<(), SendError> {
        let bytes = self.encode(frame)?;
        self.send_bytes(bytes).await
    }

    async fn send_bytes(&self, bytes: Bytes) -> Result<(), SendError> {
        if let Some(direct) = &self.shared.direct
            && self.shared.queued.load(Ordering::Acquire) == 0
            && !self.out.is_closed()
            && self.shared.direct_ok.load(Ordering::Relaxed)
            && !self.shared.direct_used.swap(true, Ordering::Relaxed)
            && let Some(write) =
                direct.try_write(bytes.clone(), frame::encode_raw_kind(&bytes), self.shared.closed.subscribe())
        {
            // The driver's reader notices a broken connection and closes the link.
            return write.await.map_err(|_| SendError::Closed);
        }
        let queued = Queued::count(&self.shared);
        self.out.send(bytes).await.map_err(|_| SendError::Closed)?;
        queued.keep();
        Ok(())
    }

    /// Queues a frame if there is room now; fails with [`TrySendError::Full`] otherwise.
    pub fn try_send(&self, frame: &Frame) -> Result<(), TrySendError> {
        self.try_send_bytes(self.encode(frame)?)
    }

    /// [`LinkSender::try_send`] for an already-encoded frame (one received on another link and
    /// passed on after [`frame::set_hops`], for instance). Its header is checked, as
    /// [`LinkSender::send_raw`] does.
    pub fn try_send_raw(&self, raw: Bytes) -> Result<(), TrySendError> {
        self.check_raw(&raw)?;
        self.try_send_bytes(raw)
    }

    fn try_send_bytes(&self, bytes: Bytes) -> Result<(), TrySendError> {
        let queued = Queued::count(&self.shared);
        self.out.try_send(bytes).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => TrySendError::Full,
            mpsc::error::TrySendError::Closed(_) => SendError::Closed.into(),
        })?;
        queued.keep();
        Ok(())
    }

    /// Sends an already-encoded frame (for example one received on another link, forwarded
    /// after [`frame::set_hops`]) without decoding it again, as [`LinkSender::send`] does. Its
    /// header is checked.
    pub async fn send_raw(&self, raw: Bytes) -> Result<(), SendError> {
        self.check_raw(&raw)?;
        self.send_bytes(raw).await
    }

    /// Asks the link to close, telling the peer `code` and `reason`, and waits until it has.
    pub async fn close(&self, code: CloseCode, reason: &str) -> CloseReason {
        self.shared.request_close(code, reason);
        self.shared.closed().await
    }

    /// Waits until the link is closed and says why.
    pub async fn closed(&self) -> CloseReason {
        self.shared.closed().await
    }

    /// Why the link closed, if it has.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.shared.closed.borrow().clone()
    }

    /// The longest frame (header included) this link sends or accepts.
    pub fn max_frame_len(&self) -> usize {
        self.shared.max_frame_len
    }

    /// The peer.
    pub fn peer(&self) -> &PeerInfo {
        &self.shared.peer
    }

    /// The smoothed round-trip time from heartbeats; `None` before the first pong.
    pub fn rtt(&self) -> Option<Duration> {
        self.shared.rtt()
    }

    /// This link's id: the same for every clone of this sender, and for its receiver.
    pub fn id(&self) -> LinkId {
        self.shared.id
    }

    /// Whether the link has closed, or is closing and takes nothing more (nothing sent on it
    /// from now on arrives). A closing link may still be reading what its peer wrote.
    pub fn is_closed(&self) -> bool {
        self.out.is_closed() || self.shared.closed.borrow().is_some()
    }

    /// The frames that were still in the send queue when the link closed, as encoded, in the
    /// order they were queued: the peer never got them, so they may be sent again elsewhere
    /// (a call among them surely did not run). At most the send queue's length. The first call
    /// after the close takes them all; later calls, and calls while the link is open, get none.
    ///
    /// A frame already handed to the transport when the connection broke is not among them:
    /// whether the peer got it is unknown.
    pub fn take_unsent(&self) -> Vec<Bytes> {
        std::mem::take(&mut *driver::lock(&self.shared.unsent))
    }
}

/// One frame counted in [`Shared::queued`] while it is being queued; uncounted again unless
/// it made it into the queue (the driver uncounts it once written).
struct Queued<'a> {
    shared: &'a Shared,
    kept: bool,
}

impl<'a> Queued<'a> {
    fn count(shared: &'a Shared) -> Self {
        shared.queued.fetch_add(1, Ordering::AcqRel);
        Queued { shared, kept: false }
    }

    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The receiving half of a link.
#[derive(Debug)]
pub struct LinkReceiver {
    inbound: mpsc::Receiver<Result<Frame, LinkError>>,
    shared: Arc<Shared>,
}

impl LinkReceiver {
    /// The next frame from the peer. After an abnormal close it yields the reason once as
    /// `Err`; then (and after an orderly close) `None`.
    ///
    /// # Cancel safety
    /// Cancel-safe: no frame is lost if the future is dropped.
    pub async fn recv(&mut self) -> Option<Result<Frame, LinkError>> {
        self.inbound.recv().await
    }

    /// The peer.
    pub fn peer(&self) -> &PeerInfo {
        &self.shared.peer
    }

    /// From now on hands every frame to `handler` inside the link's task, first those already
    /// queued, in order; then `on_closed` once the link has closed (at once, if it already has).
    /// This saves the queue and the task switch a `recv` loop costs per frame.
    pub fn into_handler(self, handler: Box<dyn FrameHandler>) {
        let LinkReceiver { inbound, shared } = self;
        let mut handled = Handled { handler, queued: inbound };
        let mut handoff = driver::lock(&shared.handoff);
        if handoff.done {
            drop(handoff);
            handled.drain();
            let reason = shared.closed.borrow().clone().unwrap_or_else(lost);
            handled.handler.on_closed(&reason);
            return;
        }
        handoff.waiting = Some(handled);
        shared.handoff_pending.store(true, Ordering::Release);
        drop(handoff);
        // The driver also takes the handler at its next frame; this makes it take it (and the
        // frames queued so far) now.
        if shared.ctrl.try_send(driver::Ctrl::HandlerGiven).is_err() {
            tracing::trace!("handler nudge not queued; the driver takes it at its next frame");
        }
    }
}

/// A link to a peer node: a [`LinkSender`] and a [`LinkReceiver`]. Dropping both closes it.
#[derive(Debug)]
pub struct Link {
    sender: LinkSender,
    receiver: LinkReceiver,
}

impl Link {
    /// Two in-memory links connected to each other, with default config and random node ids,
    /// for tests of the layers above. Must be called inside a tokio runtime.
    pub fn pair() -> (Link, Link) {
        crate::memory::pair_unchecked(&LinkConfig::default())
    }

    /// Splits into the sending and receiving halves.
    pub fn split(self) -> (LinkSender, LinkReceiver) {
        (self.sender, self.receiver)
    }

    /// The sending half (clone it to send from several tasks).
    pub fn sender(&self) -> &LinkSender {
        &self.sender
    }

    /// See [`LinkSender::send`].
    pub async fn send(&self, frame: &Frame) -> Result<(), SendError> {
        self.sender.send(frame).await
    }

    /// See [`LinkSender::try_send`].
    pub fn try_send(&self, frame: &Frame) -> Result<(), TrySendError> {
        self.sender.try_send(frame)
    }

    /// See [`LinkReceiver::recv`].
    pub async fn recv(&mut self) -> Option<Result<Frame, LinkError>> {
        self.receiver.recv().await
    }

    /// See [`LinkSender::close`].
    pub async fn close(&self, code: CloseCode, reason: &str) -> CloseReason {
        self.sender.close(code, reason).await
    }

    /// See [`LinkSender::closed`].
    pub async fn closed(&self) -> CloseReason {
        self.sender.closed().await
    }

    /// See [`LinkSender::close_reason`].
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.sender.close_reason()
    }

    /// The peer.
    pub fn peer(&self) -> &PeerInfo {
        self.sender.peer()
    }

    /// See [`LinkSender::rtt`].
    pub fn rtt(&self) -> Option<Duration> {
        self.sender.rtt()
    }
}

impl PeerInfo {
    /// Peer info before the hello: transport facts only.
    pub(crate) fn connecting(
        transport: TransportKind,
        remote_addr: Option<SocketAddr>,
        local_addr: Option<SocketAddr>,
    ) -> Self {
        PeerInfo {
            node_id: NodeId::ZERO,
            incarnation: 0,
            listen_addrs: Vec::new(),
            features: 0,
            transport,
            remote_addr,
            local_addr,
        }
    }
}

//! QUIC links (quinn): an endpoint on the node's UDP port that accepts and dials links.
//!
//! Stream layout (see `docs/protocol.md`): each side opens one ordered control stream (type byte
//! 0) for hello, ping, pong, gossip and close, and one unidirectional stream per call, reply,
//! cancel or event (type byte 1), so a large body never holds up later small frames. Small
//! routed frames that were queued together, as many as fit in one datagram, share a batch
//! stream (type byte 2) when the peer reads them: they travel in the same packet either way, so
//! sharing a stream costs them no independence and saves quinn a stream each.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::Semaphore;

#[cfg(unix)]
mod socket;

use crate::accept::Acceptor;
use crate::dial::{DialError, Dialer, PeerUrl};
use crate::frame::{self, DecodeError, FrameKind, HEADER_LEN};
use crate::link::wire::{WireError, WireRx, WireTx};
use crate::link::{PeerInfo, TransportKind};
use crate::tls::{CertResolver, ClientTls, TlsError, quic_server_config};

const STREAM_CONTROL: u8 = 0;
const STREAM_FRAME: u8 = 1;
const STREAM_BATCH: u8 = 2;
/// The most bytes a batch stream may carry: the sender fills one datagram at most, far less.
const MAX_BATCH_BYTES: usize = 64 * 1024;
/// Frames larger than this are written by a separate task so the link's writer moves on.
const SPAWN_WRITE_ABOVE: usize = 64 * 1024;
/// Large frames being written at once per link.
const MAX_LARGE_WRITES: usize = 16;
/// Frame streams read at once per link; bounds the memory a peer can make us buffer.
const MAX_STREAM_READERS: usize = 8;
/// Streams of the peer's that may be open at once (QUIC's stream credit), each way. A stream
/// holds one until its reader has read it all, so a stream not yet acknowledged is always
/// among the last this many opened (see [`QuicTx::written`]).
const MAX_UNI_STREAMS: u32 = 1024;
/// Requested UDP socket buffer size (the kernel may cap it at net.core.[rw]mem_max).
pub const UDP_BUFFER_BYTES: usize = 8 * 1024 * 1024;
/// The largest UDP payload a QUIC link sends, once the path has shown it carries it.
///
/// Links start at QUIC's 1,200 bytes and probe upwards (path MTU discovery, RFC 8899, as quinn
/// does it) as far as this. On an Ethernet path the search stops near the path's 1,500 bytes;
/// on jumbo-frame networks and loopback it goes on, so that a 4 KiB frame travels in one
/// datagram instead of three. This is a jumbo frame's payload (9,000 less 40 bytes of IPv6 and 8
/// of UDP header); quinn's default stops at 1,452. A probe the path drops costs one lost probe,
/// never a lost frame.
///
/// Not larger, although loopback carries 65 KB: quinn's congestion control and pacing keep a
/// whole datagram's room free before every send, however small the packet, and with 65 KB
/// datagrams many small calls in flight went a third slower (97k calls/s at 256 in flight
/// against 161k; at this size, no difference beyond the noise).
///
/// Unix only, where the endpoint's socket (`socket.rs`) splits a send batch the kernel would
/// refuse at this size; elsewhere quinn's own socket and default bound (1,452) stay.
#[cfg(unix)]
pub const MAX_UDP_PAYLOAD: u16 = 8_952;
/// See the Unix version: quinn's default bound, where quinn's own socket sends.
#[cfg(not(unix))]
pub const MAX_UDP_PAYLOAD: u16 = 1_452;

/// Why a QUIC endpoint could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QuicError {
    /// Binding or configuring the UDP socket failed.
    #[error("UDP socket {addr}: {source}")]
    Socket {
        /// The address.
        addr: SocketAddr,
        /// The failure.
        source: std::io::Error,
    },
    /// The TLS configuration is not usable for QUIC.
    #[error("QUIC TLS: {0}")]
    Tls(String),
    /// quinn refused a setting.
    #[error("QUIC configuration: {0}")]
    Config(String),
}

impl From<TlsError> for QuicError {
    fn from(e: TlsError) -> Self {
        QuicError::Tls(e.to_string())
    }
}

/// A QUIC endpoint: one UDP socket that accepts links (if given a certificate) and dials them.
#[derive(Debug, Clone)]
pub struct QuicEndpoint {
    endpoint: quinn::Endpoint,
    client: Option<quinn::ClientConfig>,
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_uni_streams(MAX_UNI_STREAMS.into())
        .max_concurrent_bidi_streams(0u32.into())
        .stream_receive_window((2u32 * 1024 * 1024).into())
        .receive_window((16u32 * 1024 * 1024).into())
        .send_window(16 * 1024 * 1024)
        .keep_alive_interval(None)
        .mtu_discovery_config(Some({
            let mut mtu = quinn::MtuDiscoveryConfig::default();
            mtu.upper_bound(MAX_UDP_PAYLOAD);
            mtu
        }))
        .max_idle_timeout(Some(
            Duration::from_secs(30).try_into().unwrap_or(quinn::IdleTimeout::from(quinn::VarInt::from_u32(30_000))),
        ));
    Arc::new(t)
}

fn udp_socket(addr: SocketAddr) -> Result<std::net::UdpSocket, QuicError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |source| QuicError::Socket { addr, source };
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    if addr.is_ipv6() {
        // Accept IPv4 too where the platform allows it.
        if let Err(e) = sock.set_only_v6(false) {
            tracing::debug!(error = %e, "dual-stack UDP socket unavailable");
        }
    }
    for (what, r) in [
        ("receive", sock.set_recv_buffer_size(UDP_BUFFER_BYTES)),
        ("send", sock.set_send_buffer_size(UDP_BUFFER_BYTES)),
    ] {
        if let Err(e) = r {
            tracing::debug!(error = %e, "could not enlarge the UDP {what} buffer");
        }
    }
    sock.bind(&addr.into()).map_err(err)?;
    let got = sock.recv_buffer_size().unwrap_or(0);
    if got < UDP_BUFFER_BYTES / 2 {
        tracing::info!(
            requested = UDP_BUFFER_BYTES,
            got,
            "UDP receive buffer is small; raise net.core.rmem_max for QUIC under load"
        );
    }
    Ok(sock.into())
}

impl QuicEndpoint {
    /// Binds `addr` (use the node's TCP port number). With `server`, the endpoint accepts links
    /// presenting that resolver's certificate (the same one HTTPS serves); with `client`, it can
    /// dial.
    pub fn bind(
        addr: SocketAddr,
        server: Option<Arc<CertResolver>>,
        client: Option<&ClientTls>,
    ) -> Result<Self, QuicError> {
        let server_config = match server {
            Some(resolver) => {
                let tls = QuicServerConfig::try_from(quic_server_config(resolver)?)
                    .map_err(|e| QuicError::Tls(e.to_string()))?;
                let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(tls));
                cfg.transport_config(transport_config());
                Some(cfg)
            }
            None => None,
        };
        let client = match client {
            Some(c) => {
                let tls = QuicClientConfig::try_from(Arc::clone(&c.quic)).map_err(|e| QuicError::Tls(e.to_string()))?;
                let mut cfg = quinn::ClientConfig::new(Arc::new(tls));
                cfg.transport_config(transport_config());
                Some(cfg)
            }
            None => None,
        };
        let runtime = quinn::default_runtime().ok_or_else(|| QuicError::Tls("no async runtime for quinn".into()))?;
        let err = |source| QuicError::Socket { addr, source };
        #[cfg(unix)]
        let socket = Arc::new(socket::ReadWatchedSocket::new(udp_socket(addr)?).map_err(err)?);
        #[cfg(not(unix))]
        let socket = runtime.wrap_udp_socket(udp_socket(addr)?).map_err(err)?;
        let mut endpoint_config = quinn::EndpointConfig::default();
        // Datagrams as large as links may send (quinn's default takes no more than Ethernet's).
        endpoint_config.max_udp_payload_size(MAX_UDP_PAYLOAD).map_err(|e| QuicError::Config(e.to_string()))?;
        let endpoint =
            quinn::Endpoint::new_with_abstract_socket(endpoint_config, server_config, socket, runtime).map_err(err)?;
        Ok(QuicEndpoint { endpoint, client })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Accepts incoming links until the endpoint closes, handing them to `acceptor`. Spawn it.
    #[must_use = "the accept loop does nothing unless awaited or spawned"]
    pub async fn serve(self, acceptor: Acceptor) {
        let local = self.endpoint.local_addr().ok();
        while let Some(incoming) = self.endpoint.accept().await {
            let Some(permit) = acceptor.try_permit() else {
                incoming.refuse();
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let config = acceptor.setup().config.clone();
                let deadline = tokio::time::Instant::now() + config.handshake_timeout;
                let remote = incoming.remote_address();
                let conn = match tokio::time::timeout_at(deadline, async { incoming.accept()?.await }).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %e, "QUIC handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%remote, "QUIC handshake timed out");
                        return;
                    }
                };
                let (tx, rx) = wire(conn, config.max_frame_len);
                let peer = PeerInfo::connecting(TransportKind::Quic, Some(remote), local);
                acceptor.establish(tx, rx, peer, permit, deadline).await;
            });
        }
    }

    pub(crate) async fn dial(
        &self,
        addr: SocketAddr,
        url: &PeerUrl,
        dialer: &Dialer,
    ) -> Result<crate::Link, DialError> {
        let client =
            self.client.clone().ok_or(DialError::NotAllowed("this QUIC endpoint has no client TLS configuration"))?;
        let quic_err = |reason: String| DialError::Quic { addr, reason };
        let conn = self
            .endpoint
            .connect_with(client, addr, &url.host)
            .map_err(|e| quic_err(e.to_string()))?
            .await
            .map_err(|e| quic_err(e.to_string()))?;
        let (tx, rx) = wire(conn, dialer.setup().config.max_frame_len);
        let peer = PeerInfo::connecting(TransportKind::Quic, Some(addr), self.local_addr().ok());
        dialer.finish(tx, rx, peer, url).await
    }

    /// Closes every connection of this endpoint.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"endpoint closed");
    }

    /// Waits until every connection of the endpoint has finished closing (after
    /// [`QuicEndpoint::close`]), so that once the last handle is dropped the UDP port is free.
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

fn wire(conn: quinn::Connection, max_frame_len: usize) -> (QuicTx, QuicRx) {
    let rx = QuicRx {
        conn: conn.clone(),
        max: max_frame_len,
        readers: FuturesUnordered::new(),
        accepting: None,
        control: None,
        ended: None,
        held_close: None,
        batched: VecDeque::new(),
    };
    let tx = QuicTx {
        conn,
        control: None,
        large: Arc::new(Semaphore::new(MAX_LARGE_WRITES)),
        control_out: VecDeque::new(),
        routed_out: VecDeque::new(),
        stream_out: None,
        batches: false,
        written: VecDeque::new(),
        large_written: Arc::default(),
        close_orderly: None,
    };
    (tx, rx)
}

/// The sending half. Its writes are cancel-safe ([`WireTx::DIRECT`]): a frame is queued here
/// first and leaves the queue only as quinn takes its bytes (quinn's `write_chunks` takes some
/// or none), so a write dropped part-way leaves the rest for the next one and never splits a
/// frame on the control stream. The queues hold more than the frame being written only after
/// such a drop (one frame per dropped write).
struct QuicTx {
    conn: quinn::Connection,
    control: Option<quinn::SendStream>,
    large: Arc<Semaphore>,
    /// Control-stream bytes not yet taken by quinn (the stream's type byte, then frames).
    control_out: VecDeque<Bytes>,
    /// Routed frames waiting for a stream of their own.
    routed_out: VecDeque<Bytes>,
    /// A frame or batch stream opened and not yet fully written: its type byte and frames.
    stream_out: Option<(quinn::SendStream, Vec<Bytes>)>,
    /// The peer reads batch streams ([`frame::FEATURE_QUIC_BATCHES`] in its hello).
    batches: bool,
    /// The frame and batch streams written, newest last, at most [`MAX_UNI_STREAMS`] (older ones
    /// were acknowledged: see there). The shutdown ends the connection only once the peer has
    /// acknowledged each. quinn drops what is unacknowledged when a connection closes, and the
    /// peer cannot wait for a stream none of whose bytes reached it (say the frame written last
    /// before the close, in a datagram lost and sent again after it): without this, that frame
    /// was lost although the close was orderly.
    written: VecDeque<quinn::SendStream>,
    /// The same for the large frames written by tasks of their own.
    large_written: Arc<std::sync::Mutex<Vec<quinn::SendStream>>>,
    /// Whether the close frame sent, if any, was orderly.
    close_orderly: Option<bool>,
}

fn io_err(e: impl std::fmt::Display) -> WireError {
    WireError::Io(format!("quic: {e}"))
}

impl QuicTx {
    /// Hands every queued frame to quinn, in order per stream. Cancel-safe: each await either
    /// makes progress that is recorded in `self` at once, or none.
    async fn write_queued(&mut self) -> Result<(), WireError> {
        if !self.control_out.is_empty() {
            let control = match &mut self.control {
                Some(s) => s,
                None => {
                    let s = self.conn.open_uni().await.map_err(io_err)?;
                    self.control_out.push_front(Bytes::from_static(&[STREAM_CONTROL]));
                    self.control.insert(s)
                }
            };
            while !self.control_out.is_empty() {
                control.write_chunks(self.control_out.make_contiguous()).await.map_err(io_err)?;
                while self.control_out.front().is_some_and(Bytes::is_empty) {
                    self.control_out.pop_front();
                }
            }
        }
        loop {
            if let Some((stream, chunks)) = &mut self.stream_out {
                while chunks.iter().any(|c| !c.is_empty()) {
                    stream.write_chunks(chunks).await.map_err(io_err)?;
                }
                let finished = stream.finish().map_err(io_err);
                if let Some((stream, _)) = self.stream_out.take() {
                    if self.written.len() >= MAX_UNI_STREAMS as usize {
                        self.written.pop_front();
                    }
                    self.written.push_back(stream);
                }
                finished?;
            }
            let Some(len) = self.routed_out.front().map(Bytes::len) else { return Ok(()) };
            if len > SPAWN_WRITE_ABOVE {
                // A large frame is written by a task of its own, so the link's writer moves on.
                let permit = Arc::clone(&self.large).acquire_owned().await.map_err(io_err)?;
                let mut stream = self.conn.open_uni().await.map_err(io_err)?;
                let Some(frame) = self.routed_out.pop_front() else { return Ok(()) };
                let written = Arc::clone(&self.large_written);
                tokio::spawn(async move {
                    let r = async {
                        stream
                            .write_all_chunks(&mut [Bytes::from_static(&[STREAM_FRAME]), frame])
                            .await
                            .map_err(io_err)?;
                        stream.finish().map_err(io_err)
                    };
                    match r.await {
                        Err(e) => tracing::debug!(error = %e, "large QUIC frame not delivered"),
                        Ok(()) => {
                            let mut written = written.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                            // Acknowledged ones go first; the rest are at most the peer's credit.
                            if written.len() >= MAX_LARGE_WRITES {
                                written.retain(|s| s.stopped().now_or_never().is_none());
                            }
                            written.push(stream);
                        }
                    }
                    drop(permit);
                });
                continue;
            }
            let stream = self.conn.open_uni().await.map_err(io_err)?;
            let chunks = match self.take_batch() {
                Some(batch) => batch,
                None => {
                    let Some(frame) = self.routed_out.pop_front() else { return Ok(()) };
                    vec![Bytes::from_static(&[STREAM_FRAME]), frame]
                }
            };
            self.stream_out = Some((stream, chunks));
        }
    }

    /// Waits until the peer has acknowledged every frame and batch stream written so far (see
    /// [`QuicTx::written`]): large frames still being written first, then each stream's
    /// acknowledgement (at once for most, long acknowledged). The caller bounds the wait.
    /// Cancel-safe: a stream leaves the list once acknowledged.
    async fn wait_acknowledged(&mut self) {
        let _writes_done = self.large.acquire_many(MAX_LARGE_WRITES as u32).await;
        let large = std::mem::take(&mut *self.large_written.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        self.written.extend(large);
        while let Some(stream) = self.written.front() {
            // An error (the connection ended, the stream was stopped) ends the wait for it too.
            let _acked_or_gone = stream.stopped().await;
            self.written.pop_front();
        }
    }

    /// A batch stream's bytes (its type byte, then frames): the frames at the head of the queue
    /// that fit in one datagram together, if there are two or more and the peer reads batches.
    /// Frames in one datagram share its fate whatever their streams, so the batch keeps each
    /// frame as independent of a lost packet as a stream of its own would.
    fn take_batch(&mut self) -> Option<Vec<Bytes>> {
        if !self.batches || self.routed_out.len() < 2 {
            return None;
        }
        // Room in a datagram of the path's current size, less the packet's header, its
        // authentication tag and the stream frame's header, with some to spare.
        let room = usize::from(self.conn.stats().path.current_mtu).saturating_sub(64);
        let mut total = 1;
        let n = self
            .routed_out
            .iter()
            .take_while(|f| {
                total += f.len();
                total <= room
            })
            .count();
        if n < 2 {
            return None;
        }
        let mut batch = Vec::with_capacity(n + 1);
        batch.push(Bytes::from_static(&[STREAM_BATCH]));
        batch.extend(self.routed_out.drain(..n));
        Some(batch)
    }
}

impl WireTx for QuicTx {
    const DIRECT: bool = true;

    async fn send(&mut self, frame: Bytes, kind: FrameKind) -> Result<(), WireError> {
        if kind == FrameKind::Close {
            // An orderly close goes out only once every frame written before it has reached the
            // peer (see `written`). Another (an error, a silent peer) does not wait.
            let orderly =
                matches!(frame::decode(&frame, usize::MAX), Ok(frame::Frame::Close(c)) if c.code.is_orderly());
            self.close_orderly = Some(orderly);
            if orderly {
                self.write_queued().await?;
                self.wait_acknowledged().await;
            }
        }
        if kind.is_routed() {
            self.routed_out.push_back(frame);
        } else {
            self.control_out.push_back(frame);
        }
        self.write_queued().await
    }

    async fn feed(&mut self, frame: Bytes, kind: FrameKind) -> Result<(), WireError> {
        if kind.is_routed() && self.batches {
            // Written at the flush, so that frames fed together may share a batch stream.
            self.routed_out.push_back(frame);
            return Ok(());
        }
        self.send(frame, kind).await
    }

    async fn flush(&mut self) -> Result<(), WireError> {
        // Bytes quinn has taken are on their way; frames fed since the last flush, or left by
        // a dropped write, wait.
        self.write_queued().await
    }

    fn peer_features(&mut self, features: u32) {
        self.batches = features & frame::FEATURE_QUIC_BATCHES != 0;
    }

    async fn shutdown(&mut self) {
        if let Err(e) = self.write_queued().await {
            tracing::trace!(error = %e, "frames left at shutdown");
        }
        // As before an orderly close frame; also when the peer closed first (it reads on until
        // the connection ends). Not after a close for an error.
        if self.close_orderly != Some(false) {
            self.wait_acknowledged().await;
        }
        if let Some(mut s) = self.control.take()
            && s.finish().is_ok()
            && let Err(e) = s.stopped().await
        {
            // We waited until the peer had our close frame before tearing the connection down.
            tracing::trace!(error = %e, "control stream");
        }
        self.conn.close(0u32.into(), b"link closed");
    }
}

type Item = Result<Option<Bytes>, WireError>;

/// What reading one of the peer's streams gave.
enum StreamOut {
    /// A frame stream's frame (or why it could not be read).
    Frame(Item),
    /// A batch stream's frames, in order.
    Batch(VecDeque<Bytes>),
    /// The stream is the peer's control stream: read it frame by frame from now on.
    Control(quinn::RecvStream),
    /// A stream that ended before its type byte: nothing to deliver.
    Nothing,
}

type Pending<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The receiving half: accepts the peer's streams and reads their frames, in arrival order,
/// all inside the link driver's task (no task or queue per frame). At most
/// [`MAX_STREAM_READERS`] frame streams are read at once; further streams wait in quinn, under
/// its flow control, so a peer cannot make us hold more than that many frames.
struct QuicRx {
    conn: quinn::Connection,
    max: usize,
    /// Streams being read.
    readers: FuturesUnordered<Pending<StreamOut>>,
    /// The next stream from the peer, while a reader slot is free.
    accepting: Option<Pending<Result<quinn::RecvStream, quinn::ConnectionError>>>,
    /// The next frame on the peer's control stream, once it is open.
    control: Option<Pending<(quinn::RecvStream, Item)>>,
    /// The connection ended like this; delivered once the streams being read are done.
    ended: Option<Item>,
    /// The peer's close frame, held back until every frame stream it opened before it has
    /// been read: the close travels on the control stream and can overtake them, and the link
    /// stops reading at a close (the frames were lost).
    held_close: Option<Bytes>,
    /// Frames of a batch stream read and not yet delivered.
    batched: VecDeque<Bytes>,
}

/// One step of [`QuicRx::recv`].
enum Step {
    Stream(StreamOut),
    Control(quinn::RecvStream, Item),
    Accepted(Result<quinn::RecvStream, quinn::ConnectionError>),
    /// The held close, now that no stream of the peer's is left to read.
    Close,
    End,
}

impl QuicRx {
    fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<Step> {
        if let Poll::Ready(Some(out)) = self.readers.poll_next_unpin(cx) {
            return Poll::Ready(Step::Stream(out));
        }
        if let Some(c) = &mut self.control
            && let Poll::Ready((stream, item)) = c.as_mut().poll(cx)
        {
            self.control = None;
            return Poll::Ready(Step::Control(stream, item));
        }
        if self.ended.is_some() {
            return if self.readers.is_empty() { Poll::Ready(Step::End) } else { Poll::Pending };
        }
        if self.readers.len() < MAX_STREAM_READERS {
            let conn = &self.conn;
            let accepting = self.accepting.get_or_insert_with(|| {
                let conn = conn.clone();
                Box::pin(async move { conn.accept_uni().await })
            });
            if let Poll::Ready(r) = accepting.as_mut().poll(cx) {
                self.accepting = None;
                return Poll::Ready(Step::Accepted(r));
            }
            // No stream of the peer's waits to be accepted: the streams it opened before its
            // close are all being read, or read.
            if self.held_close.is_some() && self.readers.is_empty() {
                return Poll::Ready(Step::Close);
            }
        }
        Poll::Pending
    }
}

impl WireRx for QuicRx {
    async fn recv(&mut self) -> Result<Option<Bytes>, WireError> {
        loop {
            if let Some(frame) = self.batched.pop_front() {
                return Ok(Some(frame));
            }
            match std::future::poll_fn(|cx| self.poll_step(cx)).await {
                Step::Stream(StreamOut::Frame(item)) => return item,
                Step::Stream(StreamOut::Batch(frames)) => self.batched = frames,
                Step::Stream(StreamOut::Nothing) => {}
                Step::Stream(StreamOut::Control(_)) if self.control.is_some() => {
                    return Err(WireError::Protocol("a second QUIC control stream".into()));
                }
                Step::Stream(StreamOut::Control(stream)) => {
                    self.control = Some(Box::pin(read_control(stream, self.max)));
                }
                Step::Control(_, Ok(Some(bytes)))
                    if frame::peek_header(&bytes, usize::MAX)
                        .is_ok_and(|h| h.is_some_and(|h| h.kind == FrameKind::Close)) =>
                {
                    // Nothing follows a close on the control stream; the frame streams opened
                    // before it are read first (see `held_close`).
                    self.held_close = Some(bytes);
                }
                Step::Close => return Ok(self.held_close.take()),
                Step::Control(stream, item) => {
                    if matches!(item, Ok(Some(_))) {
                        self.control = Some(Box::pin(read_control(stream, self.max)));
                    }
                    // The control stream ending is not the link ending: the connection says so.
                    if !matches!(item, Ok(None)) {
                        return item;
                    }
                }
                Step::Accepted(Ok(stream)) => self.readers.push(Box::pin(read_stream(stream, self.max))),
                Step::Accepted(Err(e)) => {
                    // Frames already being read reach the link before the end.
                    self.ended = Some(match e {
                        quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::LocallyClosed => {
                            Ok(None)
                        }
                        other => Err(io_err(other)),
                    });
                }
                Step::End => match self.held_close.take() {
                    Some(close) => return Ok(Some(close)),
                    None => return self.ended.take().unwrap_or(Ok(None)),
                },
            }
        }
    }
}

/// Reads one stream: its type byte, then for a frame stream the whole frame.
async fn read_stream(mut s: quinn::RecvStream, max: usize) -> StreamOut {
    let mut kind = [0u8; 1];
    if s.read_exact(&mut kind).await.is_err() {
        return StreamOut::Nothing;
    }
    match kind[0] {
        STREAM_CONTROL => StreamOut::Control(s),
        STREAM_FRAME => StreamOut::Frame(match s.read_to_end(max).await {
            Ok(b) => Ok(Some(Bytes::from(b))),
            Err(quinn::ReadToEndError::TooLong) => {
                Err(WireError::Decode(DecodeError::Oversized { len: max.saturating_add(1), max }))
            }
            Err(e) => Err(io_err(e)),
        }),
        STREAM_BATCH => match s.read_to_end(MAX_BATCH_BYTES).await {
            Ok(b) => match split_batch(Bytes::from(b), max) {
                Ok(frames) => StreamOut::Batch(frames),
                Err(e) => StreamOut::Frame(Err(e)),
            },
            Err(quinn::ReadToEndError::TooLong) => {
                StreamOut::Frame(Err(WireError::Protocol(format!("a QUIC batch stream over {MAX_BATCH_BYTES} bytes"))))
            }
            Err(e) => StreamOut::Frame(Err(io_err(e))),
        },
        other => StreamOut::Frame(Err(WireError::Protocol(format!("unknown QUIC stream type {other}")))),
    }
}

/// Cuts a batch stream's bytes into its frames, by their headers. The frames themselves are
/// checked where every frame is, when the link decodes them.
fn split_batch(mut bytes: Bytes, max: usize) -> Result<VecDeque<Bytes>, WireError> {
    let mut frames = VecDeque::new();
    while !bytes.is_empty() {
        let h = frame::peek_header(&bytes, max)?
            .ok_or(WireError::Decode(DecodeError::Truncated { needed: HEADER_LEN, have: bytes.len() }))?;
        let len = h.frame_len();
        if bytes.len() < len {
            return Err(WireError::Decode(DecodeError::Truncated { needed: len, have: bytes.len() }));
        }
        frames.push_back(bytes.split_to(len));
    }
    if frames.is_empty() {
        return Err(WireError::Protocol("an empty QUIC batch stream".into()));
    }
    Ok(frames)
}

/// Reads the next frame of the control stream and gives the stream back; `Ok(None)` when the
/// peer finished it.
async fn read_control(mut s: quinn::RecvStream, max: usize) -> (quinn::RecvStream, Item) {
    let item = async {
        let mut header = [0u8; HEADER_LEN];
        match s.read_exact(&mut header).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(e) => return Err(io_err(e)),
        }
        let h = frame::peek_header(&header, max)?
            .ok_or(WireError::Decode(DecodeError::Truncated { needed: HEADER_LEN, have: 0 }))?;
        let mut buf = vec![0u8; h.frame_len()];
        buf[..HEADER_LEN].copy_from_slice(&header);
        s.read_exact(&mut buf[HEADER_LEN..]).await.map_err(io_err)?;
        Ok(Some(Bytes::from(buf)))
    }
    .await;
    (s, item)
}

//! WebSocket links: the wire over a tokio-tungstenite stream (one binary message per frame),
//! dialing `wss://` / `ws://`, and accepting upgrades on the node's HTTP server at `/v1/link`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::accept::Acceptor;
use crate::frame::{DecodeError, FrameKind, HEADER_LEN};
use crate::link::wire::{WireError, WireRx, WireTx};
use crate::link::{LinkConfig, PeerInfo, TransportKind};

pub mod codec;

use codec::{Opcode, ParseError, Side};

/// The path the node mounts the link endpoint at.
pub const LINK_PATH: &str = "/v1/link";

/// Bytes of encoded WebSocket frames a link collects before it writes to the TLS stream. The
/// link driver writes a batch of frames and then flushes once, so a batch becomes one TLS write
/// (and one syscall) instead of one per frame.
const WS_WRITE_BUFFER: usize = 64 * 1024;

/// Bytes a link asks the TLS stream for at a time (one TLS record). The buffer grows to hold one
/// frame that is longer, up to the link's frame limit.
const WS_READ_BUFFER: usize = 16 * 1024;

/// The upgrade handshake's settings for tokio-tungstenite, which dials (the link then frames
/// its messages itself, see [`split_raw`]).
pub(crate) fn ws_config(config: &LinkConfig) -> WebSocketConfig {
    WebSocketConfig::default().max_message_size(Some(config.max_frame_len)).max_frame_size(Some(config.max_frame_len))
}

/// The sending half of a WebSocket link: encodes each link frame as one binary message into a
/// bounded write buffer that [`WireTx::flush`] writes out.
pub(crate) struct WsTx<S> {
    io: WriteHalf<S>,
    side: Side,
    out: BytesMut,
    /// A ping's payload the reader saw, to be answered with a pong at the next write.
    pong: Arc<PendingPong>,
}

/// The receiving half: parses frames from a read buffer, reassembling fragmented messages.
pub(crate) struct WsRx<S> {
    io: ReadHalf<S>,
    side: Side,
    buf: BytesMut,
    /// The fragments of a message still being received.
    partial: Option<BytesMut>,
    max_frame_len: usize,
    pong: Arc<PendingPong>,
}

/// The payload of the latest ping not yet answered (RFC 6455 allows answering only the latest).
#[derive(Default)]
struct PendingPong {
    set: AtomicBool,
    payload: std::sync::Mutex<Option<Bytes>>,
}

impl PendingPong {
    fn put(&self, payload: Bytes) {
        *self.payload.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(payload);
        self.set.store(true, Ordering::Release);
    }

    fn take(&self) -> Option<Bytes> {
        if !self.set.swap(false, Ordering::Acquire) {
            return None;
        }
        self.payload.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }
}

/// Splits a connection whose WebSocket upgrade is done into the link's halves. The link frames
/// its messages itself (module [`codec`]) instead of through tungstenite's message stream: one
/// buffer each way, no zeroing of the read buffer, no copy of a message's payload.
/// `read` holds bytes already read from the connection past the upgrade, if any.
pub(crate) fn split_raw<S>(io: S, side: Side, config: &LinkConfig, read: &[u8]) -> (WsTx<S>, WsRx<S>)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, w) = tokio::io::split(io);
    let pong = Arc::new(PendingPong::default());
    let mut buf = BytesMut::with_capacity(WS_READ_BUFFER.max(read.len()));
    buf.extend_from_slice(read);
    (
        WsTx { io: w, side, out: BytesMut::with_capacity(4096), pong: Arc::clone(&pong) },
        WsRx { io: r, side, buf, partial: None, max_frame_len: config.max_frame_len, pong },
    )
}

/// The dialing side's halves, from the stream tokio-tungstenite upgraded. Nothing can be left in
/// tungstenite's read buffer: the accepting side sends nothing until it has the dialer's hello.
pub(crate) fn split<S>(ws: WebSocketStream<S>, config: &LinkConfig) -> (WsTx<S>, WsRx<S>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    split_raw(ws.into_inner(), Side::Client, config, &[])
}

fn io_err(e: &std::io::Error) -> WireError {
    WireError::Io(format!("websocket: {e}"))
}

impl<S> WsTx<S>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    fn push(&mut self, opcode: Opcode, payload: &[u8]) {
        let mask = (self.side == Side::Client).then(rand::random::<[u8; 4]>);
        codec::encode(&mut self.out, opcode, payload, mask);
    }

    /// Writes the buffer out. Cancel-safe: the buffer advances past what was written, so a
    /// dropped call leaves the rest for the next one and never repeats or splits a frame.
    async fn write_out(&mut self) -> Result<(), WireError> {
        if let Some(p) = self.pong.take() {
            self.push(Opcode::Pong, &p);
        }
        while !self.out.is_empty() {
            match self.io.write_buf(&mut self.out).await {
                Ok(0) => return Err(WireError::Io("websocket: the connection accepts no more data".into())),
                Ok(_) => {}
                Err(e) => return Err(io_err(&e)),
            }
        }
        Ok(())
    }
}

impl<S> WireTx for WsTx<S>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    // Frames are encoded whole into the buffer before any await, and `write_out` is
    // cancel-safe.
    const DIRECT: bool = true;

    async fn send(&mut self, frame: Bytes, kind: FrameKind) -> Result<(), WireError> {
        self.feed(frame, kind).await?;
        self.flush().await
    }

    async fn feed(&mut self, frame: Bytes, _kind: FrameKind) -> Result<(), WireError> {
        // Bounded: the buffer holds at most one batch plus one frame.
        if !self.out.is_empty() && self.out.len() + frame.len() > WS_WRITE_BUFFER {
            self.write_out().await?;
        }
        self.push(Opcode::Binary, &frame);
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), WireError> {
        self.write_out().await?;
        self.io.flush().await.map_err(|e| io_err(&e))
    }

    async fn shutdown(&mut self) {
        self.push(Opcode::Close, &codec::close_payload(1000, ""));
        if let Err(e) = self.flush().await {
            tracing::trace!(error = %e, "websocket close");
        }
        if let Err(e) = self.io.shutdown().await {
            tracing::trace!(error = %e, "websocket shutdown");
        }
    }
}

impl<S> WsRx<S>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    /// The next whole frame in the buffer, reading more as needed; `None` at the end of the
    /// connection between frames.
    async fn next_frame(&mut self) -> Result<Option<codec::WsFrame>, WireError> {
        loop {
            match codec::parse(&mut self.buf, self.side, self.max_frame_len) {
                Ok(Some(f)) => return Ok(Some(f)),
                Ok(None) => {}
                Err(ParseError::Oversized { len, max }) => {
                    let len = usize::try_from(len).unwrap_or(usize::MAX).max(HEADER_LEN);
                    return Err(WireError::Decode(DecodeError::Oversized { len, max }));
                }
                Err(e) => return Err(WireError::Protocol(format!("websocket protocol: {e}"))),
            }
            if self.buf.capacity() - self.buf.len() < WS_READ_BUFFER / 4 {
                self.buf.reserve(WS_READ_BUFFER);
            }
            let n = self.io.read_buf(&mut self.buf).await.map_err(|e| io_err(&e))?;
            if n == 0 {
                return if self.buf.is_empty() && self.partial.is_none() {
                    Ok(None)
                } else {
                    Err(WireError::Io("websocket: connection ended inside a frame".into()))
                };
            }
        }
    }
}

impl<S> WireRx for WsRx<S>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    async fn recv(&mut self) -> Result<Option<Bytes>, WireError> {
        loop {
            let Some(f) = self.next_frame().await? else { return Ok(None) };
            match (f.opcode, self.partial.as_mut()) {
                (Opcode::Binary, None) if f.fin => return Ok(Some(f.payload)),
                (Opcode::Binary, None) => self.partial = Some(BytesMut::from(&f.payload[..])),
                (Opcode::Continuation, Some(partial)) => {
                    if partial.len() + f.payload.len() > self.max_frame_len {
                        let len = partial.len() + f.payload.len();
                        return Err(WireError::Decode(DecodeError::Oversized { len, max: self.max_frame_len }));
                    }
                    partial.extend_from_slice(&f.payload);
                    if f.fin {
                        return Ok(self.partial.take().map(BytesMut::freeze));
                    }
                }
                (Opcode::Close, _) => return Ok(None),
                (Opcode::Ping, _) => self.pong.put(f.payload),
                (Opcode::Pong, _) => {}
                (Opcode::Text, _) => return Err(WireError::Protocol("text message on a link".into())),
                (Opcode::Binary, Some(_)) | (Opcode::Continuation, None) => {
                    return Err(WireError::Protocol("websocket protocol: bad fragment sequence".into()));
                }
            }
        }
    }
}

// === accepting ===

/// An upgraded connection about to become an accepted link.
struct Accepted<'a> {
    acceptor: &'a Acceptor,
    config: &'a LinkConfig,
    peer: PeerInfo,
    permit: tokio::sync::OwnedSemaphorePermit,
    deadline: tokio::time::Instant,
}

impl Accepted<'_> {
    /// Frames `io` as the server side of a link (`read`: bytes already read past the upgrade)
    /// and runs the link's handshake.
    async fn establish<S>(self, io: S, read: &[u8])
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (tx, rx) = split_raw(io, Side::Server, self.config, read);
        self.acceptor.establish(tx, rx, self.peer, self.permit, self.deadline).await;
    }
}

fn bad_request(msg: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::from(msg));
    *r.status_mut() = StatusCode::BAD_REQUEST;
    r
}

/// Answers a WebSocket upgrade request for a link and, once upgraded, establishes the link in
/// the background (hello exchange within the handshake timeout) and hands it to the acceptor's
/// [`crate::Incoming`]. The server must serve connections with upgrades enabled (axum::serve and
/// [`crate::https::serve`] do).
pub(crate) fn upgrade<B>(acceptor: &Acceptor, mut req: Request<B>) -> Response<Body> {
    let headers = req.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))))
    };
    if req.method() != http::Method::GET
        || !has_token(header::CONNECTION, "upgrade")
        || !has_token(header::UPGRADE, "websocket")
    {
        return bad_request("expected a websocket upgrade");
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        return bad_request("unsupported websocket version");
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return bad_request("missing websocket key");
    };
    let accept_key = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let Some(permit) = acceptor.try_permit() else {
        let mut r = Response::new(Body::from("too many links"));
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return r;
    };
    let remote = req.extensions().get::<axum::extract::ConnectInfo<SocketAddr>>().map(|c| c.0);
    let on_upgrade = hyper::upgrade::on(&mut req);
    let acceptor = acceptor.clone();
    tokio::spawn(async move {
        let config = acceptor.setup().config.clone();
        let deadline = tokio::time::Instant::now() + config.handshake_timeout;
        let upgraded = match tokio::time::timeout_at(deadline, on_upgrade).await {
            Ok(Ok(u)) => u,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "websocket upgrade failed");
                return;
            }
            Err(_) => {
                tracing::debug!("websocket upgrade timed out");
                return;
            }
        };
        let peer = PeerInfo::connecting(TransportKind::Wss, remote, None);
        let link = Accepted { acceptor: &acceptor, config: &config, peer, permit, deadline };
        // Over the node's TLS server, take the TLS stream back from hyper: the link then reads
        // and writes it directly instead of through hyper's upgrade wrappers (boxed, with a
        // rewind buffer and two adapters between tokio's and hyper's IO traits on every call).
        // The same for plaintext (development mode).
        use hyper_util::server::conn::auto::upgrade::downcast;
        type Tls = TokioIo<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>;
        type Plain = TokioIo<tokio::net::TcpStream>;
        let upgraded = match downcast::<Tls>(upgraded) {
            Ok(parts) => return link.establish(parts.io.into_inner(), &parts.read_buf).await,
            Err(upgraded) => upgraded,
        };
        match downcast::<Plain>(upgraded) {
            Ok(parts) => link.establish(parts.io.into_inner(), &parts.read_buf).await,
            // Another server: through hyper's upgrade wrappers.
            Err(upgraded) => link.establish(TokioIo::new(upgraded), &[]).await,
        }
    });
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept_key) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}

//! WebSocket links: the wire over a tokio-tungstenite stream (one binary message per frame),
//! dialing `wss://` / `ws://`, and accepting upgrades on the node's HTTP server at `/v1/link`.

use std::net::SocketAddr;

use axum::body::Body;
use bytes::Bytes;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::accept::Acceptor;
use crate::frame::{DecodeError, FrameKind, HEADER_LEN};
use crate::link::wire::{WireError, WireRx, WireTx};
use crate::link::{LinkConfig, PeerInfo, TransportKind};

/// The path the node mounts the link endpoint at.
pub const LINK_PATH: &str = "/v1/link";

/// Bytes of encoded WebSocket frames a link collects before it writes to the TLS stream. The
/// link driver writes a batch of frames and then flushes once, so a batch becomes one TLS write
/// (and one syscall) instead of one per frame.
const WS_WRITE_BUFFER: usize = 64 * 1024;

/// Bytes a link reads from the TLS stream at a time. tungstenite zeroes this much of its buffer
/// before every read, so a large value costs on every small message; 16 KiB is one TLS record.
const WS_READ_BUFFER: usize = 16 * 1024;

pub(crate) fn ws_config(config: &LinkConfig) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(config.max_frame_len))
        .max_frame_size(Some(config.max_frame_len))
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        // Bounded: the buffer never holds more than one batch plus one frame.
        .max_write_buffer_size(WS_WRITE_BUFFER + config.max_frame_len + 64)
}

pub(crate) struct WsTx<S> {
    sink: SplitSink<WebSocketStream<S>, Message>,
}

pub(crate) struct WsRx<S> {
    stream: SplitStream<WebSocketStream<S>>,
    max_frame_len: usize,
}

pub(crate) fn split<S>(ws: WebSocketStream<S>, config: &LinkConfig) -> (WsTx<S>, WsRx<S>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sink, stream) = ws.split();
    (WsTx { sink }, WsRx { stream, max_frame_len: config.max_frame_len })
}

impl<S> WireTx for WsTx<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn send(&mut self, frame: Bytes, _kind: FrameKind) -> Result<(), WireError> {
        self.sink.send(Message::Binary(frame)).await.map_err(|e| WireError::Io(format!("websocket: {e}")))
    }

    async fn feed(&mut self, frame: Bytes, _kind: FrameKind) -> Result<(), WireError> {
        self.sink.feed(Message::Binary(frame)).await.map_err(|e| WireError::Io(format!("websocket: {e}")))
    }

    async fn flush(&mut self) -> Result<(), WireError> {
        self.sink.flush().await.map_err(|e| WireError::Io(format!("websocket: {e}")))
    }

    async fn shutdown(&mut self) {
        if let Err(e) = self.sink.close().await {
            tracing::trace!(error = %e, "websocket close");
        }
    }
}

impl<S> WireRx for WsRx<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn recv(&mut self) -> Result<Option<Bytes>, WireError> {
        loop {
            return match self.stream.next().await {
                None | Some(Ok(Message::Close(_))) => Ok(None),
                Some(Ok(Message::Binary(b))) => Ok(Some(b)),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Text(_))) => Err(WireError::Protocol("text message on a link".into())),
                Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, .. }))) => {
                    Err(WireError::Decode(DecodeError::Oversized {
                        len: size.max(HEADER_LEN),
                        max: self.max_frame_len,
                    }))
                }
                Some(Err(WsError::Protocol(p))) => Err(WireError::Protocol(format!("websocket protocol: {p}"))),
                Some(Err(e)) => Err(WireError::Io(format!("websocket: {e}"))),
            };
        }
    }
}

// === accepting ===

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
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(ws_config(&config))).await;
        let (tx, rx) = split(ws, &config);
        let peer = PeerInfo::connecting(TransportKind::Wss, remote, None);
        acceptor.establish(tx, rx, peer, permit, deadline).await;
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

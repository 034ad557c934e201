//! The hello exchange that opens every link, and the hook that judges the peer's hello.
//!
//! The dialing side sends its [`Hello`] first; the accepting side checks it and answers with its
//! own hello, or with a [`Close`] saying why it refuses; the dialing side then checks the answer.

use std::fmt;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::wire::{WireError, WireRx, WireTx};
use super::{LinkConfig, PeerInfo};
use crate::frame::{self, Close, CloseCode, DecodeError, Frame, FrameKind, Hello};

/// Decides whether a peer's hello is acceptable (token validation lives in the auth crate and
/// plugs in here). With none configured every well-formed hello is accepted.
pub trait HelloCheck: Send + Sync + 'static {
    /// `Err(reason)` refuses the peer; the reason is sent to it in a close frame.
    fn check(&self, hello: &Hello, peer: &PeerInfo) -> Result<(), String>;
}

impl<F> HelloCheck for F
where
    F: Fn(&Hello, &PeerInfo) -> Result<(), String> + Send + Sync + 'static,
{
    fn check(&self, hello: &Hello, peer: &PeerInfo) -> Result<(), String> {
        self(hello, peer)
    }
}

/// What one side brings to a link: its config, its hello, and how it judges the peer's.
#[derive(Clone)]
pub struct LinkSetup {
    /// Link tunables.
    pub config: LinkConfig,
    /// The hello this node sends (its `version` is set to the protocol version on send).
    pub hello: Hello,
    /// The check applied to the peer's hello.
    pub check: Option<Arc<dyn HelloCheck>>,
    /// Mints the token each hello carries, so every new link presents a fresh, short-lived one;
    /// without it, `hello.token` is sent as is.
    pub token_source: Option<Arc<dyn Fn() -> Bytes + Send + Sync>>,
}

impl fmt::Debug for LinkSetup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkSetup")
            .field("config", &self.config)
            .field("hello", &self.hello)
            .field("check", &self.check.as_ref().map(|_| "<dyn HelloCheck>"))
            .field("token_source", &self.token_source.as_ref().map(|_| "<fn>"))
            .finish()
    }
}

impl LinkSetup {
    /// A setup with default config, the given hello and no check.
    pub fn new(hello: Hello) -> Self {
        LinkSetup { config: LinkConfig::default(), hello, check: None, token_source: None }
    }

    /// Mints the hello's token anew for every handshake (see [`LinkSetup::token_source`]).
    pub fn with_token_source(mut self, source: impl Fn() -> Bytes + Send + Sync + 'static) -> Self {
        self.token_source = Some(Arc::new(source));
        self
    }

    /// Sets the hello check.
    pub fn with_check(mut self, check: impl HelloCheck) -> Self {
        self.check = Some(Arc::new(check));
        self
    }

    /// Sets the config.
    pub fn with_config(mut self, config: LinkConfig) -> Self {
        self.config = config;
        self
    }
}

/// Why the hello exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The exchange did not finish within the handshake timeout.
    #[error("hello exchange timed out")]
    Timeout,
    /// We refused the peer's hello.
    #[error("peer's hello refused: {0}")]
    Rejected(String),
    /// The peer refused us (it answered with a close frame).
    #[error("refused by peer: {} ({})", .0.code, .0.reason)]
    RefusedByPeer(Close),
    /// The peer speaks another protocol version.
    #[error("peer speaks protocol version {0}")]
    Version(u16),
    /// The peer belongs to another mesh ([`Hello::mesh`]).
    #[error("the node that sent the hello belongs to mesh {theirs:?}, the node that refused it to mesh {ours:?}")]
    OtherMesh {
        /// Our mesh's name.
        ours: String,
        /// The peer's.
        theirs: String,
    },
    /// The hello came from this node itself: the address dialed is one of its own (a name that
    /// resolves to every node of the mesh, this one included, such as a Kubernetes headless
    /// service, or a seed that names this node). Both ends end the exchange; the dialer goes on
    /// to the name's next address.
    #[error("the address is this node's own")]
    ToSelf,
    /// The peer's first frame was not a hello.
    #[error("expected a hello, got {0:?}")]
    Unexpected(FrameKind),
    /// The peer's first frame did not decode.
    #[error("invalid hello: {0}")]
    Decode(#[from] DecodeError),
    /// The connection failed or ended during the exchange.
    #[error("connection failed during hello: {0}")]
    Transport(String),
}

impl From<WireError> for HandshakeError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Decode(d) => HandshakeError::Decode(d),
            WireError::Io(s) | WireError::Protocol(s) => HandshakeError::Transport(s),
        }
    }
}

/// Which side of the exchange we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Dialer,
    Acceptor,
}

async fn send_frame<T: WireTx>(tx: &mut T, frame: &Frame, config: &LinkConfig) -> Result<(), HandshakeError> {
    let mut buf = BytesMut::with_capacity(frame.encoded_len());
    frame
        .encode(&mut buf, config.max_frame_len)
        .map_err(|e| HandshakeError::Transport(format!("cannot encode hello: {e}")))?;
    tx.send(buf.freeze(), frame.kind()).await?;
    Ok(())
}

async fn recv_hello<R: WireRx>(rx: &mut R, config: &LinkConfig) -> Result<Hello, HandshakeError> {
    let bytes = rx.recv().await?.ok_or_else(|| HandshakeError::Transport("connection closed".into()))?;
    match frame::decode(&bytes, config.max_frame_len)? {
        Frame::Hello(h) => Ok(h),
        Frame::Close(c) => Err(HandshakeError::RefusedByPeer(c)),
        other => Err(HandshakeError::Unexpected(other.kind())),
    }
}

/// Runs the exchange; `peer` arrives with transport fields filled in and leaves with the
/// hello's. The caller applies the handshake timeout.
pub(crate) async fn exchange<T: WireTx, R: WireRx>(
    tx: &mut T,
    rx: &mut R,
    setup: &LinkSetup,
    role: Role,
    mut peer: PeerInfo,
) -> Result<PeerInfo, HandshakeError> {
    let mut ours = setup.hello.clone();
    ours.version = u16::from(frame::PROTOCOL_VERSION);
    ours.features |= frame::FEATURE_QUIC_BATCHES;
    if let Some(mint) = &setup.token_source {
        ours.token = mint();
    }
    if role == Role::Dialer {
        send_frame(tx, &Frame::Hello(ours.clone()), &setup.config).await?;
    }
    let theirs = recv_hello(rx, &setup.config).await?;
    peer.node_id = theirs.node_id;
    peer.incarnation = theirs.incarnation;
    peer.features = theirs.features;
    tx.peer_features(theirs.features);
    peer.listen_addrs = theirs.listen_addrs.clone();
    if theirs.node_id == ours.node_id {
        // Dialed ourselves. The accepting end answers first, so that the dialing end, which
        // needs to know (it tries the name's next address), learns it from the hello and not
        // from a refusal that would read like another node's.
        if role == Role::Acceptor {
            send_frame(tx, &Frame::Hello(ours), &setup.config).await?;
        }
        tx.shutdown().await;
        return Err(HandshakeError::ToSelf);
    }
    let verdict = if theirs.version != u16::from(frame::PROTOCOL_VERSION) {
        Err(HandshakeError::Version(theirs.version))
    } else if theirs.mesh != ours.mesh {
        Err(HandshakeError::OtherMesh { ours: ours.mesh.clone(), theirs: theirs.mesh.clone() })
    } else if let Some(check) = &setup.check {
        check.check(&theirs, &peer).map_err(HandshakeError::Rejected)
    } else {
        Ok(())
    };
    if let Err(e) = verdict {
        let close = Frame::Close(Close { code: CloseCode::REJECTED, reason: e.to_string() });
        if let Err(send_err) = send_frame(tx, &close, &setup.config).await {
            tracing::debug!(error = %send_err, "could not tell the peer why its hello was refused");
        }
        tx.shutdown().await;
        return Err(e);
    }
    if role == Role::Acceptor {
        send_frame(tx, &Frame::Hello(ours), &setup.config).await?;
    }
    Ok(peer)
}

//! Accepting links: the [`Acceptor`] shared by the WebSocket endpoint (an axum route) and the
//! QUIC endpoint, which limits the number of links, runs the hello exchange with a deadline, and
//! delivers established links to [`Incoming`].

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;

use crate::link::handshake::{self, HandshakeError, LinkSetup, Role};
use crate::link::wire::{WireRx, WireTx};
use crate::link::{Link, PeerInfo, driver};

/// Limits of an acceptor.
#[derive(Debug, Clone)]
pub struct AcceptConfig {
    /// Most links (handshaking or established) accepted at once; more are refused.
    pub max_links: usize,
    /// Established links waiting for [`Incoming::accept`] before the acceptor waits.
    pub backlog: usize,
}

impl Default for AcceptConfig {
    fn default() -> Self {
        AcceptConfig { max_links: 1024, backlog: 64 }
    }
}

struct Inner {
    setup: LinkSetup,
    permits: Arc<Semaphore>,
    tx: mpsc::Sender<Link>,
    refused_hello: AtomicU64,
    handshake_timeouts: AtomicU64,
    over_limit: AtomicU64,
}

/// What an [`Acceptor`] turned away since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AcceptStats {
    /// Links whose hello exchange failed: a hello refused (another protocol version, another
    /// mesh, a token the hello check refused), malformed, or a connection that failed in it.
    pub refused_hello: u64,
    /// Links that sent no hello within the handshake timeout.
    pub handshake_timeouts: u64,
    /// Links refused because `max_links` were open or handshaking.
    pub over_limit: u64,
}

/// Accepts links from any transport; cheap to clone.
#[derive(Clone)]
pub struct Acceptor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor")
            .field("setup", &self.inner.setup)
            .field("free_slots", &self.inner.permits.available_permits())
            .finish()
    }
}

/// Established incoming links.
#[derive(Debug)]
pub struct Incoming {
    rx: mpsc::Receiver<Link>,
}

impl Incoming {
    /// The next established link; `None` once every [`Acceptor`] clone is gone.
    ///
    /// # Cancel safety
    /// Cancel-safe.
    pub async fn accept(&mut self) -> Option<Link> {
        self.rx.recv().await
    }
}

impl Acceptor {
    /// An acceptor answering with `setup` (our hello, config, and the check of peers' hellos).
    pub fn new(setup: LinkSetup, limits: AcceptConfig) -> (Acceptor, Incoming) {
        let (tx, rx) = mpsc::channel(limits.backlog.max(1));
        let inner = Inner {
            setup,
            permits: Arc::new(Semaphore::new(limits.max_links)),
            tx,
            refused_hello: AtomicU64::new(0),
            handshake_timeouts: AtomicU64::new(0),
            over_limit: AtomicU64::new(0),
        };
        (Acceptor { inner: Arc::new(inner) }, Incoming { rx })
    }

    /// An axum router serving WebSocket links at [`crate::ws::LINK_PATH`]; merge it into the
    /// node's router. The peer's address is read from axum's `ConnectInfo<SocketAddr>` if the
    /// server provides it.
    pub fn router<S>(&self) -> axum::Router<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        let acceptor = self.clone();
        axum::Router::new().route(
            crate::ws::LINK_PATH,
            axum::routing::get(move |req: axum::extract::Request| {
                let acceptor = acceptor.clone();
                async move { crate::ws::upgrade(&acceptor, req) }
            }),
        )
    }

    /// Links accepted and not yet closed.
    pub fn free_slots(&self) -> usize {
        self.inner.permits.available_permits()
    }

    /// What this acceptor (and its clones) turned away so far.
    pub fn stats(&self) -> AcceptStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        AcceptStats {
            refused_hello: get(&self.inner.refused_hello),
            handshake_timeouts: get(&self.inner.handshake_timeouts),
            over_limit: get(&self.inner.over_limit),
        }
    }

    pub(crate) fn setup(&self) -> &LinkSetup {
        &self.inner.setup
    }

    pub(crate) fn try_permit(&self) -> Option<OwnedSemaphorePermit> {
        match Arc::clone(&self.inner.permits).try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                self.inner.over_limit.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("refusing a link: too many links");
                None
            }
        }
    }

    /// Runs the hello exchange (by `deadline`) and delivers the link.
    pub(crate) async fn establish<T: WireTx, R: WireRx>(
        &self,
        mut tx: T,
        mut rx: R,
        peer: PeerInfo,
        permit: OwnedSemaphorePermit,
        deadline: Instant,
    ) {
        let setup = &self.inner.setup;
        let remote = peer.remote_addr;
        let transport = peer.transport;
        let exchange = handshake::exchange(&mut tx, &mut rx, setup, Role::Acceptor, peer);
        let peer = match tokio::time::timeout_at(deadline, exchange).await {
            Ok(Ok(p)) => p,
            Ok(Err(HandshakeError::ToSelf)) => {
                // Not a refusal: this node dialed one of its own addresses, and its dialer moves on.
                tracing::debug!(?remote, %transport, "incoming link from this node itself ended");
                return;
            }
            Ok(Err(e)) => {
                self.inner.refused_hello.fetch_add(1, Ordering::Relaxed);
                tracing::info!(?remote, %transport, error = %e, "incoming link refused");
                return;
            }
            Err(_) => {
                self.inner.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::info!(?remote, %transport, "incoming link: handshake timed out");
                let close = crate::Frame::Close(crate::Close {
                    code: crate::CloseCode::HANDSHAKE_TIMEOUT,
                    reason: "no hello in time".into(),
                });
                let mut buf = bytes::BytesMut::new();
                if close.encode(&mut buf, setup.config.max_frame_len).is_ok() {
                    let bounded = setup.config.close_timeout;
                    let sent = tokio::time::timeout(bounded, async {
                        if tx.send(buf.freeze(), crate::FrameKind::Close).await.is_ok() {
                            tx.shutdown().await;
                        }
                    });
                    if sent.await.is_err() {
                        tracing::debug!(?remote, "could not tell a silent peer why");
                    }
                }
                return;
            }
        };
        tracing::debug!(peer = %peer.node_id, ?remote, %transport, "link accepted");
        let link = driver::start(tx, rx, peer, &setup.config, Some(permit));
        if self.inner.tx.send(link).await.is_err() {
            tracing::debug!("incoming link dropped: nobody accepts links");
        }
    }
}

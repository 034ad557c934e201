//! The server loop of a node's one listening port, for an axum router: TLS with a handshake
//! deadline (or plaintext, for development), HTTP/1.1 and HTTP/2 with a header-read deadline
//! (slow-loris protection), upgrades enabled (WebSocket links and clients), the peer address as
//! axum `ConnectInfo<SocketAddr>`, a bound on connections, and a graceful drain at shutdown.
//!
//! Limits: at most `max_connections` connections are served at once; further connections wait in
//! the kernel's accept backlog until one closes (back-pressure, not errors). A client gets
//! `handshake_timeout` for its TLS handshake and for each request's headers, then it is dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Options of [`serve`].
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Limit on the TLS handshake and on reading request headers (default 10 s).
    pub handshake_timeout: Duration,
    /// Connections served at once, at most (default 10,000).
    pub max_connections: usize,
    /// How long a shutdown waits for requests in flight before closing connections (default 10 s).
    pub drain_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            handshake_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// What every connection task needs.
#[derive(Clone)]
struct Conn {
    router: axum::Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    /// Cancelled when draining starts: connections finish their requests and close.
    drain: CancellationToken,
}

impl Conn {
    /// Serves one connection (already past TLS) until it closes or the drain ends it.
    async fn serve<I>(self, io: I, peer: SocketAddr, permit: OwnedSemaphorePermit)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let router = self.router;
        let svc = hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
            router.clone().oneshot(req)
        });
        let conn = self.builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
        tokio::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            () = self.drain.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
        // The permit goes back when the connection is done: draining waits for all of them.
        drop(permit);
    }
}

/// Serves `router` on `listener` over TLS (`tls`; `None` is plaintext, for development only)
/// until `shutdown` is cancelled; then stops accepting, lets requests in flight finish (up to
/// `drain_timeout`) and returns. Upgraded WebSocket connections live on in their own tasks.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: axum::Router,
    opts: ServeOptions,
    shutdown: CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(opts.max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(opts.handshake_timeout);
    let conn = Conn { router, builder: Arc::new(builder), drain: CancellationToken::new() };
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_closed) => break,
            },
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Typically EMFILE: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
        }
        let conn = conn.clone();
        match &tls {
            None => {
                tokio::spawn(conn.serve(stream, peer, permit));
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let timeout = opts.handshake_timeout;
                tokio::spawn(async move {
                    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) if tls.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_ACME_TLS) => {
                            // An ACME TLS-ALPN-01 validation: the handshake was the answer.
                            tracing::debug!(%peer, "answered an ACME TLS-ALPN-01 validation");
                        }
                        Ok(Ok(tls)) => conn.serve(tls, peer, permit).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
    drop(listener);
    let drain = opts.drain_timeout;
    tracing::info!(drain_timeout_ms = drain.as_millis() as u64, "draining: no new connections, finishing requests");
    conn.drain.cancel();
    let all = u32::try_from(opts.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(drain, limit.acquire_many(all)).await.is_err() {
        tracing::warn!("drain timeout passed; closing the remaining connections");
    }
}

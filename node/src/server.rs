//! The accept loop of the node's one listening port: TLS (unless turned off for development),
//! then HTTP/1.1 and HTTP/2 with upgrades (WebSocket links and clients) served by hyper, bounded
//! in connections, drained gracefully at shutdown.
//!
//! Limits: at most `http.max_connections` connections are served at once; further connections
//! wait in the kernel's accept backlog until one closes (back-pressure, not errors). A client
//! gets [`HANDSHAKE_TIMEOUT`] for its TLS handshake and for each request's headers (slow-loris
//! protection); then it is dropped.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use axum::{Router, extract::ConnectInfo};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::node::NodeShared;

/// Time allowed for a TLS handshake and for a request's headers.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What every connection task needs.
#[derive(Clone)]
struct Conn {
    app: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    /// Cancelled when draining starts: connections finish their requests and close.
    drain: CancellationToken,
}

impl Conn {
    /// Serves one connection (already past TLS) until it closes or the drain ends.
    async fn serve<I>(self, io: I, peer: SocketAddr, permit: OwnedSemaphorePermit)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let app = self.app;
        let svc = hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(req)
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

pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: Router,
    shared: Arc<NodeShared>,
    shutdown: CancellationToken,
) {
    let max = shared.config.http.max_connections;
    let limit = Arc::new(Semaphore::new(max));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HANDSHAKE_TIMEOUT);
    let conn = Conn { app, builder: Arc::new(builder), drain: CancellationToken::new() };
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
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => conn.serve(tls, peer, permit).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
    shared.draining.store(true, Ordering::Relaxed);
    drop(listener);
    let drain = shared.config.calls.drain_timeout();
    tracing::info!(drain_timeout_ms = drain.as_millis() as u64, "draining: no new connections, finishing requests");
    conn.drain.cancel();
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    if tokio::time::timeout(drain, limit.acquire_many(all)).await.is_err() {
        tracing::warn!("drain timeout passed; closing the remaining connections");
    }
}

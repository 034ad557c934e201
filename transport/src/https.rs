//! A small HTTPS server loop for an axum router: TLS with a handshake deadline (slow-loris
//! protection), HTTP/1.1 and HTTP/2 with a header-read deadline, upgrades enabled (WebSocket
//! links), and the peer address provided as axum `ConnectInfo<SocketAddr>`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tower::ServiceExt;

/// Options of [`serve`].
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Limit on the TLS handshake and on reading request headers (default 10 s).
    pub handshake_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions { handshake_timeout: Duration::from_secs(10) }
    }
}

/// Serves `router` over TLS on `listener` until the listener fails. Connection tasks stop when
/// this future is dropped; upgraded WebSocket links live on in their own tasks.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: axum::Router,
    opts: ServeOptions,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut conns = JoinSet::new();
    loop {
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => r?,
            Some(_) = conns.join_next() => continue,
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "set_nodelay");
        }
        let acceptor = acceptor.clone();
        let router = router.clone();
        let timeout = opts.handshake_timeout;
        conns.spawn(async move {
            let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            let svc = hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(axum::extract::ConnectInfo::<SocketAddr>(remote));
                router.clone().oneshot(req)
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).header_read_timeout(timeout);
            if let Err(e) = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc).await {
                tracing::debug!(%remote, error = %e, "HTTP connection ended");
            }
        });
    }
}

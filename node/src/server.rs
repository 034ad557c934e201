//! The accept loop of the node's one listening port: HTTP/1.1 and HTTP/2 (with upgrades, for
//! WebSockets) served by hyper, bounded in connections, drained gracefully at shutdown.
//!
//! Connection limit: at most `http.max_connections` connections are served at once; further
//! connections wait in the kernel's accept backlog until one closes (back-pressure, not errors).

use std::{sync::Arc, sync::atomic::Ordering, time::Duration};

use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;

use crate::{api, node::NodeShared};

pub(crate) async fn serve(listener: TcpListener, shared: Arc<NodeShared>, shutdown: CancellationToken) {
    let app = api::router(shared.clone());
    let limit = Arc::new(Semaphore::new(shared.config.http.max_connections));
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
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
        let svc = TowerToHyperService::new(app.clone());
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc).into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    shared.draining.store(true, Ordering::Relaxed);
    drop(listener);
    let drain = shared.config.calls.drain_timeout();
    tracing::info!(drain_timeout_ms = drain.as_millis() as u64, "draining: no new connections, finishing requests");
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!("drain timeout passed; closing the remaining connections");
    }
}

//! Loopback proxies that can blackhole traffic (forward nothing, close nothing), to freeze a
//! peer as seen from the other side. Self-contained: the node's mesh tests include this file
//! too (`#[path]`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// A running proxy; `blackhole()` silently drops everything from then on.
pub struct Proxy {
    pub addr: SocketAddr,
    hole: Arc<AtomicBool>,
    /// The largest datagram the UDP proxy has forwarded, either way (0 for TCP).
    largest: Arc<AtomicUsize>,
    /// UDP: the next datagrams from the client larger than `.0` bytes are dropped, `.1` of them.
    drop_over: Arc<std::sync::Mutex<(usize, usize)>>,
    /// UDP: datagrams dropped that way.
    dropped: Arc<AtomicUsize>,
    _task: AbortOnDrop,
}

/// Stops the proxy's task when the proxy is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Proxy {
    pub fn blackhole(&self) {
        self.hole.store(true, Ordering::SeqCst);
    }

    /// The largest datagram forwarded so far, either way (UDP only).
    pub fn largest_datagram(&self) -> usize {
        self.largest.load(Ordering::SeqCst)
    }

    /// Drops the next `count` datagrams from the client larger than `bytes` (UDP only): lost
    /// packets, aimed at those that carry a large frame (and its retransmissions).
    #[allow(dead_code, reason = "not every test binary that includes this file loses a packet")]
    pub fn drop_next_datagrams_over(&self, bytes: usize, count: usize) {
        *self.drop_over.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = (bytes, count);
    }

    /// Datagrams dropped by [`Proxy::drop_next_datagrams_over`].
    #[allow(dead_code, reason = "not every test binary that includes this file loses a packet")]
    pub fn dropped_datagrams(&self) -> usize {
        self.dropped.load(Ordering::SeqCst)
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    hole: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(n) if n > 0 => n,
            // A blackhole forwards no FIN either: keep the other side open.
            _ if hole.load(Ordering::SeqCst) => {
                let _keep = to;
                std::future::pending::<()>().await;
                return;
            }
            _ => return,
        };
        if hole.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

pub async fn tcp(upstream: SocketAddr) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let hole = Arc::new(AtomicBool::new(false));
    let h = hole.clone();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((down, _)) = listener.accept().await {
            let Ok(up) = TcpStream::connect(upstream).await else {
                continue;
            };
            let (dr, dw) = down.into_split();
            let (ur, uw) = up.into_split();
            conns.spawn(pipe(dr, uw, h.clone()));
            conns.spawn(pipe(ur, dw, h.clone()));
        }
    });
    Proxy {
        addr,
        hole,
        largest: Arc::default(),
        drop_over: Arc::default(),
        dropped: Arc::default(),
        _task: AbortOnDrop(task),
    }
}

/// A UDP proxy for one client.
pub async fn udp(upstream: SocketAddr) -> Proxy {
    udp_with_jitter(upstream, None).await
}

/// A UDP proxy for one client that holds each datagram for a random time up to `jitter` before
/// forwarding it, so that datagrams overtake one another as they may on a real network.
pub async fn udp_reordering(upstream: SocketAddr, jitter: std::time::Duration) -> Proxy {
    udp_with_jitter(upstream, Some(jitter)).await
}

async fn udp_with_jitter(upstream: SocketAddr, jitter: Option<std::time::Duration>) -> Proxy {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    let addr = front.local_addr().expect("addr");
    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    back.connect(upstream).await.expect("connect");
    let hole = Arc::new(AtomicBool::new(false));
    let h = hole.clone();
    let largest = Arc::new(AtomicUsize::new(0));
    let seen = largest.clone();
    let (drop_over, dropped) = (Arc::new(std::sync::Mutex::new((0, 0))), Arc::new(AtomicUsize::new(0)));
    let (lose_over, lost) = (drop_over.clone(), dropped.clone());
    // Forwards `datagram` through `via` (to `to`, or its connected peer), now or after a jitter.
    let forward = move |via: Arc<UdpSocket>, datagram: Vec<u8>, to: Option<SocketAddr>| async move {
        let send = async move {
            let _sent = match to {
                Some(to) => via.send_to(&datagram, to).await,
                None => via.send(&datagram).await,
            };
        };
        match jitter {
            Some(max) => {
                let wait = max.mul_f64(rand::random::<f64>());
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    send.await;
                });
            }
            None => send.await,
        }
    };
    let task = tokio::spawn(async move {
        let mut client: Option<SocketAddr> = None;
        let mut a = vec![0u8; 65536];
        let mut b = vec![0u8; 65536];
        loop {
            tokio::select! {
                r = front.recv_from(&mut a) => {
                    let Ok((n, from)) = r else { return };
                    seen.fetch_max(n, Ordering::SeqCst);
                    client = Some(from);
                    {
                        let mut lose = lose_over.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        if lose.1 > 0 && n > lose.0 {
                            lose.1 -= 1;
                            lost.fetch_add(1, Ordering::SeqCst);
                            continue;
                        }
                    }
                    if !h.load(Ordering::SeqCst) {
                        forward(back.clone(), a[..n].to_vec(), None).await;
                    }
                }
                r = back.recv(&mut b) => {
                    let Ok(n) = r else { return };
                    seen.fetch_max(n, Ordering::SeqCst);
                    if let (Some(c), false) = (client, h.load(Ordering::SeqCst)) {
                        forward(front.clone(), b[..n].to_vec(), Some(c)).await;
                    }
                }
            }
        }
    });
    Proxy { addr, hole, largest, drop_over, dropped, _task: AbortOnDrop(task) }
}

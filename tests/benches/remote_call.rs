//! Remote calls through the mesh: a typed call from node A to a gear on node B (64-byte body),
//! over a WSS link and over a QUIC link, with 1, 16 and 256 calls in flight, and through one
//! switching hop (A -> B -> C, A and C limited to one link each so A is not linked to C); next
//! to three floors measured in the same run: a TLS-over-TCP length-prefixed 64-byte echo, a
//! WebSocket-over-TLS echo, and that echo through a raw WebSocket relay, the floor of a hop
//! (sequential round trips, then 16 and 256 messages pipelined). B's own CPU time per call
//! (the relay's, the callee's, the switch's) is reported besides the total.
//!
//! Every row is measured twice: with the other nodes and the echo servers on threads of this
//! process (each with its own current-thread tokio runtime), then with each of them in a process
//! of its own (this binary started again with `GEARMESH_BENCH_ROLE`), as the mesh issue asks.
//! Node A, the caller, is always this process. Loopback, TLS from a development CA in a
//! temporary directory. The calls are made from node A's embedding code (`RunningNode::ctx`),
//! the same router path a gear's `ctx.call` takes. Run unpinned and pinned (child processes
//! inherit the CPU set):
//!
//!     cargo bench -p gearmesh-tests --bench remote_call
//!     taskset -c 0 cargo bench -p gearmesh-tests --bench remote_call
//!
//! `GEARMESH_BENCH_TURNS=N` measures instead, between processes and one call in flight, the
//! raw WSS echo, the relay, the same relay in one task, a direct call and a call through one
//! switching hop with all five connections open at once and the five taking turns, N times over (see
//! `transport/benches/link_rtt/turns.rs`): each p50 then comes from samples spread over the
//! whole run, so the ratios do not carry the machine's drift between rows.
//!
//! `GEARMESH_BENCH_QUICK=1` runs a few hundred calls per row (a smoke run, not a measurement).
//! `GEARMESH_BENCH_ONLY` (sections `floor`, `wss`, `quic`, `hop`, `procs`, `procs-wss`, ...),
//! `GEARMESH_BENCH_DEPTHS` (1, 16, 256) and `GEARMESH_BENCH_CALLS` pick rows for profiling.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use std::process::{Child, Command, Stdio};

use bytes::Bytes;
use gearmesh::{
    Node, NodeConfig, RunningNode,
    gears::{CallError, Ctx, Gear, Principal},
};
use gearmesh_transport::tls::{CertResolver, ClientTls, ClientTrust, DevCa};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[allow(dead_code)]
#[path = "../../transport/benches/link_rtt/turns.rs"]
mod turns;

/// The body size of a call and of an echo frame (length prefix included for the echo).
const SIZE: usize = 64;
const IN_FLIGHT: [usize; 3] = [1, 16, 256];

/// Whether the section `name` (`floor`, `wss`, `quic`, `hop`) runs: all of them unless
/// `GEARMESH_BENCH_ONLY` lists some (comma-separated), for profiling one path.
fn section(name: &str) -> bool {
    std::env::var("GEARMESH_BENCH_ONLY").map_or(true, |only| only.split(',').any(|s| s.trim() == name))
}

/// Whether rows with `depth` calls in flight run: all unless `GEARMESH_BENCH_DEPTHS` lists some.
fn depth(depth: usize) -> bool {
    std::env::var("GEARMESH_BENCH_DEPTHS")
        .map_or(true, |only| only.split(',').any(|s| s.trim().parse::<usize>().ok() == Some(depth)))
}

/// Calls (or round trips) per row and warm-up calls.
fn rounds() -> (usize, usize) {
    if std::env::var_os("GEARMESH_BENCH_QUICK").is_some() {
        (300, 50)
    } else if let Some(n) = std::env::var("GEARMESH_BENCH_CALLS").ok().and_then(|n| n.parse().ok()) {
        (n, 2_000)
    } else {
        (20_000, 2_000)
    }
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// One measured row: latency percentiles in microseconds and calls (or frames) per second.
struct Row {
    p50: f64,
    p99: f64,
    per_sec: f64,
    /// CPU time per call, in microseconds: the software's cost, much less sensitive to a busy
    /// machine than the latencies.
    cpu: PerCall,
}

/// CPU time per call of every process (every node, both ends) and of B alone.
#[derive(Clone, Copy)]
struct PerCall {
    all: f64,
    /// B's: the relay's, the callee's or the switch's (NaN for rows without one).
    mid: f64,
}

/// The process or thread B of a row (the relay, the callee of a direct call, or the switch of a
/// hop), whose CPU time is reported on its own.
#[derive(Clone, Debug)]
enum Middle {
    Process(u32),
    /// A thread of this process: its `/proc/self/task/<tid>` directory.
    Thread(std::path::PathBuf),
}

impl Middle {
    /// The calling thread.
    fn this_thread() -> Middle {
        let task = std::fs::read_link("/proc/thread-self").map(|t| Path::new("/proc").join(t)).unwrap_or_default();
        Middle::Thread(task)
    }

    fn cpu_ns(&self) -> f64 {
        match self {
            Middle::Process(pid) => task_cpu_ns(&format!("/proc/{pid}/task")),
            Middle::Thread(task) => std::fs::read_to_string(task.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse::<f64>().ok()))
                .unwrap_or(f64::NAN),
        }
    }
}

/// The row's B, while a row that has one runs.
static MIDDLE: std::sync::Mutex<Option<Middle>> = std::sync::Mutex::new(None);

fn set_middle(m: Option<Middle>) {
    *MIDDLE.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = m;
}

/// CPU time used so far, in nanoseconds: everything, and B alone.
#[derive(Clone, Copy)]
struct Cpu {
    all: f64,
    mid: f64,
}

impl Cpu {
    fn now() -> Cpu {
        let mid =
            MIDDLE.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref().map_or(f64::NAN, Middle::cpu_ns);
        Cpu { all: cpu_ns(), mid }
    }

    /// CPU time per call since `self`, in microseconds.
    fn per_call(self, calls: usize) -> PerCall {
        let now = Cpu::now();
        let per = |a: f64, b: f64| (b - a) / calls as f64 / 1e3;
        PerCall { all: per(self.all, now.all), mid: per(self.mid, now.mid) }
    }
}

/// The CPU time of every thread under `/proc/<pid>/task`, in nanoseconds (NaN if unreadable).
fn task_cpu_ns(dir: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir(dir) else { return f64::NAN };
    let mut total = 0u64;
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("schedstat")) else { continue };
        total += stat.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
    }
    total as f64
}

/// Processes this bench started (their CPU time counts in "CPU per call").
static CHILDREN: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// CPU time used so far by every thread of this process and of the processes it started, in
/// nanoseconds (Linux schedstat; NaN elsewhere).
fn cpu_ns() -> f64 {
    let mut procs = vec!["self".to_owned()];
    procs.extend(CHILDREN.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().map(u32::to_string));
    let ns: Vec<f64> = procs.iter().map(|p| task_cpu_ns(&format!("/proc/{p}/task"))).filter(|n| !n.is_nan()).collect();
    if ns.is_empty() { f64::NAN } else { ns.iter().sum() }
}

// === the raw floor ===

/// Starts a TLS length-prefixed echo server on its own thread.
fn tls_echo_server(resolver: Arc<CertResolver>) -> SocketAddr {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            tx.send(listener.local_addr().expect("addr")).expect("report");
            let cfg = gearmesh_transport::tls::server_config(resolver, &[]).expect("cfg");
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
            while let Ok((tcp, _)) = listener.accept().await {
                tcp.set_nodelay(true).expect("nodelay");
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(s) = acceptor.accept(tcp).await else { return };
                    let (r, mut w) = tokio::io::split(s);
                    let mut r = tokio::io::BufReader::new(r);
                    let mut buf = vec![0u8; 1 << 16];
                    loop {
                        let mut len = [0u8; 4];
                        if r.read_exact(&mut len).await.is_err() {
                            return;
                        }
                        let n = u32::from_le_bytes(len) as usize;
                        if n + 4 > buf.len() {
                            return;
                        }
                        buf[..4].copy_from_slice(&len);
                        if r.read_exact(&mut buf[4..4 + n]).await.is_err() {
                            return;
                        }
                        // Flush only when no further request is already buffered (pipelining).
                        if w.write_all(&buf[..4 + n]).await.is_err() {
                            return;
                        }
                        if r.buffer().is_empty() && w.flush().await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
    });
    rx.recv().expect("echo server up")
}

async fn tls_client(addr: SocketAddr, client: &ClientTls) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(client.wss_config()).connect(name, tcp).await.expect("tls")
}

/// Sequential round trips, then `window` frames pipelined.
async fn tls_floor(addr: SocketAddr, client: &ClientTls, window: usize) -> Row {
    let (n, warm) = rounds();
    let mut s = tls_client(addr, client).await;
    let mut msg = vec![0xabu8; SIZE];
    msg[..4].copy_from_slice(&((SIZE - 4) as u32).to_le_bytes());
    let mut back = vec![0u8; SIZE];
    let mut samples = Vec::with_capacity(n);
    let (t0, cpu0) = (Instant::now(), Cpu::now());
    if window == 1 {
        for i in 0..warm + n {
            let t = Instant::now();
            s.write_all(&msg).await.expect("write");
            s.flush().await.expect("flush");
            s.read_exact(&mut back).await.expect("read");
            if i >= warm {
                samples.push(t.elapsed().as_nanos() as u64);
            }
        }
        samples.sort_unstable();
        let secs = t0.elapsed().as_secs_f64();
        return Row {
            p50: pct(&samples, 0.5),
            p99: pct(&samples, 0.99),
            per_sec: (warm + n) as f64 / secs,
            cpu: cpu0.per_call(warm + n),
        };
    }
    // Pipelined: a writer keeps `window` frames outstanding; latency is from write to read.
    let (mut r, mut w) = tokio::io::split(s);
    let sem = Arc::new(tokio::sync::Semaphore::new(window));
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let writer = {
        let sem = sem.clone();
        tokio::spawn(async move {
            for _ in 0..n {
                sem.acquire().await.expect("sem").forget();
                sent_tx.send(Instant::now()).expect("reader alive");
                w.write_all(&msg).await.expect("write");
                w.flush().await.expect("flush");
            }
            w
        })
    };
    let (t0, cpu0) = (Instant::now(), Cpu::now());
    for _ in 0..n {
        r.read_exact(&mut back).await.expect("read");
        let sent = sent_rx.recv().await.expect("stamp");
        samples.push(sent.elapsed().as_nanos() as u64);
        sem.add_permits(1);
    }
    let secs = t0.elapsed().as_secs_f64();
    let _w = writer.await.expect("writer");
    samples.sort_unstable();
    Row { p50: pct(&samples, 0.5), p99: pct(&samples, 0.99), per_sec: n as f64 / secs, cpu: cpu0.per_call(n) }
}

/// The floor's WebSocket settings: tungstenite's defaults except a 16 KiB read buffer, as links
/// use (tungstenite zeroes its whole read buffer, 128 KiB by default, before every read).
fn floor_ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(16 * 1024)
}

/// Starts a WebSocket-over-TLS echo server (tokio-tungstenite, binary messages) on its own thread.
fn wss_echo_server(resolver: Arc<CertResolver>) -> SocketAddr {
    use futures::{SinkExt, StreamExt};
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            tx.send(listener.local_addr().expect("addr")).expect("report");
            let cfg = gearmesh_transport::tls::server_config(resolver, &[]).expect("cfg");
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
            while let Ok((tcp, _)) = listener.accept().await {
                tcp.set_nodelay(true).expect("nodelay");
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(s) = acceptor.accept(tcp).await else { return };
                    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(s, Some(floor_ws_config())).await
                    else {
                        return;
                    };
                    // Echo; flush only when no further message is already readable (pipelining).
                    while let Some(Ok(mut m)) = ws.next().await {
                        loop {
                            if m.is_binary() && ws.feed(m).await.is_err() {
                                return;
                            }
                            match futures::FutureExt::now_or_never(ws.next()) {
                                Some(Some(Ok(next))) => m = next,
                                Some(_) => return,
                                None => break,
                            }
                        }
                        if ws.flush().await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
    });
    rx.recv().expect("echo server up")
}

/// Starts a raw WebSocket-over-TLS relay on its own thread (tokio-tungstenite, as the WSS echo):
/// every connection it accepts gets a connection of its own to `upstream` (the WSS echo), and
/// each message is forwarded as it arrives, both ways. A round trip through it crosses loopback
/// four times, as a call through one switching hop does: the floor of a hop. `one_task`: each
/// connection is relayed by [`relay_in_one_task`] instead of a task per direction.
fn wss_relay_server(
    resolver: Arc<CertResolver>,
    upstream: SocketAddr,
    client: ClientTls,
    one_task: bool,
) -> (SocketAddr, Middle) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            use futures::StreamExt;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            tx.send((listener.local_addr().expect("addr"), Middle::this_thread())).expect("report");
            let cfg = gearmesh_transport::tls::server_config(resolver, &[]).expect("cfg");
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
            while let Ok((tcp, _)) = listener.accept().await {
                tcp.set_nodelay(true).expect("nodelay");
                let (acceptor, client) = (acceptor.clone(), client.clone());
                tokio::spawn(async move {
                    let Ok(s) = acceptor.accept(tcp).await else { return };
                    let Ok(down) = tokio_tungstenite::accept_async_with_config(s, Some(floor_ws_config())).await else {
                        return;
                    };
                    let up = wss_connect(upstream, &client).await;
                    if one_task {
                        relay_in_one_task(down, up).await;
                        return;
                    }
                    let ((down_w, down_r), (up_w, up_r)) = (down.split(), up.split());
                    tokio::spawn(forward(up_r, down_w));
                    forward(down_r, up_w).await;
                });
            }
        });
    });
    rx.recv().expect("relay up")
}

/// Relays binary messages both ways from one task, one at a time: no task switch and no lock
/// between reading a message and forwarding it, at the price of a flush per message (so only
/// for sequential round trips).
async fn relay_in_one_task<A, B>(mut down: A, mut up: B)
where
    A: futures::Stream<Item = Result<WsMessage, tokio_tungstenite::tungstenite::Error>>
        + futures::Sink<WsMessage>
        + Unpin,
    B: futures::Stream<Item = Result<WsMessage, tokio_tungstenite::tungstenite::Error>>
        + futures::Sink<WsMessage>
        + Unpin,
{
    use futures::{SinkExt, StreamExt};
    loop {
        let sent = tokio::select! {
            m = down.next() => match m {
                Some(Ok(m)) if m.is_binary() => up.send(m).await.is_ok(),
                Some(Ok(_)) => true,
                _ => false,
            },
            m = up.next() => match m {
                Some(Ok(m)) if m.is_binary() => down.send(m).await.is_ok(),
                Some(Ok(_)) => true,
                _ => false,
            },
        };
        if !sent {
            return;
        }
    }
}

/// Forwards binary messages from `from` to `to` until either ends; flushes only when no further
/// message is already readable (pipelining), as the echo does.
async fn forward<R, W>(mut from: R, mut to: W)
where
    R: futures::Stream<Item = Result<WsMessage, tokio_tungstenite::tungstenite::Error>> + Unpin,
    W: futures::Sink<WsMessage> + Unpin,
{
    use futures::{SinkExt, StreamExt};
    while let Some(Ok(mut m)) = from.next().await {
        loop {
            if m.is_binary() && to.feed(m).await.is_err() {
                return;
            }
            match futures::FutureExt::now_or_never(from.next()) {
                Some(Some(Ok(next))) => m = next,
                Some(_) => return,
                None => break,
            }
        }
        if to.flush().await.is_err() {
            return;
        }
    }
}

type WsMessage = tokio_tungstenite::tungstenite::Message;

/// A WebSocket-over-TLS client connection to `addr`, with the floor's settings.
async fn wss_connect(
    addr: SocketAddr,
    client: &ClientTls,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tls = tls_client(addr, client).await;
    let url = format!("wss://localhost:{}/", addr.port());
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, tls, Some(floor_ws_config()))
        .await
        .expect("websocket handshake");
    ws
}

/// The raw WebSocket-over-TLS floor: sequential round trips of a 64-byte binary message, then
/// `window` messages pipelined.
async fn wss_floor(addr: SocketAddr, client: &ClientTls, window: usize) -> Row {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (n, warm) = rounds();
    let ws = wss_connect(addr, client).await;
    let msg = Bytes::from(vec![0xabu8; SIZE]);
    let mut samples = Vec::with_capacity(n);
    if window == 1 {
        let mut ws = ws;
        let (t0, cpu0) = (Instant::now(), Cpu::now());
        for i in 0..warm + n {
            let t = Instant::now();
            ws.send(Message::Binary(msg.clone())).await.expect("send");
            ws.next().await.expect("open").expect("echo");
            if i >= warm {
                samples.push(t.elapsed().as_nanos() as u64);
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        samples.sort_unstable();
        return Row {
            p50: pct(&samples, 0.5),
            p99: pct(&samples, 0.99),
            per_sec: (warm + n) as f64 / secs,
            cpu: cpu0.per_call(warm + n),
        };
    }
    let (mut w, mut r) = ws.split();
    let sem = Arc::new(tokio::sync::Semaphore::new(window));
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let writer = {
        let sem = sem.clone();
        tokio::spawn(async move {
            for _ in 0..n {
                sem.acquire().await.expect("sem").forget();
                sent_tx.send(Instant::now()).expect("reader alive");
                w.send(Message::Binary(msg.clone())).await.expect("send");
            }
            w
        })
    };
    let (t0, cpu0) = (Instant::now(), Cpu::now());
    for _ in 0..n {
        r.next().await.expect("open").expect("echo");
        let sent = sent_rx.recv().await.expect("stamp");
        samples.push(sent.elapsed().as_nanos() as u64);
        sem.add_permits(1);
    }
    let secs = t0.elapsed().as_secs_f64();
    let _w = writer.await.expect("writer");
    samples.sort_unstable();
    Row { p50: pct(&samples, 0.5), p99: pct(&samples, 0.99), per_sec: n as f64 / secs, cpu: cpu0.per_call(n) }
}

// === nodes ===

fn bench_gear() -> Gear {
    Gear::new("bench").port("ping", |_ctx: Ctx, body: Bytes| async move { Ok::<_, CallError>(body) })
}

fn config(dir: &Path, name: &str, seeds: Vec<String>, tweak: impl FnOnce(&mut NodeConfig)) -> NodeConfig {
    let mut c = NodeConfig {
        name: Some(name.into()),
        listen: "127.0.0.1:0".parse().expect("addr"),
        seeds,
        insecure_dev: true,
        ..NodeConfig::default()
    };
    c.tls.data_dir = Some(dir.to_owned());
    tweak(&mut c);
    c
}

async fn start(config: NodeConfig, gears: Vec<Gear>) -> RunningNode {
    let mut b = Node::builder().config(config);
    for g in gears {
        b = b.gear(g);
    }
    b.build().expect("valid").start().await.expect("started")
}

/// A node on its own thread and runtime, or in a process of its own (this binary again, see
/// [`child_main`]); dropping it shuts the node down and joins the thread or the process.
struct Remote {
    links: Vec<String>,
    /// Its thread or process.
    cpu: Middle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    process: Option<Child>,
}

/// How a benchmark node is configured: its links and whether it hosts `bench`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// WSS only.
    Wss,
    /// WSS and QUIC.
    Quic,
    /// WSS only, one link at most.
    OneLink,
}

impl Shape {
    fn apply(self, c: &mut NodeConfig) {
        c.mesh.quic = self == Shape::Quic;
        if self == Shape::OneLink {
            c.mesh.min_links = 1;
            c.mesh.max_links = 1;
            // No shortcut from A to C: B switches every call.
            c.mesh.shortcut_calls = 0;
        }
    }

    fn name(self) -> &'static str {
        match self {
            Shape::Wss => "wss",
            Shape::Quic => "quic",
            Shape::OneLink => "one-link",
        }
    }

    fn parse(s: &str) -> Shape {
        match s {
            "quic" => Shape::Quic,
            "one-link" => Shape::OneLink,
            _ => Shape::Wss,
        }
    }
}

impl Remote {
    fn spawn(config: NodeConfig, gears: Vec<Gear>) -> Remote {
        let (tx, rx) = mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let node = start(config, gears).await;
                tx.send((node.link_addrs().to_vec(), Middle::this_thread())).expect("report");
                // Either a stop or the bench going away ends the node.
                let _stop_or_gone = stopped.await;
                node.shutdown().await;
            });
        });
        let (links, cpu) = rx.recv().expect("remote node up");
        Remote { links, cpu, stop: Some(stop), thread: Some(thread), process: None }
    }

    /// Starts a node in a process of its own.
    fn spawn_process(dir: &Path, name: &str, seed: Option<String>, shape: Shape, gear: bool) -> Remote {
        let mut env = vec![
            ("GEARMESH_BENCH_DIR", dir.display().to_string()),
            ("GEARMESH_BENCH_NAME", name.to_owned()),
            ("GEARMESH_BENCH_SHAPE", shape.name().to_owned()),
            ("GEARMESH_BENCH_GEAR", if gear { "1" } else { "0" }.to_owned()),
        ];
        if let Some(seed) = seed {
            env.push(("GEARMESH_BENCH_SEED", seed));
        }
        let (process, line) = spawn_child("node", &env);
        let links = line.split(',').map(str::to_owned).collect();
        Remote { links, cpu: Middle::Process(process.id()), stop: None, thread: None, process: Some(process) }
    }

    fn link(&self, scheme: &str) -> String {
        self.links.iter().find(|l| l.starts_with(scheme)).expect("link url").clone()
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // The node thread may already be gone; nothing to stop then.
            let _gone = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _joined = t.join();
        }
        if let Some(p) = self.process.take() {
            stop_child(p);
        }
    }
}

// === separate processes ===

/// Starts this binary again as `role`; returns the process and the first line it prints (its
/// address or its link URLs). The child lives until its standard input closes.
fn spawn_child(role: &str, env: &[(&str, String)]) -> (Child, String) {
    use std::io::BufRead;
    let exe = std::env::current_exe().expect("this binary");
    let mut child = Command::new(exe)
        .env("GEARMESH_BENCH_ROLE", role)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("child process");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("child stdout");
    std::io::BufReader::new(stdout).read_line(&mut line).expect("child reports");
    CHILDREN.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(child.id());
    (child, line.trim().to_owned())
}

/// Closes the child's standard input (it then shuts down) and waits for it, killing it after 10 s.
fn stop_child(mut child: Child) {
    CHILDREN.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|p| *p != child.id());
    drop(child.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _killed = child.kill();
    let _reaped = child.wait();
}

/// Blocks until standard input closes: the parent is done with this child (or gone).
fn wait_for_parent() {
    use std::io::Read;
    let mut sink = Vec::new();
    let _eof = std::io::stdin().read_to_end(&mut sink);
}

/// The certificate every separate-process floor serves: from the development CA in `dir`.
fn dir_resolver(dir: &Path) -> Arc<CertResolver> {
    let ca = DevCa::load_or_create(dir).expect("CA");
    let cert = ca.issue(&["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("cert");
    CertResolver::from_cert(&cert).expect("resolver")
}

/// Runs this binary as a child when `GEARMESH_BENCH_ROLE` says so: `tls-echo`, `wss-echo`,
/// `wss-relay` or `wss-relay-one-task` (to the WSS echo at `GEARMESH_BENCH_UPSTREAM`) or `node`. Returns false when it
/// is the bench itself.
fn child_main() -> bool {
    let Ok(role) = std::env::var("GEARMESH_BENCH_ROLE") else { return false };
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let dir = std::path::PathBuf::from(var("GEARMESH_BENCH_DIR"));
    match role.as_str() {
        "tls-echo" | "wss-echo" => {
            let resolver = dir_resolver(&dir);
            let addr = if role == "tls-echo" { tls_echo_server(resolver) } else { wss_echo_server(resolver) };
            println!("{addr}");
            wait_for_parent();
        }
        "wss-relay" | "wss-relay-one-task" => {
            let upstream = var("GEARMESH_BENCH_UPSTREAM").parse().expect("upstream address");
            let ca = DevCa::load_or_create(&dir).expect("CA");
            let client = ClientTls::new(&ClientTrust::dev_ca(&ca)).expect("client tls");
            let one_task = role == "wss-relay-one-task";
            println!("{}", wss_relay_server(dir_resolver(&dir), upstream, client, one_task).0);
            wait_for_parent();
        }
        "node" => {
            let shape = Shape::parse(&var("GEARMESH_BENCH_SHAPE"));
            let seeds = std::env::var("GEARMESH_BENCH_SEED").map(|s| vec![s]).unwrap_or_default();
            let gears = if var("GEARMESH_BENCH_GEAR") == "1" { vec![bench_gear()] } else { vec![] };
            let config = config(&dir, &var("GEARMESH_BENCH_NAME"), seeds, |c| shape.apply(c));
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let node = start(config, gears).await;
                println!("{}", node.link_addrs().join(","));
                let _parent_done = tokio::task::spawn_blocking(wait_for_parent).await;
                node.shutdown().await;
            });
        }
        other => panic!("unknown bench role {other}"),
    }
    true
}

/// Waits until `a` routes to a node hosting `gear` in exactly `hops` links.
async fn wait_route(a: &RunningNode, gear: &str, hops: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let view = a.mesh().view();
        let found = view.nodes.iter().any(|n| {
            n.state == "alive"
                && n.gears.iter().any(|g| g.name == gear)
                && n.route.as_ref().is_some_and(|r| r.hops == hops)
        });
        if found {
            return;
        }
        assert!(Instant::now() < deadline, "no {hops}-hop route to {gear}: {view:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `window` tasks call `bench.ping` until `n` calls are done (after `warm` warm-up calls).
async fn calls(ctx: &Ctx, window: usize) -> Row {
    let (n, warm) = rounds();
    let body = Bytes::from(vec![0xcd; SIZE]);
    for _ in 0..warm {
        let _: Bytes = ctx.call("bench", "ping", &body).await.expect("warm-up call");
    }
    let per_task = n / window;
    let (t0, cpu0) = (Instant::now(), Cpu::now());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..window {
        let (ctx, body) = (ctx.clone(), body.clone());
        tasks.spawn(async move {
            let mut samples = Vec::with_capacity(per_task);
            for _ in 0..per_task {
                let t = Instant::now();
                let _: Bytes = ctx.call("bench", "ping", &body).await.expect("call");
                samples.push(t.elapsed().as_nanos() as u64);
            }
            samples
        });
    }
    let mut samples = Vec::with_capacity(n);
    while let Some(s) = tasks.join_next().await {
        samples.extend(s.expect("caller task"));
    }
    let secs = t0.elapsed().as_secs_f64();
    samples.sort_unstable();
    Row {
        p50: pct(&samples, 0.5),
        p99: pct(&samples, 0.99),
        per_sec: samples.len() as f64 / secs,
        cpu: cpu0.per_call(samples.len()),
    }
}

/// The floors at one depth: raw TLS, raw WebSocket over TLS, and raw WebSocket over TLS through
/// a relay (the floor of one switching hop).
struct Floor {
    tls: Row,
    wss: Row,
    relay: Row,
}

/// Prints one row; `hop`: the row goes through a relay or a switch, and its ratio to the relay
/// floor is shown too.
fn print_row(system: &str, window: usize, row: &Row, floor: &Floor, hop: bool) {
    let x_relay = if hop { format!("{:.2}x", row.p50 / floor.relay.p50) } else { "-".to_owned() };
    let mid = if row.cpu.mid.is_nan() { "-".to_owned() } else { format!("{:.1} us", row.cpu.mid) };
    println!(
        "| {system} | {window} | {:.1} us | {:.2}x | {:.2}x | {:.1} us | {:.0} | {:.1} us | {x_relay} | {mid} |",
        row.p50,
        row.p50 / floor.tls.p50,
        row.p50 / floor.wss.p50,
        row.p99,
        row.per_sec,
        row.cpu.all
    );
}

/// Whether a section runs: `name` among in-process rows, or, for the rows between separate
/// processes, `procs` or `procs-<name>` (all of them unless `GEARMESH_BENCH_ONLY` is set).
fn section_in(procs: bool, name: &str) -> bool {
    if procs { section("procs") || section(&format!("procs-{name}")) } else { section(name) }
}

/// Where the floors' servers listen.
struct Echoes {
    /// The TLS length-prefixed echo.
    tls: SocketAddr,
    /// The WebSocket-over-TLS echo.
    wss: SocketAddr,
    /// The relay to the WebSocket-over-TLS echo.
    relay: SocketAddr,
    /// The relay's process or thread.
    relay_cpu: Middle,
}

/// The floors at every depth (NaN where filtered out).
async fn measure_floors(echo: &Echoes, client: &ClientTls, procs: bool) -> Vec<Floor> {
    let label = if procs { ", separate processes" } else { "" };
    let mut floors = Vec::new();
    for w in IN_FLIGHT {
        let nan =
            || Row { p50: f64::NAN, p99: f64::NAN, per_sec: f64::NAN, cpu: PerCall { all: f64::NAN, mid: f64::NAN } };
        let floor = if section_in(procs, "floor") && depth(w) {
            Floor {
                tls: tls_floor(echo.tls, client, w).await,
                wss: wss_floor(echo.wss, client, w).await,
                relay: {
                    set_middle(Some(echo.relay_cpu.clone()));
                    let row = wss_floor(echo.relay, client, w).await;
                    set_middle(None);
                    row
                },
            }
        } else {
            Floor { tls: nan(), wss: nan(), relay: nan() }
        };
        if !floor.tls.p50.is_nan() {
            print_row(&format!("raw TLS echo (floor){label}"), w, &floor.tls, &floor, false);
            print_row(&format!("raw WSS echo (floor){label}"), w, &floor.wss, &floor, false);
            print_row(&format!("raw WSS echo through a relay (hop floor){label}"), w, &floor.relay, &floor, true);
        }
        floors.push(floor);
    }
    floors
}

/// Starts node A joined through node `b`, waits for a route of `hops` links to `bench`, and prints
/// one row per depth, with `b`'s own CPU time (the callee's, or the switch's).
async fn rows_from_a(dir: &Path, b: &Remote, shape: Shape, hops: u32, system: &str, floors: &[Floor]) {
    let seed = b.link(if shape == Shape::Quic { "quic://" } else { "wss://" });
    let a = start(config(dir, "a", vec![seed], |c| shape.apply(c)), vec![]).await;
    wait_route(&a, "bench", hops).await;
    let ctx = a.ctx(Principal::anonymous());
    for (w, floor) in IN_FLIGHT.iter().zip(floors).filter(|(w, _)| depth(**w)) {
        set_middle(Some(b.cpu.clone()));
        let row = calls(&ctx, *w).await;
        set_middle(None);
        print_row(system, *w, &row, floor, hops > 1);
    }
    a.shutdown().await;
}

/// The mesh rows: direct over WSS, direct over QUIC, one switching hop; the other nodes on
/// threads of this process, or in processes of their own.
async fn mesh_rows(dir: &Path, floors: &[Floor], procs: bool) {
    let label = if procs { ", separate processes" } else { "" };
    let remote = |name: &str, seed: Option<String>, shape: Shape, gear: bool| {
        if procs {
            Remote::spawn_process(dir, name, seed, shape, gear)
        } else {
            let gears = if gear { vec![bench_gear()] } else { vec![] };
            Remote::spawn(config(dir, name, seed.into_iter().collect(), |c| shape.apply(c)), gears)
        }
    };
    if section_in(procs, "wss") {
        // A -> B over WSS (QUIC off on both, so the link can only be WebSocket).
        let b = remote("b-wss", None, Shape::Wss, true);
        rows_from_a(dir, &b, Shape::Wss, 1, &format!("direct call, WSS link{label}"), floors).await;
    }
    if section_in(procs, "quic") {
        // A -> B over QUIC (A joins through B's quic:// address).
        let b = remote("b-quic", None, Shape::Quic, true);
        rows_from_a(dir, &b, Shape::Quic, 1, &format!("direct call, QUIC link{label}"), floors).await;
    }
    if section_in(procs, "hop") {
        // A -> B -> C over WSS: A and C keep one link each (to B), so B switches every frame.
        let b = remote("b-hop", None, Shape::Wss, false);
        let _c = remote("c-hop", Some(b.link("wss://")), Shape::OneLink, true);
        let system = format!("one switching hop, WSS links{label}");
        rows_from_a(dir, &b, Shape::OneLink, 2, &system, floors).await;
    }
}

/// A message sent on a raw WebSocket and its echo received.
struct WsPing {
    ws: tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    msg: Bytes,
}

impl turns::RoundTrip for WsPing {
    async fn once(&mut self) {
        use futures::{SinkExt, StreamExt};
        self.ws.send(tokio_tungstenite::tungstenite::Message::Binary(self.msg.clone())).await.expect("send");
        self.ws.next().await.expect("open").expect("echo");
    }
}

/// One call to `bench.ping`.
struct CallPing {
    ctx: Ctx,
    body: Bytes,
}

impl turns::RoundTrip for CallPing {
    async fn once(&mut self) {
        let _: Bytes = self.ctx.call("bench", "ping", &self.body).await.expect("call");
    }
}

/// The floors' echo servers (TLS, WSS, and the relay to the WSS echo), each in a process of its
/// own (this binary again), and a client trusting the CA in `dir`. Stop the processes with
/// [`stop_child`].
fn floor_processes(dir: &Path) -> (ClientTls, Echoes, [Child; 3]) {
    let dev_ca = DevCa::load_or_create(dir).expect("CA");
    let client = ClientTls::new(&ClientTrust::dev_ca(&dev_ca)).expect("client tls");
    let env = [("GEARMESH_BENCH_DIR", dir.display().to_string())];
    let (tls_child, tls_addr) = spawn_child("tls-echo", &env);
    let (wss_child, wss_addr) = spawn_child("wss-echo", &env);
    let relay_env = [env[0].clone(), ("GEARMESH_BENCH_UPSTREAM", wss_addr.clone())];
    let (relay_child, relay_addr) = spawn_child("wss-relay", &relay_env);
    let echo = Echoes {
        tls: tls_addr.parse().expect("TLS echo address"),
        wss: wss_addr.parse().expect("WSS echo address"),
        relay: relay_addr.parse().expect("relay address"),
        relay_cpu: Middle::Process(relay_child.id()),
    };
    (client, echo, [relay_child, tls_child, wss_child])
}

/// The interleaved mode (`GEARMESH_BENCH_TURNS`): between processes, one call in flight.
async fn interleaved(dir: &Path, turn_count: usize) {
    let (client, echo, children) = floor_processes(dir);
    let one_task_env =
        [("GEARMESH_BENCH_DIR", dir.display().to_string()), ("GEARMESH_BENCH_UPSTREAM", echo.wss.to_string())];
    let (one_task_child, one_task_relay) = spawn_child("wss-relay-one-task", &one_task_env);
    let one_task_relay: SocketAddr = one_task_relay.parse().expect("relay address");
    let b = Remote::spawn_process(dir, "b-wss", None, Shape::Wss, true);
    let hop_b = Remote::spawn_process(dir, "b-hop", None, Shape::Wss, false);
    let _hop_c = Remote::spawn_process(dir, "c-hop", Some(hop_b.link("wss://")), Shape::OneLink, true);
    let a = start(config(dir, "a", vec![b.link("wss://")], |c| Shape::Wss.apply(c)), vec![]).await;
    let hop_a = start(config(dir, "a-hop", vec![hop_b.link("wss://")], |c| Shape::OneLink.apply(c)), vec![]).await;
    wait_route(&a, "bench", 1).await;
    wait_route(&hop_a, "bench", 2).await;
    let msg = Bytes::from(vec![0xabu8; SIZE]);
    let body = Bytes::from(vec![0xcd; SIZE]);
    let ws = |addr: SocketAddr| {
        let (client, msg) = (client.clone(), msg.clone());
        async move { WsPing { ws: wss_connect(addr, &client).await, msg } }
    };
    let systems = [
        turns::Turns::spawn("raw WSS echo (floor)", SIZE, ws(echo.wss).await),
        turns::Turns::spawn("raw WSS echo through a relay (hop floor)", SIZE, ws(echo.relay).await),
        turns::Turns::spawn("raw WSS echo through a one-task relay", SIZE, ws(one_task_relay).await),
        turns::Turns::spawn(
            "direct call, WSS link",
            SIZE,
            CallPing { ctx: a.ctx(Principal::anonymous()), body: body.clone() },
        ),
        turns::Turns::spawn(
            "one switching hop, WSS links",
            SIZE,
            CallPing { ctx: hop_a.ctx(Principal::anonymous()), body },
        ),
    ];
    let (n, warm) = rounds();
    let samples = turns::take_turns(&systems, warm, n, turn_count).await;
    let p50: Vec<f64> = samples.iter().map(|s| pct(s, 0.5)).collect();
    println!(
        "interleaved, separate processes, 1 in flight: {turn_count} turns of {} each, order rotating",
        n / turn_count.max(1)
    );
    println!("| system | p50 | x WSS floor | x relay floor | p99 |");
    println!("|---|---:|---:|---:|---:|");
    for (i, (t, s)) in systems.iter().zip(&samples).enumerate() {
        let relay = if i >= 1 { format!("{:.2}x", p50[i] / p50[1]) } else { "-".to_owned() };
        println!("| {} | {:.1} us | {:.2}x | {relay} | {:.1} us |", t.system, p50[i], p50[i] / p50[0], pct(s, 0.99));
    }
    a.shutdown().await;
    hop_a.shutdown().await;
    children.into_iter().for_each(stop_child);
    stop_child(one_task_child);
}

fn main() {
    if child_main() {
        return;
    }
    gearmesh::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    if let Some(t) = std::env::var("GEARMESH_BENCH_TURNS").ok().and_then(|v| v.parse::<usize>().ok()) {
        rt.block_on(interleaved(dir.path(), t));
        return;
    }
    let ca = DevCa::generate().expect("CA");
    let cert = ca.issue(&["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("cert");
    let resolver = CertResolver::from_cert(&cert).expect("resolver");
    let client = ClientTls::new(&ClientTrust::dev_ca(&ca)).expect("client tls");
    let wss = wss_echo_server(Arc::clone(&resolver));
    let (relay, relay_cpu) = wss_relay_server(Arc::clone(&resolver), wss, client.clone(), false);
    let echo = Echoes { tls: tls_echo_server(resolver), wss, relay, relay_cpu };

    rt.block_on(async move {
        let (n, _) = rounds();
        println!(
            "remote_call: {SIZE} B bodies, {n} calls per row; p50/p99 per call, calls/s; ratios = p50 / floor p50"
        );
        println!(
            "| system | in flight | p50 | x TLS | x WSS | p99 | calls/s | CPU per call | x relay | B's CPU per call |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let floors = measure_floors(&echo, &client, false).await;
        mesh_rows(dir.path(), &floors, false).await;

        // The same between separate processes: the floors' echo servers and the other nodes
        // run in processes of their own (this binary again), node A stays here.
        if ["floor", "wss", "quic", "hop"].iter().any(|s| section_in(true, s)) {
            let (client, echo, children) = floor_processes(dir.path());
            let floors = measure_floors(&echo, &client, true).await;
            children.into_iter().for_each(stop_child);
            mesh_rows(dir.path(), &floors, true).await;
        }
    });
}

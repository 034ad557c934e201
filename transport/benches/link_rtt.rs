//! Link benchmark: round-trip latency (p50/p99) of 64 B and 4 KiB frames over WSS and QUIC
//! links, next to a raw TLS-over-TCP length-prefixed ping-pong measured in the same run, echo
//! throughput, and the cost of encoding and decoding a frame.
//!
//! Each side runs on its own thread with a current-thread tokio runtime, over loopback with real
//! TLS. Run unpinned and pinned:
//!   cargo bench -p gearmesh-transport --bench link_rtt
//!   taskset -c 0 cargo bench -p gearmesh-transport --bench link_rtt
//! `GEARMESH_BENCH_TURNS=20` measures the round trips with the systems taking turns instead of
//! one row after another (see `link_rtt/turns.rs`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use gearmesh_transport::frame::{DEFAULT_MAX_FRAME_LEN, HEADER_LEN, decode};
use gearmesh_transport::quic::QuicEndpoint;
use gearmesh_transport::tls::{CertResolver, ClientTls, ClientTrust, DevCa};
use gearmesh_transport::{
    AcceptConfig, Acceptor, BodyKind, Call, Dialer, Frame, FrameHandler, Hello, Link, LinkSender, LinkSetup, NodeId,
    Route, https,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[path = "link_rtt/proto.rs"]
mod proto;
#[path = "link_rtt/turns.rs"]
mod turns;

const RTT_ROUNDS: usize = 10_000;

/// Sequential round trips per row: [`RTT_ROUNDS`], or `GEARMESH_BENCH_ROUNDS` (for profiling).
fn rtt_rounds() -> usize {
    std::env::var("GEARMESH_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(RTT_ROUNDS)
}
const WARMUP: usize = 1_000;
const THROUGHPUT_FRAMES: usize = 50_000;
const WINDOW: usize = 64;

fn setup(tag: u8) -> LinkSetup {
    LinkSetup::new(Hello { node_id: NodeId([tag; 16]), ..Hello::default() })
}

struct Servers {
    tls_addr: SocketAddr,
    wss_addr: SocketAddr,
    quic_addr: SocketAddr,
    raw_quic_addr: SocketAddr,
    proto_addr: SocketAddr,
}

/// Starts the echo servers on their own thread; returns their addresses.
fn start_servers(resolver: Arc<CertResolver>) -> Servers {
    let resolver_for_raw = resolver.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            // Raw TLS echo.
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let tls_addr = listener.local_addr().expect("addr");
            let cfg = gearmesh_transport::tls::server_config(resolver.clone(), &[]).expect("cfg");
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    tcp.set_nodelay(true).expect("nodelay");
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let Ok(s) = acceptor.accept(tcp).await else { return };
                        echo_length_prefixed(s).await;
                    });
                }
            });
            // Links: WSS through the axum router, and QUIC.
            let (link_acceptor, mut incoming) = Acceptor::new(setup(2), AcceptConfig::default());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let wss_addr = listener.local_addr().expect("addr");
            let https_cfg = gearmesh_transport::tls::https_server_config(resolver.clone()).expect("cfg");
            let router: axum::Router = link_acceptor.router();
            let forever = tokio_util::sync::CancellationToken::new();
            tokio::spawn(https::serve(listener, Some(https_cfg), router, https::ServeOptions::default(), forever));
            let quic = QuicEndpoint::bind("127.0.0.1:0".parse().expect("addr"), Some(resolver), None).expect("quic");
            let quic_addr = quic.local_addr().expect("addr");
            tokio::spawn(quic.serve(link_acceptor));
            // Raw quinn echo: one bidirectional stream, length-prefixed messages.
            let raw_config = raw_quic_server_config(resolver_for_raw);
            let raw_proto = proto::ProtoSide::bind(Some(Arc::new(raw_config.clone())));
            let proto_addr = raw_proto.local_addr();
            tokio::spawn(raw_proto.serve_echo());
            let raw_quic = raw_quic_endpoint(Some(raw_config));
            let raw_quic_addr = raw_quic.local_addr().expect("addr");
            tokio::spawn(async move {
                while let Some(incoming) = raw_quic.accept().await {
                    tokio::spawn(async move {
                        let Ok(conn) = incoming.await else { return };
                        let Ok((send, recv)) = conn.accept_bi().await else { return };
                        echo_length_prefixed(tokio::io::join(recv, send)).await;
                    });
                }
            });
            tx.send(Servers { tls_addr, wss_addr, quic_addr, raw_quic_addr, proto_addr }).expect("report");
            while let Some(link) = incoming.accept().await {
                let in_handler = link.peer().node_id == HANDLER_ECHO_PEER;
                let (tx, mut rx) = link.split();
                if in_handler {
                    rx.into_handler(Box::new(HandlerEcho(tx)));
                    continue;
                }
                tokio::spawn(async move {
                    while let Some(Ok(f)) = rx.recv().await {
                        if tx.send(&f).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
    });
    rx.recv().expect("servers up")
}

/// The dialer's id that asks the echo servers to echo in the link's handler.
const HANDLER_ECHO_PEER: NodeId = NodeId([3; 16]);

/// Echoes each frame from inside the link's own task, as a node serves a call that answers at
/// once (`FrameHandler`): no task switch to an echo task, and a non-blocking send.
struct HandlerEcho(LinkSender);

impl FrameHandler for HandlerEcho {
    fn on_frame(&mut self, frame: Frame) {
        // The round trips and the throughput window (64) stay far below the send queue.
        let _ = self.0.try_send(&frame);
    }

    fn on_closed(&mut self, _close: &gearmesh_transport::CloseReason) {}
}

/// ALPN of the raw quinn floor (any value both ends agree on).
const RAW_ALPN: &[u8] = b"bench";

/// The raw quinn floors' transport settings: quinn's defaults, but for the datagram size, which
/// may grow as far as the links' may ([`gearmesh_transport::quic::MAX_UDP_PAYLOAD`]), so that
/// the floors and the links send the same datagrams. (Only ping-pongs run on the raw floors:
/// one frame in flight never makes a batch larger than one `sendmsg` takes.)
fn raw_quic_transport() -> Arc<quinn::TransportConfig> {
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(gearmesh_transport::quic::MAX_UDP_PAYLOAD);
    let mut t = quinn::TransportConfig::default();
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

/// The raw quinn floors' endpoint settings: datagrams as large as the links'.
pub(crate) fn raw_quic_endpoint_config() -> quinn::EndpointConfig {
    let mut e = quinn::EndpointConfig::default();
    e.max_udp_payload_size(gearmesh_transport::quic::MAX_UDP_PAYLOAD).expect("payload size");
    e
}

/// A raw quinn endpoint on loopback, accepting with `server` if given.
fn raw_quic_endpoint(server: Option<quinn::ServerConfig>) -> quinn::Endpoint {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp bind");
    let runtime = quinn::default_runtime().expect("runtime");
    quinn::Endpoint::new(raw_quic_endpoint_config(), server, socket, runtime).expect("raw quic endpoint")
}

/// The raw quinn floors' server config.
fn raw_quic_server_config(resolver: Arc<CertResolver>) -> quinn::ServerConfig {
    let tls = gearmesh_transport::tls::server_config(resolver, &[RAW_ALPN]).expect("tls");
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).expect("quic tls");
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(raw_quic_transport());
    config
}

/// The raw quinn floors' client config: trusts `ca`.
fn raw_quic_client_config(ca: &DevCa) -> quinn::ClientConfig {
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.add(ca.cert_der()).expect("root");
    let mut tls = tokio_rustls::rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    tls.alpn_protocols = vec![RAW_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(raw_quic_transport());
    config
}

/// The raw quinn ping-pong: one bidirectional stream, `size`-byte messages (the floor under
/// QUIC links, which add framing, a control stream each way and the link driver).
async fn raw_quic_rtt(addr: SocketAddr, ca: &DevCa, size: usize) -> (f64, f64, f64) {
    let (_ep, conn, send, recv) = raw_quic_connect(addr, ca).await;
    tokio::spawn(async move {
        let (p50, p99) = ping_pong(&mut tokio::io::join(recv, send), size).await;
        conn.close(0u32.into(), b"done");
        (p50, p99, 0.0)
    })
    .await
    .expect("round-trip task")
}

/// A quinn connection to the raw echo server at `addr`, with one bidirectional stream open.
async fn raw_quic_connect(
    addr: SocketAddr,
    ca: &DevCa,
) -> (quinn::Endpoint, quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    let mut ep = raw_quic_endpoint(None);
    ep.set_default_client_config(raw_quic_client_config(ca));
    let conn = ep.connect(addr, "localhost").expect("connect").await.expect("handshake");
    let (send, recv) = conn.open_bi().await.expect("stream");
    (ep, conn, send, recv)
}

/// Echoes length-prefixed messages (a little-endian `u32` length, then that many bytes) until
/// the connection ends: the server side of the raw floors.
async fn echo_length_prefixed(mut s: impl AsyncRead + AsyncWrite + Unpin) {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let mut len = [0u8; 4];
        if s.read_exact(&mut len).await.is_err() {
            return;
        }
        let n = u32::from_le_bytes(len) as usize;
        if n + 4 > buf.len() {
            return;
        }
        buf[..4].copy_from_slice(&len);
        if s.read_exact(&mut buf[4..4 + n]).await.is_err() {
            return;
        }
        if s.write_all(&buf[..4 + n]).await.is_err() || s.flush().await.is_err() {
            return;
        }
    }
}

/// The client side of the raw floors: sequential round trips of one `size`-byte
/// length-prefixed message; p50 and p99 in microseconds.
async fn ping_pong(s: &mut (impl AsyncRead + AsyncWrite + Unpin), size: usize) -> (f64, f64) {
    let mut msg = vec![0xabu8; size];
    msg[..4].copy_from_slice(&((size - 4) as u32).to_le_bytes());
    let mut back = vec![0u8; size];
    let mut rounds = RoundTrips::new();
    while let Some(started) = rounds.start() {
        s.write_all(&msg).await.expect("write");
        s.flush().await.expect("flush");
        s.read_exact(&mut back).await.expect("read");
        rounds.done(started);
    }
    rounds.p50_p99()
}

/// Sequential round trips: [`WARMUP`] untimed ones, then [`rtt_rounds`] timed ones.
struct RoundTrips {
    warm_left: usize,
    timed_left: usize,
    samples: Vec<u64>,
}

impl RoundTrips {
    fn new() -> Self {
        let rounds = rtt_rounds();
        RoundTrips { warm_left: WARMUP, timed_left: rounds, samples: Vec::with_capacity(rounds) }
    }

    /// Starts the next round trip, if any is left.
    fn start(&mut self) -> Option<Instant> {
        (self.warm_left + self.timed_left > 0).then(Instant::now)
    }

    /// Ends the round trip started at `started`.
    fn done(&mut self, started: Instant) {
        if self.warm_left > 0 {
            self.warm_left -= 1;
        } else {
            self.timed_left -= 1;
            self.samples.push(started.elapsed().as_nanos() as u64);
        }
    }

    /// p50 and p99 in microseconds.
    fn p50_p99(mut self) -> (f64, f64) {
        self.samples.sort_unstable();
        (pct(&self.samples, 0.5), pct(&self.samples, 0.99))
    }
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

struct Row {
    system: &'static str,
    size: usize,
    p50: f64,
    p99: f64,
    fps: f64,
}

fn gossip(size: usize) -> Frame {
    Frame::Gossip { payload: Bytes::from(vec![0xab; size - HEADER_LEN]) }
}

fn call(size: usize) -> Frame {
    let mut c = Call {
        route: Route::default(),
        call_id: 1,
        deadline_ms: 1000,
        trace_id: 7,
        caller: "user:alice".into(),
        scopes: vec![],
        gear: "echo".into(),
        port: "ping".into(),
        body_kind: BodyKind::Bytes,
        body: Bytes::new(),
    };
    let fixed = Frame::Call(c.clone()).encoded_len();
    c.body = Bytes::from(vec![0xcd; size.saturating_sub(fixed)]);
    Frame::Call(c)
}

/// One row for a link: dialed to `url`, round trips of `frame`, then echo throughput.
async fn link_row(dialer: &Dialer, url: &str, frame: Frame, system: &'static str, size: usize) -> Row {
    let link = dialer.dial(url).await.expect("link");
    let (link, p50, p99) = link_rtt(link, &frame).await;
    let fps = link_throughput(link, &frame).await;
    Row { system, size, p50, p99, fps }
}

/// Round trips on `link`, measured from a spawned task, as a node's callers run (a runtime's
/// `block_on` future is polled differently: waking it makes the runtime poll for I/O first).
async fn link_rtt(link: Link, frame: &Frame) -> (Link, f64, f64) {
    let frame = frame.clone();
    tokio::spawn(async move {
        let mut link = link;
        let (p50, p99) = link_rtt_in_task(&mut link, &frame).await;
        (link, p50, p99)
    })
    .await
    .expect("round-trip task")
}

async fn link_rtt_in_task(link: &mut Link, frame: &Frame) -> (f64, f64) {
    let mut rounds = RoundTrips::new();
    while let Some(started) = rounds.start() {
        link.send(frame).await.expect("send");
        link.recv().await.expect("open").expect("frame");
        rounds.done(started);
    }
    rounds.p50_p99()
}

/// The link dialers: one whose links the echo servers answer from a task reading `recv()`, one
/// ([`HANDLER_ECHO_PEER`]) whose links they answer from the link's handler. Both dial QUIC too.
fn dialers(client: &ClientTls) -> (Dialer, Dialer) {
    let quic_ep = QuicEndpoint::bind("127.0.0.1:0".parse().expect("addr"), None, Some(client)).expect("quic");
    let dialer = Dialer::new(setup(1), client.clone()).with_quic(quic_ep.clone());
    (dialer, Dialer::new(setup(HANDLER_ECHO_PEER.0[0]), client.clone()).with_quic(quic_ep))
}

/// Whether the row `row` runs: `GEARMESH_BENCH_ONLY=tls,mem,wss,wss-handler,raw-quic,quic,
/// quic-handler,quic-call` picks rows (for profiling one path), and `raw-proto` in the
/// interleaved mode; all of them when unset.
fn want(row: &str) -> bool {
    std::env::var("GEARMESH_BENCH_ONLY").map_or(true, |o| o.split(',').any(|w| w == row))
}

/// The frame sizes: `GEARMESH_BENCH_SIZES=64` picks some; 64 and 4096 B when unset.
fn sizes() -> Vec<usize> {
    std::env::var("GEARMESH_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|v| v.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![64, 4096])
}

/// `GEARMESH_BENCH_RTT_ONLY=1` skips the throughput runs (for profiling the round trip alone).
fn rtt_only() -> bool {
    std::env::var_os("GEARMESH_BENCH_RTT_ONLY").is_some()
}

async fn link_throughput(link: Link, frame: &Frame) -> f64 {
    if rtt_only() {
        return 0.0;
    }
    let (tx, mut rx) = link.split();
    let window = Arc::new(tokio::sync::Semaphore::new(WINDOW));
    let t = Instant::now();
    let sender = {
        let frame = frame.clone();
        let window = window.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            for _ in 0..THROUGHPUT_FRAMES {
                window.acquire().await.expect("sem").forget();
                tx.send(&frame).await.expect("send");
            }
        })
    };
    for _ in 0..THROUGHPUT_FRAMES {
        rx.recv().await.expect("open").expect("frame");
        window.add_permits(1);
    }
    let fps = THROUGHPUT_FRAMES as f64 / t.elapsed().as_secs_f64();
    sender.await.expect("sender");
    tx.close(gearmesh_transport::CloseCode::NORMAL, "done").await;
    drop(rx);
    fps
}

async fn tls_client(addr: SocketAddr, client: &ClientTls) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(client.wss_config()).connect(name, tcp).await.expect("tls")
}

/// The raw TLS ping-pong, from a spawned task like the links' (see [`link_rtt`]).
async fn tls_rtt(addr: SocketAddr, client: &ClientTls, size: usize) -> (f64, f64, f64) {
    let s = tls_client(addr, client).await;
    tokio::spawn(tls_rtt_in_task(s, size)).await.expect("round-trip task")
}

async fn tls_rtt_in_task(
    mut s: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    size: usize,
) -> (f64, f64, f64) {
    let (p50, p99) = ping_pong(&mut s, size).await;
    if rtt_only() {
        return (p50, p99, 0.0);
    }
    // Echo throughput with a window of WINDOW messages in flight.
    let (mut r, mut w) = tokio::io::split(s);
    let mut msg = vec![0xabu8; size];
    msg[..4].copy_from_slice(&((size - 4) as u32).to_le_bytes());
    let mut back = vec![0u8; size];
    let window = Arc::new(tokio::sync::Semaphore::new(WINDOW));
    let t = Instant::now();
    let sender = {
        let window = window.clone();
        let msg = msg.clone();
        tokio::spawn(async move {
            for _ in 0..THROUGHPUT_FRAMES {
                window.acquire().await.expect("sem").forget();
                w.write_all(&msg).await.expect("write");
                w.flush().await.expect("flush");
            }
        })
    };
    for _ in 0..THROUGHPUT_FRAMES {
        r.read_exact(&mut back).await.expect("read");
        window.add_permits(1);
    }
    let fps = THROUGHPUT_FRAMES as f64 / t.elapsed().as_secs_f64();
    sender.await.expect("sender");
    (p50, p99, fps)
}

fn codec_bench() {
    let frame = call(64 + 76);
    let mut buf = BytesMut::with_capacity(4096);
    let n = 1_000_000;
    let t = Instant::now();
    for _ in 0..n {
        frame.encode(&mut buf, DEFAULT_MAX_FRAME_LEN).expect("encode");
        buf.clear();
    }
    let enc = t.elapsed().as_nanos() as f64 / n as f64;
    frame.encode(&mut buf, DEFAULT_MAX_FRAME_LEN).expect("encode");
    let bytes = buf.split().freeze();
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(decode(std::hint::black_box(&bytes), DEFAULT_MAX_FRAME_LEN).expect("decode"));
    }
    let dec = t.elapsed().as_nanos() as f64 / n as f64;
    println!("codec: Call frame of {} bytes (64 B body): encode {enc:.0} ns, decode {dec:.0} ns", bytes.len());
}

/// Set (to the development CA's directory) in the child process that runs the echo servers.
const SERVE_ENV: &str = "GEARMESH_BENCH_SERVE_CA_DIR";

fn resolver(ca: &DevCa) -> Arc<CertResolver> {
    let cert = ca.issue(&["localhost".into(), "127.0.0.1".into()]).expect("cert");
    CertResolver::from_cert(&cert).expect("resolver")
}

/// The child process: starts the echo servers, prints their addresses, and runs until its
/// parent closes stdin.
fn serve_child(ca_dir: &std::path::Path) {
    let ca = DevCa::load_or_create(ca_dir).expect("ca");
    let s = start_servers(resolver(&ca));
    println!("{} {} {} {} {}", s.tls_addr, s.wss_addr, s.quic_addr, s.raw_quic_addr, s.proto_addr);
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
}

/// The echo servers in a child process (this binary again), killed when dropped.
struct ServerProcess(std::process::Child);

impl ServerProcess {
    fn start(ca_dir: &std::path::Path) -> (Self, Servers) {
        let mut child = std::process::Command::new(std::env::current_exe().expect("exe"))
            .env(SERVE_ENV, ca_dir)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("server process");
        let mut line = String::new();
        let out = child.stdout.take().expect("stdout");
        std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line).expect("addresses");
        let a: Vec<SocketAddr> = line.split_whitespace().map(|a| a.parse().expect("address")).collect();
        let servers =
            Servers { tls_addr: a[0], wss_addr: a[1], quic_addr: a[2], raw_quic_addr: a[3], proto_addr: a[4] };
        (ServerProcess(child), servers)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    gearmesh_transport::tls::install_crypto_provider();
    if let Some(dir) = std::env::var_os(SERVE_ENV) {
        serve_child(std::path::Path::new(&dir));
        return;
    }
    let ca_dir = tempfile::tempdir().expect("temp dir");
    let ca = DevCa::load_or_create(ca_dir.path()).expect("ca");
    let client = ClientTls::new(&ClientTrust::dev_ca(&ca)).expect("client");
    // `GEARMESH_BENCH_PROCS=1`: the echo side is another process, as two nodes are; otherwise
    // another thread of this process (cheaper to switch to on one CPU).
    let procs = std::env::var_os("GEARMESH_BENCH_PROCS").is_some_and(|v| v == "1");
    let (_server_process, servers) = if procs {
        let (p, s) = ServerProcess::start(ca_dir.path());
        (Some(p), s)
    } else {
        (None, start_servers(resolver(&ca)))
    };
    if std::env::var_os("GEARMESH_BENCH_ONLY").is_none() {
        codec_bench();
    }

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    if let Some(turns) = std::env::var("GEARMESH_BENCH_TURNS").ok().and_then(|v| v.parse::<usize>().ok()) {
        rt.block_on(interleaved(&servers, &client, &ca, turns));
        return;
    }
    let rows = rt.block_on(async {
        let (dialer, handler_dialer) = dialers(&client);
        let mut rows = Vec::new();
        for size in sizes() {
            // Alternate the systems within one run.
            if want("tls") {
                let (p50, p99, fps) = tls_rtt(servers.tls_addr, &client, size).await;
                rows.push(Row { system: "raw TLS over TCP (length-prefixed)", size, p50, p99, fps });
            }
            if want("mem") {
                let (mem, echo) = Link::pair();
                let echo_task = tokio::spawn(async move {
                    let (tx, mut rx) = echo.split();
                    while let Some(Ok(f)) = rx.recv().await {
                        if tx.send(&f).await.is_err() {
                            return;
                        }
                    }
                });
                let (mem, p50, p99) = link_rtt(mem, &gossip(size)).await;
                let fps = link_throughput(mem, &gossip(size)).await;
                echo_task.abort();
                rows.push(Row { system: "in-memory link (driver cost, no IO)", size, p50, p99, fps });
            }
            let wss_url = format!("wss://localhost:{}", servers.wss_addr.port());
            let quic_url = format!("quic://localhost:{}", servers.quic_addr.port());
            if want("wss") {
                rows.push(link_row(&dialer, &wss_url, gossip(size), "WSS link", size).await);
            }
            if want("wss-handler") {
                let system = "WSS link, echo in the link's handler (as a node serves)";
                rows.push(link_row(&handler_dialer, &wss_url, gossip(size), system, size).await);
            }
            if want("raw-quic") {
                let (p50, p99, fps) = raw_quic_rtt(servers.raw_quic_addr, &ca, size).await;
                rows.push(Row { system: "raw quinn stream ping-pong (QUIC floor)", size, p50, p99, fps });
            }
            if want("quic") {
                rows.push(link_row(&dialer, &quic_url, gossip(size), "QUIC link, control stream (gossip)", size).await);
            }
            if want("quic-handler") {
                let system = "QUIC link, echo in the link's handler (as a node serves)";
                rows.push(link_row(&handler_dialer, &quic_url, gossip(size), system, size).await);
            }
            if want("quic-call") {
                let size = size.max(140);
                rows.push(link_row(&dialer, &quic_url, call(size), "QUIC link, stream per call", size).await);
            }
        }
        rows
    });
    let pinned = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Cpus_allowed_list")).map(|l| l.to_string()))
        .unwrap_or_default();
    println!("\n{pinned}");
    println!("echo side: {}", if procs { "another process" } else { "another thread of this process" });
    println!("| system | frame | p50 RTT | p99 RTT | echo throughput (window {WINDOW}) |");
    println!("|---|---:|---:|---:|---:|");
    let base: Vec<(usize, f64)> =
        rows.iter().filter(|r| r.system.starts_with("raw")).map(|r| (r.size, r.p50)).collect();
    for r in &rows {
        let b =
            base.iter().find(|(s, _)| *s == r.size || (*s == 64 && r.size == 140)).map(|(_, p)| *p).unwrap_or(r.p50);
        println!(
            "| {} | {} B | {:.1} us ({:.2}x) | {:.1} us | {:.0} frames/s, {:.1} MB/s |",
            r.system,
            r.size,
            r.p50,
            r.p50 / b,
            r.p99,
            r.fps,
            r.fps * r.size as f64 / 1e6
        );
    }
}

/// The interleaved mode (`GEARMESH_BENCH_TURNS=N`, see [`turns`]): round trips only, the rows
/// `GEARMESH_BENCH_ONLY` picks among tls, wss, wss-handler, raw-quic, raw-proto and quic, each size
/// in turn.
async fn interleaved(servers: &Servers, client: &ClientTls, ca: &DevCa, turns: usize) {
    let (dialer, handler_dialer) = dialers(client);
    let sizes = sizes();
    let wss_url = format!("wss://localhost:{}", servers.wss_addr.port());
    let quic_url = format!("quic://localhost:{}", servers.quic_addr.port());
    let mut quinn_conns = Vec::new();
    let mut systems = Vec::new();
    for &size in &sizes {
        if want("tls") {
            let s = tls_client(servers.tls_addr, client).await;
            systems.push(turns::Turns::spawn("raw TLS over TCP", size, turns::StreamPing::new(s, size)));
        }
        if want("wss") {
            let link = dialer.dial(&wss_url).await.expect("link");
            systems.push(turns::Turns::spawn("WSS link", size, turns::LinkPing { link, frame: gossip(size) }));
        }
        if want("wss-handler") {
            let link = handler_dialer.dial(&wss_url).await.expect("link");
            let ping = turns::LinkPing { link, frame: gossip(size) };
            systems.push(turns::Turns::spawn("WSS link, echo in the handler", size, ping));
        }
        if want("raw-quic") {
            let (ep, conn, send, recv) = raw_quic_connect(servers.raw_quic_addr, ca).await;
            let ping = turns::StreamPing::new(tokio::io::join(recv, send), size);
            systems.push(turns::Turns::spawn("raw quinn stream", size, ping));
            quinn_conns.push((ep, conn));
        }
        if want("raw-proto") {
            let side = proto::ProtoSide::bind(None).connect(servers.proto_addr, raw_quic_client_config(ca)).await;
            systems.push(turns::Turns::spawn("quinn-proto from one task", size, proto::ProtoPing::new(side, size)));
        }
        if want("quic") {
            let link = dialer.dial(&quic_url).await.expect("link");
            let ping = turns::LinkPing { link, frame: gossip(size) };
            systems.push(turns::Turns::spawn("QUIC link, control stream", size, ping));
        }
    }
    let rounds = rtt_rounds();
    let samples = turns::take_turns(&systems, WARMUP, rounds, turns).await;
    println!("interleaved: {turns} turns of {} round trips per system, order rotating", rounds / turns.max(1));
    println!("| system | frame | p50 RTT | x raw TLS | x raw quinn | p99 RTT |");
    println!("|---|---:|---:|---:|---:|---:|");
    let p50_of = |system: &str, size: usize| {
        systems.iter().zip(&samples).find(|(t, _)| t.system == system && t.size == size).map(|(_, s)| pct(s, 0.5))
    };
    for (t, s) in systems.iter().zip(&samples) {
        let p50 = pct(s, 0.5);
        let ratio = |floor: Option<f64>| floor.map_or_else(|| "-".to_owned(), |f| format!("{:.2}x", p50 / f));
        println!(
            "| {} | {} B | {:.1} us | {} | {} | {:.1} us |",
            t.system,
            t.size,
            p50,
            ratio(p50_of("raw TLS over TCP", t.size)),
            ratio(p50_of("raw quinn stream", t.size)),
            pct(s, 0.99)
        );
    }
    for (_ep, conn) in quinn_conns {
        conn.close(0u32.into(), b"done");
    }
}

//! How much 10,000 idle observers cost a node: the `gearmesh` binary in its own process (TLS from
//! a development CA, insecure-dev so no tokens), and N WebSocket clients in this one, each
//! authenticated by nothing, subscribed to the mesh stream, then idle. Reports the node's resident
//! memory before and after, per client, and the time to connect them all.
//!
//! ```sh
//! cargo bench -p gearmesh --bench observers                     # 10,000 observers
//! GEARMESH_BENCH_OBSERVERS=2000 cargo bench -p gearmesh --bench observers
//! ```
//! Needs an open-files limit above the observer count (`ulimit -n`), for this process and the node.

use std::{
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{SinkExt, StreamExt};
use gearmesh_transport::tls::{ClientTls, ClientTrust, load_certs};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::TcpStream,
    process::Command,
    sync::Semaphore,
};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::{
    client_async_with_config,
    tungstenite::{Message, client::IntoClientRequest, http::HeaderValue, protocol::WebSocketConfig},
};

/// A client stream with or without TLS.
enum MaybeTls {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for MaybeTls {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for MaybeTls {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Resident memory of a process, in KiB, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    gearmesh::install_crypto_provider();
    let n: usize = std::env::var("GEARMESH_BENCH_OBSERVERS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let dir = tempfile::tempdir().expect("tempdir");
    // GEARMESH_BENCH_PLAIN=1 measures without TLS, to tell TLS's share from the rest.
    let plain = std::env::var_os("GEARMESH_BENCH_PLAIN").is_some();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gearmesh"))
        .args(["start", "--insecure-dev", "--listen", "127.0.0.1:0", "--gears", "echo", "--data-dir"])
        .arg(dir.path())
        .args(if plain { &["--tls", "off"][..] } else { &[][..] })
        .env("GEARMESH_LOG", "warn")
        .envs(std::env::var("BENCH_NODE_MALLOC_ARENA_MAX").ok().map(|v| ("MALLOC_ARENA_MAX", v)))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start gearmesh");
    let pid = child.id().expect("pid");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let addr = loop {
        let line = lines.next_line().await.expect("read").expect("the node printed its address");
        if let Some(i) = line.find("://") {
            break line[i + 3..].split([' ', '/']).next().expect("address").to_owned();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_kib(pid);

    let ca = dir.path().join(gearmesh::DEV_CA_CERT_FILE);
    let trust = ClientTrust::Ca(if plain { Vec::new() } else { load_certs(&ca).expect("CA") });
    let tls = TlsConnector::from(ClientTls::new(&trust).expect("client TLS").wss_config());
    let ws_config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(64));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (tls, addr, gate) = (tls.clone(), addr.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await.expect("gate");
            let scheme = if plain { "ws" } else { "wss" };
            let mut req = format!("{scheme}://{addr}/v1/mesh").into_client_request().expect("request");
            req.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static("gearmesh.v1"));
            let tcp = TcpStream::connect(&addr).await.expect("connect");
            let ip = tcp.peer_addr().expect("peer").ip();
            let stream = if plain {
                MaybeTls::Plain(tcp)
            } else {
                MaybeTls::Tls(Box::new(tls.connect(rustls::pki_types::ServerName::from(ip), tcp).await.expect("TLS")))
            };
            let (mut ws, _) = client_async_with_config(req, stream, Some(ws_config)).await.expect("upgrade");
            let _welcome = ws.next().await.expect("welcome").expect("welcome");
            ws.send(Message::text(r#"{"v":1,"type":"subscribe","id":1}"#)).await.expect("subscribe");
            let _snapshot = ws.next().await.expect("snapshot").expect("snapshot");
            drop(permit);
            ws
        }));
    }
    let mut clients = Vec::with_capacity(n);
    for t in tasks {
        clients.push(t.await.expect("client"));
    }
    let connect_time = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid);
    let per_client = (after.saturating_sub(before)) as f64 * 1024.0 / n as f64;
    println!("observers: {n}");
    println!(
        "connect + subscribe, all: {:.2} s ({:.0} per second)",
        connect_time.as_secs_f64(),
        n as f64 / connect_time.as_secs_f64()
    );
    println!("node RSS before: {:.1} MiB", before as f64 / 1024.0);
    println!("node RSS with {n} idle observers: {:.1} MiB", after as f64 / 1024.0);
    println!("per observer: {:.1} KiB", per_client / 1024.0);
    drop(clients);
    let _ = child.kill().await;
}

//! What the tests that run the `gearmesh` binary or talk HTTPS to a node share. Each test binary
//! uses a part of it.
#![allow(dead_code)]

pub(crate) mod chromium;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

pub(crate) mod mesh;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_gearmesh");

/// The development CA directory every node of these tests shares (under cargo's temporary
/// directory for integration tests, so the user's own CA is never touched).
pub(crate) fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("gearmesh-data")
}

/// The base URL in a line like "... listening on https://127.0.0.1:1234 (...)".
pub(crate) fn url_in(line: &str) -> Option<String> {
    let i = line.find("https://").or_else(|| line.find("http://"))?;
    Some(line[i..].split(['/', ' ']).take(3).collect::<Vec<_>>().join("/"))
}

/// A running `gearmesh` process, killed when dropped.
pub(crate) struct Proc {
    pub(crate) child: Child,
    /// The base URL it printed.
    pub(crate) url: String,
    /// The whole line it printed the URL in.
    pub(crate) line: String,
    /// The lines it printed before that one.
    pub(crate) before: Vec<String>,
}

/// Starts the binary with `args` (and `env` on top of the shared data directory) and waits for
/// the first line it prints with a URL. Its stdout keeps being drained; stderr is discarded.
pub(crate) async fn spawn(args: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env("GEARMESH_LOG", "warn").env("GEARMESH_DATA_DIR", data_dir()).env_remove("GEARMESH_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).kill_on_drop(true).spawn().expect("spawned");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut before = Vec::new();
    let (line, url) = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.expect("read") {
            if let Some(url) = url_in(&line) {
                return (line, url);
            }
            before.push(line);
        }
        panic!("the process ended without printing its URL");
    })
    .await
    .expect("the process printed its URL");
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Proc { child, url, line, before }
}

/// Runs the binary to completion: exit code, stdout, stderr.
pub(crate) async fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env("GEARMESH_DATA_DIR", data_dir()).env_remove("GEARMESH_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out =
        tokio::time::timeout(Duration::from_secs(60), cmd.output()).await.expect("finished in time").expect("ran");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Sends `signal` (`TERM`, `KILL`, ...) to a running child.
pub(crate) fn signal(child: &Child, signal: &str) {
    let pid = child.id().expect("running");
    let status =
        std::process::Command::new("kill").args([format!("-{signal}"), pid.to_string()]).status().expect("kill ran");
    assert!(status.success());
}

/// Freezes a running child (SIGSTOP) and waits until every thread of it has stopped. The kernel
/// stops a process's threads after `kill` returns, each on its way back to user space, and on
/// a loaded machine a thread was seen to answer a request sent 10-20 ms after `kill` returned.
pub(crate) async fn freeze(child: &Child) {
    signal(child, "STOP");
    let pid = child.id().expect("running");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !all_threads_stopped(pid) {
        assert!(tokio::time::Instant::now() < deadline, "process {pid} did not stop");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Whether every thread of process `pid` is stopped (`T` in `/proc/PID/task/TID/stat`).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().all(|task| {
        // "TID (COMM) STATE ...": COMM may hold spaces and parentheses, so read after the last ')'.
        std::fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with(['T', 't'])))
            .unwrap_or(false)
    })
}

/// An HTTPS client trusting only the CA certificate (PEM) at `ca`.
pub(crate) fn client_trusting(ca: &Path) -> reqwest::Client {
    let cas = gearmesh_transport::tls::load_certs(ca).expect("CA certificate");
    let trust = gearmesh_transport::tls::ClientTrust::Ca(cas);
    let tls = gearmesh_transport::tls::ClientTls::new(&trust).expect("client tls").wss_config();
    reqwest::Client::builder()
        .tls_backend_preconfigured(rustls::ClientConfig::clone(&tls))
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// An HTTPS client trusting the shared development CA (after a node has started: it writes the
/// certificate).
pub(crate) fn dev_ca_client() -> reqwest::Client {
    client_trusting(&data_dir().join(gearmesh::DEV_CA_CERT_FILE))
}

// === in-process meshes ===

/// The WebSocket link URL of a node (a seed for others): `wss://`, or `ws://` with TLS off.
pub(crate) fn wss(n: &gearmesh::RunningNode) -> String {
    n.link_addrs().iter().find(|a| a.starts_with("wss://") || a.starts_with("ws://")).expect("ws addr").clone()
}

/// Starts a node in this process on port 0 with TLS from the development CA in `dir`, hosting
/// the built-in gears named in `builtin` and `extra`, joined through `seeds`; `tweak` adjusts
/// the configuration first.
pub(crate) async fn in_process_node(
    dir: &Path,
    name: &str,
    builtin: &[&str],
    extra: Vec<gearmesh::gears::Gear>,
    seeds: Vec<String>,
    tweak: impl FnOnce(&mut gearmesh::NodeConfig),
) -> gearmesh::RunningNode {
    gearmesh::install_crypto_provider();
    let mut config = gearmesh::NodeConfig {
        name: Some(name.into()),
        listen: "127.0.0.1:0".parse().expect("addr"),
        gears: builtin.iter().map(|g| (*g).to_owned()).collect(),
        seeds,
        insecure_dev: true,
        ..gearmesh::NodeConfig::default()
    };
    config.tls.data_dir = Some(dir.to_owned());
    tweak(&mut config);
    let mut b = gearmesh::Node::builder().config(config);
    for g in extra {
        b = b.gear(g);
    }
    b.build().expect("valid").start().await.expect("started")
}

/// Polls `f` every 20 ms until it holds, for at most `secs` seconds.
pub(crate) async fn eventually(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether `n` sees every gear in `gears` hosted by some alive node.
pub(crate) fn sees(n: &gearmesh::RunningNode, gears: &[&str]) -> bool {
    let view = n.mesh().view();
    gears.iter().all(|g| view.nodes.iter().any(|x| x.state == "alive" && x.gears.iter().any(|ad| ad.name == *g)))
}

//! Helpers for tests that run several `gearmesh start` processes as a mesh: starting a node,
//! reading its view of the mesh and its metrics, calling through it.

use std::{path::PathBuf, time::Duration};

use serde_json::Value;
use tokio::time::Instant;

use super::{Proc, client_trusting, data_dir, spawn};

/// The development CA (data directory) of one test's processes. Tests run at once, and a node
/// keeps redialing the addresses it knew; were the CA shared, a process of one test could link to
/// another test's process that got a freed port, and the two meshes would merge. With a CA each,
/// the TLS handshake between them fails.
pub(crate) struct Ca {
    dir: PathBuf,
}

impl Ca {
    /// The CA named `test`, created by the first process started in it.
    pub(crate) fn new(test: &str) -> Self {
        let dir = data_dir().join(test);
        std::fs::create_dir_all(&dir).expect("data dir");
        Self { dir }
    }

    /// Its directory, for files the test's processes read (configuration).
    pub(crate) fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Starts `gearmesh start --listen 127.0.0.1:0 --insecure-dev ARGS` with this CA.
    pub(crate) async fn start(&self, args: &[&str]) -> Node {
        let dir = self.dir.to_string_lossy();
        let proc = spawn(
            &[&["start", "--listen", "127.0.0.1:0", "--insecure-dev"][..], args].concat(),
            &[("GEARMESH_DATA_DIR", &dir)],
        )
        .await;
        let links = proc
            .line
            .split([' ', '(', ')'])
            .filter(|w| w.starts_with("wss://") || w.starts_with("quic://"))
            .map(str::to_owned)
            .collect();
        Node { proc, links }
    }

    /// An HTTPS client trusting this CA (once a process has started in it: that writes it).
    pub(crate) fn client(&self) -> reqwest::Client {
        client_trusting(&self.dir.join(gearmesh::DEV_CA_CERT_FILE))
    }
}

/// A node process started with `gearmesh start --listen 127.0.0.1:0 --insecure-dev ARGS`.
pub(crate) struct Node {
    pub(crate) proc: Proc,
    /// Its link URLs (`wss://...`, `quic://...`), from its "listening on" line.
    pub(crate) links: Vec<String>,
}

impl Node {
    pub(crate) fn url(&self) -> &str {
        &self.proc.url
    }

    pub(crate) fn link(&self, scheme: &str) -> String {
        self.links.iter().find(|l| l.starts_with(scheme)).expect("link url").clone()
    }
}

/// The node's `/v1/nodes` view (`Null` if it did not answer).
pub(crate) async fn view(http: &reqwest::Client, url: &str) -> Value {
    let Ok(r) = http.get(format!("{url}/v1/nodes")).send().await else { return Value::Null };
    r.json().await.unwrap_or(Value::Null)
}

/// Nodes that are up (alive or suspect) and host `gear`, as the node at `url` sees them.
pub(crate) async fn replicas(http: &reqwest::Client, url: &str, gear: &str) -> usize {
    view(http, url).await["nodes"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .filter(|n| n["state"] == "alive" || n["state"] == "suspect")
                .filter(|n| n["gears"].as_array().is_some_and(|g| g.iter().any(|x| x["name"] == gear)))
                .count()
        })
        .unwrap_or(0)
}

pub(crate) async fn wait_replicas(http: &reqwest::Client, url: &str, gear: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while replicas(http, url, gear).await != n {
        if Instant::now() > deadline {
            panic!("timed out waiting for {n} replicas of {gear}: {:#}", view(http, url).await);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One call through `url`: the HTTP status and the error code, if any.
pub(crate) async fn call(http: &reqwest::Client, url: &str, gear_port: &str, body: Value) -> (u16, Option<String>) {
    let r = http
        .post(format!("{url}/v1/call/{gear_port}?timeout_ms=10000"))
        .json(&body)
        .send()
        .await
        .expect("the node answered");
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    (status, v["error"]["code"].as_str().map(str::to_owned))
}

/// The value of an unlabelled metric in the node's `/metrics` (0 when absent).
pub(crate) async fn metric(http: &reqwest::Client, url: &str, name: &str) -> f64 {
    let text = http.get(format!("{url}/metrics")).send().await.expect("metrics").text().await.expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

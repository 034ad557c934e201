//! `gearmesh start` processes on loopback forming a mesh, as an operator runs them: joining by
//! seeds over WSS and QUIC, a call reaching the one node that hosts a gear, a replica killed with
//! -9 while calls run, and its restart rejoining.

use std::{process::Stdio, sync::Arc, time::Duration};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    time::Instant,
};

const BIN: &str = env!("CARGO_BIN_EXE_gearmesh");

/// The development CA directory these processes share (never the user's own).
fn data_dir() -> String {
    format!("{}/gearmesh-data", env!("CARGO_TARGET_TMPDIR"))
}

/// A node process, killed when dropped.
struct Proc {
    child: Child,
    url: String,
    /// Its link URLs (`wss://...`, `quic://...`).
    links: Vec<String>,
}

/// Starts `gearmesh start` with `args` and reads its "listening on URL (mesh links: ...)" line.
async fn start(args: &[&str]) -> Proc {
    let mut child = Command::new(BIN)
        .arg("start")
        .args(["--listen", "127.0.0.1:0", "--insecure-dev"])
        .args(args)
        .env("GEARMESH_LOG", "warn")
        .env("GEARMESH_DATA_DIR", data_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawned");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.expect("read") {
            if line.contains("listening on") {
                return line;
            }
        }
        panic!("the node ended without printing its URL");
    })
    .await
    .expect("the node printed its URL");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let words: Vec<&str> = line.split([' ', '(', ')']).collect();
    let url = words.iter().find(|w| w.starts_with("https://")).expect("url").to_string();
    let links = words.iter().filter(|w| w.starts_with("wss://") || w.starts_with("quic://")).map(|w| w.to_string());
    Proc { child, url, links: links.collect() }
}

impl Proc {
    fn link(&self, scheme: &str) -> String {
        self.links.iter().find(|l| l.starts_with(scheme)).expect("link url").clone()
    }

    fn kill9(&mut self) {
        let pid = self.child.id().expect("running");
        let status = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().expect("kill");
        assert!(status.success());
    }
}

/// An HTTPS client trusting the shared development CA.
fn client() -> reqwest::Client {
    let ca = std::path::PathBuf::from(data_dir()).join(gearmesh::DEV_CA_CERT_FILE);
    let cas = gearmesh_transport::tls::load_certs(&ca).expect("dev CA certificate");
    let trust = gearmesh_transport::tls::ClientTrust::Ca(cas);
    let tls = gearmesh_transport::tls::ClientTls::new(&trust).expect("client tls").wss_config();
    reqwest::Client::builder()
        .tls_backend_preconfigured(rustls::ClientConfig::clone(&tls))
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// Alive nodes hosting `gear`, as the node at `url` sees them.
async fn replicas(http: &reqwest::Client, url: &str, gear: &str) -> usize {
    let Ok(r) = http.get(format!("{url}/v1/nodes")).send().await else { return 0 };
    let view: Value = r.json().await.unwrap_or(Value::Null);
    view["nodes"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .filter(|n| n["state"] == "alive")
                .filter(|n| n["gears"].as_array().is_some_and(|g| g.iter().any(|x| x["name"] == gear)))
                .count()
        })
        .unwrap_or(0)
}

async fn wait_replicas(http: &reqwest::Client, url: &str, gear: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while replicas(http, url, gear).await != n {
        if Instant::now() > deadline {
            let view: Value =
                http.get(format!("{url}/v1/nodes")).send().await.expect("sent").json().await.expect("json");
            panic!("timed out waiting for {n} replicas of {gear}: {view:#}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One call through `url`: the HTTP status and the error code, if any.
async fn call(http: &reqwest::Client, url: &str, gear_port: &str, body: Value) -> (u16, Option<String>) {
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

#[tokio::test]
async fn processes_mesh_over_wss_and_quic_and_survive_a_kill_9() {
    let p1 = start(&["--name", "p1", "--gears", "kv"]).await;
    let mut p2 = start(&["--name", "p2", "--gears", "echo", "--seed", &p1.link("wss://")]).await;
    let p3 = start(&["--name", "p3", "--gears", "echo", "--seed", &p1.link("quic://")]).await;
    // Only p4 hosts users; it joined through p3 over QUIC.
    let p4 = start(&["--name", "p4", "--gears", "users", "--seed", &p3.link("quic://")]).await;
    let http = client();
    wait_replicas(&http, &p1.url, "echo", 2).await;
    wait_replicas(&http, &p1.url, "users", 1).await;

    let (status, err) = call(&http, &p1.url, "users/find", json!({"id": "alice"})).await;
    assert_eq!((status, err), (200, None), "p1 reached the gear only p4 hosts");

    // Four callers loop through p1 while p2, one of the two echo replicas, is killed with -9.
    let http = Arc::new(http);
    let stop_at = Instant::now() + Duration::from_secs(6);
    let mut workers = Vec::new();
    for w in 0..4 {
        let (http, url) = (http.clone(), p1.url.clone());
        workers.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            let mut i = 0;
            while Instant::now() < stop_at {
                outcomes.push(call(&http, &url, "echo/echo", json!([w, i])).await);
                i += 1;
            }
            outcomes
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    p2.kill9();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.expect("worker"));
    }
    let failed: Vec<_> = all.iter().filter(|(s, _)| *s != 200).collect();
    assert!(all.len() > 40, "calls ran: {}", all.len());
    assert!(
        failed.iter().all(|(_, code)| code.as_deref() == Some("unavailable")),
        "a failure other than a short burst of unavailable (none may time out): {failed:?}"
    );
    assert!(failed.len() * 4 < all.len(), "most calls succeeded: {} of {} failed", failed.len(), all.len());
    // The tail of every run is after detection: the other replica answers everything.
    let tail = &all[all.len() - 8..];
    assert!(tail.iter().all(|(s, _)| *s == 200), "after detection every call succeeds: {tail:?}");
    wait_replicas(&http, &p1.url, "echo", 1).await;

    // p2 restarts (a new process, a new incarnation) and rejoins.
    let p2 = start(&["--name", "p2", "--gears", "echo", "--seed", &p1.link("wss://")]).await;
    wait_replicas(&http, &p1.url, "echo", 2).await;
    drop((p1, p2, p3, p4));
}

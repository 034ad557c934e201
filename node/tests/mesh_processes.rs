//! `gearmesh start` processes on loopback forming a mesh, as an operator runs them: joining by
//! seeds over WSS and QUIC, a call reaching the one node that hosts a gear, a replica killed with
//! -9 while calls run, and its restart rejoining.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{Proc, dev_ca_client, signal, spawn};
use serde_json::{Value, json};
use tokio::time::Instant;

/// A node process started with `gearmesh start --listen 127.0.0.1:0 --insecure-dev ARGS`.
struct Node {
    proc: Proc,
    /// Its link URLs (`wss://...`, `quic://...`), from its "listening on" line.
    links: Vec<String>,
}

async fn start(args: &[&str]) -> Node {
    let proc = spawn(&[&["start", "--listen", "127.0.0.1:0", "--insecure-dev"][..], args].concat(), &[]).await;
    let links = proc
        .line
        .split([' ', '(', ')'])
        .filter(|w| w.starts_with("wss://") || w.starts_with("quic://"))
        .map(str::to_owned)
        .collect();
    Node { proc, links }
}

impl Node {
    fn url(&self) -> &str {
        &self.proc.url
    }

    fn link(&self, scheme: &str) -> String {
        self.links.iter().find(|l| l.starts_with(scheme)).expect("link url").clone()
    }
}

/// Nodes that are up (alive or suspect) and host `gear`, as the node at `url` sees them.
async fn replicas(http: &reqwest::Client, url: &str, gear: &str) -> usize {
    let Ok(r) = http.get(format!("{url}/v1/nodes")).send().await else { return 0 };
    let view: Value = r.json().await.unwrap_or(Value::Null);
    view["nodes"]
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

/// Polls until every worker has made at least `n` more calls than it had at `since`.
async fn wait_calls(counts: &[Arc<AtomicUsize>], since: &[usize], n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while counts.iter().zip(since).any(|(c, s)| c.load(Ordering::Relaxed) < s + n) {
        assert!(Instant::now() < deadline, "the callers stalled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn processes_mesh_over_wss_and_quic_and_survive_a_kill_9() {
    let p1 = start(&["--name", "p1", "--gears", "kv"]).await;
    let p2 = start(&["--name", "p2", "--gears", "echo", "--seed", &p1.link("wss://")]).await;
    let p3 = start(&["--name", "p3", "--gears", "echo", "--seed", &p1.link("quic://")]).await;
    // Only p4 hosts users; it joined through p3 over QUIC.
    let p4 = start(&["--name", "p4", "--gears", "users", "--seed", &p3.link("quic://")]).await;
    let http = dev_ca_client();
    wait_replicas(&http, p1.url(), "echo", 2).await;
    wait_replicas(&http, p1.url(), "users", 1).await;

    let (status, err) = call(&http, p1.url(), "users/find", json!({"id": "alice"})).await;
    assert_eq!((status, err), (200, None), "p1 reached the gear only p4 hosts");

    // Four callers loop through p1 while p2, one of the two echo replicas, is killed with -9.
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Vec<Arc<AtomicUsize>> = (0..4).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let mut workers = Vec::new();
    for (w, count) in counts.iter().enumerate() {
        let (http, url, stop, count) = (http.clone(), p1.url().to_owned(), stop.clone(), count.clone());
        workers.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                outcomes.push(call(&http, &url, "echo/echo", json!([w, outcomes.len()])).await);
                count.fetch_add(1, Ordering::Relaxed);
            }
            outcomes
        }));
    }
    let zero = vec![0; counts.len()];
    wait_calls(&counts, &zero, 5).await;
    signal(&p2.proc.child, "KILL");
    // p1 declares p2 dead (no longer even suspect); from then on, every call must go to p3.
    wait_replicas(&http, p1.url(), "echo", 1).await;
    let detected: Vec<usize> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    wait_calls(&counts, &detected, 8).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for (w, worker) in workers.into_iter().enumerate() {
        let outcomes = worker.await.expect("worker");
        // Calls started after p1 saw p2 dead (the last one in flight then may still have failed).
        let after = &outcomes[detected[w] + 1..];
        assert!(after.iter().all(|(s, _)| *s == 200), "after detection every call succeeds: {after:?}");
        all.extend(outcomes);
    }
    let failed: Vec<_> = all.iter().filter(|(s, _)| *s != 200).collect();
    assert!(
        failed.iter().all(|(_, code)| code.as_deref() == Some("unavailable")),
        "a failure other than a short burst of unavailable (none may time out): {failed:?}"
    );

    // p2 restarts (a new process, a new incarnation) and rejoins.
    let p2 = start(&["--name", "p2", "--gears", "echo", "--seed", &p1.link("wss://")]).await;
    wait_replicas(&http, p1.url(), "echo", 2).await;
    drop((p1, p2, p3, p4));
}

//! Ten `gearmesh start` processes joined through chained seeds (alternating WSS and QUIC) with at
//! most three links each, so most pairs are reached through switching nodes: the mesh converges
//! (every node sees every node alive, with a route, and every gear), every node reaches every
//! gear, and a call crosses at least two links.
//!
//! A test binary of its own so its ten processes do not share the two CPUs with other mesh tests.

mod common;

use std::time::Duration;

use common::mesh::{Ca, Node, call, metric, view};
use serde_json::{Value, json};
use tokio::time::Instant;

/// Each node hosts one gear; `users`, `billing`, `audit`, `orders` and `kv` are hosted once.
const GEARS: [&str; 10] = ["kv", "echo", "products", "billing", "audit", "orders", "echo", "products", "echo", "users"];

/// One port of every gear and an input it accepts.
fn probes() -> Vec<(&'static str, Value)> {
    vec![
        ("echo/echo", json!({"hello": "mesh"})),
        ("kv/put", json!({"key": "k", "value": "v"})),
        ("users/find", json!({"id": "alice"})),
        ("products/reserve", json!({"product_id": "widget", "qty": 1})),
        ("billing/charge", json!({"user_id": "alice", "cents": 100})),
        ("orders/place", json!({"user_id": "alice", "product_id": "widget", "qty": 1})),
        ("audit/recent", json!({})),
    ]
}

/// Whether the node at `url` sees all `n` nodes alive, each with a route, and at most
/// `max_links` links of its own.
async fn converged(http: &reqwest::Client, url: &str, n: usize, max_links: usize) -> bool {
    let v = view(http, url).await;
    let Some(nodes) = v["nodes"].as_array() else { return false };
    let me = v["me"].as_str().unwrap_or_default();
    nodes.len() == n
        && nodes.iter().all(|x| x["state"] == "alive" && !x["route"].is_null())
        && nodes.iter().filter(|x| x["id"] == me).all(|x| x["links"].as_array().is_some_and(|l| l.len() <= max_links))
}

#[tokio::test]
async fn ten_processes_converge_and_switch_calls_across_hops() {
    const MAX_LINKS: usize = 3;
    let ca = Ca::new("ten");
    let config = ca.dir().join("ten-nodes.toml");
    std::fs::write(&config, format!("[mesh]\nmin_links = 2\nmax_links = {MAX_LINKS}\n")).expect("config");
    let config = config.to_string_lossy().into_owned();

    let mut nodes: Vec<Node> = Vec::new();
    for (i, gear) in GEARS.iter().enumerate() {
        let name = format!("ten-{}", i + 1);
        let mut args = vec!["--name", &name, "--gears", gear, "--config", &config];
        // Chained seeds: each node joins through the one before, over WSS or QUIC in turn.
        let seed = nodes.last().map(|prev| prev.link(if i % 2 == 0 { "wss://" } else { "quic://" }));
        if let Some(seed) = &seed {
            args.extend(["--seed", seed]);
        }
        // Half the nodes dial the links the mesh makes over QUIC: a mixed mesh.
        if i % 2 == 1 {
            args.extend(["--dial", "quic"]);
        }
        nodes.push(ca.start(&args).await);
    }
    let http = ca.client();

    let deadline = Instant::now() + Duration::from_secs(60);
    for n in &nodes {
        while !converged(&http, n.url(), nodes.len(), MAX_LINKS).await {
            assert!(Instant::now() < deadline, "did not converge: {:#}", view(&http, n.url()).await);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Routes follow remote link changes at the route interval (1 s), so while links still change
    // a routed frame can loop until the hop limit (the caller then gets `unavailable` at once).
    // Wait until no node's links changed for a few route intervals.
    let mut last = links_of(&http, &nodes).await;
    let mut stable_since = Instant::now();
    while stable_since.elapsed() < Duration::from_millis(2500) {
        assert!(Instant::now() < deadline, "links kept changing: {last:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = links_of(&http, &nodes).await;
        if now != last {
            last = now;
            stable_since = Instant::now();
        }
    }

    // Every node reaches every gear, wherever it runs.
    for n in &nodes {
        for (port, body) in probes() {
            let got = call(&http, n.url(), port, body).await;
            if got != (200, None) {
                panic!("{port} through {}: {got:?}; {}", n.url(), diagnose(&http, &nodes).await);
            }
        }
    }

    // With at most three links each, some node reaches a gear hosted once, on a node two or more
    // links away: that call is switched by a node in between.
    let forwarded_before = forwarded(&http, &nodes).await;
    let mut far = None;
    'search: for n in &nodes {
        let v = view(&http, n.url()).await;
        for x in v["nodes"].as_array().into_iter().flatten() {
            let hops = x["route"]["hops"].as_u64().unwrap_or(0);
            let unique = x["gears"]
                .as_array()
                .and_then(|g| g.first())
                .and_then(|g| g["name"].as_str())
                .filter(|g| GEARS.iter().filter(|h| *h == g).count() == 1);
            if let (true, Some(gear)) = (hops >= 2, unique) {
                far = Some((n.url().to_owned(), gear.to_owned(), hops));
                break 'search;
            }
        }
    }
    // The links are of both kinds, as dialed: each node reports the transport of its own.
    let mut kinds = std::collections::BTreeSet::new();
    for n in &nodes {
        let v = view(&http, n.url()).await;
        let me = v["me"].as_str().unwrap_or_default().to_owned();
        for x in v["nodes"].as_array().into_iter().flatten().filter(|x| x["id"] == me.as_str()) {
            for l in x["links"].as_array().into_iter().flatten() {
                kinds.insert(l["transport"].as_str().unwrap_or("none").to_owned());
            }
        }
    }
    assert_eq!(kinds.into_iter().collect::<Vec<_>>(), ["quic", "wss"], "a mixed mesh");

    let (from, gear, hops) = far.expect("with three links per node, some gear hosted once is two hops away");
    let (port, body) = probes().into_iter().find(|(p, _)| p.starts_with(&format!("{gear}/"))).expect("a probe");
    assert_eq!(call(&http, &from, port, body).await, (200, None), "{port} across {hops} hops from {from}");
    assert!(forwarded(&http, &nodes).await > forwarded_before, "a node in between switched the call");
    drop(nodes);
}

/// Every node's links (peer ids, sorted), in node order.
async fn links_of(http: &reqwest::Client, nodes: &[Node]) -> Vec<Vec<String>> {
    let mut all = Vec::new();
    for n in nodes {
        let v = view(http, n.url()).await;
        let me = v["me"].as_str().unwrap_or_default().to_owned();
        let mut links: Vec<String> = v["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|x| x["id"] == me.as_str())
            .flat_map(|x| x["links"].as_array().cloned().unwrap_or_default())
            .filter_map(|l| l["peer"].as_str().map(str::to_owned))
            .collect();
        links.sort();
        all.push(links);
    }
    all
}

/// Each node's mesh counters and links, for a failure message.
async fn diagnose(http: &reqwest::Client, nodes: &[Node]) -> String {
    let mut out = String::new();
    for n in nodes {
        let v = view(http, n.url()).await;
        let me = v["me"].as_str().unwrap_or_default().to_owned();
        let short = |id: &str| id.chars().take(6).collect::<String>();
        let links: Vec<String> = v["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|x| x["id"] == me.as_str())
            .flat_map(|x| x["links"].as_array().cloned().unwrap_or_default())
            .map(|l| short(l["peer"].as_str().unwrap_or_default()))
            .collect();
        out += &format!(
            "\n{} {}: links {links:?}, forwarded {}, dropped {}, calls sent {}, received {}",
            n.url(),
            short(&me),
            metric(http, n.url(), "gearmesh_mesh_frames_forwarded_total").await,
            metric(http, n.url(), "gearmesh_mesh_frames_dropped_total").await,
            metric(http, n.url(), "gearmesh_mesh_calls_sent_total").await,
            metric(http, n.url(), "gearmesh_mesh_calls_received_total").await,
        );
    }
    out
}

/// Routed frames switched on by any node, so far.
async fn forwarded(http: &reqwest::Client, nodes: &[Node]) -> f64 {
    let mut sum = 0.0;
    for n in nodes {
        sum += metric(http, n.url(), "gearmesh_mesh_frames_forwarded_total").await;
    }
    sum
}

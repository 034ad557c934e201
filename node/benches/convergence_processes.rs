//! How fast a real mesh of separate `gearmesh` processes converges: N processes (default 20),
//! each hosting one built-in gear, all joining through the first one's seed over TLS WebSocket
//! links. Converged: every process's `GET /v1/nodes` shows all N nodes alive with every node's
//! gears. Reports the time from the last process's start (it printed its address) to
//! convergence, then kills one process (SIGKILL) and reports the time until every other one has
//! declared it dead, then does the same for a process stopped with SIGSTOP (frozen: its
//! connections stay open and silent), for a few rounds.
//!
//! ```sh
//! cargo bench -p gearmesh --bench convergence_processes
//! GEARMESH_BENCH_NODES=10 GEARMESH_BENCH_ROUNDS=5 cargo bench -p gearmesh --bench convergence_processes
//! ```

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

const GEARS: [&str; 7] = ["echo", "kv", "users", "products", "billing", "orders", "audit"];

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Starts one process and returns it with its base URL and its WebSocket link URL.
async fn start(dir: &std::path::Path, name: &str, gear: &str, seed: Option<&str>) -> (Child, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gearmesh"));
    cmd.args(["start", "--insecure-dev", "--listen", "127.0.0.1:0", "--name", name, "--gears", gear, "--data-dir"])
        .arg(dir)
        .env("GEARMESH_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    if let Some(s) = seed {
        cmd.args(["--seed", s]);
    }
    let mut child = cmd.spawn().expect("start gearmesh");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = loop {
        let line = lines.next_line().await.expect("read").expect("the node printed its address");
        if line.contains("listening on") {
            break line;
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let url = line.split_whitespace().find(|w| w.starts_with("https://")).expect("url").to_owned();
    let link =
        line.split_whitespace().find(|w| w.starts_with("wss://")).expect("link").trim_end_matches(')').to_owned();
    (child, url, link)
}

/// Whether the node at `url` sees `n` nodes alive carrying `gear_ads` gear advertisements.
async fn converged_at(http: &reqwest::Client, url: &str, n: usize, gear_ads: usize) -> bool {
    let Ok(r) = http.get(format!("{url}/v1/nodes")).send().await else { return false };
    let Ok(v) = r.json::<Value>().await else { return false };
    let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
    let alive: Vec<&Value> = nodes.iter().filter(|x| x["state"] == "alive").collect();
    let ads: usize = alive.iter().map(|x| x["gears"].as_array().map_or(0, Vec::len)).sum();
    alive.len() == n && ads == gear_ads
}

/// Whether the node at `url` holds the node named `name` dead (or no longer knows it).
async fn declared_dead(http: &reqwest::Client, url: &str, name: &str) -> bool {
    let Ok(r) = http.get(format!("{url}/v1/nodes")).send().await else { return false };
    let Ok(v) = r.json::<Value>().await else { return false };
    let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
    nodes.iter().filter(|x| x["name"] == name).all(|x| x["state"] == "dead" || x["state"] == "left")
}

/// Polls every process but those in `skip` until each holds `procs[victim]` dead; whether all
/// did within 60 s.
async fn until_dead_everywhere(
    http: &reqwest::Client,
    procs: &[(Child, String)],
    skip: &[usize],
    victim: usize,
) -> bool {
    let name = format!("p{victim}");
    let started = Instant::now();
    let mut gone: Vec<bool> = (0..procs.len()).map(|i| skip.contains(&i)).collect();
    while gone.iter().any(|g| !g) && started.elapsed() < Duration::from_secs(60) {
        for (i, (_, url)) in procs.iter().enumerate() {
            if !gone[i] {
                gone[i] = declared_dead(http, url, &name).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gone.iter().all(|g| *g)
}

fn report(round: usize, what: &str, all: bool, since: Instant) {
    println!(
        "round {round}: {what} was {} {:.0} ms after the signal",
        if all { "declared dead everywhere" } else { "NOT declared dead everywhere within 60 s:" },
        since.elapsed().as_secs_f64() * 1000.0
    );
}

#[tokio::main]
async fn main() {
    gearmesh::install_crypto_provider();
    let n = env_or("GEARMESH_BENCH_NODES", 20);
    let rounds = env_or("GEARMESH_BENCH_ROUNDS", 3);
    println!("convergence of {n} gearmesh processes joining through one seed (TLS WebSocket links)");
    for round in 1..=rounds {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut procs = Vec::with_capacity(n);
        let first_started = Instant::now();
        let mut seed = None;
        for i in 0..n {
            let (child, url, link) = start(dir.path(), &format!("p{i}"), GEARS[i % GEARS.len()], seed.as_deref()).await;
            if seed.is_none() {
                seed = Some(link);
            }
            procs.push((child, url));
        }
        let last_started = Instant::now();
        let ca = dir.path().join(gearmesh::DEV_CA_CERT_FILE);
        let trust = gearmesh_transport::tls::ClientTrust::Ca(gearmesh_transport::tls::load_certs(&ca).expect("CA"));
        let tls = gearmesh_transport::tls::ClientTls::new(&trust).expect("client TLS").wss_config();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(rustls::ClientConfig::clone(&tls))
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        // Each process hosts its gear and the node's own `pipelines` gear.
        let gear_ads = 2 * n;
        let mut done = vec![false; n];
        let deadline = last_started + Duration::from_secs(60);
        while done.iter().any(|d| !d) && Instant::now() < deadline {
            for (i, (_, url)) in procs.iter().enumerate() {
                if !done[i] {
                    done[i] = converged_at(&http, url, n, gear_ads).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let converged = done.iter().all(|d| *d);
        println!(
            "round {round}: starting {n} processes took {:.2} s; {} {:.0} ms after the last one started",
            (last_started - first_started).as_secs_f64(),
            if converged { "converged" } else { "NOT converged within 60 s:" },
            last_started.elapsed().as_secs_f64() * 1000.0,
        );
        if converged {
            // Kill one process (SIGKILL: no leave announced; the kernel resets its connections)
            // and time until every other one has declared it dead (or forgotten it).
            let victim = n / 2;
            let _ = procs[victim].0.kill().await;
            let killed = Instant::now();
            let gone = until_dead_everywhere(&http, &procs, &[victim], victim).await;
            report(round, "a killed process", gone, killed);
            // Then stop another (SIGSTOP: its connections stay open and silent, as for a machine
            // that vanished), so only heartbeats and probes can tell.
            let frozen = (victim + 1) % n;
            let pid = procs[frozen].0.id().expect("running").to_string();
            let stopped = std::process::Command::new("kill").args(["-STOP", &pid]).status().expect("kill ran");
            assert!(stopped.success(), "SIGSTOP sent");
            let froze = Instant::now();
            let gone = until_dead_everywhere(&http, &procs, &[victim, frozen], frozen).await;
            report(round, "a stopped (frozen) process", gone, froze);
        }
        for (mut child, _) in procs {
            let _ = child.kill().await;
        }
    }
}

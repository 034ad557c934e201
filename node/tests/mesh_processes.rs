//! `gearmesh start` processes on loopback forming a mesh, as an operator runs them: joining by
//! seeds over WSS and QUIC, a call reaching the one node that hosts a gear, a replica killed with
//! -9 while calls run, and its restart rejoining; a stopped (frozen) process detected, and back
//! when resumed.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{
    freeze,
    mesh::{Ca, call, metric, view, wait_replicas},
    signal,
};
use serde_json::json;
use tokio::time::Instant;

/// One call's outcome: the HTTP status and the error code, if any.
type Outcome = (u16, Option<String>);

/// Callers looping through one node, each making calls one after another until stopped.
struct Callers {
    stop: Arc<AtomicBool>,
    counts: Vec<Arc<AtomicUsize>>,
    workers: Vec<tokio::task::JoinHandle<Vec<Outcome>>>,
}

impl Callers {
    /// `n` callers through the node at `url`; `pick(w, k)` is caller `w`'s `k`th call (a
    /// `gear/port` and its input).
    fn start(
        http: &reqwest::Client,
        url: &str,
        n: usize,
        pick: impl Fn(usize, usize) -> (&'static str, serde_json::Value) + Clone + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let counts: Vec<Arc<AtomicUsize>> = (0..n).map(|_| Arc::new(AtomicUsize::new(0))).collect();
        let mut workers = Vec::new();
        for (w, count) in counts.iter().enumerate() {
            let (http, url, stop, count, pick) =
                (http.clone(), url.to_owned(), stop.clone(), count.clone(), pick.clone());
            workers.push(tokio::spawn(async move {
                let mut outcomes = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let (gear_port, input) = pick(w, outcomes.len());
                    outcomes.push(call(&http, &url, gear_port, input).await);
                    count.fetch_add(1, Ordering::Relaxed);
                }
                outcomes
            }));
        }
        Self { stop, counts, workers }
    }

    /// How many calls each caller has made so far.
    fn made(&self) -> Vec<usize> {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    /// Polls until every caller has made at least `n` more calls than it had at `since`.
    async fn wait(&self, since: &[usize], n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.made().iter().zip(since).any(|(c, s)| *c < s + n) {
            assert!(Instant::now() < deadline, "the callers stalled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the callers: each one's outcomes, in order.
    async fn finish(self) -> Vec<Vec<Outcome>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for worker in self.workers {
            all.push(worker.await.expect("caller"));
        }
        all
    }
}

#[tokio::test]
async fn processes_mesh_over_wss_and_quic_and_survive_a_kill_9() {
    let ca = Ca::new("kill-9");
    let p1 = ca.start(&["--name", "p1", "--gears", "kv"]).await;
    let p2 = ca.start(&["--name", "p2", "--gears", "echo", "--seed", &p1.link("wss://")]).await;
    let p3 = ca.start(&["--name", "p3", "--gears", "echo", "--seed", &p1.link("quic://")]).await;
    // Only p4 hosts users; it joined through p3 over QUIC.
    let p4 = ca.start(&["--name", "p4", "--gears", "users", "--seed", &p3.link("quic://")]).await;
    let http = ca.client();
    wait_replicas(&http, p1.url(), "echo", 2).await;
    wait_replicas(&http, p1.url(), "users", 1).await;

    let (status, err) = call(&http, p1.url(), "users/find", json!({"id": "alice"})).await;
    assert_eq!((status, err), (200, None), "p1 reached the gear only p4 hosts");

    // Four callers loop through p1 while p2, one of the two echo replicas, is killed with -9.
    let callers = Callers::start(&http, p1.url(), 4, |w, k| ("echo/echo", json!([w, k])));
    callers.wait(&[0; 4], 5).await;
    signal(&p2.proc.child, "KILL");
    // p1 declares p2 dead (no longer even suspect); from then on, every call must go to p3.
    wait_replicas(&http, p1.url(), "echo", 1).await;
    let detected = callers.made();
    callers.wait(&detected, 8).await;
    let mut all = Vec::new();
    for (w, outcomes) in callers.finish().await.into_iter().enumerate() {
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
    let p2 = ca.start(&["--name", "p2", "--gears", "echo", "--seed", &p1.link("wss://")]).await;
    wait_replicas(&http, p1.url(), "echo", 2).await;
    drop((p1, p2, p3, p4));
}

/// A stopped process (SIGSTOP: its sockets stay open, nothing answers) is a frozen peer: the
/// node linked to it notices through heartbeats, drops the link, and a call made to the stopped
/// node's gear meanwhile fails `unavailable` instead of hanging to its deadline. Resumed
/// (SIGCONT), the node comes back and serves again without a restart.
#[tokio::test]
async fn a_stopped_process_is_detected_and_rejoins_when_resumed() {
    let ca = Ca::new("stopped");
    let a = ca.start(&["--name", "st-a", "--gears", "kv"]).await;
    let b = ca.start(&["--name", "st-b", "--gears", "echo", "--seed", &a.link("wss://")]).await;
    let http = ca.client();
    wait_replicas(&http, a.url(), "echo", 1).await;
    assert_eq!(call(&http, a.url(), "echo/echo", json!("before")).await, (200, None));
    let links_of_a = || async {
        let v = view(&http, a.url()).await;
        let me = v["me"].clone();
        v["nodes"]
            .as_array()
            .and_then(|nodes| nodes.iter().find(|n| n["id"] == me))
            .and_then(|n| n["links"].as_array().map(Vec::len))
            .unwrap_or(0)
    };
    wait_until("a links to b", || async { links_of_a().await == 1 }).await;

    freeze(&b.proc.child).await;
    // Made while b is frozen: it must end (within its 10 s deadline) as `unavailable`.
    let (status, code) = call(&http, a.url(), "echo/echo", json!("frozen")).await;
    assert_eq!((status, code.as_deref()), (503, Some("unavailable")), "a call to a frozen node");
    wait_until("a drops its link to the frozen b", || async { links_of_a().await == 0 }).await;

    signal(&b.proc.child, "CONT");
    wait_until("b serves again", || async { call(&http, a.url(), "echo/echo", json!("after")).await == (200, None) })
        .await;
    wait_until("a links to b again", || async { links_of_a().await == 1 }).await;
    drop((a, b));
}

/// `--mesh-name` keeps two meshes that trust one CA apart: a node of mesh "green" seeded with a
/// node of mesh "blue" is refused in the hello (the blue node's
/// `gearmesh_links_refused_total{reason="hello"}` counts it, and the green node's
/// `gearmesh_mesh_dials_refused_total`) and joins nothing, while a second "blue" node seeded the
/// same way joins.
#[tokio::test]
async fn a_node_named_for_another_mesh_is_refused_and_joins_nothing() {
    let ca = Ca::new("names");
    let a = ca.start(&["--name", "nm-a", "--gears", "kv", "--mesh-name", "blue"]).await;
    let http = ca.client();
    let g = ca.start(&["--name", "nm-g", "--gears", "echo", "--mesh-name", "green", "--seed", &a.link("wss://")]).await;
    let refused = r#"gearmesh_links_refused_total{reason="hello"}"#;
    wait_until("a refuses g's hello", || async { metric(&http, a.url(), refused).await >= 1.0 }).await;
    let dials_refused = "gearmesh_mesh_dials_refused_total";
    wait_until("g counts the refusal", || async { metric(&http, g.url(), dials_refused).await >= 1.0 }).await;
    let b = ca.start(&["--name", "nm-b", "--gears", "echo", "--mesh-name", "blue", "--seed", &a.link("quic://")]).await;
    wait_replicas(&http, a.url(), "echo", 1).await;
    let nodes = |v: serde_json::Value| v["nodes"].as_array().map(Vec::len).unwrap_or(0);
    assert_eq!(nodes(view(&http, a.url()).await), 2, "a knows itself and b, never g");
    assert_eq!(nodes(view(&http, g.url()).await), 1, "g is alone");
    for (n, mesh) in [(&a, "blue"), (&b, "blue"), (&g, "green")] {
        let info: serde_json::Value =
            http.get(format!("{}/v1/node", n.url())).send().await.expect("sent").json().await.expect("json");
        assert_eq!(info["mesh"], mesh);
    }
    drop((a, b, g));
}

/// Polls `check` until it holds, or panics with `what` after 20 s.
async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn processes_deliver_events_only_to_nodes_that_listen() {
    let ca = Ca::new("events");
    // a hosts audit (listens to orders.placed and billing.charged); b publishes; c listens to
    // nothing. b joined over WSS, c over QUIC.
    let a = ca.start(&["--name", "ev-a", "--gears", "audit"]).await;
    let b = ca.start(&["--name", "ev-b", "--gears", "echo", "--seed", &a.link("wss://")]).await;
    let c = ca.start(&["--name", "ev-c", "--gears", "kv", "--seed", &a.link("quic://")]).await;
    let http = ca.client();
    for n in [&a, &b, &c] {
        wait_replicas(&http, n.url(), "audit", 1).await;
        wait_replicas(&http, n.url(), "kv", 1).await;
        wait_replicas(&http, n.url(), "echo", 1).await;
    }
    // b knows a listens to the topic (interest spreads with the record).
    wait_until("b sees a's interest in orders.placed", || async {
        view(&http, b.url()).await["nodes"].as_array().is_some_and(|nodes| {
            nodes.iter().any(|n| n["topics"].as_array().is_some_and(|t| t.iter().any(|t| t == "orders.placed")))
        })
    })
    .await;

    let publish = |topic: &'static str, body: serde_json::Value| {
        let (http, url) = (http.clone(), b.url().to_owned());
        async move { http.post(format!("{url}/v1/events/{topic}")).json(&body).send().await.expect("sent").status() }
    };
    assert_eq!(publish("orders.placed", json!({"order": "o-1"})).await.as_u16(), 202);
    // A topic nobody listens to goes nowhere.
    assert_eq!(publish("nobody.listens", json!({"order": "o-2"})).await.as_u16(), 202);

    wait_until("a's audit gear has the event", || async {
        let r = http.post(format!("{}/v1/call/audit/recent", a.url())).json(&json!({})).send().await;
        let Ok(r) = r else { return false };
        let v: serde_json::Value = r.json().await.unwrap_or_default();
        v.as_array()
            .is_some_and(|evs| evs.iter().any(|e| e["topic"] == "orders.placed" && e["event"]["order"] == "o-1"))
    })
    .await;
    assert_eq!(metric(&http, b.url(), "gearmesh_mesh_events_sent_total").await, 1.0, "one copy, to a only");
    assert_eq!(metric(&http, a.url(), "gearmesh_mesh_events_received_total").await, 1.0);
    assert_eq!(metric(&http, c.url(), "gearmesh_mesh_events_received_total").await, 0.0, "c has no listener");
    // Only the one event ever reached a (the other topic was not sent anywhere).
    let recent: serde_json::Value = http
        .post(format!("{}/v1/call/audit/recent", a.url()))
        .json(&json!({}))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(recent.as_array().map(Vec::len), Some(1), "{recent}");
    drop((a, b, c));
}

/// A rolling restart of a replicated gear loses no call. Four callers loop through p1 (echo calls,
/// short sleeps, and sleeps of 700 ms, longer than a leaving node lingers, so that calls are
/// running when a replica stops) while each of the two echo replicas in turn is stopped
/// gracefully (SIGTERM: it announces its leave, takes no new call, finishes those it runs, and
/// answers them) and started again. Every call succeeds. Over WSS links, and over QUIC.
#[tokio::test]
async fn a_rolling_restart_of_a_replicated_gear_loses_no_call() {
    rolling_restart("wss").await;
}

#[tokio::test]
async fn a_rolling_restart_over_quic_loses_no_call() {
    rolling_restart("quic").await;
}

async fn rolling_restart(transport: &'static str) {
    let ca = Ca::new(&format!("rolling-restart-{transport}"));
    let p1 = ca.start(&["--name", "p1", "--gears", "kv", "--dial", transport]).await;
    let seed = p1.link(&format!("{transport}://"));
    let replica = |name: &'static str| {
        let (ca, seed) = (&ca, seed.clone());
        async move { ca.start(&["--name", name, "--gears", "echo", "--seed", &seed, "--dial", transport]).await }
    };
    let mut replicas = vec![replica("p2").await, replica("p3").await];
    let http = ca.client();
    wait_replicas(&http, p1.url(), "echo", 2).await;

    // Two callers' calls run long, one on each replica as p1 spreads them by load: one is
    // running on a replica when it stops.
    let callers = Callers::start(&http, p1.url(), 4, |w, k| match (w, k % 2) {
        (2 | 3, _) => ("echo/sleep", json!({"ms": 700})),
        (_, 0) => ("echo/echo", json!([w, k])),
        _ => ("echo/sleep", json!({"ms": 30})),
    });
    callers.wait(&[0; 4], 5).await;
    for (i, name) in ["p2", "p3"].into_iter().enumerate() {
        // Stopped first, then started again: meanwhile the other replica serves alone.
        signal(&replicas[i].proc.child, "TERM");
        let status = tokio::time::timeout(Duration::from_secs(30), replicas[i].proc.child.wait())
            .await
            .expect("the replica exited")
            .expect("status");
        assert!(status.success(), "a graceful stop exits 0: {status:?}");
        callers.wait(&callers.made(), 2).await;
        replicas[i] = replica(name).await;
        wait_replicas(&http, p1.url(), "echo", 2).await;
        callers.wait(&callers.made(), 3).await;
    }
    let all: Vec<Outcome> = callers.finish().await.into_iter().flatten().collect();
    let failed: Vec<_> = all.iter().filter(|(s, _)| *s != 200).collect();
    assert!(failed.is_empty(), "{} of {} calls failed: {failed:?}", failed.len(), all.len());
    drop((p1, replicas));
}

//! Call strategies and resilience across a real three-node mesh in one process (TLS from a
//! development CA, WebSocket links): local-first, spread, shard (and the sharded `kv`), scatter,
//! broadcast, retries within the budget, breakers, latency-aware spreading and routing around
//! a replica that sheds load.

use std::{
    num::NonZeroUsize,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use gearmesh::{
    RunningNode,
    gears::{CallError, CallOptions, Ctx, Gathered, Gear, PortSpec, Principal, Retry, Strategy},
};
use gearmesh_mesh::{MeshEvent, NodeId, rendezvous};
use serde_json::{Value, json};
use tokio::time::Instant;

mod common;

use common::{eventually, wss};

async fn node(dir: &Path, name: &str, builtin: &[&str], extra: Vec<Gear>, seeds: Vec<String>) -> RunningNode {
    common::in_process_node(dir, name, builtin, extra, seeds, |_| {}).await
}

/// Whether `n` sees `gear` on `count` alive nodes with a route to each.
fn sees(n: &RunningNode, gear: &str, count: usize) -> bool {
    let view = n.mesh().view();
    view.nodes
        .iter()
        .filter(|x| x.state == "alive" && x.route.is_some() && x.gears.iter().any(|g| g.name == gear))
        .count()
        == count
}

/// `who.name` answers with the node's name and counts its calls.
fn who(name: &str, calls: Arc<AtomicUsize>) -> Gear {
    let name = name.to_owned();
    Gear::new("who")
        .port_with(PortSpec::new("name").idempotent(true), move |_ctx: Ctx, _: Value| {
            calls.fetch_add(1, Ordering::Relaxed);
            std::future::ready(Ok(json!({ "node": name })))
        })
        .port("fail", |_ctx: Ctx, _: Value| std::future::ready(Err::<Value, _>(CallError::internal("injected"))))
}

/// `flaky.read` (idempotent), `flaky.write` (not) and `flaky.refuse` (an app error): each counts
/// its attempts, takes `delay`, and fails `unavailable` while `down` is set.
fn flaky(down: Arc<AtomicBool>, attempts: Arc<AtomicUsize>, delay: Duration) -> Gear {
    let port = move |fail: bool| {
        let (down, attempts) = (down.clone(), attempts.clone());
        move |_ctx: Ctx, _: Value| {
            attempts.fetch_add(1, Ordering::Relaxed);
            let is_down = down.load(Ordering::Relaxed);
            async move {
                tokio::time::sleep(delay).await;
                match (fail, is_down) {
                    (true, _) => Err(CallError::app("nope", "refused")),
                    (false, true) => Err(CallError::unavailable("injected")),
                    (false, false) => Ok(json!("ok")),
                }
            }
        }
    };
    Gear::new("flaky")
        .port_with(PortSpec::new("read").idempotent(true), port(false))
        .port("write", port(false))
        .port_with(PortSpec::new("refuse").idempotent(true), port(true))
}

struct Mesh3 {
    _dir: tempfile::TempDir,
    nodes: Vec<RunningNode>,
    calls: Vec<Arc<AtomicUsize>>,
}

/// Three nodes, each hosting `who` and `kv`, plus `extra(i)`.
async fn mesh3(extra: impl Fn(usize) -> Vec<Gear>) -> Mesh3 {
    let dir = tempfile::tempdir().expect("tempdir");
    let calls: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::default()).collect();
    let mut nodes: Vec<RunningNode> = Vec::new();
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        let mut gears = vec![who(name, calls[i].clone())];
        gears.extend(extra(i));
        let seeds = nodes.first().map(wss).into_iter().collect();
        nodes.push(node(dir.path(), name, &["kv"], gears, seeds).await);
    }
    for n in &nodes {
        eventually("every node routes to every replica", 15, || sees(n, "who", 3) && sees(n, "kv", 3)).await;
    }
    Mesh3 { _dir: dir, nodes, calls }
}

fn ctx(n: &RunningNode) -> Ctx {
    n.ctx(Principal::anonymous())
}

async fn name_with(n: &RunningNode, s: Strategy) -> String {
    let v: Value = ctx(n).call_with("who", "name", &json!({}), CallOptions::default().strategy(s)).await.expect("call");
    v["node"].as_str().expect("name").to_owned()
}

/// `stall.get` (idempotent) and `stall.put` (not): each counts the attempts that reach it and
/// answers the node's name at once, or never when `hang`.
fn stall(name: &str, hang: bool, started: Arc<AtomicUsize>) -> Gear {
    let port = move |name: String, started: Arc<AtomicUsize>| {
        move |_ctx: Ctx, _: Value| {
            started.fetch_add(1, Ordering::SeqCst);
            let name = name.clone();
            async move {
                if hang {
                    std::future::pending::<()>().await;
                }
                Ok(json!(name))
            }
        }
    };
    Gear::new("stall")
        .port_with(PortSpec::new("get").idempotent(true), port(name.to_owned(), started.clone()))
        .port("put", port(name.to_owned(), started))
}

/// Counts a port's futures dropped before they ended (cancelled attempts).
struct DropCount(Arc<AtomicUsize>);

impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// `lag.get` (idempotent): answers the node's name after `delay`, or never (`None`); counts
/// the attempts that start and those dropped unfinished (cancelled by their caller).
fn lag(name: &str, delay: Option<Duration>, started: Arc<AtomicUsize>, dropped: Arc<AtomicUsize>) -> Gear {
    let name = name.to_owned();
    Gear::new("lag").port_with(PortSpec::new("get").idempotent(true), move |_ctx: Ctx, _: Value| {
        started.fetch_add(1, Ordering::SeqCst);
        let (name, guard) = (name.clone(), DropCount(dropped.clone()));
        async move {
            match delay {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
            std::mem::forget(guard);
            Ok(json!(name))
        }
    })
}

/// A hedged call keeps its first attempt and sends a second to another replica when the first
/// has not answered in time; the first reply wins and the other attempt is cancelled (gRPC's
/// hedging, Finagle's backup requests). b answers after 400 ms, c never; a hedges after 100 ms.
/// Whichever replica a call tries first, b answers it and c's attempt is cancelled: every call
/// starts one attempt on each. A per-try timeout could not do this (it gives the first attempt
/// up), and without either a call that tried c first waited for its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedged_call_is_answered_by_whichever_replica_answers_first() {
    let started: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::default()).collect();
    let dropped: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::default()).collect();
    let delays = [None, Some(Duration::from_millis(400)), None];
    let names = ["a", "b", "c"];
    let m =
        mesh3(|i| if i == 0 { vec![] } else { vec![lag(names[i], delays[i], started[i].clone(), dropped[i].clone())] })
            .await;
    let a = &m.nodes[0];
    eventually("a routes to both replicas of lag", 15, || sees(a, "lag", 2)).await;
    let opts = CallOptions::default()
        .timeout(Duration::from_secs(60))
        .hedge_after(Duration::from_millis(100))
        .strategy(Strategy::Spread);
    const CALLS: usize = 8;
    for i in 0..CALLS {
        let v: Value = ctx(a).call_with("lag", "get", &json!(i), opts.clone()).await.expect("b answers");
        assert_eq!(v, json!("b"), "call {i}");
    }
    assert_eq!(started[1].load(Ordering::SeqCst), CALLS, "each call ran once on b");
    assert_eq!(started[2].load(Ordering::SeqCst), CALLS, "and started once on c, first or as the hedge");
    eventually("c's attempts are cancelled", 10, || dropped[2].load(Ordering::SeqCst) == CALLS).await;
    assert_eq!(dropped[1].load(Ordering::SeqCst), 0, "b's attempts all finished");
    let stats = a.mesh().resilience_stats();
    assert_eq!(stats.hedges, CALLS as u64, "{stats:?}");
}

/// An attempt that outlasts the call's per-try timeout is given up (Envoy's per-try timeout):
/// a call to an idempotent port is made again on another replica, long before its own deadline;
/// one to a port that is not idempotent fails `timeout` then, and is not made again. b's
/// `stall` never answers, c's at once; a calls with a 60 s timeout and a 300 ms per-try one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_past_its_per_try_timeout_is_given_up_and_made_elsewhere() {
    let started: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::default()).collect();
    let names = ["a", "b", "c"];
    let m = mesh3(|i| if i == 0 { vec![] } else { vec![stall(names[i], i == 1, started[i].clone())] }).await;
    let a = &m.nodes[0];
    eventually("a routes to both replicas of stall", 15, || sees(a, "stall", 2)).await;
    let opts = CallOptions::default().timeout(Duration::from_secs(60)).per_try_timeout(Duration::from_millis(300));

    // Spread over b and c until an attempt has gone to b: every call is answered by c.
    let spread = opts.clone().strategy(Strategy::Spread);
    let mut calls = 0;
    while started[1].load(Ordering::SeqCst) == 0 {
        assert!(calls < 40, "no attempt went to b in {calls} calls");
        let v: Value = ctx(a).call_with("stall", "get", &json!({}), spread.clone()).await.expect("c answers");
        assert_eq!(v, json!("c"));
        calls += 1;
    }

    // Sharded to b (a key b owns): `put` is tried once, and fails at the per-try timeout.
    let ids: Vec<NodeId> = m.nodes[1..].iter().map(|n| n.id().parse().expect("node id")).collect();
    let key = (0..).map(|k| format!("k{k}")).find(|k| rendezvous(k, &ids)[0] == ids[0]).expect("a key of b's");
    let before = started[1].load(Ordering::SeqCst);
    let sharded = opts.strategy(Strategy::Shard(Some(key)));
    let e = ctx(a).call_with::<_, Value>("stall", "put", &json!({}), sharded).await.expect_err("b never answers");
    assert_eq!(e.code(), gearmesh::gears::ErrorCode::Timeout, "{e}");
    assert_eq!(started[1].load(Ordering::SeqCst), before + 1, "not idempotent: one attempt only");
    assert_eq!(started[2].load(Ordering::SeqCst), calls, "each get ran once, on c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_strategy_across_a_three_node_mesh() {
    let m = mesh3(|_| vec![]).await;
    let [a, b, c] = [&m.nodes[0], &m.nodes[1], &m.nodes[2]];

    // local-first: the replica here.
    for _ in 0..10 {
        assert_eq!(name_with(a, Strategy::LocalFirst).await, "a");
    }

    // spread: every replica, this one included, gets traffic.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..90 {
        seen.insert(name_with(a, Strategy::Spread).await);
    }
    assert_eq!(seen.len(), 3, "spread reached {seen:?}");

    // shard: a key always reaches the same replica, the one rendezvous hashing names, from
    // whichever node the call enters.
    let ids: Vec<NodeId> = m.nodes.iter().map(|n| n.id().parse().expect("node id")).collect();
    let name_of = |id: NodeId| m.nodes.iter().find(|n| n.id() == id.to_string()).expect("node").name().to_owned();
    let mut owners = std::collections::BTreeSet::new();
    for k in 0..12 {
        let key = format!("user-{k}");
        let owner = name_of(rendezvous(&key, &ids)[0]);
        for entry in [a, b, c] {
            assert_eq!(name_with(entry, Strategy::Shard(Some(key.clone()))).await, owner, "key {key}");
        }
        owners.insert(owner);
    }
    assert!(owners.len() >= 2, "12 keys all landed on {owners:?}");

    // kv is sharded by its "key" field by default: written through a, read through c, and each
    // node holds only its share.
    let http = common::client_trusting(a.dev_ca_cert().expect("dev CA"));
    for k in 0..30 {
        let url = format!("{}/v1/call/kv/put", a.url());
        let r = http.post(url).json(&json!({"key": format!("k{k}"), "value": k})).send().await.expect("sent");
        assert_eq!(r.status(), 200);
    }
    for k in 0..30 {
        let v: Value = ctx(c).call("kv", "get", &json!({"key": format!("k{k}")})).await.expect("found");
        assert_eq!(v["value"], k);
    }
    let mut held = Vec::new();
    for n in [a, b, c] {
        let mut count = 0;
        for k in 0..30 {
            let local = CallOptions::default().strategy(Strategy::LocalFirst);
            let r: Result<Value, _> = ctx(n).call_with("kv", "get", &json!({"key": format!("k{k}")}), local).await;
            count += usize::from(r.is_ok());
        }
        held.push(count);
    }
    assert_eq!(held.iter().sum::<usize>(), 30, "each key is held once: {held:?}");
    assert!(held.iter().all(|h| *h < 30), "the keys are spread: {held:?}");

    // scatter over HTTP: every replica's reply, one with its error.
    let url = format!("{}/v1/call/who/name?strategy=scatter", b.url());
    let r = http.post(url).json(&json!({})).send().await.expect("sent");
    assert_eq!(r.status(), 200);
    let g: Gathered<Value> = r.json().await.expect("gathered");
    assert!(g.complete && g.ok == 3 && g.replies.len() == 3, "{g:?}");
    let mut names: Vec<String> =
        g.replies.iter().map(|r| r.ok.as_ref().expect("ok")["node"].as_str().expect("name").to_owned()).collect();
    names.sort();
    assert_eq!(names, ["a", "b", "c"]);
    let g: Gathered<Value> = ctx(a)
        .call_with("who", "fail", &json!({}), CallOptions::default().strategy(Strategy::Scatter(Default::default())))
        .await
        .expect("partial results are a reply");
    assert_eq!((g.ok, g.replies.len()), (0, 3));
    assert!(g.replies.iter().all(|r| r.error.as_ref().is_some_and(|e| e.message().contains("injected"))), "{g:?}");
    let url = format!("{}/v1/call/who/name?strategy=scatter&gather=quorum", c.url());
    let g: Gathered<Value> =
        http.post(url).json(&json!({})).send().await.expect("sent").json().await.expect("gathered");
    assert!(g.complete && g.ok >= 2, "{g:?}");

    // broadcast: accepted at once, every replica runs it.
    let before: Vec<usize> = m.calls.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let url = format!("{}/v1/call/who/name?strategy=broadcast", a.url());
    let r = http.post(url).json(&json!({})).send().await.expect("sent");
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["sent"], 3, "{v}");
    eventually("every replica ran the broadcast", 5, || {
        m.calls.iter().zip(&before).all(|(c, b)| c.load(Ordering::Relaxed) == b + 1)
    })
    .await;

    // A bad strategy is a 400 naming it.
    let url = format!("{}/v1/call/who/name?strategy=nearest", a.url());
    let r = http.post(url).json(&json!({})).send().await.expect("sent");
    assert_eq!(r.status(), 400);
    assert!(r.text().await.expect("text").contains("nearest"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stay_within_the_budget_and_skip_non_idempotent_ports_and_app_errors() {
    // flaky runs on b and c, never on a (the caller): every call crosses the mesh.
    let down: Vec<Arc<AtomicBool>> = (0..3).map(|_| Arc::default()).collect();
    let attempts: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::default()).collect();
    let (d, at) = (down.clone(), attempts.clone());
    // b answers 20 ms slower than c, so spreading from a always tries c first.
    let delay = |i: usize| Duration::from_millis(if i == 1 { 20 } else { 0 });
    let m = mesh3(move |i| if i == 0 { vec![] } else { vec![flaky(d[i].clone(), at[i].clone(), delay(i))] }).await;
    let a = &m.nodes[0];
    eventually("a sees flaky on b and c", 10, || sees(a, "flaky", 2)).await;
    let total = || attempts.iter().map(|a| a.load(Ordering::Relaxed)).sum::<usize>();

    // A port's own error (4xx-like) is never retried, idempotent or not, even when asked.
    // (20 calls: both replicas answer some, so a knows both latencies; a miss is 1 in 2^19.)
    for _ in 0..20 {
        let opts = CallOptions::default().retry(Retry::Yes);
        let e = ctx(a).call_with::<_, Value>("flaky", "refuse", &json!({}), opts).await.expect_err("refused");
        assert_eq!(e.app_code(), Some("nope"));
    }
    assert_eq!(total(), 20, "app errors are not retried");

    // c is down: idempotent reads go to c (the faster), fail, and are retried on b. (8 reads: 8
    // retries, within the 10 the budget starts with, so none is refused.)
    down[2].store(true, Ordering::Relaxed);
    let (on_b, on_c) = (attempts[1].load(Ordering::Relaxed), attempts[2].load(Ordering::Relaxed));
    for _ in 0..8 {
        let v: Value = ctx(a).call("flaky", "read", &json!({})).await.expect("retried on b");
        assert_eq!(v, "ok");
    }
    assert_eq!(attempts[2].load(Ordering::Relaxed) - on_c, 8, "every read tried c first");
    assert_eq!(attempts[1].load(Ordering::Relaxed) - on_b, 8, "and was retried on b");
    assert_eq!(a.mesh().resilience_stats().retries, 8);

    // A non-idempotent port is never retried: exactly one attempt per call, and the calls that
    // reached c fail.
    let (before, before_c) = (total(), attempts[2].load(Ordering::Relaxed));
    let mut failed = 0;
    for _ in 0..20 {
        if let Err(e) = ctx(a).call::<_, Value>("flaky", "write", &json!({})).await {
            assert_eq!(e.code(), gearmesh::gears::ErrorCode::Unavailable, "{e}");
            failed += 1;
        }
    }
    assert_eq!(total() - before, 20, "one attempt per write");
    assert_eq!(attempts[2].load(Ordering::Relaxed) - before_c, failed, "only the writes that reached c failed");

    // Outage: both replicas fail. Retries never add more than the budget allows.
    down[1].store(true, Ordering::Relaxed);
    let started = Instant::now();
    let stats0 = a.mesh().resilience_stats();
    let before = total();
    const N: usize = 200;
    for _ in 0..N {
        let e = ctx(a).call::<_, Value>("flaky", "read", &json!({})).await.expect_err("outage");
        assert_eq!(e.code(), gearmesh::gears::ErrorCode::Unavailable, "{e}");
    }
    let made = total() - before;
    let secs = started.elapsed().as_secs_f64().ceil() as usize;
    let stats = a.mesh().resilience_stats();
    let retries = (stats.retries - stats0.retries) as usize;
    // The budget (defaults): 10% of the calls, plus 10 per second, plus at most 10 saved up.
    let bound = N + N / 10 + 10 * secs + 10;
    println!(
        "RETRY BUDGET: {N} calls in an outage made {made} attempts ({retries} retries, {} refused by the budget, \
         {} fast failures on open breakers; bound {bound})",
        stats.retries_refused - stats0.retries_refused,
        stats.breaker_rejections - stats0.breaker_rejections,
    );
    assert!(made <= bound, "{made} attempts for {N} calls (bound {bound})");
    assert!(retries <= N / 10 + 10 * secs + 10, "{retries} retries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_replica_opens_its_breaker_and_calls_go_elsewhere() {
    let down: Vec<Arc<AtomicBool>> = (0..3).map(|_| Arc::default()).collect();
    let attempts: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::default()).collect();
    let (d, at) = (down.clone(), attempts.clone());
    let m =
        mesh3(move |i| if i == 0 { vec![] } else { vec![flaky(d[i].clone(), at[i].clone(), Duration::ZERO)] }).await;
    let a = &m.nodes[0];
    eventually("a sees flaky on b and c", 10, || sees(a, "flaky", 2)).await;
    let mut events = a.mesh().subscribe();
    down[1].store(true, Ordering::Relaxed);
    // While the breaker learns, reads that hit b are retried on c as long as the retry budget
    // lasts; past it they fail.
    let mut failed = 0;
    for _ in 0..200 {
        failed += usize::from(ctx(a).call::<_, Value>("flaky", "read", &json!({})).await.is_err());
    }
    println!("BREAKER: {failed} of 200 reads failed while b's breaker learned");
    assert!(failed < 40, "{failed} of 200 reads failed");
    let b_id = m.nodes[1].id().to_owned();
    let breakers = a.mesh().breakers_of(&b_id);
    let flaky_b = breakers.iter().find(|v| v.gear == "flaky").expect("a tracks flaky on b");
    assert_eq!(flaky_b.state.as_str(), "open", "{breakers:?}");
    // While open, b gets no more calls.
    let on_b = attempts[1].load(Ordering::Relaxed);
    for _ in 0..20 {
        let _: Value = ctx(a).call("flaky", "read", &json!({})).await.expect("served by c");
    }
    assert_eq!(attempts[1].load(Ordering::Relaxed), on_b, "an open breaker fails fast");
    // The change was announced to observers, and /v1/nodes shows it.
    let mut announced = false;
    while let Ok(ev) = events.try_recv() {
        if let MeshEvent::BreakerChanged { gear, node, state } = ev {
            announced |= gear == "flaky" && node.to_string() == b_id && state.as_str() == "open";
        }
    }
    assert!(announced, "a BreakerChanged event was sent");
    let http = common::client_trusting(a.dev_ca_cert().expect("dev CA"));
    let view: Value = http.get(format!("{}/v1/nodes", a.url())).send().await.expect("sent").json().await.expect("json");
    let node = view["nodes"].as_array().expect("nodes").iter().find(|n| n["id"] == b_id).expect("b");
    assert!(
        node["breakers"].as_array().expect("breakers").iter().any(|v| v["gear"] == "flaky" && v["state"] == "open")
    );
    let metrics = http.get(format!("{}/metrics", a.url())).send().await.expect("sent").text().await.expect("text");
    let rejected = metrics
        .lines()
        .find_map(|l| l.strip_prefix("gearmesh_mesh_breaker_rejections_total "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .expect("the breaker counter is exported");
    assert!(rejected >= 20, "{rejected} attempts skipped on the open breaker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_replica_gets_less_traffic_and_a_shedding_one_is_routed_around() {
    let served: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::default()).collect();
    let s = served.clone();
    let m = mesh3(move |i| {
        let count = s[i].clone();
        // `lat.ping` takes 40 ms on b and no time on c; a does not host it.
        let delay = Duration::from_millis(if i == 1 { 40 } else { 0 });
        let lat = Gear::new("lat").port_with(PortSpec::new("ping").idempotent(true), move |_ctx: Ctx, _: Value| {
            count.fetch_add(1, Ordering::Relaxed);
            async move {
                tokio::time::sleep(delay).await;
                Ok(json!("pong"))
            }
        });
        // `busy.hold` takes one call at a time on each node and holds it for `ms`.
        let busy = Gear::new("busy").port_with(
            PortSpec::new("hold").max_concurrency(NonZeroUsize::new(1).expect("non-zero")),
            move |_ctx: Ctx, req: Value| async move {
                tokio::time::sleep(Duration::from_millis(req["ms"].as_u64().unwrap_or(0))).await;
                Ok(json!({ "node": i }))
            },
        );
        if i == 0 { vec![busy] } else { vec![lat, busy] }
    })
    .await;
    let [a, b] = [&m.nodes[0], &m.nodes[1]];
    eventually("a sees lat on b and c", 10, || sees(a, "lat", 2) && sees(a, "busy", 3)).await;

    for _ in 0..60 {
        let _: Value = ctx(a).call("lat", "ping", &json!({})).await.expect("pong");
    }
    let (slow, fast) = (served[1].load(Ordering::Relaxed), served[2].load(Ordering::Relaxed));
    println!("LATENCY: the 40 ms replica served {slow} of 60 calls, the fast one {fast}");
    assert!(slow * 3 < fast, "slow {slow}, fast {fast}");

    // b's only `busy` slot is taken; a local-first call on b is shed there and runs elsewhere.
    let holder = tokio::spawn({
        let ctx = ctx(b);
        async move {
            ctx.call_with::<_, Value>(
                "busy",
                "hold",
                &json!({"ms": 1500}),
                CallOptions::default().strategy(Strategy::LocalFirst),
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let v: Value = ctx(b)
        .call_with("busy", "hold", &json!({"ms": 0}), CallOptions::default().strategy(Strategy::LocalFirst))
        .await
        .expect("routed around the shedding replica");
    assert_ne!(v["node"], 1, "{v}");
    assert_eq!(holder.await.expect("joined").expect("held")["node"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_keys_move_about_one_nth_when_a_replica_joins_and_come_back_when_it_leaves() {
    let m = mesh3(|_| vec![]).await;
    const KEYS: usize = 400;
    async fn owners(n: &RunningNode) -> Vec<String> {
        let mut v = Vec::with_capacity(KEYS);
        for k in 0..KEYS {
            v.push(name_with(n, Strategy::Shard(Some(format!("key-{k}")))).await);
        }
        v
    }
    let before = owners(&m.nodes[0]).await;

    // A fourth replica joins.
    let d = node(m._dir.path(), "d", &[], vec![who("d", Arc::default())], vec![wss(&m.nodes[1])]).await;
    for n in m.nodes.iter().chain([&d]) {
        eventually("every node routes to the four replicas", 15, || sees(n, "who", 4)).await;
    }
    let after = owners(&m.nodes[0]).await;
    let moved: Vec<usize> = (0..KEYS).filter(|&k| before[k] != after[k]).collect();
    println!("SHARD (real mesh): {} of {KEYS} keys moved when a 4th replica joined (ideal {})", moved.len(), KEYS / 4);
    assert!(moved.iter().all(|&k| after[k] == "d"), "keys only move to the new replica");
    assert!((KEYS / 8..KEYS * 3 / 8).contains(&moved.len()), "{} keys moved", moved.len());

    // It leaves again: every key is back with its first owner.
    d.shutdown().await;
    for n in &m.nodes {
        eventually("every node routes to the three replicas", 15, || sees(n, "who", 3)).await;
    }
    assert_eq!(owners(&m.nodes[0]).await, before, "the keys went back");
}

//! Several nodes in one process forming a real mesh over loopback: TLS from a development CA in a
//! temporary directory, WebSocket and QUIC links, remote calls, events, switching, leaving.

mod common;
#[allow(dead_code, unreachable_pub)]
#[path = "../../transport/tests/common/proxy.rs"]
mod proxy;

use common::{eventually, sees, wss};

use std::{path::Path, time::Duration};

use gearmesh::{
    Node, NodeConfig, RunningNode,
    gears::{Ctx, Gear, Principal},
};
use serde_json::{Value, json};
use tokio::time::Instant;

/// Starts a node on port 0 with TLS from the development CA in `dir`.
async fn node(dir: &Path, name: &str, gears: &[&str], extra: Vec<Gear>, seeds: Vec<String>) -> RunningNode {
    node_with(dir, name, gears, extra, seeds, |_| {}).await
}

async fn node_with(
    dir: &Path,
    name: &str,
    gears: &[&str],
    extra: Vec<Gear>,
    seeds: Vec<String>,
    tweak: impl FnOnce(&mut NodeConfig),
) -> RunningNode {
    common::in_process_node(dir, name, gears, extra, seeds, tweak).await
}

/// An HTTPS client trusting only the development CA of the test.
fn client(node: &RunningNode) -> reqwest::Client {
    common::client_trusting(node.dev_ca_cert().expect("dev mode writes the CA certificate"))
}

async fn post(c: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let r = c.post(url).json(&body).send().await.expect("sent");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get(c: &reqwest::Client, url: &str) -> Value {
    c.get(url).send().await.expect("sent").json().await.expect("json")
}

#[tokio::test]
async fn a_port_call_crosses_the_mesh_and_events_reach_only_interested_nodes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = node(dir.path(), "a", &["users", "products"], vec![], vec![]).await;
    let b = node(dir.path(), "b", &["billing", "audit"], vec![], vec![wss(&a)]).await;
    let c = node(dir.path(), "c", &["orders"], vec![], vec![wss(&b)]).await;
    let all = ["users", "products", "billing", "audit", "orders"];
    eventually("every node sees every gear", 15, || sees(&a, &all) && sees(&b, &all) && sees(&c, &all)).await;

    // Placed through node a: orders runs on c, which calls users and products on a and billing on b.
    let http = client(&a);
    let (status, order) = post(
        &http,
        &format!("{}/v1/call/orders/place", a.url()),
        json!({"user_id": "alice", "product_id": "widget", "qty": 2}),
    )
    .await;
    assert_eq!(status, 200, "{order}");
    assert!(order["order_id"].is_string(), "{order}");
    assert!(c.mesh().stats().calls_received >= 1, "orders ran on c");
    assert!(c.mesh().stats().calls_sent >= 3, "c called users, products and billing remotely");

    // A port's own error crosses the mesh with its code.
    let (status, err) = post(
        &http,
        &format!("{}/v1/call/orders/place", a.url()),
        json!({"user_id": "mallory", "product_id": "widget", "qty": 1}),
    )
    .await;
    assert_eq!(status, 422, "{err}");
    assert_eq!(err["error"]["code"], "app");

    // orders.placed (published on c) went to b, where audit listens, and to no other node;
    // billing.charged is published on b itself and stays local.
    let recent = |http: reqwest::Client, url: String| async move {
        post(&http, &format!("{url}/v1/call/audit/recent"), Value::Null).await.1
    };
    let mut seen = Value::Null;
    for _ in 0..100 {
        seen = recent(http.clone(), a.url()).await;
        if seen.as_array().is_some_and(|v| v.iter().any(|e| e["topic"] == "orders.placed")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen.as_array().is_some_and(|v| v.iter().any(|e| e["topic"] == "orders.placed")), "{seen}");
    assert_eq!(b.mesh().stats().events_received, 1, "b got orders.placed from c");
    assert_eq!(c.mesh().stats().events_sent, 1, "c sent it to b only");
    assert_eq!(a.mesh().stats().events_received, 0, "a has no listener: it gets no events");
    assert_eq!(c.mesh().stats().events_received, 0, "c has no listener: it gets no events");

    // The mesh as a node sees it.
    let nodes = get(&http, &format!("{}/v1/nodes", a.url())).await;
    assert_eq!(nodes["nodes"].as_array().map(Vec::len), Some(3), "{nodes}");
    // Routes converge (a route to a node is direct, or through the node linked to it).
    let mut routes = Value::Null;
    for _ in 0..250 {
        routes = get(&http, &format!("{}/v1/routes", a.url())).await;
        if routes["routes"].as_array().map(Vec::len) == Some(2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(routes["routes"].as_array().map(Vec::len), Some(2), "{routes} {nodes:#}");
    let metrics = http.get(format!("{}/metrics", c.url())).send().await.expect("sent").text().await.expect("text");
    assert!(metrics.contains("gearmesh_mesh_calls_sent_total"), "{metrics}");

    for n in [c, b, a] {
        n.shutdown().await;
    }
}

/// A gear per node that says where it ran.
fn whoami(i: usize) -> Gear {
    Gear::new(format!("g{i}")).port("who", move |_ctx: Ctx, _: Value| async move { Ok(format!("n{i}")) })
}

#[tokio::test]
async fn nodes_not_linked_directly_reach_each_other_through_switches() {
    let dir = tempfile::tempdir().expect("tempdir");
    // At most two links per node among four nodes: some pairs cannot be linked directly.
    let limit = |c: &mut NodeConfig| {
        c.mesh.min_links = 1;
        c.mesh.max_links = 2;
    };
    let mut nodes: Vec<RunningNode> = Vec::new();
    for i in 0..4 {
        let seeds = nodes.last().map(|n| vec![wss(n)]).unwrap_or_default();
        nodes.push(node_with(dir.path(), &format!("n{i}"), &[], vec![whoami(i)], seeds, limit).await);
    }
    let gears: Vec<String> = (0..4).map(|i| format!("g{i}")).collect();
    let names: Vec<&str> = gears.iter().map(String::as_str).collect();
    eventually("every node sees every gear", 20, || nodes.iter().all(|n| sees(n, &names))).await;
    eventually("some route is two links long", 20, || {
        nodes.iter().any(|n| n.mesh().view().nodes.iter().any(|x| x.route.as_ref().is_some_and(|r| r.hops >= 2)))
    })
    .await;

    // Every node reaches every gear, whatever the path. Links may still be being pruned to two
    // per node: a call whose route vanishes meanwhile fails `unavailable` at once (by design,
    // instead of hanging), so such a call is tried again while routes settle.
    for n in &nodes {
        let ctx = n.ctx(Principal::anonymous());
        for (i, g) in gears.iter().enumerate() {
            let settle = Instant::now() + Duration::from_secs(10);
            let who: String = loop {
                match ctx.call(g, "who", &Value::Null).await {
                    Err(e) if e.code().as_str() == "unavailable" && Instant::now() < settle => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    r => break r.expect("reached"),
                }
            };
            assert_eq!(who, format!("n{i}"));
        }
    }
    let forwarded: u64 = nodes.iter().map(|n| n.mesh().stats().frames_forwarded).sum();
    assert!(forwarded > 0, "some calls were switched through a middle node");
    for n in nodes.into_iter().rev() {
        n.shutdown().await;
    }
}

/// No call is lost while a mesh forms and reshapes itself: six nodes allowed two links each
/// join one after another, so links are made, pruned and refused while every node calls every
/// gear. A call may fail at once (`unavailable` while a route is missing, `not_found` before the
/// gear is known), but none waits for its deadline: no call or reply vanishes on the way.
///
/// Before the return paths, lingering links and the `Prune` notice, every run lost one or two.
/// A rarer loss (one full-suite run in 5 to 30) had four causes, found with the trace below and
/// fixed on 2026-12-02 (docs/mesh.md, "No call lost"); eight traced full-suite runs after the
/// last fix lost none. A run that loses a call is still run once more, and the test fails if
/// the second run loses any. `GEARMESH_TEST_TRACE=PATH` writes the mesh's and the links' debug
/// log of this test binary to `PATH.<pid>`, and a lost call is printed with its id and the time
/// it was made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_call_is_lost_while_the_mesh_forms_and_prunes_links() {
    no_call_lost_while_forming("wss").await;
}

/// The same over QUIC links: seeds given as `quic://` and `[mesh] dial = "quic"`, so every link
/// the mesh makes is a QUIC link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_call_is_lost_while_a_quic_mesh_forms_and_prunes_links() {
    no_call_lost_while_forming("quic").await;
}

async fn no_call_lost_while_forming(transport: &'static str) {
    let (ok, failed_fast, lost) = forming_mesh_calls(transport).await;
    if lost == 0 {
        return;
    }
    eprintln!("{lost} of {ok} calls lost; the scenario runs once more");
    let (ok, failed_fast_again, lost) = forming_mesh_calls(transport).await;
    assert_eq!(
        lost, 0,
        "calls that waited for their deadline, in two runs ({ok} answered, {failed_fast} and {failed_fast_again} failed at once)"
    );
}

/// One run of the scenario above: calls answered, failed at once, and lost.
async fn forming_mesh_calls(transport: &'static str) -> (u64, u64, u64) {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    };

    const NODES: usize = 6;
    if let Ok(path) = std::env::var("GEARMESH_TEST_TRACE") {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(format!("{path}.{}", std::process::id()))
            .expect("trace file");
        let _ = tracing_subscriber::fmt()
            .with_writer(std::sync::Mutex::new(file))
            .with_ansi(false)
            .with_env_filter("gearmesh_mesh=debug,gearmesh_transport=debug")
            .try_init();
    }
    let t0 = std::time::Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let limit = |c: &mut NodeConfig| {
        c.mesh.min_links = 1;
        c.mesh.max_links = 2;
        if transport == "quic" {
            c.mesh.dial = gearmesh::DialTransport::Quic;
        }
    };
    let seed_of = |n: &RunningNode| {
        n.link_addrs().iter().find(|a| a.starts_with(&format!("{transport}://"))).expect("address").clone()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed_fast, lost) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut nodes: Vec<Arc<RunningNode>> = Vec::new();
    let mut callers = Vec::new();
    for i in 0..NODES {
        let seeds = nodes.last().map(|n| vec![seed_of(n)]).unwrap_or_default();
        let n = Arc::new(node_with(dir.path(), &format!("n{i}"), &[], vec![whoami(i)], seeds, limit).await);
        // Each node calls every gear in turn from the moment it starts.
        let (node, stop, ok, failed_fast, lost) =
            (n.clone(), stop.clone(), ok.clone(), failed_fast.clone(), lost.clone());
        callers.push(tokio::spawn(async move {
            let ctx = node.ctx(Principal::anonymous());
            let options = gearmesh::gears::CallOptions::default().timeout(Duration::from_secs(5));
            let mut k = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let g = k % NODES;
                k += 1;
                let began = t0.elapsed();
                match ctx.call_with::<_, String>(&format!("g{g}"), "who", &Value::Null, options.clone()).await {
                    Ok(who) => {
                        assert_eq!(who, format!("n{g}"));
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if e.code().as_str() == "timeout" => {
                        eprintln!(
                            "lost: {} -> g{g} (made {began:?} after start, wall {:?}): {e}",
                            node.mesh().id(),
                            std::time::SystemTime::now()
                        );
                        lost.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        assert!(["unavailable", "not_found"].contains(&e.code().as_str()), "{e}");
                        failed_fast.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
        nodes.push(n);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Long enough for the later joiners' links to pass their grace period and be pruned.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.await.expect("caller");
    }
    let switched: u64 = nodes.iter().map(|n| n.mesh().stats().frames_forwarded).sum();
    let (ok, failed_fast, lost) =
        (ok.load(Ordering::Relaxed), failed_fast.load(Ordering::Relaxed), lost.load(Ordering::Relaxed));
    eprintln!("calls: {ok} answered, {failed_fast} failed at once, {lost} lost; {switched} frames switched");
    if lost > 0 {
        for n in &nodes {
            let view = n.mesh().view();
            eprintln!(
                "node {} = {}",
                view.me,
                view.nodes.iter().find(|v| v.id == view.me).map_or("?", |v| v.name.as_str())
            );
        }
    }
    assert!(ok > 100 && switched > 0, "calls ran, some through switches: {ok} answered, {switched} frames switched");
    // Every link the mesh made is over the transport asked for. A node may be between links
    // for a moment (its last one pruned or timed out on a busy machine, the next being dialed).
    let linked = |n: &RunningNode| {
        let view = n.mesh().view();
        view.nodes.iter().any(|v| v.id == view.me && v.links.iter().any(|l| l.transport.is_some()))
    };
    eventually("every node has a link", 10, || nodes.iter().all(|n| linked(n))).await;
    for n in &nodes {
        let view = n.mesh().view();
        let me = view.nodes.iter().find(|v| v.id == view.me).expect("itself");
        let kinds: Vec<_> = me.links.iter().filter_map(|l| l.transport.as_deref()).collect();
        assert!(!kinds.is_empty() && kinds.iter().all(|k| *k == transport), "{}: {kinds:?}", me.name);
    }
    for n in nodes.into_iter().rev() {
        Arc::into_inner(n).expect("callers done").shutdown().await;
    }
    (ok, failed_fast, lost)
}

/// QUIC listens on the UDP port with the TCP port's number. A port given in the config whose
/// UDP twin is taken is a clear error naming QUIC and the address (a node on port 0 picks
/// another port instead).
#[tokio::test]
async fn a_fixed_port_whose_udp_twin_is_taken_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    gearmesh::install_crypto_provider();
    // A UDP port whose TCP twin is free (tried a few times: another process may hold it).
    for _ in 0..20 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let addr = udp.local_addr().expect("addr");
        if std::net::TcpListener::bind(addr).is_err() {
            continue;
        }
        let mut config = NodeConfig { listen: addr, insecure_dev: true, ..NodeConfig::default() };
        config.tls.data_dir = Some(dir.path().to_owned());
        let started = gearmesh::Node::builder().config(config).build().expect("valid").start().await;
        let Err(err) = started else { panic!("started although the UDP port is taken") };
        let err = err.to_string();
        assert!(err.contains(&format!("QUIC on {addr}")) && err.to_lowercase().contains("in use"), "{err}");
        return;
    }
    panic!("no UDP port with a free TCP twin in 20 tries");
}

#[tokio::test]
async fn a_quic_seed_works_and_a_node_from_another_ca_is_kept_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = node(dir.path(), "a", &["echo"], vec![], vec![]).await;
    let quic = a.link_addrs().iter().find(|s| s.starts_with("quic://")).expect("quic addr").clone();
    let b = node(dir.path(), "b", &["kv"], vec![], vec![quic]).await;
    eventually("b sees echo over QUIC", 15, || sees(&b, &["echo"])).await;
    let got: Value = b.ctx(Principal::anonymous()).call("echo", "echo", &json!({"over": "quic"})).await.expect("call");
    assert_eq!(got, json!({"over": "quic"}));

    // A node whose certificates come from a different development CA cannot link: TLS fails both
    // ways, so it never learns of the mesh's gears.
    let other_dir = tempfile::tempdir().expect("tempdir");
    let stranger = node(other_dir.path(), "stranger", &[], vec![], vec![wss(&a)]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!sees(&stranger, &["echo"]), "a node with an untrusted certificate joined");
    assert_eq!(a.mesh().view().nodes.len(), 2, "the stranger is unknown to the mesh");
    let err = stranger.ctx(Principal::anonymous()).call::<_, Value>("echo", "echo", &json!(1)).await.expect_err("out");
    assert_eq!(err.code().as_str(), "not_found");
    for n in [stranger, b, a] {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn plaintext_nodes_mesh_over_ws_only_in_insecure_dev_mode() {
    let off = |c: &mut NodeConfig| c.tls.mode = gearmesh::TlsMode::Off;
    let dir = tempfile::tempdir().expect("tempdir");
    let a = node_with(dir.path(), "a", &["echo"], vec![], vec![], off).await;
    assert!(a.url().starts_with("http://") && wss(&a).starts_with("ws://"));
    let b = node_with(dir.path(), "b", &[], vec![], vec![wss(&a)], off).await;
    eventually("b sees echo", 15, || sees(&b, &["echo"])).await;
    let got: Value = b.ctx(Principal::anonymous()).call("echo", "echo", &json!("plain")).await.expect("call");
    assert_eq!(got, json!("plain"));
    for n in [b, a] {
        n.shutdown().await;
    }
    // Without insecure_dev, plaintext is refused at build time.
    let mut config = NodeConfig::default();
    config.tls.mode = gearmesh::TlsMode::Off;
    let e = Node::builder().config(config).build().expect_err("refused");
    assert!(e.to_string().contains("tls.mode"), "{e}");
}

#[tokio::test]
async fn a_node_that_leaves_is_routed_around_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = node(dir.path(), "a", &[], vec![], vec![]).await;
    let b = node(dir.path(), "b", &["echo"], vec![], vec![wss(&a)]).await;
    let c = node(dir.path(), "c", &["echo"], vec![], vec![wss(&a)]).await;
    eventually("a sees both echo replicas", 15, || {
        a.mesh().view().nodes.iter().filter(|n| n.gears.iter().any(|g| g.name == "echo")).count() == 2
    })
    .await;
    let ctx = a.ctx(Principal::anonymous());
    for i in 0..20 {
        let _: Value = ctx.call("echo", "echo", &json!(i)).await.expect("either replica");
    }
    let b_id = b.id().to_owned();
    b.shutdown().await;
    // The leave is announced before b stops, so a marks it left without waiting for a timeout.
    eventually("a marks b left", 5, || a.mesh().view().nodes.iter().any(|n| n.id == b_id && n.state == "left")).await;
    for i in 0..20 {
        let _: Value = ctx.call("echo", "echo", &json!(i)).await.expect("the other replica answers");
    }
    for n in [c, a] {
        n.shutdown().await;
    }
}

/// A key file for `[auth]` in `dir`.
fn key_file(dir: &Path, name: &str) -> std::path::PathBuf {
    let generated = gearmesh::auth::keygen(gearmesh::auth::Algorithm::EdDSA).expect("keygen");
    let path = dir.join(name);
    std::fs::write(&path, &generated.contents).expect("write key");
    path
}

#[tokio::test]
async fn with_auth_on_links_need_a_mesh_token_from_a_trusted_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mesh_key = key_file(dir.path(), "mesh.key");
    let other_key = key_file(dir.path(), "other.key");
    let secured = |key: std::path::PathBuf| {
        move |c: &mut NodeConfig| {
            c.insecure_dev = false;
            c.auth.keys = vec![key];
            // Gears of the shop may call each other, as a deployment would configure it.
            c.auth.gears = toml::from_str("echo = [\"call:*\"]").expect("gear policy");
        }
    };
    let a = node_with(dir.path(), "a", &["echo"], vec![], vec![], secured(mesh_key.clone())).await;
    let b = node_with(dir.path(), "b", &["kv"], vec![], vec![wss(&a)], secured(mesh_key)).await;
    eventually("b and a see each other's gears", 15, || sees(&b, &["echo"]) && sees(&a, &["kv"])).await;

    // The node that runs the port checks the caller's scopes, even if the entry node did not
    // (here b's router is bypassed, as a compromised or buggy entry node would).
    let meta = |scopes: Vec<String>| {
        gearmesh::gears::CallMeta::new(Principal::user("eve", scopes), Some(Instant::now() + Duration::from_secs(5)))
    };
    let call = |scopes: Vec<String>| gearmesh::gears::Call {
        gear: "echo",
        port: "echo",
        arg: gearmesh::gears::Arg::json(bytes::Bytes::from_static(b"1")),
        meta: meta(scopes),
    };
    let err = b.mesh().call(call(vec!["call:kv/*".into()])).await.expect_err("laundered call refused");
    assert_eq!(err.code().as_str(), "forbidden", "{err}");
    b.mesh().call(call(vec!["call:echo/echo".into()])).await.expect("a caller with the scope gets through");

    // Same CA (so TLS succeeds), but its tokens are signed by a key the mesh does not trust.
    let intruder = node_with(dir.path(), "intruder", &[], vec![], vec![wss(&a)], secured(other_key)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!sees(&intruder, &["echo"]), "a node without a valid link token joined");
    assert_eq!(a.mesh().view().nodes.len(), 2, "the intruder is unknown to the mesh");
    for n in [intruder, b, a] {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn a_node_that_does_not_listen_serves_its_gears_through_the_node_it_dialed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = node(dir.path(), "a", &[], vec![], vec![]).await;
    let b = node(dir.path(), "b", &[], vec![], vec![wss(&a)]).await;
    let hidden = node_with(dir.path(), "hidden", &["echo"], vec![], vec![wss(&a)], |c| c.mesh.no_listen = true).await;
    assert!(hidden.link_addrs().is_empty(), "advertises nothing");
    eventually("b sees the hidden node's echo", 15, || sees(&b, &["echo"])).await;
    let got: Value = b.ctx(Principal::anonymous()).call("echo", "echo", &json!("through a")).await.expect("call");
    assert_eq!(got, json!("through a"));
    let hidden_id = hidden.id().to_owned();
    let b_view = b.mesh().view();
    let rec = b_view.nodes.iter().find(|n| n.id == hidden_id).expect("known");
    assert!(rec.addrs.is_empty(), "the mesh has no address to dial it at");
    for n in [hidden, b, a] {
        n.shutdown().await;
    }
}

/// The link-token battery: nodes that hold only the mesh's public key and are given a token
/// (`--node-token`) join with a good one, and every defective one keeps them out.
#[tokio::test]
async fn every_defective_link_token_keeps_a_node_out() {
    use gearmesh::auth::{Audience, Claims, Issuer, SigningKey, keygen, unix_now};

    let dir = tempfile::tempdir().expect("tempdir");
    let mesh = keygen(gearmesh::auth::Algorithm::EdDSA).expect("keygen");
    let key_path = dir.path().join("mesh.key");
    std::fs::write(&key_path, &mesh.contents).expect("write key");
    let jwk = mesh.key.verify_key().public_jwk().expect("a public key");
    let jwks_path = dir.path().join("mesh.jwks");
    std::fs::write(&jwks_path, json!({ "keys": [jwk] }).to_string()).expect("write jwks");

    let now = unix_now();
    let claims = |f: &dyn Fn(&mut Claims)| {
        let mut c = Claims {
            sub: Some("joiner".into()),
            iat: Some(now),
            exp: Some(now + 600),
            aud: Some(Audience::One("gearmesh-mesh".into())),
            scope: Some("mesh:link".into()),
            ..Claims::default()
        };
        f(&mut c);
        c
    };
    let sign = |key: &SigningKey, c: &Claims| Issuer::new(key.clone()).sign_claims(c).expect("sign");
    let b64 = |v: Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let stranger = keygen(gearmesh::auth::Algorithm::EdDSA).expect("keygen").key;
    let good = sign(&mesh.key, &claims(&|_| {}));
    let defects: Vec<(&str, String)> = vec![
        ("expired", sign(&mesh.key, &claims(&|c| c.exp = Some(now - 3600)))),
        ("not yet valid", sign(&mesh.key, &claims(&|c| c.nbf = Some(now + 3600)))),
        ("wrong audience", sign(&mesh.key, &claims(&|c| c.aud = Some(Audience::One("another-mesh".into()))))),
        ("no mesh:link scope", sign(&mesh.key, &claims(&|c| c.scope = Some("observe call:*".into())))),
        ("another node's", sign(&mesh.key, &claims(&|c| c.sub = Some(format!("node:{}", "ab".repeat(16)))))),
        ("an untrusted key", sign(&stranger, &claims(&|_| {}))),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(json!({"alg": "none", "typ": "JWT"})),
                b64(serde_json::to_value(claims(&|_| {})).expect("claims"))
            ),
        ),
    ];
    // (A malformed or oversized token is refused when the node loads --node-token: it does not
    // start at all.)

    let a = node_with(dir.path(), "a", &["echo"], vec![], vec![], |c| {
        c.insecure_dev = false;
        c.auth.keys = vec![key_path.clone()];
    })
    .await;
    let joiner = |name: String, token: String| {
        let token_path = dir.path().join(format!("{name}.jwt"));
        std::fs::write(&token_path, token).expect("write token");
        let (jwks, seed) = (jwks_path.clone(), wss(&a));
        let base = dir.path().to_owned();
        async move {
            node_with(&base, &name, &[], vec![], vec![seed], move |c| {
                c.insecure_dev = false;
                c.auth.jwks = vec![jwks.display().to_string()];
                c.auth.node_token = Some(token_path);
            })
            .await
        }
    };
    let mut bad = Vec::new();
    for (i, (what, token)) in defects.iter().enumerate() {
        bad.push((*what, joiner(format!("bad-{i}"), token.clone()).await));
    }
    let ok = joiner("good".into(), good).await;
    eventually("the node with a good token joins", 15, || sees(&ok, &["echo"])).await;
    // The bad ones had as long, and a while more, to get in.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let known: Vec<String> = a.mesh().view().nodes.iter().map(|n| n.name.clone()).collect();
    for (what, n) in &bad {
        assert!(!sees(n, &["echo"]), "a node with a link token that is {what} reached a gear");
        assert!(!known.contains(&n.name().to_owned()), "a node with a link token that is {what} joined: {known:?}");
    }
    assert_eq!(known.len(), 2, "only a and the good joiner: {known:?}");
    ok.shutdown().await;
    for (_, n) in bad {
        n.shutdown().await;
    }
    a.shutdown().await;
}

/// Load shedding routed around: a call to a local port at its concurrency limit goes to another
/// node's replica instead of failing `overloaded`; with no other replica it fails at once.
#[tokio::test]
async fn a_busy_local_port_sends_the_call_to_another_replica() {
    use gearmesh::gears::PortSpec;
    let dir = tempfile::tempdir().expect("tempdir");
    let work = |name: &'static str, limit: usize| {
        Gear::new("work").port_with(
            PortSpec::new("hold").max_concurrency(std::num::NonZeroUsize::new(limit).expect("non-zero")),
            move |_ctx: Ctx, ms: u64| async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(name.to_owned())
            },
        )
    };
    let a = node(dir.path(), "a", &[], vec![work("a", 1)], vec![]).await;
    let ctx = a.ctx(Principal::anonymous());
    // Alone: the second concurrent call is refused at once.
    let (first, second) =
        tokio::join!(ctx.call::<_, String>("work", "hold", &300u64), ctx.call::<_, String>("work", "hold", &300u64));
    assert_eq!(first.expect("the first runs"), "a");
    assert_eq!(second.expect_err("no other replica").code().as_str(), "overloaded");

    let b = node(dir.path(), "b", &[], vec![work("b", 8)], vec![wss(&a)]).await;
    eventually("a sees b's replica", 15, || a.mesh().gear_is_remote("work")).await;
    let (first, second) =
        tokio::join!(ctx.call::<_, String>("work", "hold", &300u64), ctx.call::<_, String>("work", "hold", &300u64));
    let mut served = vec![first.expect("first"), second.expect("second: routed to b")];
    served.sort();
    assert_eq!(served, ["a", "b"], "one ran here, the busy one's call ran on b");
    b.shutdown().await;
    a.shutdown().await;
}

/// A caller that gives up (its call future dropped at its own timeout) stops the work on the
/// remote node: the port's future there is dropped, not left running to its end. A port that
/// answers at once and one that waits both reach the caller.
#[tokio::test]
async fn a_caller_that_gives_up_stops_the_remote_work() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    struct Dropped(Arc<AtomicUsize>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (started, dropped) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let slow = {
        let (started, dropped) = (started.clone(), dropped.clone());
        Gear::new("slow")
            .port("wait", move |_ctx: Ctx, ms: u64| {
                let (started, dropped) = (started.clone(), dropped.clone());
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    let _flag = Dropped(dropped);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok(ms)
                }
            })
            .port("now", |_ctx: Ctx, x: u64| async move { Ok(x + 1) })
    };
    let b = node(dir.path(), "b", &[], vec![slow], vec![]).await;
    let a = node(dir.path(), "a", &[], vec![], vec![wss(&b)]).await;
    eventually("a sees b's gear", 15, || a.mesh().gear_is_remote("slow")).await;
    let ctx = a.ctx(Principal::anonymous());
    assert_eq!(ctx.call::<_, u64>("slow", "now", &41u64).await.expect("answers at once"), 42);
    assert_eq!(ctx.call::<_, u64>("slow", "wait", &50u64).await.expect("answers after a wait"), 50);
    assert_eq!(dropped.load(Ordering::SeqCst), 1, "the finished call's future is gone");

    let gave_up =
        tokio::time::timeout(Duration::from_millis(300), ctx.call::<_, u64>("slow", "wait", &60_000u64)).await;
    assert!(gave_up.is_err(), "the caller gave up");
    eventually("the remote work is stopped", 10, || dropped.load(Ordering::SeqCst) == 2).await;
    assert_eq!(started.load(Ordering::SeqCst), 2);
    a.shutdown().await;
    b.shutdown().await;
}

/// A call whose link breaks fails `unavailable` as soon as the link's heartbeats notice, although
/// the callee's node stays reachable through a third node: the broken link may have lost the
/// call or its reply, so the caller does not wait for its deadline (a broken connection fails
/// its requests). A call made right after reaches b through c and is answered that way, even
/// before b has noticed that the link is dead. The link from a to b runs through a proxy that
/// starts dropping everything.
#[tokio::test]
async fn a_call_whose_link_breaks_fails_at_once_instead_of_waiting_for_its_deadline() {
    call_over_a_link_that_breaks("wss").await;
}

/// The same with the link from a to b over QUIC, through a UDP proxy that starts dropping
/// every datagram.
#[tokio::test]
async fn a_call_whose_quic_link_breaks_fails_at_once_instead_of_waiting_for_its_deadline() {
    call_over_a_link_that_breaks("quic").await;
}

async fn call_over_a_link_that_breaks(scheme: &str) {
    use gearmesh::gears::ErrorCode;
    let dir = tempfile::tempdir().expect("tempdir");
    let (hang, started) = hang_gear();
    let c = node(dir.path(), "c", &[], vec![], vec![]).await;
    // The call on b never ends: its shutdown need not wait long for it.
    let b = node_with(dir.path(), "b", &[], vec![hang], vec![wss(&c)], |c| c.calls.drain_timeout_ms = 200).await;
    let (proxy, through_proxy) = proxied(&b, scheme).await;
    let a = node(dir.path(), "a", &[], vec![], vec![through_proxy]).await;
    eventually("a links to b (through the proxy) and to c", 15, || {
        sees(&a, &["hang"]) && own_link(&a, &b).is_some() && own_link(&a, &c).is_some() && own_link(&b, &c).is_some()
    })
    .await;
    let to_b = own_link(&a, &b).and_then(|l| l.transport);
    assert_eq!(to_b.as_deref(), Some(scheme), "a's link to b is the proxied one");
    let ctx = a.ctx(Principal::anonymous());
    let e = hanging_call_when_the_proxy_breaks(&ctx, &started, &proxy).await;
    assert_eq!(e.code(), ErrorCode::Unavailable, "{e}");
    // b was reachable all along, through c. This call is made at once, while b may not have
    // noticed yet that its end of the link is dead: b answers the way the call came, not on it.
    // A lost reply shows as a timeout.
    assert_eq!(hang_now(&ctx).await.expect("b answers through c"), 2);
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

/// A call that a third node switches, over a link of that node's that then breaks, fails
/// `unavailable` at once too: the caller cannot see that link, the switch can. Nodes a and c
/// reach each other only through s (a keeps one link; c cannot be dialed and links to s,
/// through a proxy, and to t). The proxy starts dropping everything while a's call runs on c:
/// s gives up on its link to c and answers the call's caller, although c stays reachable
/// through t. Before switches kept track of the calls they pass on, the call waited for its
/// deadline.
#[tokio::test]
async fn a_call_switched_over_a_link_that_breaks_fails_at_once() {
    switched_call_over_a_link_that_breaks("wss").await;
}

/// The same with the link from c to s over QUIC, through a UDP proxy.
#[tokio::test]
async fn a_call_switched_over_a_quic_link_that_breaks_fails_at_once() {
    switched_call_over_a_link_that_breaks("quic").await;
}

async fn switched_call_over_a_link_that_breaks(scheme: &str) {
    use gearmesh::gears::ErrorCode;
    let dir = tempfile::tempdir().expect("tempdir");
    let (hang, started) = hang_gear();
    let s = node(dir.path(), "s", &[], vec![], vec![]).await;
    let t = node(dir.path(), "t", &[], vec![], vec![wss(&s)]).await;
    let (proxy, through_proxy) = proxied(&s, scheme).await;
    let c = node_with(dir.path(), "c", &[], vec![hang], vec![through_proxy, wss(&t)], |c| {
        (c.mesh.min_links, c.mesh.max_links, c.mesh.no_listen) = (2, 2, true);
        // The call on c never ends: its shutdown need not wait long for it.
        c.calls.drain_timeout_ms = 200;
    })
    .await;
    let a = node_with(dir.path(), "a", &[], vec![], vec![wss(&s)], one_link_undialable).await;
    let linked = |n: &RunningNode, peer: &RunningNode| own_link(n, peer).is_some();
    eventually("a links to s only; c to s (through the proxy) and to t", 15, || {
        sees(&a, &["hang"]) && linked(&a, &s) && linked(&c, &s) && linked(&c, &t) && !linked(&a, &c) && !linked(&a, &t)
    })
    .await;
    let switched_before = s.mesh().stats().frames_forwarded;
    let ctx = a.ctx(Principal::anonymous());
    let e = hanging_call_when_the_proxy_breaks(&ctx, &started, &proxy).await;
    assert!(s.mesh().stats().frames_forwarded > switched_before, "s switched the call");
    assert_eq!(e.code(), ErrorCode::Unavailable, "{e}");
    assert!(e.to_string().contains("broke"), "the switch says why: {e}");
    assert_eq!(s.mesh().stats().switched_calls_failed, 1, "s failed the call it switched");
    // c was reachable all along, through t: a call made now is answered.
    assert_eq!(hang_now(&ctx).await.expect("c answers through t"), 2);
    for n in [a, c, t, s] {
        n.shutdown().await;
    }
}

/// Failures the mesh answers on the way to a replica (no route, a switch's hop limit, a
/// switch's broken link) say nothing of the replica's health, so they do not open its circuit
/// breaker: a breaker opened by them kept a gear that had just become reachable failing for
/// seconds more. a reaches c's gear only through s, which switches nothing (`max_hops = 0`), so
/// s answers every call `unavailable`. Far past the breaker's threshold (20 calls in its
/// window, half of them failing), every call is still tried and answered by s.
#[tokio::test]
async fn failures_on_the_way_do_not_open_the_replicas_circuit_breaker() {
    use gearmesh::gears::ErrorCode;
    let dir = tempfile::tempdir().expect("tempdir");
    let s = node_with(dir.path(), "s", &[], vec![], vec![], |c| c.mesh.max_hops = 0).await;
    let c = node(dir.path(), "c", &["echo"], vec![], vec![wss(&s)]).await;
    let a = node_with(dir.path(), "a", &[], vec![], vec![wss(&s)], one_link_undialable).await;
    eventually("a sees echo", 15, || sees(&a, &["echo"])).await;
    let ctx = a.ctx(Principal::anonymous());
    for i in 0..60 {
        let e = ctx.call::<_, Value>("echo", "echo", &json!(i)).await.expect_err("s switches nothing");
        assert_eq!(e.code(), ErrorCode::Unavailable, "{e}");
        assert!(e.to_string().contains("hop limit"), "call {i} was answered by s, not refused by a breaker: {e}");
        assert!(e.not_run(), "s refused the call before any port saw it: {e}");
    }
    assert_eq!(a.mesh().resilience_stats().breaker_rejections, 0, "no attempt was skipped on an open breaker");
    for n in [a, c, s] {
        n.shutdown().await;
    }
}

/// A call the mesh refused on the way surely did not run (`CallError::not_run`), so the caller
/// sends it again, to another replica, even to a port that is not idempotent (gRPC's transparent
/// retry). `count/hit` (not idempotent) runs on s and on c; a reaches c only through s, which
/// switches nothing (`max_hops = 0`). Every call a makes succeeds on s, whichever replica it
/// chose first; none runs on c. Without the mark, a call that chose c failed `unavailable`.
#[tokio::test]
async fn a_call_refused_on_the_way_is_sent_again_whatever_the_port() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().expect("tempdir");
    let (on_s, ran_on_s) = count_gear();
    let s = node_with(dir.path(), "s", &[], vec![on_s], vec![], |c| c.mesh.max_hops = 0).await;
    let (on_c, ran_on_c) = count_gear();
    let c = node(dir.path(), "c", &[], vec![on_c], vec![wss(&s)]).await;
    let a = node_with(dir.path(), "a", &[], vec![], vec![wss(&s)], one_link_undialable).await;
    let routed_replicas = || {
        let view = a.mesh().view();
        view.nodes.iter().filter(|n| n.route.is_some() && n.gears.iter().any(|g| g.name == "count")).count()
    };
    eventually("a routes to both replicas of count", 15, || routed_replicas() == 2).await;
    let ctx = a.ctx(Principal::anonymous());
    const CALLS: usize = 20;
    for i in 0..CALLS {
        let r = ctx.call::<_, usize>("count", "hit", &json!(i)).await;
        assert!(r.is_ok(), "call {i} was sent again to s: {r:?}");
        // Paced within the retry budget (10 retries a second).
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ran_on_s.load(Ordering::SeqCst), CALLS, "every call ran once, on s");
    assert_eq!(ran_on_c.load(Ordering::SeqCst), 0, "s switched nothing to c");
    let stats = a.mesh().resilience_stats();
    assert!(stats.retries >= 1, "some calls chose c first and were refused on the way: {stats:?}");
    assert_eq!(stats.retries_refused, 0);
    for n in [a, c, s] {
        n.shutdown().await;
    }
}

/// A proxy (TCP, or UDP for QUIC) in front of `node`'s `scheme` address, and the seed that
/// dials `node` through it.
async fn proxied(node: &RunningNode, scheme: &str) -> (proxy::Proxy, String) {
    let addr = node.link_addrs().iter().find(|u| u.starts_with(&format!("{scheme}://"))).expect("address").clone();
    let port: u16 = addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
    let upstream = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let proxy = if scheme == "quic" { proxy::udp(upstream).await } else { proxy::tcp(upstream).await };
    let seed = format!("{scheme}://127.0.0.1:{}", proxy.addr.port());
    (proxy, seed)
}

/// `n`'s own link to `peer`, once it has an RTT.
fn own_link(n: &RunningNode, peer: &RunningNode) -> Option<gearmesh_mesh::LinkView> {
    let (view, peer) = (n.mesh().view(), peer.mesh().id().to_string());
    let me = view.nodes.into_iter().find(|x| x.id == view.me)?;
    me.links.into_iter().find(|l| l.peer == peer && l.rtt_us.is_some())
}

/// Calls `hang/forever` (see [`hang_gear`]) from `ctx` with a 120 s deadline, and once it runs
/// makes `proxy` drop everything: the call's error, which must come long before the deadline.
async fn hanging_call_when_the_proxy_breaks(
    ctx: &Ctx,
    started: &std::sync::atomic::AtomicUsize,
    proxy: &proxy::Proxy,
) -> gearmesh::gears::CallError {
    use gearmesh::gears::CallOptions;
    let long = CallOptions::default().timeout(Duration::from_secs(120));
    let call = {
        let ctx = ctx.clone();
        tokio::spawn(async move { ctx.call_with::<_, u64>("hang", "forever", &Value::Null, long).await })
    };
    eventually("the call runs", 10, || started.load(std::sync::atomic::Ordering::SeqCst) == 1).await;
    proxy.blackhole();
    let failed = tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .expect("the call fails when a link on its way breaks, long before its deadline")
        .expect("task");
    failed.expect_err("no reply can come")
}

/// `hang/now` from `ctx`, made at once; a moment with no route (links still settling on a busy
/// machine) fails `unavailable` at once and is tried again.
async fn hang_now(ctx: &Ctx) -> Result<u64, gearmesh::gears::CallError> {
    use gearmesh::gears::{CallOptions, ErrorCode};
    let soon = CallOptions::default().timeout(Duration::from_secs(20));
    let mut tries = 0;
    loop {
        match ctx.call_with::<_, u64>("hang", "now", &1u64, soon.clone()).await {
            Err(e) if e.code() == ErrorCode::Unavailable && tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// The gear `hang`: its port `forever` never returns (and counts the calls that started it),
/// its port `now` returns its argument plus one.
fn hang_gear() -> (Gear, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::{Arc, atomic::AtomicUsize, atomic::Ordering};
    let started = Arc::new(AtomicUsize::new(0));
    let counted = started.clone();
    let gear = Gear::new("hang")
        .port("forever", move |_ctx: Ctx, _: Value| {
            let started = counted.clone();
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
                Ok(0u64)
            }
        })
        .port("now", |_ctx: Ctx, x: u64| async move { Ok(x + 1) });
    (gear, started)
}

/// A link to `node` from a test posing as a node of its own (a fresh id), over `url` (WSS or
/// QUIC): the test speaks the link protocol by hand.
async fn raw_link(
    node: &RunningNode,
    url: &str,
) -> (gearmesh_transport::NodeId, gearmesh_transport::LinkSender, gearmesh_transport::LinkReceiver) {
    raw_link_in(node, url, gearmesh::DEFAULT_MESH_NAME).await.expect("a raw link")
}

/// [`raw_link`], posing as a node of mesh `mesh`.
async fn raw_link_in(
    node: &RunningNode,
    url: &str,
    mesh: &str,
) -> Result<
    (gearmesh_transport::NodeId, gearmesh_transport::LinkSender, gearmesh_transport::LinkReceiver),
    gearmesh_transport::DialError,
> {
    use gearmesh_transport::{
        Dialer, Hello, LinkSetup, NodeId,
        tls::{ClientTls, ClientTrust, load_certs},
    };
    let me = NodeId::random();
    let hello = Hello { node_id: me, incarnation: 1, mesh: mesh.into(), ..Hello::default() };
    let trust = ClientTrust::Ca(load_certs(node.dev_ca_cert().expect("dev CA")).expect("CA"));
    let quic = gearmesh_transport::quic::QuicEndpoint::bind(
        "127.0.0.1:0".parse().expect("addr"),
        None,
        Some(&ClientTls::new(&trust).expect("tls")),
    )
    .expect("quic endpoint");
    let dialer = Dialer::new(LinkSetup::new(hello), ClientTls::new(&trust).expect("tls")).with_quic(quic);
    let (tx, rx) = dialer.dial(url).await?.split();
    Ok((me, tx, rx))
}

/// Nodes of two meshes that trust one CA never link: the hello names the sender's mesh
/// (`[mesh] name`), and a node refuses a peer of another, as a NATS server refuses a route from
/// another cluster, over WSS and QUIC alike.
#[tokio::test]
async fn a_node_refuses_links_from_another_mesh() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = node_with(dir.path(), "a", &["echo"], vec![], vec![], |c| c.mesh.name = "blue".into()).await;
    let quic = a.link_addrs().iter().find(|u| u.starts_with("quic://")).expect("quic address").clone();
    for url in [wss(&a), quic] {
        let Err(e) = raw_link_in(&a, &url, "green").await else { panic!("{url}: a node of mesh green linked") };
        let e = e.to_string();
        assert!(e.contains("\"blue\"") && e.contains("\"green\""), "{url}: the refusal names both meshes: {e}");
        raw_link_in(&a, &url, "blue").await.expect("a node of its own mesh links");
    }
    a.shutdown().await;
}

/// A node that keeps the one link it dials and cannot be dialed itself (a small mesh would
/// otherwise link everyone to it): the rest of the mesh reaches it through that link.
fn one_link_undialable(c: &mut NodeConfig) {
    (c.mesh.min_links, c.mesh.max_links, c.mesh.no_listen) = (1, 1, true);
}

/// The gear `count`, whose port `hit` counts the calls that ran (and returns the count so far).
fn count_gear() -> (Gear, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::{Arc, atomic::AtomicUsize, atomic::Ordering};
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let gear = Gear::new("count").port("hit", move |_ctx: Ctx, _: Value| {
        let counted = counted.clone();
        async move { Ok(counted.fetch_add(1, Ordering::SeqCst) + 1) }
    });
    (gear, runs)
}

/// A call to `count.hit` (JSON `null`, 60 s deadline) along `route`.
fn count_call(route: gearmesh_transport::Route, call_id: u64) -> gearmesh_transport::Frame {
    use gearmesh_transport::{BodyKind, Call, Frame};
    Frame::Call(Call {
        route,
        call_id,
        deadline_ms: 60_000,
        caller: "anonymous".into(),
        gear: "count".into(),
        port: "hit".into(),
        body_kind: BodyKind::Json,
        body: bytes::Bytes::from_static(b"null"),
        ..Call::default()
    })
}

/// The next reply on a raw link, skipping other frames; `None` after 10 s.
async fn next_reply(rx: &mut gearmesh_transport::LinkReceiver) -> Option<gearmesh_transport::Reply> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let gearmesh_transport::Frame::Reply(r) = rx.recv().await.expect("link open").expect("a frame") {
                return r;
            }
        }
    })
    .await
    .ok()
}

/// A cancel that overtakes its call (over QUIC they travel on different streams) is remembered,
/// and the call is not run when it arrives; other calls run as usual. Driven from a raw link.
#[tokio::test]
async fn a_cancel_that_overtakes_its_call_keeps_the_call_from_running() {
    use std::sync::atomic::Ordering;

    use gearmesh_transport::{Cancel, Frame, ReplyResult, Route};

    let dir = tempfile::tempdir().expect("tempdir");
    let (count, runs) = count_gear();
    let a = node(dir.path(), "a", &[], vec![count], vec![]).await;
    let url = a.link_addrs().iter().find(|u| u.starts_with("quic://")).expect("quic").clone();
    let (me, tx, mut rx) = raw_link(&a, &url).await;
    let route = Route { src: me, dst: a.mesh().id(), hops: 0 };
    let call = |id: u64| count_call(route, id);
    tx.send(&Frame::Cancel(Cancel { route, call_id: 7 })).await.expect("cancel first");
    tx.send(&call(7)).await.expect("then its call");
    tx.send(&call(8)).await.expect("another call");
    // The reply to call 8 comes back; call 7 never ran and gets no reply.
    let reply = next_reply(&mut rx).await.expect("a reply in time");
    assert_eq!(reply.call_id, 8, "only call 8 is answered");
    assert!(matches!(reply.result, ReplyResult::Ok { .. }), "{reply:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "call 7 was cancelled before it arrived and never ran");
    a.shutdown().await;
}

#[tokio::test]
async fn a_node_restarts_on_the_same_port_in_the_same_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = node(dir.path(), "a", &["echo"], vec![], vec![]).await;
    let port = a.local_addr().port();
    a.shutdown().await;
    let t = Instant::now();
    while std::net::UdpSocket::bind(("127.0.0.1", port)).is_err() && t.elapsed() < Duration::from_secs(8) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("UDP port free after {:?}", t.elapsed());
    let again = node_with(dir.path(), "a2", &["echo"], vec![], vec![], |c| {
        c.listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    })
    .await;
    assert_eq!(again.local_addr().port(), port);
    assert!(again.link_addrs().iter().any(|u| u.starts_with("quic://")), "QUIC is back on the same port");
    again.shutdown().await;
}

/// Replies of calls that ran here wait for room when the link back to the caller is full (here:
/// a send queue of 2 frames against 200 calls finishing at once) instead of being dropped and
/// leaving their callers to time out.
#[tokio::test]
async fn replies_wait_for_room_on_a_full_link_instead_of_being_dropped() {
    use gearmesh::gears::CallOptions;
    let dir = tempfile::tempdir().expect("tempdir");
    let echo = Gear::new("echo").port("n", |_ctx: Ctx, n: u64| async move { Ok(n) });
    // The caller's queue is roomy, so the calls arrive together and finish together on b.
    let b = node_with(dir.path(), "b", &[], vec![echo], vec![], |c| {
        c.mesh.quic = false;
        c.mesh.send_queue = 2;
    })
    .await;
    let a = node_with(dir.path(), "a", &[], vec![], vec![wss(&b)], |c| c.mesh.quic = false).await;
    eventually("a sees b's echo gear", 15, || a.mesh().gear_is_remote("echo")).await;
    let ctx = a.ctx(Principal::anonymous());
    let calls = (0..200u64).map(|i| {
        let ctx = ctx.clone();
        async move {
            (i, ctx.call_with::<_, u64>("echo", "n", &i, CallOptions::default().timeout(Duration::from_secs(5))).await)
        }
    });
    for (i, result) in futures::future::join_all(calls).await {
        assert_eq!(result.expect("every call gets its reply"), i);
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// A call a switch cannot pass on (it has no route to the destination) is answered at once with
/// `unavailable` instead of being dropped, which left the caller waiting for its deadline.
/// Driven from a raw WSS link posing as a node, to a destination no node knows.
#[tokio::test]
async fn a_call_a_switch_cannot_route_is_answered_unavailable_at_once() {
    use gearmesh_transport::{NodeId, ReplyResult, Route};

    let dir = tempfile::tempdir().expect("tempdir");
    let a = node(dir.path(), "a", &[], vec![], vec![]).await;
    let (me, tx, mut rx) = raw_link(&a, &wss(&a)).await;
    let nowhere = NodeId::random();
    tx.send(&count_call(Route { src: me, dst: nowhere, hops: 0 }, 1)).await.expect("sent");
    let reply = next_reply(&mut rx).await.expect("answered well before the call's 60 s deadline");
    assert_eq!(reply.call_id, 1);
    let ReplyResult::Err(body) = reply.result else { panic!("an error reply: {reply:?}") };
    let err: Value = serde_json::from_slice(&body).expect("an error document");
    assert_eq!(err["code"], "unavailable", "{err}");
    assert!(a.mesh().stats().frames_dropped >= 1, "the unroutable frame is counted");
    a.shutdown().await;
}

/// A switch passes a call for another node on as it came (undecoded), and the reply back; a
/// call whose header is fine but whose body is not (a gear name that is not UTF-8) is refused
/// on the link it came in on, which closes with a protocol error, and never reaches the next
/// link: the callee's link to the switch stays up and keeps carrying calls.
#[tokio::test]
async fn a_switch_passes_calls_on_undecoded_and_refuses_a_malformed_one_on_its_own_link() {
    use std::sync::atomic::Ordering;

    use gearmesh_transport::{CloseCode, LinkError, ReplyResult, Route};

    let dir = tempfile::tempdir().expect("tempdir");
    let (count, runs) = count_gear();
    let switch = node(dir.path(), "switch", &[], vec![], vec![]).await;
    let callee = node(dir.path(), "callee", &[], vec![count], vec![wss(&switch)]).await;
    eventually("the switch sees the count gear", 20, || sees(&switch, &["count"])).await;
    let (me, tx, mut rx) = raw_link(&switch, &wss(&switch)).await;
    let route = Route { src: me, dst: callee.mesh().id(), hops: 0 };

    tx.send(&count_call(route, 1)).await.expect("sent");
    let reply = next_reply(&mut rx).await.expect("a reply through the switch");
    assert_eq!(reply.call_id, 1);
    assert!(matches!(reply.result, ReplyResult::Ok { .. }), "{reply:?}");
    let forwarded = switch.mesh().stats().frames_forwarded;
    assert!(forwarded >= 2, "the call and its reply were switched: {forwarded}");

    let mut bad = bytes::BytesMut::new();
    count_call(route, 2).encode(&mut bad, gearmesh_transport::frame::DEFAULT_MAX_FRAME_LEN).expect("encodes");
    let at = bad.windows(5).rposition(|w| w == b"count").expect("the gear name");
    bad[at] = 0xff;
    tx.send_raw(bad.freeze()).await.expect("the header passes the sender's check");
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match rx.recv().await {
                Some(Ok(_)) => continue,
                Some(Err(LinkError::Closed(reason))) => return Some(reason),
                other => {
                    tracing::debug!(?other, "link ended");
                    return None;
                }
            }
        }
    })
    .await
    .expect("the switch closes the link in time")
    .expect("with a reason");
    assert_eq!(closed.code, CloseCode::PROTOCOL_ERROR, "{closed}");

    // The callee never saw the bad frame, and its link to the switch still carries calls.
    let ctx = switch.ctx(Principal::anonymous());
    let n: usize = ctx.call("count", "hit", &Value::Null).await.expect("the callee still reachable");
    assert_eq!((n, runs.load(Ordering::SeqCst)), (2, 2), "only the good calls ran");
    assert_eq!(callee.mesh().stats().links, 1, "the callee kept its link");
    callee.shutdown().await;
    switch.shutdown().await;
}

/// A switch that passes on a call from a node it has no route to (gossip has not brought one
/// yet) sends the reply back the way the call came, instead of dropping it and leaving the
/// caller to its deadline. The caller here is a raw link that never gossips, so only its own
/// link knows it: the second switch and the callee never get a route to it.
#[tokio::test]
async fn a_reply_goes_back_the_way_its_call_came_when_no_route_leads_to_the_caller() {
    use gearmesh_transport::{ReplyResult, Route};

    let dir = tempfile::tempdir().expect("tempdir");
    let (count, runs) = count_gear();
    // The callee links to s2 alone, and cannot be dialed (a small mesh links everyone).
    let s1 = node(dir.path(), "s1", &[], vec![], vec![]).await;
    let s2 = node(dir.path(), "s2", &[], vec![], vec![wss(&s1)]).await;
    let callee = node_with(dir.path(), "callee", &[], vec![count], vec![wss(&s2)], one_link_undialable).await;
    let callee_id = callee.mesh().id().to_string();
    eventually("s1 reaches the callee through s2", 20, || {
        s1.mesh().view().nodes.iter().any(|n| n.id == callee_id && n.route.as_ref().is_some_and(|r| r.hops == 2))
    })
    .await;
    let (me, tx, mut rx) = raw_link(&s1, &wss(&s1)).await;
    let knows_me = |n: &RunningNode| n.mesh().view().nodes.iter().any(|v| v.id == me.to_string() && v.route.is_some());
    for call_id in 1..=3 {
        let route = Route { src: me, dst: callee.mesh().id(), hops: 0 };
        tx.send(&count_call(route, call_id)).await.expect("sent");
        let reply = next_reply(&mut rx).await.expect("the reply came back through both switches");
        assert_eq!(reply.call_id, call_id);
        assert!(matches!(reply.result, ReplyResult::Ok { .. }), "{reply:?}");
    }
    assert!(!knows_me(&s2) && !knows_me(&callee), "no route to the caller but the way its calls came");
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(s2.mesh().stats().frames_dropped, 0, "s2 dropped no reply");
    for n in [callee, s2, s1] {
        n.shutdown().await;
    }
}

/// A switch whose link towards the caller is congested holds the replies for it until there is
/// room, instead of dropping them (which left their callers waiting for their deadlines). The
/// switch here queues one frame per link; a burst of calls through it overflows that at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_holds_replies_for_a_congested_link_instead_of_losing_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (count, runs) = count_gear();
    let switch = node_with(dir.path(), "switch", &[], vec![], vec![], |c: &mut NodeConfig| c.mesh.send_queue = 1).await;
    // The callee links to the switch alone and cannot be dialed; the caller keeps one link.
    let callee = node_with(dir.path(), "callee", &[], vec![count], vec![wss(&switch)], one_link_undialable).await;
    let caller = node_with(dir.path(), "caller", &[], vec![], vec![wss(&switch)], |c: &mut NodeConfig| {
        (c.mesh.min_links, c.mesh.max_links) = (1, 1);
    })
    .await;
    eventually("the caller sees the count gear", 20, || sees(&caller, &["count"])).await;
    let ctx = caller.ctx(Principal::anonymous());
    let options =
        gearmesh::gears::CallOptions::default().timeout(Duration::from_secs(10)).retry(gearmesh::gears::Retry::No);
    let calls = (0..300).map(|_| ctx.call_with::<_, usize>("count", "hit", &Value::Null, options.clone()));
    let results = futures::future::join_all(calls).await;
    let answered = results.iter().filter(|r| r.is_ok()).count();
    for r in &results {
        // A call the switch cannot queue towards the callee is refused at once (`overloaded`).
        if let Err(e) = r {
            assert_eq!(e.code().as_str(), "overloaded", "{e}");
        }
    }
    let ran = runs.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(answered, ran, "every call that ran was answered");
    assert!(answered > 0);
    // The burst did overflow the switch's queues (it refused calls), and every answer reached
    // the caller (none timed out, above).
    assert!(switch.mesh().stats().calls_refused > 0, "the switch was congested");
    for n in [caller, callee, switch] {
        n.shutdown().await;
    }
}

/// A call that crosses the mesh stays in its caller's trace: the port on the other node sees
/// the trace id the calling port had.
#[tokio::test]
async fn a_remote_call_continues_its_callers_trace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tracer = Gear::new("tracer").port("id", |ctx: Ctx, _: Value| async move { Ok(ctx.trace_id().to_string()) });
    let front = Gear::new("front").port("both", |ctx: Ctx, _: Value| async move {
        let remote: String = ctx.call("tracer", "id", &Value::Null).await?;
        Ok(json!([ctx.trace_id().to_string(), remote]))
    });
    let b = node(dir.path(), "b", &[], vec![tracer], vec![]).await;
    let a = node(dir.path(), "a", &[], vec![front], vec![wss(&b)]).await;
    eventually("a sees the tracer", 20, || sees(&a, &["tracer"])).await;
    let both: Value = a.ctx(Principal::anonymous()).call("front", "both", &Value::Null).await.expect("called");
    assert_eq!(both[0], both[1], "the same trace on both nodes: {both}");
    assert!(both[0].as_str().is_some_and(|t| !t.is_empty()), "{both}");
    a.shutdown().await;
    b.shutdown().await;
}

/// A call too big for a link's frame limit (16 MiB) fails at once with `bad_request`, the same
/// wherever it would go, instead of as a link failure; the link and the next call are fine.
#[tokio::test]
async fn a_call_too_big_for_a_frame_is_a_bad_request_and_harms_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Gear::new("sink")
        .port("take", |_ctx: Ctx, body: bytes::Bytes| async move { Ok::<_, gearmesh::gears::CallError>(body.len()) });
    let b = node(dir.path(), "b", &[], vec![sink], vec![]).await;
    let a = node(dir.path(), "a", &[], vec![], vec![wss(&b)]).await;
    eventually("a sees the sink", 20, || sees(&a, &["sink"])).await;
    let ctx = a.ctx(Principal::anonymous());
    let huge = bytes::Bytes::from(vec![7u8; 17 * 1024 * 1024]);
    let err = ctx.call::<_, usize>("sink", "take", &huge).await.expect_err("too big for a frame");
    assert_eq!(err.code().as_str(), "bad_request", "{err}");
    let n: usize = ctx.call("sink", "take", &bytes::Bytes::from_static(b"small")).await.expect("the next call");
    assert_eq!(n, 5);
    assert_eq!(a.mesh().stats().links, 1, "the link stayed up");
    a.shutdown().await;
    b.shutdown().await;
}

/// A node that sends many calls through switches to one node opens a direct shortcut link to
/// it, and its calls stop crossing the switches. Four nodes in a chain a - b - d - c, each
/// allowed few links, so a reaches c's gear through two switches at first.
#[tokio::test]
async fn a_node_that_calls_another_often_through_switches_opens_a_shortcut_to_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let links = |min: usize, max: usize| {
        move |c: &mut NodeConfig| {
            c.mesh.min_links = min;
            c.mesh.max_links = max;
        }
    };
    let b = node_with(dir.path(), "b", &[], vec![], vec![], links(1, 2)).await;
    let d = node_with(dir.path(), "d", &[], vec![], vec![wss(&b)], links(1, 2)).await;
    let a = node_with(dir.path(), "a", &[], vec![], vec![wss(&b)], |c: &mut NodeConfig| {
        c.mesh.min_links = 1;
        c.mesh.max_links = 1;
        c.mesh.shortcut_calls = 20;
        c.mesh.shortcut_window_ms = 60_000;
    })
    .await;
    let c = node_with(dir.path(), "c", &[], vec![whoami(9)], vec![wss(&d)], links(1, 2)).await;
    let c_id = c.mesh().id().to_string();
    let hops_to_c = |a: &RunningNode| {
        a.mesh().view().nodes.iter().find(|n| n.id == c_id).and_then(|n| n.route.as_ref().map(|r| r.hops))
    };
    // Who links to whom, as each node sees itself, for failure messages.
    let topology = |nodes: &[&RunningNode]| {
        let mut out = String::new();
        for n in nodes {
            let view = n.mesh().view();
            let name_of = |id: &str| view.nodes.iter().find(|x| x.id == id).map_or("?".into(), |x| x.name.clone());
            let me = n.mesh().id().to_string();
            if let Some(mine) = view.nodes.iter().find(|x| x.id == me) {
                let peers: Vec<String> = mine.links.iter().map(|l| name_of(&l.peer)).collect();
                out += &format!("\n{}: {peers:?}", mine.name);
            }
        }
        out
    };
    let all = [&a, &b, &c, &d];
    let until = async |what: &str, f: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}; links:{}", topology(&all));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    until("a reaches c through switches", &|| sees(&a, &["g9"]) && hops_to_c(&a).is_some_and(|h| h >= 2)).await;

    let ctx = a.ctx(Principal::anonymous());
    // While the chain settles, a call whose route just vanished fails `unavailable` at once (by
    // design); such a call is tried again. None is lost: a switch that has no route back to a yet
    // sends the reply the way the call came (before that fix, about one run in twenty lost one).
    let who = || async {
        let settle = Instant::now() + Duration::from_secs(15);
        let options = gearmesh::gears::CallOptions::default().timeout(Duration::from_secs(10));
        loop {
            match ctx.call_with::<_, String>("g9", "who", &Value::Null, options.clone()).await {
                Err(e) if e.code().as_str() == "unavailable" && Instant::now() < settle => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                r => break r.expect("reached"),
            }
        }
    };
    for _ in 0..25 {
        assert_eq!(who().await, "n9");
    }
    until("a links to c directly", &|| hops_to_c(&a) == Some(1)).await;
    let switched = |nodes: &[&RunningNode]| nodes.iter().map(|n| n.mesh().stats().frames_forwarded).sum::<u64>();
    let before = switched(&[&b, &d]);
    for _ in 0..20 {
        assert_eq!(who().await, "n9");
    }
    assert_eq!(switched(&[&b, &d]), before, "the calls went over the shortcut, not b and d; links:{}", topology(&all));
    assert_eq!(a.mesh().stats().links, 2, "a: one ordinary link and the shortcut; links:{}", topology(&all));
    for n in [a, c, d, b] {
        n.shutdown().await;
    }
}

/// A mesh on IPv6 loopback: nodes listen on `[::1]`, advertise bracketed addresses, join through
/// a WSS and a QUIC seed given as IPv6 URLs, and serve a call across both links and over the
/// HTTP API, with development certificates that name `::1`.
#[tokio::test]
async fn nodes_on_ipv6_loopback_form_a_mesh_over_wss_and_quic() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipped: this machine has no IPv6 loopback");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let v6 = |c: &mut NodeConfig| c.listen = "[::1]:0".parse().expect("addr");
    let a = node_with(dir.path(), "a", &["echo"], vec![], vec![], v6).await;
    for addr in a.link_addrs() {
        assert!(addr.contains("[::1]:"), "{addr} is not a bracketed IPv6 address");
    }
    let quic = a.link_addrs().iter().find(|s| s.starts_with("quic://")).expect("quic addr").clone();
    let b = node_with(dir.path(), "b", &["kv"], vec![], vec![wss(&a)], v6).await;
    let c = node_with(dir.path(), "c", &[], vec![], vec![quic], v6).await;
    eventually("every node sees echo and kv", 15, || {
        sees(&a, &["echo", "kv"]) && sees(&b, &["echo", "kv"]) && sees(&c, &["echo", "kv"])
    })
    .await;
    for (n, over) in [(&b, "wss"), (&c, "quic")] {
        let got: Value =
            n.ctx(Principal::anonymous()).call("echo", "echo", &json!({ "over": over })).await.expect("call");
        assert_eq!(got, json!({ "over": over }));
    }
    // The HTTP API on the same IPv6 listener: c calls echo on a through the mesh.
    let (status, body) =
        post(&client(&c), &format!("https://[::1]:{}/v1/call/echo/echo", c.local_addr().port()), json!({"x": 6})).await;
    assert_eq!((status, body), (200, json!({"x": 6})));
    for n in [c, b, a] {
        n.shutdown().await;
    }
}

/// A node listening on every interface advertises an address of this machine that peers can
/// dial (the one its routing table sends outside traffic from), not `0.0.0.0` nor, while the
/// machine has a route out, `localhost`; its development certificate names it, so a peer that
/// joins through it verifies the node and calls it.
#[tokio::test]
async fn a_node_listening_on_every_interface_advertises_an_address_peers_can_dial() {
    let dir = tempfile::tempdir().expect("tempdir");
    let every = |c: &mut NodeConfig| c.listen = "0.0.0.0:0".parse().expect("addr");
    let a = node_with(dir.path(), "a", &["echo"], vec![], vec![], every).await;
    let url = wss(&a);
    let host = url.trim_start_matches("wss://").rsplit_once(':').expect("a port").0.to_owned();
    // A default IPv4 route: a line of /proc/net/route whose destination is 0.0.0.0.
    let route_out = std::fs::read_to_string("/proc/net/route")
        .is_ok_and(|t| t.lines().skip(1).any(|l| l.split_whitespace().nth(1) == Some("00000000")));
    if route_out {
        let ip: std::net::IpAddr = host.parse().unwrap_or_else(|_| panic!("{host} is not an address"));
        assert!(!ip.is_loopback() && !ip.is_unspecified(), "advertised {ip}");
        std::net::UdpSocket::bind((ip, 0)).unwrap_or_else(|e| panic!("{ip} is not this machine's: {e}"));
    } else {
        assert_eq!(host, "localhost", "no route out: the node is reached on this machine");
    }
    let b = node(dir.path(), "b", &[], vec![], vec![url]).await;
    eventually("b sees echo through the advertised address", 15, || sees(&b, &["echo"])).await;
    let got: Value = b.ctx(Principal::anonymous()).call("echo", "echo", &json!({"to": host})).await.expect("call");
    assert_eq!(got, json!({ "to": host }));
    for n in [b, a] {
        n.shutdown().await;
    }
}

/// A node that leaves gracefully finishes the calls it runs, including what they do after its
/// leave has spread: a call running on b when b shuts down calls a gear on c 700 ms later (past
/// the 400 ms for which a leaving node's news spreads), and a's call is answered.
#[tokio::test]
async fn a_call_running_on_a_leaving_node_still_calls_other_nodes_and_is_answered() {
    use std::sync::{Arc, atomic::AtomicUsize, atomic::Ordering};
    let started = Arc::new(AtomicUsize::new(0));
    let counted = started.clone();
    let relay = Gear::new("relay").port("later", move |ctx: Ctx, v: Value| {
        let started = counted.clone();
        async move {
            started.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(700)).await;
            ctx.call::<_, Value>("echo", "echo", &v).await
        }
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let a = node(dir.path(), "a", &[], vec![], vec![]).await;
    let b = node(dir.path(), "b", &[], vec![relay], vec![wss(&a)]).await;
    let c = node(dir.path(), "c", &["echo"], vec![], vec![wss(&a)]).await;
    eventually("every node sees relay and echo", 15, || {
        sees(&a, &["relay", "echo"]) && sees(&b, &["relay", "echo"]) && sees(&c, &["relay", "echo"])
    })
    .await;
    let ctx = a.ctx(Principal::anonymous());
    let call = tokio::spawn(async move { ctx.call::<_, Value>("relay", "later", &json!("through b")).await });
    eventually("the call runs on b", 10, || started.load(Ordering::SeqCst) == 1).await;
    b.shutdown().await;
    let got = call.await.expect("task").expect("answered, though b left while running it");
    assert_eq!(got, json!("through b"));
    for n in [c, a] {
        n.shutdown().await;
    }
}

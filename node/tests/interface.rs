//! The WebSocket interface (`/v1/mesh`) of real nodes on loopback, over TLS from a development CA,
//! with token authentication: observers (snapshot plus stream, consistent with `/v1/nodes`;
//! lagging), driving (calls, publishes), gears served by Python clients, bad input, and scopes.
//!
//! The Python tests run `examples/python/*.py` with the `websockets` and `PyJWT` packages. Without
//! them the tests print SKIP, unless `GEARMESH_REQUIRE_PYTHON` is set (as in CI): then they fail.

mod common;

use common::{eventually, sees, wss};

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::{SinkExt, StreamExt};
use gearmesh::{
    Node, NodeConfig, RunningNode,
    auth::{AuthConfig, Issuer, Scopes, SigningKey, TokenRequest, keygen, unix_now},
    gears::{Ctx, Event, Gear, Principal, Publish, TraceId},
};
use gearmesh_transport::tls::{ClientTls, ClientTrust, load_certs};
use serde_json::{Value, json};
use tokio::{net::TcpStream, time::Instant};
use tokio_rustls::{TlsConnector, client::TlsStream};
use tokio_tungstenite::{
    WebSocketStream, client_async,
    tungstenite::{self, Message, client::IntoClientRequest, http::HeaderValue, protocol::frame::coding::CloseCode},
};

const AUDIENCE: &str = "gearmesh-test";

/// Nodes sharing a development CA and an HS256 key (which also signs their link tokens).
struct Cluster {
    dir: tempfile::TempDir,
    key: SigningKey,
    key_file: PathBuf,
}

impl Cluster {
    fn new() -> Self {
        gearmesh::install_crypto_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let generated = keygen(gearmesh::auth::Algorithm::HS256).expect("keygen");
        let key_file = dir.path().join("mesh.key");
        std::fs::write(&key_file, &generated.contents).expect("write key");
        Cluster { dir, key: generated.key, key_file }
    }

    async fn node(&self, name: &str, gears: &[&str], extra: Vec<Gear>, seed: Option<&RunningNode>) -> RunningNode {
        self.node_with(name, gears, extra, seed, |_| {}).await
    }

    async fn node_with(
        &self,
        name: &str,
        gears: &[&str],
        extra: Vec<Gear>,
        seed: Option<&RunningNode>,
        tweak: impl FnOnce(&mut NodeConfig),
    ) -> RunningNode {
        let mut config = NodeConfig {
            name: Some(name.into()),
            listen: "127.0.0.1:0".parse().expect("addr"),
            gears: gears.iter().map(|g| (*g).to_owned()).collect(),
            seeds: seed.map(|s| vec![wss(s)]).unwrap_or_default(),
            auth: AuthConfig {
                keys: vec![self.key_file.clone()],
                audience: Some(AUDIENCE.into()),
                ..AuthConfig::default()
            },
            ..NodeConfig::default()
        };
        config.tls.data_dir = Some(self.dir.path().to_owned());
        tweak(&mut config);
        let mut b = Node::builder().config(config);
        for g in extra {
            b = b.gear(g);
        }
        b.build().expect("valid").start().await.expect("started")
    }

    fn token(&self, scopes: &str) -> String {
        self.token_for(scopes, Duration::from_secs(600))
    }

    fn token_for(&self, scopes: &str, ttl: Duration) -> String {
        let req = TokenRequest::new("tester", Scopes::parse_strict(scopes).expect("scopes"), ttl).audience(AUDIENCE);
        Issuer::new(self.key.clone()).issue(&req).expect("issue")
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join(gearmesh::DEV_CA_CERT_FILE)
    }
}

// === a WebSocket client over TLS ===

/// How a client presents its token.
enum Cred<'a> {
    None,
    Header(&'a str),
    Protocol(&'a str),
    FirstMessage(&'a str),
}

type Socket = WebSocketStream<TlsStream<TcpStream>>;

struct Client {
    ws: Socket,
}

/// Opens `/v1/mesh` (the query, if any, is appended to the URL). `Err` carries the HTTP status
/// of a refused upgrade.
async fn open(node: &RunningNode, ca: &Path, cred: &Cred<'_>, query: &str) -> Result<(Socket, Option<String>), u16> {
    let addr = node.local_addr();
    let mut req = format!("wss://{addr}/v1/mesh{query}").into_client_request().expect("request");
    let h = req.headers_mut();
    match cred {
        Cred::Header(t) => {
            h.insert("authorization", HeaderValue::from_str(&format!("Bearer {t}")).expect("header"));
            h.insert("sec-websocket-protocol", HeaderValue::from_static("gearmesh.v1"));
        }
        Cred::Protocol(t) => {
            let offer = format!("gearmesh.v1, bearer.{t}");
            h.insert("sec-websocket-protocol", HeaderValue::from_str(&offer).expect("header"));
        }
        Cred::None | Cred::FirstMessage(_) => {
            h.insert("sec-websocket-protocol", HeaderValue::from_static("gearmesh.v1"));
        }
    }
    let trust = ClientTrust::Ca(load_certs(ca).expect("CA certificate"));
    let tls = ClientTls::new(&trust).expect("client TLS");
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::from(addr.ip());
    let stream = TlsConnector::from(tls.wss_config()).connect(name, tcp).await.expect("TLS handshake");
    match client_async(req, stream).await {
        Ok((ws, resp)) => {
            let proto = resp.headers().get("sec-websocket-protocol").map(|v| v.to_str().expect("ascii").to_owned());
            Ok((ws, proto))
        }
        Err(tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("upgrade failed: {e}"),
    }
}

impl Client {
    /// Connects and reads the `welcome`.
    async fn connect(node: &RunningNode, ca: &Path, cred: Cred<'_>) -> Client {
        let (ws, _) = open(node, ca, &cred, "").await.expect("upgraded");
        let mut c = Client { ws };
        if let Cred::FirstMessage(t) = cred {
            c.send(json!({"v": 1, "type": "auth", "token": t})).await;
        }
        let welcome = c.recv().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        c
    }

    async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.expect("sent");
    }

    /// The next text message (pings skipped), within 20 s.
    async fn recv(&mut self) -> Value {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(20), self.ws.next())
                .await
                .expect("a message within 20 s")
                .expect("the connection is open")
                .expect("a message");
            match m {
                Message::Text(t) => return serde_json::from_str(t.as_str()).expect("JSON"),
                Message::Close(c) => panic!("closed: {c:?}"),
                _ => {}
            }
        }
    }

    /// The next message of type `kind`, skipping others.
    async fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let m = self.recv().await;
            if m["type"] == kind {
                return m;
            }
        }
    }

    /// Sends `v` and returns the reply carrying its id.
    async fn request(&mut self, v: Value) -> Value {
        let id = v["id"].clone();
        self.send(v).await;
        loop {
            let m = self.recv().await;
            if m["id"] == id {
                return m;
            }
        }
    }

    /// Waits for the close frame: its code and reason.
    async fn closed(&mut self) -> (u16, String) {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(20), self.ws.next()).await.expect("closed within 20 s");
            match m {
                Some(Ok(Message::Close(Some(f)))) => return (u16::from(f.code), f.reason.to_string()),
                Some(Ok(Message::Close(None))) | None => return (1005, String::new()),
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("connection failed before a close frame: {e}"),
            }
        }
    }
}

/// A connection refused after the upgrade: its close code and reason.
async fn refused(node: &RunningNode, ca: &Path, cred: Cred<'_>) -> (u16, String) {
    let (ws, _) = open(node, ca, &cred, "").await.expect("upgraded");
    let mut c = Client { ws };
    if let Cred::FirstMessage(t) = cred {
        c.send(json!({"v": 1, "type": "auth", "token": t})).await;
    }
    c.closed().await
}

// === the mesh as an observer holds it ===

#[derive(Debug, Default, PartialEq)]
struct Model {
    seq: u64,
    /// id → (state, gears)
    nodes: BTreeMap<String, (String, BTreeSet<String>)>,
    links: BTreeSet<(String, String)>,
}

fn pair(a: &str, b: &str) -> (String, String) {
    if a < b { (a.into(), b.into()) } else { (b.into(), a.into()) }
}

fn gears_of(node: &Value) -> BTreeSet<String> {
    node["gears"].as_array().into_iter().flatten().filter_map(|g| g["name"].as_str().map(str::to_owned)).collect()
}

impl Model {
    fn from_snapshot(s: &Value) -> Model {
        let mut m = Model { seq: s["seq"].as_u64().expect("seq"), ..Model::default() };
        for n in s["nodes"].as_array().expect("nodes") {
            m.put(n);
        }
        m
    }

    fn put(&mut self, n: &Value) {
        let id = n["id"].as_str().expect("id").to_owned();
        self.nodes.insert(id.clone(), (n["state"].as_str().expect("state").to_owned(), gears_of(n)));
        for l in n["links"].as_array().into_iter().flatten() {
            self.links.insert(pair(&id, l["peer"].as_str().expect("peer")));
        }
    }

    fn apply(&mut self, m: &Value) {
        let Some(seq) = m["seq"].as_u64() else { return };
        if seq <= self.seq {
            return;
        }
        assert_eq!(seq, self.seq + 1, "mesh messages are numbered without gaps: {m}");
        self.seq = seq;
        let node = |m: &Value| m["node"].as_str().expect("node id").to_owned();
        match m["type"].as_str().expect("type") {
            "node_joined" | "node_updated" => {
                let n = &m["node"];
                let id = n["id"].as_str().expect("id").to_owned();
                self.nodes.insert(id, (n["state"].as_str().expect("state").to_owned(), gears_of(n)));
            }
            "node_suspected" => self.set_state(&node(m), "suspect"),
            "node_alive" => self.set_state(&node(m), "alive"),
            "node_left" => self.set_state(&node(m), if m["graceful"] == true { "left" } else { "dead" }),
            "node_removed" => {
                self.nodes.remove(&node(m));
            }
            "gear_added" => {
                if let Some(n) = self.nodes.get_mut(&node(m)) {
                    n.1.insert(m["gear"]["name"].as_str().expect("gear").to_owned());
                }
            }
            "gear_removed" => {
                if let Some(n) = self.nodes.get_mut(&node(m)) {
                    n.1.remove(m["gear"]["name"].as_str().expect("gear"));
                }
            }
            "link_up" => {
                self.links.insert(pair(m["a"].as_str().expect("a"), m["b"].as_str().expect("b")));
            }
            "link_down" => {
                self.links.remove(&pair(m["a"].as_str().expect("a"), m["b"].as_str().expect("b")));
            }
            _ => {}
        }
    }

    fn set_state(&mut self, id: &str, state: &str) {
        if let Some(n) = self.nodes.get_mut(id) {
            n.0 = state.into();
        }
    }

    /// The same view from `GET /v1/nodes`.
    fn from_nodes(v: &Value) -> Model {
        let mut m = Model::default();
        for n in v["nodes"].as_array().expect("nodes") {
            m.put(n);
        }
        m
    }

    fn same_mesh(&self, other: &Model) -> bool {
        self.nodes == other.nodes && self.links == other.links
    }
}

async fn v1_nodes(node: &RunningNode, ca: &Path, token: &str) -> Value {
    let r = common::client_trusting(ca)
        .get(format!("{}/v1/nodes", node.url()))
        .bearer_auth(token)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    r.json().await.expect("json")
}

#[tokio::test]
async fn an_observer_holds_the_same_mesh_as_v1_nodes_through_joins_and_leaves() {
    let cl = Cluster::new();
    let a = cl.node("a", &["echo", "kv"], vec![], None).await;
    let b = cl.node("b", &["users"], vec![], Some(&a)).await;
    eventually("a and b see each other's gears", 15, || sees(&a, &["users"]) && sees(&b, &["echo"])).await;
    let observe = cl.token("observe");
    let mut obs = Client::connect(&a, &cl.ca(), Cred::Header(&observe)).await;
    let snap = obs.request(json!({"v": 1, "type": "subscribe", "id": "s"})).await;
    assert_eq!(snap["type"], "snapshot", "{snap}");
    let mut model = Model::from_snapshot(&snap);
    assert_eq!(model.nodes.len(), 2, "{snap}");
    let names: BTreeSet<&str> =
        snap["nodes"].as_array().expect("nodes").iter().filter_map(|n| n["name"].as_str()).collect();
    assert_eq!(names, BTreeSet::from(["a", "b"]), "nodes carry their names");

    // A third node joins through b: the observer on a learns of it, its gear and its link.
    let c = cl.node("c", &["orders"], vec![], Some(&b)).await;
    let c_id = c.id().to_owned();
    let mut seen = BTreeSet::new();
    while !(model.nodes.get(&c_id).is_some_and(|n| n.0 == "alive" && n.1.contains("orders"))
        && model.links.iter().any(|(x, y)| *x == c_id || *y == c_id))
    {
        let m = obs.recv().await;
        seen.insert(m["type"].as_str().unwrap_or_default().to_owned());
        model.apply(&m);
    }
    assert!(seen.contains("node_joined") && seen.contains("link_up"), "{seen:?}");

    // Once the mesh settles, what the observer holds is what /v1/nodes says.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let http = Model::from_nodes(&v1_nodes(&a, &cl.ca(), &observe).await);
        if model.same_mesh(&http) {
            break;
        }
        assert!(Instant::now() < deadline, "observer {model:?} never matched /v1/nodes {http:?}");
        // Apply whatever arrived meanwhile (or wait a little for the next change).
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(200), obs.recv()).await {
            model.apply(&m);
        }
    }

    // The node's own links say which transport they run over.
    let nodes = v1_nodes(&a, &cl.ca(), &observe).await;
    let own = nodes["nodes"].as_array().expect("nodes").iter().find(|n| n["id"] == a.id()).expect("a").clone();
    let kinds: Vec<&str> =
        own["links"].as_array().expect("links").iter().filter_map(|l| l["transport"].as_str()).collect();
    assert!(!kinds.is_empty() && kinds.iter().all(|k| ["wss", "quic"].contains(k)), "{own}");

    // A graceful leave arrives as node_left with graceful = true.
    c.shutdown().await;
    loop {
        let m = obs.recv().await;
        model.apply(&m);
        if m["type"] == "node_left" && m["node"] == c_id.as_str() {
            assert_eq!(m["graceful"], true, "{m}");
            break;
        }
    }
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test]
async fn a_slow_observer_is_lagged_while_calls_and_other_observers_go_on() {
    let cl = Cluster::new();
    let a = cl.node_with("a", &["echo"], vec![], None, |c| c.interface.buffer = 64).await;
    let token = cl.token("observe call:*");
    let mut slow = Client::connect(&a, &cl.ca(), Cred::Header(&token)).await;
    let snap = slow.request(json!({"v": 1, "type": "subscribe", "id": "slow", "topics": ["flood"]})).await;
    assert_eq!(snap["type"], "snapshot");
    let mut fast = Client::connect(&a, &cl.ca(), Cred::Header(&token)).await;
    let snap = fast.request(json!({"v": 1, "type": "subscribe", "id": "fast", "topics": ["flood"]})).await;
    assert_eq!(snap["type"], "snapshot");

    // The fast observer reads in its own task; the slow one reads nothing while events flood in.
    let got = Arc::new(AtomicUsize::new(0));
    let lagged_fast = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (got, lagged_fast) = (got.clone(), lagged_fast.clone());
        tokio::spawn(async move {
            loop {
                let m = fast.recv().await;
                match m["type"].as_str() {
                    Some("event") => {
                        got.fetch_add(1, Ordering::Relaxed);
                    }
                    Some("lagged") => {
                        lagged_fast.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        })
    };
    let dispatch = a.dispatch();
    let padding = "x".repeat(2048);
    const EVENTS: usize = 12_000;
    for i in 0..EVENTS {
        let body = serde_json::to_vec(&json!({"i": i, "pad": padding})).expect("json");
        let p = Publish {
            topic: "flood".into(),
            event: Event::json(body.into()),
            publisher: Principal::user("flooder", vec!["publish:*".into()]),
            trace_id: TraceId::random(),
        };
        dispatch.publish(p).expect("published");
        // Pace the flood to the fast observer, so only the slow one falls behind.
        if i % 32 == 31 {
            eventually("the fast observer keeps up", 20, || got.load(Ordering::Relaxed) + 32 > i).await;
        }
    }
    eventually("the fast observer got every event", 20, || got.load(Ordering::Relaxed) == EVENTS).await;
    assert_eq!(lagged_fast.load(Ordering::Relaxed), 0, "the fast observer never lagged");

    // Calls were never slowed by the slow observer: one goes through while it still lags.
    let mut caller = Client::connect(&a, &cl.ca(), Cred::Header(&token)).await;
    let r =
        caller.request(json!({"v": 1, "type": "call", "id": 1, "gear": "echo", "port": "echo", "arg": {"k": 1}})).await;
    assert_eq!(r["ok"], json!({"k": 1}), "{r}");

    // The slow observer finds out: lagged (with the count) and then a fresh snapshot.
    let lagged = slow.recv_type("lagged").await;
    assert!(lagged["dropped"].as_u64().expect("dropped") > 0, "{lagged}");
    let snap = slow.recv().await;
    assert_eq!(snap["type"], "snapshot", "a fresh snapshot follows lagged: {snap}");
    assert_eq!(snap["id"], "slow");
    reader.abort();
    a.shutdown().await;
}

#[tokio::test]
async fn bad_input_gets_an_error_and_the_connection_and_others_go_on() {
    let cl = Cluster::new();
    let a = cl.node_with("a", &["echo"], vec![], None, |c| c.interface.max_message_bytes = 64 * 1024).await;
    let token = cl.token("observe call:* publish:*");
    let mut c = Client::connect(&a, &cl.ca(), Cred::Header(&token)).await;
    let mut other = Client::connect(&a, &cl.ca(), Cred::Header(&token)).await;

    c.ws.send(Message::text("{not json")).await.expect("sent");
    let e = c.recv().await;
    assert_eq!((e["type"].as_str(), e["error"]["code"].as_str()), (Some("error"), Some("bad_request")), "{e}");
    assert!(e["error"]["message"].as_str().expect("message").contains("invalid JSON"), "{e}");

    let e = c.request(json!({"v": 1, "type": "teleport", "id": "t"})).await;
    assert!(e["error"]["message"].as_str().expect("message").contains("teleport"), "{e}");
    let e = c.request(json!({"type": "status", "id": "nov"})).await;
    assert!(e["error"]["message"].as_str().expect("message").contains("\"v\""), "{e}");
    let e = c.request(json!({"v": 1, "type": "reply", "call": 999, "ok": 1, "id": 999})).await;
    assert_eq!(e["error"]["code"], "bad_request", "{e}");
    assert!(e["error"]["message"].as_str().expect("message").contains("no call 999"), "{e}");
    let e = c.request(json!({"v": 1, "type": "call", "id": "nf", "gear": "nope", "port": "x"})).await;
    assert_eq!(e["error"]["code"], "not_found", "{e}");
    let e =
        c.request(json!({"v": 1, "type": "call", "id": "t0", "gear": "echo", "port": "echo", "timeout_ms": 0})).await;
    assert_eq!(e["error"]["code"], "bad_request", "{e}");
    let e = c.request(json!({"v": 1, "type": "publish", "id": "sys", "topic": "gearmesh.stats", "event": {}})).await;
    assert_eq!(e["error"]["code"], "forbidden", "{e}");
    let e = c.request(json!({"v": 1, "type": "subscribe", "id": "sys2", "topics": ["gearmesh.traces"]})).await;
    assert_eq!(e["error"]["code"], "bad_request", "{e}");
    c.ws.send(Message::binary(vec![1u8, 2, 3])).await.expect("sent");
    let e = c.recv().await;
    assert!(e["error"]["message"].as_str().expect("message").contains("binary"), "{e}");

    let e = c
        .request(json!({"v": 1, "type": "call", "id": "st", "gear": "echo", "port": "echo", "strategy": "teleport"}))
        .await;
    assert_eq!(e["error"]["code"], "bad_request", "{e}");
    let e = c
        .request(json!({"v": 1, "type": "call", "id": "pt", "gear": "echo", "port": "echo", "per_try_timeout_ms": 0}))
        .await;
    assert_eq!(e["error"]["code"], "bad_request", "{e}");

    // Still usable; a call may name a strategy as over HTTP.
    let r = c
        .request(json!({"v": 1, "type": "call", "id": "sc", "gear": "echo", "port": "echo", "arg": 7, "strategy": "scatter", "per_try_timeout_ms": 5000}))
        .await;
    assert_eq!(r["ok"]["replies"][0]["ok"], 7, "scatter gathers every replica's reply: {r}");
    let r = c.request(json!({"v": 1, "type": "call", "id": "ok", "gear": "echo", "port": "echo", "arg": [1, 2]})).await;
    assert_eq!(r["ok"], json!([1, 2]), "{r}");
    let r = c.request(json!({"v": 1, "type": "publish", "id": "p", "topic": "t", "event": {"x": 1}})).await;
    assert_eq!(r["type"], "ack", "{r}");

    // A message over the limit closes this connection with 1009, and only this one.
    let big = json!({"v": 1, "type": "status", "id": "big", "pad": "y".repeat(100 * 1024)});
    c.ws.send(Message::text(big.to_string())).await.expect("sent");
    let (code, reason) = c.closed().await;
    assert_eq!(code, 1009, "{reason}");
    let s = other.request(json!({"v": 1, "type": "status", "id": "st"})).await;
    assert_eq!(s["type"], "status", "{s}");
    assert_eq!(s["node"]["name"], "a");
    assert_eq!(s["node"]["mesh"], gearmesh::DEFAULT_MESH_NAME);
    a.shutdown().await;
}

#[tokio::test]
async fn tokens_and_scopes_are_enforced_with_close_codes_and_errors() {
    let cl = Cluster::new();
    let a = cl.node_with("a", &["echo", "kv"], vec![], None, |c| c.interface.auth_timeout_ms = 500).await;
    let ca = cl.ca();

    // No token at all: after the auth timeout, 4401.
    let (code, reason) = refused(&a, &ca, Cred::None).await;
    assert_eq!(code, 4401, "{reason}");
    assert!(reason.contains("auth"), "{reason}");
    // A malformed token, a token signed by another key, an expired one (as a first message).
    assert_eq!(refused(&a, &ca, Cred::Header("not-a-jwt")).await.0, 4401);
    let other = keygen(gearmesh::auth::Algorithm::HS256).expect("keygen").key;
    let foreign = Issuer::new(other)
        .issue(&TokenRequest::new("eve", Scopes::parse("observe"), Duration::from_secs(60)).audience(AUDIENCE))
        .expect("issue");
    assert_eq!(refused(&a, &ca, Cred::Protocol(&foreign)).await.0, 4401);
    let req = TokenRequest::new("old", Scopes::parse("observe"), Duration::from_secs(60)).audience(AUDIENCE);
    let expired = Issuer::new(cl.key.clone()).issue_at(&req, unix_now() - 3600).expect("issue");
    let (code, reason) = refused(&a, &ca, Cred::FirstMessage(&expired)).await;
    assert_eq!(code, 4401);
    assert!(reason.contains("expired"), "{reason}");
    // A valid token that grants nothing the interface offers: 4403.
    let (code, reason) = refused(&a, &ca, Cred::Header(&cl.token("mesh:link"))).await;
    assert_eq!(code, 4403, "{reason}");
    // A token in the URL query is refused before the upgrade (it would end up in logs).
    let status = open(&a, &ca, &Cred::None, &format!("?access_token={}", cl.token("observe"))).await.err();
    assert_eq!(status, Some(401));

    // A token in the subprotocol offer (as browsers send it); the node selects gearmesh.v1.
    let caller = cl.token("call:echo/*");
    let (ws, proto) = open(&a, &ca, &Cred::Protocol(&caller), "").await.expect("upgraded");
    assert_eq!(proto.as_deref(), Some("gearmesh.v1"));
    let mut c = Client { ws };
    assert_eq!(c.recv().await["type"], "welcome");
    let r = c.request(json!({"v": 1, "type": "call", "id": 1, "gear": "echo", "port": "echo", "arg": "hi"})).await;
    assert_eq!(r["ok"], "hi", "{r}");
    for (msg, what) in [
        (json!({"v": 1, "type": "call", "id": 2, "gear": "kv", "port": "get", "arg": {"key": "k"}}), "another gear"),
        (json!({"v": 1, "type": "subscribe", "id": 3}), "observing"),
        (json!({"v": 1, "type": "status", "id": 4}), "status"),
        (json!({"v": 1, "type": "publish", "id": 5, "topic": "t", "event": 1}), "publishing"),
        (json!({"v": 1, "type": "register", "id": 6, "gear": "py", "ports": [{"name": "p"}]}), "serving"),
    ] {
        let e = c.request(msg).await;
        assert_eq!(e["error"]["code"], "forbidden", "{what}: {e}");
    }

    // A connection ends with 4401 when its token expires.
    let short = cl.token_for("observe", Duration::from_secs(2));
    let mut c = Client::connect(&a, &ca, Cred::FirstMessage(&short)).await;
    let (code, reason) = c.closed().await;
    assert_eq!(code, 4401);
    assert!(reason.contains("expired"), "{reason}");
    a.shutdown().await;
}

#[tokio::test]
async fn a_node_shutting_down_closes_its_clients_with_1001() {
    let cl = Cluster::new();
    let a = cl.node("a", &["echo"], vec![], None).await;
    let mut c = Client::connect(&a, &cl.ca(), Cred::Header(&cl.token("observe"))).await;
    let shutdown = tokio::spawn(a.shutdown());
    let (code, _) = c.closed().await;
    assert_eq!(code, u16::from(CloseCode::Away));
    shutdown.await.expect("shut down");
}

// === Python clients ===

fn python_ready() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import websockets, jwt, jsonschema"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("GEARMESH_REQUIRE_PYTHON").is_none(),
            "GEARMESH_REQUIRE_PYTHON is set but python3 cannot import websockets, jwt (PyJWT) and jsonschema"
        );
        println!("SKIP: python3 with websockets and PyJWT not available");
    }
    ok
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python")
}

/// Runs an example with the connection arguments for `node`; the token is minted by PyJWT from
/// the cluster's key file.
fn python(cl: &Cluster, script: &str, node: &RunningNode, extra: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("python3");
    cmd.current_dir(examples())
        .arg(script)
        .args(["--url", &format!("wss://{}/v1/mesh", node.local_addr())])
        .arg("--cafile")
        .arg(cl.ca())
        .arg("--key")
        .arg(&cl.key_file)
        .args(["--aud", AUDIENCE])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// A Rust gear that greets through whatever gear `greeter` is, wherever it runs.
fn front() -> Gear {
    Gear::new("front").port("hello", |ctx: Ctx, who: String| async move {
        let r: Value = ctx.call("greeter", "greet", &json!({ "name": who })).await?;
        Ok(r)
    })
}

#[tokio::test]
async fn a_rust_gear_calls_a_python_gear_on_another_node_and_a_dropped_socket_withdraws_it() {
    if !python_ready() {
        return;
    }
    let cl = Cluster::new();
    let policy = "[auth.gears]\nfront = [\"call:greeter/*\"]\n";
    let gears_policy = NodeConfig::from_toml(policy).expect("policy").auth.gears;
    // Three nodes: the Python gear attaches to b; the Rust gear calling it runs on a.
    let a = cl.node_with("a", &["echo"], vec![front()], None, |c| c.auth.gears = gears_policy.clone()).await;
    let b = cl.node_with("b", &[], vec![], Some(&a), |c| c.auth.gears = gears_policy.clone()).await;
    let c = cl.node_with("c", &["kv"], vec![], Some(&b), |c| c.auth.gears = gears_policy).await;
    eventually("the three nodes linked", 15, || sees(&b, &["echo", "kv"]) && sees(&a, &["kv"])).await;

    let mut py = python(&cl, "gear.py", &b, &[]).spawn().expect("python3 gear.py");
    let mut out = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(py.stdout.take().expect("stdout")));
    let line = tokio::time::timeout(Duration::from_secs(20), out.next_line())
        .await
        .expect("gear.py registered in time")
        .expect("read")
        .expect("a line");
    assert!(line.starts_with("registered greeter on b"), "{line}");
    eventually("a and c see the Python gear on b", 15, || sees(&a, &["greeter"]) && sees(&c, &["greeter"])).await;

    // A Rust gear on a calls the Python gear on b through the mesh.
    let http = common::client_trusting(&cl.ca());
    let token = cl.token("call:*");
    let r = http
        .post(format!("{}/v1/call/front/hello", a.url()))
        .bearer_auth(&token)
        .json(&json!("rust"))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body, json!({"greeting": "hello rust", "served_by": "python"}));

    // A call in flight when the socket drops fails with unavailable, long before its deadline.
    let slow = {
        let (http, url, token) = (http.clone(), a.url(), token.clone());
        tokio::spawn(async move {
            let r = http
                .post(format!("{url}/v1/call/greeter/slow?timeout_ms=60000"))
                .bearer_auth(token)
                .json(&json!({}))
                .send()
                .await
                .expect("sent");
            (r.status().as_u16(), r.json::<Value>().await.expect("json"))
        })
    };
    eventually("the slow call reached b", 15, || b.host().in_flight() == 1).await;
    py.start_kill().expect("kill python");
    let (status, body) = tokio::time::timeout(Duration::from_secs(20), slow).await.expect("in time").expect("joined");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");

    // And the gear is gone from the mesh.
    eventually("greeter withdrawn everywhere", 15, || {
        !sees(&a, &["greeter"]) && !sees(&b, &["greeter"]) && !sees(&c, &["greeter"])
    })
    .await;
    let _ = py.wait().await;
    for n in [c, b, a] {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn the_python_observer_sees_the_whole_three_node_mesh_its_events_traces_and_stats() {
    if !python_ready() {
        return;
    }
    let cl = Cluster::new();
    let a = cl.node("a", &["echo", "kv"], vec![], None).await;
    let b = cl.node("b", &["users"], vec![], Some(&a)).await;
    let c = cl.node("c", &["orders"], vec![], Some(&b)).await;
    for n in [&a, &b, &c] {
        eventually("every node sees every gear", 15, || sees(n, &["echo", "users", "orders"])).await;
    }
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/interface.schema.json");
    let obs = python(&cl, "observer.py", &c, &["--seconds", "6", "--summary", "--quiet", "--topics", "demo.t"])
        .args(["--traces", "--stats", "--validate"])
        .arg(schema)
        .spawn()
        .expect("python3 observer.py");
    // Once c advertises the observer's topics, publish on a and call a port on a from b.
    let listening = || a.mesh().view().nodes.iter().any(|n| n.id == c.id() && n.topics.iter().any(|t| t == "demo.t"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !listening() {
        if Instant::now() > deadline {
            let out = obs.wait_with_output().await.expect("ran");
            panic!(
                "a never saw c listen to demo.t; observer.py said: {} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let http = common::client_trusting(&cl.ca());
    let token = cl.token("call:* publish:*");
    let r = http
        .post(format!("{}/v1/events/demo.t", a.url()))
        .bearer_auth(&token)
        .json(&json!({"hello": "observer"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 202);
    // A few calls over a second: a starts tracing once its own view shows the observer's interest,
    // which can trail what the test saw by a moment.
    for _ in 0..10 {
        let r = http
            .post(format!("{}/v1/call/echo/echo", b.url()))
            .bearer_auth(&token)
            .json(&json!({"traced": true}))
            .send()
            .await
            .expect("sent");
        assert_eq!(r.status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let out =
        tokio::time::timeout(Duration::from_secs(30), obs.wait_with_output()).await.expect("in time").expect("ran");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "observer.py failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: Value = serde_json::from_str(stdout.lines().last().expect("a summary line")).expect("JSON summary");
    let names: BTreeSet<&str> =
        summary["nodes"].as_array().expect("nodes").iter().filter_map(|n| n["name"].as_str()).collect();
    assert_eq!(names, BTreeSet::from(["a", "b", "c"]), "{summary}");
    assert!(summary["nodes"].as_array().expect("nodes").iter().all(|n| n["state"] == "alive"), "{summary}");
    assert!(summary["links"].as_array().expect("links").len() >= 2, "{summary}");
    assert_eq!(summary["events"], json!([{"topic": "demo.t", "event": {"hello": "observer"}}]), "{summary}");
    assert!(summary["traces"].as_u64().expect("traces") >= 1, "a trace of the echo call on a: {summary}");
    let stats: BTreeSet<&str> =
        summary["stats_from"].as_array().expect("stats").iter().filter_map(Value::as_str).collect();
    assert_eq!(stats, BTreeSet::from(["a", "b", "c"]), "stats from every node: {summary}");
    assert_eq!(summary["invalid"], 0, "every message matched docs/interface.schema.json: {stderr}");
    for n in [c, b, a] {
        n.shutdown().await;
    }
}

/// The token battery over both doors of a node, HTTP and the WebSocket interface: every defect is
/// refused (401, close 4401), a missing scope is 403 (and an `error` on the socket), a valid token
/// passes. The node trusts an identity provider's RSA public key (so the HS256 confusion attack
/// applies), with an audience and an issuer.
#[tokio::test]
async fn the_token_battery_over_http_and_the_websocket_interface() {
    use base64::Engine;
    use gearmesh::auth::{Algorithm, Audience, Claims, KeyId, LoadedKey, SigningKey, load_key};

    gearmesh::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let pair = rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).expect("rsa");
    let LoadedKey::Signing(idp) = load_key(pair.serialize_pem().as_bytes(), None).expect("rsa key") else {
        panic!("a private key loads as a signing key");
    };
    let public_pem = pair.public_key_pem();
    let public = dir.path().join("idp.pub.pem");
    std::fs::write(&public, &public_pem).expect("write");
    const ISSUER: &str = "https://idp.test/realms/mesh";
    let mut config = NodeConfig {
        name: Some("a".into()),
        listen: "127.0.0.1:0".parse().expect("addr"),
        gears: vec!["echo".into()],
        auth: AuthConfig {
            keys: vec![public],
            audience: Some(AUDIENCE.into()),
            issuers: vec![ISSUER.into()],
            ..AuthConfig::default()
        },
        ..NodeConfig::default()
    };
    config.tls.data_dir = Some(dir.path().to_owned());
    let a = Node::builder().config(config).build().expect("valid").start().await.expect("started");
    let ca = dir.path().join(gearmesh::DEV_CA_CERT_FILE);

    let now = unix_now();
    let claims = |f: &dyn Fn(&mut Claims)| {
        let mut c = Claims {
            sub: Some("alice".into()),
            iat: Some(now),
            exp: Some(now + 600),
            iss: Some(ISSUER.into()),
            aud: Some(Audience::One(AUDIENCE.into())),
            scope: Some("call:echo/* observe".into()),
            ..Claims::default()
        };
        f(&mut c);
        c
    };
    let sign = |key: &SigningKey, c: &Claims| Issuer::new(key.clone()).sign_claims(c).expect("sign");
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let good = sign(&idp, &claims(&|_| {}));
    // HS256 signed with the RSA public key as the secret, claiming the RSA key's kid.
    let confused = SigningKey::from_secret(public_pem.as_bytes(), Algorithm::HS256)
        .expect("hs key")
        .with_kid(KeyId::new(idp.kid().as_str()));
    let other_idp = keygen(Algorithm::ES256).expect("keygen").key.with_kid(KeyId::new(idp.kid().as_str()));
    let mut tampered = good.clone();
    let last = tampered.pop().expect("non-empty");
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let defects: Vec<(&str, String)> = vec![
        ("malformed", "not-a-jwt".into()),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(r#"{"alg":"none","typ":"JWT"}"#),
                b64(&serde_json::to_string(&claims(&|_| {})).expect("json"))
            ),
        ),
        ("HS256 with the RSA public key (confusion)", sign(&confused, &claims(&|_| {}))),
        ("signed by another key", sign(&other_idp, &claims(&|_| {}))),
        ("tampered signature", tampered),
        ("expired", sign(&idp, &claims(&|c| c.exp = Some(now - 3600)))),
        ("not yet valid", sign(&idp, &claims(&|c| c.nbf = Some(now + 3600)))),
        ("for another audience", sign(&idp, &claims(&|c| c.aud = Some(Audience::One("other-mesh".into()))))),
        ("from another issuer", sign(&idp, &claims(&|c| c.iss = Some("https://evil.test".into())))),
        ("oversized", sign(&idp, &claims(&|c| c.jti = Some("x".repeat(16 * 1024))))),
    ];
    let http = common::client_trusting(&ca);
    let call = |token: String| {
        let http = http.clone();
        let url = format!("{}/v1/call/echo/echo", a.url());
        async move { http.post(url).bearer_auth(token).json(&json!(1)).send().await.expect("sent").status().as_u16() }
    };
    for (what, token) in &defects {
        assert_eq!(call(token.clone()).await, 401, "HTTP, a token {what}");
        // Oversized tokens do not fit a header line for some clients; send them as a message.
        let cred = if *what == "oversized" { Cred::FirstMessage(token) } else { Cred::Header(token) };
        let (code, reason) = refused(&a, &ca, cred).await;
        assert_eq!(code, 4401, "WebSocket, a token {what}: {reason}");
        assert!(!reason.contains(token.as_str()) || token.len() < 12, "the reason does not echo the token");
    }
    // A scope for another gear: 403, and a forbidden error on the socket (which stays open).
    let other_gear = sign(&idp, &claims(&|c| c.scope = Some("call:kv/* observe".into())));
    assert_eq!(call(other_gear.clone()).await, 403);
    let mut c = Client::connect(&a, &ca, Cred::Header(&other_gear)).await;
    let e = c.request(json!({"v": 1, "type": "call", "id": 1, "gear": "echo", "port": "echo", "arg": 1})).await;
    assert_eq!(e["error"]["code"], "forbidden", "{e}");
    // And the valid token passes both doors.
    assert_eq!(call(good.clone()).await, 200);
    let mut c = Client::connect(&a, &ca, Cred::Protocol(&good)).await;
    let r = c.request(json!({"v": 1, "type": "call", "id": 2, "gear": "echo", "port": "echo", "arg": 1})).await;
    assert_eq!(r["ok"], 1, "{r}");
    a.shutdown().await;
}

#[tokio::test]
async fn an_observer_on_one_node_sees_pipeline_runs_on_another() {
    let cl = Cluster::new();
    let a = cl.node("a", &["shop"], vec![], None).await;
    let b = cl.node("b", &["echo"], vec![], Some(&a)).await;
    eventually("b sees the shop", 15, || sees(&b, &["orders", "billing"])).await;
    let mut obs = Client::connect(&b, &cl.ca(), Cred::Header(&cl.token("observe"))).await;
    let snap = obs.request(json!({"v": 1, "type": "subscribe", "id": "p", "mesh": false, "pipelines": true})).await;
    assert_eq!(snap["type"], "snapshot", "{snap}");
    eventually("a knows b wants pipeline runs", 15, || {
        a.mesh().view().nodes.iter().any(|n| n.id == b.id() && n.topics.iter().any(|t| t == "gearmesh.runs"))
    })
    .await;
    // Give a's own watcher a moment past what the view shows, then run mallory's order on a.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = common::client_trusting(&cl.ca())
        .post(format!("{}/v1/pipelines/order/call", a.url()))
        .bearer_auth(cl.token("call:*"))
        .json(&json!({"user_id": "mallory", "product_id": "widget", "qty": 1}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 422);
    let started = obs.recv_type("pipeline").await;
    assert_eq!((started["status"].as_str(), started["name"].as_str()), (Some("running"), Some("a")), "{started}");
    let ended = obs.recv_type("pipeline").await;
    assert_eq!(ended["run"], started["run"]);
    assert_eq!(ended["status"], "failed", "{ended}");
    assert_eq!(ended["failed_step"], "charge", "{ended}");
    assert_eq!(ended["compensation"], "completed", "{ended}");
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test]
async fn an_observer_sees_a_circuit_breaker_open() {
    let cl = Cluster::new();
    let flaky = Gear::new("flaky").port("boom", |_ctx: Ctx, _: Value| async move {
        Err::<Value, _>(gearmesh::gears::CallError::internal("boom"))
    });
    let a = cl.node("a", &["echo"], vec![], None).await;
    let b = cl.node("b", &[], vec![flaky], Some(&a)).await;
    eventually("a sees flaky on b", 15, || sees(&a, &["flaky"])).await;
    let mut obs = Client::connect(&a, &cl.ca(), Cred::Header(&cl.token("observe"))).await;
    let snap = obs.request(json!({"v": 1, "type": "subscribe", "id": "s"})).await;
    assert_eq!(snap["type"], "snapshot");
    let ctx = a.ctx(gearmesh::gears::Principal::user("tester", vec!["call:*".into()]));
    for _ in 0..30 {
        let e = ctx.call::<_, Value>("flaky", "boom", &json!(1)).await.expect_err("it fails");
        assert!(matches!(e.code().as_str(), "internal" | "unavailable"), "{e}");
    }
    let m = obs.recv_type("breaker").await;
    assert_eq!(
        (m["node"].as_str(), m["gear"].as_str(), m["state"].as_str()),
        (Some(b.id()), Some("flaky"), Some("open")),
        "{m}"
    );
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test]
async fn one_connection_serves_a_bounded_number_of_gears() {
    let cl = Cluster::new();
    let a = cl.node("a", &[], vec![], None).await;
    let mut c = Client::connect(&a, &cl.ca(), Cred::Header(&cl.token("serve:*"))).await;
    for i in 0..64 {
        let r = c
            .request(json!({"v": 1, "type": "register", "id": i, "gear": format!("g{i}"), "ports": [{"name": "p"}]}))
            .await;
        assert_eq!(r["type"], "registered", "{r}");
    }
    let e = c.request(json!({"v": 1, "type": "register", "id": 64, "gear": "g64", "ports": [{"name": "p"}]})).await;
    assert_eq!(e["error"]["code"], "overloaded", "{e}");
    a.shutdown().await;
}

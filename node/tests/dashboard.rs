//! The dashboard in a real headless Chromium (Debian's `chromium`, driven by
//! `common::chromium`): a three-node mesh with token authentication runs in this process with
//! calls flowing, and the browser opens `GET /` on one node with an observe+call token in the URL
//! fragment.
//!
//! - After the page's scripts ran (`--dump-dom`), its DOM shows the three nodes, their links, their
//!   gears and the calls flowing between them, with no console errors; a screenshot goes to
//!   cargo's temporary directory for people to look at.
//! - Driven over the DevTools protocol, the call form works, a refused token brings the prompt
//!   back, a lagging page resyncs from the fresh snapshot, and a lost node is retried.
//! - Over plain HTTPS, the page's files are open and carry a strict policy; the data is not.
//!
//! Without Chromium the browser tests print SKIP, unless `GEARMESH_REQUIRE_CHROMIUM` is set (CI
//! sets it), in which case they fail.

mod common;

use common::wss;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::Duration,
};

use common::chromium::{Run, Tab, chromium, console_errors, devtools, run_chromium};

use gearmesh::{
    Node, NodeConfig, RunningNode,
    auth::{Algorithm, AuthConfig, Issuer, Scopes, TokenRequest, keygen},
    gears::Principal,
};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const AUDIENCE: &str = "dashboard-test";

/// What the shop's gears may do (`[auth.gears]`).
const GEAR_POLICY: &str = "orders = [\"call:*\", \"publish:*\"]\nbilling = [\"publish:*\"]";

/// How many times the page is loaded, at most, before its DOM must show everything asked for.
const ATTEMPTS: usize = 10;

// === the mesh ===

struct Mesh {
    nodes: Vec<RunningNode>,
    key: gearmesh::auth::SigningKey,
    _dir: tempfile::TempDir,
}

/// Three nodes like the demo's, each linked to the previous one, requiring tokens signed by one
/// key (which also signs their link tokens).
async fn mesh() -> Mesh {
    mesh_with(3, |_| {}).await
}

/// The first `count` nodes of [`mesh`], the first one's configuration changed by `tweak`.
async fn mesh_with(count: usize, tweak: impl FnOnce(&mut NodeConfig)) -> Mesh {
    let mut tweak = Some(tweak);
    gearmesh::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let generated = keygen(Algorithm::EdDSA).expect("keygen");
    let key_path = dir.path().join("mesh.key");
    std::fs::write(&key_path, &generated.contents).expect("write key");
    let layout: [(&str, &[&str]); 3] =
        [("demo-1", &["echo", "kv", "users", "products"]), ("demo-2", &["billing", "audit"]), ("demo-3", &["orders"])];
    let mut nodes: Vec<RunningNode> = Vec::new();
    for (name, node_gears) in layout.into_iter().take(count) {
        let mut config = NodeConfig {
            name: Some(name.into()),
            listen: "127.0.0.1:0".parse().expect("addr"),
            gears: node_gears.iter().map(|g| (*g).to_owned()).collect(),
            seeds: nodes.last().map(wss).into_iter().collect(),
            ..NodeConfig::default()
        };
        config.tls.data_dir = Some(dir.path().to_owned());
        if let Some(t) = tweak.take() {
            t(&mut config);
        }
        let auth = AuthConfig {
            keys: vec![key_path.clone()],
            audience: Some(AUDIENCE.into()),
            // The shop's gears call and publish on behalf of their callers.
            gears: toml::from_str(GEAR_POLICY).expect("gear policy"),
            ..AuthConfig::default()
        };
        let node = Node::builder().config(config).auth(auth).build().expect("valid").start().await.expect("started");
        nodes.push(node);
    }
    let mesh = Mesh { nodes, key: generated.key, _dir: dir };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !mesh.converged() {
        assert!(Instant::now() < deadline, "the nodes did not see each other's gears within 30 s: {}", mesh.views());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    mesh
}

/// The WebSocket link URL of a node (a seed for the next one).
impl Mesh {
    /// Every node sees every node alive and every gear.
    fn converged(&self) -> bool {
        let all_gears: usize = self.nodes.iter().map(|n| n.host().gears().len()).sum();
        self.nodes.iter().all(|n| {
            let view = n.mesh().view();
            let alive = view.nodes.iter().filter(|x| x.state == "alive").count();
            let gears = view.nodes.iter().map(|x| x.gears.len()).sum::<usize>();
            alive == self.nodes.len() && gears == all_gears
        })
    }

    /// What each node sees (each known node's name, state, gear count and links), for a failure.
    fn views(&self) -> String {
        let seen = |n: &RunningNode| {
            let view = n.mesh().view();
            let nodes: Vec<String> = view
                .nodes
                .iter()
                .map(|x| format!("{} {} {} gears {} links", x.name, x.state, x.gears.len(), x.links.len()))
                .collect();
            format!("{} sees [{}]", n.name(), nodes.join(", "))
        };
        self.nodes.iter().map(seen).collect::<Vec<_>>().join("; ")
    }

    /// A token for the page: it may watch and call.
    fn token(&self) -> String {
        let scopes = Scopes::parse_strict("observe call:*").expect("scopes");
        let req = TokenRequest::new("dashboard-viewer", scopes, Duration::from_secs(600)).audience(AUDIENCE);
        Issuer::new(self.key.clone()).issue(&req).expect("issue")
    }

    /// The undirected links the first node knows, as the page names them (`<id>|<id>`, sorted).
    fn links(&self) -> BTreeSet<String> {
        let view = self.nodes[0].mesh().view();
        let mut set = BTreeSet::new();
        for n in &view.nodes {
            for l in &n.links {
                let (a, b) = if n.id < l.peer { (&n.id, &l.peer) } else { (&l.peer, &n.id) };
                set.insert(format!("{a}|{b}"));
            }
        }
        set
    }

    /// Calls through the mesh until `stop`: orders placed on the first node (run on the third,
    /// which calls gears on the other two), some refused by the shop (an app error), and echo
    /// from the second node to the first.
    fn traffic(&self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let shopper = Principal::user("shopper", vec!["call:*".into()]);
        let first = self.nodes[0].ctx(shopper.clone());
        let second = self.nodes[1].ctx(shopper);
        tokio::spawn(async move {
            // Bounded: a few minutes at most, whatever happens to the test.
            for i in 0..6000u32 {
                let user = if i % 5 == 4 { "mallory" } else { "alice" };
                let order = json!({"user_id": user, "product_id": "widget", "qty": 1});
                // Failures are part of the traffic (mallory is refused); the page shows them.
                let _placed: Result<Value, _> = first.call("orders", "place", &order).await;
                let _echoed: Result<Value, _> = second.call("echo", "echo", &json!(i)).await;
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(40)) => {}
                    () = stop.cancelled() => return,
                }
            }
        })
    }
}

// === the page ===

/// Fills the call form and presses Call.
async fn submit(tab: &mut Tab, gear: &str, port: &str, arg: &str) {
    let js = format!(
        "(() => {{ const set = (id, v) => {{ document.getElementById(id).value = v; }}; \
         set('call-gear', {}); set('call-port', {}); set('call-arg', {}); \
         document.getElementById('call-result').dataset.outcome = 'none'; \
         document.getElementById('call-submit').click(); }})()",
        json!(gear),
        json!(port),
        json!(arg)
    );
    tab.eval(&js).await;
}

// === reading the dumped DOM ===

/// The attributes of every start tag that has `attr`, in document order.
fn tags_with<'a>(dom: &'a str, attr: &str) -> Vec<BTreeMap<&'a str, &'a str>> {
    let needle = format!(" {attr}=\"");
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = dom[from..].find(&needle) {
        let at = from + i;
        let start = dom[..at].rfind('<').unwrap_or(0);
        let end = dom[at..].find('>').map_or(dom.len(), |e| at + e);
        out.push(attributes(&dom[start..end]));
        from = end;
    }
    out
}

/// `<g class="node" data-node-id="x"` -> {"tag": "g", "class": "node", "data-node-id": "x"}.
fn attributes(tag: &str) -> BTreeMap<&str, &str> {
    let mut map = BTreeMap::new();
    let tag = tag.trim_start_matches('<');
    let name_end = tag.find(char::is_whitespace).unwrap_or(tag.len());
    map.insert("tag", &tag[..name_end]);
    let mut rest = &tag[name_end..];
    while let Some(eq) = rest.find("=\"") {
        let name = rest[..eq].trim();
        let value_start = eq + 2;
        let Some(len) = rest[value_start..].find('"') else { break };
        map.insert(name, &rest[value_start..value_start + len]);
        rest = &rest[value_start + len + 1..];
    }
    map
}

fn has_class(tag: &BTreeMap<&str, &str>, class: &str) -> bool {
    tag.get("class").is_some_and(|c| c.split_whitespace().any(|x| x == class))
}

/// The value of `attr` on the element with `id`.
fn attr_of<'a>(dom: &'a str, id: &str, attr: &str) -> Option<&'a str> {
    tags_with(dom, "id").into_iter().find(|t| t.get("id") == Some(&id)).and_then(|t| t.get(attr).copied())
}

/// What the page showed, read from its DOM.
#[derive(Debug, Default)]
struct Seen {
    status: String,
    /// Graph nodes: id -> (name, state).
    nodes: BTreeMap<String, (String, String)>,
    links: BTreeSet<String>,
    /// Node cards: id -> gear names.
    cards: BTreeMap<String, BTreeSet<String>>,
    /// `from|to` of the call arrows in the graph.
    flows: BTreeSet<String>,
    errors_listed: usize,
    page_errors: String,
}

fn read(dom: &str) -> Seen {
    let mut seen = Seen {
        status: attr_of(dom, "conn-status", "data-status").unwrap_or_default().to_owned(),
        page_errors: attr_of(dom, "page-errors", "data-count").unwrap_or("missing").to_owned(),
        ..Seen::default()
    };
    for t in tags_with(dom, "data-node-id") {
        let id = t.get("data-node-id").copied().unwrap_or_default().to_owned();
        if has_class(&t, "node") {
            let name = t.get("data-node-name").copied().unwrap_or_default().to_owned();
            let state = t.get("data-state").copied().unwrap_or_default().to_owned();
            seen.nodes.insert(id, (name, state));
        } else if has_class(&t, "node-card") {
            seen.cards.insert(id, BTreeSet::new());
        }
    }
    // Gear chips follow their card in document order.
    let mut card: Option<String> = None;
    for t in tags_with(dom, "class") {
        if has_class(&t, "node-card") {
            card = t.get("data-node-id").map(|s| (*s).to_owned());
        } else if has_class(&t, "gear")
            && let (Some(c), Some(g)) = (&card, t.get("data-gear"))
            && let Some(gears) = seen.cards.get_mut(c)
        {
            gears.insert((*g).to_owned());
        }
    }
    for t in tags_with(dom, "data-link") {
        if has_class(&t, "link") {
            seen.links.insert(t.get("data-link").copied().unwrap_or_default().to_owned());
        }
    }
    for t in tags_with(dom, "data-call") {
        if has_class(&t, "flow") {
            seen.flows.insert(t.get("data-call").copied().unwrap_or_default().to_owned());
        }
    }
    seen.errors_listed = tags_with(dom, "data-trace-id").len();
    seen
}

// === the tests ===

/// The page is open to anyone on a node that requires tokens (it holds no secret), with its
/// types and a strict policy; the data behind it is not.
#[tokio::test]
async fn the_page_is_open_under_a_strict_policy_and_the_data_is_not() {
    let mesh = mesh_with(1, |_| {}).await;
    let url = mesh.nodes[0].url();
    let http = common::client_trusting(mesh.nodes[0].dev_ca_cert().expect("dev CA"));
    for (path, kind) in [
        ("/", "text/html"),
        ("/dashboard/app.js", "text/javascript"),
        ("/dashboard/style.css", "text/css"),
        ("/dashboard/favicon.svg", "image/svg+xml"),
    ] {
        let r = http.get(format!("{url}{path}")).send().await.expect("sent");
        assert_eq!(r.status(), 200, "{path} is open");
        let header = |name: &str| r.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        assert!(header("content-type").starts_with(kind), "{path}: {}", header("content-type"));
        let csp = header("content-security-policy");
        assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{path}: {csp}");
        assert!(csp.contains("connect-src 'self' wss: ws:") && !csp.contains("unsafe"), "{path}: {csp}");
        assert_eq!(header("x-content-type-options"), "nosniff");
    }
    let r = http.get(format!("{url}/dashboard/missing.js")).send().await.expect("sent");
    assert_eq!(r.status(), 404, "only the embedded files are served");
    let r = http.get(format!("{url}/v1/nodes")).send().await.expect("sent");
    assert_eq!(r.status(), 401, "the data needs a token");
    let r = http.get(format!("{url}/?token=x")).send().await.expect("sent");
    assert_eq!(r.status(), 401, "a token in the query is refused, even for the page");
    for n in mesh.nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_mesh_live_in_headless_chromium() {
    let Some(bin) = chromium() else {
        println!(
            "SKIP: chromium is not installed (apt-get install -y chromium); set GEARMESH_REQUIRE_CHROMIUM=1 to fail"
        );
        return;
    };
    let mesh = mesh().await;
    let stop = CancellationToken::new();
    let traffic = mesh.traffic(stop.clone());
    let ids: Vec<String> = mesh.nodes.iter().map(|n| n.id().to_owned()).collect();
    // The token travels in the fragment, which the browser never sends to the server.
    let url = format!("{}/#token={}", mesh.nodes[0].url(), mesh.token());

    let mut seen = Seen::default();
    let mut last = Run { stdout: String::new(), stderr: String::new() };
    // The mesh may add links while the test runs (nodes link to more peers than their seed).
    let mut expected_links = BTreeSet::new();
    for attempt in 1..=ATTEMPTS {
        last = run_chromium(&bin, &["--dump-dom".to_owned()], &url).await;
        expected_links = mesh.links();
        seen = read(&last.stdout);
        let errors = console_errors(&last.stderr);
        assert!(errors.is_empty(), "console errors in the page:\n{}", errors.join("\n"));
        assert_eq!(seen.page_errors, "0", "the page recorded errors of its own:\n{}", last.stdout);
        // Calls and their errors are sampled as they happen, so they may take a load or two.
        let calls_seen = seen.flows.contains(&format!("{}|{}", ids[2], ids[0])) && seen.errors_listed > 0;
        if seen.status == "live" && seen.nodes.len() == 3 && seen.links == expected_links && calls_seen {
            break;
        }
        println!("attempt {attempt}: not everything shown yet: {seen:?}");
    }
    assert_eq!(seen.status, "live", "the page connected and subscribed:\n{}", last.stdout);

    // Three nodes, by id and name, all alive, and exactly the mesh's links.
    let names: BTreeMap<String, (String, String)> =
        mesh.nodes.iter().map(|n| (n.id().to_owned(), (n.name().to_owned(), "alive".to_owned()))).collect();
    assert_eq!(seen.nodes, names, "the graph shows the three nodes");
    assert!(expected_links.len() >= 2, "three connected nodes have at least two links: {expected_links:?}");
    assert_eq!(seen.links, expected_links, "the graph shows the mesh's links");

    // Each node's card lists its gears (with the node's own `pipelines` gear).
    let gears = |list: &[&str]| list.iter().map(|g| (*g).to_owned()).collect::<BTreeSet<_>>();
    assert_eq!(
        seen.cards.get(&ids[0]),
        Some(&gears(&["echo", "kv", "pipelines", "products", "users"])),
        "{:?}",
        seen.cards
    );
    assert_eq!(seen.cards.get(&ids[1]), Some(&gears(&["audit", "billing", "pipelines"])), "{:?}", seen.cards);
    assert_eq!(seen.cards.get(&ids[2]), Some(&gears(&["orders", "pipelines"])), "{:?}", seen.cards);

    // Calls flow: orders on demo-3 calls users on demo-1; mallory's orders are refused.
    assert!(
        seen.flows.contains(&format!("{}|{}", ids[2], ids[0])),
        "after {ATTEMPTS} loads the graph shows no calls from demo-3 to demo-1: {:?}",
        seen.flows
    );
    assert!(seen.errors_listed > 0, "after {ATTEMPTS} loads the page lists no failed calls");

    // A screenshot for people (not checked): cargo's temporary directory, not git.
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _old = std::fs::remove_file(&shot);
    let run = run_chromium(&bin, &[format!("--screenshot={}", shot.display())], &url).await;
    let errors = console_errors(&run.stderr);
    assert!(errors.is_empty(), "console errors in the page:\n{}", errors.join("\n"));
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "chromium wrote a screenshot to {} ({size} bytes)", shot.display());
    println!("dashboard screenshot: {}", shot.display());

    stop.cancel();
    traffic.await.expect("traffic task");
    for n in mesh.nodes {
        n.shutdown().await;
    }
}

/// The page as a user drives it: the call form calls a port and shows the result, a port's error
/// with its code, and JSON it cannot parse; clicking a gear fills the form; a refused token
/// brings the token prompt back and is forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_call_form_works_and_a_refused_token_brings_the_prompt() {
    let Some(bin) = chromium() else {
        println!(
            "SKIP: chromium is not installed (apt-get install -y chromium); set GEARMESH_REQUIRE_CHROMIUM=1 to fail"
        );
        return;
    };
    let mesh = mesh().await;
    let stop = CancellationToken::new();
    let traffic = mesh.traffic(stop.clone());
    let (browser, mut tab) = devtools(&bin).await;
    let base = format!("{}/", mesh.nodes[0].url());
    tab.navigate(&format!("{base}#token={}", mesh.token())).await;
    tab.wait_for(
        "the page is live and shows three nodes",
        "document.getElementById('conn-status').dataset.status === 'live' \
         && document.querySelectorAll('#nodes .node').length === 3",
    )
    .await;
    tab.wait_for(
        "the attached node's links say their transport",
        "document.querySelector('#links .link[data-transport=\"wss\"], #links .link[data-transport=\"quic\"]') !== null",
    )
    .await;
    assert_eq!(tab.eval("location.hash").await, json!(""), "the token left the address bar");
    assert_eq!(tab.eval("sessionStorage.getItem('gearmesh.token') !== null").await, json!(true));

    let result = "document.getElementById('call-result')";
    submit(&mut tab, "echo", "echo", r#"{"hello": "dashboard"}"#).await;
    tab.wait_for("echo's result shows", &format!("{result}.dataset.outcome === 'ok'")).await;
    let text = tab.eval(&format!("{result}.textContent")).await;
    assert!(text.as_str().is_some_and(|t| t.contains(r#""hello": "dashboard""#)), "{text}");

    // orders runs on demo-3; billing (demo-2) refuses mallory and orders returns its error.
    submit(&mut tab, "orders", "place", r#"{"user_id": "mallory", "product_id": "widget", "qty": 1}"#).await;
    tab.wait_for("the refusal shows", &format!("{result}.dataset.outcome === 'error'")).await;
    let text = tab.eval(&format!("{result}.textContent")).await;
    assert!(text.as_str().is_some_and(|t| t.contains("app") && t.contains("insufficient_funds")), "{text}");

    submit(&mut tab, "echo", "echo", "{not json").await;
    tab.wait_for("the page refuses the argument", &format!("{result}.dataset.outcome === 'invalid'")).await;

    tab.eval("document.querySelector('#node-list .gear[data-gear=\"orders\"]').click()").await;
    assert_eq!(tab.eval("document.getElementById('call-gear').value").await, json!("orders"));
    // The form takes the gear's first port.
    let port = tab.eval("document.getElementById('call-port').value").await;
    assert!(["confirm", "place"].iter().any(|p| port == json!(p)), "a port of orders: {port}");

    // Failed calls of the traffic are listed; then a screenshot of the page after real seconds.
    tab.wait_for("a failed call is listed", "document.querySelectorAll('#error-list li').length > 0").await;
    tab.wait_for("mesh rates are measured", "!document.getElementById('summary').textContent.includes('measuring')")
        .await;
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-live.png");
    tab.screenshot(&shot).await;
    println!("dashboard screenshot after use: {}", shot.display());
    assert_eq!(tab.eval("document.getElementById('page-errors').dataset.count").await, json!("0"));
    let problems = tab.problems();
    assert!(problems.is_empty(), "the page had problems:\n{}", problems.join("\n"));

    // A token the node refuses: the prompt comes back and the token is forgotten.
    tab.navigate("about:blank").await;
    tab.navigate(&format!("{base}#token=not-a-token")).await;
    tab.wait_for(
        "the page asks for a token",
        "document.getElementById('conn-status').dataset.status === 'needs-token' \
         && !document.getElementById('token-dialog').hidden",
    )
    .await;
    let reason = tab.eval("document.getElementById('token-reason').textContent").await;
    assert!(reason.as_str().is_some_and(|r| r.contains("refused")), "{reason}");
    assert_eq!(tab.eval("sessionStorage.getItem('gearmesh.token')").await, Value::Null, "the refused token is gone");
    tab.screenshot(&PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-token.png")).await;

    drop(browser);
    stop.cancel();
    traffic.await.expect("traffic task");
    for n in mesh.nodes {
        n.shutdown().await;
    }
}

/// A page that falls behind its node's buffer is told `lagged`, redraws from the fresh snapshot
/// and stays live; when its node goes away it says so and retries with backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_page_resyncs_and_a_lost_node_is_retried() {
    let Some(bin) = chromium() else {
        println!(
            "SKIP: chromium is not installed (apt-get install -y chromium); set GEARMESH_REQUIRE_CHROMIUM=1 to fail"
        );
        return;
    };
    // A ring of two messages: the traces and stats of a busy mesh overrun it.
    let mesh = mesh_with(3, |c| c.interface.buffer = 2).await;
    let stop = CancellationToken::new();
    let traffic = mesh.traffic(stop.clone());
    let (browser, mut tab) = devtools(&bin).await;
    tab.navigate(&format!("{}/#token={}", mesh.nodes[0].url(), mesh.token())).await;
    tab.wait_for(
        "the page resynced after lagging",
        "document.getElementById('conn-detail').textContent.includes('resynced after dropping')",
    )
    .await;
    tab.wait_for(
        "the page is live with the three nodes after resyncing",
        "document.getElementById('conn-status').dataset.status === 'live' \
         && document.querySelectorAll('#nodes .node[data-state=\"alive\"]').length === 3",
    )
    .await;

    stop.cancel();
    traffic.await.expect("traffic task");
    let mut nodes = mesh.nodes.into_iter();
    let first = nodes.next().expect("three nodes");
    first.shutdown().await;
    tab.wait_for(
        "the page says it is reconnecting",
        "document.getElementById('conn-status').dataset.status === 'reconnecting' \
         && document.getElementById('conn-detail').textContent.includes('retrying in')",
    )
    .await;
    assert_eq!(tab.eval("document.getElementById('page-errors').dataset.count").await, json!("0"));
    drop(browser);
    for n in nodes {
        n.shutdown().await;
    }
}

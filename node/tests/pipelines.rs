//! Pipelines over HTTP on real nodes: the shop's `order` pipeline (success, and `mallory` with
//! the reservation released), a failure inside compensation, parallel steps, conditions,
//! validation errors, `cast` runs and their status, and a pipeline whose steps span two nodes.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use gearmesh::{
    Node, NodeConfig, RunningNode,
    gears::{CallError, Ctx, Gear, Principal},
    pipeline::{PipelineEvent, RunStatus},
};
use serde_json::{Value, json};
use tokio::{sync::Barrier, time::Instant};

mod common;

async fn node(dir: &Path, name: &str, builtin: &[&str], extra: Vec<Gear>, seeds: Vec<String>) -> RunningNode {
    common::in_process_node(dir, name, builtin, extra, seeds, |_| {}).await
}

async fn post(c: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let r = c.post(url).json(&body).send().await.expect("sent");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The stock left of a product: reserve one and put it back.
async fn stock(n: &RunningNode, product: &str) -> u64 {
    let ctx = n.ctx(Principal::anonymous());
    let r: Value = ctx.call("products", "reserve", &json!({"product_id": product, "qty": 1})).await.expect("reserve");
    let _: Value = ctx.call("products", "release", &json!({"product_id": product, "qty": 1})).await.expect("release");
    r["remaining"].as_u64().expect("remaining") + 1
}

#[tokio::test]
async fn the_order_pipeline_charges_alice_and_releases_mallorys_reservation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = node(dir.path(), "shop", &["shop"], vec![], vec![]).await;
    let http = common::client_trusting(n.dev_ca_cert().expect("dev CA"));
    let mut events = n.pipelines().subscribe();

    let listed: Value =
        http.get(format!("{}/v1/pipelines", n.url())).send().await.expect("sent").json().await.expect("json");
    assert_eq!(listed["pipelines"][0]["name"], "order", "{listed}");

    let before = stock(&n, "gadget").await;
    let (status, run) = post(
        &http,
        format!("{}/v1/pipelines/order/call", n.url()),
        json!({"user_id": "alice", "product_id": "gadget", "qty": 2}),
    )
    .await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["status"], "completed");
    assert_eq!(run["event"]["order"]["cents"], 2 * 1999, "{run}");
    assert_eq!(run["event"]["order"]["user"]["id"], "alice");
    assert!(run["event"]["receipt"]["charge_id"].is_string());
    assert_eq!(stock(&n, "gadget").await, before - 2, "alice's gadgets are gone");

    // mallory cannot pay: the charge fails, the reservation is released.
    let before = stock(&n, "gadget").await;
    let (status, body) = post(
        &http,
        format!("{}/v1/pipelines/order/call", n.url()),
        json!({"user_id": "mallory", "product_id": "gadget", "qty": 3}),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["app_code"], "insufficient_funds");
    let run = &body["run"];
    assert_eq!(run["status"], "failed");
    assert_eq!(run["failed_step"], "charge");
    assert_eq!(run["compensation"], "completed");
    let steps: Vec<(&str, &str)> = run["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| (s["name"].as_str().expect("name"), s["status"].as_str().expect("status")))
        .collect();
    assert_eq!(steps, [("user", "ok"), ("reserve", "undone"), ("charge", "failed"), ("confirm", "pending")]);
    assert_eq!(stock(&n, "gadget").await, before, "the reservation was released");

    // Both runs were announced, start and end.
    let mut seen: Vec<PipelineEvent> = Vec::new();
    while let Ok(ev) = events.try_recv() {
        seen.push(ev);
    }
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert_eq!(seen[3].status, RunStatus::Failed);
    assert_eq!(seen[3].failed_step.as_deref(), Some("charge"));
}

/// `steps.work` counts its calls; `steps.boom` always fails; `steps.undo_ok` counts its calls;
/// `steps.undo_broken` always fails; `steps.meet` waits at a two-party barrier.
fn steps_gear(counts: Arc<[AtomicUsize; 3]>, barrier: Arc<Barrier>) -> Gear {
    let (c1, c2) = (counts.clone(), counts);
    Gear::new("steps")
        .port("work", move |_ctx: Ctx, v: Value| {
            c1[0].fetch_add(1, Ordering::Relaxed);
            std::future::ready(Ok(json!({ "worked": v })))
        })
        .port("boom", |_ctx: Ctx, _: Value| std::future::ready(Err::<Value, _>(CallError::app("boom", "injected"))))
        .port("undo_ok", move |_ctx: Ctx, _: Value| {
            c2[1].fetch_add(1, Ordering::Relaxed);
            std::future::ready(Ok(json!(null)))
        })
        .port("undo_broken", |_ctx: Ctx, _: Value| {
            std::future::ready(Err::<Value, _>(CallError::internal("the undo is broken")))
        })
        .port("meet", move |_ctx: Ctx, v: Value| {
            let b = barrier.clone();
            async move {
                b.wait().await;
                Ok(json!({ "met": v }))
            }
        })
}

#[tokio::test]
async fn compensation_failures_parallel_steps_conditions_casts_and_validation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let counts: Arc<[AtomicUsize; 3]> = Arc::new(Default::default());
    let barrier = Arc::new(Barrier::new(2));
    let n = node(dir.path(), "p", &["echo"], vec![steps_gear(counts.clone(), barrier)], vec![]).await;
    let http = common::client_trusting(n.dev_ca_cert().expect("dev CA"));
    let define = |def: Value| {
        let http = http.clone();
        let url = format!("{}/v1/pipelines", n.url());
        async move { post(&http, url, def).await }
    };

    // Failure inside compensation: the last completed step's undo fails (after its retries),
    // the earlier one's still runs, and the report says compensation failed.
    let (status, body) = define(json!({
        "name": "saga",
        "steps": [
            {"name": "one", "call": "steps/work", "input": {"n": 1}, "undo": "steps/undo_ok"},
            {"name": "two", "call": "steps/work", "input": {"n": 2}, "undo": "steps/undo_broken"},
            {"name": "three", "call": "steps/boom"}
        ]
    }))
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = post(&http, format!("{}/v1/pipelines/saga/call", n.url()), json!({})).await;
    assert_eq!(status, 422, "{body}");
    let run = &body["run"];
    assert_eq!(run["failed_step"], "three");
    assert_eq!(run["compensation"], "failed");
    assert_eq!(run["steps"][0]["status"], "undone");
    assert_eq!(run["steps"][1]["status"], "undo_failed");
    assert_eq!(run["steps"][1]["undo_error"]["code"], "internal");
    assert_eq!(counts[1].load(Ordering::Relaxed), 1, "the first step was undone once");

    // Parallel steps: `left` and `right` both start with the run and meet at a barrier (run one
    // after the other they would wait forever: the run's deadline would fail them); `join`
    // waits for both and sees both outputs merged.
    let (status, body) = define(json!({
        "name": "fan",
        "steps": [
            {"name": "left", "call": "steps/meet", "input": "$.x", "output": "l", "after": []},
            {"name": "right", "call": "steps/meet", "input": "$.y", "output": "r", "after": []},
            {"name": "join", "call": "echo/echo", "input": {"both": ["$.l.met", "$.r.met"]}, "output": "j",
             "after": ["left", "right"]},
            {"name": "maybe", "call": "steps/work", "when": "$.vip", "output": "extra"}
        ]
    }))
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, run) =
        post(&http, format!("{}/v1/pipelines/fan/call?timeout_ms=5000", n.url()), json!({"x": 1, "y": 2})).await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["event"]["j"], json!({"both": [1, 2]}));
    assert_eq!(run["steps"][3]["status"], "skipped", "no vip: the conditional step is skipped");
    let worked = counts[0].load(Ordering::Relaxed);
    let (_, run) =
        post(&http, format!("{}/v1/pipelines/fan/call", n.url()), json!({"x": 1, "y": 2, "vip": true})).await;
    assert_eq!(run["steps"][3]["status"], "ok", "{run}");
    assert_eq!(counts[0].load(Ordering::Relaxed), worked + 1);

    // cast: accepted at once, its status found by id.
    let (status, accepted) = post(&http, format!("{}/v1/pipelines/fan/cast", n.url()), json!({"x": 3, "y": 4})).await;
    assert_eq!(status, 202, "{accepted}");
    let url = format!("{}{}", n.url(), accepted["status"].as_str().expect("status url"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let run = loop {
        let r: Value = http.get(&url).send().await.expect("sent").json().await.expect("json");
        if r["status"] != "running" {
            break r;
        }
        assert!(Instant::now() < deadline, "the cast run did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["event"]["j"], json!({"both": [3, 4]}));
    let r = http.get(format!("{}/v1/pipelines/runs/run-0", n.url())).send().await.expect("sent");
    assert_eq!(r.status(), 404);

    // Validation: every problem named, by step; nothing defined.
    let (status, body) = define(json!({
        "name": "broken",
        "steps": [
            {"name": "a", "call": "steps"},
            {"name": "b", "call": "steps/work", "after": ["zzz"], "input": {"v": "$..x"}}
        ]
    }))
    .await;
    assert_eq!(status, 400, "{body}");
    let msg = body["error"]["message"].as_str().expect("message");
    assert!(msg.contains("step 1 (a): call \"steps\" is not gear/port"), "{msg}");
    assert!(msg.contains("step 2 (b): after \"zzz\""), "{msg}");
    assert!(msg.contains("step 2 (b): input"), "{msg}");
    let (status, _) = post(&http, format!("{}/v1/pipelines/broken/call", n.url()), json!({})).await;
    assert_eq!(status, 404, "an invalid pipeline is not defined");
    let r =
        http.post(format!("{}/v1/pipelines", n.url())).body("name = \"t\"\nsteps = 3\n").send().await.expect("sent");
    assert_eq!(r.status(), 400);
    assert!(r.text().await.expect("text").contains("TOML"));
    // TOML definitions work too.
    let toml = "name = \"t\"\n[[steps]]\nname = \"e\"\ncall = \"echo/echo\"\n";
    let r = http.post(format!("{}/v1/pipelines", n.url())).body(toml).send().await.expect("sent");
    assert_eq!(r.status(), 201);
}

#[tokio::test]
async fn pipeline_steps_run_where_their_gears_are() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = node(dir.path(), "a", &["users", "products"], vec![], vec![]).await;
    let seed = a.link_addrs().iter().find(|x| x.starts_with("wss://")).expect("wss").clone();
    let b = node(dir.path(), "b", &["billing", "orders"], vec![], vec![seed]).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !["users", "products", "billing", "orders"]
        .iter()
        .all(|g| a.mesh().view().nodes.iter().any(|n| n.route.is_some() && n.gears.iter().any(|x| x.name == *g)))
    {
        assert!(Instant::now() < deadline, "the mesh did not form");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ctx = a.ctx(Principal::anonymous());
    let run = a
        .pipelines()
        .call(&ctx, "order", json!({"user_id": "bob", "product_id": "widget", "qty": 4}), None)
        .await
        .expect("ran");
    assert_eq!(run.status, RunStatus::Completed, "{run:?}");
    assert_eq!(run.event["order"]["cents"], 1000);
    assert!(b.mesh().stats().calls_received >= 2, "billing and orders ran on b");
}

#[tokio::test]
async fn pipelines_run_with_the_callers_scopes_and_defining_needs_admin() {
    use gearmesh::auth::{Algorithm, AuthConfig, GearPolicy, Issuer, Scopes, TokenRequest, keygen};
    gearmesh::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let generated = keygen(Algorithm::EdDSA).expect("keygen");
    let path = dir.path().join("mesh.key");
    std::fs::write(&path, &generated.contents).expect("write key");
    // The shop's gears may publish their events.
    let mut policy = GearPolicy::new();
    policy.grant("billing", &Scopes::parse_strict("publish:billing.charged").expect("scopes"));
    policy.grant("orders", &Scopes::parse_strict("publish:orders.placed").expect("scopes"));
    let auth = AuthConfig { keys: vec![path], audience: Some("mesh-p".into()), gears: policy, ..AuthConfig::default() };
    let mut config = NodeConfig { gears: vec!["shop".into()], ..NodeConfig::default() };
    config.tls.data_dir = Some(dir.path().to_owned());
    let n = Node::builder()
        .config(config)
        .listen("127.0.0.1:0".parse().expect("addr"))
        .auth(auth)
        .build()
        .expect("valid")
        .start()
        .await
        .expect("started");
    let token = |scopes: &str| {
        let req = TokenRequest::new("alice", Scopes::parse_strict(scopes).expect("scopes"), Duration::from_secs(600))
            .audience("mesh-p");
        Issuer::new(generated.key.clone()).issue(&req).expect("issue")
    };
    let http = common::client_trusting(n.dev_ca_cert().expect("dev CA"));
    let order = json!({"user_id": "alice", "product_id": "widget", "qty": 1});
    let run = |t: Option<String>| {
        let mut req = http.post(format!("{}/v1/pipelines/order/call", n.url())).json(&order);
        if let Some(t) = t {
            req = req.bearer_auth(t);
        }
        async move {
            let r = req.send().await.expect("sent");
            (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };

    let (status, _) = run(None).await;
    assert_eq!(status, 401, "a token is needed");
    // Allowed the first step only: the run stops at the second, as forbidden.
    let (status, body) = run(Some(token("call:users/find"))).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["run"]["failed_step"], "reserve");
    // Allowed every step (and the undo): it completes.
    let (status, body) =
        run(Some(token("call:users/find call:products/* call:billing/charge call:orders/confirm"))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "completed");

    // Listing needs observe; defining needs admin.
    let def = json!({"name": "x", "steps": [{"name": "a", "call": "users/find"}]});
    let observe = token("observe");
    let r = http.get(format!("{}/v1/pipelines", n.url())).bearer_auth(&observe).send().await.expect("sent");
    assert_eq!(r.status(), 200);
    let r =
        http.get(format!("{}/v1/pipelines", n.url())).bearer_auth(token("call:users/find")).send().await.expect("sent");
    assert_eq!(r.status(), 403, "listing needs observe");
    let r = http.post(format!("{}/v1/pipelines", n.url())).bearer_auth(&observe).json(&def).send().await.expect("sent");
    assert_eq!(r.status(), 403);
    let r = http
        .post(format!("{}/v1/pipelines", n.url()))
        .bearer_auth(token("admin"))
        .json(&def)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 201);
}

/// A gear runs a pipeline with an ordinary call to the node's `pipelines` gear; the steps run
/// with the calling gear's own permissions, so the `pipelines` gear launders nothing.
#[tokio::test]
async fn a_gear_runs_a_pipeline_through_ctx_with_its_own_permissions() {
    gearmesh::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let key = gearmesh::auth::keygen(gearmesh::auth::Algorithm::HS256).expect("keygen");
    let key_path = dir.path().join("mesh.key");
    std::fs::write(&key_path, &key.contents).expect("write key");
    let policy = r#"
[auth.gears]
checkout = ["call:pipelines/call", "call:users/find", "call:products/*", "call:billing/charge", "call:orders/confirm"]
sneaky = ["call:pipelines/call"]
billing = ["publish:billing.charged"]
orders = ["publish:orders.placed"]
"#;
    let mut config = NodeConfig::from_toml(policy).expect("policy");
    config.name = Some("shop".into());
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.gears = vec!["shop".into()];
    config.auth.keys = vec![key_path];
    config.tls.data_dir = Some(dir.path().to_owned());
    let buy = |name: &'static str| {
        Gear::new(name).port("buy", |ctx: Ctx, order: Value| async move {
            let report: Value = ctx.call("pipelines", "call", &json!({"pipeline": "order", "event": order})).await?;
            Ok(report)
        })
    };
    let n = Node::builder()
        .config(config)
        .gear(buy("checkout"))
        .gear(buy("sneaky"))
        .build()
        .expect("valid")
        .start()
        .await
        .expect("started");
    let ctx = n.ctx(Principal::user("tester", vec!["call:*".into()]));

    let report: Value = ctx
        .call("checkout", "buy", &json!({"user_id": "alice", "product_id": "widget", "qty": 1}))
        .await
        .expect("alice's order");
    assert_eq!(report["status"], "completed", "{report}");
    assert_eq!(report["event"]["order"]["user"]["id"], "alice", "{report}");

    let e = ctx
        .call::<_, Value>("checkout", "buy", &json!({"user_id": "mallory", "product_id": "widget", "qty": 1}))
        .await
        .expect_err("mallory cannot pay");
    assert_eq!(e.app_code(), Some("insufficient_funds"), "{e}");
    assert!(e.message().contains("failed at step charge"), "{e}");

    // `sneaky` may call the pipelines gear but none of the steps: the first step is refused.
    let e = ctx
        .call::<_, Value>("sneaky", "buy", &json!({"user_id": "alice", "product_id": "widget", "qty": 1}))
        .await
        .expect_err("no laundering through the pipelines gear");
    assert_eq!(e.code().as_str(), "forbidden", "{e}");
    n.shutdown().await;
}

//! The HTTP API of one node on a real loopback socket: calls, errors, events, limits, shutdown.

use std::{num::NonZeroUsize, time::Duration};

use gearmesh::{
    Node, NodeConfig, RunningNode, builtin,
    gears::{CallError, Ctx, ErrorCode, Gear, PortSpec},
};
use serde_json::{Value, json};

/// A node with TLS off: these tests are about the API's semantics (TLS is tested with the mesh).
async fn start_with(mut config: NodeConfig, extra: Vec<Gear>) -> (RunningNode, String) {
    gearmesh::install_crypto_provider();
    config.tls.mode = gearmesh::TlsMode::Off;
    config.insecure_dev = true;
    let mut b = Node::builder().config(config).listen("127.0.0.1:0".parse().expect("addr")).insecure_dev(true);
    for g in extra {
        b = b.gear(g);
    }
    let node = b.build().expect("valid").start().await.expect("started");
    let url = node.url();
    (node, url)
}

async fn start() -> (RunningNode, String) {
    start_with(NodeConfig { gears: vec!["all".into()], ..NodeConfig::default() }, vec![]).await
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post(url: &str, body: &str) -> (u16, Value) {
    let r =
        client().post(url).header("content-type", "application/json").body(body.to_owned()).send().await.expect("sent");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[tokio::test]
async fn a_local_call_returns_the_ports_json_with_ids() {
    let (node, url) = start().await;
    let r = client()
        .post(format!("{url}/v1/call/echo/echo"))
        .header("x-request-id", "req-123")
        .header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        .json(&json!({"hello": "mesh"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "req-123");
    assert_eq!(r.headers()["x-trace-id"], "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(r.json::<Value>().await.expect("json"), json!({"hello": "mesh"}));
    // Without a request id, the node makes one.
    let r = client().post(format!("{url}/v1/call/echo/echo")).body("1").send().await.expect("sent");
    assert!(!r.headers()["x-request-id"].is_empty());
    node.shutdown().await;
}

#[tokio::test]
async fn one_gear_calls_others_and_their_events_reach_listeners() {
    let (node, url) = start().await;
    let (s, order) =
        post(&format!("{url}/v1/call/orders/place"), r#"{"user_id":"alice","product_id":"gadget","qty":2}"#).await;
    assert_eq!(s, 200, "{order}");
    assert_eq!(order["user"]["name"], "Alice Liddell");
    assert_eq!(order["cents"], 2 * 1999);
    // billing.charge published billing.charged and orders.place published orders.placed; audit saw both.
    let mut recent = Value::Null;
    for _ in 0..100 {
        recent = post(&format!("{url}/v1/call/audit/recent"), "").await.1;
        if recent.as_array().is_some_and(|a| a.len() == 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let topics: Vec<&str> = recent.as_array().expect("list").iter().filter_map(|e| e["topic"].as_str()).collect();
    assert_eq!(topics, vec!["billing.charged", "orders.placed"]);
    assert_eq!(recent[1]["event"]["order_id"], order["order_id"]);
    // A refused charge releases the reservation: stock is back where it was.
    let (s, e) =
        post(&format!("{url}/v1/call/orders/place"), r#"{"user_id":"mallory","product_id":"gadget","qty":8}"#).await;
    assert_eq!(s, 422);
    assert_eq!(e["error"]["app_code"], "insufficient_funds");
    let (s, stock) = post(&format!("{url}/v1/call/products/reserve"), r#"{"product_id":"gadget","qty":8}"#).await;
    assert_eq!(s, 200, "the 8 mallory could not pay for were released: {stock}");
    assert_eq!(stock["remaining"], 0);
    node.shutdown().await;
}

#[tokio::test]
async fn published_events_reach_local_listeners() {
    let (node, url) = start().await;
    let r = client()
        .post(format!("{url}/v1/events/orders.placed"))
        .json(&json!({"order_id": "from-http"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 202);
    let mut seen = false;
    for _ in 0..100 {
        let recent = post(&format!("{url}/v1/call/audit/recent"), "").await.1;
        if recent.as_array().is_some_and(|a| a.iter().any(|e| e["event"]["order_id"] == "from-http")) {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen, "audit saw the published event");
    let (s, e) = post(&format!("{url}/v1/events/bad%20topic"), "{}").await;
    assert_eq!((s, e["error"]["code"].as_str()), (400, Some("bad_request")));
    node.shutdown().await;
}

#[tokio::test]
async fn every_error_code_has_its_status_and_shape() {
    let (node, url) = start().await;
    let cases = [
        ("not_found", 404),
        ("bad_request", 400),
        ("timeout", 504),
        ("unavailable", 503),
        ("overloaded", 429),
        ("unauthorized", 401),
        ("forbidden", 403),
        ("internal", 500),
        ("no_such_widget", 422),
    ];
    for (code, status) in cases {
        let (s, body) =
            post(&format!("{url}/v1/call/echo/fail"), &json!({"code": code, "message": "m"}).to_string()).await;
        assert_eq!(s, status, "{code}: {body}");
        let err = &body["error"];
        assert_eq!(err["message"], "m");
        if status == 422 {
            assert_eq!((err["code"].as_str(), err["app_code"].as_str()), (Some("app"), Some(code)));
        } else {
            assert_eq!(err["code"], code);
        }
    }
    node.shutdown().await;
}

#[tokio::test]
async fn unknown_targets_and_bad_input_are_clear_errors() {
    let (node, url) = start().await;
    let (s, e) = post(&format!("{url}/v1/call/nope/echo"), "{}").await;
    assert_eq!((s, e["error"]["code"].as_str()), (404, Some("not_found")));
    let (s, e) = post(&format!("{url}/v1/call/echo/nope"), "{}").await;
    assert_eq!((s, e["error"]["code"].as_str()), (404, Some("not_found")));
    let (s, e) = post(&format!("{url}/v1/call/echo/echo"), "{not json").await;
    assert_eq!((s, e["error"]["code"].as_str()), (400, Some("bad_request")));
    assert!(e["error"]["message"].as_str().is_some_and(|m| m.contains("malformed JSON")));
    let (s, e) = post(&format!("{url}/v1/call/echo/sleep"), r#"{"ms":"soon"}"#).await;
    assert_eq!((s, e["error"]["code"].as_str()), (400, Some("bad_request")));
    let (s, e) = post(&format!("{url}/v1/call/echo/echo?timeout_ms=abc"), "1").await;
    assert_eq!((s, e["error"]["code"].as_str()), (400, Some("bad_request")));
    let (s, e) = post(&format!("{url}/v1/nowhere"), "1").await;
    assert_eq!((s, e["error"]["code"].as_str()), (404, Some("not_found")));
    let r = client().get(format!("{url}/v1/call/echo/echo")).send().await.expect("sent");
    assert_eq!(r.status(), 405);
    node.shutdown().await;
}

#[tokio::test]
async fn an_oversized_body_gets_413_and_the_node_keeps_serving() {
    let config = NodeConfig {
        gears: vec!["echo".into()],
        http: gearmesh::HttpConfig { max_body_bytes: 1024, ..Default::default() },
        ..NodeConfig::default()
    };
    let (node, url) = start_with(config, vec![]).await;
    let big = format!("\"{}\"", "x".repeat(4096));
    let (s, e) = post(&format!("{url}/v1/call/echo/echo"), &big).await;
    assert_eq!((s, e["error"]["code"].as_str()), (413, Some("bad_request")));
    let (s, _) = post(&format!("{url}/v1/call/echo/echo"), "\"small\"").await;
    assert_eq!(s, 200);
    node.shutdown().await;
}

#[tokio::test]
async fn a_call_past_its_deadline_gets_504_timeout() {
    let (node, url) = start().await;
    let (s, e) = post(&format!("{url}/v1/call/echo/sleep?timeout_ms=50"), r#"{"ms":10000}"#).await;
    assert_eq!((s, e["error"]["code"].as_str()), (504, Some("timeout")));
    let (s, e) = post(&format!("{url}/v1/call/echo/sleep?timeout_ms=0"), r#"{"ms":1}"#).await;
    assert_eq!((s, e["error"]["code"].as_str()), (400, Some("bad_request")));
    let (s, e) = post(&format!("{url}/v1/call/echo/sleep?per_try_timeout_ms=0"), r#"{"ms":1}"#).await;
    assert_eq!((s, e["error"]["code"].as_str()), (400, Some("bad_request")), "{e}");
    // The query is read: a valid per-try timeout is taken (the local replica runs the call).
    let (s, _) = post(&format!("{url}/v1/call/echo/sleep?per_try_timeout_ms=1000"), r#"{"ms":1}"#).await;
    assert_eq!(s, 200);
    node.shutdown().await;
}

#[tokio::test]
async fn past_a_ports_concurrency_limit_callers_get_429_overloaded() {
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let narrow = Gear::new("narrow").port_with(
        PortSpec::new("hold").max_concurrency(NonZeroUsize::MIN),
        move |_ctx: Ctx, _: Value| {
            let g = g.clone();
            async move {
                let _permit = g.acquire().await.map_err(|_| CallError::internal("closed"))?;
                Ok("released")
            }
        },
    );
    let (node, url) = start_with(NodeConfig::default(), vec![narrow]).await;
    let u = url.clone();
    let first = tokio::spawn(async move { post(&format!("{u}/v1/call/narrow/hold"), "null").await });
    while node.host().in_flight() == 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (s, e) = post(&format!("{url}/v1/call/narrow/hold"), "null").await;
    assert_eq!((s, e["error"]["code"].as_str()), (429, Some("overloaded")));
    gate.add_permits(1);
    assert_eq!(first.await.expect("join"), (200, json!("released")));
    node.shutdown().await;
}

#[tokio::test]
async fn a_panicking_port_gets_500_and_other_calls_go_on() {
    let (node, url) = start().await;
    let (s, e) = post(&format!("{url}/v1/call/echo/fail"), r#"{"code":"panic"}"#).await;
    assert_eq!((s, e["error"]["code"].as_str()), (500, Some("internal")));
    let (s, v) = post(&format!("{url}/v1/call/echo/echo"), "[1,2]").await;
    assert_eq!((s, v), (200, json!([1, 2])));
    node.shutdown().await;
}

#[tokio::test]
async fn raw_bytes_pass_through_untouched() {
    let raw = Gear::new("raw").port("rev", |_ctx: Ctx, b: bytes::Bytes| async move {
        Ok(bytes::Bytes::from(b.iter().rev().copied().collect::<Vec<u8>>()))
    });
    let (node, url) = start_with(NodeConfig::default(), vec![raw]).await;
    let r = client()
        .post(format!("{url}/v1/call/raw/rev"))
        .header("content-type", "application/octet-stream")
        .body(vec![0u8, 1, 255])
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    assert_eq!(r.bytes().await.expect("body").to_vec(), vec![255u8, 1, 0]);
    node.shutdown().await;
}

#[tokio::test]
async fn node_gears_health_and_metrics_describe_the_node() {
    let (node, url) = start().await;
    let _ = post(&format!("{url}/v1/call/echo/echo"), "1").await;
    let _ = post(&format!("{url}/v1/call/echo/fail"), r#"{"code":"timeout"}"#).await;
    let info: Value = client().get(format!("{url}/v1/node")).send().await.expect("sent").json().await.expect("json");
    assert_eq!(info["id"], node.id());
    assert_eq!(info["addresses"][0], url);
    assert!(info["uptime_s"].as_f64().is_some());
    let gears: Value = client().get(format!("{url}/v1/gears")).send().await.expect("sent").json().await.expect("json");
    let echo = gears["gears"].as_array().expect("list").iter().find(|g| g["name"] == "echo").expect("echo listed");
    let ports: Vec<&str> = echo["ports"].as_array().expect("ports").iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(ports, vec!["echo", "sleep", "fail"]);
    assert_eq!(echo["ports"][0]["idempotent"], true);
    for path in ["/healthz", "/readyz"] {
        assert_eq!(client().get(format!("{url}{path}")).send().await.expect("sent").status(), 200, "{path}");
    }
    let metrics = client().get(format!("{url}/metrics")).send().await.expect("sent").text().await.expect("text");
    assert!(metrics.contains(r#"gearmesh_calls_total{gear="echo",port="echo"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"gearmesh_call_errors_total{gear="echo",port="fail",code="timeout"} 1"#));
    assert!(metrics.contains("gearmesh_call_duration_seconds_bucket"));
    assert!(metrics.contains("gearmesh_calls_in_flight"));
    node.shutdown().await;
}

#[tokio::test]
async fn shutdown_lets_calls_in_flight_finish() {
    let (node, url) = start().await;
    let u = url.clone();
    let in_flight = tokio::spawn(async move { post(&format!("{u}/v1/call/echo/sleep"), r#"{"ms":300}"#).await });
    while node.host().in_flight() == 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    node.shutdown().await;
    assert_eq!(in_flight.await.expect("join"), (200, json!({"slept_ms": 300})));
    // And the port is closed now.
    assert!(client().get(format!("{url}/healthz")).send().await.is_err());
}

#[test]
fn building_without_auth_or_insecure_dev_is_refused() {
    let e = Node::builder().build().expect_err("secure by default");
    assert!(e.to_string().contains("--insecure-dev"), "{e}");
    let e = Node::builder()
        .insecure_dev(true)
        .config(NodeConfig { gears: vec!["nope".into()], insecure_dev: true, ..NodeConfig::default() })
        .build()
        .expect_err("unknown gear");
    assert!(e.to_string().contains("nope"), "{e}");
    let e = Node::builder().insecure_dev(true).gear(builtin::echo()).gear(builtin::echo()).build().expect_err("twice");
    assert!(e.to_string().contains("echo"), "{e}");
}

#[tokio::test]
async fn ctx_calls_from_the_embedding_application_use_the_same_dispatch() {
    let (node, _url) = start().await;
    let ctx = node.ctx(gearmesh::gears::Principal::user("app", vec![]));
    let user: Value = ctx.call("users", "find", &json!({"id": "bob"})).await.expect("call");
    assert_eq!(user["name"], "Bob Builder");
    let e = ctx.call::<_, Value>("users", "find", &json!({"id": "zed"})).await.expect_err("unknown");
    assert_eq!(e.code(), ErrorCode::NotFound);
    node.shutdown().await;
}

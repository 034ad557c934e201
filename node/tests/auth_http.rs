//! Token authentication on the HTTP API of a real node on a loopback socket: refusals (401 with
//! `WWW-Authenticate`, 403 for a missing scope), scopes per endpoint, open health checks, the
//! caller's identity reaching the port, and `/.well-known/jwks.json`.

mod common;

use std::time::Duration;

use common::dev_ca_client as client;
use gearmesh::{
    Node, NodeConfig, RunningNode,
    auth::{
        Algorithm, AuthConfig, GearPolicy, Issuer, KeyId, KeySet, Scopes, SigningKey, TokenRequest, keygen, unix_now,
    },
    builtin,
    gears::{Ctx, ErrorCode, Gear, Principal},
};
use serde_json::{Value, json};

const AUDIENCE: &str = "mesh-a";

/// A node requiring tokens signed by a fresh key of `alg`, with audience [`AUDIENCE`]; returns the
/// node, its URL and the key (for minting tokens). The tempdir holding the key file lives as long.
struct Secured {
    node: RunningNode,
    url: String,
    key: SigningKey,
    _dir: tempfile::TempDir,
}

/// Every node of these tests gets its certificate from the shared development CA.
fn tls() -> gearmesh::TlsConfig {
    gearmesh::TlsConfig { data_dir: Some(common::data_dir()), ..gearmesh::TlsConfig::default() }
}

async fn start(alg: Algorithm) -> Secured {
    start_with(alg, &["echo", "audit"], GearPolicy::new()).await
}

async fn start_with(alg: Algorithm, gears: &[&str], policy: GearPolicy) -> Secured {
    gearmesh::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let generated = keygen(alg).expect("keygen");
    let path = dir.path().join("mesh.key");
    std::fs::write(&path, &generated.contents).expect("write key");
    let auth = AuthConfig { keys: vec![path], audience: Some(AUDIENCE.into()), gears: policy, ..AuthConfig::default() };
    let whoami = Gear::new("who").port("ami", |ctx: Ctx, _: Value| async move {
        let caller = ctx.caller();
        Ok(json!({ "caller": caller.to_string(), "scopes": caller.scopes() }))
    });
    let node = Node::builder()
        .config(NodeConfig { gears: gears.iter().map(|g| (*g).to_owned()).collect(), ..NodeConfig::default() })
        .tls(tls())
        .listen("127.0.0.1:0".parse().expect("addr"))
        .auth(auth)
        .gear(whoami)
        .build()
        .expect("valid")
        .start()
        .await
        .expect("started");
    let url = node.url();
    Secured { node, url, key: generated.key, _dir: dir }
}

fn token(key: &SigningKey, scopes: &str) -> String {
    let req = TokenRequest::new("alice", Scopes::parse_strict(scopes).expect("scopes"), Duration::from_secs(600))
        .audience(AUDIENCE);
    Issuer::new(key.clone()).issue(&req).expect("issue")
}

/// A response's status, `WWW-Authenticate` and JSON body.
struct Reply {
    status: u16,
    www: Option<String>,
    body: Value,
}

async fn send(req: reqwest::RequestBuilder) -> Reply {
    let r = req.send().await.expect("sent");
    let status = r.status().as_u16();
    let www = r.headers().get("www-authenticate").map(|v| v.to_str().expect("ascii").to_owned());
    let text = r.text().await.expect("body");
    Reply { status, www, body: serde_json::from_str(&text).unwrap_or(Value::String(text)) }
}

async fn call(url: &str, bearer: Option<&str>) -> Reply {
    let mut req = client().post(format!("{url}/v1/call/echo/echo")).json(&json!({"hi": 1}));
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    send(req).await
}

fn assert_unauthorized(r: &Reply, needle: &str) {
    assert_eq!(r.status, 401, "{:?}", r.body);
    assert_eq!(r.body["error"]["code"], "unauthorized", "{:?}", r.body);
    let message = r.body["error"]["message"].as_str().expect("message");
    assert!(message.contains(needle), "{message:?} should mention {needle:?}");
    let www = r.www.as_deref().expect("WWW-Authenticate");
    assert!(www.starts_with("Bearer error=\"invalid_token\""), "{www}");
}

#[tokio::test]
async fn bad_tokens_get_401_with_www_authenticate() {
    let s = start(Algorithm::EdDSA).await;
    // No token: 401 with a bare challenge (RFC 6750 3.1).
    let r = call(&s.url, None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.www.as_deref(), Some("Bearer"));
    assert_eq!(r.body["error"]["code"], "unauthorized");
    // Another scheme, and garbage.
    let r = send(client().post(format!("{}/v1/call/echo/echo", s.url)).basic_auth("a", Some("b"))).await;
    assert_unauthorized(&r, "Bearer");
    assert_unauthorized(&call(&s.url, Some("not-a-jwt")).await, "malformed");

    let good = token(&s.key, "call:echo/*");
    // A damaged signature.
    let mut bad_sig = good.clone();
    let last = bad_sig.pop().expect("non-empty");
    bad_sig.push(if last == 'A' { 'B' } else { 'A' });
    assert_unauthorized(&call(&s.url, Some(&bad_sig)).await, "signature");
    // Another key claiming the node's kid.
    let other = keygen(Algorithm::EdDSA).expect("keygen").key.with_kid(KeyId::new(s.key.kid().as_str()));
    assert_unauthorized(&call(&s.url, Some(&token(&other, "call:*"))).await, "signature");
    // Expired (beyond the leeway).
    let req = TokenRequest::new("alice", Scopes::parse("call:*"), Duration::from_secs(60)).audience(AUDIENCE);
    let expired = Issuer::new(s.key.clone()).issue_at(&req, unix_now() - 3600).expect("issue");
    assert_unauthorized(&call(&s.url, Some(&expired)).await, "expired");
    // Wrong audience, and none.
    let req = TokenRequest::new("alice", Scopes::parse("call:*"), Duration::from_secs(60)).audience("mesh-b");
    let wrong_aud = Issuer::new(s.key.clone()).issue(&req).expect("issue");
    assert_unauthorized(&call(&s.url, Some(&wrong_aud)).await, "audience");
    let req = TokenRequest::new("alice", Scopes::parse("call:*"), Duration::from_secs(60));
    let no_aud = Issuer::new(s.key.clone()).issue(&req).expect("issue");
    assert_unauthorized(&call(&s.url, Some(&no_aud)).await, "aud");
    // alg: none.
    let none_token = {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let claims = json!({"sub": "mallory", "exp": unix_now() + 600, "aud": AUDIENCE, "scope": "call:*"});
        format!("{}.{}.", b64.encode(br#"{"alg":"none"}"#), b64.encode(claims.to_string()))
    };
    let r = call(&s.url, Some(&none_token)).await;
    assert_eq!(r.status, 401, "{:?}", r.body);

    // The good token passes; no refusal ever shows the token.
    let r = call(&s.url, Some(&good)).await;
    assert_eq!((r.status, r.body), (200, json!({"hi": 1})));
    s.node.shutdown().await;
}

#[tokio::test]
async fn a_valid_token_without_the_scope_gets_403_and_with_it_200() {
    let s = start(Algorithm::ES256).await;
    let r = call(&s.url, Some(&token(&s.key, "call:echo/sleep call:kv observe"))).await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert_eq!(r.body["error"]["code"], "forbidden");
    assert!(r.body["error"]["message"].as_str().expect("message").contains("call:echo/echo"), "{:?}", r.body);
    let www = r.www.expect("WWW-Authenticate");
    assert!(www.contains("error=\"insufficient_scope\"") && www.contains("scope=\"call:echo/echo\""), "{www}");
    for scopes in ["call:echo/echo", "call:echo", "call:*", "call:ec*"] {
        let r = call(&s.url, Some(&token(&s.key, scopes))).await;
        assert_eq!(r.status, 200, "{scopes}: {:?}", r.body);
    }
    s.node.shutdown().await;
}

#[tokio::test]
async fn the_tokens_subject_and_scopes_reach_the_port() {
    let s = start(Algorithm::HS256).await;
    let t = token(&s.key, "call:who/ami observe");
    let r = send(client().post(format!("{}/v1/call/who/ami", s.url)).bearer_auth(&t)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body, json!({"caller": "user:alice", "scopes": ["call:who/ami", "observe"]}));
    s.node.shutdown().await;
}

#[tokio::test]
async fn each_endpoint_needs_its_scope_and_health_checks_are_open() {
    let s = start(Algorithm::EdDSA).await;
    let client = client();
    let observe = token(&s.key, "observe");
    let caller = token(&s.key, "call:* publish:*");
    for path in ["/v1/node", "/v1/gears", "/metrics"] {
        let r = send(client.get(format!("{}{path}", s.url))).await;
        assert_eq!(r.status, 401, "{path}");
        let r = send(client.get(format!("{}{path}", s.url)).bearer_auth(&caller)).await;
        assert_eq!(r.status, 403, "{path}: call and publish scopes do not grant observe");
        let r = send(client.get(format!("{}{path}", s.url)).bearer_auth(&observe)).await;
        assert_eq!(r.status, 200, "{path}: {:?}", r.body);
    }
    let r = send(client.get(format!("{}/v1/node", s.url)).bearer_auth(&observe)).await;
    assert_eq!(r.body["insecure_dev"], false);
    for path in ["/healthz", "/readyz"] {
        let r = send(client.get(format!("{}{path}", s.url))).await;
        assert_eq!(r.status, 200, "{path} is open");
    }
    // Unknown routes and wrong methods answer as without auth.
    assert_eq!(send(client.get(format!("{}/nope", s.url))).await.status, 404);
    assert_eq!(send(client.delete(format!("{}/v1/node", s.url))).await.status, 405);

    // Events: publish:<topic>.
    let orders = token(&s.key, "publish:orders.*");
    let publish = |topic: &str, t: Option<&str>| {
        let mut req = client.post(format!("{}/v1/events/{topic}", s.url)).json(&json!({"id": 1}));
        if let Some(t) = t {
            req = req.bearer_auth(t);
        }
        send(req)
    };
    assert_eq!(publish("orders.placed", None).await.status, 401);
    assert_eq!(publish("orders.placed", Some(&orders)).await.status, 202);
    let r = publish("billing.charged", Some(&orders)).await;
    assert_eq!(r.status, 403);
    assert!(r.www.expect("challenge").contains("scope=\"publish:billing.charged\""));
    assert_eq!(publish("orders.placed", Some(&observe)).await.status, 403);
    s.node.shutdown().await;
}

#[tokio::test]
async fn tokens_in_the_url_query_are_refused() {
    let s = start(Algorithm::EdDSA).await;
    let good = token(&s.key, "call:* observe");
    let client = client();
    for query in ["access_token=x", "token=x", "timeout_ms=100&jwt=x", "Bearer"] {
        // Even with a valid header: the URL with a credential in it is refused as a whole.
        let url = format!("{}/v1/call/echo/echo?{query}", s.url);
        let r = send(client.post(url).bearer_auth(&good).json(&1)).await;
        assert_unauthorized(&r, "query");
    }
    let r = send(client.get(format!("{}/v1/node?access_token={good}", s.url))).await;
    assert_unauthorized(&r, "query");
    assert!(!r.body.to_string().contains(&good), "the token is not echoed");
    // An ordinary query is fine.
    let r = send(client.post(format!("{}/v1/call/echo/echo?timeout_ms=1000", s.url)).bearer_auth(&good).json(&1)).await;
    assert_eq!(r.status, 200);
    s.node.shutdown().await;
}

#[tokio::test]
async fn the_node_publishes_its_public_keys_and_never_a_secret() {
    let client = client();
    let s = start(Algorithm::EdDSA).await;
    let r = send(client.get(format!("{}/.well-known/jwks.json", s.url))).await;
    assert_eq!(r.status, 200, "open, without a token");
    let keys = r.body["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["kid"], s.key.kid().as_str());
    assert_eq!(keys[0]["alg"], "EdDSA");
    assert!(keys[0].get("d").is_none(), "no private part");
    s.node.shutdown().await;

    let s = start(Algorithm::HS256).await;
    let r = send(client.get(format!("{}/.well-known/jwks.json", s.url))).await;
    assert_eq!(r.status, 404, "a secret is never published");
    assert_eq!(r.body["error"]["code"], "not_found");
    s.node.shutdown().await;
}

#[tokio::test]
async fn insecure_dev_serves_everyone_as_anonymous() {
    gearmesh::install_crypto_provider();
    let whoami = Gear::new("who").port("ami", |ctx: Ctx, _: Value| async move { Ok(ctx.caller().to_string()) });
    let node = Node::builder()
        .tls(tls())
        .listen("127.0.0.1:0".parse().expect("addr"))
        .insecure_dev(true)
        .gear(whoami)
        .gear(builtin::echo())
        .build()
        .expect("valid")
        .start()
        .await
        .expect("started");
    let url = node.url();
    let r = send(client().post(format!("{url}/v1/call/who/ami"))).await;
    assert_eq!((r.status, r.body), (200, json!("anonymous")));
    let r = send(client().get(format!("{url}/.well-known/jwks.json"))).await;
    assert_eq!(r.status, 404);
    node.shutdown().await;
}

#[test]
fn a_missing_key_file_is_a_build_error_naming_it() {
    let auth = AuthConfig { keys: vec!["/nonexistent/mesh.key".into()], ..AuthConfig::default() };
    let e = Node::builder().auth(auth).build().expect_err("missing key");
    assert!(e.to_string().contains("/nonexistent/mesh.key"), "{e}");
    let e = Node::builder().build().expect_err("secure by default");
    let msg = e.to_string();
    for needle in ["--auth-key", "--auth-jwks", "gearmesh keygen", "--insecure-dev"] {
        assert!(msg.contains(needle), "{msg}");
    }
}

#[tokio::test]
async fn a_gear_calling_gears_acts_with_the_scopes_config_grants_it() {
    let order = json!({"user_id": "alice", "product_id": "widget", "qty": 1});
    let place = |s: &Secured, t: &str| {
        send(client().post(format!("{}/v1/call/orders/place", s.url)).bearer_auth(t).json(&order))
    };
    // No [auth.gears]: orders may call nothing, whatever its caller may do (no confused deputy).
    let s = start_with(Algorithm::EdDSA, &["shop"], GearPolicy::new()).await;
    let r = place(&s, &token(&s.key, "call:*")).await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    let message = r.body["error"]["message"].as_str().expect("message");
    assert!(message.contains("gear:orders") && message.contains("call:users/find"), "{message}");
    s.node.shutdown().await;

    // With the permissions it needs, the order goes through for a caller allowed to place it.
    let policy: GearPolicy = serde_json::from_value(json!({
        "orders": ["call:users/find", "call:products/*", "call:billing/charge", "publish:orders.placed"],
        "billing": ["publish:billing.charged"],
    }))
    .expect("policy");
    let s = start_with(Algorithm::EdDSA, &["shop"], policy).await;
    let r = place(&s, &token(&s.key, "call:orders/place")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["charge_id"], "ch-1");
    // The caller's token still decides whether it may call orders at all.
    assert_eq!(place(&s, &token(&s.key, "call:billing/*")).await.status, 403);

    // Code embedding the node calls with the scopes of the principal it gives.
    let ctx = s.node.ctx(Principal::user("app", vec![]));
    let e = ctx.call::<_, Value>("users", "find", &json!({"id": "bob"})).await.expect_err("no scopes");
    assert_eq!(e.code(), ErrorCode::Forbidden);
    let ctx = s.node.ctx(Principal::user("app", vec!["call:users/*".into()]));
    let user: Value = ctx.call("users", "find", &json!({"id": "bob"})).await.expect("allowed");
    assert_eq!(user["id"], "bob");
    let e = s.node.ctx(Principal::anonymous()).call::<_, Value>("users", "find", &json!({"id": "bob"})).await;
    assert_eq!(e.expect_err("anonymous").code(), ErrorCode::Unauthorized);
    s.node.shutdown().await;
}

#[tokio::test]
async fn a_node_verifying_with_a_jwks_file_starts_even_when_a_remote_jwks_is_down() {
    gearmesh::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    // An identity provider's key: the node holds only its public half, from a local JWKS file.
    let idp = keygen(Algorithm::ES256).expect("keygen").key;
    let mut public = KeySet::new();
    public.insert_signing(&idp);
    let jwks_path = dir.path().join("idp.json");
    std::fs::write(&jwks_path, public.public_jwks().to_string()).expect("write");
    let auth = AuthConfig {
        // Nothing listens on port 1: the first fetch fails, which is logged, not fatal.
        jwks: vec![jwks_path.display().to_string(), "https://127.0.0.1:1/jwks.json".into()],
        audience: Some(AUDIENCE.into()),
        ..AuthConfig::default()
    };
    let node = Node::builder()
        .tls(tls())
        .listen("127.0.0.1:0".parse().expect("addr"))
        .auth(auth)
        .gear(builtin::echo())
        .build()
        .expect("valid")
        .start()
        .await
        .expect("started");
    let url = node.url();
    let r = call(&url, Some(&token(&idp, "call:echo/echo"))).await;
    assert_eq!((r.status, r.body), (200, json!({"hi": 1})));
    // A token from a key no source knows is refused (after a rate-limited refresh attempt).
    let stranger = keygen(Algorithm::ES256).expect("keygen").key;
    let r = call(&url, Some(&token(&stranger, "call:echo/echo"))).await;
    assert_unauthorized(&r, "unknown signing key");
    // The node publishes the keys it verifies with (public halves only).
    let r = send(client().get(format!("{url}/.well-known/jwks.json"))).await;
    assert_eq!(r.body["keys"][0]["kid"], idp.kid().as_str());
    node.shutdown().await;
}

//! The `gearmesh` binary as a user runs it: start, call, demo, signals, and its errors.

mod common;

use std::time::Duration;

use common::{run, signal, spawn};
use tokio::io::AsyncReadExt;

#[tokio::test]
async fn start_then_call_then_sigterm_exits_cleanly() {
    let mut node = spawn(&["start", "--listen", "127.0.0.1:0", "--insecure-dev", "--gears", "echo,kv"], &[]).await;
    let (code, out, err) = run(&["call", "echo/echo", r#"{"hi":1}"#, "--node", &node.url], &[]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).expect("json"), serde_json::json!({"hi": 1}));
    let (code, _out, err) = run(&["call", "kv/get", r#"{"key":"missing"}"#, "--node", &node.url], &[]).await;
    assert_ne!(code, 0);
    assert!(err.starts_with("error: not_found:"), "{err}");
    let (code, _out, err) = run(&["call", "echo/fail", r#"{"code":"out_of_stock"}"#, "--node", &node.url], &[]).await;
    assert_ne!(code, 0);
    assert!(err.starts_with("error: app (out_of_stock):"), "{err}");
    let (code, _out, err) = run(&["call", "echo", "--node", &node.url], &[]).await;
    assert_ne!(code, 0);
    assert!(err.contains("GEAR/PORT"), "{err}");
    signal(&node.child, "TERM");
    let status =
        tokio::time::timeout(Duration::from_secs(30), node.child.wait()).await.expect("exited").expect("status");
    assert!(status.success(), "graceful shutdown exits 0: {status:?}");
}

#[tokio::test]
async fn sigterm_waits_for_calls_in_flight() {
    // Plaintext, so that the raw-socket probe below can watch the call run.
    let mut node =
        spawn(&["start", "--listen", "127.0.0.1:0", "--insecure-dev", "--tls", "off", "--gears", "echo"], &[]).await;
    let url = node.url.clone();
    let call = tokio::spawn(async move { run(&["call", "echo/sleep", r#"{"ms":700}"#, "--node", &url], &[]).await });
    // Wait until the call is running on the node.
    let mut running = false;
    for _ in 0..500 {
        let body = reqwest_free_get(&node.url, "/v1/node").await;
        if body.contains("\"calls_in_flight\":1") {
            running = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(running, "the call never showed as in flight");
    signal(&node.child, "TERM");
    let (code, out, err) = call.await.expect("join");
    assert_eq!(code, 0, "the call in flight finished: {err}");
    assert!(out.contains("slept_ms"));
    let status =
        tokio::time::timeout(Duration::from_secs(30), node.child.wait()).await.expect("exited").expect("status");
    assert!(status.success());
}

/// A minimal HTTP GET over a raw socket (keeps this test independent of any client library).
async fn reqwest_free_get(url: &str, path: &str) -> String {
    use tokio::io::AsyncWriteExt;
    let host = url.trim_start_matches("http://");
    let Ok(mut s) = tokio::net::TcpStream::connect(host).await else { return String::new() };
    let req = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut buf = String::new();
    let _read = s.read_to_string(&mut buf).await;
    buf
}

#[tokio::test]
async fn demo_serves_the_shop_and_prints_how_to_try_it() {
    let node = spawn(&["demo", "--listen", "127.0.0.1:0"], &[]).await;
    // The demo runs with authentication and prints an admin and an observe-only token first.
    let token_after = |label: &str| {
        let line = node.before.iter().find(|l| l.trim_start().starts_with(label)).expect(label);
        line.split_whitespace().last().expect("a token").to_owned()
    };
    let (admin, observer) = (token_after("admin"), token_after("observe only"));
    let place = ["call", "orders/place", r#"{"user_id":"alice","product_id":"widget","qty":1}"#, "--node", &node.url];
    let (code, _out, err) = run(&place, &[]).await;
    assert_ne!(code, 0, "no token, no call");
    assert!(err.contains("unauthorized"), "{err}");
    let (code, _out, err) = run(&place, &[("GEARMESH_TOKEN", &observer)]).await;
    assert_ne!(code, 0, "an observer cannot call");
    assert!(err.contains("forbidden"), "{err}");
    let (code, out, err) = run(&place, &[("GEARMESH_TOKEN", &admin)]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"order_id\""), "{out}");
    drop(node);
}

#[tokio::test]
async fn without_insecure_dev_the_node_refuses_to_start_and_says_why() {
    let (code, _out, err) = run(&["start", "--listen", "127.0.0.1:0"], &[]).await;
    assert_ne!(code, 0);
    assert!(err.contains("--insecure-dev"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
}

#[tokio::test]
async fn a_port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let (code, _out, err) = run(&["start", "--listen", &addr, "--insecure-dev"], &[]).await;
    assert_ne!(code, 0);
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
    assert!(err.to_lowercase().contains("in use"), "{err}");
}

#[tokio::test]
async fn bad_flags_and_configs_are_clear_errors() {
    let (code, _out, err) = run(&["start", "--no-such-flag"], &[]).await;
    assert_ne!(code, 0);
    assert!(err.contains("--no-such-flag"), "{err}");
    let (code, _out, err) = run(&["start", "--listen", "not-an-address"], &[]).await;
    assert_ne!(code, 0);
    assert!(err.contains("not-an-address"), "{err}");

    let dir = tempfile::tempdir().expect("tempdir");
    let bad_key = dir.path().join("bad_key.toml");
    std::fs::write(&bad_key, "insecure_dev = true\nlisen = \"127.0.0.1:0\"\n").expect("write");
    let (code, _out, err) = run(&["start", "--config", bad_key.to_str().expect("utf8")], &[]).await;
    assert_ne!(code, 0);
    assert!(err.contains("lisen"), "names the key: {err}");
    let bad_value = dir.path().join("bad_value.toml");
    std::fs::write(&bad_value, "[calls]\nmax_timeout_ms = 0\n").expect("write");
    let (code, _out, err) = run(&["start", "--config", bad_value.to_str().expect("utf8")], &[]).await;
    assert_ne!(code, 0);
    assert!(err.contains("calls.max_timeout_ms"), "{err}");
    let (code, _out, err) = run(&["start", "--config", "/nonexistent/gearmesh.toml"], &[]).await;
    assert_ne!(code, 0);
    assert!(err.contains("cannot read config file /nonexistent/gearmesh.toml"), "{err}");
    // Plaintext is for development on loopback only: refused before anything listens.
    let (code, _out, err) = run(&["start", "--insecure-dev", "--tls", "off", "--listen", "0.0.0.0:0"], &[]).await;
    assert_ne!(code, 0);
    assert!(err.contains("tls.mode") && err.contains("loopback"), "{err}");
}

#[tokio::test]
async fn config_file_env_and_flags_apply_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("node.toml");
    std::fs::write(&file, "name = \"from-file\"\ngears = [\"kv\"]\ninsecure_dev = true\nlisten = \"127.0.0.1:0\"\n[tls]\nmode = \"off\"\n")
        .expect("write");
    // File only.
    let node = spawn(&["start", "--config", file.to_str().expect("utf8")], &[]).await;
    let info = reqwest_free_get(&node.url, "/v1/node").await;
    assert!(info.contains("\"name\":\"from-file\"") && info.contains("\"kv\""), "{info}");
    drop(node);
    // The environment beats the file; a flag beats the environment.
    let config = file.to_str().expect("utf8");
    let env = [("GEARMESH_NAME", "from-env"), ("GEARMESH_GEARS", "echo")];
    let node = spawn(&["start", "--config", config, "--name", "from-flag"], &env).await;
    let line = &node.line;
    assert!(line.contains("from-flag"), "{line}");
    let info = reqwest_free_get(&node.url, "/v1/node").await;
    assert!(info.contains("\"echo\"") && !info.contains("\"kv\""), "env GEARMESH_GEARS beat the file: {info}");
    drop(node);
}

/// `gearmesh ca export` prints the development CA's certificate, never its key, the same one each
/// time; and it is what lets nodes of two machines (two data directories, so two development
/// CAs) mesh: each side starts with the other's exported certificate as `--tls-ca`.
#[tokio::test]
async fn ca_export_prints_the_certificate_that_lets_another_machine_trust_this_one() {
    let (one, two) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    let dir = |d: &tempfile::TempDir| d.path().to_str().expect("utf-8 path").to_owned();
    let export = |d: String| async move {
        let (code, pem, err) = run(&["ca", "export", "--data-dir", &d], &[]).await;
        assert_eq!(code, 0, "{err}");
        pem
    };
    let pem_one = export(dir(&one)).await;
    assert!(pem_one.starts_with("-----BEGIN CERTIFICATE-----"), "{pem_one}");
    assert!(pem_one.trim_end().ends_with("-----END CERTIFICATE-----"), "{pem_one}");
    assert!(!pem_one.contains("PRIVATE KEY"), "the key never leaves the machine");
    assert_eq!(export(dir(&one)).await, pem_one, "the CA is created once");
    let pem_two = export(dir(&two)).await;
    assert_ne!(pem_one, pem_two, "another machine, another CA");
    let (trust_two, trust_one) = (one.path().join("two-ca.pem"), two.path().join("one-ca.pem"));
    std::fs::write(&trust_two, &pem_two).expect("write");
    std::fs::write(&trust_one, &pem_one).expect("write");

    let start = |d: String, trust: String, gears: &'static str, seed: Option<String>| async move {
        let mut args = vec!["start", "--listen", "127.0.0.1:0", "--insecure-dev", "--gears", gears];
        args.extend(["--data-dir", &d, "--tls-ca", &trust]);
        if let Some(s) = &seed {
            args.extend(["--seed", s]);
        }
        spawn(&args, &[]).await
    };
    let a = start(dir(&one), trust_two.display().to_string(), "echo", None).await;
    let seed = a.url.replace("https://", "wss://");
    let b = start(dir(&two), trust_one.display().to_string(), "kv", Some(seed)).await;
    // b reaches echo, hosted only on a, through the link between the two "machines".
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, err) =
            run(&["call", "echo/echo", r#"{"across":true}"#, "--node", &b.url, "--data-dir", &dir(&two)], &[]).await;
        if code == 0 {
            assert_eq!(
                serde_json::from_str::<serde_json::Value>(&out).expect("json"),
                serde_json::json!({"across": true})
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "b never reached a's gear: {err}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop((b, a));
}

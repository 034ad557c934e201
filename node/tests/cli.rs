//! The `gearmesh` binary as a user runs it: start, call, demo, signals, and its errors.

use std::{process::Stdio, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, BufReader},
    process::{Child, Command},
};

const BIN: &str = env!("CARGO_BIN_EXE_gearmesh");

/// A running `gearmesh` process, killed when dropped.
struct Proc {
    child: Child,
    url: String,
}

/// The development CA directory every process of these tests shares (under cargo's temporary
/// directory for integration tests, so the user's own CA is never touched).
fn data_dir() -> String {
    format!("{}/gearmesh-data", env!("CARGO_TARGET_TMPDIR"))
}

/// The base URL in a line like "listening on https://127.0.0.1:1234 (...)".
fn url_in(line: &str) -> Option<String> {
    let i = line.find("https://").or_else(|| line.find("http://"))?;
    Some(line[i..].split(['/', ' ']).take(3).collect::<Vec<_>>().join("/"))
}

/// Starts the binary with `args` and waits for its "listening on https://..." line.
async fn spawn(args: &[&str]) -> Proc {
    let mut child = Command::new(BIN)
        .args(args)
        .env("GEARMESH_LOG", "warn")
        .env("GEARMESH_DATA_DIR", data_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawned");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let url = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.expect("read") {
            if let Some(url) = url_in(&line) {
                return url;
            }
        }
        panic!("the process ended without printing its URL");
    })
    .await
    .expect("the node printed its URL");
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Proc { child, url }
}

async fn run(args: &[&str]) -> (i32, String, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(BIN).args(args).env("GEARMESH_DATA_DIR", data_dir()).output(),
    )
    .await
    .expect("finished in time")
    .expect("ran");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn sigterm(child: &Child) {
    let pid = child.id().expect("running");
    let status = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("kill ran");
    assert!(status.success());
}

#[tokio::test]
async fn start_then_call_then_sigterm_exits_cleanly() {
    let mut node = spawn(&["start", "--listen", "127.0.0.1:0", "--insecure-dev", "--gears", "echo,kv"]).await;
    let (code, out, err) = run(&["call", "echo/echo", r#"{"hi":1}"#, "--node", &node.url]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).expect("json"), serde_json::json!({"hi": 1}));
    let (code, _out, err) = run(&["call", "kv/get", r#"{"key":"missing"}"#, "--node", &node.url]).await;
    assert_ne!(code, 0);
    assert!(err.starts_with("error: not_found:"), "{err}");
    let (code, _out, err) = run(&["call", "echo/fail", r#"{"code":"out_of_stock"}"#, "--node", &node.url]).await;
    assert_ne!(code, 0);
    assert!(err.starts_with("error: app (out_of_stock):"), "{err}");
    let (code, _out, err) = run(&["call", "echo", "--node", &node.url]).await;
    assert_ne!(code, 0);
    assert!(err.contains("GEAR/PORT"), "{err}");
    sigterm(&node.child);
    let status =
        tokio::time::timeout(Duration::from_secs(30), node.child.wait()).await.expect("exited").expect("status");
    assert!(status.success(), "graceful shutdown exits 0: {status:?}");
}

#[tokio::test]
async fn sigterm_waits_for_calls_in_flight() {
    let mut node = spawn(&["start", "--listen", "127.0.0.1:0", "--insecure-dev", "--gears", "echo"]).await;
    let url = node.url.clone();
    let call = tokio::spawn(async move { run(&["call", "echo/sleep", r#"{"ms":700}"#, "--node", &url]).await });
    // Wait until the call is running on the node.
    for _ in 0..200 {
        let body = reqwest_free_get(&node.url, "/v1/node").await;
        if body.contains("\"calls_in_flight\":1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sigterm(&node.child);
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
    let node = spawn(&["demo", "--listen", "127.0.0.1:0"]).await;
    let (code, out, err) =
        run(&["call", "orders/place", r#"{"user_id":"alice","product_id":"widget","qty":1}"#, "--node", &node.url])
            .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"order_id\""), "{out}");
    drop(node);
}

#[tokio::test]
async fn without_insecure_dev_the_node_refuses_to_start_and_says_why() {
    let (code, _out, err) = run(&["start", "--listen", "127.0.0.1:0"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("--insecure-dev"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
}

#[tokio::test]
async fn a_port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let (code, _out, err) = run(&["start", "--listen", &addr, "--insecure-dev"]).await;
    assert_ne!(code, 0);
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
    assert!(err.to_lowercase().contains("in use"), "{err}");
}

#[tokio::test]
async fn bad_flags_and_configs_are_clear_errors() {
    let (code, _out, err) = run(&["start", "--no-such-flag"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("--no-such-flag"), "{err}");
    let (code, _out, err) = run(&["start", "--listen", "not-an-address"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("not-an-address"), "{err}");

    let dir = tempfile::tempdir().expect("tempdir");
    let bad_key = dir.path().join("bad_key.toml");
    std::fs::write(&bad_key, "insecure_dev = true\nlisen = \"127.0.0.1:0\"\n").expect("write");
    let (code, _out, err) = run(&["start", "--config", bad_key.to_str().expect("utf8")]).await;
    assert_ne!(code, 0);
    assert!(err.contains("lisen"), "names the key: {err}");
    let bad_value = dir.path().join("bad_value.toml");
    std::fs::write(&bad_value, "[calls]\nmax_timeout_ms = 0\n").expect("write");
    let (code, _out, err) = run(&["start", "--config", bad_value.to_str().expect("utf8")]).await;
    assert_ne!(code, 0);
    assert!(err.contains("calls.max_timeout_ms"), "{err}");
    let (code, _out, err) = run(&["start", "--config", "/nonexistent/gearmesh.toml"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("cannot read config file /nonexistent/gearmesh.toml"), "{err}");
}

#[tokio::test]
async fn config_file_env_and_flags_apply_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("node.toml");
    std::fs::write(&file, "name = \"from-file\"\ngears = [\"kv\"]\ninsecure_dev = true\nlisten = \"127.0.0.1:0\"\n[tls]\nmode = \"off\"\n")
        .expect("write");
    // File only.
    let node = spawn(&["start", "--config", file.to_str().expect("utf8")]).await;
    let info = reqwest_free_get(&node.url, "/v1/node").await;
    assert!(info.contains("\"name\":\"from-file\"") && info.contains("\"kv\""), "{info}");
    drop(node);
    // The environment beats the file; a flag beats the environment.
    let mut child = Command::new(BIN)
        .args(["start", "--config", file.to_str().expect("utf8"), "--name", "from-flag"])
        .env("GEARMESH_NAME", "from-env")
        .env("GEARMESH_GEARS", "echo")
        .env("GEARMESH_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawned");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await.expect("in time").expect("read");
    let line = line.expect("a line");
    assert!(line.contains("from-flag"), "{line}");
    let url = &url_in(&line).expect("url");
    let info = reqwest_free_get(url, "/v1/node").await;
    assert!(info.contains("\"echo\"") && !info.contains("\"kv\""), "env GEARMESH_GEARS beat the file: {info}");
    drop(child);
}

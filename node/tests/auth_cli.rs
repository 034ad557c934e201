//! The auth commands of the `gearmesh` binary end to end: `keygen`, `token issue`, a node started
//! with `--auth-key`, and `call --token` / `GEARMESH_TOKEN`.

use std::{path::Path, process::Stdio, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

const BIN: &str = env!("CARGO_BIN_EXE_gearmesh");

/// The development CA directory of these tests (never the user's own).
fn data_dir() -> String {
    format!("{}/gearmesh-data", env!("CARGO_TARGET_TMPDIR"))
}

/// Runs the binary to completion: exit code, stdout, stderr.
async fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("GEARMESH_TOKEN").env("GEARMESH_DATA_DIR", data_dir());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out =
        tokio::time::timeout(Duration::from_secs(60), cmd.output()).await.expect("finished in time").expect("ran");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts a node and waits for its URL; the process is killed when the child is dropped.
async fn spawn(args: &[&str]) -> (Child, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("GEARMESH_LOG", "warn")
        .env("GEARMESH_DATA_DIR", data_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawned");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let url = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.expect("read") {
            if let Some(i) = line.find("https://").or_else(|| line.find("http://")) {
                return line[i..].split(['/', ' ']).take(3).collect::<Vec<_>>().join("/");
            }
        }
        panic!("the node ended without printing its URL");
    })
    .await
    .expect("the node printed its URL");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, url)
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}

#[tokio::test]
async fn keygen_then_token_issue_then_call_with_the_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("mesh.key");
    let key_s = key.to_str().expect("utf-8 path");

    let (code, out, err) = run(&["keygen", "--alg", "EdDSA", "--out", key_s], &[]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(key_s) && out.contains("--auth-key"), "says how to use it: {out}");
    assert!(out.contains("\"kty\":\"OKP\""), "prints the public JWK: {out}");
    assert!(!out.contains("PRIVATE KEY"), "never prints the private key when writing it: {out}");
    assert_eq!(mode(&key), 0o600);
    // Never overwrites a key.
    let (code, _out, err) = run(&["keygen", "--out", key_s], &[]).await;
    assert_ne!(code, 0);
    assert!(err.contains("already exists"), "{err}");

    let issue = |scope: &'static str| {
        let key_s = key_s.to_owned();
        async move {
            let args = ["token", "issue", "--key", &key_s, "--sub", "alice", "--scope", scope, "--ttl", "10m"];
            let (code, out, err) = run(&[&args[..], &["--aud", "mesh-a"]].concat(), &[]).await;
            assert_eq!(code, 0, "{err}");
            out.trim().to_owned()
        }
    };
    let echo_token = issue("call:echo/*").await;
    assert_eq!(echo_token.split('.').count(), 3, "a JWT: {echo_token}");
    let kv_token = issue("call:kv/*").await;

    let (_node, url) = spawn(&[
        "start",
        "--listen",
        "127.0.0.1:0",
        "--gears",
        "echo,kv",
        "--auth-key",
        key_s,
        "--auth-audience",
        "mesh-a",
    ])
    .await;
    let (code, out, err) =
        run(&["call", "echo/echo", r#"{"hi":1}"#, "--node", &url, "--token", &echo_token], &[]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).expect("json"), serde_json::json!({"hi": 1}));
    // From the environment too.
    let (code, _out, err) = run(&["call", "echo/echo", "1", "--node", &url], &[("GEARMESH_TOKEN", &echo_token)]).await;
    assert_eq!(code, 0, "{err}");
    // Without a token, and with one for another gear.
    let (code, _out, err) = run(&["call", "echo/echo", "1", "--node", &url], &[]).await;
    assert_ne!(code, 0);
    assert!(err.starts_with("error: unauthorized:"), "{err}");
    let (code, _out, err) = run(&["call", "echo/echo", "1", "--node", &url, "--token", &kv_token], &[]).await;
    assert_ne!(code, 0);
    assert!(err.starts_with("error: forbidden:") && err.contains("call:echo/echo"), "{err}");
}

#[tokio::test]
async fn keygen_without_out_prints_the_key_and_token_issue_refuses_mistakes() {
    let (code, out, err) = run(&["keygen", "--alg", "HS256"], &[]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.trim().len() >= 32, "a secret: {out}");
    let (code, _out, err) = run(&["keygen", "--alg", "none"], &[]).await;
    assert_ne!(code, 0);
    assert!(err.contains("none"), "{err}");

    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("hs.key");
    std::fs::write(&key, out.trim()).expect("write");
    let key_s = key.to_str().expect("utf-8 path");
    let base = ["token", "issue", "--key", key_s, "--sub", "bob"];
    let (code, _out, err) = run(&[&base[..], &["--scope", "cal:echo"]].concat(), &[]).await;
    assert_ne!(code, 0);
    assert!(err.contains("cal:echo"), "a typo in a scope is an error: {err}");
    let (code, _out, err) = run(&base, &[]).await;
    assert_ne!(code, 0);
    assert!(err.contains("--scope"), "{err}");
    let (code, _out, err) = run(&[&base[..], &["--scope", "observe", "--ttl", "forever"]].concat(), &[]).await;
    assert_ne!(code, 0);
    assert!(err.contains("--ttl"), "{err}");
    let (code, _out, err) =
        run(&["token", "issue", "--key", "/nonexistent", "--sub", "x", "--scope", "observe"], &[]).await;
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent"), "{err}");
}

#[tokio::test]
async fn start_without_auth_says_how_to_fix_it_and_a_bad_key_is_named() {
    let (code, _out, err) = run(&["start", "--listen", "127.0.0.1:0"], &[]).await;
    assert_ne!(code, 0);
    assert!(err.contains("--auth-key") && err.contains("--insecure-dev"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    let (code, _out, err) = run(&["start", "--listen", "127.0.0.1:0", "--auth-key", "/nonexistent/k"], &[]).await;
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/k"), "{err}");
    let (code, _out, err) =
        run(&["start", "--listen", "127.0.0.1:0"], &[("GEARMESH_AUTH_KEYS", "/nonexistent/env")]).await;
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/env"), "the variable is read: {err}");
}

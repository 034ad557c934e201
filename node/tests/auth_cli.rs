//! The auth commands of the `gearmesh` binary end to end: `keygen`, `token issue`, a node started
//! with `--auth-key`, and `call --token` / `GEARMESH_TOKEN`.

mod common;

use std::path::Path;

use common::{run, spawn};

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

    let node = spawn(
        &["start", "--listen", "127.0.0.1:0", "--gears", "echo,kv", "--auth-key", key_s, "--auth-audience", "mesh-a"],
        &[],
    )
    .await;
    let url = node.url.clone();
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

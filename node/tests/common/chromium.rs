//! Headless Chromium for tests (Debian's `chromium`): finding it (or skipping without it),
//! one-shot runs (`--dump-dom`, `--screenshot`) whose console output is checked, and a page
//! driven over the DevTools protocol. Every Chromium runs in its own process group with a fresh
//! profile, and the group is ended when the run is over.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{io::AsyncReadExt, time::Instant};

/// How long one Chromium run may take before the test gives up on it.
const CHROMIUM_LIMIT: Duration = Duration::from_secs(90);

/// The start of the page's text, for failure messages.
const PAGE_TEXT: &str = "`${location.href}\\n${document.body ? document.body.innerText.slice(0, 1500) : ''}`";

/// Chromium's path, or `None` when it is missing and not required.
pub(crate) fn chromium() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("GEARMESH_REQUIRE_CHROMIUM").is_none(),
            "GEARMESH_REQUIRE_CHROMIUM is set but chromium is not on PATH (apt-get install -y chromium)"
        );
    }
    found
}

/// The arguments of every Chromium run here.
pub(crate) const CHROMIUM_ARGS: [&str; 14] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--hide-scrollbars",
    "--mute-audio",
    // The nodes' certificates come from this test's development CA, which Chromium does not
    // trust (and cannot be told to trust from the command line without a policy file).
    "--ignore-certificate-errors",
    "--window-size=1280,800",
];

/// What one Chromium run printed.
pub(crate) struct Run {
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Runs headless Chromium on `url` with `extra` arguments (`--dump-dom`, `--screenshot=...`) in a
/// fresh profile, and waits for it to exit. Every process it started is gone afterwards.
pub(crate) async fn run_chromium(bin: &Path, extra: &[String], url: &str) -> Run {
    let profile = tempfile::tempdir().expect("profile dir");
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(CHROMIUM_ARGS)
        .args([
            // Console messages go to stderr, where the test looks for errors.
            "--enable-logging=stderr",
            "--v=0",
            // The page's timers run on virtual time; the budget lets it connect, take the
            // snapshot, receive traces and stats, and render, before the DOM is dumped or the
            // screenshot taken.
            "--virtual-time-budget=10000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        // Its temporary files too (it leaves some behind), so they go with the profile.
        .env("TMPDIR", profile.path())
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so the browser's helper processes can be found and ended with it.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("chromium started");
    let pid = child.id().expect("running");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = tokio::spawn(async move {
        let mut s = String::new();
        let _read = stdout.read_to_string(&mut s).await;
        s
    });
    let err = tokio::spawn(async move {
        let mut s = String::new();
        let _read = stderr.read_to_string(&mut s).await;
        s
    });
    let waited = tokio::time::timeout(CHROMIUM_LIMIT, child.wait()).await;
    // Whatever the browser left in its group (helpers) goes too; then the group is empty.
    end_group(pid);
    match waited {
        Ok(status) => {
            let status = status.expect("waited for chromium");
            let run = Run { stdout: out.await.expect("stdout"), stderr: err.await.expect("stderr") };
            assert!(status.success(), "chromium failed ({status}); stderr:\n{}", run.stderr);
            run
        }
        Err(_) => {
            let _killed = child.kill().await;
            panic!("chromium did not finish within {CHROMIUM_LIMIT:?}");
        }
    }
}

/// Ends every process left in the process group `pgid` that `run_chromium` created. A group
/// lives while any member does, so a group that still answers is still Chromium's.
pub(crate) fn end_group(pgid: u32) {
    let group = format!("-{pgid}");
    let alive = || {
        std::process::Command::new("kill")
            .args(["-0", "--", &group])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if alive() {
        let status = std::process::Command::new("kill").args(["-KILL", "--", &group]).stderr(Stdio::null()).status();
        assert!(status.is_ok(), "could not run kill for chromium's leftover processes");
    }
}

/// The console errors Chromium logged: `CONSOLE` lines at error level, uncaught exceptions,
/// refused resources and failed connections.
pub(crate) fn console_errors(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.contains("CONSOLE") || l.contains("Uncaught") || l.contains("Refused to"))
        .filter(|l| {
            let lower = l.to_lowercase();
            lower.contains("error")
                || lower.contains("uncaught")
                || lower.contains("refused")
                || lower.contains("failed")
        })
        .collect()
}

// === driving Chromium over the DevTools protocol ===

/// A headless Chromium with its DevTools protocol open; it and its helpers end on drop.
pub(crate) struct Browser {
    _child: tokio::process::Child,
    pgid: u32,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        end_group(self.pgid);
    }
}

/// One page of a [`Browser`], driven through its DevTools WebSocket.
pub(crate) struct Tab {
    ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    next: u64,
    session: Option<String>,
    /// Protocol events seen so far (console calls, exceptions, log entries).
    events: Vec<Value>,
}

/// Starts Chromium with the DevTools protocol on a port it picks, and opens a blank page.
pub(crate) async fn devtools(bin: &Path) -> (Browser, Tab) {
    let profile = tempfile::tempdir().expect("profile dir");
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(CHROMIUM_ARGS)
        .arg("--remote-debugging-port=0")
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .env("TMPDIR", profile.path())
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    let child = cmd.spawn().expect("chromium started");
    let pgid = child.id().expect("running");
    // Chromium writes the port it chose and the browser endpoint's path to this file.
    let file = profile.path().join("DevToolsActivePort");
    let browser = Browser { _child: child, pgid, _profile: profile };
    let deadline = Instant::now() + Duration::from_secs(30);
    let endpoint = loop {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        if let Some((port, path)) = text.split_once('\n')
            && path.trim().starts_with("/devtools/")
        {
            break format!("ws://127.0.0.1:{}{}", port.trim(), path.trim());
        }
        assert!(Instant::now() < deadline, "chromium did not open its DevTools port within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (ws, _) = tokio_tungstenite::connect_async(endpoint.as_str()).await.expect("DevTools connected");
    let mut tab = Tab { ws, next: 0, session: None, events: Vec::new() };
    let target = tab.call("Target.createTarget", json!({ "url": "about:blank" })).await;
    let target_id = target["targetId"].as_str().expect("a target id").to_owned();
    let attached = tab.call("Target.attachToTarget", json!({ "targetId": target_id, "flatten": true })).await;
    tab.session = Some(attached["sessionId"].as_str().expect("a session id").to_owned());
    for domain in ["Runtime", "Log", "Page"] {
        tab.call(&format!("{domain}.enable"), json!({})).await;
    }
    // A laptop screen, as with --window-size for the other runs.
    let screen = json!({ "width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": false });
    tab.call("Emulation.setDeviceMetricsOverride", screen).await;
    (browser, tab)
}

impl Tab {
    /// Sends one command and waits (30 s at most) for its answer, keeping the events in between.
    pub(crate) async fn call(&mut self, method: &str, params: Value) -> Value {
        use futures::{SinkExt as _, StreamExt as _};
        use tokio_tungstenite::tungstenite::Message;

        self.next += 1;
        let id = self.next;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        self.ws.send(Message::text(msg.to_string())).await.expect("sent to DevTools");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("DevTools did not answer {method} within 30 s"));
            let text = match next {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(_)) => continue,
                other => panic!("the DevTools connection ended: {other:?}"),
            };
            let v: Value = serde_json::from_str(text.as_str()).expect("DevTools sends JSON");
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method} failed: {}", v["error"]);
                return v["result"].clone();
            }
            if v.get("method").is_some() {
                self.events.push(v);
            }
        }
    }

    /// The value of a JavaScript expression in the page.
    pub(crate) async fn eval(&mut self, expr: &str) -> Value {
        let r = self.call("Runtime.evaluate", json!({ "expression": expr, "returnByValue": true })).await;
        assert!(r.get("exceptionDetails").is_none(), "{expr} threw: {}", r["exceptionDetails"]);
        r["result"]["value"].clone()
    }

    /// Waits (30 s at most) until `expr` is true in the page (an expression that throws, as on
    /// a page still loading, is not true yet).
    pub(crate) async fn wait_for(&mut self, what: &str, expr: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let guarded = format!("(() => {{ try {{ return ({expr}) === true; }} catch (e) {{ return false; }} }})()");
        while self.eval(&guarded).await != json!(true) {
            if Instant::now() > deadline {
                let page = self.eval(PAGE_TEXT).await;
                panic!("timed out after 30 s waiting until {what}; the page: {page}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(crate) async fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url })).await;
    }

    /// Exceptions, console errors and warnings, and error log entries (failed loads, refused
    /// connections, policy violations) the page produced so far.
    pub(crate) fn problems(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| {
                let p = &e["params"];
                match e["method"].as_str()? {
                    "Runtime.exceptionThrown" => Some(format!("exception: {}", p["exceptionDetails"])),
                    "Runtime.consoleAPICalled"
                        if matches!(p["type"].as_str(), Some("error" | "warning" | "assert")) =>
                    {
                        Some(format!("console.{}: {}", p["type"], p["args"]))
                    }
                    "Log.entryAdded" if p["entry"]["level"] == "error" => Some(format!("log: {}", p["entry"])),
                    _ => None,
                }
            })
            .collect()
    }

    /// A PNG of the page as it is now, written to `path`.
    pub(crate) async fn screenshot(&mut self, path: &Path) {
        use base64::Engine as _;
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" })).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("base64 screenshot");
        std::fs::write(path, png).expect("screenshot written");
    }
}

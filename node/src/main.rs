//! The `gearmesh` command: start a node, call a port, run the demo.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use gearmesh::{LogFormat, Node, NodeConfig, RunningNode};

mod cli_auth;

#[derive(Debug, Parser)]
#[command(name = "gearmesh", version, about = "An in-process service mesh: gears, ports, one node per process")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a node.
    Start(StartArgs),
    /// Call a port: `gearmesh call echo/echo '{"hi":1}'`.
    Call(CallArgs),
    /// Run a local demo node with every built-in gear, and print how to try it.
    Demo(DemoArgs),
    /// Make a new key for token authentication: `gearmesh keygen --alg EdDSA --out mesh.key`.
    Keygen(cli_auth::KeygenArgs),
    /// Issue tokens: `gearmesh token issue --key mesh.key --sub alice --scope 'call:*' --ttl 1h`.
    Token(cli_auth::TokenArgs),
}

/// Flags of `gearmesh start`. Each can also be set by a `GEARMESH_*` variable or a config key;
/// flags win over variables, variables over the file, the file over defaults.
#[derive(Debug, Args)]
struct StartArgs {
    /// TOML config file (every flag has a key of the same name, with `_` for `-`).
    #[arg(long, env = "GEARMESH_CONFIG")]
    config: Option<PathBuf>,
    /// The node's name.
    #[arg(long, env = "GEARMESH_NAME")]
    name: Option<String>,
    /// Address to listen on [default: 127.0.0.1:7070].
    #[arg(long, env = "GEARMESH_LISTEN")]
    listen: Option<SocketAddr>,
    /// Seed URL of a mesh to join (repeatable).
    #[arg(long = "seed", env = "GEARMESH_SEEDS", value_delimiter = ',')]
    seeds: Vec<String>,
    /// Built-in gears to host, comma-separated (echo, kv, users, products, billing, orders, audit, shop, all).
    #[arg(long, env = "GEARMESH_GEARS", value_delimiter = ',')]
    gears: Vec<String>,
    /// Log format.
    #[arg(long, env = "GEARMESH_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormatArg>,
    /// Run without authentication: development only, never exposed to a network.
    #[arg(long, env = "GEARMESH_INSECURE_DEV")]
    insecure_dev: bool,
    /// Largest request body, in bytes [default: 1048576].
    #[arg(long, env = "GEARMESH_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// Cap on every call's deadline, in milliseconds [default: 300000].
    #[arg(long, env = "GEARMESH_MAX_TIMEOUT_MS")]
    max_timeout_ms: Option<u64>,
    /// How long shutdown waits for requests in flight, in milliseconds [default: 10000].
    #[arg(long, env = "GEARMESH_DRAIN_TIMEOUT_MS")]
    drain_timeout_ms: Option<u64>,
    #[command(flatten)]
    auth: cli_auth::AuthArgs,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Pretty,
    Json,
}

#[derive(Debug, Args)]
struct CallArgs {
    /// The target, `GEAR/PORT`.
    target: String,
    /// The JSON input [default: null].
    json: Option<String>,
    /// The node to call.
    #[arg(long, env = "GEARMESH_NODE", default_value = "http://127.0.0.1:7070")]
    node: String,
    /// The call's timeout, in milliseconds.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// A token sent as `Authorization: Bearer` (from `gearmesh token issue`).
    #[arg(long, env = "GEARMESH_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
}

impl StartArgs {
    /// Applies the precedence: flags and variables (clap merges those) over the file over defaults.
    fn into_config(self) -> Result<NodeConfig> {
        let mut c = match &self.config {
            Some(path) => NodeConfig::from_file(path)?,
            None => NodeConfig::default(),
        };
        if let Some(v) = self.name {
            c.name = Some(v);
        }
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if !self.seeds.is_empty() {
            c.seeds = self.seeds;
        }
        if !self.gears.is_empty() {
            c.gears = self.gears;
        }
        if let Some(v) = self.log_format {
            c.log_format = match v {
                LogFormatArg::Pretty => LogFormat::Pretty,
                LogFormatArg::Json => LogFormat::Json,
            };
        }
        c.insecure_dev |= self.insecure_dev;
        if let Some(v) = self.max_body_bytes {
            c.http.max_body_bytes = v;
        }
        if let Some(v) = self.max_timeout_ms {
            c.calls.max_timeout_ms = v;
        }
        if let Some(v) = self.drain_timeout_ms {
            c.calls.drain_timeout_ms = v;
        }
        self.auth.apply(&mut c.auth);
        c.validate()?;
        Ok(c)
    }
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GEARMESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Waits for SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the node");
                let _interrupted = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _interrupted = ctrl_c.await;
    }
}

async fn run_until_signal(node: RunningNode) {
    let token = node.shutdown_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("signal received; shutting down");
        token.cancel();
    });
    node.wait().await;
}

async fn start(args: StartArgs) -> Result<()> {
    let config = args.into_config()?;
    init_logs(config.log_format);
    if !config.seeds.is_empty() {
        tracing::warn!(seeds = ?config.seeds, "--seed is accepted but this build has no mesh yet; running standalone");
    }
    let node = Node::builder().config(config).build()?.start().await?;
    println!("gearmesh node {} listening on http://{}", node.name(), node.local_addr());
    run_until_signal(node).await;
    Ok(())
}

async fn demo(args: DemoArgs) -> Result<()> {
    init_logs(LogFormat::Pretty);
    let config = NodeConfig {
        name: Some("demo-1".into()),
        listen: args.listen,
        gears: vec!["all".into()],
        insecure_dev: true,
        ..NodeConfig::default()
    };
    let node = Node::builder().config(config).build()?.start().await?;
    let url = format!("http://{}", node.local_addr());
    println!("gearmesh demo: one node ({}) hosting every built-in gear", node.name());
    println!("  node:    {url}/v1/node");
    println!("  gears:   {url}/v1/gears");
    println!("  metrics: {url}/metrics");
    println!("try:");
    println!(
        "  curl -s -X POST {url}/v1/call/orders/place -H 'content-type: application/json' \
         -d '{{\"user_id\":\"alice\",\"product_id\":\"widget\",\"qty\":2}}'"
    );
    println!("  curl -s -X POST {url}/v1/call/audit/recent");
    println!("  cargo run --release -- call echo/echo '{{\"hello\":\"mesh\"}}' --node {url}");
    println!("Ctrl-C stops the demo. (Running without authentication: development only.)");
    run_until_signal(node).await;
    Ok(())
}

async fn call(args: CallArgs) -> Result<ExitCode> {
    let Some((gear, port)) = args.target.split_once('/') else {
        bail!("the target must be GEAR/PORT, e.g. echo/echo");
    };
    let body = args.json.unwrap_or_else(|| "null".into());
    serde_json::from_str::<serde::de::IgnoredAny>(&body).context("the input is not valid JSON")?;
    let mut url = format!("{}/v1/call/{gear}/{port}", args.node.trim_end_matches('/'));
    if let Some(ms) = args.timeout_ms {
        url.push_str(&format!("?timeout_ms={ms}"));
    }
    let client = reqwest::Client::builder().timeout(Duration::from_secs(330)).build()?;
    let mut req = client.post(&url).header("content-type", "application/json").body(body);
    if let Some(token) = &args.token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.with_context(|| format!("cannot reach {}", args.node))?;
    let status = resp.status();
    let text = resp.text().await.context("reading the reply")?;
    let json: Option<serde_json::Value> = serde_json::from_str(&text).ok();
    if status.is_success() {
        match json {
            Some(v) => println!("{}", serde_json::to_string_pretty(&v)?),
            None => println!("{text}"),
        }
        return Ok(ExitCode::SUCCESS);
    }
    match json.as_ref().and_then(|v| v.get("error")) {
        Some(e) => {
            let code = e.get("code").and_then(|c| c.as_str()).unwrap_or("unknown");
            let msg = e.get("message").and_then(|c| c.as_str()).unwrap_or("");
            match e.get("app_code").and_then(|c| c.as_str()) {
                Some(app) => eprintln!("error: {code} ({app}): {msg}"),
                None => eprintln!("error: {code}: {msg}"),
            }
        }
        None => eprintln!("error: HTTP {status}: {text}"),
    }
    Ok(ExitCode::FAILURE)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    gearmesh::install_crypto_provider();
    let result = match cli.command {
        Command::Start(a) => start(a).await.map(|()| ExitCode::SUCCESS),
        Command::Call(a) => call(a).await,
        Command::Demo(a) => demo(a).await.map(|()| ExitCode::SUCCESS),
        Command::Keygen(a) => cli_auth::run_keygen(a).map(|()| ExitCode::SUCCESS),
        Command::Token(a) => cli_auth::run_token(a).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

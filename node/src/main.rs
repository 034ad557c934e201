//! The `gearmesh` command: start a node, call a port, run the demo.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use gearmesh::{LogFormat, Node, NodeConfig, RunningNode, TlsMode, auth::AuthConfig};

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
    Start(Box<StartArgs>),
    /// Call a port: `gearmesh call echo/echo '{"hi":1}'`.
    Call(CallArgs),
    /// Run a local demo mesh of three nodes with the built-in gears spread over them, and print
    /// how to try it.
    Demo(DemoArgs),
    /// Make a new key for token authentication: `gearmesh keygen --alg EdDSA --out mesh.key`.
    Keygen(cli_auth::KeygenArgs),
    /// Issue tokens: `gearmesh token issue --key mesh.key --sub alice --scope 'call:*' --ttl 1h`.
    Token(cli_auth::TokenArgs),
    /// The development CA: `gearmesh ca export > dev-ca.pem` prints its certificate for other
    /// machines (their nodes' `--tls-ca`, clients' `--cacert`).
    Ca(CaArgs),
}

#[derive(Debug, Args)]
struct CaArgs {
    #[command(subcommand)]
    command: CaCommand,
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Print the development CA's certificate (PEM; never its key), creating the CA first if
    /// this machine has none yet.
    Export {
        /// The directory of the development CA [default: ~/.local/share/gearmesh].
        #[arg(long, env = "GEARMESH_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
}

/// `gearmesh ca export`: the development CA's certificate on standard output.
fn ca(args: CaArgs) -> Result<()> {
    let CaCommand::Export { data_dir } = args.command;
    let dir = data_dir
        .or_else(gearmesh_transport::tls::DevCa::default_dir)
        .context("no directory for the development CA: set --data-dir or GEARMESH_DATA_DIR (or HOME)")?;
    let ca = gearmesh_transport::tls::DevCa::load_or_create(&dir)
        .with_context(|| format!("the development CA in {}", dir.display()))?;
    print!("{}", ca.cert_pem());
    Ok(())
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
    /// Where the node's certificate comes from: `dev` (issued by the development CA in the data
    /// directory), `pem` (--tls-cert and --tls-key), `acme` (obtained and renewed from an ACME
    /// server such as Let's Encrypt: --acme-domain), or `off` (plaintext; only with
    /// --insecure-dev) [default: dev].
    #[arg(long, env = "GEARMESH_TLS", value_enum)]
    tls: Option<TlsArg>,
    /// The certificate chain (PEM) for `--tls pem`.
    #[arg(long, env = "GEARMESH_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) for `--tls pem`.
    #[arg(long, env = "GEARMESH_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// CA certificates (PEM) trusted when dialing other nodes.
    #[arg(long, env = "GEARMESH_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// The node's state directory: the development CA, and the ACME account and certificates
    /// [default: ~/.local/share/gearmesh].
    #[arg(long, env = "GEARMESH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// `--tls acme`: a name to obtain the certificate for (repeatable).
    #[arg(long = "acme-domain", env = "GEARMESH_ACME_DOMAINS", value_delimiter = ',')]
    acme_domains: Vec<String>,
    /// `--tls acme`: the contact e-mail given to the ACME server.
    #[arg(long, env = "GEARMESH_ACME_EMAIL")]
    acme_email: Option<String>,
    /// `--tls acme`: the ACME directory URL [default: Let's Encrypt production].
    #[arg(long, env = "GEARMESH_ACME_DIRECTORY")]
    acme_directory: Option<String>,
    /// `--tls acme`: use Let's Encrypt's staging directory (untrusted certificates, for trials).
    #[arg(long, env = "GEARMESH_ACME_STAGING")]
    acme_staging: bool,
    /// `--tls acme`: a PEM root certificate trusted for the ACME server's own TLS (a private ACME
    /// server: step-ca, Pebble).
    #[arg(long, env = "GEARMESH_ACME_CA_ROOT")]
    acme_ca_root: Option<PathBuf>,
    /// `--tls acme`: the challenge answered [default: tls-alpn-01, on the listening port].
    #[arg(long, env = "GEARMESH_ACME_CHALLENGE", value_enum)]
    acme_challenge: Option<AcmeChallengeArg>,
    /// `--tls acme`: a plain-HTTP address (e.g. 0.0.0.0:80) that answers HTTP-01 challenges and
    /// redirects everything else to HTTPS.
    #[arg(long, env = "GEARMESH_ACME_HTTP_LISTEN")]
    acme_http_listen: Option<SocketAddr>,
    /// The mesh's name: links only to nodes of the same name [default: default].
    #[arg(long, env = "GEARMESH_MESH_NAME")]
    mesh_name: Option<String>,
    /// The host name other nodes dial this node at [default: the listening address].
    #[arg(long, env = "GEARMESH_ADVERTISE_HOST")]
    advertise_host: Option<String>,
    /// Do not accept or dial QUIC links (WebSocket links only).
    #[arg(long, env = "GEARMESH_NO_QUIC")]
    no_quic: bool,
    /// The transport to dial other nodes over when they offer both [default: wss].
    #[arg(long, value_enum, env = "GEARMESH_DIAL")]
    dial: Option<DialArg>,
    /// Accept no mesh links and advertise no address (behind NAT or a firewall): join by
    /// dialing the seeds and be reached through them.
    #[arg(long, env = "GEARMESH_NO_LISTEN")]
    no_listen: bool,
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
enum TlsArg {
    Dev,
    Pem,
    Acme,
    Off,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DialArg {
    Wss,
    Quic,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum AcmeChallengeArg {
    #[value(name = "tls-alpn-01")]
    TlsAlpn01,
    #[value(name = "http-01")]
    Http01,
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
    #[arg(long, env = "GEARMESH_NODE", default_value = "https://127.0.0.1:7070")]
    node: String,
    /// A CA certificate (PEM) to trust besides the public web PKI and the development CA.
    #[arg(long, env = "GEARMESH_CACERT")]
    cacert: Option<PathBuf>,
    /// The directory of the development CA, which is trusted when present.
    #[arg(long, env = "GEARMESH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The call's timeout, in milliseconds.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// A token sent as `Authorization: Bearer` (from `gearmesh token issue`).
    #[arg(long, env = "GEARMESH_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Address of the first node (the others take free ports on the same interface).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// The directory of the development CA.
    #[arg(long, env = "GEARMESH_DATA_DIR")]
    data_dir: Option<PathBuf>,
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
        if let Some(v) = self.tls {
            c.tls.mode = match v {
                TlsArg::Dev => TlsMode::Dev,
                TlsArg::Pem => TlsMode::Pem,
                TlsArg::Acme => TlsMode::Acme,
                TlsArg::Off => TlsMode::Off,
            };
        }
        if !self.acme_domains.is_empty() {
            c.tls.acme_domains = self.acme_domains;
        }
        if self.acme_email.is_some() {
            c.tls.acme_email = self.acme_email;
        }
        if self.acme_directory.is_some() {
            c.tls.acme_directory = self.acme_directory;
        }
        c.tls.acme_staging |= self.acme_staging;
        if self.acme_ca_root.is_some() {
            c.tls.acme_ca_root = self.acme_ca_root;
        }
        if let Some(v) = self.acme_challenge {
            c.tls.acme_challenge = match v {
                AcmeChallengeArg::TlsAlpn01 => gearmesh_transport::acme::ChallengeKind::TlsAlpn01,
                AcmeChallengeArg::Http01 => gearmesh_transport::acme::ChallengeKind::Http01,
            };
        }
        if self.acme_http_listen.is_some() {
            c.tls.acme_http_listen = self.acme_http_listen;
        }
        if self.tls_cert.is_some() {
            c.tls.cert = self.tls_cert;
        }
        if self.tls_key.is_some() {
            c.tls.key = self.tls_key;
        }
        if self.tls_ca.is_some() {
            c.tls.ca = self.tls_ca;
        }
        if self.data_dir.is_some() {
            c.tls.data_dir = self.data_dir;
        }
        if let Some(v) = self.mesh_name {
            c.mesh.name = v;
        }
        if self.advertise_host.is_some() {
            c.mesh.advertise_host = self.advertise_host;
        }
        if self.no_quic {
            c.mesh.quic = false;
        }
        if let Some(v) = self.dial {
            c.mesh.dial = match v {
                DialArg::Wss => gearmesh::DialTransport::Wss,
                DialArg::Quic => gearmesh::DialTransport::Quic,
            };
        }
        if self.no_listen {
            c.mesh.no_listen = true;
        }
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
    let node = Node::builder().config(config).build()?.start().await?;
    println!("gearmesh node {} listening on {} (mesh links: {})", node.name(), node.url(), node.link_addrs().join(" "));
    if let Some(ca) = node.dev_ca_cert() {
        println!("development CA certificate: {}", ca.display());
    }
    run_until_signal(node).await;
    Ok(())
}

/// The demo mesh: which built-in gears each node hosts. `orders` lives alone on the third node,
/// so placing an order calls `users`, `products` and `billing` across the mesh.
const DEMO_NODES: [(&str, &[&str]); 3] =
    [("demo-1", &["echo", "kv", "users", "products"]), ("demo-2", &["billing", "audit"]), ("demo-3", &["orders"])];

/// What the shop's gears may do when they call each other (`[auth.gears]`).
const SHOP_POLICY: &str = r#"
[auth.gears]
orders = ["call:users/find", "call:products/*", "call:billing/charge", "publish:orders.placed"]
billing = ["publish:billing.charged"]
"#;

/// How long the demo's tokens live.
const DEMO_TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);

/// A fresh signing key for the demo in the data directory (replacing the last run's, so its
/// tokens stop working), and an admin and an observe-only token signed with it.
fn demo_auth(data_dir: Option<&PathBuf>) -> Result<(AuthConfig, PathBuf, String, String)> {
    let dir = data_dir
        .cloned()
        .or_else(gearmesh_transport::tls::DevCa::default_dir)
        .context("no directory for the demo's key: set --data-dir or GEARMESH_DATA_DIR (or HOME)")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("demo-mesh.key");
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("replacing {}", path.display())),
    }
    let generated = gearmesh::auth::keygen(gearmesh::auth::Algorithm::EdDSA)?;
    cli_auth::write_private(&path, generated.contents.as_bytes())?;
    let issuer = gearmesh::auth::Issuer::new(generated.key);
    let token = |sub: &str, scopes: &str| -> Result<String> {
        let scopes = gearmesh::auth::Scopes::parse_strict(scopes)?;
        Ok(issuer.issue(&gearmesh::auth::TokenRequest::new(sub, scopes, DEMO_TOKEN_TTL))?)
    };
    let admin = token("demo-admin", "admin observe call:* publish:* serve:*")?;
    let observer = token("demo-observer", "observe")?;
    let gears = NodeConfig::from_toml(SHOP_POLICY)?.auth.gears;
    let auth = AuthConfig { keys: vec![path.clone()], gears, ..AuthConfig::default() };
    Ok((auth, path, admin, observer))
}

async fn demo(args: DemoArgs) -> Result<()> {
    init_logs(LogFormat::Pretty);
    let (auth, key_path, admin, observer) = demo_auth(args.data_dir.as_ref())?;
    let mut nodes: Vec<RunningNode> = Vec::new();
    for (i, (name, gears)) in DEMO_NODES.iter().enumerate() {
        let mut config = NodeConfig {
            name: Some((*name).into()),
            listen: if i == 0 { args.listen } else { SocketAddr::new(args.listen.ip(), 0) },
            gears: gears.iter().map(|g| (*g).to_owned()).collect(),
            auth: auth.clone(),
            ..NodeConfig::default()
        };
        config.tls.data_dir.clone_from(&args.data_dir);
        // Each node joins through the previous one; the mesh links the rest up by itself.
        if let Some(prev) = nodes.last() {
            config.seeds = prev.link_addrs().iter().take(1).cloned().collect();
        }
        nodes.push(Node::builder().config(config).build()?.start().await?);
    }
    // Wait (briefly) until the first node sees every gear, so the printed commands work at once.
    let first = &nodes[0];
    let wanted: Vec<&str> = DEMO_NODES.iter().flat_map(|(_, g)| g.iter().copied()).collect();
    for _ in 0..200 {
        let view = first.mesh().view();
        let known = |g: &str| view.nodes.iter().any(|n| n.state == "alive" && n.gears.iter().any(|ad| ad.name == g));
        if wanted.iter().all(|g| known(g)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = first.url();
    let ca = first.dev_ca_cert().map(|p| format!(" --cacert {}", p.display())).unwrap_or_default();
    println!("gearmesh demo: tokens signed by a new key ({}), valid 12 hours:", key_path.display());
    println!("  admin (observe, call, publish, serve): {admin}");
    println!("  observe only:                          {observer}");
    println!("  more: gearmesh token issue --key {} --sub you --scope 'call:echo/*'", key_path.display());
    println!("gearmesh demo: a mesh of {} nodes listening on {url}", nodes.len());
    for (node, (_, gears)) in nodes.iter().zip(DEMO_NODES) {
        println!("  {:<7} {}  gears: {}", node.name(), node.url(), gears.join(", "));
    }
    println!("  dashboard: {url}/#token={admin}");
    println!("  mesh:      {url}/v1/nodes   routes: {url}/v1/routes   metrics: {url}/metrics");
    println!("  live:      wss://{}/v1/mesh (see docs/interface.md, examples/python)", first.local_addr());
    println!("try (orders runs on demo-3 and calls users, products and billing on the other nodes):");
    println!("  export GEARMESH_TOKEN={admin}");
    println!(
        "  curl -s{ca} -H \"Authorization: Bearer $GEARMESH_TOKEN\" -X POST {url}/v1/call/orders/place \\
         -H 'content-type: application/json' -d '{{\"user_id\":\"alice\",\"product_id\":\"widget\",\"qty\":2}}'"
    );
    println!("  curl -s{ca} -H \"Authorization: Bearer $GEARMESH_TOKEN\" -X POST {url}/v1/call/audit/recent");
    println!("the same order as a pipeline (steps as data; mallory's reservation is released by compensation):");
    println!(
        "  curl -s{ca} -H \"Authorization: Bearer $GEARMESH_TOKEN\" -X POST {url}/v1/pipelines/order/call \\
         -H 'content-type: application/json' -d '{{\"user_id\":\"mallory\",\"product_id\":\"widget\",\"qty\":1}}'"
    );
    println!("  cargo run --release -- call echo/echo '{{\"hello\":\"mesh\"}}' --node {url}");
    println!("Ctrl-C stops the demo.");
    let token = first.shutdown_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("signal received; shutting down");
        token.cancel();
    });
    let first_token = nodes[0].shutdown_token();
    first_token.cancelled().await;
    for node in nodes.into_iter().rev() {
        node.shutdown().await;
    }
    Ok(())
}

/// An HTTP client trusting the web PKI, the development CA (when the data directory has one) and
/// `cacert`.
fn http_client(args: &CallArgs) -> Result<reqwest::Client> {
    let mut cas = Vec::new();
    let dev_dir = args.data_dir.clone().or_else(gearmesh_transport::tls::DevCa::default_dir);
    if let Some(dir) = dev_dir {
        let crt = dir.join(gearmesh::DEV_CA_CERT_FILE);
        if crt.exists() {
            cas.extend(gearmesh_transport::tls::load_certs(&crt)?);
        }
    }
    if let Some(path) = &args.cacert {
        cas.extend(gearmesh_transport::tls::load_certs(path)?);
    }
    let trust = gearmesh_transport::tls::ClientTrust::WebpkiRootsAnd(cas);
    let tls = gearmesh_transport::tls::ClientTls::new(&trust)?.wss_config();
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(330))
        .tls_backend_preconfigured(rustls::ClientConfig::clone(&tls))
        .build()?)
}

async fn call(args: CallArgs) -> Result<ExitCode> {
    let client = http_client(&args)?;
    let Some((gear, port)) = args.target.split_once('/') else {
        bail!("the target must be GEAR/PORT, e.g. echo/echo");
    };
    let body = args.json.unwrap_or_else(|| "null".into());
    serde_json::from_str::<serde::de::IgnoredAny>(&body).context("the input is not valid JSON")?;
    let mut url = format!("{}/v1/call/{gear}/{port}", args.node.trim_end_matches('/'));
    if let Some(ms) = args.timeout_ms {
        url.push_str(&format!("?timeout_ms={ms}"));
    }
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
        Command::Start(a) => start(*a).await.map(|()| ExitCode::SUCCESS),
        Command::Call(a) => call(a).await,
        Command::Demo(a) => demo(a).await.map(|()| ExitCode::SUCCESS),
        Command::Keygen(a) => cli_auth::run_keygen(a).map(|()| ExitCode::SUCCESS),
        Command::Token(a) => cli_auth::run_token(a).map(|()| ExitCode::SUCCESS),
        Command::Ca(a) => ca(a).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

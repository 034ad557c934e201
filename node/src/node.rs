//! The node: hosts gears, routes calls, and serves everything it exposes on one listening port.
//!
//! [`Node::builder`] collects configuration and gears; [`NodeBuilder::build`] validates them;
//! [`Node::start`] binds the port and returns a [`RunningNode`], which is shut down gracefully
//! (stop accepting, let calls in flight finish up to the drain timeout) by [`RunningNode::shutdown`].

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, OnceLock, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use gearmesh_gears::{
    BoxFuture, Call, CallError, Ctx, Dispatch, Gear, GearError, Payload, Principal, Publish, Strategy,
    host::{Host, HostConfig, Start},
};
use gearmesh_mesh::Mesh;
use gearmesh_transport::{
    NodeId,
    acme::{AcmeStatus, Http01Tokens},
    https::{self, ServeOptions},
    quic::QuicEndpoint,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tokio::{net::TcpListener, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    NodeConfig, authn, builtin,
    config::ConfigError,
    interface::{Interface, Telemetry},
    links::{self, LinksError},
};

/// Building a node failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A gear definition is invalid.
    #[error(transparent)]
    Gear(#[from] GearError),
    /// `--gears` named a built-in gear that does not exist.
    #[error("unknown built-in gear {0:?} (known: {known})", known = builtin::NAMES.join(", "))]
    UnknownBuiltin(String),
    /// No authentication is configured and insecure development mode was not asked for.
    #[error(
        "refusing to start without authentication: give a key with --auth-key FILE (make one with `gearmesh \
         keygen --out FILE`) or an identity provider's keys with --auth-jwks FILE|URL (or [auth] keys/jwks in \
         the config file, GEARMESH_AUTH_KEYS/GEARMESH_AUTH_JWKS); only for local development, run without \
         authentication with --insecure-dev"
    )]
    NoAuth,
    /// The authentication configuration could not be loaded (a key file, a JWKS).
    #[error(transparent)]
    Auth(#[from] gearmesh_auth::SetupError),
    /// A pipeline file of `pipelines` could not be read or is invalid.
    #[error("pipeline file {path}: {message}")]
    Pipeline {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// Ports a node listening on a random port tries before giving up when the UDP port of the
/// same number is taken each time (see [`Node::start`]).
const PORT_ATTEMPTS: u32 = 8;

/// Starting a node failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The listening address could not be bound (in use, not local, no permission).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A gear could not be hosted.
    #[error(transparent)]
    Gear(#[from] GearError),
    /// TLS or the mesh could not be set up.
    #[error(transparent)]
    Links(#[from] LinksError),
}

/// Collects a node's configuration and gears.
#[derive(Debug, Default)]
pub struct NodeBuilder {
    config: NodeConfig,
    gears: Vec<Gear>,
}

impl NodeBuilder {
    /// Replaces the whole configuration.
    #[must_use]
    pub fn config(mut self, config: NodeConfig) -> Self {
        self.config = config;
        self
    }

    /// Sets the node's name.
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = Some(name.into());
        self
    }

    /// Sets the listening address (port 0 picks a free port).
    #[must_use]
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.config.listen = addr;
        self
    }

    /// Sets where the node's certificate comes from (default: the development CA).
    #[must_use]
    pub fn tls(mut self, tls: crate::TlsConfig) -> Self {
        self.config.tls = tls;
        self
    }

    /// Runs without authentication (development only; logged loudly at start).
    #[must_use]
    pub fn insecure_dev(mut self, yes: bool) -> Self {
        self.config.insecure_dev = yes;
        self
    }

    /// Sets the authentication configuration (key sources, audience, gear permissions).
    #[must_use]
    pub fn auth(mut self, auth: gearmesh_auth::AuthConfig) -> Self {
        self.config.auth = auth;
        self
    }

    /// Hosts a gear.
    #[must_use]
    pub fn gear(mut self, gear: Gear) -> Self {
        self.gears.push(gear);
        self
    }

    /// Validates everything and produces a node ready to start.
    ///
    /// # Errors
    /// Invalid configuration, an invalid gear, an unknown built-in gear, or no authentication.
    pub fn build(self) -> Result<Node, BuildError> {
        let Self { mut config, mut gears } = self;
        config.validate()?;
        let auth = authn::load(&mut config)?;
        for name in builtin::expand(&config.gears).map_err(BuildError::UnknownBuiltin)? {
            gears.extend(builtin::by_name(name));
        }
        for g in &gears {
            g.validate()?;
        }
        let mut names: Vec<&str> = gears.iter().map(Gear::name).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(GearError::DuplicateGear(w[0].to_owned()).into());
        }
        let pipelines = crate::pipeline::Pipelines::new(crate::pipeline::Limits::default());
        if gears.iter().any(|g| builtin::SHOP.contains(&g.name())) {
            pipelines.define(crate::pipeline::order_pipeline()).map_err(|e| BuildError::Pipeline {
                path: "(built-in order)".into(),
                message: e.message().to_owned(),
            })?;
        }
        for path in &config.pipelines {
            let fail = |message: String| BuildError::Pipeline { path: path.display().to_string(), message };
            let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
            let def = crate::pipeline::parse(&text).map_err(fail)?;
            pipelines.define(def).map_err(|e| fail(e.message().to_owned()))?;
        }
        // The node's own gear for running its pipelines from gears (`ctx.call("pipelines", ...)`).
        if gears.iter().all(|g| g.name() != crate::pipeline::gear::GEAR) {
            gears.push(crate::pipeline::gear::gear(pipelines.clone()));
        }
        Ok(Node { config, gears, auth, pipelines })
    }
}

/// A validated node, not yet listening.
#[derive(Debug)]
pub struct Node {
    config: NodeConfig,
    gears: Vec<Gear>,
    auth: Option<gearmesh_auth::Auth>,
    pipelines: Arc<crate::pipeline::Pipelines>,
}

/// Routes calls: to a gear hosted here (in-process, no serialization between typed gears), else
/// across the mesh to a node hosting it. A call that names a strategy or retry policy, or whose
/// gear has a default strategy, goes through the mesh's strategy layer
/// ([`Mesh::call_with_strategy`], see `docs/strategies.md`).
pub(crate) struct Router {
    host: Arc<Host>,
    /// Set once at start, right after the mesh driver exists (it needs the host first).
    mesh: OnceLock<Mesh>,
    /// Checks each call's caller (`authn::authorize_call`); `None` in insecure development mode.
    auth: Option<gearmesh_auth::Auth>,
    /// Samples calls into traces for observers (set once at start, with the mesh).
    telemetry: OnceLock<Arc<Telemetry>>,
    /// The default strategy of calls to a gear that name none (`[strategies]`, plus `kv` =
    /// shard); a short list scanned linearly, cheaper than hashing on the local fast path.
    defaults: Vec<(String, Strategy)>,
}

/// The strategies of `[strategies]`, on top of the built-in default (`kv` is sharded).
fn default_strategies(config: &NodeConfig) -> Vec<(String, Strategy)> {
    let mut map = std::collections::BTreeMap::from([("kv".to_owned(), Strategy::Shard(None))]);
    for (gear, s) in &config.strategies {
        // Checked by `NodeConfig::validate`.
        if let Ok(s) = s.parse() {
            map.insert(gear.clone(), s);
        }
    }
    map.into_iter().filter(|(_, s)| *s != Strategy::LocalFirst).collect()
}

impl Dispatch for Router {
    fn call<'a>(&'a self, call: Call<'a>) -> BoxFuture<'a, Result<Payload, CallError>> {
        if let Err(e) = authn::authorize_call(self.auth.as_ref(), &call) {
            return Box::pin(std::future::ready(Err(e)));
        }
        let default = self.defaults.iter().find(|(g, _)| g == call.gear).map(|(_, s)| s);
        if !call.meta.is_plain() || default.is_some() {
            let mut call = call;
            if call.meta.strategy.is_none() {
                call.meta.strategy = default.cloned();
            }
            return match self.mesh.get() {
                Some(mesh) => Box::pin(mesh.call_with_strategy(call)),
                None => Box::pin(std::future::ready(Err(CallError::unavailable("the mesh is not started yet")))),
            };
        }
        let (gear, port, trace_id) = (call.gear, call.port, call.meta.trace_id);
        match self.host.start(call) {
            Start::Running(fut) => match self.telemetry.get() {
                // A sampled local call: this node called itself.
                Some(t) if t.sample() => Box::pin(async move {
                    let started = Instant::now();
                    let result = fut.await;
                    t.trace(t.me(), gear, port, started.elapsed(), result.as_ref().map(|_| ()), Some(trace_id));
                    result
                }),
                _ => fut,
            },
            // The local replica is at its concurrency limit: another node's replica takes the
            // call if there is one (load shedding that the default strategy routes around).
            Start::Busy(call, e) => match self.mesh.get() {
                Some(mesh) if mesh.gear_is_remote(call.gear) => Box::pin(mesh.call(call)),
                _ => Box::pin(std::future::ready(Err(e))),
            },
            Start::NotHosted(call) => match self.mesh.get() {
                Some(mesh) => Box::pin(mesh.call(call)),
                None => {
                    let e = CallError::not_found(format!("no gear named {:?} in the mesh", call.gear));
                    Box::pin(std::future::ready(Err(e)))
                }
            },
        }
    }

    /// Local listeners get the event through their queues; every other node with a listener for
    /// the topic gets one copy over the mesh (nodes without one get nothing).
    fn publish(&self, publish: Publish) -> Result<(), CallError> {
        if publish.topic.starts_with(crate::interface::SYSTEM_TOPIC_PREFIX) {
            return Err(CallError::forbidden(format!(
                "{:?} is a system topic; only nodes publish there",
                publish.topic
            )));
        }
        authn::authorize_publish(self.auth.as_ref(), &publish)?;
        self.host.publish_local(&publish)?;
        if let Some(mesh) = self.mesh.get() {
            mesh.publish(&publish);
        }
        Ok(())
    }
}

/// What request handlers share.
pub(crate) struct NodeShared {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) config: NodeConfig,
    pub(crate) host: Arc<Host>,
    pub(crate) router: Arc<Router>,
    pub(crate) metrics: PrometheusHandle,
    pub(crate) started: Instant,
    pub(crate) started_at: SystemTime,
    pub(crate) local_addr: SocketAddr,
    pub(crate) draining: AtomicBool,
    pub(crate) mesh: Mesh,
    /// `https` or `http`.
    pub(crate) scheme: &'static str,
    /// The URLs other nodes dial this one at.
    pub(crate) link_addrs: Vec<String>,
    /// The mesh link acceptor (for what it turned away).
    pub(crate) acceptor: gearmesh_transport::Acceptor,
    /// The development CA's certificate file, in TLS `dev` mode.
    pub(crate) dev_ca_cert: Option<PathBuf>,
    /// Token authentication; `None` in insecure development mode (see `authn`).
    pub(crate) auth: Option<gearmesh_auth::Auth>,
    /// The WebSocket interface at `/v1/mesh`.
    pub(crate) interface: Arc<Interface>,
    /// Pipeline definitions and runs.
    pub(crate) pipelines: Arc<crate::pipeline::Pipelines>,
    /// The ACME client's status and HTTP-01 answers, in TLS `acme` mode.
    pub(crate) acme: Option<AcmeParts>,
}

/// What request handlers see of the ACME client.
pub(crate) struct AcmeParts {
    /// The live status: readiness, metrics, `/v1/node`.
    pub(crate) status: tokio::sync::watch::Receiver<AcmeStatus>,
    /// HTTP-01 answers for `/.well-known/acme-challenge/{token}`.
    pub(crate) http01: Http01Tokens,
}

impl NodeShared {
    pub(crate) fn dispatch(&self) -> Arc<dyn Dispatch> {
        self.router.clone()
    }
}

impl Node {
    /// A builder with the default configuration and no gears.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    /// Binds the listening port, hosts the gears and starts serving.
    ///
    /// # Errors
    /// The port cannot be bound, or a gear cannot be hosted.
    pub async fn start(self) -> Result<RunningNode, StartError> {
        let Self { config, gears, auth, pipelines } = self;
        if config.insecure_dev {
            tracing::warn!(
                "INSECURE DEVELOPMENT MODE: no authentication; anyone who can reach {} can call every gear",
                config.listen
            );
        }
        let recorder = PrometheusBuilder::new().build_recorder();
        let metrics = recorder.handle();
        let recorder: Arc<PrometheusRecorder> = Arc::new(recorder);
        let host_config = HostConfig {
            default_timeout: Duration::from_millis(config.calls.default_timeout_ms),
            max_timeout: Duration::from_millis(config.calls.max_timeout_ms),
            listener_queue: config.calls.listener_queue,
            ..HostConfig::default()
        };
        let host = Host::new(host_config, Some(recorder));
        let defaults = default_strategies(&config);
        let router = Arc::new(Router {
            host: host.clone(),
            mesh: OnceLock::new(),
            auth: auth.clone(),
            telemetry: OnceLock::new(),
            defaults,
        });
        let front: Weak<dyn Dispatch> = Arc::downgrade(&(router.clone() as Arc<dyn Dispatch>));
        host.set_front(front);
        for g in gears {
            let meta = host.add_gear(g)?;
            tracing::info!(gear = %meta.name, version = %meta.version, ports = meta.ports.len(), "gear hosted");
        }

        let node_id = NodeId::random();
        let id = node_id.to_string();
        let name = config.name.clone().unwrap_or_else(|| format!("node-{}", &id[..8]));
        // QUIC listens on the UDP port with the TCP port's number. A port picked at random
        // (`listen` port 0) is free for TCP but may be taken for UDP (by another process's QUIC
        // client endpoint, say): then another one is picked, a few times at most.
        let mut attempts = 0;
        let (listener, local_addr, tls, acme, acme_http, parts) = loop {
            attempts += 1;
            let listener = TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind { addr: config.listen, source })?;
            let local_addr =
                listener.local_addr().map_err(|source| StartError::Bind { addr: config.listen, source })?;
            let mut tls = links::node_tls(&config, local_addr)?;
            let acme = tls.as_mut().and_then(|t| t.acme.take());
            let acme_http = match (&acme, config.tls.acme_http_listen) {
                (Some(_), Some(addr)) => {
                    Some(TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })?)
                }
                _ => None,
            };
            match links::start_mesh(&config, node_id, &name, local_addr, tls.as_ref(), host.clone(), auth.as_ref()) {
                Ok(parts) => break (listener, local_addr, tls, acme, acme_http, parts),
                Err(e) if e.udp_port_taken() && config.listen.port() == 0 && attempts < PORT_ATTEMPTS => {
                    tracing::debug!(port = local_addr.port(), "UDP port taken; picking another port");
                }
                Err(e) => return Err(e.into()),
            }
        };
        if tls.is_none() {
            tracing::warn!("TLS IS OFF (insecure development mode): HTTP and mesh links are plaintext");
        }
        let acme_parts = acme.as_ref().map(|a| AcmeParts { status: a.status(), http01: a.http01() });
        if let Some(a) = &auth {
            parts.mesh.set_authorizer(Arc::new(authn::MeshAuthorizer(a.clone())));
        }
        if router.mesh.set(parts.mesh.clone()).is_err() {
            tracing::error!("the mesh was wired twice; keeping the first");
        }
        let shutdown = CancellationToken::new();
        let telemetry = Telemetry::new(
            id.clone(),
            name.clone(),
            host.clone(),
            parts.mesh.clone(),
            config.interface.traces_per_second,
        );
        let _first = router.telemetry.set(telemetry.clone());
        let interface = Interface::start(
            config.interface.clone(),
            host.clone(),
            parts.mesh.clone(),
            telemetry,
            pipelines.subscribe(),
            shutdown.clone(),
        );
        let shared = Arc::new(NodeShared {
            id,
            name,
            config,
            host,
            router,
            metrics,
            started: Instant::now(),
            started_at: SystemTime::now(),
            local_addr,
            draining: AtomicBool::new(false),
            mesh: parts.mesh,
            scheme: if tls.is_some() { "https" } else { "http" },
            link_addrs: parts.addrs,
            acceptor: parts.acceptor,
            dev_ca_cert: tls.as_ref().and_then(|t| t.dev_ca_cert.clone()),
            auth,
            interface,
            acme: acme_parts,
            pipelines,
        });
        authn::start(shared.auth(), &shutdown).await;
        let stop_accepting = CancellationToken::new();
        let upkeep = tokio::spawn(metrics_upkeep(shared.metrics.clone(), shutdown.clone()));
        let app = crate::api::router(shared.clone()).merge(parts.link_router);
        if let (Some(client), Some(t)) = (acme, &tls) {
            // Renewals swap into the resolver that HTTPS, WSS and QUIC all serve from.
            drop(client.spawn(t.resolver.clone(), shutdown.clone()));
        }
        if let (Some(listener), Some(a)) = (acme_http, &shared.acme) {
            let serve = gearmesh_transport::acme::serve_http01(
                listener,
                a.http01.clone(),
                local_addr.port(),
                stop_accepting.clone(),
            );
            tokio::spawn(serve);
        }
        let server_tls = tls.map(|t| t.server);
        let opts = ServeOptions {
            max_connections: shared.config.http.max_connections,
            drain_timeout: shared.config.calls.drain_timeout(),
            ..ServeOptions::default()
        };
        let server = tokio::spawn(https::serve(listener, server_tls, app, opts, stop_accepting.clone()));
        let lifecycle = tokio::spawn(lifecycle(shared.clone(), shutdown.clone(), stop_accepting, server, parts.quic));
        tracing::info!(node = %shared.name, id = %shared.id, addr = %local_addr, links = ?shared.link_addrs, "node listening");
        Ok(RunningNode { shared, shutdown, lifecycle, upkeep })
    }
}

/// Waits for the shutdown token, then leaves gracefully: readiness turns 503 and the mesh hears
/// of the leave first (so peers stop routing here), then the port stops accepting, HTTP requests
/// and calls from other nodes finish (up to the drain timeout), and last the links close.
async fn lifecycle(
    shared: Arc<NodeShared>,
    shutdown: CancellationToken,
    stop_accepting: CancellationToken,
    server: JoinHandle<()>,
    quic: Option<QuicEndpoint>,
) {
    shutdown.cancelled().await;
    // One drain deadline for everything: HTTP requests and calls from other nodes.
    let deadline = Instant::now() + shared.config.calls.drain_timeout();
    shared.draining.store(true, Ordering::Relaxed);
    shared.mesh.announce_leave().await;
    stop_accepting.cancel();
    if let Err(e) = server.await {
        tracing::error!(error = %e, "server task failed");
    }
    while shared.host.in_flight() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shared.mesh.stop().await;
    if let Some(q) = quic {
        q.close();
        // Let connections finish closing so the UDP port is released with the endpoint (a
        // restart on the same port must not find it in use); bounded like the drain.
        let _idle = tokio::time::timeout(Duration::from_secs(2), q.wait_idle()).await;
    }
}

/// Histograms accumulate samples until they are summarized; do that periodically so memory stays
/// bounded even when nobody scrapes `/metrics`.
async fn metrics_upkeep(handle: PrometheusHandle, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => handle.run_upkeep(),
            () = shutdown.cancelled() => return,
        }
    }
}

/// A node that is serving. Dropping it does not stop it; call [`RunningNode::shutdown`].
#[derive(Debug)]
pub struct RunningNode {
    shared: Arc<NodeShared>,
    shutdown: CancellationToken,
    lifecycle: JoinHandle<()>,
    upkeep: JoinHandle<()>,
}

impl std::fmt::Debug for NodeShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeShared").field("id", &self.id).field("name", &self.name).finish_non_exhaustive()
    }
}

impl RunningNode {
    /// The address the node listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// The node's id (random per start).
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The dispatcher behind every call made on this node.
    pub fn dispatch(&self) -> Arc<dyn Dispatch> {
        self.shared.dispatch()
    }

    /// A context for calling gears from outside any gear, as `principal`.
    pub fn ctx(&self, principal: Principal) -> Ctx {
        Ctx::new(self.dispatch(), principal)
    }

    /// The in-process gear host.
    pub fn host(&self) -> &Arc<Host> {
        &self.shared.host
    }

    /// The node's pipelines (define, call, cast, and their events).
    pub fn pipelines(&self) -> &Arc<crate::pipeline::Pipelines> {
        &self.shared.pipelines
    }

    /// A token that, when cancelled, starts a graceful shutdown (for signal handlers).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Shuts down gracefully: `/readyz` turns 503, the port stops accepting, requests in flight
    /// finish (up to the drain timeout), then the server stops.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.wait().await;
    }

    /// Waits until the node has stopped (after [`RunningNode::shutdown_token`] was cancelled).
    pub async fn wait(self) {
        if let Err(e) = self.lifecycle.await {
            tracing::error!(error = %e, "shutdown task failed");
        }
        self.upkeep.abort();
        tracing::info!(node = %self.shared.name, "node stopped");
    }

    /// The mesh this node is part of.
    pub fn mesh(&self) -> &Mesh {
        &self.shared.mesh
    }

    /// The base URL of the node's HTTP API (`https://` unless TLS is off).
    pub fn url(&self) -> String {
        format!("{}://{}", self.shared.scheme, self.shared.local_addr)
    }

    /// The URLs other nodes dial this one at (use one as another node's seed).
    pub fn link_addrs(&self) -> &[String] {
        &self.shared.link_addrs
    }

    /// The development CA's certificate (PEM file) clients should trust, in TLS `dev` mode.
    pub fn dev_ca_cert(&self) -> Option<&std::path::Path> {
        self.shared.dev_ca_cert.as_deref()
    }

    /// Whether a shutdown has started.
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Relaxed)
    }
}

//! The WebSocket interface at `/v1/mesh`: observers watch the mesh live, drivers call ports and
//! publish events, and clients in any language serve gears of their own. JSON text messages,
//! versioned (`"v": 1`); the specification is `docs/interface.md`.
//!
//! - `watch`: the node's one shared stream (mesh changes, events, traces, stats) and snapshots.
//! - `serve`: gears served by clients.
//! - `proto`: parsing what clients send.
//!
//! This file: the upgrade (a connection limit, the token from the `Authorization` header or a
//! `bearer.<token>` subprotocol offer, or else a first `auth` message) and each connection's
//! loop. Close codes: 4401 (no, bad or expired token), 4403 (the token grants nothing this
//! interface offers), 1009 (a message over `interface.max_message_bytes`), 1001 (the node is
//! shutting down). Other bad input gets an `error` message and the connection goes on.

mod proto;
mod serve;
mod watch;

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Json,
    extract::{
        State,
        ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection},
    },
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use gearmesh_auth::{
    AuthError, Permission, Scopes, WS_PROTOCOL, WsProtocolOffer, bearer_from_authorization, token_from_auth_message,
};
use gearmesh_gears::{
    Arg, Call, CallError, CallMeta, Event, Payload, Principal, Publish, TraceId, WireBody, host::Host,
};
use gearmesh_mesh::Mesh;
use serde_json::{Value, json};
use tokio::{
    sync::{Semaphore, broadcast::error::RecvError, mpsc},
    task::JoinSet,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use self::serve::Served;
use self::{
    proto::{ClientMsg, VERSION},
    watch::{Kind, RUNS_TOPIC, STATS_TOPIC, StreamMsg, TRACES_TOPIC, Watch},
};
use crate::{InterfaceConfig, api::ApiError, node::NodeShared};
pub(crate) use proto::SYSTEM_TOPIC_PREFIX;
pub(crate) use watch::Telemetry;

/// WebSocket close codes of the interface.
mod close {
    /// No token, a bad one, or it expired.
    pub(super) const UNAUTHORIZED: u16 = 4401;
    /// The token grants nothing the interface offers.
    pub(super) const FORBIDDEN: u16 = 4403;
    /// A message larger than the limit.
    pub(super) const TOO_BIG: u16 = 1009;
    /// The node is going away.
    pub(super) const GOING_AWAY: u16 = 1001;
}

/// Counts connected clients (bounded by `interface.max_clients`).
#[derive(Debug, Default)]
pub(crate) struct Clients(AtomicUsize);

impl Clients {
    pub(crate) fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// One connected client's slot; frees it on drop.
struct ClientSlot(Arc<Clients>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The interface of one node.
pub(crate) struct Interface {
    config: InterfaceConfig,
    host: Arc<Host>,
    mesh: Mesh,
    watch: Arc<Watch>,
    clients: Arc<Clients>,
    shutdown: CancellationToken,
}

impl Interface {
    /// Starts the watcher and the stats publisher; they stop with `shutdown`.
    pub(crate) fn start(
        config: InterfaceConfig,
        host: Arc<Host>,
        mesh: Mesh,
        telemetry: Arc<Telemetry>,
        runs: tokio::sync::broadcast::Receiver<crate::pipeline::PipelineEvent>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        mesh.set_call_observer(telemetry.clone());
        let tap_queue = host.config().listener_queue;
        let watch = Watch::new(host.clone(), mesh.clone(), config.buffer, tap_queue, telemetry.clone());
        let clients = Arc::new(Clients::default());
        tokio::spawn(watch.clone().run(shutdown.clone()));
        let interval = Duration::from_millis(config.stats_interval_ms);
        tokio::spawn(telemetry.clone().run_stats(interval, clients.clone(), shutdown.clone()));
        tokio::spawn(telemetry.run_pipelines(runs, shutdown.clone()));
        Arc::new(Self { config, host, mesh, watch, clients, shutdown })
    }

    /// Connected clients now.
    pub(crate) fn clients(&self) -> usize {
        self.clients.count()
    }
}

/// `GET /v1/mesh`: the upgrade. Authentication happens on the socket (close 4401/4403), because
/// a browser shows a script nothing of a refused upgrade.
pub(crate) async fn upgrade(
    State(shared): State<Arc<NodeShared>>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let iface = shared.interface.clone();
    let ws = match ws {
        Ok(ws) => ws,
        Err(r) => {
            let e = CallError::bad_request(format!("/v1/mesh is a WebSocket endpoint: {}", r.body_text()));
            return ApiError(e, r.status()).into_response();
        }
    };
    let previous = iface.clients.0.fetch_add(1, Ordering::Relaxed);
    let slot = ClientSlot(iface.clients.clone());
    if previous >= iface.config.max_clients {
        let e =
            CallError::overloaded(format!("this node serves {} interface clients at most", iface.config.max_clients));
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "error": e }))).into_response();
    }
    let token = token_from_upgrade(&headers);
    ws.protocols([WS_PROTOCOL])
        .max_message_size(iface.config.max_message_bytes)
        .max_frame_size(iface.config.max_message_bytes)
        // Small buffers: an idle observer should cost little (10,000 of them per node; see
        // BENCHMARKS.md). Larger messages grow the read buffer as they arrive; TLS below has its
        // own record buffers, so a small read size costs copies, not system calls.
        .read_buffer_size(1024)
        .write_buffer_size(4 * 1024)
        .on_upgrade(move |socket| async move {
            let _slot = slot;
            Conn::run(socket, shared, token).await;
        })
}

/// The token in the upgrade request: `Authorization: Bearer`, else a `bearer.<token>` subprotocol
/// offer. `Some(Err)` for a malformed header (refused on the socket).
fn token_from_upgrade(headers: &HeaderMap) -> Option<Result<String, AuthError>> {
    if let Some(h) = headers.get(header::AUTHORIZATION) {
        return Some(bearer_from_authorization(h.to_str().ok()).map(str::to_owned));
    }
    let offers = headers.get_all(header::SEC_WEBSOCKET_PROTOCOL).iter().filter_map(|v| v.to_str().ok());
    WsProtocolOffer::parse(offers).token.map(|t| Ok(t.to_owned()))
}

/// What a connection's token allows: `None` in insecure development mode (everything).
struct Grant {
    principal: Principal,
    scopes: Option<Scopes>,
    expires: Option<Instant>,
}

impl Grant {
    fn check(&self, needed: &Permission) -> Result<(), CallError> {
        match &self.scopes {
            None => Ok(()),
            Some(s) => s.check(needed).map_err(|e| CallError::forbidden(format!("{}: {e}", self.principal))),
        }
    }
}

/// A close frame; the reason is cut to the protocol's 123 bytes.
fn close_frame(code: u16, reason: &str) -> Message {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Message::Close(Some(CloseFrame { code, reason: Utf8Bytes::from(&reason[..end]) }))
}

/// What a subscription asks for besides event topics.
struct Wants {
    mesh: bool,
    traces: bool,
    stats: bool,
    pipelines: bool,
}

/// The client's subscription.
struct Sub {
    id: Option<Value>,
    mesh: bool,
    traces: bool,
    stats: bool,
    pipelines: bool,
    topics: HashSet<String>,
    rx: tokio::sync::broadcast::Receiver<Arc<StreamMsg>>,
}

impl Sub {
    fn wants(&self, m: &StreamMsg) -> bool {
        match m.kind {
            Kind::Mesh => self.mesh,
            Kind::Trace => self.traces,
            Kind::Stats => self.stats,
            Kind::Run => self.pipelines,
            Kind::Event => m.topic.as_ref().is_some_and(|t| self.topics.contains(t)),
        }
    }

    /// Every tap topic this subscription holds.
    fn taps(&self) -> impl Iterator<Item = &str> {
        let system = [(self.traces, TRACES_TOPIC), (self.stats, STATS_TOPIC), (self.pipelines, RUNS_TOPIC)];
        system.into_iter().filter(|(on, _)| *on).map(|(_, t)| t).chain(self.topics.iter().map(String::as_str))
    }
}

/// One client connection.
struct Conn {
    shared: Arc<NodeShared>,
    iface: Arc<Interface>,
    socket: WebSocket,
    grant: Grant,
    out_tx: mpsc::Sender<String>,
    sub: Option<Sub>,
    served: Arc<Served>,
    requests: Arc<Semaphore>,
    tasks: JoinSet<()>,
}

/// Why a connection ends.
enum End {
    Close(u16, String),
    Gone,
}

impl Conn {
    async fn run(
        mut socket: WebSocket,
        shared: Arc<NodeShared>,
        token: Option<Result<String, gearmesh_auth::AuthError>>,
    ) {
        let iface = shared.interface.clone();
        let grant = match authenticate(&shared, &iface, &mut socket, token).await {
            Ok(g) => g,
            Err(End::Close(code, reason)) => {
                tracing::debug!(code, %reason, "interface client refused");
                let _gone = socket.send(close_frame(code, &reason)).await;
                return;
            }
            Err(End::Gone) => return,
        };
        let queue = iface.config.max_requests + iface.config.max_served_calls + 16;
        let (out_tx, out_rx) = mpsc::channel(queue);
        let served = Served::new(out_tx.clone(), iface.host.clone(), iface.mesh.clone(), iface.config.max_served_calls);
        let requests = Arc::new(Semaphore::new(iface.config.max_requests));
        let mut conn =
            Conn { shared, iface, socket, grant, out_tx, sub: None, served, requests, tasks: JoinSet::new() };
        tracing::debug!(principal = %conn.grant.principal, "interface client connected");
        let end = conn.serve(out_rx).await;
        conn.served.close();
        conn.unsubscribe();
        if let Err(End::Close(code, reason)) = end {
            let _gone = conn.socket.send(close_frame(code, &reason)).await;
        }
        tracing::debug!(principal = %conn.grant.principal, "interface client gone");
    }

    async fn send(&mut self, text: impl Into<Utf8Bytes>) -> Result<(), End> {
        self.socket.send(Message::Text(text.into())).await.map_err(|_| End::Gone)
    }

    async fn serve(&mut self, mut out_rx: mpsc::Receiver<String>) -> Result<std::convert::Infallible, End> {
        let welcome = json!({
            "v": VERSION, "type": "welcome",
            "node": { "id": self.shared.id, "name": self.shared.name, "mesh": self.shared.config.mesh.name },
            "principal": self.grant.principal.to_string(),
            "scopes": self.grant.scopes.as_ref().map(Scopes::to_strings),
            "insecure_dev": self.grant.scopes.is_none(),
            "limits": {
                "max_message_bytes": self.iface.config.max_message_bytes,
                "buffer": self.iface.config.buffer,
                "max_requests": self.iface.config.max_requests,
                "max_served_calls": self.iface.config.max_served_calls,
                "max_topics": self.iface.config.max_topics,
            },
        });
        self.send(welcome.to_string()).await?;
        let expires = self.grant.expires;
        let shutdown = self.iface.shutdown.clone();
        loop {
            while self.tasks.try_join_next().is_some() {}
            tokio::select! {
                msg = self.socket.recv() => match msg {
                    None | Some(Ok(Message::Close(_))) => return Err(End::Gone),
                    Some(Err(e)) => {
                        // tungstenite reports an oversized message as a capacity error.
                        let text = e.to_string();
                        if text.contains("Space limit exceeded") || text.to_lowercase().contains("too long")
                            || text.to_lowercase().contains("capacity")
                        {
                            return Err(End::Close(close::TOO_BIG, format!(
                                "message larger than {} bytes", self.iface.config.max_message_bytes
                            )));
                        }
                        return Err(End::Gone);
                    }
                    Some(Ok(Message::Text(t))) => self.handle(t.as_str()).await?,
                    Some(Ok(Message::Binary(_))) => {
                        let e = CallError::bad_request("binary messages are not part of the interface; send JSON text");
                        self.send(proto::error(None, &e).to_string()).await?;
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                },
                Some(text) = out_rx.recv() => self.send(text).await?,
                m = recv_stream(&mut self.sub) => self.stream(m).await?,
                () = sleep_until(expires) => {
                    return Err(End::Close(close::UNAUTHORIZED, "token expired".into()));
                }
                () = shutdown.cancelled() => {
                    return Err(End::Close(close::GOING_AWAY, "node shutting down".into()));
                }
            }
        }
    }

    async fn stream(&mut self, m: Result<Arc<StreamMsg>, RecvError>) -> Result<(), End> {
        match m {
            Ok(m) => {
                if self.sub.as_ref().is_some_and(|s| s.wants(&m)) {
                    self.send(m.text.clone()).await?;
                }
                Ok(())
            }
            Err(RecvError::Lagged(n)) => {
                let lagged = json!({ "v": VERSION, "type": "lagged", "dropped": n });
                self.send(lagged.to_string()).await?;
                let id = self.sub.as_ref().and_then(|s| s.id.clone());
                let mut snap = self.iface.watch.snapshot();
                snap["id"] = id.unwrap_or(Value::Null);
                self.send(snap.to_string()).await
            }
            Err(RecvError::Closed) => Err(End::Close(close::GOING_AWAY, "node shutting down".into())),
        }
    }

    async fn reply(&mut self, v: &Value) -> Result<(), End> {
        self.send(v.to_string()).await
    }

    async fn handle(&mut self, text: &str) -> Result<(), End> {
        let msg = match proto::parse(text) {
            Ok(m) => m,
            Err((id, e)) => return self.reply(&proto::error(id.as_ref(), &e)).await,
        };
        match msg {
            ClientMsg::Auth { .. } => {
                let e = CallError::bad_request("already authenticated (auth is only the first message)");
                self.reply(&proto::error(None, &e)).await
            }
            ClientMsg::Subscribe { id, mesh, traces, stats, pipelines, topics, .. } => {
                match self.subscribe(id.clone(), Wants { mesh, traces, stats, pipelines }, topics) {
                    Ok(mut snap) => {
                        snap["id"] = id.unwrap_or(Value::Null);
                        self.reply(&snap).await
                    }
                    Err(e) => self.reply(&proto::error(id.as_ref(), &e)).await,
                }
            }
            ClientMsg::Unsubscribe { id, .. } => {
                self.unsubscribe();
                self.reply(&json!({ "v": VERSION, "type": "ack", "id": id })).await
            }
            ClientMsg::Status { id, .. } => {
                let v = match self.grant.check(&Permission::Observe) {
                    Ok(()) => self.status(id.as_ref()),
                    Err(e) => proto::error(id.as_ref(), &e),
                };
                self.reply(&v).await
            }
            ClientMsg::Call {
                id,
                gear,
                port,
                arg,
                timeout_ms,
                strategy,
                key,
                gather,
                retry,
                per_try_timeout_ms,
                hedge_ms,
                ..
            } => {
                let (strategy, key, gather, retry) =
                    (strategy.as_deref(), key.as_deref(), gather.as_deref(), retry.as_deref());
                match crate::api::routing_from(strategy, key, gather, retry, per_try_timeout_ms, hedge_ms) {
                    Ok(routing) => self.call(id, gear, port, &arg, timeout_ms, routing).await,
                    Err(e) => self.reply(&proto::error(Some(&id), &e)).await,
                }
            }
            ClientMsg::Publish { id, topic, event, .. } => {
                let v = match self.publish(topic, &event) {
                    Ok(()) => json!({ "v": VERSION, "type": "ack", "id": id }),
                    Err(e) => proto::error(id.as_ref(), &e),
                };
                self.reply(&v).await
            }
            ClientMsg::Register { id, gear, version, description, ports, .. } => {
                let r = self
                    .grant
                    .check(&Permission::serve(&gear))
                    .and_then(|()| self.served.register(&gear, &version, description.as_deref(), &ports));
                let v = match r {
                    Ok(()) => json!({ "v": VERSION, "type": "registered", "id": id, "gear": gear }),
                    Err(e) => proto::error(id.as_ref(), &e),
                };
                self.reply(&v).await
            }
            ClientMsg::Unregister { id, gear, .. } => {
                let v = match self.served.unregister(&gear) {
                    Ok(()) => json!({ "v": VERSION, "type": "unregistered", "id": id, "gear": gear }),
                    Err(e) => proto::error(id.as_ref(), &e),
                };
                self.reply(&v).await
            }
            ClientMsg::Reply { call, ok, error, .. } => {
                let result = match (ok, error) {
                    (_, Some(e)) => Ok(Err(e)),
                    (Some(ok), None) => serve::payload_of(&ok).map(Ok),
                    (None, None) => Ok(Ok(Payload::json(Bytes::from_static(b"null")))),
                };
                match result.and_then(|r| self.served.reply(call, r)) {
                    Ok(()) => Ok(()),
                    Err(e) => self.reply(&proto::error(Some(&json!(call)), &e)).await,
                }
            }
        }
    }

    fn subscribe(&mut self, id: Option<Value>, wants: Wants, topics: Vec<String>) -> Result<Value, CallError> {
        self.grant.check(&Permission::Observe)?;
        if topics.len() > self.iface.config.max_topics {
            return Err(CallError::bad_request(format!(
                "at most {} topics per subscription",
                self.iface.config.max_topics
            )));
        }
        if let Some(t) = topics.iter().find(|t| watch::is_system_topic(t)) {
            return Err(CallError::bad_request(format!(
                "{t:?} is a system topic; ask for \"traces\" or \"stats\" instead"
            )));
        }
        for t in &topics {
            gearmesh_gears::Topic::new(t).map_err(|e| CallError::bad_request(e.to_string()))?;
        }
        self.unsubscribe();
        let (rx, snapshot) = self.iface.watch.subscribe();
        let Wants { mesh, traces, stats, pipelines } = wants;
        let sub = Sub { id, mesh, traces, stats, pipelines, topics: topics.into_iter().collect(), rx };
        let mut acquired = Vec::new();
        for t in sub.taps() {
            match self.iface.watch.acquire(t) {
                Ok(()) => acquired.push(t.to_owned()),
                Err(e) => {
                    for a in &acquired {
                        self.iface.watch.release(a);
                    }
                    return Err(e);
                }
            }
        }
        self.sub = Some(sub);
        Ok(snapshot)
    }

    fn unsubscribe(&mut self) {
        if let Some(sub) = self.sub.take() {
            for t in sub.taps() {
                self.iface.watch.release(t);
            }
        }
    }

    fn status(&self, id: Option<&Value>) -> Value {
        let s = &self.shared;
        json!({
            "v": VERSION, "type": "status", "id": id,
            "node": {
                "id": s.id, "name": s.name, "mesh": s.config.mesh.name, "version": env!("CARGO_PKG_VERSION"),
                "uptime_s": s.started.elapsed().as_secs_f64(),
                "gears": s.host.gears().iter().map(|g| g.name.to_string()).collect::<Vec<_>>(),
                "calls_in_flight": s.host.in_flight(),
                "links": s.link_addrs,
                "clients": self.iface.clients(),
            },
            "mesh": s.mesh.stats(),
        })
    }

    fn publish(&self, topic: String, event: &Value) -> Result<(), CallError> {
        if watch::is_system_topic(&topic) {
            return Err(CallError::forbidden(format!("{topic:?} is a system topic")));
        }
        let body = serde_json::to_vec(event).map_err(|e| CallError::bad_request(e.to_string()))?;
        let publisher = self.grant.principal.clone();
        let p = Publish { topic, event: Event::json(Bytes::from(body)), publisher, trace_id: TraceId::random() };
        self.shared.dispatch().publish(p)
    }

    async fn call(
        &mut self,
        id: Value,
        gear: String,
        port: String,
        arg: &Value,
        timeout_ms: Option<u64>,
        routing: crate::api::Routing,
    ) -> Result<(), End> {
        let Ok(permit) = self.requests.clone().try_acquire_owned() else {
            let e = CallError::overloaded(format!(
                "this connection has {} requests in flight already",
                self.iface.config.max_requests
            ));
            return self.reply(&proto::error(Some(&id), &e)).await;
        };
        let deadline = match timeout_ms {
            Some(0) => {
                let e = CallError::bad_request("timeout_ms must be greater than 0");
                return self.reply(&proto::error(Some(&id), &e)).await;
            }
            Some(ms) => Some(Instant::now() + Duration::from_millis(ms)),
            None => None,
        };
        let body = match serde_json::to_vec(arg) {
            Ok(b) => Bytes::from(b),
            Err(e) => return self.reply(&proto::error(Some(&id), &CallError::bad_request(e.to_string()))).await,
        };
        let mut meta = CallMeta::new(self.grant.principal.clone(), deadline);
        routing.apply(&mut meta);
        let dispatch = self.shared.dispatch();
        let out = self.out_tx.clone();
        self.tasks.spawn(async move {
            let call = Call { gear: &gear, port: &port, arg: Arg::json(body), meta };
            let result = dispatch.call(call).await.and_then(Payload::into_wire);
            let text = match result {
                Ok(WireBody::Json(b)) => result_text(&id, &b),
                Ok(WireBody::Bytes(_)) => {
                    let e =
                        CallError::bad_request("the port returned raw bytes; the interface carries JSON (use HTTP)");
                    proto::error(Some(&id), &e).to_string()
                }
                Err(e) => proto::error(Some(&id), &e).to_string(),
            };
            // The connection may be gone; then nobody waits for the result.
            let _gone = out.send(text).await;
            drop(permit);
        });
        Ok(())
    }
}

/// `{"v":1,"type":"result","id":..,"ok":<json>}` without re-parsing the port's JSON.
fn result_text(id: &Value, json: &[u8]) -> String {
    let body = std::str::from_utf8(json).unwrap_or("null");
    format!(r#"{{"v":{VERSION},"type":"result","id":{id},"ok":{body}}}"#)
}

async fn recv_stream(sub: &mut Option<Sub>) -> Result<Arc<StreamMsg>, RecvError> {
    match sub {
        Some(s) => s.rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The first step of a connection: the token from the upgrade request or a first `auth`
/// message, verified, and turned into what the connection may do.
async fn authenticate(
    shared: &NodeShared,
    iface: &Interface,
    socket: &mut WebSocket,
    token: Option<Result<String, AuthError>>,
) -> Result<Grant, End> {
    let Some(auth) = shared.auth() else {
        return Ok(Grant { principal: Principal::anonymous(), scopes: None, expires: None });
    };
    let refused = |e: &AuthError| End::Close(e.status().ws_close_code(), e.description());
    let token = match token {
        Some(Ok(t)) => t,
        Some(Err(e)) => return Err(refused(&e)),
        None => first_auth_message(socket, Duration::from_millis(iface.config.auth_timeout_ms)).await?,
    };
    let identity = auth.verifier.verify_with_refresh(&token).await.map_err(|e| refused(&e))?;
    let scopes = identity.scopes().clone();
    let usable = scopes.to_strings().iter().any(|s| {
        s == "observe" || s == "admin" || s.starts_with("call:") || s.starts_with("publish:") || s.starts_with("serve:")
    });
    if !usable {
        return Err(End::Close(
            close::FORBIDDEN,
            "the token grants none of observe, call:, publish:, serve: or admin".into(),
        ));
    }
    let left = identity.expires_at() - gearmesh_auth::unix_now();
    let expires = Some(Instant::now() + Duration::from_secs(u64::try_from(left).unwrap_or(0)));
    let principal = Principal::user(identity.subject(), scopes.to_strings());
    Ok(Grant { principal, scopes: Some(scopes), expires })
}

async fn first_auth_message(socket: &mut WebSocket, timeout: Duration) -> Result<String, End> {
    let unauthorized = |why: &str| End::Close(close::UNAUTHORIZED, why.to_owned());
    let first = tokio::time::timeout(timeout, socket.recv()).await.map_err(|_| {
        unauthorized("authentication required: send {\"v\":1,\"type\":\"auth\",\"token\":\"...\"} first")
    })?;
    match first {
        Some(Ok(Message::Text(t))) => token_from_auth_message(t.as_str()).map_err(|e| match e {
            AuthError::Missing => unauthorized("authentication required: the first message must be auth"),
            e => End::Close(e.status().ws_close_code(), e.description()),
        }),
        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => Err(End::Gone),
        Some(Ok(_)) => Err(unauthorized("authentication required: the first message must be auth")),
    }
}

impl std::fmt::Debug for Interface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interface").field("clients", &self.clients()).finish_non_exhaustive()
    }
}

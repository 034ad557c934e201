//! The HTTP API (axum): calls, events, node and gear listings, health, metrics.
//!
//! Every error has the same JSON shape, `{"error":{"code":"...","message":"..."}}` (plus
//! `"app_code"` for a port's own errors), with the status of [`ErrorCode::http_status`]. Every
//! response carries an `x-request-id` (the caller's, or a new one).

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, Query, Request, State, rejection::BytesRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use gearmesh_gears::{Arg, Call, CallError, CallMeta, ErrorCode, Event, Publish, Retry, Strategy, TraceId, WireBody};
use gearmesh_transport::acme::{AcmeState, AcmeStatus};
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;

use crate::{
    authn::{self, Caller},
    node::NodeShared,
    pipeline,
};

type Shared = Arc<NodeShared>;

/// The header carrying a request id.
const REQUEST_ID: &str = "x-request-id";
/// The header carrying the call's trace id back.
const TRACE_ID: &str = "x-trace-id";

pub(crate) fn router(shared: Shared) -> Router {
    let limit = shared.config.http.max_body_bytes;
    crate::dashboard::routes(Router::new())
        .route("/v1/call/{gear}/{port}", post(call))
        .route("/v1/events/{topic}", post(publish))
        .route("/v1/node", get(node_info))
        .route("/v1/gears", get(gears))
        .route("/v1/nodes", get(nodes))
        .route("/v1/routes", get(routes))
        .route("/v1/mesh", get(crate::interface::upgrade))
        .route("/v1/pipelines", get(pipeline::http::list).post(pipeline::http::define))
        .route("/v1/pipelines/runs/{id}", get(pipeline::http::status))
        .route("/v1/pipelines/{name}/call", post(pipeline::http::call))
        .route("/v1/pipelines/{name}/cast", post(pipeline::http::cast))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(authn::JWKS_PATH, get(authn::jwks))
        .route(gearmesh_transport::acme::HTTP01_ROUTE, get(acme_challenge))
        .route_layer(middleware::from_fn_with_state(shared.clone(), authn::authenticate))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(request_id))
        .with_state(shared)
}

/// An error response in the common shape.
pub(crate) struct ApiError(pub(crate) CallError, pub(crate) StatusCode);

impl From<CallError> for ApiError {
    fn from(e: CallError) -> Self {
        let status = StatusCode::from_u16(e.code().http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self(e, status)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.1, Json(json!({ "error": self.0 }))).into_response()
    }
}

fn body_error(rejection: &BytesRejection) -> ApiError {
    let status = rejection.status();
    let e = if status == StatusCode::PAYLOAD_TOO_LARGE {
        CallError::bad_request("request body is larger than the node's limit (http.max_body_bytes)")
    } else {
        CallError::bad_request(format!("cannot read request body: {}", rejection.body_text()))
    };
    ApiError(e, status)
}

async fn request_id(mut req: Request, next: Next) -> Response {
    let id = req.headers().get(REQUEST_ID).filter(|v| v.len() <= 128).cloned().unwrap_or_else(|| {
        HeaderValue::from_str(&format!("{:016x}", rand::random::<u64>())).unwrap_or(HeaderValue::from_static("0"))
    });
    req.headers_mut().insert(REQUEST_ID, id.clone());
    let span = tracing::debug_span!("request", id = ?id, method = %req.method(), path = %req.uri().path());
    let started = Instant::now();
    let mut resp = tracing::Instrument::instrument(next.run(req), span.clone()).await;
    span.in_scope(|| {
        tracing::debug!(status = resp.status().as_u16(), micros = started.elapsed().as_micros() as u64, "served");
    });
    resp.headers_mut().insert(REQUEST_ID, id);
    resp
}

/// The body's kind from its content type: JSON unless it says octet-stream.
fn is_raw(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/octet-stream"))
}

/// A JSON body, checked at the edge so malformed JSON is a 400 whatever the port takes.
/// An empty body stands for `null`.
fn json_body(body: Bytes) -> Result<Bytes, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Bytes::from_static(b"null"));
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(&body)
        .map_err(|e| ApiError::from(CallError::bad_request(format!("malformed JSON: {e}"))))?;
    Ok(body)
}

/// The trace id from a W3C `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`), if valid.
fn trace_from(headers: &HeaderMap) -> Option<TraceId> {
    let tp = headers.get("traceparent")?.to_str().ok()?;
    let mut parts = tp.split('-');
    let _version = parts.next()?;
    TraceId::parse(parts.next()?)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CallQuery {
    timeout_ms: Option<u64>,
    /// `local-first`, `spread`, `shard`, `scatter` or `broadcast`.
    strategy: Option<String>,
    /// The shard key (`strategy=shard`).
    key: Option<String>,
    /// `all`, `quorum` or K (`strategy=scatter`).
    gather: Option<String>,
    /// `auto` (idempotent ports only), `yes` or `no`.
    retry: Option<String>,
    /// A bound on each attempt, in milliseconds.
    per_try_timeout_ms: Option<u64>,
    /// Hedge after this many milliseconds.
    hedge_ms: Option<u64>,
}

/// How a call picks its replicas and retries, as its query or message asks (`None`s: the
/// node's defaults).
pub(crate) struct Routing {
    strategy: Option<Strategy>,
    retry: Retry,
    per_try_timeout: Option<Duration>,
    hedge_after: Option<Duration>,
}

impl Routing {
    /// Whether the call is a broadcast (answered at once, HTTP 202).
    pub(crate) fn is_broadcast(&self) -> bool {
        self.strategy == Some(Strategy::Broadcast)
    }

    /// Puts it in the call's metadata.
    pub(crate) fn apply(self, meta: &mut CallMeta) {
        meta.strategy = self.strategy;
        meta.retry = self.retry;
        meta.per_try_timeout = self.per_try_timeout;
        meta.hedge_after = self.hedge_after;
    }
}

/// The routing of a call from its query or message fields.
pub(crate) fn routing_from(
    strategy: Option<&str>,
    key: Option<&str>,
    gather: Option<&str>,
    retry: Option<&str>,
    per_try_timeout_ms: Option<u64>,
    hedge_ms: Option<u64>,
) -> Result<Routing, CallError> {
    let strategy = match strategy {
        Some(name) => Some(Strategy::from_parts(name, key, gather)?),
        None if key.is_some() => Some(Strategy::from_parts("shard", key, gather)?),
        None if gather.is_some() => Some(Strategy::from_parts("scatter", key, gather)?),
        None => None,
    };
    let retry = retry.map(str::parse).transpose()?.unwrap_or_default();
    let per_try_timeout = positive_ms("per_try_timeout_ms", per_try_timeout_ms)?;
    let hedge_after = positive_ms("hedge_ms", hedge_ms)?;
    Ok(Routing { strategy, retry, per_try_timeout, hedge_after })
}

/// An optional duration in milliseconds, refused when 0.
fn positive_ms(field: &str, ms: Option<u64>) -> Result<Option<Duration>, CallError> {
    match ms {
        Some(0) => Err(CallError::bad_request(format!("{field} must be greater than 0"))),
        ms => Ok(ms.map(Duration::from_millis)),
    }
}

async fn call(
    State(s): State<Shared>,
    Caller(caller): Caller,
    Path((gear, port)): Path<(String, String)>,
    query: Result<Query<CallQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::from(CallError::bad_request(e.body_text())))?;
    let body = body.map_err(|r| body_error(&r))?;
    let arg = if is_raw(&headers) { Arg::bytes(body) } else { Arg::json(json_body(body)?) };
    let deadline = match q.timeout_ms {
        Some(0) => return Err(CallError::bad_request("timeout_ms must be greater than 0").into()),
        Some(ms) => Some(Instant::now() + Duration::from_millis(ms)),
        None => None,
    };
    let routing = routing_from(
        q.strategy.as_deref(),
        q.key.as_deref(),
        q.gather.as_deref(),
        q.retry.as_deref(),
        q.per_try_timeout_ms,
        q.hedge_ms,
    )?;
    let status = if routing.is_broadcast() { StatusCode::ACCEPTED } else { StatusCode::OK };
    let mut meta = CallMeta::new(caller, deadline);
    routing.apply(&mut meta);
    if let Some(t) = trace_from(&headers) {
        meta.trace_id = t;
    }
    let trace = HeaderValue::from_str(&meta.trace_id.to_string()).ok();
    let dispatch = s.dispatch();
    let result = dispatch.call(Call { gear: &gear, port: &port, arg, meta }).await;
    let mut resp = match result.and_then(gearmesh_gears::Payload::into_wire) {
        Ok(WireBody::Json(b)) => (status, [(header::CONTENT_TYPE, "application/json")], b).into_response(),
        Ok(WireBody::Bytes(b)) => ([(header::CONTENT_TYPE, "application/octet-stream")], b).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    };
    if let Some(t) = trace {
        resp.headers_mut().insert(TRACE_ID, t);
    }
    Ok(resp)
}

async fn publish(
    State(s): State<Shared>,
    Caller(caller): Caller,
    Path(topic): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| body_error(&r))?;
    let event = if is_raw(&headers) { Event::bytes(body) } else { Event::json(json_body(body)?) };
    let trace_id = trace_from(&headers).unwrap_or_else(TraceId::random);
    s.dispatch().publish(Publish { topic: topic.clone(), event, publisher: caller, trace_id })?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "topic": topic, "trace_id": trace_id }))).into_response())
}

async fn node_info(State(s): State<Shared>) -> Json<serde_json::Value> {
    let started_unix = s.started_at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    Json(json!({
        "id": s.id,
        "name": s.name,
        "mesh": s.config.mesh.name,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": s.started.elapsed().as_secs_f64(),
        "started_at_unix": started_unix,
        "addresses": [format!("{}://{}", s.scheme, s.local_addr)],
        "links": s.link_addrs,
        "gears": s.host.gears().iter().map(|g| g.name.to_string()).collect::<Vec<_>>(),
        "calls_in_flight": s.host.in_flight(),
        "insecure_dev": s.config.insecure_dev,
        "acme": s.acme.as_ref().map(|a| a.status.borrow().clone()),
    }))
}

async fn gears(State(s): State<Shared>) -> Json<serde_json::Value> {
    Json(json!({ "node": s.id, "gears": s.host.gears() }))
}

/// Every node this one knows: state, addresses, gears, topics, links, and the route to it.
async fn nodes(State(s): State<Shared>) -> Json<gearmesh_mesh::MeshView> {
    Json(s.mesh.view())
}

/// This node's routing table: for each other node that is up, the linked peer to send through
/// and the number of links on the path.
async fn routes(State(s): State<Shared>) -> Json<serde_json::Value> {
    let view = s.mesh.view();
    let routes: Vec<_> = view
        .nodes
        .iter()
        .filter(|n| n.id != view.me)
        .filter_map(|n| n.route.as_ref().map(|r| json!({ "node": n.id, "next_hop": r.next_hop, "hops": r.hops })))
        .collect();
    Json(json!({ "node": view.me, "routes": routes }))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(s): State<Shared>) -> Response {
    if s.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "draining" }))).into_response();
    }
    if let Some(acme) = &s.acme {
        let st = acme.status.borrow().clone();
        if st.state != AcmeState::Valid {
            // Degraded: no trusted certificate yet (or it expired); the ACME client keeps trying.
            let reason = match st.state {
                AcmeState::Waiting => "no ACME certificate yet: serving a self-signed placeholder",
                _ => "the ACME certificate has expired and renewal keeps failing",
            };
            let body = json!({ "status": "degraded", "reason": reason, "acme": st });
            return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
        }
    }
    Json(json!({ "status": "ready" })).into_response()
}

/// `GET /.well-known/acme-challenge/{token}`: the HTTP-01 answer (open: the ACME server has no
/// token), 404 when no such challenge is in progress.
async fn acme_challenge(State(s): State<Shared>, Path(token): Path<String>) -> Response {
    match &s.acme {
        Some(acme) => acme.http01.respond(&token),
        None => ApiError::from(CallError::not_found("this node does not use ACME")).into_response(),
    }
}

async fn metrics(State(s): State<Shared>) -> Response {
    let mut text = s.metrics.render();
    s.host.render_metrics(&mut text);
    render_mesh_metrics(&mut text, &s.mesh);
    render_accept_metrics(&mut text, s.acceptor.stats());
    if let Some(acme) = &s.acme {
        render_acme_metrics(&mut text, &acme.status.borrow());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// The mesh's counters and gauges in the Prometheus text format.
fn render_mesh_metrics(out: &mut String, mesh: &gearmesh_mesh::Mesh) {
    use std::fmt::Write as _;
    let st = mesh.stats();
    let rs = mesh.resilience_stats();
    let counters = [
        ("gearmesh_mesh_calls_sent_total", "Calls sent to gears on other nodes.", st.calls_sent),
        ("gearmesh_mesh_calls_received_total", "Calls from other nodes run here.", st.calls_received),
        ("gearmesh_mesh_calls_refused_total", "Calls refused with overloaded by the mesh layer.", st.calls_refused),
        ("gearmesh_mesh_events_sent_total", "Events sent to other nodes.", st.events_sent),
        ("gearmesh_mesh_events_received_total", "Events from other nodes delivered here.", st.events_received),
        ("gearmesh_mesh_frames_forwarded_total", "Routed frames switched on to another node.", st.frames_forwarded),
        ("gearmesh_mesh_frames_dropped_total", "Frames dropped (no route, hop limit, full queue).", st.frames_dropped),
        (
            "gearmesh_mesh_switched_calls_failed_total",
            "Calls switched for other nodes failed unavailable because their link broke.",
            st.switched_calls_failed,
        ),
        (
            "gearmesh_mesh_switched_calls_untracked_total",
            "Calls switched untracked because the table of switched calls was full.",
            st.switched_calls_untracked,
        ),
        (
            "gearmesh_mesh_dials_refused_total",
            "Links this node dialed that the peer refused in the hello (another mesh, a token it did not accept).",
            st.dials_refused,
        ),
        ("gearmesh_mesh_call_attempts_total", "Call attempts by the strategy layer.", rs.attempts),
        ("gearmesh_mesh_call_retries_total", "Retries and re-routes within the retry budget.", rs.retries),
        ("gearmesh_mesh_call_retries_refused_total", "Retries the retry budget refused.", rs.retries_refused),
        ("gearmesh_mesh_call_hedges_total", "Hedged attempts started while the first still ran.", rs.hedges),
        (
            "gearmesh_mesh_breaker_rejections_total",
            "Attempts skipped on an open circuit breaker.",
            rs.breaker_rejections,
        ),
    ];
    for (name, help, v) in counters {
        let _infallible = write!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n");
    }
    let links = st.links;
    let _infallible = write!(
        out,
        "# HELP gearmesh_mesh_links Direct links of this node.\n# TYPE gearmesh_mesh_links gauge\ngearmesh_mesh_links {links}\n"
    );
    let _infallible =
        write!(out, "# HELP gearmesh_mesh_nodes Known nodes by state.\n# TYPE gearmesh_mesh_nodes gauge\n");
    for (state, n) in ["alive", "suspect", "dead", "left"].iter().zip(st.nodes) {
        let _infallible = writeln!(out, "gearmesh_mesh_nodes{{state=\"{state}\"}} {n}");
    }
}

/// The incoming mesh links the acceptor turned away, by reason.
fn render_accept_metrics(out: &mut String, st: gearmesh_transport::AcceptStats) {
    use std::fmt::Write as _;
    let name = "gearmesh_links_refused_total";
    let _infallible = write!(
        out,
        "# HELP {name} Incoming mesh links refused: hello (refused or failed: another mesh or protocol version, a bad token, malformed), timeout (no hello in time), limit (mesh.max_connections reached).\n# TYPE {name} counter\n"
    );
    for (reason, v) in [("hello", st.refused_hello), ("timeout", st.handshake_timeouts), ("limit", st.over_limit)] {
        let _infallible = writeln!(out, "{name}{{reason=\"{reason}\"}} {v}");
    }
}

/// The certificate's expiry and the ACME client's counters.
fn render_acme_metrics(out: &mut String, st: &AcmeStatus) {
    use std::fmt::Write as _;
    if let Some(left) = st.expiry_seconds(std::time::SystemTime::now()) {
        let _infallible = write!(
            out,
            "# HELP gearmesh_tls_cert_expiry_seconds Seconds until the served ACME certificate expires (negative: expired).\n\
             # TYPE gearmesh_tls_cert_expiry_seconds gauge\ngearmesh_tls_cert_expiry_seconds {left}\n"
        );
    }
    let ready = u8::from(st.state == AcmeState::Valid);
    let _infallible = write!(
        out,
        "# HELP gearmesh_acme_certificate_valid 1 when a valid ACME certificate is served, 0 when degraded.\n\
         # TYPE gearmesh_acme_certificate_valid gauge\ngearmesh_acme_certificate_valid {ready}\n\
         # HELP gearmesh_acme_certificates_issued_total Certificates issued by the ACME server to this process.\n\
         # TYPE gearmesh_acme_certificates_issued_total counter\ngearmesh_acme_certificates_issued_total {}\n\
         # HELP gearmesh_acme_failures_total Failed ACME attempts (each is retried with backoff).\n\
         # TYPE gearmesh_acme_failures_total counter\ngearmesh_acme_failures_total {}\n",
        st.issued, st.failures
    );
}

async fn not_found(req: Request) -> ApiError {
    ApiError::from(CallError::new(ErrorCode::NotFound, format!("no route for {} {}", req.method(), req.uri().path())))
}

async fn method_not_allowed(req: Request) -> ApiError {
    let e = CallError::bad_request(format!("{} is not allowed on {}", req.method(), req.uri().path()));
    ApiError(e, StatusCode::METHOD_NOT_ALLOWED)
}

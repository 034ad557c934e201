//! The `/v1/pipelines` endpoints: define and list, call, cast, and a cast run's status.
//!
//! Scopes (`authn::required`): a run's status needs `observe`. `GET` and `POST /v1/pipelines`
//! share a path, so the door only wants a valid token and the handlers check `observe` (listing)
//! and `admin` (defining). `call` and `cast` need a valid token only, because every step is then
//! called as the caller and checked against its scopes like any other call (`call:<gear>/<port>`
//! per step): a pipeline never lets anyone do more than they could do step by step.

use std::{sync::Arc, time::Duration};

use axum::{
    Json,
    body::Bytes,
    extract::{Path, Query, State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use gearmesh_auth::Permission;
use gearmesh_gears::{CallError, Ctx};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{RunStatus, parse};
use crate::{api::ApiError, authn::Caller, node::NodeShared};

type Shared = Arc<NodeShared>;

fn body_text(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        ApiError(CallError::bad_request(format!("cannot read request body: {}", r.body_text())), r.status())
    })
}

/// `POST /v1/pipelines`: defines (or replaces) a pipeline from JSON or TOML (`content-type`
/// `application/toml` or `text/toml`, or any body not starting with `{`).
pub(crate) async fn define(
    State(s): State<Shared>,
    Caller(caller): Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if let Some(auth) = s.auth() {
        crate::authn::authorize(auth, &caller, &Permission::Admin)?;
    }
    let body = body_text(body)?;
    let text = std::str::from_utf8(&body).map_err(|_| CallError::bad_request("the definition is not UTF-8"))?;
    let def = parse(text).map_err(CallError::bad_request)?;
    let (name, steps) = (def.name.clone(), def.steps.len());
    s.pipelines.define(def)?;
    tracing::info!(pipeline = %name, steps, by = %caller, "pipeline defined");
    Ok((StatusCode::CREATED, Json(json!({ "name": name, "steps": steps }))).into_response())
}

/// `GET /v1/pipelines`: every definition.
pub(crate) async fn list(State(s): State<Shared>, Caller(caller): Caller) -> Result<Json<Value>, ApiError> {
    if let Some(auth) = s.auth() {
        crate::authn::authorize(auth, &caller, &Permission::Observe)?;
    }
    Ok(Json(json!({ "pipelines": s.pipelines.list() })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RunQuery {
    timeout_ms: Option<u64>,
}

fn event_of(headers: &HeaderMap, body: Bytes) -> Result<Value, ApiError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|ct| !ct.starts_with("application/octet-stream"));
    if !json {
        return Err(CallError::bad_request("a pipeline's event is JSON").into());
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(&body).map_err(|e| CallError::bad_request(format!("malformed JSON: {e}")).into())
}

/// `POST /v1/pipelines/{name}/call`: runs it and returns the report; a failed run answers with
/// the failed step's error status and `{"error": ..., "run": report}`.
pub(crate) async fn call(
    State(s): State<Shared>,
    Caller(caller): Caller,
    Path(name): Path<String>,
    query: Result<Query<RunQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::from(CallError::bad_request(e.body_text())))?;
    let deadline = match q.timeout_ms {
        Some(0) => return Err(CallError::bad_request("timeout_ms must be greater than 0").into()),
        Some(ms) => Some(Instant::now() + Duration::from_millis(ms)),
        None => None,
    };
    let event = event_of(&headers, body_text(body)?)?;
    let ctx = Ctx::new(s.dispatch(), caller);
    // The run is its own task: a client that disconnects does not stop it half-way (it finishes,
    // or fails and compensates, as if it had been cast).
    let pipelines = s.pipelines.clone();
    let run = tokio::spawn(async move { pipelines.call(&ctx, &name, event, deadline).await });
    let report = run.await.map_err(|e| CallError::internal(format!("the pipeline run did not finish: {e}")))??;
    if report.status == RunStatus::Completed {
        return Ok(Json(report).into_response());
    }
    let e = report.error.clone().unwrap_or_else(|| CallError::internal("the run failed without an error"));
    let status = StatusCode::from_u16(e.code().http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Ok((status, Json(json!({ "error": e, "run": report }))).into_response())
}

/// `POST /v1/pipelines/{name}/cast`: starts it in the background; 202 with the run id.
pub(crate) async fn cast(
    State(s): State<Shared>,
    Caller(caller): Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let event = event_of(&headers, body_text(body)?)?;
    let ctx = Ctx::new(s.dispatch(), caller);
    let id = s.pipelines.cast(ctx, &name, event)?;
    let status = format!("/v1/pipelines/runs/{id}");
    Ok((StatusCode::ACCEPTED, Json(json!({ "id": id, "status": status }))).into_response())
}

/// `GET /v1/pipelines/runs/{id}`: a cast run's status.
pub(crate) async fn status(State(s): State<Shared>, Path(id): Path<String>) -> Result<Response, ApiError> {
    match s.pipelines.status(&id) {
        Some(r) => Ok(Json(r).into_response()),
        None => Err(CallError::not_found(format!("no run {id:?} (unknown, or finished and forgotten)")).into()),
    }
}

//! The node's own gear `pipelines`: runs this node's pipelines for whoever calls it, so a gear
//! runs a pipeline with an ordinary `ctx.call("pipelines", "call", ...)`.
//!
//! Steps run as the *caller* (a user, or `gear:<name>` with what `[auth.gears]` grants it), never
//! as this gear: calling `pipelines/call` needs `call:pipelines/call`, and each step is checked
//! against the caller's own scopes where it runs, as for `POST /v1/pipelines/{name}/call`.
//!
//! Ports:
//! - `call` `{"pipeline": NAME, "event": {...}}`: the run's report when it completes; a failed
//!   run answers with the failed step's error (as HTTP does), its report in the error's message.
//! - `cast` `{"pipeline": NAME, "event": {...}}`: `{"id": RUN}` at once; the run goes on here.
//! - `status` `{"id": RUN}`: a cast run's report (`not_found` when unknown or forgotten).

use std::sync::Arc;

use gearmesh_gears::{CallError, Ctx, Gear, PortSpec};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Pipelines, RunReport, RunStatus};

/// The gear's name.
pub const GEAR: &str = "pipelines";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Run {
    pipeline: String,
    #[serde(default)]
    event: Value,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Status {
    id: String,
}

/// A context acting as the caller (not as this gear), with the caller's deadline.
fn as_caller(ctx: &Ctx) -> Ctx {
    Ctx::new(ctx.dispatch().clone(), ctx.caller().clone())
}

fn report_json(r: &RunReport) -> Result<Value, CallError> {
    serde_json::to_value(r).map_err(|e| CallError::internal(e.to_string()))
}

/// The `pipelines` gear over this node's pipeline table.
pub fn gear(pipelines: Arc<Pipelines>) -> Gear {
    let (for_call, for_cast, for_status) = (pipelines.clone(), pipelines.clone(), pipelines);
    Gear::new(GEAR)
        .describe("runs this node's pipelines as the caller")
        .port_with(
            PortSpec::new("call")
                .describe("run a pipeline and return its report; a failed run returns its step's error"),
            move |ctx: Ctx, req: Run| {
                let pipelines = for_call.clone();
                async move {
                    let deadline = ctx.deadline();
                    let report = pipelines.call(&as_caller(&ctx), &req.pipeline, req.event, deadline).await?;
                    match (report.status, &report.error) {
                        (RunStatus::Failed, Some(e)) => {
                            let step = report.failed_step.as_deref().unwrap_or("?");
                            let message = format!(
                                "pipeline {} failed at step {step} (compensation {}): {}",
                                report.pipeline,
                                serde_json::to_string(&report.compensation).unwrap_or_default(),
                                e.message()
                            );
                            Err(match e.app_code() {
                                Some(code) => CallError::app(code, message),
                                None => CallError::new(e.code(), message),
                            })
                        }
                        _ => report_json(&report),
                    }
                }
            },
        )
        .port_with(
            PortSpec::new("cast").describe("start a pipeline run here and return its id"),
            move |ctx: Ctx, req: Run| {
                let pipelines = for_cast.clone();
                async move {
                    let id = pipelines.cast(as_caller(&ctx), &req.pipeline, req.event)?;
                    Ok(json!({ "id": id }))
                }
            },
        )
        .port_with(
            PortSpec::new("status").describe("a cast run's report").idempotent(true),
            move |_ctx: Ctx, req: Status| {
                let pipelines = for_status.clone();
                async move {
                    match pipelines.status(&req.id) {
                        Some(r) => report_json(&r),
                        None => Err(CallError::not_found(format!("no run {:?} on this node", req.id))),
                    }
                }
            },
        )
}

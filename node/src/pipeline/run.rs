//! Running a validated pipeline: steps in waves (every step whose waits are met runs at once,
//! outputs merged in declaration order), and on a failure the `undo` ports of the completed
//! steps in reverse order of completion (saga compensation), each with its own retries.

use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use gearmesh_gears::{Arg, CallError, CallOptions, Ctx, Retry};
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::time::Instant;

use super::def::{Pipeline, Step, holds, render};

/// Attempts of one undo call (each through the strategy layer, which also routes around a
/// replica that is down).
const UNDO_ATTEMPTS: u32 = 3;
/// The deadline of each undo attempt: compensation runs even after the run's own deadline.
const UNDO_TIMEOUT: Duration = Duration::from_secs(10);
/// The first wait between undo attempts (doubling).
const UNDO_BACKOFF: Duration = Duration::from_millis(50);

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Still running (a `cast` run).
    Running,
    /// Every step ran or was skipped.
    Completed,
    /// A step failed (see `failed_step` and `compensation`).
    Failed,
}

/// Whether the completed steps were undone after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Compensation {
    /// Nothing to undo (no failure, or no completed step had an `undo`).
    None,
    /// Every undo port succeeded.
    Completed,
    /// At least one undo port failed after its retries (see the steps' `undo_error`).
    Failed,
}

/// What happened to one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not started (the run failed before it, or it is still waiting).
    Pending,
    /// It ran and succeeded.
    Ok,
    /// Its `when` condition did not hold.
    Skipped,
    /// It failed: the run failed here.
    Failed,
    /// It succeeded and was undone by its `undo` port.
    Undone,
    /// It succeeded, and its `undo` port failed.
    UndoFailed,
}

/// One step in a [`RunReport`].
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// The step's name.
    pub name: String,
    /// What happened.
    pub status: StepStatus,
    /// Its error, when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<CallError>,
    /// Its undo port's last error, when compensation failed for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub undo_error: Option<CallError>,
}

/// The outcome of a run (also a `cast` run's status).
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// The run's id.
    pub id: String,
    /// The pipeline's name.
    pub pipeline: String,
    /// Where it is.
    pub status: RunStatus,
    /// The event: the input with every step's output merged in.
    pub event: Value,
    /// The step that failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_step: Option<String>,
    /// Its error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<CallError>,
    /// Whether the completed steps were undone.
    pub compensation: Compensation,
    /// Every step, in declaration order.
    pub steps: Vec<StepReport>,
}

impl RunReport {
    pub(crate) fn running(id: String, p: &Pipeline, event: Value) -> Self {
        Self {
            id,
            pipeline: p.def.name.clone(),
            status: RunStatus::Running,
            event,
            failed_step: None,
            error: None,
            compensation: Compensation::None,
            steps: p
                .steps
                .iter()
                .map(|s| StepReport {
                    name: s.def.name.clone(),
                    status: StepStatus::Pending,
                    error: None,
                    undo_error: None,
                })
                .collect(),
        }
    }
}

fn call_options(step: &Step, deadline: Option<Instant>) -> Result<CallOptions, CallError> {
    let now = Instant::now();
    let mut timeout = step.def.timeout_ms.map(Duration::from_millis);
    if let Some(d) = deadline {
        let left = d.saturating_duration_since(now);
        if left.is_zero() {
            return Err(CallError::timeout("the pipeline's deadline passed before the step started"));
        }
        timeout = Some(timeout.map_or(left, |t| t.min(left)));
    }
    let mut o = CallOptions::default();
    o.timeout = timeout;
    o.strategy = step.strategy.clone();
    Ok(o)
}

async fn call_json(ctx: &Ctx, gear: &str, port: &str, input: &Value, options: CallOptions) -> Result<Value, CallError> {
    let body = serde_json::to_vec(input).map_err(|e| CallError::internal(format!("input does not serialize: {e}")))?;
    ctx.call_payload_with(gear, port, Arg::json(Bytes::from(body)), options).await?.take::<Value>()
}

/// Runs one step: `Ok(None)` when skipped, else its input and result.
async fn run_step(
    ctx: &Ctx,
    step: &Step,
    event: &Value,
    deadline: Option<Instant>,
) -> Option<(Value, Result<Value, CallError>)> {
    if let Some(w) = &step.def.when
        && !holds(w, event)
    {
        return None;
    }
    let input = match &step.def.input {
        Some(t) => match render(t, event) {
            Ok(v) => v,
            Err(e) => return Some((Value::Null, Err(CallError::bad_request(format!("input: {e}"))))),
        },
        None => event.clone(),
    };
    let result = match call_options(step, deadline) {
        Ok(o) => call_json(ctx, &step.gear, &step.port, &input, o).await,
        Err(e) => Err(e),
    };
    Some((input, result))
}

fn merge(event: &mut Value, step: &Step, reply: Value) {
    let Value::Object(ev) = event else { return };
    match (&step.def.output, reply) {
        (Some(key), v) => {
            ev.insert(key.clone(), v);
        }
        (None, Value::Object(fields)) => ev.extend(fields),
        (None, _) => {}
    }
}

/// Runs `p` on `event` through `ctx` (so every step is checked as `ctx`'s identity) and returns
/// the finished report. `deadline` bounds the steps (not the compensation).
pub(crate) async fn execute(p: &Pipeline, ctx: &Ctx, mut report: RunReport, deadline: Option<Instant>) -> RunReport {
    if !report.event.is_object() {
        report.event = Value::Object(Map::from_iter([("input".to_owned(), report.event.clone())]));
    }
    let n = p.steps.len();
    // Inputs of completed steps (for their undo), in completion order.
    let mut completed: Vec<(usize, Value)> = Vec::new();
    loop {
        let settled = |i: usize, r: &RunReport| matches!(r.steps[i].status, StepStatus::Ok | StepStatus::Skipped);
        let ready: Vec<usize> = (0..n)
            .filter(|&i| {
                report.steps[i].status == StepStatus::Pending && p.steps[i].after.iter().all(|&j| settled(j, &report))
            })
            .collect();
        if ready.is_empty() {
            break;
        }
        let event = report.event.clone();
        let outcomes = join_all(ready.iter().map(|&i| run_step(ctx, &p.steps[i], &event, deadline))).await;
        let mut failed = None;
        for (&i, outcome) in ready.iter().zip(outcomes) {
            match outcome {
                None => report.steps[i].status = StepStatus::Skipped,
                Some((input, Ok(reply))) => {
                    merge(&mut report.event, &p.steps[i], reply);
                    report.steps[i].status = StepStatus::Ok;
                    completed.push((i, input));
                }
                Some((_, Err(e))) => {
                    report.steps[i].status = StepStatus::Failed;
                    report.steps[i].error = Some(e.clone());
                    failed.get_or_insert((i, e));
                }
            }
        }
        if let Some((i, e)) = failed {
            report.status = RunStatus::Failed;
            report.failed_step = Some(p.steps[i].def.name.clone());
            report.error = Some(e);
            report.compensation = compensate(p, ctx, &mut report, &completed).await;
            return report;
        }
    }
    report.status = RunStatus::Completed;
    report
}

/// Calls the undo port of every completed step, last completed first.
async fn compensate(p: &Pipeline, ctx: &Ctx, report: &mut RunReport, completed: &[(usize, Value)]) -> Compensation {
    let mut outcome = Compensation::None;
    for (i, input) in completed.iter().rev() {
        let step = &p.steps[*i];
        let Some((gear, port)) = &step.undo else { continue };
        let input = match &step.def.undo_input {
            Some(t) => render(t, &report.event).map_err(|e| CallError::bad_request(format!("undo_input: {e}"))),
            None => Ok(input.clone()),
        };
        let mut result = Err(CallError::internal("not attempted"));
        if let Ok(input) = &input {
            for attempt in 0..UNDO_ATTEMPTS {
                if attempt > 0 {
                    tokio::time::sleep(UNDO_BACKOFF * 2u32.pow(attempt - 1)).await;
                }
                let options = CallOptions::default().timeout(UNDO_TIMEOUT).retry(Retry::Yes);
                result = call_json(ctx, gear, port, input, options).await;
                match &result {
                    Ok(_) => break,
                    // Only failures of the way are worth another attempt.
                    Err(e)
                        if matches!(
                            e.code(),
                            gearmesh_gears::ErrorCode::Unavailable
                                | gearmesh_gears::ErrorCode::Timeout
                                | gearmesh_gears::ErrorCode::Overloaded
                        ) => {}
                    Err(_) => break,
                }
            }
        } else if let Err(e) = input {
            result = Err(e);
        }
        match result {
            Ok(_) => {
                report.steps[*i].status = StepStatus::Undone;
                if outcome == Compensation::None {
                    outcome = Compensation::Completed;
                }
            }
            Err(e) => {
                tracing::warn!(pipeline = %p.def.name, step = %step.def.name, error = %e, "undo failed");
                report.steps[*i].status = StepStatus::UndoFailed;
                report.steps[*i].undo_error = Some(e);
                outcome = Compensation::Failed;
            }
        }
    }
    outcome
}

//! Pipelines: steps over gear ports declared as data, run on demand (`call`) or in the background
//! (`cast`), with saga compensation. See `docs/pipelines.md`.
//!
//! - `def.rs`: the definition format, validation, input templates and conditions.
//! - `run.rs`: running one (waves of parallel steps, compensation).
//! - `http.rs`: the `/v1/pipelines` endpoints.
//! - here: [`Pipelines`], the node's table of definitions and of runs, and its events.
//!
//! Bounds: at most [`Limits::max_pipelines`] definitions (one more is refused), at most
//! [`Limits::max_running`] `cast` runs at once (one more is refused `overloaded`), and the
//! [`Limits::max_finished`] most recent finished `cast` runs are kept for their status (older ones
//! are forgotten: their status becomes `not_found`). Runs live in memory only: a `cast` run whose
//! node stops or dies is lost.

mod def;
pub mod gear;
pub(crate) mod http;
mod run;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex, RwLock},
};

pub use def::{MAX_NAME, MAX_STEPS, PipelineDef, StepDef, parse};
use gearmesh_gears::{CallError, Ctx};
pub use run::{Compensation, RunReport, RunStatus, StepReport, StepStatus};
use serde::Serialize;
use serde_json::Value;
use tokio::{sync::broadcast, time::Instant};

use self::def::Pipeline;

/// The bounds of a [`Pipelines`] table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Definitions kept at most.
    pub max_pipelines: usize,
    /// `cast` runs running at once, at most.
    pub max_running: usize,
    /// Finished `cast` runs whose status is kept.
    pub max_finished: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_pipelines: 256, max_running: 1024, max_finished: 1024 }
    }
}

/// Something that happened to a run, for observers (`Pipelines::subscribe`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PipelineEvent {
    /// The run's id.
    pub run: String,
    /// The pipeline.
    pub pipeline: String,
    /// `running` when it starts; `completed` or `failed` when it ends.
    pub status: RunStatus,
    /// The step that failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_step: Option<String>,
    /// Whether compensation completed.
    pub compensation: Compensation,
}

#[derive(Debug, Default)]
struct Runs {
    reports: HashMap<String, RunReport>,
    /// Finished `cast` runs, oldest first.
    finished: VecDeque<String>,
    running: usize,
}

/// A node's pipelines: definitions, `cast` runs, and run events.
#[derive(Debug)]
pub struct Pipelines {
    limits: Limits,
    defs: RwLock<BTreeMap<String, Arc<Pipeline>>>,
    runs: Mutex<Runs>,
    events: broadcast::Sender<PipelineEvent>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Pipelines {
    /// An empty table.
    pub fn new(limits: Limits) -> Arc<Self> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(Self { limits, defs: RwLock::default(), runs: Mutex::default(), events })
    }

    /// Validates and defines (or replaces) a pipeline.
    ///
    /// # Errors
    /// `bad_request` listing every problem of the definition, each naming its step; `overloaded`
    /// when the table is full.
    pub fn define(&self, def: PipelineDef) -> Result<(), CallError> {
        let name = def.name.clone();
        if name == "runs" {
            return Err(CallError::bad_request("invalid pipeline: \"runs\" is reserved"));
        }
        let p = def::validate(def)
            .map_err(|errors| CallError::bad_request(format!("invalid pipeline {name:?}: {}", errors.join("; "))))?;
        let mut defs = self.defs.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !defs.contains_key(&name) && defs.len() >= self.limits.max_pipelines {
            return Err(CallError::overloaded(format!("{} pipelines are defined already", defs.len())));
        }
        defs.insert(name, Arc::new(p));
        Ok(())
    }

    /// Every definition, by name.
    pub fn list(&self) -> Vec<PipelineDef> {
        let defs = self.defs.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        defs.values().map(|p| p.def.clone()).collect()
    }

    fn get(&self, name: &str) -> Result<Arc<Pipeline>, CallError> {
        let defs = self.defs.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        defs.get(name).cloned().ok_or_else(|| CallError::not_found(format!("no pipeline named {name:?}")))
    }

    /// Run events (start and end of every run). A receiver more than 1,024 events behind
    /// skips ahead.
    pub fn subscribe(&self) -> broadcast::Receiver<PipelineEvent> {
        self.events.subscribe()
    }

    fn announce(&self, r: &RunReport) {
        // Nobody listening is fine.
        let _receivers = self.events.send(PipelineEvent {
            run: r.id.clone(),
            pipeline: r.pipeline.clone(),
            status: r.status,
            failed_step: r.failed_step.clone(),
            compensation: r.compensation,
        });
    }

    /// Runs pipeline `name` on `event` and waits for it. Its steps are called through `ctx`, so
    /// each is checked against `ctx`'s identity (a gear's `[auth.gears]` grants, a user's scopes).
    ///
    /// # Errors
    /// `not_found` for an unknown pipeline. A failed run is an `Ok` report with status `failed`.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropping the future stops the run where it is, without compensation
    /// (completed steps stay done). Use [`Pipelines::cast`] when the caller may go away.
    pub async fn call(
        &self,
        ctx: &Ctx,
        name: &str,
        event: Value,
        deadline: Option<Instant>,
    ) -> Result<RunReport, CallError> {
        let p = self.get(name)?;
        let report = RunReport::running(run_id(), &p, event);
        self.announce(&report);
        let report = run::execute(&p, ctx, report, deadline).await;
        self.announce(&report);
        Ok(report)
    }

    /// Starts pipeline `name` on `event` in the background and returns its run id; its status is
    /// at [`Pipelines::status`].
    ///
    /// # Errors
    /// `not_found` for an unknown pipeline; `overloaded` when `max_running` runs are running.
    pub fn cast(self: &Arc<Self>, ctx: Ctx, name: &str, event: Value) -> Result<String, CallError> {
        let p = self.get(name)?;
        let id = run_id();
        let report = RunReport::running(id.clone(), &p, event);
        {
            let mut runs = lock(&self.runs);
            if runs.running >= self.limits.max_running {
                return Err(CallError::overloaded(format!("{} pipeline runs are running already", runs.running)));
            }
            runs.running += 1;
            runs.reports.insert(id.clone(), report.clone());
        }
        self.announce(&report);
        let this = self.clone();
        tokio::spawn(async move {
            let report = run::execute(&p, &ctx, report, None).await;
            this.announce(&report);
            let mut runs = lock(&this.runs);
            runs.running = runs.running.saturating_sub(1);
            runs.finished.push_back(report.id.clone());
            runs.reports.insert(report.id.clone(), report);
            while runs.finished.len() > this.limits.max_finished {
                if let Some(old) = runs.finished.pop_front() {
                    runs.reports.remove(&old);
                }
            }
        });
        Ok(id)
    }

    /// The status of a `cast` run (running, or one of the most recent finished ones).
    pub fn status(&self, id: &str) -> Option<RunReport> {
        lock(&self.runs).reports.get(id).cloned()
    }
}

fn run_id() -> String {
    format!("run-{:016x}", rand::random::<u64>())
}

/// The shop's `order` pipeline (find the user, reserve the product, charge, confirm), defined on
/// every node that hosts a shop gear.
pub fn order_pipeline() -> PipelineDef {
    let text = r#"{
      "name": "order",
      "description": "Find the user, reserve the product, charge, confirm; the reservation is released when the charge fails",
      "steps": [
        {"name": "user", "call": "users/find", "input": {"id": "$.user_id"}, "output": "user"},
        {"name": "reserve", "call": "products/reserve", "input": {"product_id": "$.product_id", "qty": "$.qty"},
         "output": "stock", "undo": "products/release"},
        {"name": "charge", "call": "billing/charge", "input": {"user_id": "$.user.id", "cents": "$.stock.total_cents"},
         "output": "receipt"},
        {"name": "confirm", "call": "orders/confirm",
         "input": {"user": "$.user", "product_id": "$.product_id", "qty": "$.qty", "cents": "$.receipt.cents",
                   "charge_id": "$.receipt.charge_id"},
         "output": "order"}
      ]
    }"#;
    // A constant that the tests parse and validate.
    match parse(text) {
        Ok(d) => d,
        Err(e) => unreachable!("the built-in order pipeline is valid: {e}"),
    }
}

//! [`Ctx`]: what a port or listener uses to reach the rest of the mesh, and the [`Dispatch`]
//! trait that backs it (the node's in-process host now, the mesh router later).

use std::{fmt, sync::Arc, time::Duration};

use serde::{Serialize, de::DeserializeOwned};
use tokio::time::Instant;

use crate::{Arg, BoxFuture, CallError, Event, GearName, Payload, Principal, Retry, Strategy, TraceId};

/// A hosted gear's own identity, shared by every context of that gear.
#[derive(Debug)]
pub(crate) struct GearIdentity {
    pub(crate) name: GearName,
    pub(crate) principal: Principal,
}

/// Whom a context acts for.
#[derive(Clone)]
enum Me {
    /// A hosted gear: its calls carry `gear:<name>`.
    Gear(Arc<GearIdentity>),
    /// Code outside any gear, acting as this principal.
    Outside(Principal),
}

/// Routes calls and events. Implemented by the node's local host and by the mesh router; a
/// [`Ctx`] holds one behind an `Arc` so gear code never knows which.
pub trait Dispatch: Send + Sync + 'static {
    /// Runs one call to completion (reply, typed error, or timeout at `call.meta.deadline`).
    ///
    /// # Cancel safety
    /// Dropping the returned future cancels the call: a local port's future is dropped, and a
    /// remote call is cancelled on the node running it.
    fn call<'a>(&'a self, call: Call<'a>) -> BoxFuture<'a, Result<Payload, CallError>>;

    /// Publishes an event to every listener of its topic. Never waits for listeners: delivery to a
    /// listener whose queue is full is dropped and counted (at-most-once, like NATS core).
    ///
    /// # Errors
    /// `bad_request` for an invalid topic name.
    fn publish(&self, publish: Publish) -> Result<(), CallError>;
}

/// One call, as handed to a [`Dispatch`].
#[derive(Debug)]
pub struct Call<'a> {
    /// The target gear's name (validated by whoever resolves it).
    pub gear: &'a str,
    /// The target port's name.
    pub port: &'a str,
    /// The input.
    pub arg: Arg<'a>,
    /// Who calls, until when, and under which trace.
    pub meta: CallMeta,
}

/// Everything about a call but its target and input.
#[derive(Debug, Clone)]
pub struct CallMeta {
    /// The caller's identity, checked by the node that runs the port.
    pub caller: Principal,
    /// The absolute deadline; `None` lets the port's default apply. Always capped by the host.
    pub deadline: Option<Instant>,
    /// The trace this call belongs to.
    pub trace_id: TraceId,
    /// Whether `deadline` was derived from one a host already capped (so the host need not read
    /// the clock to cap it again).
    pub(crate) capped: bool,
    /// How to pick the replica(s) of this call only (not of the calls it makes); `None` lets the
    /// node's default for the gear apply, else [`Strategy::LocalFirst`].
    pub strategy: Option<Strategy>,
    /// Whether this call may be retried.
    pub retry: Retry,
    /// How long one attempt of this call may take on one replica before it is given up and, if
    /// a retry is allowed, made again on another (Envoy's per-try timeout); `None`: the node's
    /// default (`[resilience] per_try_timeout_ms`). Never past `deadline`.
    pub per_try_timeout: Option<Duration>,
    /// How long a spread call that may be retried waits for its first attempt before it sends a
    /// second one to another replica, keeping both (a hedged request: the first reply wins);
    /// `None`: the node's default (`[resilience] hedge_ms`, none unless set).
    pub hedge_after: Option<Duration>,
}

impl CallMeta {
    /// Metadata for a new call tree: a fresh trace id and the given caller and deadline.
    pub fn new(caller: Principal, deadline: Option<Instant>) -> Self {
        Self::continuing(caller, deadline, TraceId::random())
    }

    /// Metadata for a call that continues the trace `trace_id`, begun elsewhere (a call from
    /// another node): no new trace id is drawn.
    pub fn continuing(caller: Principal, deadline: Option<Instant>, trace_id: TraceId) -> Self {
        Self {
            caller,
            deadline,
            trace_id,
            capped: false,
            strategy: None,
            retry: Retry::default(),
            per_try_timeout: None,
            hedge_after: None,
        }
    }

    /// Whether the routing fields are the defaults (the fast local path applies).
    pub fn is_plain(&self) -> bool {
        self.strategy.is_none() && self.retry == Retry::IfIdempotent
    }
}

/// One event publication, as handed to a [`Dispatch`].
#[derive(Debug, Clone)]
pub struct Publish {
    /// The topic (validated by the dispatcher).
    pub topic: String,
    /// The event.
    pub event: Event,
    /// Who published it.
    pub publisher: Principal,
    /// The trace it belongs to.
    pub trace_id: TraceId,
}

/// Options for [`Ctx::call_with`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CallOptions {
    /// A timeout for this call, counted from now; the result is never later than the caller's
    /// own deadline.
    pub timeout: Option<Duration>,
    /// How to pick the replica(s); `None`: the node's default for the gear, else local-first.
    pub strategy: Option<Strategy>,
    /// Whether the call may be retried (default: only idempotent ports).
    pub retry: Retry,
    /// A bound on each attempt (see [`CallMeta::per_try_timeout`]).
    pub per_try_timeout: Option<Duration>,
    /// When to hedge (see [`CallMeta::hedge_after`]).
    pub hedge_after: Option<Duration>,
}

impl CallOptions {
    /// Sets the call's timeout.
    #[must_use]
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }

    /// Sets the call's strategy.
    #[must_use]
    pub fn strategy(mut self, s: Strategy) -> Self {
        self.strategy = Some(s);
        self
    }

    /// Sets whether the call may be retried.
    #[must_use]
    pub fn retry(mut self, r: Retry) -> Self {
        self.retry = r;
        self
    }

    /// Bounds each attempt: one that takes longer is given up (its replica told to stop) and,
    /// where a retry is allowed, made again on another replica, within the call's timeout.
    #[must_use]
    pub fn per_try_timeout(mut self, t: Duration) -> Self {
        self.per_try_timeout = Some(t);
        self
    }

    /// Hedges the call: if its first attempt has not answered after `t`, a second one goes to
    /// another replica and the first reply wins (only for ports that may be retried, with the
    /// `spread` strategy or a remote local-first call; each hedge takes a retry-budget token).
    #[must_use]
    pub fn hedge_after(mut self, t: Duration) -> Self {
        self.hedge_after = Some(t);
        self
    }
}

/// The context of a running port or listener (or of an outside caller, see [`Ctx::new`]).
///
/// Cheap to clone. Calls made through it carry the gear's own identity (`gear:<name>`), the
/// remaining deadline and the trace id.
#[derive(Clone)]
pub struct Ctx {
    dispatch: Arc<dyn Dispatch>,
    caller: Principal,
    me: Me,
    deadline: Option<Instant>,
    /// Whether `deadline` was capped by a host (true inside gears).
    capped: bool,
    trace_id: TraceId,
}

impl fmt::Debug for Ctx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ctx")
            .field("caller", &self.caller)
            .field("acting_as", self.acting_as())
            .field("deadline", &self.deadline)
            .field("trace_id", &self.trace_id)
            .finish()
    }
}

impl Ctx {
    /// A context for code outside any gear (an application embedding a node, a test): calls are
    /// made as `principal`, with no deadline of their own (each port's default applies) and a new
    /// trace.
    pub fn new(dispatch: Arc<dyn Dispatch>, principal: Principal) -> Self {
        Self {
            dispatch,
            caller: principal.clone(),
            me: Me::Outside(principal),
            deadline: None,
            capped: false,
            trace_id: TraceId::random(),
        }
    }

    /// The context handed to a port or listener of a hosted gear (called by `meta.caller`).
    pub(crate) fn for_gear(
        dispatch: Arc<dyn Dispatch>,
        me: Arc<GearIdentity>,
        meta: CallMeta,
        deadline: Instant,
    ) -> Self {
        Self {
            dispatch,
            caller: meta.caller,
            me: Me::Gear(me),
            deadline: Some(deadline),
            capped: true,
            trace_id: meta.trace_id,
        }
    }

    /// Calls `gear/port` with `req` and decodes the reply as `Resp`. Local or remote: the same code.
    ///
    /// # Errors
    /// The callee's error, or `not_found`, `timeout`, `overloaded`, `unavailable`, ... from the way.
    pub async fn call<Req, Resp>(&self, gear: &str, port: &str, req: &Req) -> Result<Resp, CallError>
    where
        Req: Serialize + Send + Sync + 'static,
        Resp: DeserializeOwned + Send + 'static,
    {
        self.dispatch_call(gear, port, Arg::typed(req), CallOptions::default()).await?.take()
    }

    /// Like [`Ctx::call`], with options (timeout, strategy, retries). A
    /// [`Strategy::Scatter`] replies with a [`crate::Gathered`] document and a
    /// [`Strategy::Broadcast`] with `{"sent": n, "nodes": [...]}`: decode `Resp` accordingly.
    ///
    /// # Errors
    /// As [`Ctx::call`].
    pub async fn call_with<Req, Resp>(
        &self,
        gear: &str,
        port: &str,
        req: &Req,
        options: CallOptions,
    ) -> Result<Resp, CallError>
    where
        Req: Serialize + Send + Sync + 'static,
        Resp: DeserializeOwned + Send + 'static,
    {
        self.dispatch_call(gear, port, Arg::typed(req), options).await?.take()
    }

    /// Calls with an untyped [`Arg`] and returns the untyped [`Payload`] (for adapters).
    ///
    /// # Errors
    /// As [`Ctx::call`].
    pub async fn call_payload(
        &self,
        gear: &str,
        port: &str,
        arg: Arg<'_>,
        timeout: Option<Duration>,
    ) -> Result<Payload, CallError> {
        self.dispatch_call(gear, port, arg, CallOptions { timeout, ..CallOptions::default() }).await
    }

    /// Calls with an untyped [`Arg`] and [`CallOptions`], and returns the untyped [`Payload`].
    ///
    /// # Errors
    /// As [`Ctx::call`].
    pub async fn call_payload_with(
        &self,
        gear: &str,
        port: &str,
        arg: Arg<'_>,
        options: CallOptions,
    ) -> Result<Payload, CallError> {
        self.dispatch_call(gear, port, arg, options).await
    }

    /// Hands the call to the dispatcher and returns its future (awaited by the callers above
    /// directly, so a call nests one future less).
    fn dispatch_call<'a>(
        &'a self,
        gear: &'a str,
        port: &'a str,
        arg: Arg<'a>,
        options: CallOptions,
    ) -> BoxFuture<'a, Result<Payload, CallError>> {
        let CallOptions { timeout, strategy, retry, per_try_timeout, hedge_after } = options;
        let deadline = match (self.deadline, timeout) {
            (d, None) => d,
            (None, Some(t)) => Some(Instant::now() + t),
            (Some(d), Some(t)) => Some(d.min(Instant::now() + t)),
        };
        // An earlier deadline than a capped one is capped too.
        let capped = self.capped && self.deadline.is_some();
        let meta = CallMeta {
            caller: self.acting_as().clone(),
            deadline,
            trace_id: self.trace_id,
            capped,
            strategy,
            retry,
            per_try_timeout,
            hedge_after,
        };
        self.dispatch.call(Call { gear, port, arg, meta })
    }

    /// Publishes `event` on `topic` to every listener, wherever it runs. Returns once the event is
    /// queued; it never waits for listeners.
    ///
    /// # Errors
    /// `bad_request` for an invalid topic name.
    pub async fn notify<E>(&self, topic: &str, event: &E) -> Result<(), CallError>
    where
        E: Serialize + Clone + Send + Sync + 'static,
    {
        self.dispatch.publish(Publish {
            topic: topic.to_owned(),
            event: Event::typed(event.clone()),
            publisher: self.acting_as().clone(),
            trace_id: self.trace_id,
        })
    }

    /// Who called this port (for a listener: who published the event).
    pub fn caller(&self) -> &Principal {
        &self.caller
    }

    /// The identity this context's own calls carry (`gear:<name>` inside a gear).
    pub fn acting_as(&self) -> &Principal {
        match &self.me {
            Me::Gear(g) => &g.principal,
            Me::Outside(p) => p,
        }
    }

    /// The gear this context belongs to, if any.
    pub fn gear(&self) -> Option<&GearName> {
        match &self.me {
            Me::Gear(g) => Some(&g.name),
            Me::Outside(_) => None,
        }
    }

    /// The absolute deadline of the current call, if any.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The time left until the deadline (zero once it passed), if there is one.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline.map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// The trace id shared by every call of this request tree.
    pub fn trace_id(&self) -> TraceId {
        self.trace_id
    }

    /// The dispatcher behind this context.
    pub fn dispatch(&self) -> &Arc<dyn Dispatch> {
        &self.dispatch
    }
}

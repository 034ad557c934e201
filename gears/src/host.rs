//! The in-process gear host: finds a gear's port, enforces its deadline and concurrency limit,
//! isolates panics, records metrics, and fans events out to local listeners.
//!
//! The host knows nothing of sockets. A node wraps it in a router that sends calls for gears the
//! host does not have elsewhere; [`Host::start`] hands such calls back untouched for that.
//!
//! # Limits and what happens when they are hit
//! - **Port concurrency** ([`crate::PortOptions::max_concurrency`]): one call more than the limit
//!   fails at once with `overloaded`. Nothing is queued.
//! - **Deadlines**: a call's deadline is the caller's, else the port's default timeout, else
//!   [`HostConfig::default_timeout`], and never more than [`HostConfig::max_timeout`] from now.
//!   When it passes, the port's future is dropped and the caller gets `timeout`.
//! - **Listener queues** ([`HostConfig::listener_queue`] events per listener): each listener handles
//!   its events one at a time, in order. When its queue is full, new events *for that listener* are
//!   dropped and counted in `gearmesh_events_dropped_total{gear,topic}` (a warning is logged once
//!   each time the listener starts lagging). The publisher never waits and other listeners are not
//!   affected: delivery is at-most-once, like NATS core.

use std::{
    fmt,
    num::NonZeroUsize,
    sync::{
        Arc, OnceLock, RwLock, Weak,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder};
use rustc_hash::FxHashMap;
use tokio::{sync::mpsc, time::Instant};

use crate::{
    BoxFuture, Call, CallError, CallMeta, Ctx, Dispatch, ErrorCode, Event, Gear, GearError,
    GearMeta, GearName, Payload, Principal, Publish, Topic, TraceId,
    gear::{ErasedListener, ErasedPort},
    panic::{Isolated, install_panic_hook, isolate},
};

/// Host-wide limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// The deadline of a call whose caller and port set none.
    pub default_timeout: Duration,
    /// No call may run longer than this, whatever the caller asks.
    pub max_timeout: Duration,
    /// Events queued per listener before new ones are dropped for it.
    pub listener_queue: NonZeroUsize,
    /// The deadline of one listener invocation.
    pub listener_timeout: Duration,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            default_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(300),
            listener_queue: NonZeroUsize::new(1024).unwrap_or(NonZeroUsize::MIN),
            listener_timeout: Duration::from_secs(30),
        }
    }
}

static METADATA: Metadata<'static> =
    Metadata::new("gearmesh", metrics::Level::INFO, Some(module_path!()));

/// Metric handles of one port, registered once so the call path never looks a metric up.
struct PortMetrics {
    calls: Counter,
    errors: [Counter; ErrorCode::ALL.len()],
    duration: Histogram,
    in_flight: Gauge,
}

impl PortMetrics {
    fn new(recorder: Option<&dyn Recorder>, gear: &GearName, port: &str) -> Self {
        let labels = || {
            vec![
                Label::new("gear", gear.to_string()),
                Label::new("port", port.to_owned()),
            ]
        };
        match recorder {
            None => Self {
                calls: Counter::noop(),
                errors: std::array::from_fn(|_| Counter::noop()),
                duration: Histogram::noop(),
                in_flight: Gauge::noop(),
            },
            Some(r) => Self {
                calls: r.register_counter(
                    &Key::from_parts("gearmesh_calls_total", labels()),
                    &METADATA,
                ),
                errors: std::array::from_fn(|i| {
                    let mut l = labels();
                    l.push(Label::new("code", ErrorCode::ALL[i].as_str()));
                    r.register_counter(&Key::from_parts("gearmesh_call_errors_total", l), &METADATA)
                }),
                duration: r.register_histogram(
                    &Key::from_parts("gearmesh_call_duration_seconds", labels()),
                    &METADATA,
                ),
                in_flight: r.register_gauge(
                    &Key::from_parts("gearmesh_calls_in_flight", labels()),
                    &METADATA,
                ),
            },
        }
    }
}

/// One hosted port.
struct PortState {
    gear: GearName,
    principal: Principal,
    name: crate::PortName,
    handler: Arc<ErasedPort>,
    timeout: Option<Duration>,
    max_concurrency: usize,
    in_flight: AtomicUsize,
    metrics: PortMetrics,
}

/// Decrements a port's in-flight count when a call ends, however it ends.
struct InFlight(Arc<PortState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.in_flight.decrement(1.0);
    }
}

impl PortState {
    fn enter(self: &Arc<Self>) -> Result<InFlight, CallError> {
        let before = self.in_flight.fetch_add(1, Ordering::Relaxed);
        if before >= self.max_concurrency {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            return Err(CallError::overloaded(format!(
                "{}/{} is at its concurrency limit ({})",
                self.gear, self.name, self.max_concurrency
            )));
        }
        self.metrics.in_flight.increment(1.0);
        Ok(InFlight(Arc::clone(self)))
    }

    fn record(&self, started: Instant, result: &Result<Payload, CallError>) {
        self.metrics.calls.increment(1);
        self.metrics
            .duration
            .record(started.elapsed().as_secs_f64());
        if let Err(e) = result {
            let i = ErrorCode::ALL
                .iter()
                .position(|c| *c == e.code())
                .unwrap_or(0);
            self.metrics.errors[i].increment(1);
        }
    }
}

struct HostedGear {
    meta: GearMeta,
    ports: FxHashMap<crate::PortName, Arc<PortState>>,
}

/// The queue in front of one listener.
struct ListenerSlot {
    gear: GearName,
    tx: mpsc::Sender<(Event, Principal, TraceId)>,
    lagging: AtomicBool,
    dropped: Counter,
}

/// Hosts gears in-process. See the module docs for limits.
pub struct Host {
    config: HostConfig,
    me: Weak<Host>,
    front: OnceLock<Weak<dyn Dispatch>>,
    recorder: Option<Arc<dyn Recorder + Send + Sync>>,
    gears: RwLock<FxHashMap<GearName, Arc<HostedGear>>>,
    topics: RwLock<FxHashMap<Topic, Arc<[Arc<ListenerSlot>]>>>,
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host")
            .field("config", &self.config)
            .field("gears", &self.gear_names())
            .finish()
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // A panic while holding these locks cannot leave the maps half-updated (each update is one
    // insert or remove), so a poisoned lock is still consistent.
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Host {
    /// A host with no gears. `recorder` receives the call metrics (none: metrics are off).
    ///
    /// Installs the panic hook of [`crate::install_panic_hook`].
    pub fn new(config: HostConfig, recorder: Option<Arc<dyn Recorder + Send + Sync>>) -> Arc<Self> {
        install_panic_hook();
        Arc::new_cyclic(|me| Self {
            config,
            me: me.clone(),
            front: OnceLock::new(),
            recorder,
            gears: RwLock::default(),
            topics: RwLock::default(),
        })
    }

    /// The host's limits.
    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    /// Sets the dispatcher that hosted gears' [`Ctx`] use for their own calls (the node's router).
    /// Without it they reach only gears of this host. Can be set once.
    pub fn set_front(&self, front: Weak<dyn Dispatch>) {
        // A second call is ignored on purpose: the front is fixed for the host's life.
        let _already_set = self.front.set(front);
    }

    fn front(&self) -> Option<Arc<dyn Dispatch>> {
        match self.front.get() {
            Some(f) => f.upgrade(),
            None => self.me.upgrade().map(|h| h as Arc<dyn Dispatch>),
        }
    }

    /// Hosts a gear. Listeners start consuming at once, so this needs a tokio runtime when the gear
    /// listens to anything.
    ///
    /// # Errors
    /// An invalid definition, a gear of the same name already hosted, or no runtime for listeners.
    pub fn add_gear(&self, gear: Gear) -> Result<GearMeta, GearError> {
        let parts = gear.into_parts()?;
        let name = parts.meta.name.clone();
        let runtime = if parts.listeners.is_empty() {
            None
        } else {
            Some(
                tokio::runtime::Handle::try_current()
                    .map_err(|_| GearError::NoRuntime(name.to_string()))?,
            )
        };
        let mut gears = write(&self.gears);
        if gears.contains_key(&name) {
            return Err(GearError::DuplicateGear(name.to_string()));
        }
        let principal = Principal::gear(&name);
        let recorder = self.recorder.as_deref().map(|r| r as &dyn Recorder);
        let ports = parts
            .ports
            .into_iter()
            .map(|p| {
                let state = PortState {
                    gear: name.clone(),
                    principal: principal.clone(),
                    metrics: PortMetrics::new(recorder, &name, p.meta.name.as_str()),
                    name: p.meta.name.clone(),
                    handler: p.handler,
                    timeout: p.meta.options.timeout,
                    max_concurrency: p
                        .meta
                        .options
                        .max_concurrency
                        .map_or(usize::MAX, NonZeroUsize::get),
                    in_flight: AtomicUsize::new(0),
                };
                (p.meta.name, Arc::new(state))
            })
            .collect();
        let meta = parts.meta;
        gears.insert(
            name.clone(),
            Arc::new(HostedGear {
                meta: meta.clone(),
                ports,
            }),
        );
        drop(gears);

        if let Some(runtime) = runtime {
            let mut topics = write(&self.topics);
            for l in parts.listeners {
                let (tx, rx) = mpsc::channel(self.config.listener_queue.get());
                let dropped = match recorder {
                    Some(r) => r.register_counter(
                        &Key::from_parts(
                            "gearmesh_events_dropped_total",
                            vec![
                                Label::new("gear", name.to_string()),
                                Label::new("topic", l.topic.to_string()),
                            ],
                        ),
                        &METADATA,
                    ),
                    None => Counter::noop(),
                };
                let slot = Arc::new(ListenerSlot {
                    gear: name.clone(),
                    tx,
                    lagging: AtomicBool::new(false),
                    dropped,
                });
                let list = topics
                    .entry(l.topic.clone())
                    .or_insert_with(|| Arc::from(Vec::new()));
                *list = list.iter().cloned().chain(std::iter::once(slot)).collect();
                runtime.spawn(run_listener(
                    self.me.clone(),
                    name.clone(),
                    principal.clone(),
                    l.topic,
                    l.handler,
                    rx,
                ));
            }
        }
        Ok(meta)
    }

    /// Stops hosting a gear. Calls already running finish; its listeners handle what is queued
    /// and stop. Returns its metadata, or `None` if it was not hosted.
    pub fn remove_gear(&self, name: &str) -> Option<GearMeta> {
        let removed = write(&self.gears).remove(name)?;
        let mut topics = write(&self.topics);
        topics.retain(|_, list| {
            if list.iter().any(|s| s.gear.as_str() == name) {
                *list = list
                    .iter()
                    .filter(|s| s.gear.as_str() != name)
                    .cloned()
                    .collect();
            }
            !list.is_empty()
        });
        Some(removed.meta.clone())
    }

    /// Whether a gear of this name is hosted here.
    pub fn has_gear(&self, name: &str) -> bool {
        read(&self.gears).contains_key(name)
    }

    /// Metadata of every hosted gear, sorted by name.
    pub fn gears(&self) -> Vec<GearMeta> {
        let mut v: Vec<GearMeta> = read(&self.gears).values().map(|g| g.meta.clone()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn gear_names(&self) -> Vec<GearName> {
        read(&self.gears).keys().cloned().collect()
    }

    /// The topics some hosted gear listens to.
    pub fn topics(&self) -> Vec<Topic> {
        read(&self.topics).keys().cloned().collect()
    }

    /// The number of calls running on hosted ports.
    pub fn in_flight(&self) -> usize {
        read(&self.gears)
            .values()
            .flat_map(|g| g.ports.values())
            .map(|p| p.in_flight.load(Ordering::Relaxed))
            .sum()
    }

    /// Starts a call on a hosted gear and returns its future, or gives the call back untouched
    /// when no gear of that name is hosted here (so a router can send it elsewhere).
    ///
    /// Everything that can fail before the port runs (unknown port, concurrency limit, a request
    /// that does not decode) fails inside the returned future.
    ///
    /// # Errors
    /// `Err(call)`: the gear is not hosted here.
    pub fn start<'a>(
        &self,
        call: Call<'a>,
    ) -> Result<BoxFuture<'static, Result<Payload, CallError>>, Call<'a>> {
        let port = {
            let gears = read(&self.gears);
            let Some(gear) = gears.get(call.gear) else {
                drop(gears);
                return Err(call);
            };
            match gear.ports.get(call.port) {
                Some(p) => Arc::clone(p),
                None => {
                    let e = CallError::not_found(format!(
                        "gear {} has no port {:?}",
                        call.gear, call.port
                    ));
                    return Ok(Box::pin(std::future::ready(Err(e))));
                }
            }
        };
        Ok(self.run(port, call))
    }

    fn run(
        &self,
        port: Arc<PortState>,
        call: Call<'_>,
    ) -> BoxFuture<'static, Result<Payload, CallError>> {
        let started = Instant::now();
        let fail = |port: &PortState, e: CallError| -> BoxFuture<'static, _> {
            let r = Err(e);
            port.record(started, &r);
            Box::pin(std::future::ready(r))
        };
        let guard = match port.enter() {
            Ok(g) => g,
            Err(e) => return fail(&port, e),
        };
        let Some(front) = self.front() else {
            return fail(&port, CallError::unavailable("node is shutting down"));
        };
        let cap = started + self.config.max_timeout;
        let deadline = call
            .meta
            .deadline
            .unwrap_or_else(|| started + port.timeout.unwrap_or(self.config.default_timeout))
            .min(cap);
        let ctx = Ctx::for_gear(
            front,
            port.gear.clone(),
            port.principal.clone(),
            call.meta,
            deadline,
        );
        let fut = match isolate(|| (port.handler)(ctx, call.arg)) {
            Ok(Ok(fut)) => fut,
            Ok(Err(e)) => return fail(&port, e),
            Err(panic) => return fail(&port, panicked(&port.gear, port.name.as_str(), &panic)),
        };
        Box::pin(async move {
            let r = match tokio::time::timeout_at(deadline, Isolated::new(fut)).await {
                Ok(Ok(r)) => r,
                Ok(Err(panic)) => Err(panicked(&port.gear, port.name.as_str(), &panic)),
                Err(_elapsed) => Err(CallError::timeout(format!(
                    "{}/{} did not reply before its deadline",
                    port.gear, port.name
                ))),
            };
            guard.0.record(started, &r);
            drop(guard);
            r
        })
    }

    /// Queues an event for every local listener of its topic. Returns how many listeners got it.
    ///
    /// # Errors
    /// `bad_request` for an invalid topic name.
    pub fn publish_local(&self, p: &Publish) -> Result<usize, CallError> {
        let Some(list) = read(&self.topics).get(p.topic.as_str()).cloned() else {
            Topic::new(&p.topic).map_err(|e| CallError::bad_request(e.to_string()))?;
            return Ok(0);
        };
        let mut delivered = 0;
        for slot in list.iter() {
            match slot
                .tx
                .try_send((p.event.clone(), p.publisher.clone(), p.trace_id))
            {
                Ok(()) => {
                    delivered += 1;
                    slot.lagging.store(false, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    slot.dropped.increment(1);
                    if !slot.lagging.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            gear = %slot.gear, topic = %p.topic,
                            "listener queue is full; dropping events for it until it catches up"
                        );
                    }
                }
                // The gear was removed and its listener stopped: nothing to deliver to.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        Ok(delivered)
    }
}

fn panicked(gear: &GearName, port: &str, panic: &str) -> CallError {
    tracing::error!(%gear, port, panic, "port panicked; the call fails with internal");
    CallError::internal(format!("{gear}/{port} panicked"))
}

async fn run_listener(
    host: Weak<Host>,
    gear: GearName,
    principal: Principal,
    topic: Topic,
    handler: Arc<ErasedListener>,
    mut rx: mpsc::Receiver<(Event, Principal, TraceId)>,
) {
    while let Some((event, publisher, trace_id)) = rx.recv().await {
        let Some(host) = host.upgrade() else { return };
        let Some(front) = host.front() else { return };
        let deadline = Instant::now() + host.config.listener_timeout;
        drop(host);
        let meta = CallMeta {
            caller: publisher,
            deadline: Some(deadline),
            trace_id,
        };
        let ctx = Ctx::for_gear(front, gear.clone(), principal.clone(), meta, deadline);
        let outcome = match isolate(|| handler(ctx, &event)) {
            Ok(Ok(fut)) => match tokio::time::timeout_at(deadline, Isolated::new(fut)).await {
                Ok(Ok(r)) => r,
                Ok(Err(panic)) => Err(panicked(&gear, &format!("listener of {topic}"), &panic)),
                Err(_elapsed) => Err(CallError::timeout(
                    "listener did not finish before its deadline",
                )),
            },
            Ok(Err(e)) => Err(e),
            Err(panic) => Err(panicked(&gear, &format!("listener of {topic}"), &panic)),
        };
        if let Err(e) = outcome {
            tracing::warn!(%gear, %topic, error = %e, "listener failed");
        }
    }
}

impl Dispatch for Host {
    fn call<'a>(&'a self, call: Call<'a>) -> BoxFuture<'a, Result<Payload, CallError>> {
        match self.start(call) {
            Ok(fut) => fut,
            Err(call) => {
                let e = CallError::not_found(format!("no gear named {:?}", call.gear));
                Box::pin(std::future::ready(Err(e)))
            }
        }
    }

    fn publish(&self, publish: Publish) -> Result<(), CallError> {
        self.publish_local(&publish).map(|_| ())
    }
}

#[cfg(test)]
mod tests;

//! The in-process gear host: finds a gear's port, enforces its deadline and concurrency limit,
//! isolates panics, records metrics, and fans events out to local listeners.
//!
//! The host knows nothing of sockets. A node wraps it in a router that sends calls for gears the
//! host does not have elsewhere; [`Host::start`] hands such calls back untouched for that.
//!
//! # Limits and what happens when they are hit
//! - **Port concurrency** ([`crate::PortOptions::max_concurrency`]): one call more than the limit
//!   is not started: [`Host::start`] hands it back as [`Start::Busy`] with an `overloaded` error
//!   (a router may send it to another replica), and as a dispatcher the host fails it at once.
//!   Nothing is queued.
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

use metrics::{Counter, Key, Label, Recorder};
use rustc_hash::FxHashMap;
use tokio::{sync::mpsc, time::Instant};

use crate::{
    BoxFuture, Call, CallError, CallMeta, Ctx, Dispatch, Event, Gear, GearError, GearMeta, GearName, Payload,
    Principal, Publish, Topic, TraceId,
    ctx::GearIdentity,
    gear::ErasedListener,
    panic::{Isolated, install_panic_hook, isolate},
};

mod run;
mod tap;

pub use tap::Tap;

pub(crate) use run::Run;
mod stats;

use run::{PortState, panicked};
use stats::PortStats;

static METADATA: metrics::Metadata<'static> =
    metrics::Metadata::new("gearmesh", metrics::Level::INFO, Some(module_path!()));

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

struct HostedGear {
    meta: GearMeta,
    ports: FxHashMap<crate::PortName, Arc<PortState>>,
}

/// The queue in front of one listener.
struct ListenerSlot {
    gear: GearName,
    /// Non-zero for a [`Tap`] (a consumer that is not a gear), zero for a gear's listener.
    tap: u64,
    tx: mpsc::Sender<(Event, Principal, TraceId)>,
    lagging: AtomicBool,
    dropped: Counter,
}

/// What [`Host::start`] did with a call.
pub enum Start<'a> {
    /// The gear is hosted here: the call's future (which may already hold an error such as
    /// `not_found` for an unknown port, or `overloaded`).
    Running(BoxFuture<'static, Result<Payload, CallError>>),
    /// No gear of that name is hosted here: the call, untouched, for a router to send elsewhere.
    NotHosted(Call<'a>),
    /// The port is at its concurrency limit (counted in its metrics as `overloaded`): the call,
    /// untouched, for a router to send to another replica, and the error to answer otherwise.
    Busy(Call<'a>, CallError),
}

impl fmt::Debug for Start<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Start::Running(_) => f.write_str("Start::Running"),
            Start::NotHosted(c) => f.debug_tuple("Start::NotHosted").field(c).finish(),
            Start::Busy(c, e) => f.debug_tuple("Start::Busy").field(c).field(e).finish(),
        }
    }
}

/// Hosts gears in-process. See the module docs for limits.
pub struct Host {
    config: HostConfig,
    me: Weak<Host>,
    front: OnceLock<Weak<dyn Dispatch>>,
    recorder: Option<Arc<dyn Recorder + Send + Sync>>,
    clock: quanta::Clock,
    gears: RwLock<FxHashMap<GearName, Arc<HostedGear>>>,
    topics: RwLock<FxHashMap<Topic, Arc<[Arc<ListenerSlot>]>>>,
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host").field("config", &self.config).field("gears", &self.gear_names()).finish()
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
    /// A host with no gears. Per-port call metrics are kept by the host itself (see
    /// [`Host::render_metrics`]); `recorder`, if any, receives the other metrics (dropped events).
    ///
    /// Installs the panic hook of [`crate::install_panic_hook`].
    pub fn new(config: HostConfig, recorder: Option<Arc<dyn Recorder + Send + Sync>>) -> Arc<Self> {
        install_panic_hook();
        Arc::new_cyclic(|me| Self {
            config,
            me: me.clone(),
            front: OnceLock::new(),
            recorder,
            clock: quanta::Clock::new(),
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
            Some(tokio::runtime::Handle::try_current().map_err(|_| GearError::NoRuntime(name.to_string()))?)
        };
        let mut gears = write(&self.gears);
        if gears.contains_key(&name) {
            return Err(GearError::DuplicateGear(name.to_string()));
        }
        let identity = Arc::new(GearIdentity { name: name.clone(), principal: Principal::gear(&name) });
        let recorder = self.recorder.as_deref().map(|r| r as &dyn Recorder);
        let ports = parts
            .ports
            .into_iter()
            .map(|p| {
                let state = PortState {
                    identity: identity.clone(),
                    stats: PortStats::default(),
                    name: p.meta.name.clone(),
                    handler: p.handler,
                    timeout: p.meta.options.timeout,
                    max_concurrency: p.meta.options.max_concurrency.map_or(usize::MAX, NonZeroUsize::get),
                    in_flight: AtomicUsize::new(0),
                    clock: self.clock.clone(),
                };
                (p.meta.name, Arc::new(state))
            })
            .collect();
        let meta = parts.meta;
        gears.insert(name.clone(), Arc::new(HostedGear { meta: meta.clone(), ports }));
        drop(gears);

        if let Some(runtime) = runtime {
            let mut topics = write(&self.topics);
            for l in parts.listeners {
                let (tx, rx) = mpsc::channel(self.config.listener_queue.get());
                let dropped = match recorder {
                    Some(r) => r.register_counter(
                        &Key::from_parts(
                            "gearmesh_events_dropped_total",
                            vec![Label::new("gear", name.to_string()), Label::new("topic", l.topic.to_string())],
                        ),
                        &METADATA,
                    ),
                    None => Counter::noop(),
                };
                let slot =
                    Arc::new(ListenerSlot { gear: name.clone(), tap: 0, tx, lagging: AtomicBool::new(false), dropped });
                let list = topics.entry(l.topic.clone()).or_insert_with(|| Arc::from(Vec::new()));
                *list = list.iter().cloned().chain(std::iter::once(slot)).collect();
                runtime.spawn(run_listener(self.me.clone(), identity.clone(), l.topic, l.handler, rx));
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
            let of_gear = |s: &Arc<ListenerSlot>| s.tap == 0 && s.gear.as_str() == name;
            if list.iter().any(of_gear) {
                *list = list.iter().filter(|s| !of_gear(s)).cloned().collect();
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

    /// Appends the per-port call metrics (calls, errors by code, latency histogram, calls in
    /// flight) in the Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        let gears = read(&self.gears);
        let mut names: Vec<&GearName> = gears.keys().collect();
        names.sort();
        let mut samples = Vec::new();
        for g in names {
            let hosted = &gears[g];
            for p in &hosted.meta.ports {
                if let Some(state) = hosted.ports.get(&p.name) {
                    samples.push(stats::PortSample {
                        gear: g.as_str(),
                        port: p.name.as_str(),
                        stats: &state.stats,
                        in_flight: state.in_flight.load(Ordering::Relaxed),
                    });
                }
            }
        }
        stats::render(out, &samples);
    }

    /// The number of calls running on hosted ports.
    pub fn in_flight(&self) -> usize {
        read(&self.gears).values().flat_map(|g| g.ports.values()).map(|p| p.in_flight.load(Ordering::Relaxed)).sum()
    }

    /// Starts a call on a hosted gear and returns its future, or gives the call back untouched
    /// when no gear of that name is hosted here (so a router can send it elsewhere).
    ///
    /// Everything that can fail before the port runs (unknown port, concurrency limit, a request
    /// that does not decode) fails inside the returned future.
    ///
    pub fn start<'a>(&self, call: Call<'a>) -> Start<'a> {
        let port = {
            let gears = read(&self.gears);
            let Some(gear) = gears.get(call.gear) else {
                drop(gears);
                return Start::NotHosted(call);
            };
            match gear.ports.get(call.port) {
                Some(p) => Arc::clone(p),
                None => {
                    let e = CallError::not_found(format!("gear {} has no port {:?}", call.gear, call.port));
                    return Start::Running(Box::pin(std::future::ready(Err(e))));
                }
            }
        };
        let guard = match port.enter() {
            Ok(g) => g,
            Err(e) => {
                port.record(None, &Err(e.clone()));
                return Start::Busy(call, e);
            }
        };
        Start::Running(self.run(port, guard, call))
    }

    fn run(
        &self,
        port: Arc<PortState>,
        guard: run::InFlight,
        call: Call<'_>,
    ) -> BoxFuture<'static, Result<Payload, CallError>> {
        let started = port.start_clock();
        let fail = |port: &PortState, e: CallError| -> BoxFuture<'static, _> {
            let r = Err(e);
            port.record(started, &r);
            Box::pin(std::future::ready(r))
        };
        let Some(front) = self.front() else {
            return fail(&port, CallError::unavailable("node is shutting down").mark_not_run());
        };
        // The timer clock is read only when the deadline is not one a host already capped.
        let deadline = match call.meta.deadline {
            Some(d) if call.meta.capped => d,
            Some(d) => d.min(Instant::now() + self.config.max_timeout),
            None => {
                let now = Instant::now();
                now + port.timeout.unwrap_or(self.config.default_timeout).min(self.config.max_timeout)
            }
        };
        let ctx = Ctx::for_gear(front, port.identity.clone(), call.meta, deadline);
        let run = Run::new(guard, deadline, started);
        match isolate(|| (port.handler)(ctx, call.arg, run)) {
            Ok(Ok(fut)) => fut,
            Ok(Err(e)) => fail(&port, e),
            Err(panic) => fail(&port, panicked(&port.identity.name, port.name.as_str(), &panic)),
        }
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
            match slot.tx.try_send((p.event.clone(), p.publisher.clone(), p.trace_id)) {
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

async fn run_listener(
    host: Weak<Host>,
    me: Arc<GearIdentity>,
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
            capped: true,
            strategy: None,
            retry: crate::Retry::IfIdempotent,
            per_try_timeout: None,
            hedge_after: None,
        };
        let ctx = Ctx::for_gear(front, me.clone(), meta, deadline);
        let gear = &me.name;
        let outcome = match isolate(|| handler(ctx, &event)) {
            Ok(Ok(fut)) => match tokio::time::timeout_at(deadline, Isolated::new(fut)).await {
                Ok(Ok(r)) => r,
                Ok(Err(panic)) => Err(panicked(gear, &format!("listener of {topic}"), &panic)),
                Err(_elapsed) => Err(CallError::timeout("listener did not finish before its deadline")),
            },
            Ok(Err(e)) => Err(e),
            Err(panic) => Err(panicked(gear, &format!("listener of {topic}"), &panic)),
        };
        if let Err(e) = outcome {
            tracing::warn!(%gear, %topic, error = %e, "listener failed");
        }
    }
}

impl Dispatch for Host {
    fn call<'a>(&'a self, call: Call<'a>) -> BoxFuture<'a, Result<Payload, CallError>> {
        match self.start(call) {
            Start::Running(fut) => fut,
            Start::Busy(_, e) => Box::pin(std::future::ready(Err(e))),
            Start::NotHosted(call) => {
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

//! One hosted port and the life of one call on it: the in-flight guard, the deadline, panic
//! isolation and metrics, wrapped around the port's future in a single allocation.
//!
//! The deadline timer is created only if the port's future does not complete on its first poll,
//! so a port that answers at once never touches the timer wheel.

use std::{
    cell::Cell,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::{Instant, Sleep};

use super::stats::PortStats;
use crate::{CallError, GearName, Payload, PortName, ctx::GearIdentity, gear::ErasedPort, panic::Isolated};

/// One hosted port.
pub(super) struct PortState {
    pub(super) identity: Arc<GearIdentity>,
    pub(super) name: PortName,
    pub(super) handler: Arc<ErasedPort>,
    pub(super) timeout: Option<Duration>,
    pub(super) max_concurrency: usize,
    pub(super) in_flight: AtomicUsize,
    pub(super) stats: PortStats,
    /// The clock call latencies are measured with (raw TSC reads where available, scaled only
    /// for the difference).
    pub(super) clock: quanta::Clock,
}

/// Decrements a port's in-flight count when a call ends, however it ends.
pub(super) struct InFlight(Arc<PortState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl PortState {
    /// Takes a concurrency slot, or fails with `overloaded` at once.
    pub(super) fn enter(self: &Arc<Self>) -> Result<InFlight, CallError> {
        let before = self.in_flight.fetch_add(1, Ordering::Relaxed);
        if before >= self.max_concurrency {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            return Err(CallError::overloaded(format!(
                "{}/{} is at its concurrency limit ({})",
                self.identity.name, self.name, self.max_concurrency
            ))
            .mark_not_run());
        }
        Ok(InFlight(Arc::clone(self)))
    }

    /// A raw clock reading for [`PortState::record`] if this call's latency is sampled (see
    /// [`LATENCY_SAMPLE`]), else `None`.
    pub(super) fn start_clock(&self) -> Option<u64> {
        sample_latency().then(|| self.clock.raw())
    }

    /// Records a finished call, with its latency when it started with a clock reading.
    pub(super) fn record(&self, started: Option<u64>, result: &Result<Payload, CallError>) {
        let elapsed = started.map(|s| self.clock.delta_as_nanos(s, self.clock.raw()));
        self.stats.record(elapsed, result.as_ref().err().map(CallError::code));
    }
}

/// One call in this many has its latency measured, per thread: a clock read costs about 20 ns on
/// this class of machine (a tenth of an in-process call), and the histogram's two atomic adds
/// more. Calls and errors are still counted exactly.
pub(super) const LATENCY_SAMPLE: u32 = 8;

thread_local! {
    static UNTIL_SAMPLE: Cell<u32> = const { Cell::new(0) };
}

/// Whether the call starting now on this thread is timed (the first of every [`LATENCY_SAMPLE`]).
fn sample_latency() -> bool {
    UNTIL_SAMPLE.with(|c| match c.get() {
        0 => {
            c.set(LATENCY_SAMPLE - 1);
            true
        }
        n => {
            c.set(n - 1);
            false
        }
    })
}

/// Logs a port's panic once, with context, and makes the caller's error.
pub(super) fn panicked(gear: &GearName, port: &str, panic: &str) -> CallError {
    tracing::error!(%gear, port, panic, "port panicked; the call fails with internal");
    CallError::internal(format!("{gear}/{port} panicked"))
}

/// What the host hands a port's erased handler so it can wrap its own future.
pub(crate) struct Run {
    guard: InFlight,
    deadline: Instant,
    started: Option<u64>,
}

impl Run {
    pub(super) fn new(guard: InFlight, deadline: Instant, started: Option<u64>) -> Self {
        Self { guard, deadline, started }
    }

    /// Wraps a port's future with the deadline, panic isolation and bookkeeping.
    pub(crate) fn drive<F>(self, fut: F) -> Drive<F>
    where
        F: Future<Output = Result<Payload, CallError>>,
    {
        Drive { inner: Isolated::new(fut), sleep: None, run: Some(self) }
    }

    fn finish(self, result: &Result<Payload, CallError>) {
        self.guard.0.record(self.started, result);
    }
}

pin_project_lite::pin_project! {
    /// A port's future under the host's rules. Dropping it cancels the call (the port's future is
    /// dropped and its concurrency slot freed).
    pub(crate) struct Drive<F> {
        #[pin]
        inner: Isolated<F>,
        sleep: Option<Pin<Box<Sleep>>>,
        run: Option<Run>,
    }
}

impl<F> Future for Drive<F>
where
    F: Future<Output = Result<Payload, CallError>>,
{
    type Output = Result<Payload, CallError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(run) = this.run.as_ref() else {
            return Poll::Ready(Err(CallError::internal("call polled after it finished")));
        };
        let port = &run.guard.0;
        let result = match this.inner.poll(cx) {
            // The port ran, whatever a call of its own told it.
            Poll::Ready(Ok(r)) => r.map_err(CallError::returned_by_a_port),
            Poll::Ready(Err(panic)) => Err(panicked(&port.identity.name, port.name.as_str(), &panic)),
            Poll::Pending => {
                let deadline = run.deadline;
                let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match sleep.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(()) => Err(CallError::timeout(format!(
                        "{}/{} did not reply before its deadline",
                        port.identity.name, port.name
                    ))),
                }
            }
        };
        if let Some(run) = this.run.take() {
            run.finish(&result);
        }
        Poll::Ready(result)
    }
}

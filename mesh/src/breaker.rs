//! Resilience bookkeeping, sans-IO: a circuit [`Breaker`] per (gear, node), a [`RetryBudget`],
//! a latency average ([`Ewma`]), and [`backoff`] for retries.
//!
//! Nothing here reads a clock or draws random numbers: every method takes `now` (the mesh core's
//! [`Time`]) and, where randomness is needed, a number the caller drew. So the unit tests below
//! run on a virtual clock, and the driver (`driver/strategy.rs`) owns the clock and the RNG.
//! Not here: which replica to call, and the calls themselves.

use std::time::Duration;

use serde::Serialize;

use crate::core::Time;

// === Breaker ===

/// Settings of a [`Breaker`].
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// The sliding window the failure rate is measured over.
    pub window: Duration,
    /// The window is kept as this many buckets (the oldest is dropped as time moves on).
    pub buckets: u32,
    /// The breaker never opens on fewer calls than this in the window.
    pub min_calls: u32,
    /// It opens when at least this share of the window's calls failed (0.0 to 1.0).
    pub failure_ratio: f64,
    /// How long it stays open before letting probes through.
    pub open_for: Duration,
    /// Calls let through at once while half-open; this many successes in a row close it, and
    /// one failure opens it again.
    pub probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(10),
            buckets: 10,
            min_calls: 20,
            failure_ratio: 0.5,
            open_for: Duration::from_secs(5),
            probes: 3,
        }
    }
}

/// Where a [`Breaker`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls flow; outcomes are counted.
    Closed,
    /// Calls fail fast (or go to another replica) until the open period ends.
    Open,
    /// A few probe calls go through; their outcome closes or reopens the breaker.
    HalfOpen,
}

impl BreakerState {
    /// The wire name (`closed`, `open`, `half_open`).
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which slot of time (`now / bucket_len`) the counts belong to.
    epoch: u64,
    calls: u32,
    failures: u32,
}

/// A circuit breaker for one (gear, node): closed, open or half-open, driven by call outcomes
/// and the time passed in. See `docs/strategies.md`.
#[derive(Debug, Clone)]
pub struct Breaker {
    config: BreakerConfig,
    state: BreakerState,
    buckets: Vec<Bucket>,
    /// While open: when probes may start.
    open_until: Time,
    /// While half-open: probes let through and not finished yet, and successes so far.
    probing: u32,
    probe_successes: u32,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        let n = config.buckets.max(1) as usize;
        Self {
            config,
            state: BreakerState::Closed,
            buckets: vec![Bucket::default(); n],
            open_until: Time::ZERO,
            probing: 0,
            probe_successes: 0,
        }
    }

    fn bucket_ms(&self) -> u64 {
        let ms = u64::try_from(self.config.window.as_millis()).unwrap_or(u64::MAX);
        (ms / u64::from(self.config.buckets.max(1))).max(1)
    }

    /// The state at `now` (an open breaker whose period ended reads as half-open).
    pub fn state(&self, now: Time) -> BreakerState {
        match self.state {
            BreakerState::Open if now >= self.open_until => BreakerState::HalfOpen,
            s => s,
        }
    }

    /// Calls and failures in the window ending at `now`.
    pub fn window(&self, now: Time) -> (u32, u32) {
        let current = now.as_millis() / self.bucket_ms();
        let n = self.buckets.len() as u64;
        self.buckets
            .iter()
            .filter(|b| b.epoch + n > current && b.epoch <= current)
            .fold((0, 0), |(c, f), b| (c + b.calls, f + b.failures))
    }

    /// Whether a call may go to this replica now. `true` while closed; while half-open, for at
    /// most `probes` calls at once (each must be followed by [`Breaker::record`]); `false` while
    /// open. Returns the state change it made, if any, with the answer.
    pub fn try_acquire(&mut self, now: Time) -> (bool, Option<BreakerState>) {
        match self.state(now) {
            BreakerState::Closed => (true, None),
            BreakerState::Open => (false, None),
            BreakerState::HalfOpen => {
                let changed = if self.state == BreakerState::Open {
                    self.state = BreakerState::HalfOpen;
                    self.probing = 0;
                    self.probe_successes = 0;
                    Some(BreakerState::HalfOpen)
                } else {
                    None
                };
                if self.probing < self.config.probes.max(1) {
                    self.probing += 1;
                    (true, changed)
                } else {
                    (false, changed)
                }
            }
        }
    }

    /// Records the outcome of a call let through by [`Breaker::try_acquire`]; returns the new
    /// state when it changed.
    pub fn record(&mut self, now: Time, failed: bool) -> Option<BreakerState> {
        match self.state {
            BreakerState::Closed => {
                let current = now.as_millis() / self.bucket_ms();
                let len = self.buckets.len();
                let slot = &mut self.buckets[(current % len as u64) as usize];
                if slot.epoch != current {
                    *slot = Bucket { epoch: current, calls: 0, failures: 0 };
                }
                slot.calls += 1;
                slot.failures += u32::from(failed);
                let (calls, failures) = self.window(now);
                let ratio = f64::from(failures) / f64::from(calls.max(1));
                if calls >= self.config.min_calls && ratio >= self.config.failure_ratio {
                    self.open(now);
                    return Some(BreakerState::Open);
                }
                None
            }
            BreakerState::HalfOpen => {
                self.probing = self.probing.saturating_sub(1);
                if failed {
                    self.open(now);
                    return Some(BreakerState::Open);
                }
                self.probe_successes += 1;
                if self.probe_successes >= self.config.probes.max(1) {
                    self.state = BreakerState::Closed;
                    self.buckets.iter_mut().for_each(|b| *b = Bucket::default());
                    return Some(BreakerState::Closed);
                }
                None
            }
            // A call let through before the breaker opened finished late: already counted.
            BreakerState::Open => None,
        }
    }

    /// Gives back a half-open probe slot for a call that was let through but never made.
    pub fn release(&mut self) {
        if self.state == BreakerState::HalfOpen {
            self.probing = self.probing.saturating_sub(1);
        }
    }

    fn open(&mut self, now: Time) {
        self.state = BreakerState::Open;
        self.open_until = now + self.config.open_for;
        self.probing = 0;
        self.probe_successes = 0;
    }
}

// === RetryBudget ===

/// Settings of a [`RetryBudget`].
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetConfig {
    /// Retries allowed per first attempt, e.g. 0.1: retries add at most 10% load (plus the floor).
    pub ratio: f64,
    /// Retries allowed per second whatever the traffic, so a quiet caller can still retry.
    pub min_per_sec: f64,
    /// At most this many retries can be saved up.
    pub max_balance: f64,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self { ratio: 0.1, min_per_sec: 10.0, max_balance: 10.0 }
    }
}

/// A token bucket of retries shared by every call of a node: each first attempt deposits
/// `ratio` tokens, time deposits `min_per_sec`, each retry (or re-route) withdraws one. So over
/// any period, retries are at most `ratio` x calls + `min_per_sec` x seconds + `max_balance`.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    config: BudgetConfig,
    balance: f64,
    last: Time,
    spent: u64,
    refused: u64,
}

impl RetryBudget {
    /// A full budget at `now` (`max_balance` retries saved up, so a node that just started
    /// can retry too).
    pub fn new(config: BudgetConfig, now: Time) -> Self {
        Self { balance: config.max_balance, config, last: now, spent: 0, refused: 0 }
    }

    fn accrue(&mut self, now: Time) {
        let secs = now.since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.balance = (self.balance + secs * self.config.min_per_sec).min(self.config.max_balance);
    }

    /// A first attempt was made.
    pub fn deposit(&mut self, now: Time) {
        self.accrue(now);
        self.balance = (self.balance + self.config.ratio).min(self.config.max_balance);
    }

    /// Takes one retry from the budget; `false` when it is spent (do not retry).
    pub fn withdraw(&mut self, now: Time) -> bool {
        self.accrue(now);
        if self.balance >= 1.0 {
            self.balance -= 1.0;
            self.spent += 1;
            true
        } else {
            self.refused += 1;
            false
        }
    }

    /// Retries made and retries refused since start.
    pub fn counts(&self) -> (u64, u64) {
        (self.spent, self.refused)
    }
}

// === Ewma and backoff ===

/// An exponentially weighted moving average of a replica's latency, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ewma {
    value: f64,
    samples: u64,
}

impl Default for Ewma {
    fn default() -> Self {
        Self::new()
    }
}

impl Ewma {
    /// The weight of a new sample.
    const ALPHA: f64 = 0.2;

    /// No samples yet.
    pub const fn new() -> Self {
        Self { value: 0.0, samples: 0 }
    }

    /// Adds a sample.
    pub fn observe(&mut self, d: Duration) {
        let us = d.as_secs_f64() * 1e6;
        self.value = if self.samples == 0 { us } else { self.value + Self::ALPHA * (us - self.value) };
        self.samples += 1;
    }

    /// The average, or `None` before the first sample.
    pub fn get(&self) -> Option<f64> {
        (self.samples > 0).then_some(self.value)
    }
}

/// The wait before retry number `attempt` (1 for the first retry): exponential from `base`,
/// capped at `cap`, with "full jitter" (`jitter` in `[0, 1)` drawn by the caller scales it).
pub fn backoff(attempt: u32, base: Duration, cap: Duration, jitter: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16)).min(cap);
    exp.mul_f64(jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: u64) -> Time {
        Time::from_millis(ms)
    }

    fn config() -> BreakerConfig {
        BreakerConfig {
            window: Duration::from_secs(10),
            buckets: 10,
            min_calls: 10,
            failure_ratio: 0.5,
            open_for: Duration::from_secs(5),
            probes: 2,
        }
    }

    /// Feeds one call at `now` through the breaker; `None` if it was refused.
    fn call(b: &mut Breaker, now: Time, fail: bool) -> Option<Option<BreakerState>> {
        let (allowed, _) = b.try_acquire(now);
        allowed.then(|| b.record(now, fail))
    }

    #[test]
    fn breaker_opens_half_opens_and_closes_on_a_flapping_replica() {
        let mut b = Breaker::new(config());
        // Healthy: 20 calls, a few failures, below the ratio.
        for i in 0..20 {
            assert_eq!(call(&mut b, t(i * 100), i % 5 == 0), Some(None));
        }
        assert_eq!(b.state(t(2_000)), BreakerState::Closed);
        // It starts flapping: every call fails. The window holds 20 calls with 4 failures; it
        // opens once failures reach half of the calls in the window.
        let mut opened_at = None;
        for i in 0..40 {
            let now = t(2_000 + i * 100);
            if let Some(Some(BreakerState::Open)) = call(&mut b, now, true) {
                opened_at = Some(now);
                break;
            }
        }
        let opened_at = opened_at.expect("the breaker opened");
        assert_eq!(b.state(opened_at), BreakerState::Open);
        // While open, calls are refused without being made.
        assert_eq!(call(&mut b, opened_at + Duration::from_secs(1), false), None);
        // After open_for, it lets `probes` calls through at once.
        let probe_time = opened_at + Duration::from_secs(5);
        assert_eq!(b.state(probe_time), BreakerState::HalfOpen);
        assert_eq!(b.try_acquire(probe_time), (true, Some(BreakerState::HalfOpen)));
        assert_eq!(b.try_acquire(probe_time), (true, None));
        assert_eq!(b.try_acquire(probe_time), (false, None), "only two probes at once");
        // A failed probe opens it again for another period.
        assert_eq!(b.record(probe_time, true), Some(BreakerState::Open));
        b.record(probe_time, false); // the other probe finishing late changes nothing
        assert_eq!(b.state(probe_time + Duration::from_secs(4)), BreakerState::Open);
        // The replica recovered: two successful probes close it.
        let later = probe_time + Duration::from_secs(5);
        assert_eq!(call(&mut b, later, false), Some(None));
        assert_eq!(b.state(later), BreakerState::HalfOpen);
        assert_eq!(call(&mut b, later, false), Some(Some(BreakerState::Closed)));
        // Closed with a fresh window: a single failure does not reopen it.
        assert_eq!(call(&mut b, later, true), Some(None));
        assert_eq!(b.state(later), BreakerState::Closed);
    }

    #[test]
    fn breaker_needs_the_minimum_volume_and_forgets_old_buckets() {
        let mut b = Breaker::new(config());
        for i in 0..9 {
            assert_eq!(call(&mut b, t(i), true), Some(None), "9 failures are under min_calls");
        }
        // 11 s later the window has slid past them.
        assert_eq!(b.window(t(11_000)), (0, 0));
        for i in 0..9 {
            assert_eq!(call(&mut b, t(11_000 + i), false), Some(None));
        }
        // 10 calls in the window, 1 failure: stays closed.
        assert_eq!(call(&mut b, t(11_100), true), Some(None));
        assert_eq!(b.window(t(11_100)), (10, 1));
        assert_eq!(b.state(t(11_100)), BreakerState::Closed);
    }

    #[test]
    fn budget_limits_retries_to_the_ratio_plus_the_floor() {
        let mut budget = RetryBudget::new(BudgetConfig { ratio: 0.1, min_per_sec: 1.0, max_balance: 5.0 }, t(0));
        // 1,000 calls over 10 virtual seconds, each wanting a retry.
        let mut retries = 0;
        for i in 0..1_000 {
            let now = t(i * 10);
            budget.deposit(now);
            if budget.withdraw(now) {
                retries += 1;
            }
        }
        // At most 10% of 1,000 plus 1/s for 10 s plus the saved-up balance.
        assert!(retries <= 100 + 10 + 5, "{retries} retries");
        assert!(retries >= 100, "the budget is usable: {retries}");
        assert_eq!(budget.counts().0, retries);
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let base = Duration::from_millis(10);
        let cap = Duration::from_millis(100);
        assert_eq!(backoff(1, base, cap, 1.0), Duration::from_millis(10));
        assert_eq!(backoff(3, base, cap, 1.0), Duration::from_millis(40));
        assert_eq!(backoff(30, base, cap, 1.0), cap);
        assert_eq!(backoff(3, base, cap, 0.5), Duration::from_millis(20));
        assert_eq!(backoff(3, base, cap, 0.0), Duration::ZERO);
    }

    #[test]
    fn ewma_follows_latency() {
        let mut e = Ewma::new();
        assert_eq!(e.get(), None);
        e.observe(Duration::from_millis(1));
        assert_eq!(e.get(), Some(1000.0));
        for _ in 0..50 {
            e.observe(Duration::from_millis(10));
        }
        assert!(e.get().is_some_and(|v| (v - 10_000.0).abs() < 10.0));
    }
}

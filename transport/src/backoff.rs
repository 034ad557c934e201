//! Reconnecting: capped exponential backoff with jitter, and a retry loop over any async
//! attempt (used by [`crate::Dialer::dial_with_retry`]). The delay sequence is pure and seeded.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Backoff policy: delay `n` is `min(max, initial * multiplier^n)`, then reduced by a random
/// fraction of up to `jitter` (0 = none, 1 = anywhere in `[0, delay]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    /// First delay.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
    /// Growth factor per attempt (at least 1).
    pub multiplier: f64,
    /// Fraction of each delay that is randomised, in `[0, 1]`.
    pub jitter: f64,
    /// Give up after this many failed attempts (`None`: never).
    pub max_attempts: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: 0.5,
            max_attempts: None,
        }
    }
}

impl Backoff {
    /// The delays after failed attempts 0, 1, 2, ... using an RNG seeded with `seed`.
    pub fn delays(&self, seed: u64) -> Delays {
        Delays { policy: self.clone(), attempt: 0, rng: StdRng::seed_from_u64(seed) }
    }
}

/// An endless iterator of backoff delays.
#[derive(Debug)]
pub struct Delays {
    policy: Backoff,
    attempt: u32,
    rng: StdRng,
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let p = &self.policy;
        let factor = p.multiplier.max(1.0).powi(i32::try_from(self.attempt).unwrap_or(i32::MAX));
        let base = p.initial.as_secs_f64() * factor;
        let capped = base.min(p.max.as_secs_f64());
        let jitter = p.jitter.clamp(0.0, 1.0);
        let cut = if jitter > 0.0 { self.rng.random_range(0.0..=jitter) } else { 0.0 };
        self.attempt = self.attempt.saturating_add(1);
        Some(Duration::from_secs_f64((capped * (1.0 - cut)).max(0.0)))
    }
}

/// Runs `attempt` until it succeeds, sleeping per `backoff` between failures; returns the last
/// error once `max_attempts` failures happened. Failures are logged at debug level.
pub async fn retry<T, E, F, Fut>(backoff: &Backoff, seed: u64, mut attempt: F) -> Result<T, E>
where
    E: Display,
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut delays = backoff.delays(seed);
    let mut n = 0u32;
    loop {
        match attempt(n).await {
            Ok(v) => return Ok(v),
            Err(e) => {
                n = n.saturating_add(1);
                if backoff.max_attempts.is_some_and(|max| n >= max) {
                    return Err(e);
                }
                let delay = delays.next().unwrap_or(backoff.max);
                tracing::debug!(attempt = n, error = %e, ?delay, "retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_are_capped_and_jittered() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
            multiplier: 2.0,
            jitter: 0.0,
            max_attempts: None,
        };
        let d: Vec<_> = b.delays(1).take(7).map(|d| d.as_millis()).collect();
        assert_eq!(d, vec![100, 200, 400, 800, 1600, 2000, 2000]);
        let j = Backoff { jitter: 0.5, ..b };
        for (i, d) in j.delays(7).take(50).enumerate() {
            let full = (100u128 << i.min(5)).min(2000);
            let ms = d.as_millis();
            assert!(ms <= full && ms * 2 >= full - 1, "attempt {i}: {ms} of {full}");
        }
        assert_eq!(j.delays(3).take(10).collect::<Vec<_>>(), j.delays(3).take(10).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn retry_until_success_or_limit() {
        let b = Backoff::default();
        let r: Result<u32, String> =
            retry(&b, 1, |n| async move { if n < 3 { Err(format!("fail {n}")) } else { Ok(n) } }).await;
        assert_eq!(r, Ok(3));
        let limited = Backoff { max_attempts: Some(2), ..b };
        let r: Result<(), String> = retry(&limited, 1, |n| async move { Err(format!("fail {n}")) }).await;
        assert_eq!(r, Err("fail 1".to_string()));
    }
}

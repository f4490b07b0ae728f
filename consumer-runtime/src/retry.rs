//! Back-off between attempts: exponential growth from an initial delay, capped, with
//! jitter, and a maximum number of attempts. Pure and small, so it composes.

use std::time::Duration;

/// Exponential back-off with jitter and an attempt limit.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts per record, the first included (1 means no retries).
    pub max_attempts: u32,
    /// Delay before the second attempt.
    pub initial: Duration,
    /// Longest delay.
    pub max: Duration,
    /// Factor each delay grows by.
    pub multiplier: f64,
    /// Fraction of each delay that is randomised (0 = none, 0.5 = ±50 %... of the upper
    /// half: the delay is drawn from `[d·(1-jitter), d]`).
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: 0.5,
        }
    }
}

impl RetryPolicy {
    /// No retries: one attempt.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Whether another attempt follows attempt number `attempt` (1-based) that failed.
    pub fn should_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// The delay after failed attempt number `attempt` (1-based) before jitter:
    /// `initial · multiplier^(attempt-1)`, at most `max`.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let exp = self
            .multiplier
            .max(1.0)
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let secs = (self.initial.as_secs_f64() * exp).min(self.max.as_secs_f64());
        Duration::from_secs_f64(secs.max(0.0))
    }

    /// The delay after failed attempt `attempt` with jitter drawn from `random` in `[0, 1)`.
    pub fn delay_with(&self, attempt: u32, random: f64) -> Duration {
        let base = self.base_delay(attempt).as_secs_f64();
        let jitter = self.jitter.clamp(0.0, 1.0);
        Duration::from_secs_f64(base * (1.0 - jitter * random.clamp(0.0, 1.0)))
    }

    /// The delay after failed attempt `attempt`, with random jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            initial: Duration::from_millis(100),
            max: Duration::from_millis(350),
            multiplier: 2.0,
            jitter: 0.5,
        }
    }

    #[test]
    fn grows_exponentially_up_to_the_cap() {
        let p = policy();
        let ms: Vec<u128> = (1..=4).map(|a| p.base_delay(a).as_millis()).collect();
        assert_eq!(ms, [100, 200, 350, 350]);
    }

    #[test]
    fn jitter_stays_within_its_band() {
        let p = policy();
        assert_eq!(p.delay_with(2, 0.0), Duration::from_millis(200));
        assert_eq!(p.delay_with(2, 1.0), Duration::from_millis(100));
        for _ in 0..100 {
            let d = p.delay(2);
            assert!(
                d >= Duration::from_millis(100) && d <= Duration::from_millis(200),
                "{d:?}"
            );
        }
    }

    #[test]
    fn attempts_are_limited() {
        let p = policy();
        assert!(p.should_retry(3));
        assert!(!p.should_retry(4));
        assert!(!RetryPolicy::none().should_retry(1));
    }
}

//! Retrying remote calls: exponential backoff with jitter, and which failures are worth
//! another attempt. Shared by the S3 and HTTPS backends so both count retries alike.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How hard a backend tries before it reports a service as unavailable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// The wait before the second attempt; doubles for each later one.
    pub base_delay: Duration,
    /// No single wait is longer than this.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(20),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt number `attempt` (1-based): `base · 2^(attempt-1)`,
    /// capped, then scaled into [50%, 100%] by `jitter` in [0, 1) so that many pods
    /// throttled together do not come back in lockstep.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let doubling = 2f64.powi(attempt.saturating_sub(1).min(30) as i32);
        let full = (self.base_delay.as_secs_f64() * doubling).min(self.max_delay.as_secs_f64());
        Duration::from_secs_f64(full * (0.5 + 0.5 * jitter.clamp(0.0, 1.0)))
    }
}

/// A failed attempt, classified.
#[derive(Debug)]
pub enum Failure<E> {
    /// Worth another attempt; `kind` is the label it counts under (`throttled`,
    /// `server_error`, `timeout`, `connection`, `checksum`).
    Transient { kind: &'static str, message: String },
    /// Retrying cannot help.
    Permanent(E),
}

/// A cheap jitter source in [0, 1): the sub-second clock. Good enough to spread retries
/// of different processes; no randomness crate needed for it.
pub fn clock_jitter() -> f64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1_000_000) / 1_000_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_jitter_stays_within_half() {
        let policy = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
        };
        let ms = |attempt, jitter| policy.delay(attempt, jitter).as_millis();
        assert_eq!(ms(1, 1.0), 100);
        assert_eq!(ms(2, 1.0), 200);
        assert_eq!(ms(3, 1.0), 400);
        assert_eq!(ms(4, 1.0), 800);
        assert_eq!(ms(5, 1.0), 1000);
        assert_eq!(ms(40, 1.0), 1000);
        assert_eq!(ms(3, 0.0), 200);
        let jitter = clock_jitter();
        assert!((0.0..1.0).contains(&jitter));
        let d = ms(3, jitter);
        assert!((200..=400).contains(&d), "{d}");
    }
}

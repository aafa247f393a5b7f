//! When to try again: response classification and the backoff schedule, both pure
//! so they can be tested without a clock or a network.
//!
//! The schedule is exponential with full jitter: attempt n waits a uniformly
//! random time in `[0, min(max, initial × multiplier^(n-1))]`. The `backoff` crate
//! the design card names is unmaintained (RUSTSEC-2025-0012); a persistent queue
//! only needs this one pure function of `attempts`, since `next_at` is stored.

use std::time::Duration;

use hyper::StatusCode;

use crate::config::{BackoffConfig, BackoffOverride};

/// How a target's answer is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx: done.
    Delivered,
    /// Worth another attempt (408, 425, 429, 5xx, no answer).
    Retry,
    /// The target refuses this delivery for good (other 4xx, 410, 3xx, 1xx).
    Reject,
}

/// Classifies an HTTP status.
pub fn classify(status: StatusCode) -> Verdict {
    match status.as_u16() {
        200..=299 => Verdict::Delivered,
        408 | 425 | 429 | 500..=599 => Verdict::Retry,
        _ => Verdict::Reject,
    }
}

/// Retry limits of one target.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Upper bound of the first delay.
    pub initial: Duration,
    /// Cap of every delay.
    pub max: Duration,
    /// Growth factor of the bound.
    pub multiplier: f64,
    /// Attempts before giving up; `None`: only `max_age` ends the retries.
    pub max_attempts: Option<u32>,
    /// Age before giving up.
    pub max_age: Duration,
}

impl RetryPolicy {
    /// The delivery defaults with a target's overrides applied.
    pub fn new(
        defaults: &BackoffConfig,
        overrides: &BackoffOverride,
        max_attempts: Option<u32>,
        max_age: Duration,
    ) -> RetryPolicy {
        RetryPolicy {
            initial: overrides.initial.unwrap_or(defaults.initial).0,
            max: overrides.max.unwrap_or(defaults.max).0,
            multiplier: overrides.multiplier.unwrap_or(defaults.multiplier),
            max_attempts,
            max_age,
        }
    }

    /// The upper bound of the delay after the `attempt`-th failure (1-based).
    pub fn delay_bound(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let bound = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        Duration::from_secs_f64(bound.min(self.max.as_secs_f64()))
    }

    /// What to do after the `attempt`-th failed attempt of a job created
    /// `age` ago. `jitter` is uniform in `[0, 1)`; `retry_after` is the
    /// target's own request, honoured even beyond `max`, never past `max_age`.
    pub fn after_failure(
        &self,
        attempt: u32,
        age: Duration,
        retry_after: Option<Duration>,
        jitter: f64,
    ) -> Next {
        if self.max_attempts.is_some_and(|max| attempt >= max) {
            return Next::GiveUp("max attempts reached");
        }
        let delay = match retry_after {
            // Honoured as asked, but never past `max_age`: a target asking
            // for longer still gets its last attempt at the end of the window.
            Some(wanted) => wanted.min(self.max_age.saturating_sub(age)),
            None => self.delay_bound(attempt).mul_f64(jitter.clamp(0.0, 1.0)),
        };
        if age.saturating_add(delay) > self.max_age {
            return Next::GiveUp("max age exceeded");
        }
        Next::RetryIn(delay)
    }
}

/// The decision after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Try again after this delay.
    RetryIn(Duration),
    /// Dead letter, with the reason.
    GiveUp(&'static str),
}

/// Parses `Retry-After`: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    Some(
        (when.with_timezone(&chrono::Utc) - now)
            .to_std()
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(600),
            multiplier: 2.0,
            max_attempts: Some(15),
            max_age: Duration::from_secs(24 * 3600),
        }
    }

    #[test]
    fn statuses() {
        for (code, verdict) in [
            (200, Verdict::Delivered),
            (204, Verdict::Delivered),
            (408, Verdict::Retry),
            (425, Verdict::Retry),
            (429, Verdict::Retry),
            (500, Verdict::Retry),
            (503, Verdict::Retry),
            (400, Verdict::Reject),
            (404, Verdict::Reject),
            (410, Verdict::Reject),
            (301, Verdict::Reject),
        ] {
            assert_eq!(
                classify(StatusCode::from_u16(code).unwrap()),
                verdict,
                "{code}"
            );
        }
    }

    #[test]
    fn bound_grows_then_caps() {
        let p = policy();
        assert_eq!(p.delay_bound(1), Duration::from_secs(1));
        assert_eq!(p.delay_bound(2), Duration::from_secs(2));
        assert_eq!(p.delay_bound(5), Duration::from_secs(16));
        assert_eq!(p.delay_bound(11), Duration::from_secs(600));
        assert_eq!(p.delay_bound(1000), Duration::from_secs(600));
    }

    #[test]
    fn full_jitter_stays_within_the_bound() {
        let p = policy();
        assert_eq!(
            p.after_failure(3, Duration::ZERO, None, 0.0),
            Next::RetryIn(Duration::ZERO)
        );
        assert_eq!(
            p.after_failure(3, Duration::ZERO, None, 0.5),
            Next::RetryIn(Duration::from_secs(2))
        );
    }

    #[test]
    fn limits_and_retry_after() {
        let p = policy();
        assert_eq!(
            p.after_failure(15, Duration::ZERO, None, 0.5),
            Next::GiveUp("max attempts reached")
        );
        assert_eq!(
            p.after_failure(2, Duration::from_secs(24 * 3600), None, 0.5),
            Next::GiveUp("max age exceeded")
        );
        assert_eq!(
            p.after_failure(1, Duration::ZERO, Some(Duration::from_secs(30)), 0.0),
            Next::RetryIn(Duration::from_secs(30))
        );
        assert_eq!(
            p.after_failure(1, Duration::ZERO, Some(Duration::from_secs(3_600)), 0.0),
            Next::RetryIn(Duration::from_secs(3_600))
        );
        assert_eq!(
            p.after_failure(1, Duration::ZERO, Some(Duration::from_secs(99_999)), 0.0),
            Next::RetryIn(Duration::from_secs(24 * 3600)),
            "a Retry-After past max_age keeps one last attempt at its end"
        );
        assert_eq!(
            p.after_failure(1, Duration::from_secs(1), Some(Duration::MAX), 0.0),
            Next::RetryIn(Duration::from_secs(24 * 3600 - 1))
        );
        assert_eq!(
            p.after_failure(
                2,
                Duration::from_secs(24 * 3600),
                Some(Duration::from_secs(5)),
                0.0
            ),
            Next::RetryIn(Duration::ZERO)
        );
    }

    /// During an outage (no answer at all, every attempt failing at once)
    /// the default policy keeps trying until `max_age`, whatever the jitter
    /// draws: no attempt count dead-letters the delivery before.
    #[test]
    fn the_defaults_retry_until_max_age() {
        let delivery = crate::config::DeliveryConfig::default();
        let p = RetryPolicy::new(
            &delivery.backoff,
            &BackoffOverride::default(),
            delivery.max_attempts,
            delivery.max_age.0,
        );
        for jitter in [1.0, 0.5, 0.05] {
            let mut age = Duration::ZERO;
            let mut attempt = 1;
            let reason = loop {
                match p.after_failure(attempt, age, None, jitter) {
                    Next::RetryIn(delay) => age += delay,
                    Next::GiveUp(reason) => break reason,
                }
                attempt += 1;
            };
            assert_eq!(
                reason, "max age exceeded",
                "jitter {jitter}, attempt {attempt}"
            );
            assert!(
                age + p.max >= p.max_age,
                "jitter {jitter}: gave up at {age:?}, {attempt} attempts"
            );
        }
    }

    /// The schedule docs/delivery.md's table shows: bounds double from 1 s and
    /// stop at 10 min from the 11th failure on.
    #[test]
    fn the_documented_schedule() {
        let p = RetryPolicy::new(
            &crate::config::BackoffConfig::default(),
            &BackoffOverride::default(),
            None,
            Duration::from_secs(24 * 3600),
        );
        let bounds: Vec<u64> = (1..=12).map(|n| p.delay_bound(n).as_secs()).collect();
        assert_eq!(bounds, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600]);
        let first_ten: u64 = bounds[..10].iter().sum();
        assert_eq!(first_ten, 1023);
    }

    #[test]
    fn retry_after_formats() {
        let now = chrono::DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z")
            .unwrap()
            .to_utc();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:29:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}

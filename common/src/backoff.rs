//! The one retry policy: wait 50 ms after the first failure, doubling after
//! each further one, never longer than the caller's cap. Used by the consumer
//! (nak delays), the relay, start-up connections, the Redis connector and the
//! command responder.

use std::time::Duration;

/// The wait after the `attempt`-th failure in a row (1-based): 50 ms
/// doubling, at most `cap`.
pub fn backoff(attempt: i64, cap: Duration) -> Duration {
    let exp = attempt.clamp(1, 16) as u32 - 1;
    Duration::from_millis(50u64.saturating_mul(1 << exp)).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_fifty_milliseconds_up_to_the_cap() {
        let cap = Duration::from_secs(5);
        assert_eq!(backoff(1, cap), Duration::from_millis(50));
        assert_eq!(backoff(2, cap), Duration::from_millis(100));
        assert_eq!(backoff(4, cap), Duration::from_millis(400));
        assert_eq!(backoff(30, cap), cap);
        assert_eq!(backoff(i64::MIN, cap), Duration::from_millis(50));
    }
}

//! Passive health checking (outlier detection): an endpoint that answers
//! too many 5xx, or fails at the gateway level (connect failures, resets,
//! timeouts, 502/503/504) too many times in a row, is ejected from the
//! balancer for a while, longer at each repeated ejection. At most a share
//! of a cluster's endpoints are ejected at once, and when too few are left
//! (the panic threshold) the balancer uses them all rather than fail
//! everything.
//!
//! State lives on each endpoint (it survives configuration changes with
//! the endpoint's pool); times are nanoseconds on the process's monotonic
//! clock. The request path pays one atomic load per pick while nothing is
//! ejected.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crate::config::OutlierDetection;

/// Nanoseconds since the first call: the clock ejections are kept in.
pub(crate) fn now() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// What one response says about its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Observation {
    /// Anything but a 5xx or an upstream failure.
    Success,
    /// A 5xx other than a gateway error.
    ServerError,
    /// 502, 503, 504, or the upstream failed (connect, reset, timeout).
    GatewayError,
}

/// One endpoint's record.
#[derive(Debug, Default)]
pub(crate) struct OutlierState {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Ejected until this time (see [`now`]); 0: in rotation.
    ejected_until: AtomicU64,
    /// How many times it has been ejected.
    ejections: AtomicU32,
}

impl OutlierState {
    /// Whether the endpoint is out of rotation at `now`.
    pub(crate) fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Relaxed) > now
    }

    /// How long it stays out, if it is.
    pub(crate) fn ejected_for(&self, now: u64) -> Option<Duration> {
        let until = self.ejected_until.load(Relaxed);
        (until > now).then(|| Duration::from_nanos(until - now))
    }

    /// How many times it has been ejected.
    pub(crate) fn ejections(&self) -> u32 {
        self.ejections.load(Relaxed)
    }

    /// Counts `observation`; returns the ejection's end when this one
    /// crossed a threshold and `may_eject` allowed it.
    pub(crate) fn observe(
        &self,
        config: &OutlierDetection,
        observation: Observation,
        now: u64,
        may_eject: impl FnOnce() -> bool,
    ) -> Option<u64> {
        let (fives, gateway) = match observation {
            Observation::Success => {
                self.consecutive_5xx.store(0, Relaxed);
                self.consecutive_gateway.store(0, Relaxed);
                return None;
            }
            Observation::ServerError => {
                self.consecutive_gateway.store(0, Relaxed);
                (self.consecutive_5xx.fetch_add(1, Relaxed) + 1, 0)
            }
            Observation::GatewayError => (
                self.consecutive_5xx.fetch_add(1, Relaxed) + 1,
                self.consecutive_gateway.fetch_add(1, Relaxed) + 1,
            ),
        };
        let crossed = (config.consecutive_5xx > 0 && fives >= config.consecutive_5xx)
            || (config.consecutive_gateway_errors > 0
                && gateway >= config.consecutive_gateway_errors);
        if !crossed || self.is_ejected(now) || !may_eject() {
            return None;
        }
        self.consecutive_5xx.store(0, Relaxed);
        self.consecutive_gateway.store(0, Relaxed);
        let times = self.ejections.fetch_add(1, Relaxed) + 1;
        let length = config
            .base_ejection_time
            .saturating_mul(times)
            .min(config.max_ejection_time);
        let until = now.saturating_add(u64::try_from(length.as_nanos()).unwrap_or(u64::MAX));
        self.ejected_until.store(until, Relaxed);
        Some(until)
    }
}

/// How many of `total` endpoints may be ejected at once: the configured
/// share, but at least one of two or more (a small cluster can still shed
/// its one bad endpoint), and never the only one.
pub(crate) fn max_ejected(config: &OutlierDetection, total: usize) -> usize {
    if total < 2 {
        return 0;
    }
    (total * config.max_ejection_percent as usize / 100).max(1)
}

/// Whether `healthy` of `total` endpoints is below the panic threshold:
/// then every endpoint is used, ejected or not.
pub(crate) fn is_panic(threshold: u32, healthy: usize, total: usize) -> bool {
    healthy == 0 || healthy * 100 < threshold as usize * total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: 5,
            consecutive_gateway_errors: 3,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(75),
            max_ejection_percent: 50,
            panic_threshold: 50,
        }
    }

    #[test]
    fn consecutive_failures_eject_for_longer_each_time() {
        let config = config();
        let state = OutlierState::default();
        let now = 1_000;
        // Two gateway errors, a success: the run starts over.
        for observation in [
            Observation::GatewayError,
            Observation::GatewayError,
            Observation::Success,
            Observation::GatewayError,
            Observation::GatewayError,
        ] {
            assert_eq!(state.observe(&config, observation, now, || true), None);
        }
        let until = state
            .observe(&config, Observation::GatewayError, now, || true)
            .unwrap();
        assert_eq!(until, now + 30_000_000_000);
        assert!(state.is_ejected(now));
        assert!(!state.is_ejected(until));
        // Ejected again later: twice as long, then capped at the maximum.
        let later = until + 1;
        for _ in 0..2 {
            state.observe(&config, Observation::GatewayError, later, || true);
        }
        let second = state
            .observe(&config, Observation::GatewayError, later, || true)
            .unwrap();
        assert_eq!(second - later, 60_000_000_000);
        let third_start = second + 1;
        for _ in 0..3 {
            state.observe(&config, Observation::GatewayError, third_start, || true);
        }
        assert_eq!(
            state.ejected_for(third_start),
            Some(Duration::from_secs(75))
        );
        assert_eq!(state.ejections(), 3);
    }

    #[test]
    fn plain_5xx_count_toward_their_own_threshold_and_the_cap_holds() {
        let config = config();
        let state = OutlierState::default();
        for _ in 0..4 {
            assert_eq!(
                state.observe(&config, Observation::ServerError, 0, || true),
                None
            );
        }
        // The fifth would eject, but the cluster is at its cap.
        assert_eq!(
            state.observe(&config, Observation::ServerError, 0, || false),
            None
        );
        assert!(!state.is_ejected(0));

        assert_eq!(max_ejected(&config, 1), 0);
        assert_eq!(max_ejected(&config, 2), 1);
        assert_eq!(max_ejected(&config, 3), 1);
        assert_eq!(max_ejected(&config, 10), 5);
        assert!(is_panic(config.panic_threshold, 1, 3));
        assert!(!is_panic(config.panic_threshold, 2, 3));
        assert!(is_panic(config.panic_threshold, 0, 0));
    }
}

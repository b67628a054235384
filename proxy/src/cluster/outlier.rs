//! Passive health checking (outlier detection): an endpoint that answers
//! too many 5xx, or fails at the gateway level (connect failures, resets,
//! timeouts, 502/503/504) too many times in a row, is ejected from the
//! balancer for a while, longer at each repeated ejection. At most a share
//! of a cluster's endpoints are ejected at once, and when too few are left
//! (the panic threshold) the balancer uses them all rather than fail
//! everything.
//!
//! With `success_rate` configured, each endpoint also counts its requests
//! and successes; every interval the cluster compares the rates of the
//! endpoints that served enough requests ([`success_rate_outliers`]) and
//! ejects those far below the mean, under the same cap.
//!
//! State lives on each endpoint (it survives configuration changes with
//! the endpoint's pool); times are nanoseconds on the process's monotonic
//! clock. The request path pays one atomic load per pick while nothing is
//! ejected.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::config::{OutlierDetection, SuccessRate};

/// Nanoseconds since the first reading: the clock ejections are kept in
/// (a request's held time on its way down the stack, see [`crate::clock`]).
pub(crate) fn now() -> u64 {
    crate::clock::nanos()
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
    /// Requests since the last success-rate sweep (with `success_rate`).
    window_total: AtomicU64,
    /// Of those, successes.
    window_successes: AtomicU64,
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
    /// crossed a threshold and `may_eject` (given the time, which `now`
    /// reads only then) allowed it.
    pub(crate) fn observe(
        &self,
        config: &OutlierDetection,
        observation: Observation,
        now: impl FnOnce() -> u64,
        may_eject: impl FnOnce(u64) -> bool,
    ) -> Option<u64> {
        if config.success_rate.is_some() {
            self.window_total.fetch_add(1, Relaxed);
            if observation == Observation::Success {
                self.window_successes.fetch_add(1, Relaxed);
            }
        }
        let (fives, gateway) = match observation {
            Observation::Success => {
                // PERF: read before writing, so that an endpoint that keeps
                // answering leaves its counters' cache line shared by the
                // workers instead of moving it at every response.
                if self.consecutive_5xx.load(Relaxed) != 0 {
                    self.consecutive_5xx.store(0, Relaxed);
                }
                if self.consecutive_gateway.load(Relaxed) != 0 {
                    self.consecutive_gateway.store(0, Relaxed);
                }
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
        if !crossed {
            return None;
        }
        // PERF: the clock is read only for a failure that may eject.
        let now = now();
        if self.is_ejected(now) || !may_eject(now) {
            return None;
        }
        Some(self.eject(config, now))
    }

    /// Takes the endpoint out from `now`, for longer at each ejection;
    /// returns the ejection's end.
    pub(crate) fn eject(&self, config: &OutlierDetection, now: u64) -> u64 {
        self.consecutive_5xx.store(0, Relaxed);
        self.consecutive_gateway.store(0, Relaxed);
        let times = self.ejections.fetch_add(1, Relaxed) + 1;
        let length = config
            .base_ejection_time
            .saturating_mul(times)
            .min(config.max_ejection_time);
        let until = now.saturating_add(u64::try_from(length.as_nanos()).unwrap_or(u64::MAX));
        self.ejected_until.store(until, Relaxed);
        until
    }

    /// The (successes, requests) counted since the last call, which starts
    /// a new window.
    pub(crate) fn take_window(&self) -> (u64, u64) {
        // Total first: a request counted between the two swaps can only
        // raise the next window's rate, never make successes exceed total.
        let total = self.window_total.swap(0, Relaxed);
        let successes = self.window_successes.swap(0, Relaxed).min(total);
        (successes, total)
    }
}

/// The endpoints (indices into `windows`, lowest rate first) whose success
/// rate in the window is below `mean - stdev_factor / 1000 * stdev` of the
/// endpoints that served at least `request_volume` requests, when at least
/// `minimum_hosts` did (Envoy's success-rate outlier detection). `windows`
/// holds each endpoint's (successes, requests).
pub(crate) fn success_rate_outliers(config: &SuccessRate, windows: &[(u64, u64)]) -> Vec<usize> {
    let rates: Vec<(usize, f64)> = windows
        .iter()
        .enumerate()
        .filter(|(_, (_, total))| *total > 0 && *total >= u64::from(config.request_volume))
        .map(|(i, &(successes, total))| (i, successes as f64 * 100.0 / total as f64))
        .collect();
    if rates.is_empty() || rates.len() < config.minimum_hosts as usize {
        return Vec::new();
    }
    let n = rates.len() as f64;
    let mean = rates.iter().map(|(_, r)| r).sum::<f64>() / n;
    let variance = rates.iter().map(|(_, r)| (r - mean).powi(2)).sum::<f64>() / n;
    let threshold = mean - f64::from(config.stdev_factor) / 1000.0 * variance.sqrt();
    let mut outliers: Vec<(usize, f64)> =
        rates.into_iter().filter(|(_, r)| *r < threshold).collect();
    outliers.sort_by(|a, b| a.1.total_cmp(&b.1));
    outliers.into_iter().map(|(i, _)| i).collect()
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
            success_rate: None,
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
            assert_eq!(state.observe(&config, observation, || now, |_| true), None);
        }
        let until = state
            .observe(&config, Observation::GatewayError, || now, |_| true)
            .unwrap();
        assert_eq!(until, now + 30_000_000_000);
        assert!(state.is_ejected(now));
        assert!(!state.is_ejected(until));
        // Ejected again later: twice as long, then capped at the maximum.
        let later = until + 1;
        for _ in 0..2 {
            state.observe(&config, Observation::GatewayError, || later, |_| true);
        }
        let second = state
            .observe(&config, Observation::GatewayError, || later, |_| true)
            .unwrap();
        assert_eq!(second - later, 60_000_000_000);
        let third_start = second + 1;
        for _ in 0..3 {
            state.observe(&config, Observation::GatewayError, || third_start, |_| true);
        }
        assert_eq!(
            state.ejected_for(third_start),
            Some(Duration::from_secs(75))
        );
        assert_eq!(state.ejections(), 3);
    }

    fn rate() -> SuccessRate {
        SuccessRate {
            interval: Duration::from_secs(10),
            minimum_hosts: 5,
            request_volume: 100,
            stdev_factor: 1900,
        }
    }

    #[test]
    fn success_rates_far_below_the_mean_are_outliers() {
        let rate = rate();
        // Rates 100, 100, 100, 100, 50: mean 90, stdev 20, threshold
        // 90 - 1.9 * 20 = 52.
        let windows = [(100, 100), (200, 200), (100, 100), (100, 100), (50, 100)];
        assert_eq!(success_rate_outliers(&rate, &windows), vec![4]);
        // 98 % against 100 %: mean 99.6, stdev 0.8, threshold 98.08.
        let windows = [(100, 100), (100, 100), (100, 100), (100, 100), (98, 100)];
        assert_eq!(success_rate_outliers(&rate, &windows), vec![4]);
        // With a factor of 3 (threshold 99.6 - 2.4 = 97.2), 98 % is fine.
        let loose = SuccessRate {
            stdev_factor: 3000,
            ..rate
        };
        assert!(success_rate_outliers(&loose, &windows).is_empty());
        // Rates 100 x 6, 40, 10: mean 81.25, stdev ~33.3, threshold ~17.9:
        // only the worst goes (a second bad one raises the stdev).
        let windows = [
            (100, 100),
            (100, 100),
            (100, 100),
            (100, 100),
            (100, 100),
            (100, 100),
            (40, 100),
            (10, 100),
        ];
        assert_eq!(success_rate_outliers(&rate, &windows), vec![7]);
        // With a factor of 1 (threshold ~47.9): both, the worst first.
        let strict = SuccessRate {
            stdev_factor: 1000,
            ..rate
        };
        assert_eq!(success_rate_outliers(&strict, &windows), vec![7, 6]);
    }

    #[test]
    fn too_few_requests_or_endpoints_compare_nothing() {
        let rate = rate();
        // Equal rates: the stdev is 0 and nobody is below the mean.
        assert!(success_rate_outliers(&rate, &[(90, 100); 5]).is_empty());
        // The failing endpoint served 99 requests: not compared, and only
        // four are left, below minimum_hosts.
        let windows = [(100, 100), (100, 100), (100, 100), (100, 100), (0, 99)];
        assert!(success_rate_outliers(&rate, &windows).is_empty());
        assert!(success_rate_outliers(&rate, &[]).is_empty());
        // minimum_hosts 2 and volume 1: two endpoints compare.
        let small = SuccessRate {
            minimum_hosts: 2,
            request_volume: 1,
            stdev_factor: 500,
            ..rate
        };
        assert_eq!(success_rate_outliers(&small, &[(1, 1), (0, 1)]), vec![1]);
    }

    #[test]
    fn windows_count_requests_and_successes_and_start_over() {
        let counted = OutlierDetection {
            success_rate: Some(rate()),
            ..config()
        };
        let state = OutlierState::default();
        for observation in [
            Observation::Success,
            Observation::ServerError,
            Observation::GatewayError,
            Observation::Success,
        ] {
            state.observe(&counted, observation, || 0, |_| true);
        }
        assert_eq!(state.take_window(), (2, 4));
        assert_eq!(state.take_window(), (0, 0));
        // Without success_rate nothing is counted.
        let plain = config();
        state.observe(&plain, Observation::Success, || 0, |_| true);
        assert_eq!(state.take_window(), (0, 0));
    }

    #[test]
    fn plain_5xx_count_toward_their_own_threshold_and_the_cap_holds() {
        let config = config();
        let state = OutlierState::default();
        for _ in 0..4 {
            assert_eq!(
                state.observe(&config, Observation::ServerError, || 0, |_| true),
                None
            );
        }
        // The fifth would eject, but the cluster is at its cap.
        assert_eq!(
            state.observe(&config, Observation::ServerError, || 0, |_| false),
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

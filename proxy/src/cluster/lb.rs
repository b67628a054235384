//! Load balancers: weighted round robin, weighted random and least request
//! (power of two choices). Everything a pick needs is prepared when the
//! endpoint set is built; a pick is lock-free and allocation-free.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use crate::config::LbPolicy;
use crate::rng::with_thread_rng;

/// Longest round-robin schedule; larger weight sums are scaled down.
const MAX_SCHEDULE: u64 = 16_384;

/// A prepared balancer for one endpoint set.
#[derive(Debug)]
pub struct Balancer {
    policy: LbPolicy,
    weights: Vec<u32>,
    /// Running sums of `weights`, for weighted random picks.
    cumulative: Vec<u64>,
    /// Endpoint indices in smooth weighted round-robin order.
    schedule: Vec<u32>,
    next: AtomicUsize,
    uniform: bool,
}

impl Balancer {
    /// Prepares a balancer for endpoints with these weights (each >= 1).
    pub fn new(policy: LbPolicy, weights: Vec<u32>) -> Self {
        let mut total = 0u64;
        let cumulative = weights
            .iter()
            .map(|&w| {
                total += u64::from(w);
                total
            })
            .collect();
        let uniform = weights.windows(2).all(|w| w[0] == w[1]);
        let schedule = if policy == LbPolicy::RoundRobin {
            smooth_schedule(&weights)
        } else {
            Vec::new()
        };
        // Start each balancer at a random offset so that many proxies with
        // the same config do not all hit the first endpoint first.
        let start = with_thread_rng(|rng| rng.usize(..schedule.len().max(1)));
        Self {
            policy,
            weights,
            cumulative,
            schedule,
            next: AtomicUsize::new(start),
            uniform,
        }
    }

    /// Picks an endpoint index; `active(i)` is endpoint i's in-flight
    /// request count. `None` only when there are no endpoints.
    pub fn pick(&self, rng: &mut fastrand::Rng, active: impl Fn(usize) -> u64) -> Option<usize> {
        let n = self.weights.len();
        if n <= 1 {
            return (n == 1).then_some(0);
        }
        match self.policy {
            LbPolicy::RoundRobin => {
                let i = self.next.fetch_add(1, Relaxed) % self.schedule.len();
                Some(self.schedule[i] as usize)
            }
            LbPolicy::Random => Some(self.weighted_random(rng)),
            LbPolicy::LeastRequest => {
                let a = self.weighted_random(rng);
                let mut b = self.weighted_random(rng);
                if a == b {
                    b = (a + 1 + rng.usize(..n - 1)) % n;
                }
                // Compare active/weight without division:
                // a/wa <= b/wb  <=>  a*wb <= b*wa.
                let (wa, wb) = (u64::from(self.weights[a]), u64::from(self.weights[b]));
                Some(
                    if active(a).saturating_mul(wb) <= active(b).saturating_mul(wa) {
                        a
                    } else {
                        b
                    },
                )
            }
        }
    }

    fn weighted_random(&self, rng: &mut fastrand::Rng) -> usize {
        let n = self.weights.len();
        if self.uniform {
            return rng.usize(..n);
        }
        let total = self.cumulative.last().copied().unwrap_or(1);
        let x = rng.u64(..total);
        self.cumulative.partition_point(|&c| c <= x)
    }
}

/// Smooth weighted round robin (as in nginx): each round, every endpoint
/// gains its weight and the richest is picked and pays the total. Spreads
/// a heavy endpoint's turns instead of bunching them.
fn smooth_schedule(weights: &[u32]) -> Vec<u32> {
    if weights.is_empty() {
        return Vec::new();
    }
    let g = weights.iter().fold(0u64, |g, &w| gcd(g, u64::from(w)));
    let mut reduced: Vec<u64> = weights.iter().map(|&w| u64::from(w) / g.max(1)).collect();
    let total: u64 = reduced.iter().sum();
    if total > MAX_SCHEDULE {
        for w in &mut reduced {
            *w = (*w * MAX_SCHEDULE / total).max(1);
        }
    }
    let total: i64 = reduced.iter().map(|&w| w as i64).sum();
    let mut current = vec![0i64; reduced.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, w) in reduced.iter().enumerate() {
            current[i] += *w as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        schedule.push(best as u32);
    }
    schedule
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(
        balancer: &Balancer,
        n: usize,
        picks: usize,
        seed: u64,
        active: impl Fn(usize) -> u64,
    ) -> Vec<usize> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut counts = vec![0; n];
        for _ in 0..picks {
            counts[balancer.pick(&mut rng, &active).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn round_robin_follows_weights_exactly_and_interleaves() {
        let balancer = Balancer::new(LbPolicy::RoundRobin, vec![3, 1, 2]);
        assert_eq!(counts(&balancer, 3, 600, 1, |_| 0), vec![300, 100, 200]);
        let schedule = smooth_schedule(&[5, 1, 1]);
        assert_eq!(schedule, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn random_is_within_tolerance_of_weights() {
        let seed = 7;
        let balancer = Balancer::new(LbPolicy::Random, vec![1, 3]);
        let c = counts(&balancer, 2, 40_000, seed, |_| 0);
        let share = c[1] as f64 / 40_000.0;
        assert!((share - 0.75).abs() < 0.02, "seed {seed}: share {share}");
    }

    #[test]
    fn least_request_avoids_the_busy_endpoint() {
        let balancer = Balancer::new(LbPolicy::LeastRequest, vec![1, 1, 1, 1]);
        let c = counts(&balancer, 4, 10_000, 3, |i| if i == 0 { 100 } else { 0 });
        // Endpoint 0 wins a comparison only when it is compared with itself,
        // which p2c avoids by drawing a distinct second choice.
        assert_eq!(c[0], 0, "{c:?}");
        assert!(c[1..].iter().all(|&n| n > 2_500), "{c:?}");
    }

    #[test]
    fn empty_and_single_endpoint_sets() {
        let mut rng = fastrand::Rng::with_seed(1);
        assert_eq!(
            Balancer::new(LbPolicy::RoundRobin, vec![]).pick(&mut rng, |_| 0),
            None
        );
        assert_eq!(
            Balancer::new(LbPolicy::LeastRequest, vec![5]).pick(&mut rng, |_| 0),
            Some(0)
        );
    }

    #[test]
    fn huge_weights_are_scaled_not_exploded() {
        let schedule = smooth_schedule(&[1_000_000, 1]);
        assert!(schedule.len() <= MAX_SCHEDULE as usize + 1);
        assert!(schedule.contains(&1));
    }
}

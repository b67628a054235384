//! Local rate limits: token buckets for a route or a listener, shared by
//! every request and/or one per client, and the [`RateLimit`] layer that
//! answers 429 (gRPC: RESOURCE_EXHAUSTED) with `retry-after` when a bucket
//! is empty.
//!
//! A bucket is kept as GCRA (the generic cell rate algorithm): one number,
//! the time at which the bucket would be full again ("theoretical arrival
//! time"). Taking a token moves it one interval later; a request is
//! refused when that would put it more than `burst` intervals ahead of
//! now. The shared bucket is one atomic compare-and-swap per request; the
//! per-client table is sharded behind mutexes and bounded (see
//! [`Clients`]).
//!
//! Buckets outlive configuration changes that leave their limit as it was
//! (see [`Limiters`]), so a push of unrelated configuration does not hand
//! every client a fresh burst.

use std::collections::HashMap;
use std::future::Future;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode, header};
use pin_project_lite::pin_project;

use crate::cluster::outlier::now;
use crate::config::{self, TokenBucket};
use crate::error::ProxyError;
use crate::http::body::ResponseBody;
use crate::http::error::{is_grpc, local_reply};
use crate::telemetry::RequestMetrics;

/// Who is asking, for per-client buckets and source conditions: set on a
/// request by the connection when its route needs it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Client {
    /// The SPIFFE ID the client proved.
    Identity(Arc<str>),
    /// The client's IP address (no identity proved).
    Ip(IpAddr),
}

impl Client {
    /// The SPIFFE ID, if the client proved one.
    pub(crate) fn identity(&self) -> Option<&str> {
        match self {
            Self::Identity(id) => Some(id),
            Self::Ip(_) => None,
        }
    }
}

/// One GCRA bucket's parameters, in nanoseconds.
#[derive(Debug, Clone, Copy)]
struct Rate {
    /// Time for one token to come back.
    interval: u64,
    /// How far ahead of now the bucket may be: `burst` intervals.
    tolerance: u64,
}

impl Rate {
    fn new(bucket: TokenBucket) -> Self {
        // A rate is at most 1e9 per second (validation): at least 1 ns.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let interval = ((1e9 / bucket.per_second).round() as u64).max(1);
        Self {
            interval,
            tolerance: interval.saturating_mul(u64::from(bucket.burst)),
        }
    }

    /// The bucket's new state after taking a token at `now`, or how long
    /// until a token is there.
    fn take(self, tat: u64, now: u64) -> Result<u64, Duration> {
        let next = tat.max(now).saturating_add(self.interval);
        let ahead = next - now;
        if ahead > self.tolerance {
            return Err(Duration::from_nanos(ahead - self.tolerance));
        }
        Ok(next)
    }
}

/// A bucket shared by every request.
#[derive(Debug)]
struct Bucket {
    rate: Rate,
    tat: AtomicU64,
}

impl Bucket {
    fn new(bucket: TokenBucket) -> Self {
        Self {
            rate: Rate::new(bucket),
            tat: AtomicU64::new(0),
        }
    }

    fn take(&self, now: u64) -> Result<(), Duration> {
        take_atomic(self.rate, &self.tat, now)
    }
}

/// Takes a token from the bucket whose state is `tat`, at `now`.
fn take_atomic(rate: Rate, tat: &AtomicU64, now: u64) -> Result<(), Duration> {
    let mut current = tat.load(Relaxed);
    loop {
        let next = rate.take(current, now)?;
        match tat.compare_exchange_weak(current, next, Relaxed, Relaxed) {
            Ok(_) => return Ok(()),
            Err(actual) => current = actual,
        }
    }
}

/// Shards of the per-client table: requests of different clients rarely
/// wait for one another.
const SHARDS: usize = 16;
/// A full shard looks for clients whose bucket has refilled (which a
/// fresh bucket equals, so they can go) at most this often.
const SWEEP_EVERY: u64 = 100_000_000;

/// One bucket per client, for at most `max_clients` clients.
///
/// A client whose bucket has refilled is indistinguishable from a new
/// one, so it may be forgotten; a full table forgets those first, unless
/// a connection holds the bucket ([`HeldBucket`]). While
/// the table is still full of clients in the middle of their burst, a new
/// client shares one overflow bucket with every other newcomer: memory
/// stays bounded and a flood of new addresses cannot push out the clients
/// being limited.
#[derive(Debug)]
struct Clients {
    rate: Rate,
    per_shard: usize,
    shards: Box<[Mutex<Shard>]>,
    overflow: Bucket,
    hasher: foldhash::fast::RandomState,
}

#[derive(Debug, Default)]
struct Shard {
    // PERF: foldhash rather than SipHash (hashed twice per request): seeded
    // at random per table, and a shard never holds more than `per_shard`
    // clients, so colliding addresses cannot make a long chain.
    tats: HashMap<Client, Arc<AtomicU64>, foldhash::fast::RandomState>,
    last_sweep: u64,
}

impl Clients {
    fn new(bucket: TokenBucket, max_clients: u32) -> Self {
        Self {
            rate: Rate::new(bucket),
            per_shard: (max_clients as usize).div_ceil(SHARDS).max(1),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            overflow: Bucket::new(bucket),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// Takes a token from `client`'s bucket; with `hold`, returns the
    /// bucket for a connection to keep (`None`: the client shares the
    /// overflow bucket).
    fn take(
        &self,
        client: &Client,
        now: u64,
        hold: bool,
    ) -> Result<Option<Arc<AtomicU64>>, Duration> {
        // The remainder is below SHARDS.
        #[allow(clippy::cast_possible_truncation)]
        let index = (self.hasher.hash_one(client) % SHARDS as u64) as usize;
        let mut shard = self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(tat) = shard.tats.get(client) {
            take_atomic(self.rate, tat, now)?;
            return Ok(hold.then(|| tat.clone()));
        }
        if shard.tats.len() >= self.per_shard && now >= shard.last_sweep + SWEEP_EVERY {
            shard.last_sweep = now;
            shard
                .tats
                .retain(|_, tat| Arc::strong_count(tat) > 1 || tat.load(Relaxed) > now);
        }
        if shard.tats.len() >= self.per_shard {
            drop(shard);
            return self.overflow.take(now).map(|()| None);
        }
        let tat = Arc::new(AtomicU64::new(self.rate.take(0, now)?));
        shard.tats.insert(client.clone(), tat.clone());
        Ok(hold.then_some(tat))
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).tats.len())
            .sum()
    }
}

/// A route's or listener's rate limit: its buckets.
#[derive(Debug)]
pub(crate) struct Limiter {
    /// Tells this limiter's buckets from another's in a [`HeldBucket`].
    id: u64,
    config: config::RateLimit,
    shared: Option<Bucket>,
    clients: Option<Clients>,
}

impl Limiter {
    pub(crate) fn new(config: &config::RateLimit) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Self {
            id: NEXT_ID.fetch_add(1, Relaxed),
            config: config.clone(),
            shared: config.shared.map(Bucket::new),
            clients: config
                .per_client
                .map(|bucket| Clients::new(bucket, config.max_clients)),
        }
    }

    /// Whether this limit needs to know the client.
    pub(crate) fn per_client(&self) -> bool {
        self.clients.is_some()
    }

    /// Takes a token from the client's bucket and the shared one, or says
    /// how long until the request would be admitted.
    pub(crate) fn check(&self, client: Option<&Client>) -> Result<(), Duration> {
        let now = now();
        if let (Some(clients), Some(client)) = (&self.clients, client) {
            clients.take(client, now, false)?;
        }
        self.take_shared(now)
    }

    /// [`Limiter::check`] for the client of a connection that keeps its
    /// bucket in `held` from its first request on.
    ///
    /// PERF: a connection's later requests take a token with one
    /// compare-and-swap, without the table's hash, shard lock and lookup.
    pub(crate) fn check_held(&self, client: &Client, held: &HeldBucket) -> Result<(), Duration> {
        let now = now();
        if let Some(clients) = &self.clients {
            match held.0.get() {
                Some((id, tat)) if *id == self.id => take_atomic(clients.rate, tat, now)?,
                kept => {
                    // A hold on another limiter's bucket (the limit changed)
                    // is not replaced: such a connection uses the table.
                    if let Some(tat) = clients.take(client, now, kept.is_none())? {
                        let _ = held.0.set((self.id, tat));
                    }
                }
            }
        }
        self.take_shared(now)
    }

    fn take_shared(&self, now: u64) -> Result<(), Duration> {
        match &self.shared {
            Some(bucket) => bucket.take(now),
            None => Ok(()),
        }
    }
}

/// A connection's hold on its client's bucket in a listener's per-client
/// limit, taken by its first request (see [`Limiter::check_held`]). A
/// held bucket stays in the limiter's table while the connection lives,
/// so that the client's other connections share it.
#[derive(Debug, Default)]
pub(crate) struct HeldBucket(OnceLock<(u64, Arc<AtomicU64>)>);

/// The 429 (gRPC: RESOURCE_EXHAUSTED) for a request over a limit, with
/// `retry-after` in whole seconds, rounded up.
pub(crate) fn limited(wait: Duration, is_grpc: bool) -> Response<ResponseBody> {
    let mut response = local_reply(
        StatusCode::TOO_MANY_REQUESTS,
        8,
        "rate_limited",
        "rate limited\n",
        is_grpc,
    );
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    response
}

/// The limiters of one snapshot, by where they apply. A new snapshot takes
/// over the previous one's limiter for the same place and the same limit.
#[derive(Debug, Default)]
pub(crate) struct Limiters(Mutex<HashMap<String, Arc<Limiter>>>);

impl Limiters {
    /// The limiter for `key`: `previous`'s if its limit is the same.
    pub(crate) fn get(
        &self,
        previous: Option<&Limiters>,
        key: String,
        config: &config::RateLimit,
    ) -> Arc<Limiter> {
        let reused = previous.and_then(|previous| {
            previous
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&key)
                .filter(|limiter| limiter.config == *config)
                .cloned()
        });
        let limiter = reused.unwrap_or_else(|| Arc::new(Limiter::new(config)));
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, limiter.clone());
        limiter
    }
}

/// Builds [`RateLimit`] services.
#[derive(Debug, Clone)]
pub(crate) struct RateLimitLayer {
    state: Option<Arc<Limited>>,
}

/// A route target's limiter and the counters it feeds.
#[derive(Debug)]
pub(crate) struct Limited {
    pub(crate) limiter: Arc<Limiter>,
    pub(crate) metrics: Arc<RequestMetrics>,
}

impl RateLimitLayer {
    /// `None`: no limit, a pass-through.
    pub(crate) fn new(state: Option<Arc<Limited>>) -> Self {
        Self { state }
    }
}

impl<S> tower::Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            state: self.state.clone(),
        }
    }
}

/// Answers 429 when the route's limit is spent; otherwise passes the
/// request on.
#[derive(Debug, Clone)]
pub(crate) struct RateLimit<S> {
    inner: S,
    state: Option<Arc<Limited>>,
}

impl<S, B> tower::Service<Request<B>> for RateLimit<S>
where
    S: tower::Service<Request<B>, Response = Response<ResponseBody>, Error = ProxyError>,
{
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = RateLimitFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if let Some(state) = &self.state {
            let client = req.extensions().get::<Client>();
            if let Err(wait) = state.limiter.check(client) {
                state.metrics.rate_limited.fetch_add(1, Relaxed);
                return RateLimitFuture::Limited {
                    response: Some(Box::new(limited(wait, is_grpc(req.headers())))),
                };
            }
        }
        RateLimitFuture::Inner {
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// The future of [`RateLimit`].
    #[project = RateLimitProj]
    pub(crate) enum RateLimitFuture<F> {
        Inner { #[pin] inner: F },
        // PERF: a local answer is boxed (it is rare), so that the future
        // of a request that goes on is no larger than its inner one's.
        Limited { response: Option<Box<Response<ResponseBody>>> },
    }
}

impl<F> Future for RateLimitFuture<F>
where
    F: Future<Output = Result<Response<ResponseBody>, ProxyError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            RateLimitProj::Inner { inner } => inner.poll(cx),
            RateLimitProj::Limited { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(*response)),
                // Polled again after completing: a caller's bug, answered
                // rather than panicking on the request path.
                None => Poll::Ready(Err(ProxyError::NoRoute)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn bucket(per_second: f64, burst: u32) -> TokenBucket {
        TokenBucket { per_second, burst }
    }

    #[test]
    fn a_bucket_admits_its_burst_then_its_rate() {
        let b = Bucket::new(bucket(10.0, 5));
        let start = 10 * SECOND;
        for _ in 0..5 {
            assert!(b.take(start).is_ok());
        }
        let wait = b.take(start).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        // One token comes back every 100 ms.
        assert!(b.take(start + SECOND / 10).is_ok());
        assert!(b.take(start + SECOND / 10).is_err());
        // Over ten seconds of steady asking, the rate is what is admitted.
        let mut admitted = 0;
        for ms in 0..10_000 {
            if b.take(start + SECOND + ms * 1_000_000).is_ok() {
                admitted += 1;
            }
        }
        // The refilled burst (5) plus 10 per second, within one token.
        assert!((104..=106).contains(&admitted), "{admitted}");
    }

    #[test]
    fn each_client_has_its_own_bucket_and_the_table_is_bounded() {
        let clients = Clients::new(bucket(1.0, 2), 32);
        let a = Client::Ip("10.0.0.1".parse().unwrap());
        let b = Client::Identity("spiffe://td/b".into());
        let t = 5 * SECOND;
        assert!(clients.take(&a, t, false).is_ok());
        assert!(clients.take(&a, t, false).is_ok());
        assert!(clients.take(&a, t, false).is_err());
        assert!(
            clients.take(&b, t, false).is_ok(),
            "another client is not limited by a"
        );
        // Thousands of new addresses: the table stays within its bound.
        for i in 0..5_000u32 {
            let ip = Client::Ip(IpAddr::from(i.to_be_bytes()));
            let _ = clients.take(&ip, t, false);
        }
        assert!(clients.tracked() <= 32 + SHARDS, "{}", clients.tracked());
        // a, mid-burst, is still limited.
        assert!(clients.take(&a, t, false).is_err());
        // Later, refilled clients are swept out to make room.
        let later = t + 10 * SECOND;
        let fresh = Client::Ip("192.0.2.1".parse().unwrap());
        assert!(clients.take(&fresh, later, false).is_ok());
    }

    #[test]
    fn a_connection_holds_its_clients_bucket_and_shares_it() {
        // One token per 1,000 s: nothing refills during the test.
        let config = config::RateLimit {
            shared: None,
            per_client: Some(bucket(0.001, 3)),
            max_clients: 100,
        };
        let limiter = Limiter::new(&config);
        let client = Client::Ip("10.0.0.7".parse().unwrap());
        let (first, second) = (HeldBucket::default(), HeldBucket::default());
        assert!(limiter.check_held(&client, &first).is_ok());
        assert!(first.0.get().is_some(), "the first request takes a hold");
        // The client's other connection, and a check without a hold, draw
        // on the same bucket.
        assert!(limiter.check_held(&client, &second).is_ok());
        assert!(limiter.check(Some(&client)).is_ok());
        assert!(limiter.check_held(&client, &first).is_err());
        assert!(limiter.check_held(&client, &second).is_err());
        // Another limiter (the limit changed) does not use the old hold.
        let changed = Limiter::new(&config);
        assert!(changed.check_held(&client, &first).is_ok());
        assert!(changed.check_held(&client, &first).is_ok());
        assert!(changed.check_held(&client, &first).is_ok());
        assert!(changed.check_held(&client, &first).is_err());
    }

    #[test]
    fn a_held_bucket_is_not_swept() {
        // One client per shard.
        let clients = Clients::new(bucket(1.0, 2), SHARDS as u32);
        let shard_of = |c: &Client| clients.hasher.hash_one(c) % SHARDS as u64;
        let held = Client::Ip("10.0.0.1".parse().unwrap());
        let (free, newcomer) = {
            let mut same_shard = (1..=u32::MAX)
                .map(|i| Client::Ip(IpAddr::from((i << 8).to_be_bytes())))
                .filter(|c| shard_of(c) == shard_of(&held));
            (same_shard.next().unwrap(), same_shard.next().unwrap())
        };
        let t = 5 * SECOND;
        let hold = clients.take(&held, t, true).unwrap().unwrap();
        // Long after, every bucket has refilled: a newcomer to the full
        // shard sweeps it, but the held bucket stays (the newcomer shares
        // the overflow bucket).
        let later = t + 100 * SECOND;
        assert!(clients.take(&newcomer, later, true).unwrap().is_none());
        assert_eq!(clients.tracked(), 1);
        // Let go of, it is swept like any refilled bucket.
        drop(hold);
        let much_later = later + 100 * SECOND;
        assert!(clients.take(&free, much_later, true).unwrap().is_some());
        assert_eq!(clients.tracked(), 1);
    }

    #[test]
    fn a_limited_response_says_when_to_come_back() {
        let response = limited(Duration::from_millis(1500), false);
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        assert_eq!(response.headers()["x-weft-error"], "rate_limited");
        let grpc = limited(Duration::from_millis(1), true);
        assert_eq!(grpc.status(), StatusCode::OK);
        assert_eq!(grpc.headers()["grpc-status"], "8");
        assert_eq!(grpc.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn a_limiter_is_kept_across_snapshots_while_its_limit_stays() {
        let limit = config::RateLimit {
            shared: Some(bucket(1.0, 1)),
            per_client: None,
            max_clients: 10,
        };
        let first = Limiters::default();
        let a = first.get(None, "route/x".into(), &limit);
        let second = Limiters::default();
        let b = second.get(Some(&first), "route/x".into(), &limit);
        assert!(Arc::ptr_eq(&a, &b));
        let changed = config::RateLimit {
            shared: Some(bucket(2.0, 1)),
            ..limit
        };
        let third = Limiters::default();
        let c = third.get(Some(&second), "route/x".into(), &changed);
        assert!(!Arc::ptr_eq(&b, &c));
    }
}

//! The one place where the L7 and L4 stacks are assembled from a
//! configuration, and the snapshot that holds them.
//!
//! A [`Snapshot`] is immutable and published with one `ArcSwap::store`.
//! Everything the request path needs is prepared here: route tables with
//! compiled matchers, each route's service stack, metric handles, header
//! values. Long-lived state (cluster pools, counters) comes from registries
//! keyed by name, so an unchanged cluster keeps its connections.
//!
//! An HTTP request flows: connection (`http::server`: limits, telemetry,
//! router, header rules) -> route stack built by [`route_service`]:
//! timeout -> cluster (load balancer -> endpoint pool -> upstream).

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use tower::ServiceBuilder;

use crate::cluster::{ClusterRegistry, ClusterService, ClusterState};
use crate::config::{self, Config, HeaderOps, ListenerKind, PathMatch, RouteAction};
use crate::http::router::RouteTable;
use crate::resilience::{Timeout, TimeoutLayer};
use crate::telemetry::{AccessLog, ListenerMetrics, Metrics, RequestMetrics};

/// The published snapshot, shared by every listener.
pub(crate) type Shared = Arc<ArcSwap<Snapshot>>;

/// A route's service stack.
///
/// PERF: every route has the same stack (a layer a route does not use is a
/// pass-through), so the type is named rather than erased with
/// `BoxCloneSyncService`, whose clone and call cost two allocations per
/// request (dhat: 17 -> 12 allocations per proxied request together with
/// the header-count and request-id changes, benches/RESULTS.md).
pub(crate) type RouteService = Timeout<ClusterService>;

/// Everything the data plane needs for one configuration.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) config: Arc<Config>,
    /// By listener slot (`listener::ListenerSet`); `None` for the slots of
    /// listeners this configuration does not have.
    listeners: Vec<Option<ListenerSnapshot>>,
    /// Each listener's bound address, in configuration order.
    pub(crate) bound: Vec<(Arc<str>, std::net::SocketAddr)>,
    pub(crate) clusters: HashMap<Arc<str>, Arc<ClusterState>>,
}

impl Snapshot {
    /// The listener serving the socket in `slot`, if this configuration
    /// still has one there.
    pub(crate) fn listener(&self, slot: usize) -> Option<&ListenerSnapshot> {
        self.listeners.get(slot)?.as_ref()
    }
}

/// A listener's prepared state.
#[derive(Debug, Clone)]
pub(crate) enum ListenerSnapshot {
    Http(Arc<HttpListener>),
    Tcp(Arc<TcpListener>),
}

/// An HTTP listener's prepared state.
#[derive(Debug)]
pub(crate) struct HttpListener {
    pub(crate) config: config::Listener,
    pub(crate) table: RouteTable<Arc<PreparedRoute>>,
    pub(crate) via_h1: Option<HeaderValue>,
    pub(crate) via_h2: Option<HeaderValue>,
    /// Counts requests that matched no route (or failed before routing).
    pub(crate) unrouted: Arc<RequestMetrics>,
    pub(crate) metrics: Arc<ListenerMetrics>,
    pub(crate) access_log: Option<AccessLog>,
}

/// A TCP listener's prepared state.
#[derive(Debug)]
pub(crate) struct TcpListener {
    pub(crate) config: config::Listener,
    pub(crate) cluster: Arc<ClusterState>,
    pub(crate) metrics: Arc<ListenerMetrics>,
    /// How long a connection may outlive the drain signal.
    pub(crate) drain_timeout: std::time::Duration,
}

/// A route, ready to serve.
#[derive(Debug)]
pub(crate) struct PreparedRoute {
    pub(crate) name: Arc<str>,
    pub(crate) action: PreparedAction,
    pub(crate) rewrite: Option<PathRewrite>,
    pub(crate) host_rewrite: Option<HeaderValue>,
    pub(crate) request_headers: HeaderOps,
    pub(crate) response_headers: HeaderOps,
}

/// What a prepared route does.
#[derive(Debug)]
pub(crate) enum PreparedAction {
    /// Forward to one of the targets (one unless a weighted split).
    Forward {
        targets: Vec<Target>,
        total_weight: u64,
    },
    /// Answer directly.
    Direct {
        status: StatusCode,
        body: Bytes,
        metrics: Arc<RequestMetrics>,
    },
}

/// One cluster a route forwards to.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) service: RouteService,
    pub(crate) metrics: Arc<RequestMetrics>,
    /// Running weight sum up to and including this target.
    pub(crate) cumulative_weight: u64,
}

/// How a route rewrites the path.
#[derive(Debug)]
pub(crate) enum PathRewrite {
    /// Replace the first `matched` bytes (the matched prefix).
    Prefix {
        matched: usize,
        replacement: Box<str>,
    },
    /// Replace the whole path (an exact match).
    Whole(Box<str>),
}

/// A route's stack, top to bottom in request order.
fn route_service(route: &config::Route, cluster: &Arc<ClusterState>) -> RouteService {
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(route.timeout)) // request to response headers
        .service(ClusterService::new(cluster.clone())); // lb -> pool -> upstream
    svc
}

/// Builds a snapshot. `slots` gives each listener's socket slot and bound
/// address, in configuration order. Reconciles cluster state (resolving new
/// DNS names first), so it awaits; it does no I/O on the request path's
/// runtime beyond that.
pub(crate) async fn build(
    config: Arc<Config>,
    slots: &[(usize, std::net::SocketAddr)],
    registry: &ClusterRegistry,
    metrics: &Metrics,
    access_log: Option<&AccessLog>,
) -> Snapshot {
    let clusters = registry.reconcile(&config.clusters).await;
    let cluster = |name: &str| {
        clusters
            .get(name)
            .cloned()
            .expect("validation guarantees that cluster references resolve")
    };
    let empty: Arc<str> = Arc::from("");
    let prepared = config.listeners.iter().map(|listener| {
        let listener_metrics = metrics.listener(&listener.name);
        match &listener.kind {
            ListenerKind::Tcp { cluster: name } => ListenerSnapshot::Tcp(Arc::new(TcpListener {
                config: listener.clone(),
                cluster: cluster(name),
                metrics: listener_metrics,
                drain_timeout: config.drain_timeout,
            })),
            ListenerKind::Http { route_config } => {
                let routes = config
                    .route_configs
                    .iter()
                    .find(|r| r.name == *route_config)
                    .expect("validation guarantees that route_config references resolve");
                let table = RouteTable::new(routes, |_, route| {
                    Arc::new(prepare_route(route, &listener.name, metrics, &cluster))
                });
                let via = |version: &str| {
                    listener
                        .via
                        .as_ref()
                        .and_then(|via| HeaderValue::try_from(format!("{version} {via}")).ok())
                };
                ListenerSnapshot::Http(Arc::new(HttpListener {
                    config: listener.clone(),
                    table,
                    via_h1: via("1.1"),
                    via_h2: via("2"),
                    unrouted: metrics.request(&listener.name, &empty, &empty),
                    metrics: listener_metrics,
                    access_log: access_log.cloned(),
                }))
            }
        }
    });
    let slot_count = slots.iter().map(|(slot, _)| slot + 1).max().unwrap_or(0);
    let mut listeners = vec![None; slot_count];
    for ((slot, _), listener) in slots.iter().zip(prepared) {
        listeners[*slot] = Some(listener);
    }
    let bound = config
        .listeners
        .iter()
        .zip(slots)
        .map(|(listener, (_, address))| (listener.name.clone(), *address))
        .collect();
    Snapshot {
        config,
        listeners,
        bound,
        clusters,
    }
}

fn prepare_route(
    route: &config::Route,
    listener: &Arc<str>,
    metrics: &Metrics,
    cluster: &impl Fn(&str) -> Arc<ClusterState>,
) -> PreparedRoute {
    let target = |name: &Arc<str>, cumulative_weight: u64| Target {
        service: route_service(route, &cluster(name)),
        metrics: metrics.request(listener, &route.name, name),
        cumulative_weight,
    };
    let action = match &route.action {
        RouteAction::Cluster(name) => PreparedAction::Forward {
            targets: vec![target(name, 1)],
            total_weight: 1,
        },
        RouteAction::Weighted(split) => {
            let mut total = 0;
            let targets = split
                .iter()
                .filter(|(_, weight)| *weight > 0)
                .map(|(name, weight)| {
                    total += u64::from(*weight);
                    target(name, total)
                })
                .collect();
            PreparedAction::Forward {
                targets,
                total_weight: total,
            }
        }
        RouteAction::Direct { status, body } => PreparedAction::Direct {
            status: *status,
            body: body.clone(),
            metrics: metrics.request(listener, &route.name, &Arc::from("")),
        },
    };
    let rewrite = route
        .prefix_rewrite
        .as_ref()
        .map(|replacement| match &route.matcher.path {
            PathMatch::Prefix(prefix) => PathRewrite::Prefix {
                matched: prefix.len(),
                replacement: replacement.clone(),
            },
            PathMatch::Exact(_) | PathMatch::Regex(_) => PathRewrite::Whole(replacement.clone()),
        });
    PreparedRoute {
        name: route.name.clone(),
        action,
        rewrite,
        host_rewrite: route.host_rewrite.clone(),
        request_headers: route.request_headers.clone(),
        response_headers: route.response_headers.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
listeners:
  - { name: web, address: "127.0.0.1:0", route_config: main }
  - { name: raw, address: "127.0.0.1:0", protocol: tcp, cluster: app }
route_configs:
  - name: main
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - { name: split, weighted_clusters: [{ cluster: app, weight: 1 }, { cluster: other, weight: 0 }, { cluster: other, weight: 3 }] }
clusters:
  - { name: app, endpoints: [{ address: "127.0.0.1:1" }] }
  - { name: other, endpoints: [{ address: "127.0.0.1:2" }] }
"#;

    async fn snapshot(registry: &ClusterRegistry, metrics: &Metrics, yaml: &str) -> Snapshot {
        let config = Arc::new(Config::from_yaml(yaml, "test").unwrap());
        let slots: Vec<_> = (0..config.listeners.len())
            .map(|slot| (slot, "127.0.0.1:1".parse().unwrap()))
            .collect();
        build(config, &slots, registry, metrics, None).await
    }

    #[tokio::test]
    async fn weighted_targets_skip_zero_weights_and_accumulate() {
        let metrics = Arc::new(Metrics::new());
        let registry = ClusterRegistry::new(metrics.clone(), tokio::runtime::Handle::current());
        let snapshot = snapshot(&registry, &metrics, CONFIG).await;
        let Some(ListenerSnapshot::Http(http)) = snapshot.listener(0) else {
            panic!("listener 0 is http")
        };
        let headers = http::HeaderMap::new();
        let parts = crate::http::router::RequestParts {
            host: "a",
            method: &http::Method::GET,
            path: "/",
            headers: &headers,
        };
        let route = http.table.select(&parts).unwrap();
        let PreparedAction::Forward {
            targets,
            total_weight,
        } = &route.action
        else {
            panic!("forwarding route")
        };
        assert_eq!(*total_weight, 4);
        assert_eq!(
            targets
                .iter()
                .map(|t| t.cumulative_weight)
                .collect::<Vec<_>>(),
            [1, 4]
        );
        assert!(matches!(
            snapshot.listener(1),
            Some(ListenerSnapshot::Tcp(_))
        ));
    }

    #[tokio::test]
    async fn unchanged_clusters_keep_their_state_across_snapshots() {
        let metrics = Arc::new(Metrics::new());
        let registry = ClusterRegistry::new(metrics.clone(), tokio::runtime::Handle::current());
        let first = snapshot(&registry, &metrics, CONFIG).await;
        let changed = CONFIG.replace("127.0.0.1:2", "127.0.0.1:3");
        let second = snapshot(&registry, &metrics, &changed).await;
        assert!(
            Arc::ptr_eq(&first.clusters["app"], &second.clusters["app"]),
            "app is unchanged"
        );
        assert!(
            !Arc::ptr_eq(&first.clusters["other"], &second.clusters["other"]),
            "other changed"
        );
    }

    #[tokio::test]
    async fn endpoints_that_stay_keep_their_pools_when_a_cluster_changes() {
        let metrics = Arc::new(Metrics::new());
        let registry = ClusterRegistry::new(metrics.clone(), tokio::runtime::Handle::current());
        let first = snapshot(&registry, &metrics, CONFIG).await;
        let endpoint = |s: &Snapshot, cluster: &str, address: &str| {
            s.clusters[cluster]
                .endpoints()
                .endpoints
                .iter()
                .find(|e| e.addr.to_string() == address)
                .cloned()
        };
        // A workload joins `app`, and its balancer changes.
        let scaled = CONFIG.replace(
            r#"{ name: app, endpoints: [{ address: "127.0.0.1:1" }] }"#,
            r#"{ name: app, lb: random, endpoints: [{ address: "127.0.0.1:1" }, { address: "127.0.0.1:4" }] }"#,
        );
        let second = snapshot(&registry, &metrics, &scaled).await;
        let kept = endpoint(&first, "app", "127.0.0.1:1").unwrap();
        assert!(Arc::ptr_eq(
            &kept,
            &endpoint(&second, "app", "127.0.0.1:1").unwrap()
        ));
        assert!(endpoint(&second, "app", "127.0.0.1:4").is_some());
        // A new connect timeout means new connections: nothing is kept.
        let slower = scaled.replace("lb: random,", "lb: random, connect_timeout: 9s,");
        let third = snapshot(&registry, &metrics, &slower).await;
        assert!(!Arc::ptr_eq(
            &kept,
            &endpoint(&third, "app", "127.0.0.1:1").unwrap()
        ));
    }

    /// Idle connections must stay cheap: the per-connection task is the
    /// future of `http::server::serve`, measured here before it is polled.
    /// (hyper's own buffers come on top and are measured by the benches.)
    #[tokio::test]
    async fn connection_future_stays_small() {
        let metrics = Arc::new(Metrics::new());
        let registry = ClusterRegistry::new(metrics.clone(), tokio::runtime::Handle::current());
        let snapshot = Arc::new(snapshot(&registry, &metrics, CONFIG).await);
        let Some(ListenerSnapshot::Http(http)) = snapshot.listener(0).cloned() else {
            panic!("listener 0 is http")
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let peer = client.local_addr().unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let shared: Shared = Arc::new(ArcSwap::new(snapshot));
        let drain = crate::drain::Drain::new();
        let future = crate::http::server::serve(server, peer, 0, http, shared, drain);
        let size = std::mem::size_of_val(&future);
        // PERF: 3.7 KiB while hyper's connection state lived inline; boxed
        // (and released while a connection is parked) it is 1.4 KiB, and an
        // idle connection costs 3.2 KiB instead of 25.5 (benches/RESULTS.md).
        // An upgraded tunnel's copy state made it 1,920 bytes until the
        // tunnel was boxed too (1,328 bytes).
        assert!(size <= 1536, "connection future is {size} bytes");
    }
}

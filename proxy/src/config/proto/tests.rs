use std::path::PathBuf;

use weft_proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use weft_proto::google::rpc::Status;
use weft_proto::prost::Message;

use super::*;
use crate::config::Config;

/// Every example configuration shipped in `config/examples/`, parsed.
fn examples() -> Vec<(PathBuf, BootstrapSpec)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/examples");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no examples in {}", dir.display());
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let spec: BootstrapSpec = serde_yaml_ng::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (path, spec)
        })
        .collect()
}

/// Encodes and decodes a message, checking that the bytes carry it whole.
fn wire<M: Message + Default + PartialEq + fmt::Debug>(message: &M) -> M {
    let decoded = M::decode(message.encode_to_vec().as_slice()).unwrap();
    assert_eq!(&decoded, message);
    decoded
}

/// The spec of `spec`'s xDS-served resources only.
fn served_part(spec: &BootstrapSpec) -> BootstrapSpec {
    BootstrapSpec {
        listeners: spec.listeners.clone(),
        route_configs: spec.route_configs.clone(),
        clusters: spec.clusters.clone(),
        ..BootstrapSpec::default()
    }
}

#[test]
fn examples_round_trip_through_protos_and_bytes() {
    for (path, spec) in examples() {
        let origin = path.display();
        for listener in &spec.listeners {
            let back = ListenerSpec::try_from(wire(&pb::Listener::from(listener))).unwrap();
            assert_eq!(&back, listener, "{origin}: listener {:?}", listener.name);
        }
        for config in &spec.route_configs {
            let back =
                RouteConfigSpec::try_from(wire(&pb::RouteConfiguration::from(config))).unwrap();
            assert_eq!(&back, config, "{origin}: route_config {:?}", config.name);
        }
        for cluster in &spec.clusters {
            let back = ClusterSpec::try_from(wire(&pb::Cluster::from(cluster))).unwrap();
            assert_eq!(&back, cluster, "{origin}: cluster {:?}", cluster.name);
        }
    }
}

#[test]
fn examples_survive_a_discovery_response_and_still_validate() {
    for (path, spec) in examples() {
        let origin = path.display();
        // One response per type, as a control plane sends them.
        let response = |type_url: &str, resources: Vec<prost_types::Any>| DiscoveryResponse {
            version_info: "1".into(),
            resources,
            type_url: type_url.into(),
            nonce: "a".into(),
        };
        let listeners = wire(&response(
            LISTENER_TYPE_URL,
            spec.listeners
                .iter()
                .map(|l| pack(&pb::Listener::from(l)))
                .collect(),
        ));
        let routes = wire(&response(
            ROUTE_CONFIGURATION_TYPE_URL,
            spec.route_configs
                .iter()
                .map(|r| pack(&pb::RouteConfiguration::from(r)))
                .collect(),
        ));
        let clusters = wire(&response(
            CLUSTER_TYPE_URL,
            spec.clusters
                .iter()
                .map(|c| pack(&pb::Cluster::from(c)))
                .collect(),
        ));

        let received = bootstrap_from_resources(
            listeners
                .resources
                .iter()
                .map(|a| unpack(a).unwrap())
                .collect(),
            routes
                .resources
                .iter()
                .map(|a| unpack(a).unwrap())
                .collect(),
            clusters
                .resources
                .iter()
                .map(|a| unpack(a).unwrap())
                .collect(),
            Vec::new(),
        )
        .unwrap();
        assert_eq!(received, served_part(&spec), "{origin}");

        // The local bootstrap supplies the rest; the whole goes through the
        // one validator.
        let whole = BootstrapSpec {
            admin: spec.admin.clone(),
            drain_timeout: spec.drain_timeout,
            access_log: spec.access_log.clone(),
            ..received
        };
        assert_eq!(whole, spec, "{origin}");
        if let Err(errors) = Config::try_from(whole) {
            panic!("{origin}: {errors}");
        }
    }
}

#[test]
fn unset_optional_fields_stay_unset() {
    let listener = ListenerSpec {
        name: "web".into(),
        address: "127.0.0.1:0".into(),
        protocol: None,
        route_config: None,
        cluster: None,
        sni_routes: None,
        max_connections: None,
        header_read_timeout: None,
        idle_timeout: None,
        max_request_headers_bytes: None,
        max_request_headers: None,
        max_concurrent_streams: None,
        via: None,
        xff_num_trusted_hops: None,
        preserve_request_id: None,
        tls: None,
        rate_limit: None,
        fault: None,
        policy: None,
        tracing: None,
        istio_metrics: None,
    };
    let proto = pb::Listener::from(&listener);
    assert_eq!(
        proto,
        pb::Listener {
            name: "web".into(),
            address: "127.0.0.1:0".into(),
            ..pb::Listener::default()
        }
    );
    assert_eq!(ListenerSpec::try_from(wire(&proto)).unwrap(), listener);

    let route_config = RouteConfigSpec {
        name: "main".into(),
        virtual_hosts: vec![VirtualHostSpec {
            name: "all".into(),
            domains: vec!["*".into()],
            routes: vec![RouteSpec {
                name: None,
                matcher: None,
                cluster: None,
                weighted_clusters: None,
                direct_response: None,
                prefix_rewrite: None,
                host_rewrite: None,
                timeout: None,
                request_headers: None,
                response_headers: None,
                retry_policy: None,
                fault: None,
                rate_limit: None,
                stream_idle_timeout: None,
                policy: None,
            }],
        }],
    };
    let proto = pb::RouteConfiguration::from(&route_config);
    assert_eq!(proto.virtual_hosts[0].routes[0], pb::Route::default());
    assert_eq!(
        RouteConfigSpec::try_from(wire(&proto)).unwrap(),
        route_config
    );

    let cluster = ClusterSpec {
        name: "users".into(),
        protocol: None,
        lb: None,
        connect_timeout: None,
        dns_refresh: None,
        pool: Some(PoolSpec::default()),
        endpoints: vec![EndpointSpec {
            address: "127.0.0.1:1".into(),
            weight: None,
        }],
        tls: None,
        outlier_detection: None,
        circuit_breakers: None,
        health_check: None,
    };
    let proto = pb::Cluster::from(&cluster);
    assert_eq!(proto.pool, Some(pb::Pool::default()));
    assert_eq!(ClusterSpec::try_from(wire(&proto)).unwrap(), cluster);
}

#[test]
fn explicit_zeros_differ_from_unset() {
    let unset = pb::Listener {
        name: "web".into(),
        ..pb::Listener::default()
    };
    let zeros = pb::Listener {
        max_connections: Some(0),
        idle_timeout: Some(prost_types::Duration::default()),
        via: Some(String::new()),
        ..unset.clone()
    };
    // Presence is on the wire, not only in memory.
    assert_ne!(unset.encode_to_vec(), zeros.encode_to_vec());
    let spec = ListenerSpec::try_from(wire(&zeros)).unwrap();
    assert_eq!(spec.max_connections, Some(0));
    assert_eq!(spec.idle_timeout, Some(Duration::ZERO));
    assert_eq!(spec.via.as_deref(), Some(""));
    assert_eq!(pb::Listener::from(&spec), zeros);
}

/// A proto with every field set, including the cases the spec must keep
/// apart: an empty weighted split, a zero timeout, a sub-second duration.
fn full_route_configuration() -> pb::RouteConfiguration {
    let ops = pb::HeaderOps {
        set: [("x-a".to_owned(), "1".to_owned())].into(),
        add: [("x-b".to_owned(), "2".to_owned())].into(),
        remove: vec!["x-c".into()],
    };
    pb::RouteConfiguration {
        name: "main".into(),
        virtual_hosts: vec![pb::VirtualHost {
            name: "api".into(),
            domains: vec!["api.example.com".into(), "*".into()],
            routes: vec![
                pb::Route {
                    name: Some("users".into()),
                    r#match: Some(pb::RouteMatch {
                        prefix: Some("/users/".into()),
                        exact: Some("/users".into()),
                        regex: Some("/users/[0-9]+".into()),
                        methods: vec!["GET".into()],
                        source_identities: vec!["spiffe://example.org/ns/shop/*".into()],
                        headers: vec![pb::HeaderMatch {
                            name: "x-env".into(),
                            exact: Some("canary".into()),
                            regex: Some("c.*".into()),
                            present: Some(false),
                        }],
                    }),
                    cluster: Some("users".into()),
                    weighted_clusters: Some(pb::WeightedClusters {
                        clusters: vec![pb::WeightedCluster {
                            cluster: "users".into(),
                            weight: 9,
                        }],
                    }),
                    direct_response: Some(pb::DirectResponse {
                        status: 200,
                        body: Some("ok".into()),
                    }),
                    prefix_rewrite: Some("/v2/users/".into()),
                    host_rewrite: Some("users.internal".into()),
                    timeout: Some(prost_types::Duration {
                        seconds: 1,
                        nanos: 500_000_000,
                    }),
                    request_headers: Some(ops.clone()),
                    response_headers: Some(ops),
                    retry_policy: Some(pb::RetryPolicy {
                        num_retries: Some(3),
                        retry_on: vec!["5xx".into(), "retriable_status_codes".into()],
                        retriable_status_codes: vec![409],
                        retriable_grpc_statuses: vec!["unavailable".into()],
                        per_try_timeout: Some(prost_types::Duration {
                            seconds: 1,
                            nanos: 0,
                        }),
                        backoff_base: None,
                        backoff_max: None,
                        retry_non_idempotent: Some(true),
                        max_body_bytes: Some(1024),
                        budget: Some(pb::RetryBudget {
                            ratio: Some(0.5),
                            min_per_second: Some(3),
                            window: None,
                        }),
                    }),
                    fault: Some(pb::Fault {
                        delay: Some(pb::FaultDelay {
                            duration: Some(prost_types::Duration {
                                seconds: 0,
                                nanos: 50_000_000,
                            }),
                            percent: Some(12.5),
                        }),
                        abort: Some(pb::FaultAbort {
                            http_status: Some(503),
                            grpc_status: Some("unavailable".into()),
                            percent: Some(1.0),
                        }),
                        headers: vec![pb::HeaderMatch {
                            name: "x-chaos".into(),
                            exact: Some("1".into()),
                            regex: None,
                            present: None,
                        }],
                        source_identities: vec!["spiffe://example.org/ns/shop/sa/web".into()],
                        allow_header_faults: Some(true),
                        max_active: Some(10),
                    }),
                    stream_idle_timeout: Some(prost_types::Duration {
                        seconds: 300,
                        nanos: 0,
                    }),
                    policy: Some("authz".into()),
                    rate_limit: Some(pb::RateLimit {
                        requests_per_second: Some(100.0),
                        burst: Some(20),
                        per_client: Some(pb::ClientRateLimit {
                            requests_per_second: 2.5,
                            burst: None,
                            max_clients: Some(500),
                        }),
                    }),
                },
                pb::Route {
                    weighted_clusters: Some(pb::WeightedClusters::default()),
                    timeout: Some(prost_types::Duration::default()),
                    direct_response: Some(pb::DirectResponse {
                        status: 404,
                        body: None,
                    }),
                    ..pb::Route::default()
                },
            ],
        }],
    }
}

#[test]
fn protos_round_trip_through_the_spec() {
    let routes = full_route_configuration();
    let spec = RouteConfigSpec::try_from(routes.clone()).unwrap();
    assert_eq!(
        spec.virtual_hosts[0].routes[1].weighted_clusters,
        Some(Vec::new())
    );
    assert_eq!(
        spec.virtual_hosts[0].routes[0].timeout,
        Some(Duration::from_millis(1500))
    );
    assert_eq!(pb::RouteConfiguration::from(&spec), routes);

    let listener = pb::Listener {
        name: "web".into(),
        address: "127.0.0.1:8080".into(),
        protocol: Some("http".into()),
        route_config: Some("main".into()),
        cluster: Some("users".into()),
        sni_routes: vec![pb::SniRoute {
            server_names: vec!["*.example.com".into()],
            cluster: "users".into(),
        }],
        max_connections: Some(10),
        header_read_timeout: Some(prost_types::Duration {
            seconds: 5,
            nanos: 0,
        }),
        idle_timeout: Some(prost_types::Duration {
            seconds: 0,
            nanos: 1,
        }),
        max_request_headers_bytes: Some(32_768),
        max_request_headers: Some(50),
        max_concurrent_streams: Some(100),
        via: Some("weft".into()),
        xff_num_trusted_hops: Some(2),
        preserve_request_id: Some(true),
        tls: Some(pb::ListenerTls {
            certificates: vec![pb::TlsCertificate {
                cert_file: "/etc/weft/a.pem".into(),
                key_file: "/etc/weft/a.key".into(),
                server_names: vec!["a.example.com".into()],
            }],
            min_version: Some("1.3".into()),
            client_ca_file: Some("/etc/weft/ca.pem".into()),
            require_client_certificate: Some(false),
            allowed_identities: vec!["spiffe://example.org/ns/a/sa/b".into()],
            workload_identity: Some("spiffe://example.org/ns/a/sa/web".into()),
            mode: Some("permissive".into()),
        }),
        policy: Some("edge".into()),
        rate_limit: Some(pb::RateLimit {
            requests_per_second: None,
            burst: None,
            per_client: Some(pb::ClientRateLimit {
                requests_per_second: 10.0,
                burst: Some(5),
                max_clients: None,
            }),
        }),
        fault: Some(pb::TcpFault {
            delay: Some(pb::FaultDelay {
                duration: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                percent: None,
            }),
            reset_percent: Some(5.0),
            max_active: Some(3),
        }),
        tracing: Some(pb::Tracing {
            collector: "http://127.0.0.1:4317".into(),
            protocol: Some("grpc".into()),
            headers: [("x-token".to_owned(), "abc".to_owned())].into(),
            sample_percent: Some(1.0),
            always_sample_errors: Some(true),
            service_name: Some("gateway".into()),
            resource_attributes: [("deployment.environment".to_owned(), "prod".to_owned())].into(),
            max_queued_spans: Some(4096),
            max_export_batch: Some(256),
            flush_interval: Some(prost_types::Duration {
                seconds: 2,
                nanos: 0,
            }),
            export_timeout: Some(prost_types::Duration {
                seconds: 3,
                nanos: 0,
            }),
            ca_file: Some("/etc/weft/collector-ca.pem".into()),
        }),
        istio_metrics: Some(pb::IstioMetrics {
            reporter: "source".into(),
            workload: Some(pb::IstioWorkload {
                name: Some("web-v1".into()),
                namespace: Some("shop".into()),
                app: Some("web".into()),
                version: Some("v1".into()),
                service: Some("web.shop".into()),
            }),
            cluster_id: Some("east".into()),
            sources: [].into(),
            destinations: [(
                "users".to_owned(),
                pb::IstioWorkload {
                    name: Some("users".into()),
                    ..pb::IstioWorkload::default()
                },
            )]
            .into(),
            max_series: Some(50),
        }),
    };
    let spec = ListenerSpec::try_from(listener.clone()).unwrap();
    assert_eq!(pb::Listener::from(&spec), listener);

    let cluster = pb::Cluster {
        name: "users".into(),
        protocol: Some("http2".into()),
        lb: Some("least_request".into()),
        connect_timeout: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
        dns_refresh: Some(prost_types::Duration {
            seconds: 30,
            nanos: 0,
        }),
        pool: Some(pb::Pool {
            idle_timeout: Some(prost_types::Duration {
                seconds: 90,
                nanos: 0,
            }),
            max_idle_per_endpoint: Some(0),
        }),
        circuit_breakers: Some(pb::CircuitBreakers {
            max_requests: Some(10),
            max_retries: None,
            max_connections: Some(4),
            max_pending_requests: Some(0),
        }),
        outlier_detection: Some(pb::OutlierDetection {
            consecutive_5xx: Some(3),
            consecutive_gateway_errors: None,
            base_ejection_time: Some(prost_types::Duration {
                seconds: 10,
                nanos: 0,
            }),
            max_ejection_time: None,
            max_ejection_percent: Some(34),
            panic_threshold: Some(0),
            success_rate: Some(pb::SuccessRate {
                interval: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 500_000_000,
                }),
                minimum_hosts: Some(3),
                request_volume: None,
                stdev_factor: Some(1000),
            }),
        }),
        health_check: Some(pb::HealthCheck {
            http: Some(pb::HttpHealthCheck {
                path: "/healthz".into(),
                host: Some("users.local".into()),
                expected_statuses: vec!["200-299".into(), "404".into()],
            }),
            tcp: None,
            grpc: Some(pb::GrpcHealthCheck {
                service: Some("users".into()),
                authority: None,
            }),
            interval: Some(prost_types::Duration {
                seconds: 2,
                nanos: 0,
            }),
            interval_jitter: None,
            timeout: Some(prost_types::Duration {
                seconds: 0,
                nanos: 250_000_000,
            }),
            healthy_threshold: Some(1),
            unhealthy_threshold: None,
        }),
        endpoints: vec![
            pb::Endpoint {
                address: "127.0.0.1:1".into(),
                weight: Some(3),
            },
            pb::Endpoint {
                address: "users.svc:80".into(),
                weight: None,
            },
        ],
        tls: Some(pb::ClusterTls {
            ca_file: "/etc/weft/ca.pem".into(),
            cert_file: Some("/etc/weft/me.pem".into()),
            key_file: Some("/etc/weft/me.key".into()),
            server_identity: Some("spiffe://example.org/ns/a/sa/users".into()),
            server_name: None,
            workload_identity: Some("spiffe://example.org/ns/a/sa/web".into()),
        }),
    };
    let spec = ClusterSpec::try_from(cluster.clone()).unwrap();
    assert_eq!(pb::Cluster::from(&spec), cluster);
}

#[test]
fn empty_match_lists_mean_no_condition() {
    let spec = RouteMatchSpec {
        methods: Some(Vec::new()),
        headers: Some(Vec::new()),
        ..RouteMatchSpec::default()
    };
    let route = RouteSpec {
        name: None,
        matcher: Some(spec),
        cluster: Some("c".into()),
        weighted_clusters: None,
        direct_response: None,
        prefix_rewrite: None,
        host_rewrite: None,
        timeout: None,
        request_headers: None,
        response_headers: None,
        retry_policy: None,
        fault: None,
        rate_limit: None,
        stream_idle_timeout: None,
        policy: None,
    };
    let config = RouteConfigSpec {
        name: "main".into(),
        virtual_hosts: vec![VirtualHostSpec {
            name: "all".into(),
            domains: vec!["*".into()],
            routes: vec![route],
        }],
    };
    let back = RouteConfigSpec::try_from(pb::RouteConfiguration::from(&config)).unwrap();
    assert_eq!(
        back.virtual_hosts[0].routes[0].matcher,
        Some(RouteMatchSpec::default())
    );
}

#[test]
fn negative_duration_names_resource_and_field() {
    let listener = pb::Listener {
        name: "web".into(),
        header_read_timeout: Some(prost_types::Duration {
            seconds: -1,
            nanos: 0,
        }),
        ..pb::Listener::default()
    };
    let errors = ListenerSpec::try_from(listener).unwrap_err();
    assert_eq!(
        errors.to_string(),
        r#"listener "web": header_read_timeout: negative duration"#
    );
    assert_eq!(
        errors.0,
        vec![ConversionError {
            kind: "listener",
            resource: "web".into(),
            field: "header_read_timeout".into(),
            value: InvalidValue::NegativeDuration,
        }]
    );
}

#[test]
fn every_unrepresentable_field_is_reported() {
    let negative = Some(prost_types::Duration {
        seconds: 0,
        nanos: -5,
    });
    let mut routes = full_route_configuration();
    routes.virtual_hosts[0].routes[1].timeout = negative;
    routes.virtual_hosts[0].routes[1].direct_response = Some(pb::DirectResponse {
        status: 70_000,
        body: None,
    });
    let cluster = pb::Cluster {
        name: "users".into(),
        connect_timeout: Some(prost_types::Duration {
            seconds: 1,
            nanos: -1,
        }),
        dns_refresh: Some(prost_types::Duration {
            seconds: MAX_DURATION_SECONDS + 1,
            nanos: 0,
        }),
        pool: Some(pb::Pool {
            idle_timeout: Some(prost_types::Duration {
                seconds: 0,
                nanos: 1_000_000_000,
            }),
            max_idle_per_endpoint: None,
        }),
        ..pb::Cluster::default()
    };
    let listener = pb::Listener {
        name: "ok".into(),
        ..pb::Listener::default()
    };

    let errors = bootstrap_from_resources(vec![listener], vec![routes], vec![cluster], Vec::new())
        .unwrap_err()
        .to_string();
    assert_eq!(
        errors.lines().collect::<Vec<_>>(),
        [
            r#"route_config "main": virtual_hosts[0].routes[1].direct_response.status: status 70000 is out of range (at most 65535)"#,
            r#"route_config "main": virtual_hosts[0].routes[1].timeout: negative duration"#,
            r#"cluster "users": connect_timeout: invalid duration (1s, -1ns): nanos must be within ±999999999 and share the sign of seconds"#,
            r#"cluster "users": dns_refresh: duration of 315576000001s exceeds the protobuf limit of 315576000000s"#,
            r#"cluster "users": pool.idle_timeout: invalid duration (0s, 1000000000ns): nanos must be within ±999999999 and share the sign of seconds"#,
        ]
    );
}

#[test]
fn conversion_errors_read_like_validation_errors() {
    let listener = pb::Listener {
        name: "web".into(),
        idle_timeout: Some(prost_types::Duration {
            seconds: -3,
            nanos: -1,
        }),
        ..pb::Listener::default()
    };
    let errors =
        bootstrap_from_resources(vec![listener], Vec::new(), Vec::new(), Vec::new()).unwrap_err();
    let text = errors.to_string();
    let validation = ValidationErrors::from(errors);
    assert_eq!(validation.to_string(), text);
    assert_eq!(validation.0[0].kind, "listener");
    assert_eq!(validation.0[0].field, "idle_timeout");
}

#[test]
fn durations_convert_within_the_protobuf_range() {
    for duration in [
        Duration::ZERO,
        Duration::from_nanos(1),
        Duration::from_millis(1500),
        Duration::from_secs(3600),
        Duration::new(MAX_DURATION_SECONDS as u64, 999_999_999),
    ] {
        let proto = duration_to_proto(duration);
        assert_eq!(duration_from_proto(proto), Ok(duration), "{duration:?}");
    }
    // Longer than the protobuf allows: saturates at its limit.
    let limit = prost_types::Duration {
        seconds: MAX_DURATION_SECONDS,
        nanos: MAX_DURATION_NANOS,
    };
    assert_eq!(duration_to_proto(Duration::MAX), limit);
    assert_eq!(
        duration_to_proto(Duration::from_secs(MAX_DURATION_SECONDS as u64 + 1)),
        limit
    );
    assert_eq!(
        duration_from_proto(prost_types::Duration {
            seconds: -1,
            nanos: -999_999_999,
        }),
        Err(InvalidValue::NegativeDuration)
    );
}

#[test]
fn any_round_trips_with_its_type_url() {
    let listener = pb::Listener {
        name: "web".into(),
        address: "127.0.0.1:0".into(),
        ..pb::Listener::default()
    };
    let any = pack(&listener);
    assert_eq!(any.type_url, LISTENER_TYPE_URL);
    assert_eq!(unpack::<pb::Listener>(&wire(&any)).unwrap(), listener);

    // Only the type name after the last `/` identifies the type.
    let elsewhere = prost_types::Any {
        type_url: "example.com/weft.config.v1.Listener".into(),
        value: any.value,
    };
    assert_eq!(unpack::<pb::Listener>(&elsewhere).unwrap(), listener);

    assert_eq!(pack(&pb::Cluster::default()).type_url, CLUSTER_TYPE_URL);
    assert_eq!(
        pack(&pb::RouteConfiguration::default()).type_url,
        ROUTE_CONFIGURATION_TYPE_URL
    );
}

#[test]
fn unpacking_another_type_fails_naming_its_url() {
    let any = pack(&pb::Cluster {
        name: "users".into(),
        ..pb::Cluster::default()
    });
    let error = unpack::<pb::Listener>(&any).unwrap_err();
    assert!(
        matches!(
            &error,
            UnpackError::UnexpectedTypeUrl { expected, actual }
                if expected == LISTENER_TYPE_URL && actual == CLUSTER_TYPE_URL
        ),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        format!("unexpected type URL {CLUSTER_TYPE_URL:?} (expected {LISTENER_TYPE_URL:?})")
    );

    for type_url in [
        "weft.config.v1.Listener",
        "",
        "type.googleapis.com/Listener",
    ] {
        let any = prost_types::Any {
            type_url: type_url.into(),
            value: Vec::new(),
        };
        assert!(
            matches!(
                unpack::<pb::Listener>(&any),
                Err(UnpackError::UnexpectedTypeUrl { .. })
            ),
            "{type_url:?}"
        );
    }
}

#[test]
fn unpacking_garbage_fails_as_a_decode_error() {
    let any = prost_types::Any {
        type_url: LISTENER_TYPE_URL.into(),
        // Field 1 (name) announced as 16 bytes long, with none following.
        value: vec![0x0a, 0x10],
    };
    let error = unpack::<pb::Listener>(&any).unwrap_err();
    assert!(matches!(error, UnpackError::Decode { .. }), "{error:?}");
    assert_eq!(
        error.to_string(),
        format!("cannot decode {LISTENER_TYPE_URL}")
    );
}

#[test]
fn nack_carries_the_errors_in_a_discovery_request() {
    // What the xDS client will send when a response is rejected: the
    // previous version, the nonce, and the errors.
    let listener = pb::Listener {
        name: "web".into(),
        header_read_timeout: Some(prost_types::Duration {
            seconds: -1,
            nanos: 0,
        }),
        ..pb::Listener::default()
    };
    let errors =
        bootstrap_from_resources(vec![listener], Vec::new(), Vec::new(), Vec::new()).unwrap_err();
    let nack = DiscoveryRequest {
        version_info: "1".into(),
        node: None,
        resource_names: Vec::new(),
        type_url: LISTENER_TYPE_URL.into(),
        response_nonce: "b".into(),
        error_detail: Some(Status {
            code: 3,
            message: errors.to_string(),
            details: Vec::new(),
        }),
    };
    let received = wire(&nack);
    assert_eq!(
        received.error_detail.map(|status| status.message),
        Some(r#"listener "web": header_read_timeout: negative duration"#.to_owned())
    );
}

#[test]
fn a_policy_travels_with_its_modules_and_data_inline() {
    let spec = PolicySpec {
        name: "authz".into(),
        rego: Some("package a\nallow := true\n".into()),
        modules: Some(vec![RegoModuleSpec {
            name: "rules.rego".into(),
            rego: "package envoy.authz\nallow := true\n".into(),
        }]),
        data: Some(serde_json::json!({ "roles": { "admin": ["DELETE"] } })),
        mode: Some("audit".into()),
        failure_mode: Some("allow".into()),
        ..PolicySpec::default()
    };
    let back = PolicySpec::try_from(wire(&pb::Policy::from(&spec))).unwrap();
    // The inline text becomes a module named after the policy.
    assert_eq!(
        back.modules.as_deref().unwrap(),
        [
            RegoModuleSpec {
                name: "rules.rego".into(),
                rego: "package envoy.authz\nallow := true\n".into(),
            },
            RegoModuleSpec {
                name: "authz.rego".into(),
                rego: "package a\nallow := true\n".into(),
            },
        ]
    );
    assert_eq!(back.data, spec.data);
    assert_eq!(back.mode.as_deref(), Some("audit"));
    assert_eq!(back.failure_mode.as_deref(), Some("allow"));
    assert_eq!(back.query, None);
    assert!(crate::config::compile_policy(&back).is_ok());

    let bad = pb::Policy {
        name: "authz".into(),
        data_json: "{not json".into(),
        ..pb::Policy::default()
    };
    let errors = PolicySpec::try_from(bad).unwrap_err();
    assert_eq!(errors.0[0].field, "data_json");
    assert!(
        errors.0[0].to_string().contains("invalid JSON"),
        "{}",
        errors.0[0]
    );
}

use super::*;
use crate::config::proto::pack;

fn cluster(name: &str, lb: Option<&str>) -> pb::Cluster {
    pb::Cluster {
        name: name.into(),
        lb: lb.map(Into::into),
        endpoints: vec![pb::Endpoint {
            address: "127.0.0.1:1".into(),
            weight: None,
        }],
        ..pb::Cluster::default()
    }
}

fn routes(name: &str, cluster: &str) -> pb::RouteConfiguration {
    pb::RouteConfiguration {
        name: name.into(),
        virtual_hosts: vec![pb::VirtualHost {
            name: "all".into(),
            domains: vec!["*".into()],
            routes: vec![pb::Route {
                name: Some("all".into()),
                cluster: Some(cluster.into()),
                ..pb::Route::default()
            }],
        }],
    }
}

fn listener(name: &str, route_config: &str) -> pb::Listener {
    pb::Listener {
        name: name.into(),
        address: "127.0.0.1:0".into(),
        route_config: Some(route_config.into()),
        ..pb::Listener::default()
    }
}

fn response(type_url: &str, version: &str, resources: Vec<Any>) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: version.into(),
        resources,
        type_url: type_url.into(),
        nonce: format!("n-{version}"),
    }
}

fn state() -> XdsState {
    XdsState::new(BootstrapSpec::default(), "xds test".into())
}

fn node() -> Node {
    Node {
        id: "proxy-1".into(),
        ..Node::default()
    }
}

/// Feeds a response; applies whatever validates; returns what is sent.
fn feed(state: &mut XdsState, response: DiscoveryResponse, now: Instant) -> Vec<DiscoveryRequest> {
    match state.on_response(response, now) {
        Step::Apply(_) => state.applied(),
        Step::Send(requests) => requests,
    }
}

fn is_ack(request: &DiscoveryRequest, type_url: &str, version: &str) -> bool {
    request.type_url == type_url
        && request.version_info == version
        && request.response_nonce == format!("n-{version}")
        && request.error_detail.is_none()
}

#[test]
fn a_stream_subscribes_to_every_type_clusters_first() {
    let mut state = state();
    let requests = state.initial_requests(&node());
    let types: Vec<_> = requests.iter().map(|r| r.type_url.as_str()).collect();
    assert_eq!(types, TYPE_URLS);
    assert_eq!(requests[0].node.as_ref().unwrap().id, "proxy-1");
    assert!(requests[1].node.is_none() && requests[2].node.is_none());
    assert!(requests.iter().all(|r| r.version_info.is_empty()));
}

#[test]
fn a_pushed_trust_bundle_is_applied_and_a_broken_one_refused() {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let root = params.self_signed(&key).unwrap().pem();
    let bundle = |pem: &str, signer: &str| pb::TrustBundle {
        trust_domain: "example.org".into(),
        roots_pem: pem.into(),
        signer: signer.into(),
    };
    let mut state = state();
    let now = Instant::now();
    let signer = "ab".repeat(32);
    let Step::Apply(config) = state.on_response(
        response(
            pb::TRUST_BUNDLE_TYPE_URL,
            "b1",
            vec![pack(&bundle(&root, &signer))],
        ),
        now,
    ) else {
        panic!("a valid bundle applies");
    };
    assert_eq!(config.trust_bundles.len(), 1);
    assert_eq!(&*config.trust_bundles[0].trust_domain, "example.org");
    assert_eq!(
        config.trust_bundles[0].signer.as_deref(),
        Some(signer.as_str())
    );
    let sent = state.applied();
    assert!(
        is_ack(&sent[0], pb::TRUST_BUNDLE_TYPE_URL, "b1"),
        "{sent:?}"
    );
    assert!(
        !state.is_complete(),
        "bundles alone are not a configuration"
    );

    let sent = feed(
        &mut state,
        response(
            pb::TRUST_BUNDLE_TYPE_URL,
            "b2",
            vec![pack(&bundle("not a certificate", ""))],
        ),
        now,
    );
    let nack = sent[0].error_detail.as_ref().expect("a NACK");
    assert!(nack.message.contains("trust_bundle"), "{}", nack.message);
    assert_eq!(sent[0].version_info, "b1", "the last good bundle stays");
}

#[test]
fn responses_in_dependency_order_apply_one_by_one() {
    let mut state = state();
    let now = Instant::now();
    let sent = feed(
        &mut state,
        response(
            pb::CLUSTER_TYPE_URL,
            "c1",
            vec![pack(&cluster("app", None))],
        ),
        now,
    );
    assert!(is_ack(&sent[0], pb::CLUSTER_TYPE_URL, "c1"), "{sent:?}");
    assert!(!state.is_complete());
    let sent = feed(
        &mut state,
        response(
            pb::ROUTE_CONFIGURATION_TYPE_URL,
            "r1",
            vec![pack(&routes("main", "app"))],
        ),
        now,
    );
    assert!(is_ack(&sent[0], pb::ROUTE_CONFIGURATION_TYPE_URL, "r1"));
    let sent = feed(
        &mut state,
        response(
            pb::LISTENER_TYPE_URL,
            "l1",
            vec![pack(&listener("web", "main"))],
        ),
        now,
    );
    assert!(is_ack(&sent[0], pb::LISTENER_TYPE_URL, "l1"));
    assert!(state.is_complete());

    // A reconnect names the versions applied, and forgets nothing else.
    let again = state.initial_requests(&node());
    let versions: Vec<_> = again.iter().map(|r| r.version_info.as_str()).collect();
    assert_eq!(versions, ["", "", "c1", "r1", "l1"]);
}

#[test]
fn a_reference_to_a_resource_on_its_way_waits_then_both_are_acked() {
    let mut state = state();
    let now = Instant::now();
    // Routes first, naming a cluster not yet received: wait.
    let sent = feed(
        &mut state,
        response(
            pb::ROUTE_CONFIGURATION_TYPE_URL,
            "r1",
            vec![pack(&routes("main", "app"))],
        ),
        now,
    );
    assert!(sent.is_empty(), "{sent:?}");
    assert_eq!(state.warming_deadline(), Some(now + WARMING_TIMEOUT));
    // The cluster arrives: both apply together, each ACKed with its nonce.
    let sent = feed(
        &mut state,
        response(
            pb::CLUSTER_TYPE_URL,
            "c1",
            vec![pack(&cluster("app", None))],
        ),
        now,
    );
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert!(is_ack(&sent[0], pb::CLUSTER_TYPE_URL, "c1"));
    assert!(is_ack(&sent[1], pb::ROUTE_CONFIGURATION_TYPE_URL, "r1"));
    assert_eq!(state.warming_deadline(), None);
}

#[test]
fn an_invalid_resource_is_nacked_naming_it_and_the_last_good_version_is_kept() {
    let mut state = state();
    let now = Instant::now();
    feed(
        &mut state,
        response(
            pb::CLUSTER_TYPE_URL,
            "c1",
            vec![pack(&cluster("app", None))],
        ),
        now,
    );
    let sent = feed(
        &mut state,
        response(
            pb::CLUSTER_TYPE_URL,
            "c2",
            vec![pack(&cluster("app", Some("fastest")))],
        ),
        now,
    );
    assert_eq!(sent.len(), 1);
    let nack = &sent[0];
    assert_eq!(
        nack.version_info, "c1",
        "a NACK names the version still in use"
    );
    assert_eq!(nack.response_nonce, "n-c2");
    let detail = nack.error_detail.as_ref().unwrap();
    assert_eq!(detail.code, INVALID_ARGUMENT);
    assert!(
        detail.message.contains("cluster \"app\": lb") && detail.message.contains("fastest"),
        "{}",
        detail.message
    );
    let status = state.status();
    assert_eq!(status[pb::CLUSTER_TYPE_URL]["version"], "c1");
    assert_eq!(status[pb::CLUSTER_TYPE_URL]["last_nack"]["version"], "c2");
}

#[test]
fn a_resource_of_the_wrong_type_is_nacked() {
    let mut state = state();
    let sent = feed(
        &mut state,
        response(
            pb::CLUSTER_TYPE_URL,
            "c1",
            vec![pack(&listener("web", "main"))],
        ),
        Instant::now(),
    );
    assert_eq!(sent.len(), 1);
    let message = &sent[0].error_detail.as_ref().unwrap().message;
    assert!(message.contains("weft.config.v1.Listener"), "{message}");
}

#[test]
fn references_that_never_resolve_are_nacked_when_the_wait_ends() {
    let mut state = state();
    let now = Instant::now();
    let sent = feed(
        &mut state,
        response(
            pb::LISTENER_TYPE_URL,
            "l1",
            vec![pack(&listener("web", "missing"))],
        ),
        now,
    );
    assert!(sent.is_empty());
    let sent = state.warming_expired();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].response_nonce, "n-l1");
    assert!(
        sent[0]
            .error_detail
            .as_ref()
            .unwrap()
            .message
            .contains("unknown route_config \"missing\"")
    );
    assert_eq!(state.warming_deadline(), None);
    assert!(!state.is_complete());
}

#[test]
fn a_failed_apply_nacks_every_pending_response() {
    let mut state = state();
    let Step::Apply(_) = state.on_response(
        response(
            pb::CLUSTER_TYPE_URL,
            "c1",
            vec![pack(&cluster("app", None))],
        ),
        Instant::now(),
    ) else {
        panic!("a valid cluster applies")
    };
    let sent = state.rejected("listener \"web\": cannot bind 127.0.0.1:1");
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].version_info, "");
    assert!(sent[0].error_detail.is_some());
}

fn policy(name: &str, rego: &str) -> pb::Policy {
    pb::Policy {
        name: name.into(),
        modules: vec![pb::RegoModule {
            name: format!("{name}.rego"),
            text: rego.into(),
        }],
        ..pb::Policy::default()
    }
}

#[test]
fn a_route_naming_a_policy_waits_for_it_and_a_broken_policy_is_nacked_with_its_line() {
    let mut state = state();
    let now = Instant::now();
    feed(
        &mut state,
        response(
            pb::CLUSTER_TYPE_URL,
            "c1",
            vec![pack(&cluster("app", None))],
        ),
        now,
    );
    let mut guarded = routes("main", "app");
    guarded.virtual_hosts[0].routes[0].policy = Some("authz".into());
    feed(
        &mut state,
        response(pb::ROUTE_CONFIGURATION_TYPE_URL, "r1", vec![pack(&guarded)]),
        now,
    );
    let sent = feed(
        &mut state,
        response(
            pb::LISTENER_TYPE_URL,
            "l1",
            vec![pack(&listener("web", "main"))],
        ),
        now,
    );
    // The policy the route names is on its way: nothing applies yet.
    assert!(sent.is_empty(), "{sent:?}");
    assert!(state.warming_deadline().is_some());
    let sent = feed(
        &mut state,
        response(
            pb::POLICY_TYPE_URL,
            "p1",
            vec![pack(&policy(
                "authz",
                "package envoy.authz\ndefault allow := true\n",
            ))],
        ),
        now,
    );
    assert_eq!(sent.len(), 3, "{sent:?}");
    assert!(sent.iter().any(|r| is_ack(r, pb::POLICY_TYPE_URL, "p1")));
    assert!(state.is_complete());

    // A new version that does not compile: NACKed with the module's name
    // and line; the applied version stays.
    let sent = feed(
        &mut state,
        response(
            pb::POLICY_TYPE_URL,
            "p2",
            vec![pack(&policy("authz", "package envoy.authz\nallow if {\n"))],
        ),
        now,
    );
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].type_url, pb::POLICY_TYPE_URL);
    assert_eq!(sent[0].version_info, "p1");
    let message = &sent[0].error_detail.as_ref().unwrap().message;
    assert!(message.contains("authz.rego:3"), "{message}");
}

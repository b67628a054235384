//! Weft's protobuf definitions: prost messages and tonic clients and servers
//! generated at build time from the `.proto` files under `proto/proto/`.
//!
//! Each proto package becomes a module path mirroring it (`weft.echo.v1` is
//! [`echo::v1`], `envoy.service.discovery.v3` is
//! [`envoy::service::discovery::v3`]); Weft's own packages drop the `weft`
//! prefix. This crate owns only generated code: services are implemented by
//! the crates that serve them. The clients are generic over any tonic
//! `GrpcService` (no transport is bundled), so callers pick their own channel.
//!
//! Every message implements [`prost::Name`], so [`prost::Name::type_url`]
//! gives the type URL that packs it in a [`prost_types::Any`]
//! (`type.googleapis.com/<package>.<Message>`). Map fields are `BTreeMap`s:
//! a message always encodes to the same bytes. The well-known types
//! (`google.protobuf.Any`, `Duration`, `Struct`) are [`prost_types`]'.

/// The prost runtime the generated code is built on, re-exported so that
/// users encode, decode and name messages with the same version.
pub use prost;
/// The well-known types (`google.protobuf.*`) the generated code refers to.
pub use prost_types;

/// The echo service (`weft.echo.v1`) served by `weft-bench echo`.
pub mod echo {
    /// Version 1 of the echo API.
    pub mod v1 {
        #![allow(missing_docs, unreachable_pub, missing_debug_implementations)]
        #![allow(clippy::all, clippy::pedantic)]
        tonic::include_proto!("weft.echo.v1");
    }
}

/// The gRPC health checking protocol (`grpc.health.v1`), which the proxy's
/// active health checks ask and the echo server answers.
pub mod grpc {
    /// `grpc.health`.
    pub mod health {
        /// Version 1: `Health/Check`.
        pub mod v1 {
            #![allow(missing_docs, unreachable_pub, missing_debug_implementations)]
            #![allow(clippy::all, clippy::pedantic)]
            tonic::include_proto!("grpc.health.v1");
        }
    }
}

/// Weft's configuration resources (`weft.config.v1`), as the control plane
/// serves them over xDS: they mirror the YAML configuration field by field.
pub mod config {
    /// Version 1 of the configuration resources.
    pub mod v1 {
        #![allow(missing_docs, unreachable_pub, missing_debug_implementations)]
        #![allow(clippy::all, clippy::pedantic)]
        tonic::include_proto!("weft.config.v1");

        /// The type URL of a [`Listener`] packed in a `google.protobuf.Any`
        /// and of its discovery requests and responses.
        pub const LISTENER_TYPE_URL: &str = "type.googleapis.com/weft.config.v1.Listener";
        /// The type URL of a [`RouteConfiguration`].
        pub const ROUTE_CONFIGURATION_TYPE_URL: &str =
            "type.googleapis.com/weft.config.v1.RouteConfiguration";
        /// The type URL of a [`Cluster`].
        pub const CLUSTER_TYPE_URL: &str = "type.googleapis.com/weft.config.v1.Cluster";
        /// The type URL of a [`TrustBundle`].
        pub const TRUST_BUNDLE_TYPE_URL: &str = "type.googleapis.com/weft.config.v1.TrustBundle";
        /// The type URL of a [`Policy`].
        pub const POLICY_TYPE_URL: &str = "type.googleapis.com/weft.config.v1.Policy";
    }
}

/// The control plane's identity service (`weft.identity.v1`): workload
/// certificates signed from CSRs.
pub mod identity {
    /// Version 1 of the identity API.
    pub mod v1 {
        #![allow(missing_docs, unreachable_pub, missing_debug_implementations)]
        #![allow(clippy::all, clippy::pedantic)]
        tonic::include_proto!("weft.identity.v1");
    }
}

/// The subset of Envoy's API (`envoy.*`) that Weft's xDS transport speaks,
/// with Envoy's package, message names and field numbers.
pub mod envoy {
    /// Envoy's `envoy.config.*` packages.
    pub mod config {
        /// Envoy's `envoy.config.core.*` packages.
        pub mod core {
            /// `envoy.config.core.v3`: the [`v3::Node`] a client identifies
            /// itself with.
            pub mod v3 {
                #![allow(missing_docs, unreachable_pub, missing_debug_implementations)]
                #![allow(clippy::all, clippy::pedantic)]
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }

    /// Envoy's `envoy.service.*` packages.
    pub mod service {
        /// Envoy's `envoy.service.discovery.*` packages.
        pub mod discovery {
            /// `envoy.service.discovery.v3`: the discovery messages and the
            /// aggregated discovery service (client in
            /// `aggregated_discovery_service_client`, server in
            /// `aggregated_discovery_service_server`).
            pub mod v3 {
                #![allow(missing_docs, unreachable_pub, missing_debug_implementations)]
                #![allow(clippy::all, clippy::pedantic)]
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
    }
}

/// Google's API packages (`google.*`) other than the well-known types.
pub mod google {
    /// `google.rpc`: the gRPC error model, carried by a discovery request's
    /// `error_detail`.
    pub mod rpc {
        #![allow(missing_docs, unreachable_pub, missing_debug_implementations)]
        #![allow(clippy::all, clippy::pedantic)]
        tonic::include_proto!("google.rpc");
    }
}

#[cfg(test)]
mod tests {
    use prost::{Message, Name};

    use super::config::v1;
    use super::envoy::config::core::v3::Node;
    use super::envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        Resource,
    };
    use super::google::rpc::Status;

    #[test]
    fn type_url_constants_match_generated_names() {
        assert_eq!(v1::Listener::type_url(), v1::LISTENER_TYPE_URL);
        assert_eq!(
            v1::RouteConfiguration::type_url(),
            v1::ROUTE_CONFIGURATION_TYPE_URL
        );
        assert_eq!(v1::Cluster::type_url(), v1::CLUSTER_TYPE_URL);
        assert_eq!(v1::TrustBundle::type_url(), v1::TRUST_BUNDLE_TYPE_URL);
        assert_eq!(v1::Policy::type_url(), v1::POLICY_TYPE_URL);
        assert_eq!(
            DiscoveryRequest::full_name(),
            "envoy.service.discovery.v3.DiscoveryRequest"
        );
        assert_eq!(Node::full_name(), "envoy.config.core.v3.Node");
        assert_eq!(Status::full_name(), "google.rpc.Status");
    }

    /// Pins the numbers shared with Envoy's API: a change here breaks
    /// interoperability with every other xDS client and server. Each case
    /// sets one field, so the encoding starts with that field's key; every
    /// number is below 16, so the key is one byte (number << 3 | wire type).
    #[test]
    fn envoy_field_numbers_are_envoys() {
        let text = || "x".to_owned();
        let node = || Some(Node::default());
        let status = || Some(Status::default());
        let any = prost_types::Any::default;

        let cases: Vec<(&str, u8, Vec<u8>)> = vec![
            (
                "Node.id",
                1,
                Node {
                    id: text(),
                    ..Node::default()
                }
                .encode_to_vec(),
            ),
            (
                "Node.cluster",
                2,
                Node {
                    cluster: text(),
                    ..Node::default()
                }
                .encode_to_vec(),
            ),
            (
                "Node.metadata",
                3,
                Node {
                    metadata: Some(prost_types::Struct::default()),
                    ..Node::default()
                }
                .encode_to_vec(),
            ),
            (
                "Node.user_agent_name",
                6,
                Node {
                    user_agent_name: text(),
                    ..Node::default()
                }
                .encode_to_vec(),
            ),
            (
                "DiscoveryRequest.version_info",
                1,
                DiscoveryRequest {
                    version_info: text(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "DiscoveryRequest.node",
                2,
                DiscoveryRequest {
                    node: node(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "DiscoveryRequest.resource_names",
                3,
                DiscoveryRequest {
                    resource_names: vec![text()],
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "DiscoveryRequest.type_url",
                4,
                DiscoveryRequest {
                    type_url: text(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "DiscoveryRequest.response_nonce",
                5,
                DiscoveryRequest {
                    response_nonce: text(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "DiscoveryRequest.error_detail",
                6,
                DiscoveryRequest {
                    error_detail: status(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "DiscoveryResponse.version_info",
                1,
                DiscoveryResponse {
                    version_info: text(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "DiscoveryResponse.resources",
                2,
                DiscoveryResponse {
                    resources: vec![any()],
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "DiscoveryResponse.type_url",
                4,
                DiscoveryResponse {
                    type_url: text(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "DiscoveryResponse.nonce",
                5,
                DiscoveryResponse {
                    nonce: text(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "DeltaDiscoveryRequest.node",
                1,
                DeltaDiscoveryRequest {
                    node: node(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "DeltaDiscoveryRequest.type_url",
                2,
                DeltaDiscoveryRequest {
                    type_url: text(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "DeltaDiscoveryRequest.resource_names_subscribe",
                3,
                DeltaDiscoveryRequest {
                    resource_names_subscribe: vec![text()],
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "DeltaDiscoveryRequest.resource_names_unsubscribe",
                4,
                DeltaDiscoveryRequest {
                    resource_names_unsubscribe: vec![text()],
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "DeltaDiscoveryRequest.initial_resource_versions",
                5,
                DeltaDiscoveryRequest {
                    initial_resource_versions: [(text(), text())].into(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "DeltaDiscoveryRequest.response_nonce",
                6,
                DeltaDiscoveryRequest {
                    response_nonce: text(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "DeltaDiscoveryRequest.error_detail",
                7,
                DeltaDiscoveryRequest {
                    error_detail: status(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "DeltaDiscoveryResponse.system_version_info",
                1,
                DeltaDiscoveryResponse {
                    system_version_info: text(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "DeltaDiscoveryResponse.resources",
                2,
                DeltaDiscoveryResponse {
                    resources: vec![Resource::default()],
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "DeltaDiscoveryResponse.type_url",
                4,
                DeltaDiscoveryResponse {
                    type_url: text(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "DeltaDiscoveryResponse.nonce",
                5,
                DeltaDiscoveryResponse {
                    nonce: text(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "DeltaDiscoveryResponse.removed_resources",
                6,
                DeltaDiscoveryResponse {
                    removed_resources: vec![text()],
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "Resource.version",
                1,
                Resource {
                    version: text(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "Resource.resource",
                2,
                Resource {
                    resource: Some(any()),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "Resource.name",
                3,
                Resource {
                    name: text(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "Status.code",
                1,
                Status {
                    code: 3,
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "Status.message",
                2,
                Status {
                    message: text(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "Status.details",
                3,
                Status {
                    details: vec![any()],
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
        ];
        for (field, number, bytes) in cases {
            assert!(!bytes.is_empty(), "{field} encodes");
            assert_eq!(bytes[0] >> 3, number, "{field}");
        }
    }
}

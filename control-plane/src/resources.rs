//! The resources one proxy (an xDS node) should have, grouped by type URL,
//! each versioned by its content.
//!
//! Versions are content hashes: the same resources always get the same
//! version, so a rebuild that changes nothing for a node pushes nothing to
//! it, and a proxy that reconnects with the version it already runs is not
//! sent it again. A resource's version hashes its encoded bytes (prost
//! encodes deterministically: maps are `BTreeMap`s); a type's version hashes
//! its resources' names and versions in name order.

use std::collections::BTreeMap;
use std::sync::Arc;

use weft_proto::config::v1 as pb;
use weft_proto::prost::Name;
use weft_proto::prost_types::Any;
use weft_proxy::config::proto::pack;

/// The type URLs the control plane serves, in the order a push sends them:
/// the trust bundle before the clusters and listeners that verify peers
/// with it, policies before the routes and listeners that name them, a
/// cluster before the route that uses it, a route configuration before the
/// listener that names it.
pub const TYPE_URLS: [&str; 5] = [
    pb::TRUST_BUNDLE_TYPE_URL,
    pb::POLICY_TYPE_URL,
    pb::CLUSTER_TYPE_URL,
    pb::ROUTE_CONFIGURATION_TYPE_URL,
    pb::LISTENER_TYPE_URL,
];

/// One named resource with its own version (the delta protocol compares
/// these one by one).
#[derive(Debug, Clone, PartialEq)]
pub struct VersionedResource {
    /// Hash of the encoded resource.
    pub version: String,
    /// The resource, packed under its type URL.
    pub resource: Any,
}

/// Every resource of one type for one node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TypeResources {
    /// Hash of every resource's name and version; the state-of-the-world
    /// `version_info`.
    pub version: String,
    /// The resources by name.
    pub resources: BTreeMap<String, VersionedResource>,
}

impl TypeResources {
    fn new(resources: BTreeMap<String, VersionedResource>) -> Self {
        let mut hasher = sha1_smol::Sha1::new();
        for (name, resource) in &resources {
            hasher.update(name.as_bytes());
            hasher.update(&[0]);
            hasher.update(resource.version.as_bytes());
            hasher.update(&[0]);
        }
        Self {
            version: short_hash(&hasher),
            resources,
        }
    }
}

/// The resources one node should have, by type URL. Every type in
/// [`TYPE_URLS`] is present, possibly with no resources.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeResources {
    /// By type URL. Shared, so that adding the trust bundle to a node's
    /// resources copies no other type.
    pub types: BTreeMap<&'static str, Arc<TypeResources>>,
}

impl Default for NodeResources {
    fn default() -> Self {
        Self::new(Vec::new(), Vec::new(), Vec::new())
    }
}

impl NodeResources {
    /// Packs and versions a node's resources.
    pub fn new(
        listeners: Vec<pb::Listener>,
        route_configurations: Vec<pb::RouteConfiguration>,
        clusters: Vec<pb::Cluster>,
    ) -> Self {
        let mut types = BTreeMap::new();
        types.insert(
            pb::LISTENER_TYPE_URL,
            Arc::new(versioned(listeners, |l: &pb::Listener| l.name.clone())),
        );
        types.insert(
            pb::ROUTE_CONFIGURATION_TYPE_URL,
            Arc::new(versioned(
                route_configurations,
                |r: &pb::RouteConfiguration| r.name.clone(),
            )),
        );
        types.insert(
            pb::CLUSTER_TYPE_URL,
            Arc::new(versioned(clusters, |c: &pb::Cluster| c.name.clone())),
        );
        types.insert(
            pb::TRUST_BUNDLE_TYPE_URL,
            Arc::new(TypeResources::new(BTreeMap::new())),
        );
        types.insert(
            pb::POLICY_TYPE_URL,
            Arc::new(TypeResources::new(BTreeMap::new())),
        );
        Self { types }
    }

    /// The same resources with `policies` as the node's policies.
    #[must_use]
    pub fn with_policies(mut self, policies: Vec<pb::Policy>) -> Self {
        self.types.insert(
            pb::POLICY_TYPE_URL,
            Arc::new(versioned(policies, |p: &pb::Policy| p.name.clone())),
        );
        self
    }

    /// The same resources with `bundle` as the node's trust bundles (none:
    /// no bundle).
    pub fn with_trust_bundle(&self, bundle: Option<&pb::TrustBundle>) -> Self {
        let mut types = self.types.clone();
        types.insert(
            pb::TRUST_BUNDLE_TYPE_URL,
            Arc::new(versioned(bundle.into_iter().cloned().collect(), |b| {
                b.trust_domain.clone()
            })),
        );
        Self { types }
    }

    /// The resources of one type; `None` for a type this node is not served.
    pub fn get(&self, type_url: &str) -> Option<&TypeResources> {
        self.types.get(type_url).map(|t| &**t)
    }

    /// How many listeners the node has.
    pub fn listener_count(&self) -> usize {
        self.get(pb::LISTENER_TYPE_URL)
            .map_or(0, |listeners| listeners.resources.len())
    }
}

fn versioned<M: Name>(items: Vec<M>, name: impl Fn(&M) -> String) -> TypeResources {
    let resources = items
        .into_iter()
        .map(|item| {
            let resource = pack(&item);
            let mut hasher = sha1_smol::Sha1::new();
            hasher.update(&resource.value);
            (
                name(&item),
                VersionedResource {
                    version: short_hash(&hasher),
                    resource,
                },
            )
        })
        .collect();
    TypeResources::new(resources)
}

/// The first 8 bytes of a SHA-1, in hex: collisions among one node's
/// versions are not a practical concern, and short versions keep logs and
/// status output readable.
fn short_hash(hasher: &sha1_smol::Sha1) -> String {
    hasher.digest().to_string()[..16].to_owned()
}

/// Every node's resources for one state of the mesh.
#[derive(Debug, Clone, Default)]
pub struct MeshSnapshot {
    /// By node id.
    pub nodes: BTreeMap<String, NodeEntry>,
    /// The mesh's SPIFFE trust domain, if it has identities.
    pub trust_domain: Option<String>,
}

/// What the mesh says about one node.
#[derive(Debug, Clone)]
pub struct NodeEntry {
    /// The service the node belongs to (a gateway has none). A proxy that
    /// names another service in its xDS `Node.cluster` is refused.
    pub service: Option<String>,
    /// The SPIFFE ID its proxy may hold (the identity service signs
    /// certificates for it and nothing else); `None` when the mesh has no
    /// trust domain.
    pub identity: Option<String>,
    /// Its resources.
    pub resources: Arc<NodeResources>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(name: &str, address: &str) -> pb::Cluster {
        pb::Cluster {
            name: name.into(),
            endpoints: vec![pb::Endpoint {
                address: address.into(),
                weight: None,
            }],
            ..pb::Cluster::default()
        }
    }

    #[test]
    fn versions_follow_content_only() {
        let a = NodeResources::new(vec![], vec![], vec![cluster("a", "127.0.0.1:1")]);
        let same = NodeResources::new(vec![], vec![], vec![cluster("a", "127.0.0.1:1")]);
        let changed = NodeResources::new(vec![], vec![], vec![cluster("a", "127.0.0.1:2")]);
        let clusters = |n: &NodeResources| n.get(pb::CLUSTER_TYPE_URL).unwrap().clone();
        let bundle = pb::TrustBundle {
            trust_domain: "example.org".into(),
            roots_pem: "roots".into(),
            signer: String::new(),
        };
        let with = a.with_trust_bundle(Some(&bundle));
        assert_ne!(
            with.get(pb::TRUST_BUNDLE_TYPE_URL).unwrap().version,
            a.get(pb::TRUST_BUNDLE_TYPE_URL).unwrap().version
        );
        assert_eq!(clusters(&with), clusters(&a));
        assert_eq!(a.with_trust_bundle(None), a);
        assert_eq!(clusters(&a), clusters(&same));
        assert_ne!(clusters(&a).version, clusters(&changed).version);
        assert_ne!(
            clusters(&a).resources["a"].version,
            clusters(&changed).resources["a"].version
        );
        // Types that did not change keep their version.
        assert_eq!(
            a.get(pb::LISTENER_TYPE_URL).unwrap().version,
            changed.get(pb::LISTENER_TYPE_URL).unwrap().version
        );
        assert_eq!(a.types.len(), TYPE_URLS.len());
    }
}

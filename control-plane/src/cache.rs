//! The per-node snapshot cache every xDS stream reads from.
//!
//! The mesh builder hands whole [`MeshSnapshot`]s to [`SnapshotCache::set`];
//! the cache keeps the latest one and one `tokio::sync::watch` channel per
//! connected node id. A `set` wakes only the streams whose node's resources
//! changed (compared by their content-hash versions), so a mesh change that
//! touches one service does not wake a thousand idle streams.
//!
//! Invariants callers rely on:
//! - Resources are shared: every stream of a node holds the same
//!   `Arc<NodeResources>` as the snapshot, never a copy.
//! - A node id the mesh does not know is served an empty [`NodeResources`]
//!   and stays subscribed: when a later snapshot adds it, its streams wake.
//!   (The xDS server refuses such nodes at admission; a watched node only
//!   becomes unknown when a snapshot removing it is set on purpose.)
//! - A rejected mesh change ([`SnapshotCache::set_config_error`]) changes no
//!   resources: the last good snapshot keeps being served.
//! - [`SnapshotCache::set_checked`] refuses, atomically with the check, a
//!   snapshot that is empty or that would take every listener from a node
//!   with a connected stream: the tear-down an unmounted volume or a bad
//!   deploy would otherwise cause within a second.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;
use tracing::info;

use crate::resources::{MeshSnapshot, NodeResources};

/// The latest mesh snapshot, shared by every xDS stream; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct SnapshotCache {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    state: Mutex<State>,
    /// Served to nodes the mesh does not know; one allocation for all.
    empty: Arc<NodeResources>,
}

/// What a node's watchers see: whether the mesh has the node, its service
/// and its resources.
#[derive(Debug, Clone)]
struct Served {
    is_known: bool,
    service: Option<String>,
    resources: Arc<NodeResources>,
}

#[derive(Debug, Default)]
struct State {
    snapshot: MeshSnapshot,
    generation: u64,
    config_error: Option<String>,
    /// Served to every node with an identity, beside its own resources.
    trust_bundle: Option<weft_proto::config::v1::TrustBundle>,
    /// Why the latest change of the CA or trust bundle files was refused.
    trust_error: Option<String>,
    /// One channel per node id with at least one stream; pruned when its
    /// last receiver is gone.
    watchers: HashMap<String, watch::Sender<Served>>,
}

/// What one stream sees of its node: the node's current resources, and a
/// wake-up when they change.
#[derive(Debug)]
pub struct NodeWatch {
    receiver: watch::Receiver<Served>,
    is_known: bool,
}

impl NodeWatch {
    /// The node's resources now; marks them seen, so that [`Self::changed`]
    /// waits for the next change.
    pub fn current(&mut self) -> Arc<NodeResources> {
        Arc::clone(&self.receiver.borrow_and_update().resources)
    }

    /// Waits until the node's resources change. Errors only when the cache
    /// is gone.
    ///
    /// Cancel safety: cancel safe (a change is not lost by dropping it).
    pub async fn changed(&mut self) -> Result<(), CacheClosed> {
        self.receiver.changed().await.map_err(|_| CacheClosed)
    }

    /// The service the mesh says the node belongs to now (it can change
    /// with the mesh, which wakes [`Self::changed`]).
    pub fn service(&self) -> Option<String> {
        self.receiver.borrow().service.clone()
    }

    /// Whether the mesh knew the node when the watch began.
    pub fn is_known(&self) -> bool {
        self.is_known
    }

    /// Whether the mesh has the node now (it can change with the mesh,
    /// which wakes [`Self::changed`]).
    pub fn is_known_now(&self) -> bool {
        self.receiver.borrow().is_known
    }
}

/// The cache was dropped while a stream was watching it.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the snapshot cache is gone")]
pub struct CacheClosed;

/// Why [`SnapshotCache::set_checked`] refused a snapshot. Nothing was
/// changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotRefused {
    /// The snapshot has no node at all.
    #[error("the mesh is empty (no services and no gateways)")]
    EmptyMesh,
    /// Nodes with a connected proxy would lose every listener they have.
    #[error(
        "the change removes every listener of connected proxies: node {}",
        nodes.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", node ")
    )]
    RemovesEveryListener {
        /// The node ids, sorted.
        nodes: Vec<String>,
    },
}

impl SnapshotCache {
    /// An empty cache: generation 0, no nodes.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state stays consistent if a holder panicked: every update is
        // a few assignments with no early return between them.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces every node's resources with `snapshot`'s, bumps the mesh
    /// generation, clears the last config error, and wakes the streams of
    /// the nodes whose resources changed.
    pub fn set(&self, snapshot: MeshSnapshot) {
        let mut state = self.state();
        self.apply(&mut state, snapshot);
    }

    fn apply(&self, state: &mut State, mut snapshot: MeshSnapshot) {
        state.generation += 1;
        state.config_error = None;
        with_trust_bundle(&mut snapshot, state.trust_bundle.as_ref());
        let woken = self.publish(state, &snapshot);
        state.snapshot = snapshot;
        info!(
            generation = state.generation,
            nodes = state.snapshot.nodes.len(),
            streams_woken = woken,
            "mesh snapshot applied"
        );
    }

    /// Serves `bundle` to every node with an identity from now on, and
    /// wakes their streams if it changed.
    pub fn set_trust_bundle(&self, bundle: weft_proto::config::v1::TrustBundle) {
        let mut state = self.state();
        state.trust_error = None;
        if state.trust_bundle.as_ref() == Some(&bundle) {
            return;
        }
        state.trust_bundle = Some(bundle);
        let mut snapshot = state.snapshot.clone();
        with_trust_bundle(&mut snapshot, state.trust_bundle.as_ref());
        let woken = self.publish(&mut state, &snapshot);
        state.snapshot = snapshot;
        info!(streams_woken = woken, "trust bundle applied");
    }

    /// Records that the latest change of the CA or bundle files was
    /// refused (`Some(error)`), or clears that record.
    pub fn set_trust_error(&self, error: Option<String>) {
        self.state().trust_error = error;
    }

    /// Why the latest change of the CA or bundle files was refused.
    pub fn trust_error(&self) -> Option<String> {
        self.state().trust_error.clone()
    }

    /// Hands every watched node its resources in `snapshot`; returns how
    /// many streams' resources changed.
    fn publish(&self, state: &mut State, snapshot: &MeshSnapshot) -> usize {
        state
            .watchers
            .retain(|_, sender| sender.receiver_count() > 0);
        let mut woken = 0_usize;
        for (node_id, sender) in &state.watchers {
            let next = self.served(snapshot.nodes.get(node_id));
            let changed = sender.send_if_modified(|current| {
                let changed = current.is_known != next.is_known
                    || current.service != next.service
                    || !same_versions(&current.resources, &next.resources);
                // Swapped even when unchanged, so that the old snapshot's
                // resources are freed.
                *current = next;
                changed
            });
            woken += usize::from(changed);
        }
        woken
    }

    /// Like [`Self::set`], unless the snapshot is empty or would remove
    /// every listener of a node that has a connected stream now: then
    /// nothing changes and the reason is returned. The check and the swap
    /// happen under one lock, so no stream can connect in between.
    pub fn set_checked(&self, snapshot: MeshSnapshot) -> Result<(), SnapshotRefused> {
        if snapshot.nodes.is_empty() {
            return Err(SnapshotRefused::EmptyMesh);
        }
        let mut state = self.state();
        let mut nodes: Vec<String> = state
            .watchers
            .iter()
            .filter(|(node_id, sender)| {
                sender.receiver_count() > 0
                    && sender.borrow().resources.listener_count() > 0
                    && snapshot
                        .nodes
                        .get(*node_id)
                        .is_none_or(|entry| entry.resources.listener_count() == 0)
            })
            .map(|(node_id, _)| node_id.clone())
            .collect();
        if !nodes.is_empty() {
            nodes.sort_unstable();
            return Err(SnapshotRefused::RemovesEveryListener { nodes });
        }
        self.apply(&mut state, snapshot);
        Ok(())
    }

    /// Records that the latest mesh change was rejected (`Some(error)`), or
    /// clears that record. The served snapshot does not change.
    pub fn set_config_error(&self, error: Option<String>) {
        self.state().config_error = error;
    }

    /// The last rejected mesh change's error, if the latest change was
    /// rejected.
    pub fn config_error(&self) -> Option<String> {
        self.state().config_error.clone()
    }

    /// The identity the mesh gives `node_id`: `None` for a node the mesh
    /// does not know, `Some(None)` for one without an identity.
    pub fn identity(&self, node_id: &str) -> Option<Option<String>> {
        self.state()
            .snapshot
            .nodes
            .get(node_id)
            .map(|entry| entry.identity.clone())
    }

    /// How many snapshots have been set.
    pub fn generation(&self) -> u64 {
        self.state().generation
    }

    /// Starts watching `node_id`'s resources.
    pub fn watch(&self, node_id: &str) -> NodeWatch {
        let mut state = self.state();
        let entry = state.snapshot.nodes.get(node_id);
        let is_known = entry.is_some();
        let current = self.served(entry);
        // Forget nodes nobody watches any more, so that proxies coming and
        // going under ever new ids do not grow the map between mesh changes.
        state
            .watchers
            .retain(|_, sender| sender.receiver_count() > 0);
        let receiver = match state.watchers.get(node_id) {
            Some(sender) => sender.subscribe(),
            None => {
                let (sender, receiver) = watch::channel(current);
                state.watchers.insert(node_id.to_owned(), sender);
                receiver
            }
        };
        NodeWatch { receiver, is_known }
    }

    /// What watchers of a node with `entry` (none: unknown) see.
    fn served(&self, entry: Option<&crate::resources::NodeEntry>) -> Served {
        match entry {
            Some(entry) => Served {
                is_known: true,
                service: entry.service.clone(),
                resources: Arc::clone(&entry.resources),
            },
            None => Served {
                is_known: false,
                service: None,
                resources: Arc::clone(&self.inner.empty),
            },
        }
    }
}

/// Gives every node with an identity `bundle` as its trust bundle.
fn with_trust_bundle(
    snapshot: &mut MeshSnapshot,
    bundle: Option<&weft_proto::config::v1::TrustBundle>,
) {
    for entry in snapshot.nodes.values_mut() {
        if entry.identity.is_some() {
            entry.resources = Arc::new(entry.resources.with_trust_bundle(bundle));
        }
    }
}

/// Whether two resource sets have the same version for every type.
fn same_versions(a: &NodeResources, b: &NodeResources) -> bool {
    a.types.len() == b.types.len()
        && a.types
            .iter()
            .zip(&b.types)
            .all(|((ta, ra), (tb, rb))| ta == tb && ra.version == rb.version)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use weft_proto::config::v1 as pb;

    use super::*;
    use crate::resources::NodeEntry;

    fn cluster(name: &str) -> pb::Cluster {
        pb::Cluster {
            name: name.into(),
            ..pb::Cluster::default()
        }
    }

    fn mesh(nodes: &[(&str, &[&str])]) -> MeshSnapshot {
        MeshSnapshot {
            nodes: nodes
                .iter()
                .map(|(id, clusters)| {
                    let resources = NodeResources::new(
                        vec![],
                        vec![],
                        clusters.iter().map(|c| cluster(c)).collect(),
                    );
                    (
                        (*id).to_owned(),
                        NodeEntry {
                            service: Some("svc".into()),
                            identity: None,
                            resources: Arc::new(resources),
                        },
                    )
                })
                .collect::<BTreeMap<_, _>>(),
            trust_domain: None,
        }
    }

    #[test]
    fn set_wakes_only_changed_nodes() {
        let cache = SnapshotCache::new();
        cache.set(mesh(&[("a", &["x"]), ("b", &["y"])]));
        let mut a = cache.watch("a");
        let mut b = cache.watch("b");
        assert!(a.is_known());
        assert_eq!(a.service().as_deref(), Some("svc"));
        a.current();
        b.current();
        cache.set(mesh(&[("a", &["x", "z"]), ("b", &["y"])]));
        assert!(a.receiver.has_changed().unwrap());
        assert!(!b.receiver.has_changed().unwrap());
        assert_eq!(cache.generation(), 2);
    }

    #[test]
    fn unknown_node_gets_empty_resources_then_config() {
        let cache = SnapshotCache::new();
        let mut w = cache.watch("ghost");
        assert!(!w.is_known());
        assert_eq!(*w.current(), NodeResources::default());
        cache.set(mesh(&[("ghost", &["x"])]));
        assert!(w.receiver.has_changed().unwrap());
        let got = w.current();
        assert_eq!(got.get(pb::CLUSTER_TYPE_URL).unwrap().resources.len(), 1);
    }

    /// Nodes with that many listeners each.
    fn with_listeners(nodes: &[(&str, usize)]) -> MeshSnapshot {
        MeshSnapshot {
            nodes: nodes
                .iter()
                .map(|(id, count)| {
                    let listeners = (0..*count)
                        .map(|i| pb::Listener {
                            name: format!("l{i}"),
                            ..pb::Listener::default()
                        })
                        .collect();
                    let resources = NodeResources::new(listeners, vec![], vec![]);
                    (
                        (*id).to_owned(),
                        NodeEntry {
                            service: None,
                            identity: None,
                            resources: Arc::new(resources),
                        },
                    )
                })
                .collect(),
            trust_domain: None,
        }
    }

    #[test]
    fn set_checked_refuses_an_empty_mesh_and_keeps_the_last_good_one() {
        let cache = SnapshotCache::new();
        cache.set_checked(with_listeners(&[("gw", 1)])).unwrap();
        assert_eq!(
            cache.set_checked(MeshSnapshot::default()),
            Err(SnapshotRefused::EmptyMesh)
        );
        assert_eq!(cache.generation(), 1);
        let mut gw = cache.watch("gw");
        assert!(gw.is_known());
        assert_eq!(gw.current().listener_count(), 1);
        // `set` is not checked: tests and callers that mean it still can.
        cache.set(MeshSnapshot::default());
        assert!(!gw.is_known_now());
        assert_eq!(gw.current().listener_count(), 0);
    }

    #[test]
    fn set_checked_refuses_to_remove_every_listener_of_a_connected_node() {
        let cache = SnapshotCache::new();
        cache.set(with_listeners(&[("gw", 1), ("idle", 1), ("web-1", 2)]));
        let gw = cache.watch("gw");
        let _web = cache.watch("web-1");
        // A node nobody watches may go; a watched one may lose some.
        cache
            .set_checked(with_listeners(&[("gw", 1), ("web-1", 1)]))
            .unwrap();
        for next in [
            with_listeners(&[("web-1", 1)]),
            with_listeners(&[("gw", 0), ("web-1", 1)]),
        ] {
            let refused = cache.set_checked(next).unwrap_err();
            assert_eq!(
                refused,
                SnapshotRefused::RemovesEveryListener {
                    nodes: vec!["gw".into()]
                }
            );
            assert_eq!(
                refused.to_string(),
                "the change removes every listener of connected proxies: node \"gw\""
            );
        }
        assert_eq!(cache.generation(), 2);
        // Once its proxy is gone, the node may be removed.
        drop(gw);
        cache.set_checked(with_listeners(&[("web-1", 1)])).unwrap();
        assert_eq!(cache.generation(), 3);
    }

    #[test]
    fn config_error_is_recorded_and_cleared_by_set() {
        let cache = SnapshotCache::new();
        cache.set_config_error(Some("bad yaml".into()));
        assert_eq!(cache.config_error().as_deref(), Some("bad yaml"));
        cache.set(MeshSnapshot::default());
        assert_eq!(cache.config_error(), None);
    }
}

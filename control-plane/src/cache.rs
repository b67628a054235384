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
//! - A rejected mesh change ([`SnapshotCache::set_config_error`]) changes no
//!   resources: the last good snapshot keeps being served.

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

/// What a node's watchers see: its service and its resources.
#[derive(Debug, Clone)]
struct Served {
    service: Option<String>,
    resources: Arc<NodeResources>,
}

#[derive(Debug, Default)]
struct State {
    snapshot: MeshSnapshot,
    generation: u64,
    config_error: Option<String>,
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
}

/// The cache was dropped while a stream was watching it.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the snapshot cache is gone")]
pub struct CacheClosed;

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
        state.generation += 1;
        state.config_error = None;
        state
            .watchers
            .retain(|_, sender| sender.receiver_count() > 0);
        let mut woken = 0_usize;
        for (node_id, sender) in &state.watchers {
            let next = self.served(snapshot.nodes.get(node_id));
            let changed = sender.send_if_modified(|current| {
                let changed = current.service != next.service
                    || !same_versions(&current.resources, &next.resources);
                // Swapped even when unchanged, so that the old snapshot's
                // resources are freed.
                *current = next;
                changed
            });
            woken += usize::from(changed);
        }
        state.snapshot = snapshot;
        info!(
            generation = state.generation,
            nodes = state.snapshot.nodes.len(),
            streams_woken = woken,
            "mesh snapshot applied"
        );
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
                service: entry.service.clone(),
                resources: Arc::clone(&entry.resources),
            },
            None => Served {
                service: None,
                resources: Arc::clone(&self.inner.empty),
            },
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
                            resources: Arc::new(resources),
                        },
                    )
                })
                .collect::<BTreeMap<_, _>>(),
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

    #[test]
    fn config_error_is_recorded_and_cleared_by_set() {
        let cache = SnapshotCache::new();
        cache.set_config_error(Some("bad yaml".into()));
        assert_eq!(cache.config_error().as_deref(), Some("bad yaml"));
        cache.set(MeshSnapshot::default());
        assert_eq!(cache.config_error(), None);
    }
}

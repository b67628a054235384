//! The incremental protocol (`DeltaAggregatedResources`): each response
//! carries only the resources that changed, and the names removed.
//!
//! Per stream and type URL the state is the subscription (wildcard when the
//! type's first request subscribes to nothing or to `*`, plus explicit
//! names), the version of each resource the client has (seeded from
//! `initial_resource_versions`), and the latest nonce. After each event the
//! stream sends, in [`TYPE_URLS`] order, each type whose wanted resources
//! differ from what the client has: changed ones in `resources`, vanished
//! ones in `removed_resources`. A type's first request is always answered,
//! possibly with nothing, so the client knows its initial state is
//! complete.
//!
//! ACK and NACK: every delta response is applied (or rejected) on its
//! own, so each response not yet answered is remembered with what it
//! changed in the client's recorded versions, and an answer to any of them
//! counts (not only to the latest). A NACK undoes that response's changes
//! (except names a later response sent again) and holds the type: nothing
//! is resent while its version stays the rejected one; when it changes,
//! everything the client lacks is sent, including the parts of the rejected
//! response that did not change. An answer naming no remembered response is
//! ignored. Subscription changes in any request are applied.

use std::collections::{BTreeMap, BTreeSet};

use tonic::Status;
use tracing::debug;
use weft_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};

use super::{StreamContext, StreamProtocol, type_index};
use crate::resources::{NodeResources, TYPE_URLS};

/// One type URL's state on one stream.
#[derive(Debug, Default)]
struct TypeState {
    is_subscribed: bool,
    is_wildcard: bool,
    /// Names subscribed explicitly (beside the wildcard).
    names: BTreeSet<String>,
    /// Name -> version of each resource the client has (or was sent).
    client: BTreeMap<String, String>,
    /// Responses sent and not answered yet, oldest first.
    in_flight: Vec<InFlight>,
    /// After a NACK: send nothing while the type's version is this one.
    held_version: Option<String>,
    /// Answer even with nothing to send (the type's first request).
    needs_send: bool,
}

/// A response the client has not answered yet.
#[derive(Debug)]
struct InFlight {
    nonce: String,
    /// The type version it was built from.
    version: String,
    /// Each name it sent or removed, with the client's version before
    /// (`None`: the client did not have it).
    changes: Vec<(String, Option<String>)>,
}

/// Explicitly subscribed names one stream may hold per type.
const MAX_SUBSCRIBED_NAMES: usize = 10_000;

/// Unanswered responses remembered per type; beyond this the oldest is
/// assumed applied. Bounds a stream's memory when a client never answers.
const MAX_IN_FLIGHT: usize = 4;

impl TypeState {
    fn wants(&self, name: &str) -> bool {
        self.is_wildcard || self.names.contains(name)
    }
}

#[derive(Debug)]
pub(super) struct Delta {
    ctx: StreamContext,
    types: [TypeState; TYPE_URLS.len()],
}

impl Delta {
    pub(super) fn new(ctx: StreamContext) -> Self {
        Self {
            ctx,
            types: Default::default(),
        }
    }
}

impl StreamProtocol for Delta {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;

    fn context(&self) -> &StreamContext {
        &self.ctx
    }

    fn on_request(&mut self, request: DeltaDiscoveryRequest) -> Result<(), Status> {
        let Some(index) = type_index(&request.type_url)? else {
            return Ok(());
        };
        let type_url = TYPE_URLS[index];
        let state = &mut self.types[index];

        if !state.is_subscribed {
            state.is_subscribed = true;
            state.needs_send = true;
            state.is_wildcard = request.resource_names_subscribe.is_empty();
            state.client = request.initial_resource_versions;
        }
        if !request.resource_names_subscribe.is_empty() {
            // New names must be answered even while a rejected version is
            // held back.
            state.held_version = None;
        }
        for name in request.resource_names_subscribe {
            if name == "*" {
                state.is_wildcard = true;
            } else {
                state.names.insert(name);
            }
        }
        for name in &request.resource_names_unsubscribe {
            if name == "*" {
                state.is_wildcard = false;
            } else {
                state.names.remove(name);
            }
        }
        // Names accumulate across requests: bound what one stream holds.
        if state.names.len() > MAX_SUBSCRIBED_NAMES {
            return Err(Status::resource_exhausted(format!(
                "more than {MAX_SUBSCRIBED_NAMES} resource names subscribed for {type_url}"
            )));
        }
        // The client forgets what it no longer wants; so do we, so that a
        // later subscription sends it again.
        if !request.resource_names_unsubscribe.is_empty() {
            let TypeState {
                client,
                is_wildcard,
                names,
                ..
            } = state;
            client.retain(|name, _| *is_wildcard || names.contains(name));
        }

        if request.response_nonce.is_empty() {
            return Ok(());
        }
        let Some(position) = state
            .in_flight
            .iter()
            .position(|f| f.nonce == request.response_nonce)
        else {
            debug!(type_url, nonce = %request.response_nonce, "answer to an unknown response ignored");
            return Ok(());
        };
        match &request.error_detail {
            Some(error) => {
                let rejected = state.in_flight.remove(position);
                self.ctx.nacked(type_url, &rejected.version, &error.message);
                for (name, previous) in rejected.changes {
                    // A later response that sent the name again decides
                    // what the client has.
                    let resent = state.in_flight[position..]
                        .iter()
                        .any(|later| later.changes.iter().any(|(n, _)| *n == name));
                    if resent {
                        continue;
                    }
                    match previous {
                        Some(version) => state.client.insert(name, version),
                        None => state.client.remove(&name),
                    };
                }
                state.held_version = Some(rejected.version);
            }
            None => {
                let acked: Vec<InFlight> = state.in_flight.drain(..=position).collect();
                if let Some(last) = acked.last() {
                    self.ctx.acked(type_url, &last.version);
                }
                state.held_version = None;
            }
        }
        Ok(())
    }

    /// The next response to send, if any type needs one, in [`TYPE_URLS`]
    /// order.
    fn next_response(&mut self, resources: &NodeResources) -> Option<DeltaDiscoveryResponse> {
        for (state, type_url) in self.types.iter_mut().zip(TYPE_URLS) {
            if !state.is_subscribed {
                continue;
            }
            let Some(typed) = resources.get(type_url) else {
                continue;
            };
            if !state.needs_send && state.held_version.as_deref() == Some(typed.version.as_str()) {
                continue;
            }
            let mut changed = Vec::new();
            for (name, resource) in &typed.resources {
                if state.wants(name)
                    && state.client.get(name).map(String::as_str) != Some(&resource.version)
                {
                    changed.push(Resource {
                        version: resource.version.clone(),
                        resource: Some(resource.resource.clone()),
                        name: name.clone(),
                    });
                }
            }
            let mut removed = Vec::new();
            let mut forgotten = Vec::new();
            for name in state.client.keys() {
                if !state.wants(name) {
                    forgotten.push(name.clone());
                } else if !typed.resources.contains_key(name) {
                    removed.push(name.clone());
                }
            }
            for name in &forgotten {
                state.client.remove(name);
            }
            if changed.is_empty() && removed.is_empty() && !state.needs_send {
                continue;
            }
            let mut changes = Vec::with_capacity(changed.len() + removed.len());
            for resource in &changed {
                let previous = state
                    .client
                    .insert(resource.name.clone(), resource.version.clone());
                changes.push((resource.name.clone(), previous));
            }
            for name in &removed {
                let previous = state.client.remove(name);
                changes.push((name.clone(), previous));
            }
            let nonce = self.ctx.next_nonce();
            state.needs_send = false;
            state.held_version = None;
            if state.in_flight.len() == MAX_IN_FLIGHT {
                state.in_flight.remove(0);
            }
            state.in_flight.push(InFlight {
                nonce: nonce.clone(),
                version: typed.version.clone(),
                changes,
            });
            self.ctx.sent(type_url, &typed.version);
            debug!(
                type_url,
                version = %typed.version,
                resources = changed.len(),
                removed = removed.len(),
                "sending"
            );
            return Some(DeltaDiscoveryResponse {
                system_version_info: typed.version.clone(),
                resources: changed,
                type_url: type_url.to_owned(),
                nonce,
                removed_resources: removed,
            });
        }
        None
    }
}

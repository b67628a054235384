//! The state-of-the-world protocol (`StreamAggregatedResources`): each
//! response carries every resource of its type the client asked for.
//!
//! Per stream and type URL the state is the subscribed names (empty or
//! `*`: all of the type), the version the client has or was last sent, and
//! the latest nonce. The stream task alternates between reading requests
//! and waking on node changes; after each event it sends, in
//! [`TYPE_URLS`] order, every subscribed type whose version differs from
//! what the client has. That one rule gives the protocol's behaviours:
//! - a new subscription whose `version_info` is already current gets
//!   nothing (a reconnecting proxy with the current config);
//! - a NACKed version is not resent (the client was sent it), and the type
//!   is sent again only when its resources change;
//! - a change pushes only the types that changed, clusters first.
//!
//! A request echoing a nonce that is not the latest sent for its type is
//! stale (the client has not seen the newest response yet) and ignored.

use tonic::Status;
use tracing::debug;
use weft_proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};

use super::{StreamContext, StreamProtocol, type_index};
use crate::resources::{NodeResources, TYPE_URLS};

/// One type URL's state on one stream.
#[derive(Debug, Default)]
struct TypeState {
    is_subscribed: bool,
    /// Sorted, deduplicated; empty means every resource of the type.
    names: Vec<String>,
    /// The version the client has, or was last sent.
    known_version: Option<String>,
    /// The latest nonce sent for this type.
    nonce: Option<String>,
    /// Send even if the version is unchanged (the names changed).
    needs_send: bool,
}

#[derive(Debug)]
pub(super) struct Sotw {
    ctx: StreamContext,
    types: [TypeState; TYPE_URLS.len()],
}

impl Sotw {
    pub(super) fn new(ctx: StreamContext) -> Self {
        Self {
            ctx,
            types: Default::default(),
        }
    }
}

impl StreamProtocol for Sotw {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;

    fn context(&self) -> &StreamContext {
        &self.ctx
    }

    fn on_request(&mut self, request: DiscoveryRequest) -> Result<(), Status> {
        let Some(index) = type_index(&request.type_url)? else {
            return Ok(());
        };
        let type_url = TYPE_URLS[index];
        let state = &mut self.types[index];
        let mut names = request.resource_names;
        if names.iter().any(|n| n == "*") {
            names.clear();
        }
        names.sort_unstable();
        names.dedup();

        if !request.response_nonce.is_empty()
            && let Some(latest) = &state.nonce
        {
            if *latest != request.response_nonce {
                debug!(type_url, nonce = %request.response_nonce, "stale request ignored");
                return Ok(());
            }
            let sent = state.known_version.as_deref().unwrap_or_default();
            match &request.error_detail {
                Some(error) => self.ctx.nacked(type_url, sent, &error.message),
                None => self.ctx.acked(type_url, sent),
            }
            if names != state.names {
                state.names = names;
                state.needs_send = true;
            }
            return Ok(());
        }

        // A new subscription, or one that echoes no nonce of ours.
        if !state.is_subscribed {
            state.is_subscribed = true;
            if !request.version_info.is_empty() {
                // The client says it runs this version: it is sent the
                // type only if the current one differs.
                self.ctx.acked(type_url, &request.version_info);
                state.known_version = Some(request.version_info);
            }
            state.names = names;
        } else if names != state.names {
            state.names = names;
            state.needs_send = true;
        }
        Ok(())
    }

    /// The next response to send, if any type needs one, in [`TYPE_URLS`]
    /// order.
    fn next_response(&mut self, resources: &NodeResources) -> Option<DiscoveryResponse> {
        for (state, type_url) in self.types.iter_mut().zip(TYPE_URLS) {
            if !state.is_subscribed {
                continue;
            }
            let typed = resources.get(type_url);
            let version = typed.map_or("", |t| t.version.as_str());
            if !state.needs_send && state.known_version.as_deref() == Some(version) {
                continue;
            }
            let selected = typed.map_or_else(Vec::new, |typed| {
                if state.names.is_empty() {
                    typed
                        .resources
                        .values()
                        .map(|r| r.resource.clone())
                        .collect()
                } else {
                    state
                        .names
                        .iter()
                        .filter_map(|name| typed.resources.get(name))
                        .map(|r| r.resource.clone())
                        .collect()
                }
            });
            let nonce = self.ctx.next_nonce();
            state.needs_send = false;
            state.nonce = Some(nonce.clone());
            state.known_version = Some(version.to_owned());
            self.ctx.sent(type_url, version);
            debug!(type_url, version, resources = selected.len(), "sending");
            return Some(DiscoveryResponse {
                version_info: version.to_owned(),
                resources: selected,
                type_url: type_url.to_owned(),
                nonce,
            });
        }
        None
    }
}

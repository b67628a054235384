//! The xDS client's decisions, without sockets: what to apply, what to ACK
//! and what to NACK, for the state-of-the-world protocol on one aggregated
//! stream.
//!
//! Each type (clusters, route configurations, listeners) has the response
//! last applied and, at most, one response received but not yet applied
//! ("pending"). A response is judged together with the other types' latest
//! resources, through the one validator. Since SotW responses of different
//! types arrive one after the other, a response can be valid only together
//! with the next one (a route that names a cluster still on its way, or
//! clusters that drop one a route still names until the new routes
//! arrive). So a candidate whose only problems are unresolved references
//! waits, ACKed or NACKed later, for at most [`WARMING_TIMEOUT`]: this is
//! Envoy's "warming". Any other problem NACKs the response that brought it.
//! When a candidate validates, every pending response is applied at once
//! and ACKed.

use std::time::{Duration, Instant};

use weft_proto::config::v1 as pb;
use weft_proto::envoy::config::core::v3::Node;
use weft_proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use weft_proto::google::rpc::Status;
use weft_proto::prost_types::Any;

use crate::config::proto::{bootstrap_from_resources, unpack};
use crate::config::{BootstrapSpec, Config, ValidationErrors};

/// How long a response whose references do not resolve yet waits for the
/// responses that would resolve them before it is NACKed.
pub(crate) const WARMING_TIMEOUT: Duration = Duration::from_secs(3);

/// `google.rpc.Code.INVALID_ARGUMENT`, the code of every NACK.
const INVALID_ARGUMENT: i32 = 3;

/// The types subscribed to, in the order of the first requests: trust
/// bundles before the clusters and listeners that verify peers with them,
/// policies before the routes and listeners that name them, a cluster
/// before the route that uses it, a route before the listener that names
/// it.
pub(crate) const TYPE_URLS: [&str; 5] = [
    pb::TRUST_BUNDLE_TYPE_URL,
    pb::POLICY_TYPE_URL,
    pb::CLUSTER_TYPE_URL,
    pb::ROUTE_CONFIGURATION_TYPE_URL,
    pb::LISTENER_TYPE_URL,
];

/// One response's content.
#[derive(Debug, Clone)]
struct Received {
    version: String,
    nonce: String,
    resources: Vec<Any>,
}

/// The last rejection of one type, for `/config_dump`.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Nack {
    pub(crate) version: String,
    pub(crate) error: String,
}

#[derive(Debug, Default)]
struct TypeState {
    applied: Option<Received>,
    pending: Option<Received>,
    last_nack: Option<Nack>,
}

/// What the caller does next with a response.
#[derive(Debug)]
pub(crate) enum Step {
    /// Apply this configuration, then report with [`XdsState::applied`] or
    /// [`XdsState::rejected`].
    Apply(Box<Config>),
    /// Send these requests (NACKs; possibly none).
    Send(Vec<DiscoveryRequest>),
}

/// The client's per-stream protocol state.
#[derive(Debug)]
pub(crate) struct XdsState {
    /// The proxy's own settings (admin, logs, metrics export, drain
    /// timeout), merged
    /// into every candidate so that it validates as a whole.
    bootstrap: BootstrapSpec,
    /// Names the configuration's source in logs and `/config_dump`.
    source: String,
    types: [TypeState; TYPE_URLS.len()],
    /// Set while a candidate waits for references to resolve.
    warming_since: Option<Instant>,
}

impl XdsState {
    pub(crate) fn new(bootstrap: BootstrapSpec, source: String) -> Self {
        Self {
            bootstrap,
            source,
            types: Default::default(),
            warming_since: None,
        }
    }

    /// The requests that open a stream: one subscription per type, each
    /// naming the version already applied, so that a control plane with
    /// nothing newer need not resend it. Responses pending on a previous
    /// stream are forgotten (their nonces mean nothing on a new stream).
    pub(crate) fn initial_requests(&mut self, node: &Node) -> Vec<DiscoveryRequest> {
        self.warming_since = None;
        TYPE_URLS
            .iter()
            .zip(&mut self.types)
            .enumerate()
            .map(|(i, (type_url, state))| {
                state.pending = None;
                DiscoveryRequest {
                    version_info: state
                        .applied
                        .as_ref()
                        .map(|a| a.version.clone())
                        .unwrap_or_default(),
                    node: (i == 0).then(|| node.clone()),
                    type_url: (*type_url).to_owned(),
                    ..DiscoveryRequest::default()
                }
            })
            .collect()
    }

    /// Judges a response: [`XdsState::receive`], [`Candidate::validate`]
    /// and [`XdsState::judge`] in one (the client runs the middle step off
    /// the control thread).
    #[cfg(test)]
    pub(crate) fn on_response(&mut self, response: DiscoveryResponse, now: Instant) -> Step {
        match self.receive(response) {
            Some(candidate) => {
                let (index, validated) = candidate.validate();
                self.judge(index, validated, now)
            }
            None => Step::Send(Vec::new()),
        }
    }

    /// Takes a response as its type's pending one and returns the
    /// configuration it makes with the other types' latest, to validate;
    /// `None` for a type not subscribed to.
    pub(crate) fn receive(&mut self, response: DiscoveryResponse) -> Option<Candidate> {
        let Some(index) = TYPE_URLS.iter().position(|t| *t == response.type_url) else {
            tracing::debug!(type_url = %response.type_url, "response for a type not subscribed to; ignored");
            return None;
        };
        self.types[index].pending = Some(Received {
            version: response.version_info,
            nonce: response.nonce,
            resources: response.resources,
        });
        Some(Candidate {
            index,
            spec: self.candidate_spec(),
            source: std::sync::Arc::from(self.source.as_str()),
        })
    }

    /// What to do with the response of type `index`, given its
    /// candidate's validation.
    pub(crate) fn judge(
        &mut self,
        index: usize,
        validated: Result<Config, Vec<crate::config::ConfigError>>,
        now: Instant,
    ) -> Step {
        match validated {
            Ok(config) => Step::Apply(Box::new(config)),
            Err(errors) if errors.iter().all(|e| e.is_unresolved_reference) => {
                let since = *self.warming_since.get_or_insert(now);
                tracing::debug!(waited = ?now.duration_since(since), "waiting for referenced resources");
                Step::Send(Vec::new())
            }
            Err(errors) => {
                let message = errors.iter().map(ToString::to_string).collect::<Vec<_>>();
                Step::Send(self.nack(index, &message.join("\n")).into_iter().collect())
            }
        }
    }

    /// When the waiting candidate must be given up, if one waits.
    pub(crate) fn warming_deadline(&self) -> Option<Instant> {
        self.warming_since.map(|since| since + WARMING_TIMEOUT)
    }

    /// The wait is over: NACKs every pending response with the candidate's
    /// errors.
    pub(crate) fn warming_expired(&mut self) -> Vec<DiscoveryRequest> {
        let message = match self.candidate() {
            Ok(_) => return Vec::new(), // resolved meanwhile; cannot happen without a response
            Err(errors) => errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n"),
        };
        self.rejected(&message)
    }

    /// The candidate was applied: ACKs every pending response.
    pub(crate) fn applied(&mut self) -> Vec<DiscoveryRequest> {
        self.warming_since = None;
        TYPE_URLS
            .iter()
            .zip(&mut self.types)
            .filter_map(|(type_url, state)| {
                let received = state.pending.take()?;
                let ack = DiscoveryRequest {
                    version_info: received.version.clone(),
                    type_url: (*type_url).to_owned(),
                    response_nonce: received.nonce.clone(),
                    ..DiscoveryRequest::default()
                };
                state.applied = Some(received);
                Some(ack)
            })
            .collect()
    }

    /// The candidate could not be applied (or never validated): NACKs
    /// every pending response with `error`.
    pub(crate) fn rejected(&mut self, error: &str) -> Vec<DiscoveryRequest> {
        self.warming_since = None;
        (0..TYPE_URLS.len())
            .filter_map(|index| self.nack(index, error))
            .collect()
    }

    /// True once every configuration type has been applied at least once:
    /// the proxy has its whole first configuration.
    /// Trust bundles are not needed for that: a proxy with mesh identities
    /// has its domain's bundle from its first certificate, and `/ready`
    /// waits for that on its own. Nor are policies: a listener or route
    /// that names one does not validate without it.
    pub(crate) fn is_complete(&self) -> bool {
        TYPE_URLS.iter().zip(&self.types).all(|(type_url, t)| {
            [pb::TRUST_BUNDLE_TYPE_URL, pb::POLICY_TYPE_URL].contains(type_url)
                || t.applied.is_some()
        })
    }

    /// Versions and rejections, for `/config_dump`.
    pub(crate) fn status(&self) -> serde_json::Value {
        let types: serde_json::Map<String, serde_json::Value> = TYPE_URLS
            .iter()
            .zip(&self.types)
            .map(|(type_url, state)| {
                (
                    (*type_url).to_owned(),
                    serde_json::json!({
                        "version": state.applied.as_ref().map(|a| a.version.as_str()),
                        "resources": state.applied.as_ref().map_or(0, |a| a.resources.len()),
                        "waiting_version": state.pending.as_ref().map(|p| p.version.as_str()),
                        "last_nack": state.last_nack,
                    }),
                )
            })
            .collect();
        serde_json::Value::Object(types)
    }

    /// Removes the pending response of `index` and builds its NACK.
    fn nack(&mut self, index: usize, error: &str) -> Option<DiscoveryRequest> {
        let state = &mut self.types[index];
        let rejected = state.pending.take()?;
        tracing::warn!(
            type_url = TYPE_URLS[index],
            version = %rejected.version,
            %error,
            "configuration rejected"
        );
        state.last_nack = Some(Nack {
            version: rejected.version,
            error: error.to_owned(),
        });
        if self.types.iter().all(|t| t.pending.is_none()) {
            self.warming_since = None;
        }
        Some(DiscoveryRequest {
            version_info: self.types[index]
                .applied
                .as_ref()
                .map(|a| a.version.clone())
                .unwrap_or_default(),
            type_url: TYPE_URLS[index].to_owned(),
            response_nonce: rejected.nonce,
            error_detail: Some(Status {
                code: INVALID_ARGUMENT,
                message: error.to_owned(),
                details: Vec::new(),
            }),
            ..DiscoveryRequest::default()
        })
    }

    /// The configuration made of every type's newest resources.
    fn candidate(&self) -> Result<Config, Vec<crate::config::ConfigError>> {
        validate(
            self.candidate_spec(),
            std::sync::Arc::from(self.source.as_str()),
        )
    }

    /// The proxy's own settings with every type's newest resources, not
    /// validated: decoding only.
    fn candidate_spec(&self) -> Result<BootstrapSpec, Vec<crate::config::ConfigError>> {
        let latest = |index: usize| {
            let state = &self.types[index];
            state
                .pending
                .as_ref()
                .or(state.applied.as_ref())
                .map_or(&[][..], |r| r.resources.as_slice())
        };
        let mut errors = Vec::new();
        let bundles = decode::<pb::TrustBundle>(latest(0), "trust_bundle", &mut errors);
        let policies = decode::<pb::Policy>(latest(1), "policy", &mut errors);
        let clusters = decode::<pb::Cluster>(latest(2), "cluster", &mut errors);
        let routes = decode::<pb::RouteConfiguration>(latest(3), "route_config", &mut errors);
        let listeners = decode::<pb::Listener>(latest(4), "listener", &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }
        let spec = bootstrap_from_resources(listeners, routes, clusters, policies)
            .map_err(|e| ValidationErrors::from(e).0)?;
        Ok(BootstrapSpec {
            trust_bundles: bundles.into_iter().map(Into::into).collect(),
            admin: self.bootstrap.admin.clone(),
            drain_timeout: self.bootstrap.drain_timeout,
            drain_delay: self.bootstrap.drain_delay,
            access_log: self.bootstrap.access_log.clone(),
            decision_log: self.bootstrap.decision_log.clone(),
            metrics_export: self.bootstrap.metrics_export.clone(),
            ..spec
        })
    }
}

/// A response's candidate configuration, decoded, not yet validated.
#[derive(Debug)]
pub(crate) struct Candidate {
    /// The type of the response that made it.
    index: usize,
    spec: Result<BootstrapSpec, Vec<crate::config::ConfigError>>,
    source: std::sync::Arc<str>,
}

impl Candidate {
    /// Validates: CPU work (regular expressions, Rego compilation of a
    /// changed policy, certificate files read), kept off the control
    /// thread by the client. Returns the response's type with the
    /// outcome, for [`XdsState::judge`].
    pub(crate) fn validate(self) -> (usize, Result<Config, Vec<crate::config::ConfigError>>) {
        (self.index, validate(self.spec, self.source))
    }
}

/// A candidate's configuration, validated, naming `source`.
fn validate(
    spec: Result<BootstrapSpec, Vec<crate::config::ConfigError>>,
    source: std::sync::Arc<str>,
) -> Result<Config, Vec<crate::config::ConfigError>> {
    let mut config = Config::try_from(spec?).map_err(|e| e.0)?;
    config.source = source;
    Ok(config)
}

/// Unpacks every resource, reporting those that are not an `M`.
fn decode<M: weft_proto::prost::Name + Default>(
    resources: &[Any],
    kind: &'static str,
    errors: &mut Vec<crate::config::ConfigError>,
) -> Vec<M> {
    resources
        .iter()
        .enumerate()
        .filter_map(|(i, any)| match unpack::<M>(any) {
            Ok(message) => Some(message),
            Err(error) => {
                errors.push(crate::config::ConfigError {
                    kind,
                    resource: format!("#{i}"),
                    field: "(resource)".into(),
                    message: error.to_string(),
                    is_unresolved_reference: false,
                });
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;

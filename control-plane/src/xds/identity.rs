//! The identity service (`weft.identity.v1.IdentityService/Sign`), served
//! on the xDS port with the same bearer-token check: a proxy sends a CSR
//! for its workload's SPIFFE ID and gets an X.509-SVID and the trust
//! bundle back.
//!
//! Who may hold what is the mesh's word, not the caller's: the node id in
//! the request maps to one identity (its service's, or its gateway's), and
//! a CSR for any other is refused (`PERMISSION_DENIED`, logged and
//! counted). The CSR's signature must verify, so the caller holds the key;
//! everything else in the certificate (extensions, lifetime, serial) is
//! the CA's choice.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tonic::{Request, Response, Status};
use tracing::{info, warn};
use weft_proto::identity::v1::identity_service_server::IdentityService;
use weft_proto::identity::v1::{SignRequest, SignResponse};

use super::auth::Caller;
use super::{PeerAddr, Shared};
use crate::authority::Authority;
use crate::ca::CaError;

/// The shortest certificate a proxy may ask for: renewing at half life,
/// anything shorter would have proxies call the control plane constantly.
pub const MIN_TTL: Duration = Duration::from_secs(5);

/// The CA and the certificate lifetimes the identity service uses.
#[derive(Debug, Clone)]
pub struct IdentityOptions {
    /// The mesh's CA and trust bundle.
    pub authority: Arc<Authority>,
    /// The lifetime of a certificate when the proxy asks for none, and the
    /// longest it may ask for.
    pub ttl: Duration,
    /// mTLS on the xDS port, for proxies that hold a certificate.
    pub xds_tls: Option<Arc<super::XdsTls>>,
}

#[derive(Debug)]
pub(super) struct Signer {
    pub(super) shared: Arc<Shared>,
    pub(super) options: Option<IdentityOptions>,
}

impl Signer {
    fn refuse(&self, node: &str, peer: Option<PeerAddr>, status: Status) -> Status {
        self.shared
            .metrics
            .csr_refused
            .fetch_add(1, Ordering::Relaxed);
        warn!(
            node,
            peer.addr = ?peer.map(|p| p.0),
            code = ?status.code(),
            reason = status.message(),
            "certificate signing refused"
        );
        status
    }
}

#[tonic::async_trait]
impl IdentityService for Signer {
    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let peer = request.extensions().get::<PeerAddr>().copied();
        let caller = request.extensions().get::<Caller>().cloned();
        let request = request.into_inner();
        let node = request.node_id.as_str();
        if node.is_empty() || node.len() > super::MAX_NODE_ID_BYTES {
            return Err(self.refuse(
                node,
                peer,
                Status::invalid_argument("node_id: required, at most 512 bytes"),
            ));
        }
        if let Err(status) = self.shared.check_caller(caller.as_ref(), node) {
            return Err(self.refuse(node, peer, status));
        }
        let Some(options) = &self.options else {
            return Err(self.refuse(
                node,
                peer,
                Status::failed_precondition(
                    "this control plane has no CA (start weft-cp serve with --state-dir, or --ca-cert and --ca-key)",
                ),
            ));
        };
        let identity = match self.shared.cache.identity(node) {
            None => {
                return Err(self.refuse(
                    node,
                    peer,
                    Status::permission_denied(format!("node {node:?} is not in the mesh")),
                ));
            }
            Some(None) => {
                return Err(self.refuse(
                    node,
                    peer,
                    Status::failed_precondition(
                        "the mesh has no trust_domain: its workloads have no identity",
                    ),
                ));
            }
            Some(Some(identity)) => identity,
        };
        let ttl = match request.ttl {
            None => options.ttl,
            Some(ttl) => match Duration::try_from(ttl) {
                Ok(ttl) => ttl.clamp(MIN_TTL, options.ttl),
                Err(_) => {
                    return Err(self.refuse(
                        node,
                        peer,
                        Status::invalid_argument("ttl: must be positive"),
                    ));
                }
            },
        };
        let trust = options.authority.current();
        let (chain_pem, not_after) = trust
            .ca
            .sign_csr(&request.csr_pem, &identity, ttl)
            .map_err(|error| {
                let status = match error {
                    CaError::Identity(message) => Status::permission_denied(message),
                    csr @ CaError::Csr(_) => Status::invalid_argument(csr.to_string()),
                    other => Status::internal(other.to_string()),
                };
                self.refuse(node, peer, status)
            })?;
        self.shared
            .metrics
            .certificates_issued
            .fetch_add(1, Ordering::Relaxed);
        info!(
            node,
            identity,
            expires = %humantime::format_rfc3339_seconds(not_after),
            "workload certificate issued"
        );
        Ok(Response::new(SignResponse {
            cert_chain_pem: chain_pem,
            trust_bundle_pem: trust.bundle_pem.clone(),
            spiffe_id: identity,
            signer: trust.signer.clone(),
        }))
    }
}

//! The `weft.echo.v1.Echo` gRPC service, served on the echo server's port
//! for requests whose `content-type` starts with `application/grpc`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Bytes, BytesMut};
use futures_util::stream::{self, Stream, StreamExt as _};
use tonic::{Code, Request, Response, Status, Streaming};
use weft_proto::echo::v1::echo_server::{Echo, EchoServer as GrpcEchoServer};
use weft_proto::echo::v1::{EchoRequest, EchoResponse};
use weft_proto::grpc::health::v1::health_check_response::ServingStatus;
use weft_proto::grpc::health::v1::health_server::{Health, HealthServer};
use weft_proto::grpc::health::v1::{HealthCheckRequest, HealthCheckResponse};

/// The tonic service (a tower `Service` over `http::Request`) the HTTP
/// handler delegates gRPC requests to.
pub(crate) type GrpcService = GrpcEchoServer<EchoService>;

/// The `grpc.health.v1.Health` service.
pub(crate) type GrpcHealthService = HealthServer<HealthService>;

/// Builds the health service, answering `SERVING` while `healthy` holds.
pub(crate) fn health_service(healthy: Arc<AtomicBool>) -> GrpcHealthService {
    HealthServer::new(HealthService { healthy })
}

/// Answers `grpc.health.v1.Health/Check` for every service name: the
/// server's health as [`crate::echo::EchoServer::set_healthy`] set it.
#[derive(Debug)]
pub(crate) struct HealthService {
    healthy: Arc<AtomicBool>,
}

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let status = if self.healthy.load(Ordering::Relaxed) {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        Ok(Response::new(HealthCheckResponse {
            status: status.into(),
        }))
    }
}

/// Builds the gRPC service answering as `name`.
pub(crate) fn service(name: Arc<str>) -> GrpcService {
    GrpcEchoServer::new(EchoService { name })
}

/// Implements the echo RPCs.
#[derive(Debug)]
pub(crate) struct EchoService {
    name: Arc<str>,
}

fn reply(name: &str, payload: Bytes) -> EchoResponse {
    EchoResponse {
        payload,
        server: name.to_owned(),
    }
}

/// Fails with the requested status when `status_code` is non-zero.
fn requested_status(status_code: u32) -> Result<(), Status> {
    if status_code == 0 {
        return Ok(());
    }
    // Codes beyond i32 are not gRPC codes; tonic maps unknown numbers to
    // UNKNOWN, and so do we.
    let code = i32::try_from(status_code).map_or(Code::Unknown, Code::from);
    Err(Status::new(code, "status requested by status_code"))
}

type ServerStream = stream::Map<
    stream::Take<stream::Repeat<EchoResponse>>,
    fn(EchoResponse) -> Result<EchoResponse, Status>,
>;

type BidiStream = Pin<Box<dyn Stream<Item = Result<EchoResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let request = request.into_inner();
        requested_status(request.status_code)?;
        Ok(Response::new(reply(&self.name, request.payload)))
    }

    type ServerStreamStream = ServerStream;

    async fn server_stream(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<ServerStream>, Status> {
        let request = request.into_inner();
        requested_status(request.status_code)?;
        let count = usize::try_from(request.count).unwrap_or(usize::MAX);
        let ok: fn(EchoResponse) -> Result<EchoResponse, Status> = Ok;
        let responses = stream::repeat(reply(&self.name, request.payload))
            .take(count)
            .map(ok);
        Ok(Response::new(responses))
    }

    async fn client_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoResponse>, Status> {
        let mut requests = request.into_inner();
        let mut payload = BytesMut::new();
        while let Some(request) = requests.message().await? {
            requested_status(request.status_code)?;
            payload.extend_from_slice(&request.payload);
        }
        Ok(Response::new(reply(&self.name, payload.freeze())))
    }

    type BidiStreamStream = BidiStream;

    async fn bidi_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<BidiStream>, Status> {
        let name = Arc::clone(&self.name);
        let responses = request.into_inner().map(move |request| {
            let request = request?;
            requested_status(request.status_code)?;
            Ok(reply(&name, request.payload))
        });
        Ok(Response::new(Box::pin(responses)))
    }
}

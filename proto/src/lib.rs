//! Weft's protobuf definitions: prost messages and tonic clients and servers
//! generated at build time from the `.proto` files under `proto/proto/`.
//!
//! Each proto package becomes a module path mirroring it (`weft.echo.v1` is
//! [`echo::v1`]). This crate owns only generated code: services are
//! implemented by the crates that serve them. The clients are generic over
//! any tonic `GrpcService` (no transport is bundled), so callers pick their
//! own channel.

/// The echo service (`weft.echo.v1`) served by `weft-bench echo`.
pub mod echo {
    /// Version 1 of the echo API.
    pub mod v1 {
        #![allow(missing_docs, unreachable_pub, missing_debug_implementations)]
        #![allow(clippy::all, clippy::pedantic)]
        tonic::include_proto!("weft.echo.v1");
    }
}

//! Weft's bench harness.
//!
//! The library holds what benchmarks and end-to-end tests run in-process; the
//! `weft-bench` binary exposes the same pieces as subcommands:
//!
//! - the echo upstream ([`echo`]): the server every benchmark and test sends
//!   traffic to, speaking HTTP/1.1, h2c, gRPC, WebSocket (any HTTP/1.1
//!   upgrade) and opaque TCP;
//! - the load generator ([`load`]): open- or closed-loop HTTP/1.1, h2c, gRPC
//!   or TCP load against a loopback target, with latency corrected for
//!   coordinated omission;
//! - the scenario runner ([`compare`]): the same scenarios through no proxy,
//!   weft, nginx and HAProxy, interleaved, reported as tables, JSON and
//!   latency charts;
//! - the control-plane benchmark ([`xds`]): push convergence and memory per
//!   connected proxy of a real `weft-cp serve` under N simulated proxies.

pub mod compare;
pub mod echo;
pub mod load;
pub mod otlp;
pub mod xds;

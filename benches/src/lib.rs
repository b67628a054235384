//! Weft's bench harness.
//!
//! The library holds what benchmarks and end-to-end tests run in-process; the
//! `weft-bench` binary exposes the same pieces as subcommands. Today that is
//! the echo upstream ([`echo`]): the server every benchmark and test sends
//! traffic to, speaking HTTP/1.1, h2c, gRPC, WebSocket (any HTTP/1.1 upgrade)
//! and opaque TCP.

pub mod echo;

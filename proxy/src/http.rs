//! HTTP: the HTTP/1.1 server (our own codec) and the HTTP/2 one (hyper's),
//! the router, header rules, upgrades and the error-to-response mapping.

pub(crate) mod body;
pub(crate) mod error;
pub(crate) mod h1;
pub(crate) mod headers;
pub(crate) mod route;
pub(crate) mod router;
pub(crate) mod server;
